"""The shim's socket layer: a thin ``selectors`` loop around :class:`shim.session.Session`.

One thread, one ``select``; no timers and no polling, so a shim whose rings run in the
kernel sleeps in ``select`` and is never woken by traffic. Each accepted connection gets its
own :class:`Session` and backend; whatever happens on one connection (malformed bytes, a
kernel refusal, a bug) fails that connection only.

Per read: ``recvmsg`` with room for the most fds a message may carry (SCM_RIGHTS, received
close-on-exec) -> ``Session.receive(data, fds)`` -> the replies are sent -> if the session is
done, the socket is closed. A read of zero bytes is the frontend hanging up: the session is
closed (rings detached, devices closed).

Log lines, one per connection event: accepted (socket, peer pid/uid via SO_PEERCRED),
interface version, and the result when it ends.

Stopping: :meth:`ShimServer.stop` may be called from a signal handler or another thread; it
wakes the loop through an eventfd, and the loop closes every connection (stopping its rings)
and the listening socket (unlinking the socket file the server created).
"""

from __future__ import annotations

import array
import contextlib
import logging
import os
import selectors
import socket
import stat
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from kvhost import versions
from kvhost.errors import UsageError
from kvhost.vhost_user.protocol import MAX_FDS, close_fds
from shim.session import Backend, Session

log = logging.getLogger("kvhost.shim")

RECV_SIZE = 1 << 16
SEND_TIMEOUT = 5.0
_UCRED = struct.Struct("=iII")


@dataclass
class ShimConfig:
    """What every connection is served with.

    ``make_backend(name)`` builds a fresh backend for the connection called ``name``.
    """

    version: versions.InterfaceVersion
    make_backend: Callable[[str], Backend]
    supported: list[versions.InterfaceVersion] = field(default_factory=list)
    pinned: bool = False


@dataclass
class Connection:
    """One accepted frontend connection."""

    sock: socket.socket
    session: Session
    name: str
    peer: str


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
        self._sel = selectors.DefaultSelector()
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        # a signal handler runs in the loop's thread between bytecodes, never inside a
        # held lock's critical section of that same thread: an RLock keeps that case safe
        self._wake_lock = threading.RLock()
        self._sel.register(self._wake, selectors.EVENT_READ, "wake")
        self._stopping = False
        self._serial = 0
        self.connections: dict[int, Connection] = {}
        self._single = connected is not None
        if listener is not None:
            listener.setblocking(False)
            self._sel.register(listener, selectors.EVENT_READ, "listen")
        if connected is not None:
            self._add(connected)

    # -- construction -------------------------------------------------------------------

    @classmethod
    def listen(cls, path: str, config: ShimConfig, *, backlog: int = 16) -> ShimServer:
        """Listen on the unix socket ``path``; a stale socket file there is replaced.

        Raises UsageError when ``path`` exists and is not a socket, or cannot be bound.
        """
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise UsageError(f"{path} exists and is not a socket; choose another path")
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(path)
            sock.listen(backlog)
        except OSError as err:
            sock.close()
            raise UsageError(f"cannot listen on {path}: {err.strerror}") from err
        log.info("listening on %s, interface version %s", path, config.version.label)
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
            log.info("listening on fd %d, interface version %s", fd, config.version.label)
            return cls(config, listener=sock)
        return cls(config, connected=sock)

    # -- the loop ------------------------------------------------------------------------

    def serve(self) -> None:
        """Run until :meth:`stop` (or, on a single connected socket, until it closes)."""
        try:
            while not self._stopping:
                if self._single and not self.connections:
                    break
                for key, _ in self._sel.select():
                    if key.data == "wake":
                        with contextlib.suppress(BlockingIOError):
                            os.eventfd_read(self._wake)
                    elif key.data == "listen":
                        self._accept()
                    else:
                        conn = self.connections.get(key.fd)
                        if conn is not None:
                            self._readable(conn)
        finally:
            self.close()

    def stop(self) -> None:
        """Ask :meth:`serve` to return; safe from signal handlers and other threads."""
        self._stopping = True
        with self._wake_lock, contextlib.suppress(OSError):
            if self._wake >= 0:
                os.eventfd_write(self._wake, 1)

    def close(self) -> None:
        """Close every connection (stopping its rings), the listener and the wake fd."""
        for conn in list(self.connections.values()):
            self._drop(conn, "shim shutting down")
        if self._listener is not None:
            self._sel.unregister(self._listener)
            self._listener.close()
            self._listener = None
            if self.path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
        with self._wake_lock:
            if self._wake >= 0:
                self._sel.unregister(self._wake)
                os.close(self._wake)
                self._wake = -1
                self._sel.close()

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
        peer = _peer(sock)
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
            log.error("%s from %s refused: %s", name, peer, err)
            sock.close()
            return
        sock.settimeout(SEND_TIMEOUT)
        conn = Connection(sock, session, name, peer)
        self.connections[sock.fileno()] = conn
        self._sel.register(sock, selectors.EVENT_READ, "conn")
        log.info(
            "%s from %s on %s, interface version %s",
            name,
            peer,
            self.path or "inherited fd",
            self.config.version.label,
        )

    def _readable(self, conn: Connection) -> None:
        try:
            data, fds, truncated = _recv(conn.sock)
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
                conn.sock.sendall(reply)
        except OSError as err:
            self._drop(conn, f"send failed: {err}")
            return
        except Exception as err:  # never let one connection take the process down
            log.exception("%s: internal error", conn.name)
            self._drop(conn, f"failed: internal error {err!r}")
            return
        if conn.session.done:
            self._drop(conn, f"failed: {conn.session.error}")

    def _drop(self, conn: Connection, result: str) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(conn.sock)
        try:
            conn.session.close()
        except Exception:
            log.exception("%s: closing its devices failed", conn.name)
        conn.session.codec.close()
        fd = conn.sock.fileno()
        conn.sock.close()
        # forgotten last, so "no connections" means every fd of every connection is closed
        self.connections.pop(fd, None)
        log.info("%s closed: %s", conn.name, result)


def _recv(sock: socket.socket) -> tuple[bytes, list[int], bool]:
    """One recvmsg: data, fds (close-on-exec), and whether ancillary data was truncated."""
    data, ancdata, flags, _ = sock.recvmsg(
        RECV_SIZE, socket.CMSG_SPACE(MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC
    )
    fds = array.array("i")
    for level, kind, cdata in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(cdata) - len(cdata) % fds.itemsize
            fds.frombytes(cdata[:usable])
    return data, list(fds), bool(flags & socket.MSG_CTRUNC)


def _peer(sock: socket.socket) -> str:
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return "an unknown peer"
    pid, uid, _gid = _UCRED.unpack(raw)
    return f"pid {pid} (uid {uid})"
