"""A vhost-user *frontend* (what QEMU is) for driving any vhost-user net backend from Python.

It speaks through :class:`~kvhost.vhost_user.protocol.FrontendCodec`; this module only moves
bytes and fds over the socket. Two layers:

* :class:`VhostUserFrontend`: one method per vhost-user request (the same verbs as
  :class:`kvhost.vhost.VhostNet`), plus :meth:`~VhostUserFrontend.handshake` (what QEMU sends
  when the netdev is created) and :meth:`~VhostUserFrontend.start_net` (what QEMU sends at the
  guest's DRIVER_OK).
* :class:`NetDevice`: what ``start_net`` returns: split rings in guest memory, eventfds, and
  frame helpers (TX: virtio-net header + frame, kick; RX: posted buffers, call eventfd, used).

Lifecycle (``state``)::

    NEW --connect()--> CONNECTED --handshake()--> NEGOTIATED --start_net()--> RUNNING
      any error: FAILED (socket and owned fds closed);  close(): CLOSED

Like QEMU, ring addresses in SET_VRING_ADDR are this process's virtual addresses of guest
memory (``GuestMemory.hva``) and ``log_guest_addr`` is the used ring's guest-physical address.
With REPLY_ACK negotiated, NEED_REPLY is set where QEMU 7.2 sets it (SET_MEM_TABLE,
NET_SET_MTU, SET_FEATURES and SET_VRING_ADDR while logging) or on every request with
``always_ack=True``.

Errors: :class:`~kvhost.errors.RemoteProtocolError` when the backend misbehaves, closes the
socket or times out (:class:`BackendRefused` when it answers an ack with non-zero);
:class:`~kvhost.errors.VersionError` when it cannot serve a requested interface version;
:class:`~kvhost.errors.LocalProtocolError` for a request this frontend must not send now;
:class:`~kvhost.errors.UsageError` for impossible arguments (e.g. memory too small). After any
error but UsageError and LocalProtocolError the connection is failed and closed, as QEMU does.
"""

from __future__ import annotations

import contextlib
import enum
import math
import os
import select
import socket
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType

from kvhost import abi
from kvhost import features as fb
from kvhost.errors import LocalProtocolError, RemoteProtocolError, UsageError, VersionError
from kvhost.memory import GuestMemory, MemoryRegion
from kvhost.vhost import LogRegion, VringConfig
from kvhost.vhost_user import protocol as p
from kvhost.virtqueue import SplitRing

#: Protocol features this frontend can use (it offers them in SET_PROTOCOL_FEATURES).
FRONTEND_PROTOCOL_FEATURES = (
    p.ProtocolFeature.MQ
    | p.ProtocolFeature.LOG_SHMFD
    | p.ProtocolFeature.RARP
    | p.ProtocolFeature.REPLY_ACK
    | p.ProtocolFeature.MTU
)
_RECV_SIZE = 65536 + p.HEADER_SIZE
_PAGE = 4096
_U16 = struct.Struct("<H")
_EVENT = struct.Struct("=Q")


class FrontendState(enum.Enum):
    """Where the connection is in its life (see the module docstring)."""

    NEW = "new"
    CONNECTED = "connected"
    NEGOTIATED = "negotiated"
    RUNNING = "running"
    FAILED = "failed"
    CLOSED = "closed"


class BackendRefused(RemoteProtocolError):
    """The backend answered a REPLY_ACK request with a non-zero status."""

    def __init__(self, request: p.Request, status: int) -> None:
        self.request = request
        self.status = status
        super().__init__(f"backend refused {request.name} (REPLY_ACK status {status})")


class VersionRefused(VersionError):
    """SET_INTERFACE_VERSION failed; ``status`` is the backend's VersionStatus."""

    def __init__(self, version: str, status: int) -> None:
        self.version = version
        self.status = status
        try:
            why = p.VersionStatus(status).name
        except ValueError:
            why = f"status {status}"
        super().__init__(f"backend cannot serve interface version {version!r}: {why}")


