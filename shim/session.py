"""One vhost-user connection: the shim's per-connection state machine (sans-IO).

Theory of operation
===================

A :class:`Session` is fed decoded :class:`~kvhost.vhost_user.protocol.Message` objects (or raw
bytes + fds through :meth:`Session.receive`) and returns the bytes to send back. It never
touches a socket. It checks every message against two things, then hands it to a
:class:`Backend` (``shim.kernel_backend.KernelBackend`` in the program, a recording fake in
the unit tests) as a plain verb with plain arguments:

* the **connection state**, :class:`ConnectionState`::

        AWAITING_OWNER --SET_OWNER--> OWNED
              |                         |
              +------ any error --------+--> FAILED   (fds closed, backend closed)
              +------ close() ----------+--> CLOSED

  Before SET_OWNER only the negotiation queries are accepted (GET/SET_(PROTOCOL_)FEATURES
  reads, GET_QUEUE_NUM, the version extension); everything that touches the device needs
  OWNED. SET_OWNER is where the kernel devices are opened and VHOST_SET_OWNER issued
  (QEMU sends it at connect time, so its ~20 ms never lands on the guest's DRIVER_OK).
  QEMU sends SET_OWNER once per queue pair over the same socket; repeats are no-ops.

* the **pinned interface version**: GET_FEATURES offers exactly
  ``versions.serve_features(version) | PROTOCOL_FEATURES | LOG_ALL``; a SET_FEATURES with any
  other bit fails the connection, naming the bits. A frontend that negotiated kvhost's
  ``KVHOST_INTERFACE_VERSION`` protocol bit may select another version the shim can serve
  with SET_INTERFACE_VERSION, until the first SET_FEATURES locks the version.

Each vring has its own :class:`Vring`: a :class:`VringState` and what the backend was given
(``enabled``, ``num``, ``addr``)::

                 SET_VRING_NUM / _BASE / _ADDR (only while STOPPED, except ADDR)
                         |  (the session checks them, then passes them on)
                         v
        STOPPED --SET_VRING_KICK--> STARTED <--disabled / not configured-- RUNNING
           ^                           |  --enabled, num, addr and table-->   |
           |                           |    (VHOST_NET_SET_BACKEND tap)       |
           +------- GET_VRING_BASE ----+--------------------------------------+
                                          (VHOST_NET_SET_BACKEND -1 first)

A ring is *started* by its kick fd (vhost-user: the backend starts a ring on a kick; the
kernel polls the kick fd itself, so receiving it is the start) and stopped by GET_VRING_BASE.
A started ring *runs* -- the tap queue is attached with the backend's ``set_backend`` --
only while it is also enabled (SET_VRING_ENABLE; rings start enabled when PROTOCOL_FEATURES
is not negotiated), has a size and addresses, and a memory table exists. QEMU's real order is
accepted: SET_VRING_CALL/ERR and SET_VRING_ENABLE before the rings are configured, and
SET_VRING_ENABLE before SET_FEATURES/SET_MEM_TABLE at DRIVER_OK.

The session owns every protocol rule about a ring, and the backend sees only values that
passed them: the index (below 2 x the queue pairs the version allows), the size (a power of
two up to the version's maximum, unchanged while the ring is not STOPPED), the address
flags (only VHOST_VRING_F_LOG; logging only after SET_LOG_BASE) and alignment (descriptor
table 16, avail 2, used 4 bytes), that addresses come after a memory table, that the dirty log
covers all guest memory (checked whichever of the two comes last), and that a kick carries
an fd (the codec has already matched fd counts to the payloads). What needs the mapped
memory -- translating addresses, checking a ring lies inside one region for its full size
-- is the backend's, with the size the session passes in :class:`~kvhost.vhost.VringConfig`;
a ring resized after its addresses were given gets them again, with the new size, before it
runs; a new memory table comes with the configured rings, to move them before the old table
is unmapped. Values the kernel keeps across a ring stop are passed on only when they change:
SET_FEATURES and SET_VRING_NUM, which QEMU resends at every DRIVER_OK.

Replies: requests with a reply payload get it; any other request carrying NEED_REPLY gets a
REPLY_ACK u64 (0 = success) once REPLY_ACK is negotiated -- a failure value when the request
failed, just before the connection is dropped. The session's events (``shim.eventlog``) wait
for :meth:`Session.log_events`, which the caller invokes once the replies are sent: a ring
stop's reply must not wait for its log line.

Errors: anything the frontend did wrong (bad state, bad bits, unknown request, bad sizes) is a
:class:`~kvhost.errors.RemoteProtocolError`; the kernel refusing something is a
:class:`~kvhost.errors.KernelError`. Either fails the connection: one log line saying what
happened, rings stopped, every fd closed. Only two refusals leave the connection up, because
the protocol defines a negative answer for them: an unservable SET_INTERFACE_VERSION and a
NET_SET_MTU the tap refuses.

File descriptors: a message's fds belong to the session the moment it gets the message.
Each fd handed to the backend becomes the backend's (it closes it on success and on error);
every fd not handed over is closed before :meth:`Session.handle` returns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from kvhost import abi, features, versions
from kvhost.errors import (
    KernelError,
    KvhostError,
    RemoteProtocolError,
    UsageError,
    VersionError,
)
from kvhost.memory import FrontendRegion
from kvhost.vhost import LogRegion, VringConfig
from kvhost.vhost_user import protocol as p
from shim.eventlog import event

log = logging.getLogger("kvhost.shim")

#: protocol features the shim offers (kvhost's version extension included)
OFFERED_PROTOCOL_FEATURES = (
    p.ProtocolFeature.MQ
    | p.ProtocolFeature.LOG_SHMFD
    | p.ProtocolFeature.RARP
    | p.ProtocolFeature.REPLY_ACK
    | p.ProtocolFeature.MTU
    | p.ProtocolFeature.KVHOST_INTERFACE_VERSION
)

REPLY_OK = 0
REPLY_FAILED = 1

# Plain-int masks for the per-message checks: ``int & IntFlag`` runs enum code in Python.
_REPLY_ACK = int(p.ProtocolFeature.REPLY_ACK)
_LOG_SHMFD = int(p.ProtocolFeature.LOG_SHMFD)
_KVHOST_VERSION = int(p.ProtocolFeature.KVHOST_INTERFACE_VERSION)
#: requests that never get a REPLY_ACK (they have a reply of their own)
_NO_ACK = frozenset(int(r) for r in p.INHERENT_REPLIES) | {int(p.Request.SET_LOG_BASE)}
_NEED_REPLY = int(p.HeaderFlag.NEED_REPLY)
_VRING_F_LOG = 1 << abi.VHOST_VRING_F_LOG
#: one bit of dirty log per guest page of this size
_LOG_PAGE = abi.VHOST_PAGE_SIZE
#: request id -> the encoded success ack (bytes are immutable: built once, sent many times)
_ACK_OK: dict[int, bytes] = {}


class ConnectionState(enum.Enum):
    """Lifecycle of one frontend connection."""

    #: connected; only negotiation queries until SET_OWNER
    AWAITING_OWNER = "awaiting-owner"
    #: SET_OWNER done: kernel devices exist, device messages accepted
    OWNED = "owned"
    #: a protocol or kernel error happened; everything is closed, drop the socket
    FAILED = "failed"
    #: closed in order (frontend hung up or the shim shuts down)
    CLOSED = "closed"


class VringState(enum.Enum):
    """Lifecycle of one vring (see the module docstring)."""

    #: not started: initial, or after GET_VRING_BASE
    STOPPED = "stopped"
    #: kick received, but disabled or not fully configured: tap queue detached
    STARTED = "started"
    #: kernel backend attached: the kernel moves packets
    RUNNING = "running"


class Backend(Protocol):
    """The verbs the session needs from whatever really runs the rings.

    The names and argument order are :class:`kvhost.vhost.VhostNet`'s (rust-vmm's
    ``VhostBackend``): what differs is only the address space -- memory regions come as
    the frontend's files and addresses, the log as a :class:`~kvhost.vhost.LogRegion`.
    vhost-net's extra, :meth:`set_backend`, and the two vhost-user net requests follow.

    The session calls a verb only with values it has validated (ring index, size, flags,
    alignment, fd presence, order): a backend checks nothing the protocol decides. Rings
    are numbered as on the wire (queue pair ``index // 2``, ``index % 2`` = 0 RX, 1 TX).
    Every method taking an fd takes ownership of it (closes it, also on error). Methods
    raise :class:`RemoteProtocolError` for bad frontend input only they can see (an
    address outside the mapped memory, a log file too short) and :class:`KernelError`
    when the kernel refuses.
    """

    @property
    def queue_pairs(self) -> int:
        """Queue pairs (tap queues) this backend serves."""
        ...

    @property
    def max_mem_regions(self) -> int:
        """The most memory regions SET_MEM_TABLE may carry."""
        ...

    def set_owner(self) -> None:
        """Open the kernel devices and take ownership (VHOST_SET_OWNER)."""

    def reset_owner(self) -> None:
        """Back to the state right after :meth:`set_owner` (table and log dropped); every
        ring is detached first."""

    def set_features(self, virtio_features: int) -> None:
        """Apply negotiated virtio features (PROTOCOL_FEATURES removed; LOG_ALL kept)."""

    def set_mem_table(
        self, regions: Sequence[FrontendRegion], rings: Sequence[tuple[int, VringConfig]] = ()
    ) -> None:
        """Map the regions and give the kernel the new table; ``rings`` (those with
        addresses) move to it before the old table goes."""

    def set_log_base(self, base: int, region: LogRegion | None = None) -> None:
        """Map the dirty log ``region`` and hand it to the kernel (``base`` unused)."""

    def set_vring_num(self, index: int, num: int) -> None: ...

    def set_vring_base(self, index: int, base: int) -> None: ...

    def get_vring_base(self, index: int) -> int:
        """The kernel's next avail index of a detached ring."""
        ...

    def set_vring_addr(self, index: int, config: VringConfig) -> None:
        """Frontend virtual addresses; the backend translates them into its own."""

    def set_vring_kick(self, index: int, fd: int) -> None: ...

    def set_vring_call(self, index: int, fd: int) -> None:
        """``fd`` -1 unbinds."""

    def set_vring_err(self, index: int, fd: int) -> None:
        """``fd`` -1 unbinds."""

    def set_backend(self, index: int, attach: bool) -> None:
        """Attach the ring's tap queue, or detach it (VHOST_NET_SET_BACKEND tap fd / -1)."""

    def send_rarp(self, mac: bytes) -> None:
        """Inject a RARP announcement from ``mac`` into the tap."""

    def set_mtu(self, mtu: int) -> None: ...

    def close(self) -> None:
        """Close everything; every ring is detached first. Idempotent."""


@dataclass(slots=True)
class Vring:
    """What the session knows about one vring."""

    index: int
    state: VringState = VringState.STOPPED
    enabled: bool = False
    #: the size the backend has (None: never set)
    num: int | None = None
    #: the addresses (frontend's) the backend has, with the size they were checked for
    addr: VringConfig | None = None


@dataclass(slots=True)
class _Pending:
    """The fds of the message being handled; handlers take what they pass on."""

    fds: list[int] = field(default_factory=list)

    def take(self) -> list[int]:
        """All of them: the codec checked their number against the payload."""
        out, self.fds = self.fds, []
        return out

    def close(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []


_NO_FDS = _Pending()


class _Refused(KvhostError):
    """A request the protocol lets the backend decline without dropping the connection."""


_Handler = Callable[["Session", p.Message, _Pending], "p.Payload | None"]
# Handler table flags: may the request come before SET_OWNER? (Plain bools, and states
# compared by identity below: hashing an Enum member runs Python code on every message.)
_BEFORE_OWNER = False
_OWNED = True
_FAILED = ConnectionState.FAILED
_CLOSED = ConnectionState.CLOSED


def offered_features(version: versions.InterfaceVersion) -> int:
    """What GET_FEATURES answers under ``version``: its bits plus PROTOCOL_FEATURES and
    LOG_ALL (the shim always offers dirty logging: migration needs it)."""
    return versions.serve_features(version) | features.PROTOCOL_FEATURES | features.LOG_ALL


class Session:
    """The state machine of one connection; see the module docstring.

    ``version`` is served unless the frontend selects another one of ``supported`` (the
    versions this host can serve, oldest first) through the version extension; ``pinned``
    forbids that (the operator chose ``version``). ``name`` prefixes log lines.
    """

    def __init__(
        self,
        backend: Backend,
        version: versions.InterfaceVersion,
        *,
        supported: Sequence[versions.InterfaceVersion] = (),
        pinned: bool = False,
        name: str = "vhost-user",
    ) -> None:
        reason = unservable_reason(version)
        if reason is not None:
            raise VersionError(reason)
        self.backend = backend
        self.version = version
        self.supported = [v for v in supported if unservable_reason(v) is None]
        if not any(version.same_interface(v) for v in self.supported):
            self.supported.append(version)
        self.pinned = pinned
        self.name = name
        self.state = ConnectionState.AWAITING_OWNER
        self.codec = p.BackendCodec()
        self.protocol_features = 0
        self.acked_features: int | None = None
        self.has_mem_table = False
        #: the guest-physical end of the memory table (0: none yet)
        self.memory_top = 0
        #: bytes of dirty log the backend has (None: no SET_LOG_BASE yet)
        self.log_size: int | None = None
        self.vrings = [Vring(i) for i in range(2 * backend.queue_pairs)]
        #: vrings 0 .. _ring_limit - 1 exist (2 x queue_pairs; kept current with the version)
        self._ring_limit = 2 * self.queue_pairs
        #: the one-sentence reason the connection failed, for the server's log line
        self.error: str | None = None
        #: monotonic ns of the first ring message of a start (NUM/BASE/ADDR/KICK while no ring
        #: runs), so each ``vring`` running event says how long the start took in the shim's
        #: hands -- on a migration's destination, that is the shim's share of the downtime
        self._start_began: int | None = None
        #: events of the messages handled so far, logged by :meth:`log_events`
        self._events: list[tuple[str, str, int, dict[str, object]]] = []

    # -- public API ------------------------------------------------------------------

    @property
    def offered_features(self) -> int:
        """GET_FEATURES: the pinned version's bits plus PROTOCOL_FEATURES and LOG_ALL."""
        return offered_features(self.version)

    @property
    def queue_pairs(self) -> int:
        """GET_QUEUE_NUM: queue pairs served, capped by the version."""
        return min(self.backend.queue_pairs, self.version.max_queue_pairs)

    @property
    def done(self) -> bool:
        """True once the connection must be dropped (failed or closed)."""
        return self.state is _FAILED or self.state is _CLOSED

    def receive(self, data: bytes, fds: Sequence[int]) -> list[bytes]:
        """Feed bytes + fds read from the socket; returns what to send back, in order.

        After it returns, :attr:`done` says whether to drop the connection. Never raises
        for anything the peer sends.
        """
        if self.state is _FAILED or self.state is _CLOSED:
            _close_all(fds)
            return []
        try:
            messages = self.codec.receive(data, fds)
        except RemoteProtocolError as err:
            self._fail(f"malformed message: {err}")
            return []
        out: list[bytes] = []
        for i, msg in enumerate(messages):
            if self.state is _FAILED or self.state is _CLOSED:
                for rest in messages[i:]:
                    _close_all(rest.fds)
                break
            out.extend(self.handle(msg))
        return out

    def handle(self, msg: p.Message) -> list[bytes]:
        """Process one decoded message; returns the reply bytes (possibly none)."""
        # Most messages carry no fd: they share one empty _Pending (taking from it raises
        # without changing it), which saves an allocation per message.
        pending = _Pending(list(msg.fds)) if msg.fds else _NO_FDS
        entry = _HANDLERS.get(int(msg.request))
        try:
            if self.state is _FAILED or self.state is _CLOSED:
                return []
            if entry is None:
                raise RemoteProtocolError(f"{msg.name} is not supported by this backend")
            needs_owner, handler = entry
            if needs_owner and self.state is not ConnectionState.OWNED:
                raise RemoteProtocolError(f"{msg.name} is not allowed before SET_OWNER")
            payload = handler(self, msg, pending)
        except _Refused as err:
            log.warning("%s: %s refused: %s", self.name, msg.name, err)
            return self._failure_reply(msg)
        except (KvhostError, OSError) as err:
            text = str(err) if msg.name in str(err) else f"{msg.name}: {err}"
            if isinstance(err, RemoteProtocolError):
                text += " (the frontend's fault)"
            else:
                text += " (refused by the kernel)"
            out = self._failure_reply(msg)
            self._fail(text)
            return out
        except Exception as err:  # a shim bug must cost one connection, never the process
            log.exception("%s: internal error handling %s", self.name, msg.name)
            self._fail(f"{msg.name} hit an internal error: {err!r}")
            return []
        finally:
            if pending.fds:
                pending.close()
        if payload is not None:
            return [self.codec.reply(msg, payload)]
        if self._wants_ack(msg):
            ok = _ACK_OK.get(int(msg.request))
            if ok is None:
                ok = _ACK_OK[int(msg.request)] = self._ack(msg, REPLY_OK)
            return [ok]
        return []

    def log_events(self) -> None:
        """Log the events of the messages handled since the last call (ring stops and
        starts, features, the dirty log, RARP), oldest first.

        Call it once the replies :meth:`receive` returned are sent: the frontend waits for
        the replies, not for the log, and one JSON log line costs more than the session's
        whole handling of a ring stop (about 23 µs against 6 µs natively). The durations
        the events carry (``took_us``, ``start_us``) are measured when they happen.
        """
        events, self._events = self._events, []
        for kind, message, level, fields in events:
            event(kind, message, level=level, **fields)

    def close(self) -> None:
        """Stop the rings and close everything (frontend hung up, or shutdown).

        The backend is closed even when detaching a ring fails: closing the devices stops
        their rings anyway, and skipping it would leak every fd and mapping it holds.
        Raises what the backend's close raises (logged and survived by the server).
        """
        if self.done:
            return
        self.log_events()
        self.state = ConnectionState.CLOSED
        try:
            self._stop_all()
        except (KvhostError, OSError) as err:
            log.error("%s: detaching the rings failed (closing the devices anyway): %s",
                      self.name, err)
        self.backend.close()

    # -- dispatch --------------------------------------------------------------------

    def _wants_ack(self, msg: p.Message) -> bool:
        """NEED_REPLY on a request without a reply of its own, with REPLY_ACK negotiated."""
        return bool(
            int(msg.flags) & _NEED_REPLY
            and self.protocol_features & _REPLY_ACK
            and int(msg.request) not in _NO_ACK
        )

    def _failure_reply(self, msg: p.Message) -> list[bytes]:
        # Requests with a reply of their own have no failure encoding: the frontend sees
        # the connection close instead.
        return [self._ack(msg, REPLY_FAILED)] if self._wants_ack(msg) else []

    def _ack(self, msg: p.Message, value: int) -> bytes:
        return self.codec.reply(msg, p.U64(value))

    def _fail(self, reason: str) -> None:
        self.log_events()  # what happened before the failure, then the failure
        self.error = reason
        log.error("%s: connection failed: %s", self.name, reason)
        with contextlib.suppress(KvhostError, OSError):
            self._stop_all()
        try:
            self.backend.close()
        except (KvhostError, OSError) as err:
            log.error("%s: closing the kernel devices failed: %s", self.name, err)
        self.state = ConnectionState.FAILED

    # -- helpers ---------------------------------------------------------------------

    def _vring(self, index: int, msg: p.Message) -> Vring:
        limit = self._ring_limit
        if 0 <= index < limit:
            return self.vrings[index]
        raise RemoteProtocolError(
            f"{msg.name} for vring {index}: this backend serves vrings 0-{limit - 1} "
            f"({self.queue_pairs} queue pair(s))"
        )

    def _sync(self, ring: Vring) -> None:
        """Attach or detach the ring's tap queue to match its state."""
        addr = ring.addr
        want = (
            ring.state is not VringState.STOPPED
            and ring.enabled
            and ring.num is not None
            and addr is not None
            and self.has_mem_table
        )
        if want and ring.state is VringState.STARTED:
            assert addr is not None and ring.num is not None
            if addr.size != ring.num:
                # resized after SET_VRING_ADDR: the addresses must hold the new size
                ring.addr = None
                addr = dataclasses.replace(addr, size=ring.num)
                self.backend.set_vring_addr(ring.index, addr)
                ring.addr = addr
            self.backend.set_backend(ring.index, True)
            ring.state = VringState.RUNNING
            self._log_running(ring)
        elif not want and ring.state is VringState.RUNNING:
            self.backend.set_backend(ring.index, False)
            ring.state = VringState.STARTED

    def _stop_all(self) -> None:
        for ring in self.vrings:
            if ring.state is VringState.RUNNING:
                self.backend.set_backend(ring.index, False)
            ring.state = VringState.STOPPED

    def _event(
        self, kind: str, message: str, *, level: int = logging.INFO, **fields: object
    ) -> None:
        """Queue an event for :meth:`log_events` (after the replies are sent)."""
        self._events.append((kind, message, level, fields))

    # The event helpers return at once when their level is off: building an event's text
    # and fields costs more than the rest of a ring message's handling in the session.

    def _log_running(self, ring: Vring) -> None:
        if not log.isEnabledFor(logging.INFO):
            return
        began = self._start_began
        start_us = None if began is None else (time.monotonic_ns() - began) // 1000
        self._event(
            "vring",
            f"{self.name}: vring {ring.index} running",
            connection=self.name,
            vring=ring.index,
            result="running",
            start_us=start_us,
        )

    def _log_features(self, acked: int, *, first: bool) -> None:
        level = logging.INFO if first else logging.DEBUG
        if not log.isEnabledFor(level):
            return
        if first:
            message = (
                f"{self.name}: features acked under interface version "
                f"{self.version.label}: 0x{acked:x}"
            )
        else:
            message = f"{self.name}: SET_FEATURES 0x{acked:x}"
        self._event(
            "features",
            message,
            level=level,
            connection=self.name,
            version=self.version.label,
            features=acked,
        )

    def _log_vring_base(self, request: str, index: int, base: int, **extra: object) -> None:
        # a ring stop (GET) is an operator-visible moment (shutdown, migration); a ring's
        # restore (SET) is detail
        level = logging.INFO if request == "GET_VRING_BASE" else logging.DEBUG
        if not log.isEnabledFor(level):
            return
        self._event(
            "vring_base",
            f"{self.name}: {request} vring {index} base {base}",
            level=level,
            connection=self.name,
            request=request,
            vring=index,
            base=base,
            **extra,
        )

    def _ring_message(self) -> None:
        """A message that configures or starts a ring: the first one while no ring runs
        begins a start."""
        if self._start_began is None and not any(
            r.state is VringState.RUNNING for r in self.vrings
        ):
            self._start_began = time.monotonic_ns()

    def _require_stopped(self, ring: Vring, msg: p.Message) -> None:
        if ring.state is not VringState.STOPPED:
            raise RemoteProtocolError(
                f"{msg.name} for vring {ring.index} while it is {ring.state.value}; "
                "stop it with GET_VRING_BASE first"
            )

    # -- handlers --------------------------------------------------------------------

    def _get_features(self, msg: p.Message, pending: _Pending) -> p.Payload | None:
        return p.U64(self.offered_features)

    def _set_features(self, msg: p.Message, pending: _Pending) -> p.Payload | None:
        acked = _u64(msg)
        extra = acked & ~self.offered_features
        if extra:
            raise RemoteProtocolError(
                f"SET_FEATURES acks bits this backend does not offer under interface version "
                f"{self.version.label}: {', '.join(features.names(extra))} "
                f"(offered 0x{self.offered_features:x}, got 0x{acked:x})"
            )
        previous = self.acked_features
        first = previous is None
        # QEMU repeats SET_FEATURES at every DRIVER_OK and per queue pair; the kernel and
        # the tap keep what they were given (the restart test counts the ioctls)
        if acked != previous:
            self.acked_features = None  # unknown until the backend took it
            self.backend.set_features(acked & ~features.PROTOCOL_FEATURES)
        self.acked_features = acked
        if not acked & features.PROTOCOL_FEATURES:
            # without PROTOCOL_FEATURES there is no SET_VRING_ENABLE: rings start enabled
            for ring in self.vrings:
                ring.enabled = True
                self._sync(ring)
        self._log_features(acked, first=first)
        return None

    def _get_protocol_features(self, msg: p.Message, pending: _Pending) -> p.Payload | None:
        return p.U64(int(OFFERED_PROTOCOL_FEATURES))

    def _set_protocol_features(self, msg: p.Message, pending: _Pending) -> p.Payload | None:
        acked = _u64(msg)
        extra = acked & ~int(OFFERED_PROTOCOL_FEATURES)
        if extra:
            raise RemoteProtocolError(
                f"SET_PROTOCOL_FEATURES acks protocol features this backend does not offer: "
                f"0x{extra:x} ({_protocol_names(extra)})"
            )
        self.protocol_features = acked
        return None

    def _get_queue_num(self, msg: p.Message, pending: _Pending) -> p.Payload | None:
        return p.U64(self.queue_pairs)

    def _set_owner(self, msg: p.Message, pending: _Pending) -> p.Payload | None:
        if self.state is ConnectionState.OWNED:
            return None  # QEMU sends one per queue pair over the same socket
        self.backend.set_owner()
        self.state = ConnectionState.OWNED
        return None

    def _reset_owner(self, msg: p.Message, pending: _Pending) -> p.Payload | None:
        self._stop_all()
        self.backend.reset_owner()
        self.acked_features = None
        self.has_mem_table = False
        self.memory_top = 0
        self.log_size = None
        self.vrings = [Vring(i) for i in range(len(self.vrings))]
        return None

    def _set_mem_table(self, msg: p.Message, pending: _Pending) -> p.Payload | None:
        payload = msg.payload
        assert isinstance(payload, p.MemTable)
        limit = self.backend.max_mem_regions
        if len(payload.regions) > limit:
            raise RemoteProtocolError(
                f"SET_MEM_TABLE carries {len(payload.regions)} regions; this host's vhost "
                f"accepts at most {limit}"
            )
        top = max((r.guest_phys_addr + r.memory_size for r in payload.regions), default=0)
        if self.log_size is not None:
            _check_log_covers(self.log_size, top)
        fds = pending.take()
        regions = [
            FrontendRegion(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset, fd)
            for r, fd in zip(payload.regions, fds, strict=True)
        ]
        self.has_mem_table = False  # unknown until the backend took it
        self.backend.set_mem_table(
            regions, [(r.index, r.addr) for r in self.vrings if r.addr is not None]
        )
        self.has_mem_table = True
        self.memory_top = top
        for ring in self.vrings:
            self._sync(ring)
        return None

    def _set_log_base(self, msg: p.Message, pending: _Pending) -> p.Payload | None:
        if not self.protocol_features & _LOG_SHMFD:
            raise RemoteProtocolError(
                "SET_LOG_BASE without the LOG_SHMFD protocol feature: the kernel datapath "
                "needs the dirty log as a shared memory fd"
            )
        payload = msg.payload
        assert isinstance(payload, p.LogBase)
        if payload.mmap_size <= 0:
            raise RemoteProtocolError(f"SET_LOG_BASE with an empty log ({payload.mmap_size} bytes)")
        _check_log_covers(payload.mmap_size, self.memory_top)
        (fd,) = pending.take()
        self.log_size = None  # unknown until the backend took it
        self.backend.set_log_base(0, LogRegion(payload.mmap_size, payload.mmap_offset, fd))
        self.log_size = payload.mmap_size
        self._event(
            "dirty_log",
            f"{self.name}: dirty log mapped ({payload.mmap_size} bytes)",
            connection=self.name,
            bytes=payload.mmap_size,
        )
        return p.U64(REPLY_OK)

    def _set_vring_num(self, msg: p.Message, pending: _Pending) -> p.Payload | None:
        self._ring_message()
        index, num = _vring_state(msg)
        ring = self._vring(index, msg)
        self._require_stopped(ring, msg)
        limit = self.version.max_queue_size
        if num < 1 or num > limit or num & (num - 1):
            raise RemoteProtocolError(
                f"SET_VRING_NUM {num} for vring {index}: ring size must be a power of two "
                f"from 1 to {limit} under interface version {self.version.label}"
            )
        if ring.num == num:
            return None  # the kernel keeps the size across a stop (QEMU resends it)
        ring.num = None
        self.backend.set_vring_num(index, num)
        ring.num = num
        return None

    def _set_vring_base(self, msg: p.Message, pending: _Pending) -> p.Payload | None:
        self._ring_message()
        index, base = _vring_state(msg)
        ring = self._vring(index, msg)
        self._require_stopped(ring, msg)
        if base > 0xFFFF:
            raise RemoteProtocolError(
                f"SET_VRING_BASE {base} for vring {index}: split ring indices are 16-bit"
            )
        self.backend.set_vring_base(index, base)
        self._log_vring_base("SET_VRING_BASE", index, base)
        return None

    def _set_vring_addr(self, msg: p.Message, pending: _Pending) -> p.Payload | None:
        self._ring_message()
        a = msg.payload
        assert isinstance(a, p.VringAddr)
        ring = self._vring(a.index, msg)
        if not self.has_mem_table:
            raise RemoteProtocolError(
                f"SET_VRING_ADDR for vring {a.index} before SET_MEM_TABLE: its addresses "
                "cannot be translated"
            )
        if a.flags & ~_VRING_F_LOG:
            raise RemoteProtocolError(
                f"SET_VRING_ADDR for vring {a.index} has unknown flags 0x{a.flags:x} (only "
                "bit 0, log, is defined)"
            )
        size = ring.num or 1
        if a.desc_user_addr % 16 or a.avail_user_addr % 2 or a.used_user_addr % 4:
            # the table of names is built only on this error path
            for what, addr, align in (
                ("descriptor table", a.desc_user_addr, 16),
                ("avail ring", a.avail_user_addr, 2),
                ("used ring", a.used_user_addr, 4),
            ):
                if addr % align:
                    raise RemoteProtocolError(
                        f"vring {a.index} (size {size}) {what} at 0x{addr:x} is not "
                        f"{align}-byte aligned"
                    )
        if a.flags & _VRING_F_LOG and self.log_size is None:
            raise RemoteProtocolError(
                f"vring {a.index} (size {size}): used-ring logging requested before SET_LOG_BASE"
            )
        config = VringConfig(
            size, a.flags, a.desc_user_addr, a.used_user_addr, a.avail_user_addr, a.log_guest_addr
        )
        ring.addr = None  # unknown until the backend took it
        self.backend.set_vring_addr(a.index, config)
        ring.addr = config
        self._sync(ring)
        return None

    def _vring_fd(self, msg: p.Message, pending: _Pending) -> tuple[Vring, int]:
        payload = msg.payload
        assert isinstance(payload, p.VringFile)
        ring = self._vring(payload.index, msg)
        if payload.no_fd:
            return ring, -1
        (fd,) = pending.take()
        return ring, fd

    def _set_vring_kick(self, msg: p.Message, pending: _Pending) -> p.Payload | None:
        self._ring_message()
        ring, fd = self._vring_fd(msg, pending)
        if fd < 0:
            raise RemoteProtocolError(
                f"SET_VRING_KICK for vring {ring.index} without an fd: the kernel datapath "
                "needs a kick eventfd (polling mode is not supported)"
            )
        self.backend.set_vring_kick(ring.index, fd)
        if ring.state is VringState.STOPPED:
            ring.state = VringState.STARTED
        self._sync(ring)
        return None

    def _set_vring_call(self, msg: p.Message, pending: _Pending) -> p.Payload | None:
        ring, fd = self._vring_fd(msg, pending)
        self.backend.set_vring_call(ring.index, fd)
        return None

    def _set_vring_err(self, msg: p.Message, pending: _Pending) -> p.Payload | None:
        ring, fd = self._vring_fd(msg, pending)
        self.backend.set_vring_err(ring.index, fd)
        return None

    def _get_vring_base(self, msg: p.Message, pending: _Pending) -> p.Payload | None:
        t0 = time.monotonic_ns()
        index = msg.payload.index  # type: ignore[union-attr]  # the layout made it a VringState
        ring = self._vring(index, msg)
        if ring.state is VringState.RUNNING:
            self.backend.set_backend(index, False)
        ring.state = VringState.STOPPED
        self._start_began = None
        base = self.backend.get_vring_base(index)
        # on a migration's source, the sum over the rings is the shim's share of the downtime
        took_us = (time.monotonic_ns() - t0) // 1000
        self._log_vring_base("GET_VRING_BASE", index, base, took_us=took_us)
        return p.VringState(index, base)

    def _set_vring_enable(self, msg: p.Message, pending: _Pending) -> p.Payload | None:
        index, value = _vring_state(msg)
        ring = self._vring(index, msg)
        if value not in (0, 1):
            raise RemoteProtocolError(
                f"SET_VRING_ENABLE for vring {index} with {value}; expected 0 or 1"
            )
        ring.enabled = bool(value)
        self._sync(ring)
        return None

    def _send_rarp(self, msg: p.Message, pending: _Pending) -> p.Payload | None:
        payload = msg.payload
        assert isinstance(payload, p.RarpMac)
        self.backend.send_rarp(payload.mac)
        self._event(
            "rarp",
            f"{self.name}: RARP announced for {payload.text}",
            connection=self.name,
            mac=payload.text,
        )
        return None

    def _net_set_mtu(self, msg: p.Message, pending: _Pending) -> p.Payload | None:
        mtu = _u64(msg)
        if not 68 <= mtu <= 65535:
            raise _Refused(f"MTU {mtu} is outside 68-65535")
        try:
            self.backend.set_mtu(mtu)
        except (KernelError, UsageError) as err:
            raise _Refused(str(err)) from err
        log.info("%s: MTU set to %d", self.name, mtu)
        return None

    def _get_interface_versions(self, msg: p.Message, pending: _Pending) -> p.Payload | None:
        if not self.protocol_features & _KVHOST_VERSION:
            raise RemoteProtocolError(
                "GET_INTERFACE_VERSIONS without negotiating protocol feature "
                "KVHOST_INTERFACE_VERSION (bit 63)"
            )
        offered = [self.version] if self.pinned else self.supported
        return p.VersionList(self.version.label, tuple(v.label for v in offered))

    def _set_interface_version(self, msg: p.Message, pending: _Pending) -> p.Payload | None:
        payload = msg.payload
        assert isinstance(payload, p.VersionString)
        status, why = self._select_version(payload.version)
        if status is p.VersionStatus.OK:
            log.info("%s: interface version set to %s", self.name, self.version.label)
        else:
            log.warning(
                "%s: SET_INTERFACE_VERSION %r refused (%s): %s",
                self.name,
                payload.version,
                status.name,
                why,
            )
        return p.U64(int(status))

    def _select_version(self, text: str) -> tuple[p.VersionStatus, str]:
        if not self.protocol_features & _KVHOST_VERSION:
            return p.VersionStatus.BAD_STATE, (
                "protocol feature KVHOST_INTERFACE_VERSION (bit 63) was not negotiated"
            )
        if self.acked_features is not None:
            return p.VersionStatus.BAD_STATE, (
                "SET_FEATURES was already sent; the version is locked once features are acked"
            )
        try:
            wanted = versions.parse(text)
        except VersionError as err:
            return p.VersionStatus.UNKNOWN, str(err)
        if wanted.same_interface(self.version):
            return p.VersionStatus.OK, ""
        if not any(wanted.same_interface(v) for v in self.supported):
            return p.VersionStatus.UNSUPPORTED, (
                f"this host serves {', '.join(v.label for v in self.supported)}"
            )
        if self.pinned:
            return p.VersionStatus.PINNED, (
                f"the operator pinned this shim to {self.version.label}"
            )
        self.version = next(v for v in self.supported if wanted.same_interface(v))
        self._ring_limit = 2 * self.queue_pairs
        return p.VersionStatus.OK, ""


_HANDLERS: dict[int, tuple[bool, _Handler]] = {
    int(p.Request.GET_FEATURES): (_BEFORE_OWNER, Session._get_features),
    int(p.Request.SET_FEATURES): (_OWNED, Session._set_features),
    int(p.Request.GET_PROTOCOL_FEATURES): (_BEFORE_OWNER, Session._get_protocol_features),
    int(p.Request.SET_PROTOCOL_FEATURES): (_BEFORE_OWNER, Session._set_protocol_features),
    int(p.Request.GET_QUEUE_NUM): (_BEFORE_OWNER, Session._get_queue_num),
    int(p.Request.SET_OWNER): (_BEFORE_OWNER, Session._set_owner),
    int(p.Request.RESET_OWNER): (_OWNED, Session._reset_owner),
    int(p.Request.SET_MEM_TABLE): (_OWNED, Session._set_mem_table),
    int(p.Request.SET_LOG_BASE): (_OWNED, Session._set_log_base),
    int(p.Request.SET_VRING_NUM): (_OWNED, Session._set_vring_num),
    int(p.Request.SET_VRING_ADDR): (_OWNED, Session._set_vring_addr),
    int(p.Request.SET_VRING_BASE): (_OWNED, Session._set_vring_base),
    int(p.Request.GET_VRING_BASE): (_OWNED, Session._get_vring_base),
    int(p.Request.SET_VRING_KICK): (_OWNED, Session._set_vring_kick),
    int(p.Request.SET_VRING_CALL): (_OWNED, Session._set_vring_call),
    int(p.Request.SET_VRING_ERR): (_OWNED, Session._set_vring_err),
    int(p.Request.SET_VRING_ENABLE): (_OWNED, Session._set_vring_enable),
    int(p.Request.SEND_RARP): (_OWNED, Session._send_rarp),
    int(p.Request.NET_SET_MTU): (_OWNED, Session._net_set_mtu),
    int(p.Request.GET_INTERFACE_VERSIONS): (_BEFORE_OWNER, Session._get_interface_versions),
    int(p.Request.SET_INTERFACE_VERSION): (_BEFORE_OWNER, Session._set_interface_version),
}


def _check_log_covers(log_size: int, top: int) -> None:
    """A log too short for guest memory would let the kernel set bits in whatever the shim
    has mapped next to it."""
    need = -(-top // (_LOG_PAGE * 8))
    if log_size < need:
        raise RemoteProtocolError(
            f"dirty log of {log_size} bytes covers guest memory up to "
            f"0x{log_size * 8 * _LOG_PAGE:x}, but memory reaches 0x{top:x} (needs {need} "
            "bytes)"
        )


def _u64(msg: p.Message) -> int:
    payload = msg.payload
    assert isinstance(payload, p.U64)
    return payload.value


def _vring_state(msg: p.Message) -> tuple[int, int]:
    payload = msg.payload
    assert isinstance(payload, p.VringState)
    return payload.index, payload.num


def unservable_reason(version: versions.InterfaceVersion) -> str | None:
    """Why ``version`` cannot be served over vhost-user, or None.

    vhost-user's GET/SET_FEATURES carry a u64, so feature bits 64-127 (the UDP tunnel GSO
    bits) cannot be offered to a vhost-user frontend at all.
    """
    high = versions.serve_features(version) >> 64 << 64
    if high:
        return (
            f"interface version {version.label} has feature bits above 63 "
            f"({', '.join(features.names(high))}), which vhost-user's 64-bit GET_FEATURES "
            "cannot carry; pin an older version with --interface-version"
        )
    return None


def _protocol_names(bits: int) -> str:
    out = []
    for n in features.iter_bits(bits):
        try:
            out.append(p.ProtocolFeature(1 << n).name or f"bit {n}")
        except ValueError:
            out.append(f"bit {n}")
    return ", ".join(out)


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
