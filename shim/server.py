"""The shim's socket layer: a thin ``epoll`` loop around :class:`shim.session.Session`.

One thread, one ``epoll``; each accepted connection gets its own :class:`Session` and backend;
whatever happens on one connection (malformed bytes, a kernel refusal, a bug) fails that
connection only. No connection may hold the loop: nothing in it waits on a peer.

Per read: ``recvmsg`` with room for the most fds a message may carry (SCM_RIGHTS, received
close-on-exec) -> ``Session.receive(data, fds)`` -> the replies go out in one ``send`` -> the
session's events are logged (``Session.log_events``) -> if the session is done, the socket
is closed. A read of zero bytes is the frontend hanging up: the session is closed (rings
detached at once; the devices are closed by the config's :class:`~shim.closer.Closer` off
the loop, because closing a vhost-net fd takes tens of milliseconds).

Syscalls per message are kept to the minimum -- under TCG each costs tens of microseconds and
QEMU waits on some replies inside the guest's DRIVER_OK write: connection sockets are
non-blocking (a socket with a timeout makes Python poll before every recvmsg and send), so a
read is one ``recvmsg`` and its replies one ``send``.

Back-pressure instead of waiting: replies the kernel cannot take at once (the frontend is not
reading) stay in the connection's output buffer, and the connection is polled for EPOLLOUT
*instead of* EPOLLIN until the buffer drains. So one connection buffers at most the replies
to one read (14 KB for an 8 KiB read of GET_FEATURES; 145 KB of GET_INTERFACE_VERSIONS,
the largest reply), costs the loop nothing while it lags, and everything else -- other
connections, SIGTERM -- is served meanwhile. (A deadline per read was the alternative:
simpler, but every other connection would still stall for up to that deadline, again and
again.)

Deadlines (:class:`Limits`, the ``--*-timeout`` options): the loop sleeps in ``epoll_wait``
with no timeout while no connection has one pending -- a shim whose rings run in the kernel
is never woken by traffic or timers. A connection gets a deadline only while it owes
something that a real frontend (QEMU) does at once:

* ``handshake_timeout`` -- an accepted connection must send SET_OWNER (QEMU does in its
  connect-time burst; SET_OWNER is what takes the kernel devices and, under ``--user``, the
  one tap). Not to the first ring: QEMU starts rings only at the guest's DRIVER_OK, which a
  paused VM, an incoming migration or a guest without a virtio-net driver delays without
  bound. An inherited connected socket (``--fd``) has no handshake deadline: its peer was
  chosen by whoever made the pair, and the shim ends with it.
* ``stall_timeout`` -- a message begun must be complete (QEMU writes each in one
  ``sendmsg``), and buffered replies must be taken, within this time of the stall starting.
* ``idle_timeout`` (off by default) -- an accepted connection past SET_OWNER with no ring
  running must not stay silent this long. Off because that is exactly QEMU's state until
  DRIVER_OK; an operator whose frontends start rings promptly can turn it on so a silent
  holder cannot keep the tap from the VM's real QEMU.

Expiry drops the connection with a ``closed`` line naming the deadline and its option.

Limits: at most ``max_connections`` open connections; beyond, a new one is accepted and
closed at once with a ``refused`` line (repeats while at the limit are counted, not logged
one by one). When ``accept`` fails for want of file descriptors or memory (EMFILE, ENFILE,
ENOBUFS, ENOMEM), the listener is taken out of the poll set -- pending peers wait in the
backlog -- and put back when a connection closes or after ``ACCEPT_RETRY`` seconds; one line
when this starts, one when accepting works again.

Access: the socket file is created with mode 0600 (0660 with a socket group), never wider
for a moment (the umask is narrowed around ``bind``), and handed to its owner/group before
``listen``. Each accepted peer's SO_PEERCRED is checked against the
:class:`~shim.privileges.AllowList` first: a refused peer is logged (pid/uid/gid) and its
socket closed -- no session, no backend, no kernel device for it.

Log lines, one per connection event, through :func:`shim.eventlog.event`: ``accepted``
(socket, peer pid/uid/gid), ``refused``, ``version`` (the interface version, once the
frontend's SET_FEATURES locks it) and ``closed`` (the result); ``accept_paused`` /
``accept_resumed`` for the listener.

Stopping: :meth:`ShimServer.stop` may be called from a signal handler or another thread; it
wakes the loop through an eventfd, and the loop closes every connection (stopping its rings)
and the listening socket (unlinking the socket file the server created).
"""

