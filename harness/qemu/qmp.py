"""A minimal synchronous QMP client (QEMU Machine Protocol, ``-qmp unix:PATH``).

Wire format: newline-separated JSON objects. After connecting QEMU sends a greeting
``{"QMP": {"version": ..., "capabilities": [...]}}``; the client must send
``{"execute": "qmp_capabilities"}`` before anything else. Each command
``{"execute": NAME, "arguments": {...}, "id": N}`` gets exactly one answer carrying the same
``id``: ``{"return": ...}`` or ``{"error": {"class": ..., "desc": ...}}``. Asynchronous
``{"event": NAME, "data": {...}, "timestamp": {...}}`` objects may arrive at any time; they
are queued in :attr:`QmpClient.events` and can be awaited with :meth:`QmpClient.wait_event`.

Lifecycle (guarded): ``CONNECTED`` -> (:meth:`negotiate`) ``READY`` -> (:meth:`quit` or a
broken socket) ``CLOSED``.
"""

from __future__ import annotations

import contextlib
import enum
import json
import socket
import time
from typing import Any

from harness.qemu.errors import QemuError, QemuExited, QmpError
from harness.qemu.qtest import Describe
from kvhost.errors import UsageError

#: query-migrate statuses after which nothing more happens.
MIGRATION_FINAL = frozenset({"completed", "failed", "cancelled"})


class QmpState(enum.Enum):
    CONNECTED = "connected"
    READY = "ready"
    CLOSED = "closed"


def encode_command(name: str, arguments: dict[str, Any] | None, ident: int) -> bytes:
    """The bytes of one QMP command."""
    msg: dict[str, Any] = {"execute": name, "id": ident}
    if arguments:
        msg["arguments"] = arguments
    return json.dumps(msg).encode() + b"\n"


def decode_message(line: bytes) -> dict[str, Any]:
    """One QMP JSON object; raises QemuError for anything else."""
    try:
        msg = json.loads(line)
    except ValueError as err:
        raise QemuError(f"QMP sent invalid JSON {line[:200]!r}: {err}") from None
    if not isinstance(msg, dict):
        raise QemuError(f"QMP sent a non-object {line[:200]!r}")
    return msg