def _virtio_hdr_len(features: int) -> int:
    if features & (fb.bit("VERSION_1") | fb.bit("MRG_RXBUF")):
        return int(abi.VNET_HDR_MRG_LEN)
    return int(abi.VNET_HDR_LEN)


class VhostUserFrontend:
    """One vhost-user connection, frontend side. Context manager; :meth:`close` is idempotent.

    ``path`` is the backend's socket; or pass a connected ``sock`` (ownership moves here).
    ``timeout`` bounds every wait for a reply, in seconds.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        sock: socket.socket | None = None,
        timeout: float = 10.0,
        always_ack: bool = False,
    ) -> None:
        if (path is None) == (sock is None):
            raise UsageError("VhostUserFrontend needs exactly one of a socket path or a socket")
        self.path = None if path is None else os.fspath(path)
        self.timeout = timeout
        self.always_ack = always_ack
        self.codec = p.FrontendCodec()
        self.state = FrontendState.NEW
        self.failure: str | None = None
        self.features = 0  #: last GET_FEATURES answer
        self.protocol_features = 0  #: negotiated protocol features
        self.acked_features = 0  #: last SET_FEATURES value
        self.queue_num: int | None = None
        self._sock = sock
        self._devices: list[NetDevice] = []
        if sock is not None:
            sock.settimeout(timeout)
            self.state = FrontendState.CONNECTED

    # --- connection --------------------------------------------------------------------

    def connect(self) -> None:
        """Connect to ``path`` the way QEMU does: a *blocking* connect, which waits while the
        backend's listen backlog is full; ``timeout`` applies from then on. (A socket with a
        timeout is non-blocking inside, and there a full backlog fails at once with EAGAIN:
        a connect storm would fail where QEMU waits.) Raises RemoteProtocolError when nobody
        listens there."""
        self._need(FrontendState.NEW)
        assert self.path is not None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(self.path)
        except OSError as err:
            sock.close()
            raise RemoteProtocolError(
                f"cannot connect to vhost-user backend at {self.path}: {err.strerror}; "
                "is the backend running and listening there?"
            ) from err
        sock.settimeout(self.timeout)
        self._sock = sock
        self.state = FrontendState.CONNECTED

    def fileno(self) -> int:
        """The socket's fd (-1 when not connected)."""
        return -1 if self._sock is None else self._sock.fileno()

    def close(self) -> None:
        """Close the socket and every fd this frontend created (ring eventfds)."""
        for dev in self._devices:
            dev.close()
        self._devices.clear()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self.codec.close()
        if self.state is not FrontendState.FAILED:
            self.state = FrontendState.CLOSED

    def __enter__(self) -> VhostUserFrontend:
        if self.state is FrontendState.NEW:
            self.connect()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _need(self, *states: FrontendState) -> None:
        if self.state not in states:
            extra = f" ({self.failure})" if self.failure else ""
            raise LocalProtocolError(
                f"the vhost-user frontend is {self.state.value}{extra}; this needs "
                f"{' or '.join(s.value for s in states)}"
            )

    def _fail(self, why: str) -> None:
        self.failure = why
        self.state = FrontendState.FAILED
        self.close()

    # --- transport ---------------------------------------------------------------------

    def _live(self) -> socket.socket:
        self._need(FrontendState.CONNECTED, FrontendState.NEGOTIATED, FrontendState.RUNNING)
        assert self._sock is not None
        return self._sock

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Write bytes (and fds as SCM_RIGHTS) as they are: for tests of bad input."""
        sock = self._live()
        try:
            sent = socket.send_fds(sock, [data], list(fds)) if fds else sock.send(data)
            if sent < len(data):
                sock.sendall(data[sent:])
        except OSError as err:
            self._fail(f"send failed: {err}")
            raise RemoteProtocolError(
                f"backend connection broke while sending: {err.strerror or err}"
            ) from err

    def wait_closed(self, timeout: float = 2.0) -> bool:
        """Wait until the backend closes the connection; True if it did within ``timeout``.

        Any bytes the backend sends meanwhile are discarded.
        """
        sock = self._live()
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if not _readable(sock.fileno(), left):
                return False
            try:
                data, fds, _, _ = socket.recv_fds(sock, _RECV_SIZE, p.MAX_FDS)
            except OSError:
                data, fds = b"", []
            p.close_fds(fds)
            if not data:
                self._fail("backend closed the connection")
                return True

    def _request(
        self,
        request: p.Request,
        payload: p.Payload = p.EMPTY,
        fds: Sequence[int] = (),
        *,
        ack: bool = False,
    ) -> p.Message | None:
        """Send one request; wait for its reply if it has one (inherent or acked)."""
        sock = self._live()
        need_reply = ack and bool(self.protocol_features & p.ProtocolFeature.REPLY_ACK)
        data, send_fds = self.codec.request(request, payload, fds, need_reply=need_reply)
        self.send_raw(data, send_fds)
        if not self.codec.awaiting:
            return None
        return self._await_reply(sock, request)

    def _await_reply(self, sock: socket.socket, request: p.Request) -> p.Message:
        try:
            while True:
                try:
                    data, fds, msg_flags, _ = socket.recv_fds(sock, _RECV_SIZE, p.MAX_FDS)
                except TimeoutError as err:
                    raise RemoteProtocolError(
                        f"backend did not answer {request.name} within {self.timeout} s"
                    ) from err
                except OSError as err:
                    raise RemoteProtocolError(
                        f"backend connection broke while {request.name} awaited its reply: "
                        f"{err.strerror or err}"
                    ) from err
                if msg_flags & socket.MSG_CTRUNC:
                    p.close_fds(fds)
                    raise RemoteProtocolError(
                        f"backend sent more than {p.MAX_FDS} fds with a reply to {request.name}"
                    )
                if not data:
                    p.close_fds(fds)
                    raise RemoteProtocolError(
                        f"backend closed the connection while {request.name} awaited its reply"
                    )
                for msg in self.codec.receive(data, fds):
                    if msg.request == request and request not in self.codec.awaiting:
                        return msg
        except RemoteProtocolError as err:
            self._fail(str(err))
            raise

    def _acked(self, request: p.Request, reply: p.Message | None) -> None:
        if reply is None:
            return
        status = reply.payload.value if isinstance(reply.payload, p.U64) else 0
        if status != 0:
            self._fail(f"backend refused {request.name} with status {status}")
            raise BackendRefused(request, status)

    def _ack_wanted(self, qemu_acks: bool) -> bool:
        return self.always_ack or qemu_acks

    def _u64_reply(self, request: p.Request) -> int:
        reply = self._request(request)
        assert reply is not None and isinstance(reply.payload, p.U64)
        return reply.payload.value

    # --- the verbs ---------------------------------------------------------------------

    def get_features(self) -> int:
        """GET_FEATURES: the backend's virtio feature bits (bit 30 = protocol features)."""
        self.features = self._u64_reply(p.Request.GET_FEATURES)
        return self.features

    def set_features(self, virtio_features: int, *, ack: bool | None = None) -> None:
        """SET_FEATURES. Acked when REPLY_ACK is negotiated and ``ack`` (default: while
        logging, as QEMU does, or always with ``always_ack``)."""
        bits = virtio_features
        want = self._ack_wanted(bool(bits & fb.LOG_ALL)) if ack is None else ack
        self._acked(p.Request.SET_FEATURES,
                    self._request(p.Request.SET_FEATURES, p.U64(bits), ack=want))
        self.acked_features = bits

    def get_protocol_features(self) -> int:
        """GET_PROTOCOL_FEATURES (only after GET_FEATURES offered bit 30)."""
        return self._u64_reply(p.Request.GET_PROTOCOL_FEATURES)

    def set_protocol_features(self, features: int) -> None:
        """SET_PROTOCOL_FEATURES; the mask then governs REPLY_ACK, LOG_SHMFD replies etc."""
        self._request(p.Request.SET_PROTOCOL_FEATURES, p.U64(features))
        self.protocol_features = features
        self.codec.protocol_features = features

    def get_queue_num(self) -> int:
        """GET_QUEUE_NUM: the most queue pairs the backend serves."""
        self.queue_num = self._u64_reply(p.Request.GET_QUEUE_NUM)
        return self.queue_num

    def set_owner(self) -> None:
        """SET_OWNER."""
        self._acked(p.Request.SET_OWNER,
                    self._request(p.Request.SET_OWNER, ack=self._ack_wanted(False)))

    def reset_owner(self) -> None:
        """RESET_OWNER (deprecated upstream; for testing backends)."""
        self._acked(p.Request.RESET_OWNER,
                    self._request(p.Request.RESET_OWNER, ack=self._ack_wanted(False)))

    def get_interface_versions(self) -> p.VersionList:
        """GET_INTERFACE_VERSIONS: the backend's default and supported versions."""
        self._need_version_extension()
        reply = self._request(p.Request.GET_INTERFACE_VERSIONS)
        assert reply is not None and isinstance(reply.payload, p.VersionList)
        return reply.payload

    def set_interface_version(self, version: str) -> None:
        """SET_INTERFACE_VERSION; raises VersionRefused (and fails the connection, as
        docs/vhost-user-versions.md requires) unless the backend answers OK."""
        self._need_version_extension()
        reply = self._request(p.Request.SET_INTERFACE_VERSION, p.VersionString(version),
                              ack=True)
        assert reply is not None and isinstance(reply.payload, p.U64)
        if reply.payload.value != p.VersionStatus.OK:
            self._fail(f"interface version {version!r} refused")
            raise VersionRefused(version, reply.payload.value)

    def _need_version_extension(self) -> None:
        if not self.protocol_features & p.ProtocolFeature.KVHOST_INTERFACE_VERSION:
            raise LocalProtocolError(
                "interface-version requests need protocol feature bit 63 negotiated in "
                "SET_PROTOCOL_FEATURES first"
            )

    def set_mem_table(self, regions: GuestMemory | Sequence[MemoryRegion]) -> None:
        """SET_MEM_TABLE with every region's memfd (at most 8 regions)."""
        if isinstance(regions, GuestMemory):
            regions = regions.regions
        fds = [r.fd for r in regions]
        if any(fd is None for fd in fds):
            raise UsageError("every memory region sent to a backend needs its fd")
        table = p.MemTable(tuple(
            p.MemRegion(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)
            for r in regions
        ))
        self._acked(p.Request.SET_MEM_TABLE, self._request(
            p.Request.SET_MEM_TABLE, table, [fd for fd in fds if fd is not None],
            ack=self._ack_wanted(True)))

    def set_vring_num(self, index: int, num: int) -> None:
        """SET_VRING_NUM: ring size."""
        self._state_request(p.Request.SET_VRING_NUM, index, num)

    def set_vring_base(self, index: int, base: int) -> None:
        """SET_VRING_BASE: next avail index the backend processes."""
        self._state_request(p.Request.SET_VRING_BASE, index, base)

    def set_vring_enable(self, index: int, enabled: bool) -> None:
        """SET_VRING_ENABLE."""
        self._state_request(p.Request.SET_VRING_ENABLE, index, int(enabled))

    def _state_request(self, request: p.Request, index: int, num: int) -> None:
        self._acked(request, self._request(request, p.VringState(index, num),
                                           ack=self._ack_wanted(False)))

    def get_vring_base(self, index: int) -> int:
        """GET_VRING_BASE: stops the ring; returns the backend's next avail index."""
        reply = self._request(p.Request.GET_VRING_BASE, p.VringState(index, 0))
        assert reply is not None and isinstance(reply.payload, p.VringState)
        if reply.payload.index != index:
            self._fail("GET_VRING_BASE answered for another ring")
            raise RemoteProtocolError(
                f"backend answered GET_VRING_BASE for ring {index} with ring "
                f"{reply.payload.index}"
            )
        return reply.payload.num

    def set_vring_addr(self, index: int, config: VringConfig) -> None:
        """SET_VRING_ADDR with addresses in *this process* (like QEMU's); the same verb as
        :meth:`kvhost.vhost.VhostNet.set_vring_addr` (``config.size`` is not sent: vhost-user
        gives the size with SET_VRING_NUM)."""
        c = config
        payload = p.VringAddr(index, c.flags, c.desc, c.used, c.avail, c.log_addr)
        self._acked(p.Request.SET_VRING_ADDR, self._request(
            p.Request.SET_VRING_ADDR, payload, ack=self._ack_wanted(c.log)))

    def set_vring_addr_for(self, ring: SplitRing, *, log: bool = False) -> None:
        """SET_VRING_ADDR for a :class:`SplitRing` (hva of each part, used ring's GPA)."""
        mem = ring.memory
        self.set_vring_addr(ring.index, VringConfig(
            ring.size, 1 << abi.VHOST_VRING_F_LOG if log else 0, mem.hva(ring.desc_gpa),
            mem.hva(ring.used_gpa), mem.hva(ring.avail_gpa), ring.used_gpa))

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        """SET_VRING_KICK; ``None`` sends the no-fd flag (backend polls)."""
        self._file_request(p.Request.SET_VRING_KICK, index, fd)

    def set_vring_call(self, index: int, fd: int | None) -> None:
        """SET_VRING_CALL; ``None`` sends the no-fd flag."""
        self._file_request(p.Request.SET_VRING_CALL, index, fd)

    def set_vring_err(self, index: int, fd: int | None) -> None:
        """SET_VRING_ERR; ``None`` sends the no-fd flag."""
        self._file_request(p.Request.SET_VRING_ERR, index, fd)

    def _file_request(self, request: p.Request, index: int, fd: int | None) -> None:
        payload = p.VringFile(index, no_fd=fd is None)
        self._acked(request, self._request(request, payload, [] if fd is None else [fd],
                                           ack=self._ack_wanted(False)))

    def set_log_base(self, base: int, region: LogRegion | None = None) -> None:
        """SET_LOG_BASE with the dirty log's file (LOG_SHMFD), the same verb as
        :meth:`kvhost.vhost.VhostNet.set_log_base`: over vhost-user the log is always a
        ``region`` and ``base`` (an address in the kernel's case) must be 0. Waits for the
        backend's reply, as QEMU does."""
        if region is None or base:
            raise UsageError("vhost-user shares the dirty log as a file: pass base 0 and a "
                             "LogRegion")
        if not self.protocol_features & p.ProtocolFeature.LOG_SHMFD:
            raise LocalProtocolError("SET_LOG_BASE with an fd needs LOG_SHMFD negotiated")
        self._request(p.Request.SET_LOG_BASE, p.LogBase(region.size, region.offset),
                      [region.fd])

    def set_log_fd(self, fd: int) -> None:
        """SET_LOG_FD: the eventfd the backend signals after logging."""
        self._request(p.Request.SET_LOG_FD, p.LogFd(), [fd])

    def send_rarp(self, mac: bytes | str) -> None:
        """SEND_RARP for the guest's MAC (``bytes`` or ``"52:54:00:..."``)."""
        raw = bytes.fromhex(mac.replace(":", "")) if isinstance(mac, str) else mac
        self._acked(p.Request.SEND_RARP, self._request(
            p.Request.SEND_RARP, p.RarpMac(raw), ack=self._ack_wanted(False)))

    def net_set_mtu(self, mtu: int) -> None:
        """NET_SET_MTU (acked with REPLY_ACK, as QEMU does)."""
        self._acked(p.Request.NET_SET_MTU,
                    self._request(p.Request.NET_SET_MTU, p.U64(mtu), ack=True))

    # --- QEMU's sequences --------------------------------------------------------------

    def handshake(
        self,
        *,
        version: str | None = None,
        protocol_features: int = int(FRONTEND_PROTOCOL_FEATURES),
    ) -> p.VersionList | None:
        """What QEMU sends when the vhost-user netdev is created, plus the version extension.

        GET_FEATURES, GET/SET_PROTOCOL_FEATURES, [GET_INTERFACE_VERSIONS,
        SET_INTERFACE_VERSION ``version``], GET_QUEUE_NUM, SET_OWNER, GET_FEATURES.
        With ``version`` None, bit 63 is not negotiated (an unmodified QEMU). Returns the
        backend's version list when a version was selected. Raises VersionError when the
        backend lacks the extension or refuses the version.
        """
        if self.state is FrontendState.NEW:
            self.connect()
        self._need(FrontendState.CONNECTED)
        versions: p.VersionList | None = None
        offered = self.get_features()
        if offered & p.VHOST_USER_F_PROTOCOL_FEATURES:
            theirs = self.get_protocol_features()
            ours = protocol_features & ~int(p.ProtocolFeature.KVHOST_INTERFACE_VERSION)
            if version is not None:
                if not theirs & p.ProtocolFeature.KVHOST_INTERFACE_VERSION:
                    self._fail("backend lacks the interface-version extension")
                    raise VersionError(
                        f"cannot select interface version {version!r}: the backend does not "
                        "offer protocol feature bit 63 (kvhost interface versions)"
                    )
                ours |= int(p.ProtocolFeature.KVHOST_INTERFACE_VERSION)
            self.set_protocol_features(theirs & ours)
            if version is not None:
                versions = self.get_interface_versions()
                self.set_interface_version(version)
            if self.protocol_features & p.ProtocolFeature.MQ:
                self.get_queue_num()
        elif version is not None:
            self._fail("backend lacks protocol features")
            raise VersionError(
                f"cannot select interface version {version!r}: the backend does not offer "
                "VHOST_USER_F_PROTOCOL_FEATURES (bit 30)"
            )
        self.set_owner()
        self.get_features()
        self.state = FrontendState.NEGOTIATED
        return versions

    def start_net(
        self,
        memory: GuestMemory,
        queue_pairs: int = 1,
        ring_size: int = 256,
        features: int | None = None,
        *,
        base_gpa: int | None = None,
        buf_size: int = 2048,
        mtu: int | None = None,
    ) -> NetDevice:
        """QEMU's DRIVER_OK sequence for a virtio-net device; returns the running device.

        Rings and packet buffers are laid out in ``memory`` from ``base_gpa`` (default: the
        first region's start) in one region; RX rings are filled before the kick fds are
        sent. ``features`` are the driver's wanted bits (default: all the backend offers but
        LOG_ALL); the frontend sends their intersection with the offer, plus bit 30.
        Raises UsageError when the memory is too small or the backend serves fewer queue pairs.
        """
        if self.state in (FrontendState.NEW, FrontendState.CONNECTED):
            self.handshake()
        self._need(FrontendState.NEGOTIATED)
        if queue_pairs < 1:
            raise UsageError(f"queue_pairs must be at least 1, not {queue_pairs}")
        served = self.queue_num if self.queue_num is not None else 1
        if queue_pairs > served:
            raise UsageError(
                f"backend serves {served} queue pairs (GET_QUEUE_NUM); {queue_pairs} requested"
            )
        wanted = self.features & ~fb.LOG_ALL if features is None else features
        negotiated = wanted & self.features & ~p.VHOST_USER_F_PROTOCOL_FEATURES
        send = negotiated | (self.features & p.VHOST_USER_F_PROTOCOL_FEATURES)
        dev = NetDevice.layout(self, memory, queue_pairs, ring_size, negotiated,
                               base_gpa=base_gpa, buf_size=buf_size)
        self._devices.append(dev)
        try:
            if self.features & p.VHOST_USER_F_PROTOCOL_FEATURES:
                for ring in dev.rings:
                    self.set_vring_enable(ring.index, True)
            for qp in range(queue_pairs):
                self.set_features(send)
                if qp == 0:
                    self.set_mem_table(memory)
                    if mtu is not None and self.protocol_features & p.ProtocolFeature.MTU:
                        self.net_set_mtu(mtu)
                for ring in dev.rings[2 * qp : 2 * qp + 2]:
                    self.set_vring_num(ring.index, ring.size)
                    self.set_vring_base(ring.index, 0)
                    self.set_vring_addr_for(ring)
                    self.set_vring_kick(ring.index, dev.kick_fds[ring.index])
                    self.set_vring_call(ring.index, dev.call_fds[ring.index])
        except BaseException:
            dev.close()
            self._devices.remove(dev)
            raise
        self.state = FrontendState.RUNNING
        return dev

    def stop(self, dev: NetDevice) -> list[int]:
        """GET_VRING_BASE for every ring of ``dev`` (QEMU's stop); returns the bases."""
        bases = [self.get_vring_base(ring.index) for ring in dev.rings]
        self.state = FrontendState.NEGOTIATED
        return bases