from __future__ import annotations

import array
import contextlib
import errno
import logging
import os
import select
import socket
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvhost import versions
from kvhost.errors import UsageError
from kvhost.vhost_user.protocol import MAX_FDS, close_fds
from shim.closer import CLOSER, Closer
from shim.eventlog import event
from shim.privileges import (
    AllowList,
    PeerCred,
    check_socket_dir,
    peer_credentials,
    set_socket_access,
)
from shim.session import Backend, ConnectionState, Session, VringState

log = logging.getLogger("kvhost.shim")

#: bytes per read: the loop's turn for one connection. A frontend's messages are at most
#: ~4 KiB and QEMU's largest burst (DRIVER_OK) about 1 KiB, so nothing legitimate needs
#: more; a flood of tiny requests gets ~680 per turn (a few ms), not 5,000 (~35 ms).
RECV_SIZE = 1 << 13
#: seconds between attempts to accept again after running out of fds, when no connection
#: closes meanwhile (an fd can also free elsewhere: the closer thread, a finished probe)
ACCEPT_RETRY = 1.0
_ANCILLARY_SIZE = socket.CMSG_SPACE(MAX_FDS * 4)
# plain ints: ``int & MsgFlag`` would run enum code in Python on every read
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
_MSG_CMSG_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)
_SOL_SOCKET = int(socket.SOL_SOCKET)
_SCM_RIGHTS = int(socket.SCM_RIGHTS)
_EPOLLIN = select.EPOLLIN
_EPOLLOUT = select.EPOLLOUT
_OWNED = ConnectionState.OWNED
_RUNNING = VringState.RUNNING
#: accept errors that say the shim is out of a resource, not that one peer went wrong:
#: retrying at once would fail again (and did, 21,000 times in 0.5 s)
_ACCEPT_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


@dataclass(frozen=True)
class Limits:
    """How long a connection may owe something, and how many may be open (module docstring).

    Times are seconds; ``idle_timeout`` None is off. Raises UsageError, naming the option,
    for a value that cannot work.
    """

    #: sized for the load target (256 frontends on one shim, bench/bench_load.py); the
    #: systemd unit serves one VM per instance and may pass far fewer
    max_connections: int = 256
    handshake_timeout: float = 10.0
    stall_timeout: float = 5.0
    idle_timeout: float | None = None

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise UsageError(
                f"--max-connections {self.max_connections}: the shim must serve at least one "
                "connection"
            )
        for option, value in (
            ("--handshake-timeout", self.handshake_timeout),
            ("--stall-timeout", self.stall_timeout),
            ("--idle-timeout", self.idle_timeout),
        ):
            if value is not None and not 0 < value < 1e9:
                raise UsageError(f"{option} {value:g}: give a number of seconds above 0")

    def describe(self) -> str:
        idle = "off" if self.idle_timeout is None else f"{self.idle_timeout:g} s"
        return (
            f"at most {self.max_connections} connections; handshake {self.handshake_timeout:g} "
            f"s, stall {self.stall_timeout:g} s, idle {idle}"
        )


@dataclass
class ShimConfig:
    """What every connection is served with.

    ``make_backend(name)`` builds a fresh backend for the connection called ``name``;
    ``allow`` decides which peers get one at all. ``closer`` is where those backends hand
    a dropped connection's kernel objects (the server waits for it when it closes).
    ``limits``: the deadlines and the connection limit.
    """

    version: versions.InterfaceVersion
    make_backend: Callable[[str], Backend]
    supported: list[versions.InterfaceVersion] = field(default_factory=list)
    pinned: bool = False
    allow: AllowList = field(default_factory=AllowList)
    closer: Closer = CLOSER
    limits: Limits = field(default_factory=Limits)


