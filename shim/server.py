"""The shim's socket layer: a thin ``epoll`` loop around :class:`shim.session.Session`.

One thread, one ``epoll``; no timers and no polling, so a shim whose rings run in the
kernel sleeps in ``epoll_wait`` and is never woken by traffic. Each accepted connection gets its
own :class:`Session` and backend; whatever happens on one connection (malformed bytes, a
kernel refusal, a bug) fails that connection only.

Per read: ``recvmsg`` with room for the most fds a message may carry (SCM_RIGHTS, received
close-on-exec) -> ``Session.receive(data, fds)`` -> the replies are sent -> the session's
events are logged (``Session.log_events``) -> if the session is done, the socket is
closed. A read of zero bytes is the frontend hanging up: the session is closed (rings
detached at once; the devices are closed by the config's :class:`~shim.closer.Closer` off
the loop, because closing a vhost-net fd takes tens of milliseconds).

Syscalls per message are kept to the minimum -- under TCG each costs tens of microseconds and
QEMU waits on some replies inside the guest's DRIVER_OK write: connection sockets are
non-blocking (a socket with a timeout makes Python poll before every recvmsg and send), so a
read is one ``recvmsg`` and a reply one ``send``; only a reply the kernel cannot take at once
(the frontend stopped reading) falls back to waiting, at most ``SEND_TIMEOUT`` seconds.

Access: the socket file is created with mode 0600 (0660 with a socket group), never wider
for a moment (the umask is narrowed around ``bind``), and handed to its owner/group before
``listen``. Each accepted peer's SO_PEERCRED is checked against the
:class:`~shim.privileges.AllowList` first: a refused peer is logged (pid/uid/gid) and its
socket closed -- no session, no backend, no kernel device for it.

Log lines, one per connection event, through :func:`shim.eventlog.event`: ``accepted``
(socket, peer pid/uid/gid), ``refused``, ``version`` (the interface version, once the
frontend's SET_FEATURES locks it) and ``closed`` (the result).

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
from shim.privileges import AllowList, PeerCred, peer_credentials
from shim.session import Backend, Session

log = logging.getLogger("kvhost.shim")

RECV_SIZE = 1 << 16
SEND_TIMEOUT = 5.0
_ANCILLARY_SIZE = socket.CMSG_SPACE(MAX_FDS * 4)
# plain ints: ``int & MsgFlag`` would run enum code in Python on every read
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
_MSG_CMSG_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)
_SOL_SOCKET = int(socket.SOL_SOCKET)
_SCM_RIGHTS = int(socket.SCM_RIGHTS)
_EPOLLIN = select.EPOLLIN


@dataclass
class ShimConfig:
    """What every connection is served with.

    ``make_backend(name)`` builds a fresh backend for the connection called ``name``;
    ``allow`` decides which peers get one at all. ``closer`` is where those backends hand
    a dropped connection's kernel objects (the server waits for it when it closes).
    """

    version: versions.InterfaceVersion
    make_backend: Callable[[str], Backend]
    supported: list[versions.InterfaceVersion] = field(default_factory=list)
    pinned: bool = False
    allow: AllowList = field(default_factory=AllowList)
    closer: Closer = CLOSER


@dataclass
class Connection:
    """One accepted frontend connection."""

    sock: socket.socket
    session: Session
    name: str
    peer: str
    cred: PeerCred | None = None
    #: the ``version`` event was logged (the version is locked)
    version_logged: bool = False


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
        self._single = connected is not None
        if listener is not None:
            listener.setblocking(False)
            self._epoll.register(listener, _EPOLLIN)
        if connected is not None:
            self._add(connected)

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
            if owner is not None or group is not None:
                os.chown(path, -1 if owner is None else owner, -1 if group is None else group)
            os.chmod(path, mode)
            sock.listen(backlog)
        except OSError as err:
            sock.close()
            if bound:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            raise UsageError(f"cannot listen on {path}: {err.strerror}") from err
        st = os.stat(path)
        event(
            "listening",
            f"listening on {path}, interface version {config.version.label} (mode "
            f"{stat.S_IMODE(st.st_mode):04o}, owner uid {st.st_uid}, group gid {st.st_gid}; "
            f"peers: {'any' if config.allow.everyone else config.allow.describe()})",
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
                for fd, _ in self._epoll.poll():
                    conn = self.connections.get(fd)
                    if conn is not None:
                        self._readable(conn)
                    elif fd == self._wake:
                        with contextlib.suppress(BlockingIOError):
                            os.eventfd_read(self._wake)
                    elif self._listener is not None and fd == self._listener.fileno():
                        self._accept()
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
            self._epoll.unregister(self._listener)
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
            log.error("accept on %s failed: %s", self.path or "listener", err)
            return
        self._add(sock)

    def _add(self, sock: socket.socket) -> None:
        self._serial += 1
        name = f"connection {self._serial}"
        allow = self.config.allow
        try:
            cred: PeerCred | None = peer_credentials(sock, groups=bool(allow.gids))
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
        conn = Connection(sock, session, name, peer, cred)
        self.connections[sock.fileno()] = conn
        self._epoll.register(sock, _EPOLLIN)
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
            close_fds(fds)
            self._drop(conn, f"failed: frontend sent more than {MAX_FDS} fds with one message")
            return
        if not data:
            close_fds(fds)
            mid = " in the middle of a message" if conn.session.codec.partial else ""
            self._drop(conn, f"frontend hung up{mid}")
            return
        try:
            replies = conn.session.receive(data, fds)
            for reply in replies:
                _send(conn.sock, reply)
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

    def _drop(self, conn: Connection, result: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._epoll.unregister(conn.sock)
        try:
            conn.session.close()
        except Exception:
            log.exception("%s: closing its devices failed", conn.name)
        conn.session.codec.close()
        fd = conn.sock.fileno()
        conn.sock.close()
        # forgotten last, so "no connections" means every fd of every connection is closed
        # or handed to the config's closer (close() waits for that)
        self.connections.pop(fd, None)
        event(
            "closed",
            f"{conn.name} closed: {result} (on {self._where}, peer {conn.peer}, interface "
            f"version {conn.session.version.label})",
            result=result,
            version=conn.session.version.label,
            **self._fields(conn.name, conn.cred),
        )

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


def _send(sock: socket.socket, data: bytes) -> None:
    """Send all of ``data`` on the non-blocking ``sock``; waits (poll) only while the
    kernel's buffer is full, at most SEND_TIMEOUT seconds in all, then raises
    ``TimeoutError``: a frontend that stops reading its replies loses its connection
    instead of stalling every other one."""
    try:
        sent = sock.send(data)
    except BlockingIOError:
        sent = 0
    if sent == len(data):
        return
    view = memoryview(data)[sent:]
    deadline = time.monotonic() + SEND_TIMEOUT
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    while view:
        left = deadline - time.monotonic()
        if left <= 0 or not poller.poll(left * 1000):
            raise TimeoutError(
                errno.ETIMEDOUT,
                f"the frontend has not read its replies for {SEND_TIMEOUT:g} s",
            )
        try:
            view = view[sock.send(view):]
        except BlockingIOError:
            continue
