"""Network namespaces: entering them, throw-away ones for tests and scenarios, and the host
side of a tap.

Deliberately free of pyroute2 (kvhost.netlink): inside a TCG test VM importing it costs a
minute or more, and these helpers run at the start of every kernel-tier scenario. Namespaces
are made with ``ip netns`` and entered with setns(2) through ctypes: :func:`enter` (for good)
and :func:`inside` (for a ``with`` body) are the only places kvhost's own code calls setns --
the shim's ``--netns``, :mod:`kvhost.tap`, :mod:`kvhost.netlink` (instead of pyroute2's own
namespace switching) and the tests go through them.

setns moves only the calling thread, so a process must be single-threaded while it is inside
a namespace it expects its children (QEMU, the shim) to inherit.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shlex
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from kvhost import abi
from kvhost.errors import KvhostError, UsageError
from kvhost.ioctl import kernel_error

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4


class FrameNotSeen(KvhostError):
    """An expected frame did not arrive on a tap in time."""


def run(argv: Sequence[str], what: str) -> subprocess.CompletedProcess[str]:
    """Run a set-up command; KvhostError with its stderr when it fails."""
    done = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if done.returncode:
        raise KvhostError(
            f"{what} failed (exit {done.returncode}): {shlex.join(argv)}\n"
            f"{(done.stderr or done.stdout).strip()}"
        )
    return done


#: where ``ip netns add NAME`` pins namespace NAME (a bind mount of its nsfs file)
NETNS_DIR = "/run/netns"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, abi.CLONE_NEWNET) != 0:
        raise kernel_error(
            "setns", what, ctypes.get_errno(), "entering a network namespace needs CAP_SYS_ADMIN"
        )


def enter(name: str) -> None:
    """Move the calling thread into network namespace ``name`` (``/run/netns/NAME``).

    Raises UsageError when there is no such namespace (saying that ``ip netns add NAME``
    makes it), KernelError (op ``setns``) when the kernel refuses, e.g. without
    CAP_SYS_ADMIN.
    """
    path = f"{NETNS_DIR}/{name}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise UsageError(
            f"network namespace {name!r} does not exist: create it with 'ip netns add {name}'"
        ) from None
    try:
        _setns(fd, path)
    finally:
        os.close(fd)


@contextlib.contextmanager
def inside(name: str | None) -> Iterator[None]:
    """This thread in ``/run/netns/NAME`` for the body (see :func:`enter`), then back where it
    was; None: the body runs where the thread already is."""
    if name is None:
        yield
        return
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        enter(name)
        try:
            yield
        finally:
            # staying in a namespace that is about to be deleted would poison everything the
            # process does afterwards: failing loudly is the only safe answer
            _setns(home, "the network namespace of origin")
    finally:
        os.close(home)


def link_up(name: str) -> None:
    """``ip link set NAME up`` in the current namespace."""
    run(["ip", "link", "set", "dev", name, "up"], f"bringing {name} up")


def quiet_ipv6() -> None:
    """No IPv6 in the current namespace: its neighbour discovery would put frames in RX
    rings between a test's own."""
    for knob in ("all", "default"):
        Path(f"/proc/sys/net/ipv6/conf/{knob}/disable_ipv6").write_text("1")


@contextlib.contextmanager
def created(tag: str = "kv") -> Iterator[str]:
    """A new network namespace ``TAG-PID-RANDOM`` (not entered), removed afterwards."""
    name = f"{tag}-{os.getpid()}-{os.urandom(3).hex()}"
    run(["ip", "netns", "add", name], "creating a network namespace")
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


@contextlib.contextmanager
def fresh(tag: str = "kv", *, ipv6: bool = False) -> Iterator[str]:
    """A new network namespace ``TAG-PID-RANDOM`` with ``lo`` up, the body run inside it,
    removed afterwards. Children started in the body inherit it."""
    with created(tag) as name, inside(name):
        link_up("lo")
        if not ipv6:
            quiet_ipv6()
        yield name


def create_tap(name: str, *, multi_queue: bool = False) -> None:
    """A persistent tap ``name`` with a vnet header in the current namespace, up;
    ``multi_queue``: created with IFF_MULTI_QUEUE (a shim attaching with that flag needs it)."""
    argv = ["ip", "tuntap", "add", "dev", name, "mode", "tap", "vnet_hdr"]
    if multi_queue:
        argv.append("multi_queue")
    run(argv, f"creating tap {name}")
    link_up(name)


class TapPort:
    """The host side of a tap: an AF_PACKET socket bound to it."""

    def __init__(self, ifname: str) -> None:
        self.ifname = ifname
        self.sock = socket.socket(
            socket.AF_PACKET, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.htons(ETH_P_ALL)
        )
        try:
            self.sock.bind((ifname, 0))
        except BaseException:
            self.sock.close()
            raise

    def send(self, frame: bytes) -> None:
        """Out of the tap interface, i.e. into the guest's RX queue."""
        self.sock.send(frame)

    def receive(self, timeout: float) -> tuple[bytes, float] | None:
        """The next frame the tap received from the guest side (frames it sent out are
        skipped) and when it arrived (perf_counter); None when none came in ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            self.sock.settimeout(remaining)
            try:
                data, addr = self.sock.recvfrom(65536)
            except TimeoutError:
                return None
            arrived = time.perf_counter()
            if addr[2] != PACKET_OUTGOING:
                return data, arrived
        return None

    def expect(self, wanted: bytes | int, timeout: float = 10.0) -> tuple[bytes, float]:
        """The first frame the tap received from the guest side that equals ``wanted``
        (bytes) or has ethertype ``wanted`` (int), and when it arrived (perf_counter).
        FrameNotSeen naming the tap on timeout."""
        deadline = time.monotonic() + timeout
        seen = 0
        while (got := self.receive(deadline - time.monotonic())) is not None:
            data, arrived = got
            seen += 1
            if isinstance(wanted, bytes):
                if data == wanted:
                    return data, arrived
            elif int.from_bytes(data[12:14], "big") == wanted:
                return data, arrived
        what = f"ethertype {wanted:#06x}" if isinstance(wanted, int) else "the expected frame"
        raise FrameNotSeen(
            f"{self.ifname}: {what} not seen in {timeout} s ({seen} other frames arrived)"
        )

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> TapPort:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
