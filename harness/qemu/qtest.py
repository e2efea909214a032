"""A client for QEMU's qtest line protocol (``-qtest unix:PATH``).

Wire format (QEMU ``system/qtest.c``): one command per line, one reply line each::

    > outl 0xcf8 0x80001800        < OK
    > inl 0xcfc                    < OK 0x10411af4
    > readq 0xe0000000             < OK 0x0000000000000000
    > write 0x100000 4 0x01020304  < OK
    > read 0x100000 4              < OK 0x01020304
    > (bad)                        < FAIL Unknown command 'bad'   /   ERR ...

Lines starting with ``IRQ`` are asynchronous interrupt notices (only sent after
``irq_intercept_*``) and are skipped. The reply parser (:func:`parse_reply`) is pure and
unit-tested; :class:`QtestClient` adds the socket. When the socket breaks, the client asks
its ``describe`` callback (the machine) for QEMU's exit status and stderr and raises
:class:`QemuExited` carrying both, because QEMU's stderr is almost always the real reason.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

from harness.qemu.errors import QemuExited, QtestError

#: Returns (exit status or None if still running, stderr so far); supplied by the machine.
Describe = Callable[[], tuple[int | None, str]]

_WIDTH = {"b": 1, "w": 2, "l": 4, "q": 8}


def parse_reply(command: str, line: str) -> list[str]:
    """The words after ``OK`` of one reply line; raises QtestError for FAIL/ERR/garbage."""
    words = line.strip().split()
    if not words:
        raise QtestError(f"qtest {command!r}: empty reply")
    if words[0] == "OK":
        return words[1:]
    if words[0] in ("FAIL", "ERR"):
        raise QtestError(f"qtest {command!r} refused by QEMU: {line.strip()}")
    raise QtestError(f"qtest {command!r}: unexpected reply {line.strip()!r}")


def parse_int(command: str, words: list[str]) -> int:
    """The integer of an ``OK 0x...`` reply."""
    if len(words) != 1:
        raise QtestError(f"qtest {command!r}: expected one value, got {words!r}")
    try:
        return int(words[0], 0)
    except ValueError:
        raise QtestError(f"qtest {command!r}: value {words[0]!r} is not a number") from None


def parse_data(command: str, words: list[str], size: int) -> bytes:
    """The bytes of an ``OK 0x<hex>`` reply to ``read ADDR SIZE``."""
    if len(words) != 1 or not words[0].startswith("0x"):
        raise QtestError(f"qtest {command!r}: expected 0x<hex> data, got {words!r}")
    try:
        data = bytes.fromhex(words[0][2:])
    except ValueError:
        raise QtestError(f"qtest {command!r}: data is not hex") from None
    if len(data) != size:
        raise QtestError(f"qtest {command!r}: asked for {size} bytes, got {len(data)}")
    return data


def format_write(addr: int, data: bytes) -> str:
    """The command line that writes ``data`` at guest-physical ``addr``."""
    if not data:
        raise ValueError("qtest write of zero bytes: QEMU rejects it; skip the call instead")
    return f"write {addr:#x} {len(data)} 0x{data.hex()}"


def _check(value: int, width: int, what: str) -> None:
    if not 0 <= value < 1 << (8 * width):
        raise ValueError(f"{what} {value:#x} does not fit in {width} bytes")


class QtestClient:
    """Synchronous qtest session over a connected stream socket (owned: ``close()`` closes it).

    Every method raises :class:`QtestError` when QEMU refuses a command and
    :class:`QemuExited` (with QEMU's exit status and stderr) when the connection breaks.
    """

    def __init__(self, sock: socket.socket, *, describe: Describe | None = None) -> None:
        self._sock = sock
        self._describe = describe
        self._buf = b""

    # -- plumbing -------------------------------------------------------------------------
    def _died(self, command: str, why: str) -> QemuExited:
        status, stderr = self._describe() if self._describe else (None, "")
        return QemuExited(
            f"QEMU stopped answering qtest {command!r}: {why}", exit_status=status, stderr=stderr
        )

    def command(self, line: str) -> list[str]:
        """Send one command line, return the words after ``OK``."""
        try:
            self._sock.sendall(line.encode() + b"\n")
        except OSError as err:
            raise self._died(line, f"send failed: {err}") from err
        while True:
            reply = self._readline(line)
            if not reply.startswith("IRQ"):
                return parse_reply(line, reply)

    def _readline(self, command: str) -> str:
        while b"\n" not in self._buf:
            try:
                chunk = self._sock.recv(65536)
            except OSError as err:
                raise self._died(command, f"receive failed: {err}") from err
            if not chunk:
                raise self._died(command, "connection closed")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode("ascii", "replace")

    def close(self) -> None:
        self._sock.close()

    # -- port I/O ---------------------------------------------------------------------------
    def out(self, width: str, port: int, value: int) -> None:
        _check(value, _WIDTH[width], "port value")
        self.command(f"out{width} {port:#x} {value:#x}")

    def in_(self, width: str, port: int) -> int:
        cmd = f"in{width} {port:#x}"
        return parse_int(cmd, self.command(cmd))

    def outb(self, port: int, value: int) -> None:
        self.out("b", port, value)

    def outw(self, port: int, value: int) -> None:
        self.out("w", port, value)

    def outl(self, port: int, value: int) -> None:
        self.out("l", port, value)

    def inb(self, port: int) -> int:
        return self.in_("b", port)

    def inw(self, port: int) -> int:
        return self.in_("w", port)

    def inl(self, port: int) -> int:
        return self.in_("l", port)

    # -- memory (guest-physical, little-endian like the guest) ------------------------------
    def write_int(self, width: str, addr: int, value: int) -> None:
        _check(value, _WIDTH[width], "value")
        self.command(f"write{width} {addr:#x} {value:#x}")

    def read_int(self, width: str, addr: int) -> int:
        cmd = f"read{width} {addr:#x}"
        return parse_int(cmd, self.command(cmd))

    def writeb(self, addr: int, value: int) -> None:
        self.write_int("b", addr, value)

    def writew(self, addr: int, value: int) -> None:
        self.write_int("w", addr, value)

    def writel(self, addr: int, value: int) -> None:
        self.write_int("l", addr, value)

    def writeq(self, addr: int, value: int) -> None:
        self.write_int("q", addr, value)

    def readb(self, addr: int) -> int:
        return self.read_int("b", addr)

    def readw(self, addr: int) -> int:
        return self.read_int("w", addr)

    def readl(self, addr: int) -> int:
        return self.read_int("l", addr)

    def readq(self, addr: int) -> int:
        return self.read_int("q", addr)

    def memwrite(self, addr: int, data: bytes) -> None:
        """Write ``data`` at guest-physical ``addr`` (no-op for empty data)."""
        if data:
            self.command(format_write(addr, data))

    def memread(self, addr: int, size: int) -> bytes:
        if size <= 0:
            raise ValueError(f"qtest read of {size} bytes: size must be positive")
        cmd = f"read {addr:#x} {size}"
        return parse_data(cmd, self.command(cmd), size)