class QmpClient:
    """A QMP session over a connected stream socket (owned: closed by :meth:`close`).

    Raises :class:`QmpError` for command errors, :class:`QemuExited` (with QEMU's exit
    status and stderr) when the connection breaks, :class:`QemuError` on timeouts.
    """

    def __init__(self, sock: socket.socket, *, describe: Describe | None = None) -> None:
        self._sock = sock
        self._describe = describe
        self._buf = b""
        self._next_id = 1
        self.state = QmpState.CONNECTED
        self.greeting: dict[str, Any] = {}
        self.events: list[dict[str, Any]] = []

    def _failure(self) -> dict[str, Any]:
        status, stderr = self._describe() if self._describe else (None, "")
        return {"exit_status": status, "stderr": stderr}

    def _read_message(self, deadline: float, what: str) -> dict[str, Any]:
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QemuError(f"QMP: no answer to {what} in time", **self._failure())
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as err:
                self.state = QmpState.CLOSED
                raise QemuExited(f"QMP connection broke during {what}: {err}",
                                 **self._failure()) from err
            if not chunk:
                self.state = QmpState.CLOSED
                raise QemuExited(f"QMP connection closed during {what}", **self._failure())
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return decode_message(line)

    def negotiate(self, timeout: float = 30.0) -> dict[str, Any]:
        """Read the greeting and enter command mode; returns the greeting."""
        if self.state is not QmpState.CONNECTED:
            raise UsageError(f"QMP negotiate in state {self.state.value}; only once, first")
        deadline = time.monotonic() + timeout
        greeting = self._read_message(deadline, "greeting")
        if "QMP" not in greeting:
            raise QemuError(f"QMP greeting expected, got {greeting!r}", **self._failure())
        self.greeting = greeting
        self.state = QmpState.READY
        self.execute("qmp_capabilities", timeout=timeout)
        return greeting

    def execute(
        self, name: str, arguments: dict[str, Any] | None = None, *, timeout: float = 30.0
    ) -> Any:
        """Run one command; returns its ``return`` value, queues events seen meanwhile."""
        if self.state is not QmpState.READY:
            raise UsageError(f"QMP {name} in state {self.state.value}: negotiate() first")
        ident = self._next_id
        self._next_id += 1
        try:
            self._sock.sendall(encode_command(name, arguments, ident))
        except OSError as err:
            self.state = QmpState.CLOSED
            raise QemuExited(f"QMP send of {name} failed: {err}", **self._failure()) from err
        deadline = time.monotonic() + timeout
        while True:
            msg = self._read_message(deadline, name)
            if "event" in msg:
                self.events.append(msg)
                continue
            if msg.get("id") != ident:
                continue  # an answer to a command whose caller gave up
            if "error" in msg:
                error = msg["error"]
                # QEMU is alive and its desc is the reason: no need to wait for an exit status
                raise QmpError(name, str(error.get("class")), str(error.get("desc")))
            return msg.get("return")

    def wait_event(self, name: str, timeout: float = 30.0) -> dict[str, Any]:
        """The first queued or arriving event called ``name`` (removed from the queue)."""
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if ev.get("event") == name:
                    return self.events.pop(i)
            self.events.append(self._read_message(deadline, f"waiting for event {name}"))

    # -- migration ----------------------------------------------------------------------------
    def set_migration_capabilities(self, caps: dict[str, bool]) -> None:
        """``migrate-set-capabilities``; e.g. ``{"return-path": True}`` (both sides)."""
        self.execute(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": k, "state": v} for k, v in caps.items()]},
        )

    def migrate(self, uri: str) -> None:
        """Start an outgoing migration (returns at once; poll :meth:`query_migrate`)."""
        self.execute("migrate", {"uri": uri})

    def query_migrate(self) -> dict[str, Any]:
        result = self.execute("query-migrate")
        if not isinstance(result, dict):
            raise QemuError(f"query-migrate returned {result!r}", **self._failure())
        return result

    def wait_migration(self, timeout: float = 60.0, poll: float = 0.02) -> dict[str, Any]:
        """Poll ``query-migrate`` until a final status; returns the last answer."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.query_migrate()
            if info.get("status") in MIGRATION_FINAL:
                return info
            if time.monotonic() > deadline:
                raise QemuError(f"migration not finished after {timeout} s: {info!r}",
                                **self._failure())
            time.sleep(poll)

    def virtio_status(self, path: str = "/machine/peripheral/net0/virtio-backend"
                      ) -> dict[str, Any]:
        """``x-query-virtio-status`` of the device at QOM ``path``: the features QEMU's
        device offers and the driver acked, and (``vhost-dev``) what QEMU gave its vhost
        backend with SET_FEATURES (``acked-features``) and whether the dirty log is on."""
        result = self.execute("x-query-virtio-status", {"path": path})
        if not isinstance(result, dict):
            raise QemuError(f"x-query-virtio-status returned {result!r}", **self._failure())
        return result

    def query_status(self) -> str:
        """The run state (``running``, ``inmigrate``, ``postmigrate``, ...)."""
        result = self.execute("query-status")
        return str(result.get("status")) if isinstance(result, dict) else ""

    def quit(self) -> None:
        """Ask QEMU to exit; the connection closing is the expected outcome."""
        if self.state is not QmpState.READY:
            return
        with contextlib.suppress(QemuExited):  # QEMU closing the socket is success here
            self.execute("quit", timeout=10.0)
        self.state = QmpState.CLOSED

    def close(self) -> None:
        self.state = QmpState.CLOSED
        self._sock.close()