@dataclass
class Connection:
    """One accepted frontend connection."""

    sock: socket.socket
    session: Session
    name: str
    peer: str
    cred: PeerCred | None = None
    #: the socket's fd, the key of ``ShimServer.connections`` (kept: a closed socket says -1)
    fd: int = -1
    #: the ``version`` event was logged (the version is locked)
    version_logged: bool = False
    #: replies the kernel has not taken yet (None: none); while set, the connection is
    #: polled for EPOLLOUT only
    out: bytearray | None = None
    #: accepted from the listener (not an inherited connected socket): the handshake and
    #: idle deadlines apply
    accepted: bool = True
    #: monotonic deadlines (None: not running); see the module docstring
    handshake_by: float | None = None
    stall_by: float | None = None
    idle_by: float | None = None


class ShimServer:
    """Serves vhost-user connections on a listening socket, or on one connected socket.

    Build with :meth:`listen` (``--socket-path``) or :meth:`adopt` (``--fd``), run
    :meth:`serve`, and :meth:`close` at the end (also done by :meth:`serve` on return).
    """

    def __init__(
        self,
        config: ShimConfig,
        *,
        listener: socket.socket | None = None,
        connected: socket.socket | None = None,
        path: str | None = None,
    ) -> None:
        if (listener is None) == (connected is None):
            raise ValueError("pass exactly one of listener and connected")
        self.config = config
        self.path = path
        self._listener = listener
        self._epoll = select.epoll()
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        # a signal handler runs in the loop's thread between bytecodes, never inside a
        # held lock's critical section of that same thread: an RLock keeps that case safe
        self._wake_lock = threading.RLock()
        self._epoll.register(self._wake, _EPOLLIN)
        self._stopping = False
        self._stop_reason: str | None = None
        self._serial = 0
        self.connections: dict[int, Connection] = {}
        #: socket fd -> the earliest deadline of that connection (only those with one)
        self._deadlines: dict[int, float] = {}
        self._single = connected is not None
        #: --idle-timeout is on: every read re-arms the idle deadline
        self._idle = config.limits.idle_timeout is not None
        #: the listener is in the poll set (False while accept is paused)
        self._listening = False
        #: when accept ran out of fds (None: it has not), and when to try again
        self._paused_since: float | None = None
        self._resume_at: float | None = None
        #: connections refused at the limit since the last one was logged
        self._full_refused = 0
        if listener is not None:
            listener.setblocking(False)
            self._epoll.register(listener, _EPOLLIN)
            self._listening = True
        if connected is not None:
            self._add(connected, accepted=False)

    # -- construction -------------------------------------------------------------------

    @classmethod
    def listen(
        cls,
        path: str,
        config: ShimConfig,
        *,
        backlog: int = 16,
        mode: int = 0o600,
        owner: int | None = None,
        group: int | None = None,
    ) -> ShimServer:
        """Listen on the unix socket ``path``; a stale socket file there is replaced.

        The file is bound with at most mode 0600 (umask), then given ``owner``/``group``
        (None: left as created), then ``mode``, and only then listens: no peer can connect
        while it is more open, or open to anyone else, than asked. Raises UsageError when
        ``path`` exists and is not a socket, or cannot be bound or handed over; ValueError
        for a ``mode`` beyond the permission bits.
        """
        if mode & ~0o777:
            raise ValueError(f"socket mode {mode:o} has bits beyond rwxrwxrwx")
        check_socket_dir(path, owner)
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise UsageError(f"{path} exists and is not a socket; choose another path")
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        bound = False
        try:
            umask = os.umask(0o177)
            try:
                sock.bind(path)
                bound = True
            finally:
                os.umask(umask)
            set_socket_access(path, mode, owner, group)
            sock.listen(backlog)
        except (OSError, UsageError) as err:
            sock.close()
            if bound:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            why = err.strerror if isinstance(err, OSError) else str(err)
            raise UsageError(f"cannot listen on {path}: {why}") from err
        st = os.stat(path)
        event(
            "listening",
            f"listening on {path}, interface version {config.version.label} (mode "
            f"{stat.S_IMODE(st.st_mode):04o}, owner uid {st.st_uid}, group gid {st.st_gid}; "
            f"peers: {'any' if config.allow.everyone else config.allow.describe()}; "
            f"{config.limits.describe()})",
            version=config.version.label,
            socket=path,
        )
        return cls(config, listener=sock, path=path)

    @classmethod
    def adopt(cls, fd: int, config: ShimConfig) -> ShimServer:
        """Serve on inherited ``fd``: a listening unix socket, or one already connected (then
        the server ends when that connection does). Raises UsageError otherwise."""
        try:
            sock = socket.socket(fileno=fd)
        except OSError as err:
            raise UsageError(f"--fd {fd} is not an open socket: {err.strerror}") from err
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            sock.detach()
            raise UsageError(f"--fd {fd} is not a unix stream socket")
        os.set_inheritable(fd, False)
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            event(
                "listening",
                f"listening on fd {fd}, interface version {config.version.label}",
                version=config.version.label,
            )
            return cls(config, listener=sock)
        return cls(config, connected=sock)

    # -- the loop ------------------------------------------------------------------------

    def serve(self) -> None:
        """Run until :meth:`stop` (or, on a single connected socket, until it closes)."""
        try:
            while not self._stopping:
                if self._single and not self.connections:
                    break
                for fd, _ in self._epoll.poll(self._timeout()):
                    conn = self.connections.get(fd)
                    if conn is not None:
                        # registered for EPOLLOUT only while replies wait (also woken so
                        # for EPOLLERR/EPOLLHUP: the send then fails and drops it)
                        try:
                            if conn.out is None:
                                self._readable(conn)
                            else:
                                self._writable(conn)
                        except MemoryError:
                            # the address space ran out: this connection goes, the loop stays
                            self._drop(conn, "failed: out of memory")
                    elif fd == self._wake:
                        with contextlib.suppress(BlockingIOError):
                            os.eventfd_read(self._wake)
                    elif self._listener is not None and fd == self._listener.fileno():
                        self._accept()
                if self._deadlines or self._resume_at is not None:
                    self._expire()
        finally:
            if self._stop_reason is not None:
                event(
                    "stopping",
                    f"{self._stop_reason} received, stopping",
                    result=self._stop_reason,
                )
            self.close()

    def stop(self, reason: str | None = None) -> None:
        """Ask :meth:`serve` to return; safe from signal handlers and other threads.

        It only sets a flag and writes an eventfd. ``reason`` (a signal's name) is logged
        as the ``stopping`` event by the loop's own thread: logging from a signal handler
        can land inside a write to the same stream the loop was making, and that raises
        in the handler (a reentrant call on the buffered stream).
        """
        if reason is not None:
            self._stop_reason = reason
        self._stopping = True
        with self._wake_lock, contextlib.suppress(OSError):
            if self._wake >= 0:
                os.eventfd_write(self._wake, 1)

    def close(self) -> None:
        """Close every connection (stopping its rings), the listener and the wake fd.

        Dropped connections' kernel devices are closed by the config's closer off the
        loop; this waits for it, so every fd is closed when it returns.
        """
        for conn in list(self.connections.values()):
            self._drop(conn, "shim shutting down")
        self.config.closer.drain()
        if self._listener is not None:
            if self._listening:
                self._epoll.unregister(self._listener)
                self._listening = False
            self._listener.close()
            self._listener = None
            if self.path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
        with self._wake_lock:
            if self._wake >= 0:
                self._epoll.unregister(self._wake)
                os.close(self._wake)
                self._wake = -1
                self._epoll.close()

    # -- connections ---------------------------------------------------------------------

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            sock, _ = self._listener.accept()
        except BlockingIOError:
            return
        except OSError as err:
            if err.errno in _ACCEPT_EXHAUSTED:
                self._pause_accept(err)
            else:  # one peer's trouble (ECONNABORTED, EPROTO): the next accept is fresh
                log.warning("accept on %s failed: %s", self._where, err)
            return
        if self._paused_since is not None:
            paused = time.monotonic() - self._paused_since
            self._paused_since = None
            event(
                "accept_resumed",
                f"accepting connections on {self._where} again after {paused:.1f} s",
                socket=self._where,
                result="resumed",
            )
        self._add(sock)

    def _pause_accept(self, err: OSError) -> None:
        """Out of fds or memory: stop polling the listener until a connection closes (or
        ACCEPT_RETRY passes); pending peers wait in the backlog. Logged once per episode."""
        assert self._listener is not None
        if self._listening:
            self._epoll.unregister(self._listener)
            self._listening = False
        now = time.monotonic()
        self._resume_at = now + ACCEPT_RETRY
        if self._paused_since is not None:
            return  # the same shortage as before: already said
        self._paused_since = now
        name = errno.errorcode.get(err.errno or 0, str(err.errno))
        event(
            "accept_paused",
            f"cannot accept connections on {self._where}: {err.strerror} ({name}) with "
            f"{len(self.connections)} connection(s) open; new peers wait until one closes "
            f"(retrying every {ACCEPT_RETRY:g} s). Raise the shim's file limit "
            "(LimitNOFILE) or lower --max-connections",
            level=logging.ERROR,
            socket=self._where,
            result=f"paused: {name}",
        )

    def _resume_accept(self) -> None:
        self._resume_at = None
        if self._listener is not None and not self._listening:
            self._epoll.register(self._listener, _EPOLLIN)
            self._listening = True

    def _add(self, sock: socket.socket, *, accepted: bool = True) -> None:
        self._serial += 1
        name = f"connection {self._serial}"
        allow = self.config.allow
        try:
            cred: PeerCred | None = peer_credentials(
                sock, groups=bool(allow.gids), label=bool(allow.labels)
            )
        except OSError:
            cred = None
        peer = str(cred) if cred is not None else "an unknown peer"
        refusal = allow.refusal(cred)
        if refusal is not None:
            sock.close()
            event(
                "refused",
                f"{name} from {peer} on {self._where} refused: {refusal}",
                level=logging.WARNING,
                result=f"refused: {refusal}",
                **self._fields(name, cred),
            )
            return
        limit = self.config.limits.max_connections
        if len(self.connections) >= limit:
            sock.close()
            self._refuse_full(name, peer, cred, limit)
            return
        try:
            backend = self.config.make_backend(name)
            session = Session(
                backend,
                self.config.version,
                supported=self.config.supported,
                pinned=self.config.pinned,
                name=name,
            )
        except Exception as err:
            sock.close()
            event(
                "refused",
                f"{name} from {peer} on {self._where} refused: {err}",
                level=logging.ERROR,
                result=f"refused: {err}",
                **self._fields(name, cred),
            )
            return
        sock.setblocking(False)
        conn = Connection(sock, session, name, peer, cred, sock.fileno(), accepted=accepted)
        if accepted:
            conn.handshake_by = time.monotonic() + self.config.limits.handshake_timeout
        self.connections[sock.fileno()] = conn
        self._epoll.register(sock, _EPOLLIN)
        self._rearm(conn)
        event(
            "accepted",
            f"{name} from {peer} on {self._where}, interface version {self.config.version.label}",
            version=self.config.version.label,
            **self._fields(name, cred),
        )

    def _readable(self, conn: Connection) -> None:
        try:
            data, fds, truncated = _recv(conn.sock)
        except BlockingIOError:
            return  # woken with nothing to read after all
        except OSError as err:
            self._drop(conn, f"receive failed: {err}")
            return
        if truncated:
            # the kernel installs fds until it runs out of room (MAX_FDS) or of fd numbers;
            # the rest of the message's fds are lost, so the message cannot be served
            close_fds(fds)
            if len(fds) >= MAX_FDS:
                why = f"the frontend sent more than {MAX_FDS} fds with one message"
            else:
                why = (
                    f"only {len(fds)} of the fds sent with a message could be received: the "
                    "shim is out of file descriptors (raise LimitNOFILE)"
                )
            self._drop(conn, f"failed: {why}")
            return
        if not data:
            close_fds(fds)
            mid = " in the middle of a message" if conn.session.codec.partial else ""
            self._drop(conn, f"frontend hung up{mid}")
            return
        try:
            replies = conn.session.receive(data, fds)
            if replies:
                self._write(conn, replies[0] if len(replies) == 1 else b"".join(replies))
            conn.session.log_events()  # after the replies: the frontend waits for those
        except OSError as err:
            self._drop(conn, f"send failed: {err}")
            return
        except Exception as err:  # never let one connection take the process down
            log.exception("%s: internal error", conn.name)
            self._drop(conn, f"failed: internal error {err!r}")
            return
        if not conn.version_logged and conn.session.acked_features is not None:
            self._log_version(conn)
        if conn.session.done:
            self._drop(conn, f"failed: {conn.session.error}")
            return
        # an established connection with no deadline skips the bookkeeping (the hot path)
        if (
            conn.handshake_by is not None
            or conn.stall_by is not None
            or conn.out is not None
            or self._idle
            or conn.session.codec.partial
        ):
            self._rearm(conn)

    def _write(self, conn: Connection, data: bytes) -> None:
        """Send ``data``; what the kernel does not take now waits in ``conn.out`` and the
        connection is polled for EPOLLOUT instead of EPOLLIN (not read until it drains).
        Raises OSError when the send fails."""
        sent = _send(conn.sock, data)
        if sent == len(data):
            return
        conn.out = bytearray(memoryview(data)[sent:])
        self._epoll.modify(conn.sock, _EPOLLOUT)

    def _writable(self, conn: Connection) -> None:
        out = conn.out
        assert out is not None
        try:
            sent = conn.sock.send(out)
        except BlockingIOError:
            return
        except OSError as err:
            self._drop(conn, f"send failed: {err}")
            return
        del out[:sent]
        if not out:
            conn.out = None
            self._epoll.modify(conn.sock, _EPOLLIN)
            self._rearm(conn)

    def _refuse_full(self, name: str, peer: str, cred: PeerCred | None, limit: int) -> None:
        """A connection beyond the limit: the first of a run is logged, the rest counted
        (a peer reconnecting in a loop must not flood the log)."""
        self._full_refused += 1
        if self._full_refused > 1:
            return
        event(
            "refused",
            f"{name} from {peer} on {self._where} refused: {limit} connection(s) already "
            f"open, the most this shim serves (--max-connections); further refusals are "
            "counted until one closes",
            level=logging.WARNING,
            result="refused: connection limit",
            **self._fields(name, cred),
        )

    def _drop(self, conn: Connection, result: str) -> None:
        self._deadlines.pop(conn.fd, None)
        with contextlib.suppress(OSError, ValueError):
            self._epoll.unregister(conn.sock)
        try:
            conn.session.close()
        except Exception:
            log.exception("%s: closing its devices failed", conn.name)
        conn.session.codec.close()
        conn.out = None
        conn.sock.close()
        # forgotten last, so "no connections" means every fd of every connection is closed
        # or handed to the config's closer (close() waits for that)
        self.connections.pop(conn.fd, None)
        event(
            "closed",
            f"{conn.name} closed: {result} (on {self._where}, peer {conn.peer}, interface "
            f"version {conn.session.version.label})",
            result=result,
            version=conn.session.version.label,
            **self._fields(conn.name, conn.cred),
        )
        if self._full_refused > 1:
            event(
                "refused",
                f"{self._full_refused - 1} more connection(s) on {self._where} refused at "
                f"the limit of {self.config.limits.max_connections} (--max-connections)",
                level=logging.WARNING,
                result="refused: connection limit",
                socket=self._where,
                count=self._full_refused - 1,
            )
        self._full_refused = 0
        if self._paused_since is not None:
            self._resume_accept()  # an fd is free now

    # -- deadlines -----------------------------------------------------------------------

    def _rearm(self, conn: Connection) -> None:
        """Recompute ``conn``'s deadlines after it read or wrote (module docstring)."""
        limits = self.config.limits
        now = time.monotonic()
        session = conn.session
        if conn.handshake_by is not None and session.state is _OWNED:
            conn.handshake_by = None
        if conn.out is not None or session.codec.partial:
            if conn.stall_by is None:
                conn.stall_by = now + limits.stall_timeout
        else:
            conn.stall_by = None
        idle = limits.idle_timeout
        if (
            idle is not None
            and conn.accepted
            and session.state is _OWNED
            and not any(r.state is _RUNNING for r in session.vrings)
        ):
            conn.idle_by = now + idle  # from the last thing it sent
        else:
            conn.idle_by = None
        deadlines = [d for d in (conn.handshake_by, conn.stall_by, conn.idle_by) if d is not None]
        if deadlines:
            self._deadlines[conn.fd] = min(deadlines)
        else:
            self._deadlines.pop(conn.fd, None)

    def _timeout(self) -> float | None:
        """Seconds ``epoll_wait`` may sleep: None (forever) while nothing is due."""
        if not self._deadlines and self._resume_at is None:
            return None
        due = min(self._deadlines.values(), default=float("inf"))
        if self._resume_at is not None:
            due = min(due, self._resume_at)
        return max(0.0, due - time.monotonic())

    def _expire(self) -> None:
        now = time.monotonic()
        if self._resume_at is not None and self._resume_at <= now:
            self._resume_accept()
        for fd, due in list(self._deadlines.items()):
            conn = self.connections.get(fd)
            if conn is None or due > now:
                continue
            if conn.out is None:
                # What the peer sent in time may still wait unread because the loop was
                # busy (a connect storm: every SET_OWNER costs ~20 ms under TCG). One read
                # first, then judge: a peer still owing is dropped, whatever it sends.
                self._readable(conn)
                due = self._deadlines.get(fd, now + 1)
                if self.connections.get(fd) is not conn or due > now:
                    continue
            self._drop(conn, self._overdue(conn, now))

    def _overdue(self, conn: Connection, now: float) -> str:
        """The line for the deadline ``conn`` missed (the earliest of those past)."""
        limits = self.config.limits
        missed = [
            (d, why)
            for d, why in (
                (
                    conn.handshake_by,
                    f"no SET_OWNER within {limits.handshake_timeout:g} s of connecting "
                    "(--handshake-timeout)",
                ),
                (
                    conn.stall_by,
                    f"the frontend has not read its replies for {limits.stall_timeout:g} s "
                    "and will not keep up (--stall-timeout)"
                    if conn.out is not None
                    else f"the frontend sent part of a message and not the rest within "
                    f"{limits.stall_timeout:g} s (--stall-timeout)",
                ),
                (
                    conn.idle_by,
                    f"idle for {limits.idle_timeout or 0:g} s holding the kernel devices with "
                    "no ring running (--idle-timeout)",
                ),
            )
            if d is not None and d <= now
        ]
        return f"dropped: {min(missed)[1]}"

    # -- events --------------------------------------------------------------------------

    @property
    def _where(self) -> str:
        return self.path or "inherited fd"

    def _fields(self, name: str, cred: PeerCred | None) -> dict[str, Any]:
        return {
            "socket": self._where,
            "connection": name,
            "peer_pid": None if cred is None else cred.pid,
            "peer_uid": None if cred is None else cred.uid,
            "peer_gid": None if cred is None else cred.gid,
        }

    def _log_version(self, conn: Connection) -> None:
        """The interface version is locked (first SET_FEATURES): one ``version`` event."""
        conn.version_logged = True
        label = conn.session.version.label
        event(
            "version",
            f"{conn.name} from {conn.peer} on {self._where} runs interface version {label}",
            version=label,
            result="locked",
            **self._fields(conn.name, conn.cred),
        )


def _recv(sock: socket.socket) -> tuple[bytes, list[int], bool]:
    """One recvmsg: data, fds (close-on-exec), and whether ancillary data was truncated.

    The socket is non-blocking: with nothing to read (a spurious wakeup) this raises
    BlockingIOError.
    """
    data, ancdata, flags, _ = sock.recvmsg(RECV_SIZE, _ANCILLARY_SIZE, _MSG_CMSG_CLOEXEC)
    if not ancdata:
        return data, [], bool(flags & _MSG_CTRUNC)
    fds = array.array("i")
    for level, kind, cdata in ancdata:
        if level == _SOL_SOCKET and kind == _SCM_RIGHTS:
            usable = len(cdata) - len(cdata) % fds.itemsize
            fds.frombytes(cdata[:usable])
    return data, list(fds), bool(flags & _MSG_CTRUNC)


def _send(sock: socket.socket, data: bytes) -> int:
    """One send on the non-blocking ``sock``: how many bytes the kernel took (0 when its
    buffer is full). Raises OSError when the connection is broken."""
    try:
        return sock.send(data)
    except BlockingIOError:
        return 0