@dataclass
class _Slots:
    """Packet buffers of one ring: slot number -> gpa; heads in flight -> slot."""

    base_gpa: int
    size: int
    count: int
    free: list[int] = field(default_factory=list)
    inflight: dict[int, int] = field(default_factory=dict)

    def gpa(self, slot: int) -> int:
        return self.base_gpa + slot * self.size


class NetDevice:
    """A started virtio-net device: rings ``2*qp`` (RX) and ``2*qp+1`` (TX) per queue pair.

    Owns one kick and one call eventfd per ring (closed by :meth:`close`). Frame helpers
    add and strip the virtio-net header (12 bytes with VERSION_1 or MRG_RXBUF, else 10).
    """

    def __init__(
        self, frontend: VhostUserFrontend, memory: GuestMemory, rings: list[SplitRing],
        slots: list[_Slots], features: int,
    ) -> None:
        self.frontend = frontend
        self.memory = memory
        self.rings = rings
        self.features = features
        self.hdr_len = _virtio_hdr_len(features)
        self.event_idx = bool(features & fb.bit("EVENT_IDX"))
        self._slots = slots
        self.kick_fds: list[int] = []
        self.call_fds: list[int] = []
        try:
            for _ in rings:
                self.kick_fds.append(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
                self.call_fds.append(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
        except BaseException:
            self.close()
            raise

    @classmethod
    def layout(
        cls, frontend: VhostUserFrontend, memory: GuestMemory, queue_pairs: int,
        ring_size: int, features: int, *, base_gpa: int | None, buf_size: int,
    ) -> NetDevice:
        """Place rings and buffers in one region of ``memory`` and fill the RX rings."""
        region = memory.regions[0] if base_gpa is None else next(
            (r for r in memory.regions if r.contains_gpa(base_gpa)), None)
        if region is None:
            raise UsageError(f"base_gpa 0x{base_gpa:x} is not inside guest memory")
        start = region.guest_phys_addr if base_gpa is None else base_gpa
        start = (start + _PAGE - 1) // _PAGE * _PAGE
        ring_bytes = (SplitRing.bytes_needed(ring_size) + _PAGE - 1) // _PAGE * _PAGE
        nrings = 2 * queue_pairs
        need = nrings * (ring_bytes + ring_size * buf_size)
        if start + need > region.gpa_end:
            raise UsageError(
                f"start_net needs {need} bytes of guest memory from 0x{start:x} for "
                f"{queue_pairs} queue pairs of {ring_size} entries with {buf_size}-byte "
                f"buffers; the region ends at 0x{region.gpa_end:x}: give more memory"
            )
        try:
            rings = [SplitRing(memory, i, ring_size, start + i * ring_bytes)
                     for i in range(nrings)]
        except ValueError as err:
            raise UsageError(f"cannot lay out the rings: {err}") from err
        buf_base = start + nrings * ring_bytes
        slots = [
            _Slots(buf_base + i * ring_size * buf_size, buf_size, ring_size,
                   list(range(ring_size - 1, -1, -1)))
            for i in range(nrings)
        ]
        dev = cls(frontend, memory, rings, slots, features)
        for qp in range(queue_pairs):
            dev.post_rx(qp)
        return dev

    def close(self) -> None:
        """Close the eventfds; idempotent."""
        p.close_fds(self.kick_fds + self.call_fds)
        self.kick_fds = []
        self.call_fds = []

    def rx_ring(self, qp: int = 0) -> SplitRing:
        """The RX ring (device writes) of queue pair ``qp``."""
        return self.rings[2 * qp]

    def tx_ring(self, qp: int = 0) -> SplitRing:
        """The TX ring (device reads) of queue pair ``qp``."""
        return self.rings[2 * qp + 1]

    def kick(self, index: int) -> None:
        """Signal the backend that ring ``index`` has new buffers."""
        os.write(self.kick_fds[index], _EVENT.pack(1))

    def post_rx(self, qp: int = 0, count: int | None = None) -> int:
        """Give RX buffers to the device (all free ones by default); returns how many."""
        ring, slots = self.rx_ring(qp), self._slots[2 * qp]
        n = len(slots.free) if count is None else min(count, len(slots.free))
        for _ in range(n):
            slot = slots.free.pop()
            head = ring.add_buffer(slots.gpa(slot), slots.size, True)
            slots.inflight[head] = slot
        if n:
            ring.publish()
        return n

    def reap_tx(self, qp: int = 0) -> int:
        """Free TX buffers the device has consumed; returns how many."""
        ring, slots = self.tx_ring(qp), self._slots[2 * qp + 1]
        done = ring.pop_used()
        for head, _ in done:
            slots.free.append(slots.inflight.pop(head))
        return len(done)

    def send(self, frames: Iterable[bytes], qp: int = 0, *, kick: bool = True) -> int:
        """Queue frames on the TX ring behind a zeroed virtio-net header, publish, kick.

        Returns how many were queued (fewer when the ring is full: call :meth:`reap_tx`).
        Raises UsageError for a frame larger than a buffer.
        """
        ring, slots = self.tx_ring(qp), self._slots[2 * qp + 1]
        self.reap_tx(qp)
        queued = 0
        for frame in frames:
            if len(frame) + self.hdr_len > slots.size:
                raise UsageError(
                    f"frame of {len(frame)} bytes does not fit a {slots.size}-byte TX buffer "
                    f"with its {self.hdr_len}-byte virtio-net header"
                )
            if not slots.free:
                break
            slot = slots.free.pop()
            data = bytes(self.hdr_len) + frame
            self.memory.write(slots.gpa(slot), data)
            head = ring.add_buffer(slots.gpa(slot), len(data), False)
            slots.inflight[head] = slot
            queued += 1
        if queued:
            ring.publish()
            if kick:
                self.kick(ring.index)
        return queued

    def wait_tx_done(self, qp: int = 0, timeout: float = 2.0) -> bool:
        """Poll until every queued TX buffer is consumed; True if that happened in time."""
        slots = self._slots[2 * qp + 1]
        deadline = time.monotonic() + timeout
        while True:
            self.reap_tx(qp)
            if not slots.inflight:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.001)

    def receive(self, qp: int = 0, timeout: float = 2.0, *, want: int = 1) -> list[bytes]:
        """Frames the device placed in RX buffers (virtio-net header stripped).

        Waits on the call eventfd (and polls the used index, so a missed call cannot hang)
        until at least ``want`` frames arrived or ``timeout`` passed. Buffers are reposted.
        """
        ring, slots = self.rx_ring(qp), self._slots[2 * qp]
        call_fd = self.call_fds[ring.index]
        frames: list[bytes] = []
        deadline = time.monotonic() + timeout
        while True:
            for head, length in ring.pop_used():
                slot = slots.inflight.pop(head)
                data = self.memory.read(slots.gpa(slot), length)
                frames.append(data[self.hdr_len :])
                slots.free.append(slot)
            if frames:
                self.post_rx(qp)
            if len(frames) >= want:
                return frames
            left = deadline - time.monotonic()
            if left <= 0:
                return frames
            if self.event_idx:
                # used_event: ask for a call once the device passes what we consumed
                self.memory.write(ring.avail_gpa + 4 + 2 * ring.size, _U16.pack(ring.last_used))
            if _readable(call_fd, min(left, 0.05)):
                with contextlib.suppress(BlockingIOError):
                    os.read(call_fd, 8)


def _readable(fd: int, timeout: float) -> bool:
    """Whether ``fd`` becomes readable within ``timeout`` seconds. poll, not select: a load
    test's process holds more than 1024 fds, which select cannot watch."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0, math.ceil(timeout * 1000))))
