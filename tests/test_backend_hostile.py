"""Host tier: shim.kernel_backend.KernelBackend against a hostile frontend, with recording
devices standing in for /dev/vhost-net and the tap.

The devices record every verb into one shared log (and can be told to refuse one), so these
tests check what the backend *asks* the kernel, in which order, and what it maps in this
process -- the kernel's own answers to the same calls are tests/test_kernel_shim.py's job.
Mappings are counted in /proc/self/maps (each test's memfds carry a name of its own), budget
use in the backend's :class:`~kvhost.memory.MappingBudget`.
"""

from __future__ import annotations

import errno
import itertools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import pytest
from test_session import Peer

from harness.device import GUEST
from kvhost import abi, features, versions
from kvhost.errors import KernelError, RemoteProtocolError
from kvhost.memory import FrontendRegion, MappingBudget, MemoryRegion
from kvhost.tap import Tap
from kvhost.vhost import LogRegion, VhostNet, VringConfig
from kvhost.vhost_user import protocol as p
from kvhost.vhost_user.protocol import Request as R
from shim.closer import Closer
from shim.kernel_backend import KernelBackend
from shim.session import ConnectionState, Session

V5 = versions.parse("org.kernel.vhost-net.v5")
GiB = 1 << 30
MiB = 1 << 20
VA = 0x7F00_0000_0000
_names = itertools.count()


class Log:
    """The kernel calls of every recording device and every unmapping, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        #: (verb, device number or None) -> the error that call raises
        self.fail: dict[tuple[str, int | None], BaseException] = {}

    def rec(self, dev: int, verb: str, *args: Any) -> None:
        self.calls.append((verb, dev, *args))
        exc = self.fail.get((verb, dev)) or self.fail.get((verb, None))
        if exc is not None:
            raise exc

    def verbs(self) -> list[str]:
        return [c[0] for c in self.calls]


class FakeDevice:
    """Stands in for :class:`VhostNet`: records each verb, holds what the kernel would."""

    def __init__(self, log: Log, number: int) -> None:
        self.log = log
        self.number = number
        self.table: list[MemoryRegion] = []
        self.attached: dict[int, int] = {}
        self.closed = False

    def set_owner(self) -> None:
        self.log.rec(self.number, "set_owner")

    def reset_owner(self) -> None:
        self.log.rec(self.number, "reset_owner")

    def get_features(self) -> int:
        self.log.rec(self.number, "get_features")
        return features.LOG_ALL | (1 << 15) | (1 << 32)

    def set_features(self, bits: int) -> None:
        self.log.rec(self.number, "set_features", bits)

    def set_mem_table(self, regions: Sequence[MemoryRegion]) -> None:
        self.log.rec(self.number, "set_mem_table", len(regions))
        self.table = list(regions)

    def set_log_base(self, base: int, region: LogRegion | None = None) -> None:
        self.log.rec(self.number, "set_log_base", base)

    def set_vring_num(self, index: int, num: int) -> None:
        self.log.rec(self.number, "set_vring_num", index, num)

    def set_vring_base(self, index: int, base: int) -> None:
        self.log.rec(self.number, "set_vring_base", index, base)

    def get_vring_base(self, index: int) -> int:
        self.log.rec(self.number, "get_vring_base", index)
        return 0

    def set_vring_addr(self, index: int, config: VringConfig) -> None:
        self.log.rec(self.number, "set_vring_addr", index, config)

    def set_vring_kick(self, index: int, fd: int) -> None:
        self.log.rec(self.number, "set_vring_kick", index)

    def set_vring_call(self, index: int, fd: int) -> None:
        self.log.rec(self.number, "set_vring_call", index)

    def set_vring_err(self, index: int, fd: int) -> None:
        self.log.rec(self.number, "set_vring_err", index)

    def set_backend(self, index: int, fd: int) -> None:
        self.log.rec(self.number, "set_backend", index, fd)
        if fd < 0:
            self.attached.pop(index, None)
        else:
            self.attached[index] = fd

    def close(self) -> None:
        self.log.rec(self.number, "close")
        self.closed = True


class FakeTap:
    """Stands in for :class:`Tap`: queue fds are numbers, never opened."""

    def __init__(self, queues: int, mtu: int = 1500) -> None:
        self.name = "faketap"
        self.fds = [900 + q for q in range(queues)]
        self.mtu = mtu
        self.hdr = 10

    def set_sndbuf(self, n: int) -> None:
        pass

    def set_offload(self, flags: int) -> None:
        pass

    def set_vnet_hdr_size(self, n: int) -> None:
        self.hdr = n

    def get_vnet_hdr_size(self) -> int:
        return self.hdr

    def get_mtu(self) -> int:
        return self.mtu

    def set_mtu(self, n: int) -> None:
        self.mtu = n

    def close(self) -> None:
        self.fds = []


class Rig:
    """One KernelBackend on recording devices, its own closer and budget."""

    def __init__(
        self,
        pairs: int = 1,
        *,
        budget: MappingBudget | None = None,
        closer: Closer | None = None,
        log: Log | None = None,
        allow_mtu_change: bool = False,
    ) -> None:
        self.log = log or Log()
        self.devices: list[FakeDevice] = []
        self.tap = FakeTap(pairs)
        self.budget = budget or MappingBudget(64 * GiB, 128 * GiB)
        self.closer = closer or Closer()

        def open_device(path: str) -> VhostNet:
            dev = FakeDevice(self.log, len(self.devices))
            self.devices.append(dev)
            return cast(VhostNet, dev)

        self.backend = KernelBackend(
            lambda: cast(Tap, self.tap),
            pairs,
            closer=self.closer,
            open_device=open_device,
            budget=self.budget,
            allow_mtu_change=allow_mtu_change,
        )
        self.backend.set_owner()

    def close(self) -> None:
        self.backend.close()
        self.closer.drain(timeout=30)


@pytest.fixture
def tag() -> str:
    """A memfd name prefix unique to the test, to count its mappings in /proc/self/maps."""
    return f"kvhostile{os.getpid()}x{next(_names)}"


def maps_of(tag: str) -> int:
    return sum(tag in line for line in Path("/proc/self/maps").read_text().splitlines())


def memfd(tag: str, size: int) -> int:
    fd = os.memfd_create(tag, os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def table(tag: str, *regions: tuple[int, int, int]) -> list[FrontendRegion]:
    """(gpa, size, frontend va) each, on fresh memfds of exactly that size."""
    return [FrontendRegion(gpa, size, va, 0, memfd(tag, size)) for gpa, size, va in regions]


def send_table(peer: Peer, tag: str, *regions: tuple[int, int, int]) -> None:
    """SET_MEM_TABLE over the wire, each region on a memfd of its size."""
    payload = p.MemTable(tuple(p.MemRegion(gpa, size, va, 0) for gpa, size, va in regions))
    peer.send(R.SET_MEM_TABLE, payload, [memfd(tag, size) for _, size, _ in regions])


def ring(size: int = 256, va: int = VA, flags: int = 0, log_addr: int = 0) -> VringConfig:
    """A ring laid out like Peer.configure_ring's: descriptors, avail at +4 KiB, used +8 KiB."""
    return VringConfig(size, flags, va, va + 0x2000, va + 0x1000, log_addr)


def running(rig: Rig, tag: str, rings: Sequence[int] = (0, 1)) -> dict[int, VringConfig]:
    """A 1 MiB table at VA, ``rings`` configured at VA + 64 KiB steps and attached."""
    rig.backend.set_mem_table(table(tag, (0, MiB, VA)))
    configs = {}
    for index in rings:
        configs[index] = ring(va=VA + index * 0x10000)
        rig.backend.set_vring_addr(index, configs[index])
        rig.backend.set_backend(index, True)
    return configs


# --- a second SET_MEM_TABLE while rings run --------------------------------------------------


def test_a_new_table_while_rings_run_moves_them_then_unmaps_the_old(
    tag: str, fd_leak_check: None
) -> None:
    rig = Rig()
    configs = running(rig, tag)
    assert maps_of(tag) == 1
    old_addr = rig.devices[0].table[0].userspace_addr
    rig.log.calls.clear()
    moved = [(i, c) for i, c in configs.items()]
    rig.backend.set_mem_table(table(tag, (0, 2 * MiB, VA)), moved)
    # the table first, then the rings re-pointed; never a detach
    assert rig.log.verbs() == ["set_mem_table", "set_vring_addr", "set_vring_addr"]
    new_addr = rig.devices[0].table[0].userspace_addr
    assert new_addr != old_addr
    for call in rig.log.calls[1:]:
        assert cast(VringConfig, call[3]).desc - new_addr < 2 * MiB
    assert maps_of(tag) == 1, "the old table is unmapped once replaced"
    assert rig.devices[0].attached == {0: 900, 1: 900}
    rig.close()
    assert maps_of(tag) == 0 and rig.budget.used == 0


def test_a_new_table_a_ring_does_not_fit_is_refused_before_any_ioctl(
    tag: str, fd_leak_check: None
) -> None:
    rig = Rig()
    configs = running(rig, tag)
    rig.log.calls.clear()
    # ring 1 sits at VA + 64 KiB: outside a 32 KiB table
    with pytest.raises(RemoteProtocolError, match=r"vring 1 \(size 256\).*outside every"):
        rig.backend.set_mem_table(table(tag, (0, 32 * 1024, VA)), list(configs.items()))
    assert rig.log.calls == [], "nothing reaches the kernel"
    assert maps_of(tag) == 1, "the refused table is unmapped, the running one kept"
    assert rig.devices[0].attached == {0: 900, 1: 900}
    assert rig.backend.table is not None and rig.budget.used == MiB
    rig.close()
    assert maps_of(tag) == 0 and rig.budget.used == 0


@pytest.mark.parametrize(
    ("verb", "device"),
    [("set_mem_table", 0), ("set_mem_table", 1), ("set_vring_addr", 1), ("set_vring_addr", 0)],
)
def test_a_new_table_refused_after_the_swap_detaches_every_ring_before_unmapping(
    tag: str, fd_leak_check: None, monkeypatch: pytest.MonkeyPatch, verb: str, device: int
) -> None:
    """The kernel refuses part-way (one device has the new table, or a ring the new
    addresses): every ring of every device is detached, and only then are both tables
    unmapped -- each exactly once."""
    rig = Rig(pairs=2)
    configs = running(rig, tag, rings=(0, 1, 2, 3))
    unmapped: list[int] = []
    from kvhost import memory

    real_close = memory._Mapped.close

    def spy(self: memory._Mapped) -> None:
        rig.log.calls.append(("unmap", None, self.local_addr))
        unmapped.append(self.local_addr)
        real_close(self)

    monkeypatch.setattr(memory._Mapped, "close", spy)
    rig.log.calls.clear()
    rig.log.fail[(verb, device)] = KernelError("VHOST_X", "fake", errno.EFAULT)
    with pytest.raises(KernelError):
        rig.backend.set_mem_table(table(tag, (0, 2 * MiB, VA)), list(configs.items()))
    verbs = rig.log.verbs()
    first_unmap = verbs.index("unmap")
    detached = {(c[1], c[2]) for c in rig.log.calls[:first_unmap] if c[0] == "set_backend"}
    assert detached == {(0, 0), (0, 1), (1, 0), (1, 1)}, rig.log.calls
    assert all(not d.attached for d in rig.devices)
    assert verbs.count("unmap") == 2 and len(set(unmapped)) == 2, "old and new, once each"
    assert maps_of(tag) == 0 and rig.budget.used == 0
    # nothing runs again without a table; closing unmaps nothing twice
    with pytest.raises(RemoteProtocolError, match="without a memory table"):
        rig.backend.set_backend(0, True)
    rig.close()
    assert len(unmapped) == 2


def test_when_even_the_detach_fails_memory_waits_for_the_devices_to_close(
    tag: str, fd_leak_check: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A range unmapped while the kernel may still use it could be reused by the next
    mapping (another VM's): with the detach refused too, both tables stay mapped until the
    teardown has closed the devices."""
    rig = Rig()
    configs = running(rig, tag)
    from kvhost import memory

    real_close = memory._Mapped.close

    def spy(self: memory._Mapped) -> None:
        rig.log.calls.append(("unmap", None))
        real_close(self)

    monkeypatch.setattr(memory._Mapped, "close", spy)
    rig.log.fail[("set_vring_addr", None)] = KernelError("VHOST_SET_VRING_ADDR", "f", 14)
    rig.log.fail[("set_backend", None)] = KernelError("VHOST_NET_SET_BACKEND", "f", 5)
    with pytest.raises(KernelError, match="VHOST_SET_VRING_ADDR"):
        rig.backend.set_mem_table(table(tag, (0, 2 * MiB, VA)), list(configs.items()))
    assert "unmap" not in rig.log.verbs() and maps_of(tag) == 2
    rig.close()
    verbs = rig.log.verbs()
    assert verbs.index("close") < verbs.index("unmap") and verbs.count("unmap") == 2
    assert maps_of(tag) == 0 and rig.budget.used == 0


def test_a_failed_replacement_through_the_session_fails_the_connection_cleanly(
    tag: str, fd_leak_check: None
) -> None:
    rig = Rig()
    session = Session(rig.backend, V5, name="hostile")
    rig.backend.devices.clear()  # the session's SET_OWNER opens them again
    rig.backend.tap = None
    peer = Peer(session)
    peer.negotiate()
    peer.send(R.SET_OWNER)
    peer.u64(R.SET_FEATURES, features.PROTOCOL_FEATURES | GUEST)
    send_table(peer, tag, (0, MiB, VA))
    peer.vring_state(R.SET_VRING_ENABLE, 0, 1)
    peer.configure_ring(0)
    assert rig.devices[-1].attached == {0: 900}
    rig.log.fail[("set_vring_addr", None)] = KernelError("VHOST_SET_VRING_ADDR", "f", 14)
    send_table(peer, tag, (0, 2 * MiB, VA))
    assert session.state is ConnectionState.FAILED
    assert "refused by the kernel" in (session.error or "")
    rig.closer.drain(timeout=30)
    assert not rig.devices[-1].attached and rig.devices[-1].closed
    assert rig.budget.used == 0


# --- bounds on what is mapped ------------------------------------------------------------------


def test_huge_sparse_regions_are_refused_before_mapping_naming_limit_and_option(
    tag: str, fd_leak_check: None
) -> None:
    rig = Rig(budget=MappingBudget(4 * GiB, 6 * GiB))
    huge = 1 << 46  # 64 TiB of sparse memfd: free to create
    with pytest.raises(RemoteProtocolError, match=r"limit per connection.*--max-guest-memory"):
        rig.backend.set_mem_table(table(tag, (0, huge, VA)))
    assert maps_of(tag) == 0 and rig.budget.used == 0
    # mmap_offset counts too: the region is mapped from offset 0
    fd = memfd(tag, 5 * GiB)
    with pytest.raises(RemoteProtocolError, match="--max-guest-memory"):
        rig.backend.set_mem_table([FrontendRegion(0, MiB, VA, 5 * GiB - MiB, fd)])
    # several connections together: the per-shim bound
    other = Rig(budget=rig.budget, closer=rig.closer)
    rig.backend.set_mem_table(table(tag, (0, 3 * GiB, VA)))
    with pytest.raises(RemoteProtocolError, match=r"already maps .*--max-mapped-memory"):
        other.backend.set_mem_table(table(tag, (0, 4 * GiB, VA)))
    other.backend.set_mem_table(table(tag, (0, 2 * GiB, VA)))
    assert rig.budget.used == 5 * GiB
    # the dirty log counts with the table of its connection
    log_fd = memfd(tag, 2 * GiB)
    with pytest.raises(RemoteProtocolError, match=r"SET_LOG_BASE.*--max-guest-memory"):
        rig.backend.set_log_base(0, LogRegion(2 * GiB, 0, log_fd))
    rig.close()
    other.close()
    assert maps_of(tag) == 0 and rig.budget.used == 0


def test_the_default_limits_come_from_the_host(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  8388608 kB\nMemFree: 1 kB\nSwapTotal: 2097152 kB\n")
    budget = MappingBudget.for_host(str(meminfo))
    assert (budget.per_connection, budget.total) == (10 * GiB, 20 * GiB)
    tiny = tmp_path / "tiny"
    tiny.write_text("MemTotal: 1024 kB\n")
    assert MappingBudget.for_host(str(tiny)).per_connection == GiB


@pytest.mark.parametrize("kind", ["dev-zero", "pipe", "directory"])
def test_a_memory_fd_that_is_not_a_regular_file_is_refused(
    tag: str, fd_leak_check: None, kind: str, tmp_path: Path
) -> None:
    rig = Rig()
    if kind == "dev-zero":
        fd, what = os.open("/dev/zero", os.O_RDWR | os.O_CLOEXEC), "character device"
    elif kind == "pipe":
        fd, w = os.pipe()
        os.close(w)
        what = "pipe"
    else:
        fd, what = os.open(tmp_path, os.O_RDONLY | os.O_CLOEXEC), "directory"
    with pytest.raises(RemoteProtocolError, match=f"is a {what}, not a regular file"):
        rig.backend.set_mem_table([FrontendRegion(0, MiB, VA, 0, fd)])
    assert rig.budget.used == 0 and rig.backend.table is None
    log_fd = os.open("/dev/zero", os.O_RDWR | os.O_CLOEXEC)
    with pytest.raises(RemoteProtocolError, match="log fd is not a regular file"):
        rig.backend.set_log_base(0, LogRegion(4096, 0, log_fd))
    rig.close()


# --- rings -------------------------------------------------------------------------------------


def test_addresses_then_a_larger_size_are_checked_again_for_the_size(
    tag: str, fd_leak_check: None
) -> None:
    """SET_VRING_ADDR for 256 entries near the end of the table, then SET_VRING_NUM 1024:
    the session passes the new size with the same addresses, and they no longer fit."""
    rig = Rig()
    session = Session(rig.backend, V5, name="resize")
    rig.backend.devices.clear()
    rig.backend.tap = None
    peer = Peer(session)
    peer.negotiate()
    peer.send(R.SET_OWNER)
    peer.u64(R.SET_FEATURES, features.PROTOCOL_FEATURES | GUEST)
    send_table(peer, tag, (0, MiB, VA))
    peer.vring_state(R.SET_VRING_ENABLE, 0, 1)
    peer.vring_state(R.SET_VRING_NUM, 0, 256)
    end = VA + MiB - 0x3000
    peer.send(R.SET_VRING_ADDR, p.VringAddr(0, 0, end, end + 0x2000, end + 0x1000, 0))
    peer.vring_state(R.SET_VRING_NUM, 0, 1024)
    peer.vring_file(R.SET_VRING_KICK, 0)
    assert session.state is ConnectionState.FAILED
    assert "vring 0 (size 1024)" in (session.error or "")
    assert "outside every memory region" in (session.error or "")
    rig.closer.drain(timeout=30)
    assert all(not d.attached for d in rig.devices)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        # the descriptor table runs past 2**64
        (VringConfig(256, 0, (1 << 64) - 0x1000, VA + 0x2000, VA + 0x1000), "outside every"),
        # an avail ring just below the region, wrapping into it
        (VringConfig(256, 0, VA, VA + 0x2000, VA - 2), "outside every"),
        # used ring starting inside, ending past the region
        (VringConfig(256, 0, VA, VA + MiB - 8, VA + 0x1000), "outside every"),
    ],
)
def test_wrap_around_and_straddling_ring_addresses_are_refused(
    tag: str, fd_leak_check: None, config: VringConfig, match: str
) -> None:
    rig = Rig()
    rig.backend.set_mem_table(table(tag, (0, MiB, VA)))
    rig.log.calls.clear()
    with pytest.raises(RemoteProtocolError, match=match):
        rig.backend.set_vring_addr(0, config)
    assert rig.log.calls == []
    rig.close()


def test_a_region_wrapping_the_address_space_is_refused(tag: str, fd_leak_check: None) -> None:
    rig = Rig()
    for gpa, va in (((1 << 64) - 0x1000, VA), (0, (1 << 64) - 0x1000)):
        with pytest.raises(RemoteProtocolError, match="wraps past the 64-bit address space"):
            rig.backend.set_mem_table(table(tag, (gpa, MiB, va)))
    assert rig.budget.used == 0 and maps_of(tag) == 0
    rig.close()


# --- the dirty log -------------------------------------------------------------------------


def test_log_all_before_set_log_base_is_refused(tag: str, fd_leak_check: None) -> None:
    rig = Rig()
    with pytest.raises(RemoteProtocolError, match="LOG_ALL before SET_LOG_BASE"):
        rig.backend.set_features(features.LOG_ALL | GUEST)
    assert "set_features" not in rig.log.verbs()[1:]
    rig.close()


def test_a_log_file_shorter_than_offset_plus_size_is_refused(
    tag: str, fd_leak_check: None
) -> None:
    rig = Rig()
    fd = memfd(tag, 8192)
    with pytest.raises(RemoteProtocolError, match=r"log fd has 0x2000 bytes, the log needs 0x3000"):
        rig.backend.set_log_base(0, LogRegion(4096, 8192, fd))
    assert maps_of(tag) == 0 and rig.budget.used == 0
    rig.close()


def test_a_ring_log_address_outside_guest_memory_is_refused(
    tag: str, fd_leak_check: None
) -> None:
    rig = Rig()
    rig.backend.set_mem_table(table(tag, (0, MiB, VA)))
    rig.backend.set_log_base(0, LogRegion(64, 0, memfd(tag, 64)))
    bad = ring(flags=1 << abi.VHOST_VRING_F_LOG, log_addr=MiB - 8)
    with pytest.raises(RemoteProtocolError, match=r"vring 0 .*guest address range 0xffff8"):
        rig.backend.set_vring_addr(0, bad)
    rig.close()
    assert maps_of(tag) == 0 and rig.budget.used == 0


@pytest.mark.parametrize("log_first", [True, False])
def test_a_log_too_small_for_memory_is_refused_either_order(
    tag: str, fd_leak_check: None, log_first: bool
) -> None:
    """Through the session (it owns that rule) to the real backend: nothing is mapped for
    the refused half, and the connection's mappings all go."""
    rig = Rig()
    session = Session(rig.backend, V5, name="log")
    rig.backend.devices.clear()
    rig.backend.tap = None
    peer = Peer(session)
    peer.negotiate()
    peer.send(R.SET_OWNER)
    log_fd = memfd(tag, 4096)
    small_log = (R.SET_LOG_BASE, p.LogBase(1, 0), [log_fd])  # covers 32 KiB of guest memory
    if log_first:
        peer.send(*small_log)
        send_table(peer, tag, (0, MiB, VA))
    else:
        send_table(peer, tag, (0, MiB, VA))
        peer.send(*small_log)
    assert session.state is ConnectionState.FAILED
    assert "dirty log of 1 bytes covers guest memory up to 0x8000" in (session.error or "")
    rig.closer.drain(timeout=30)
    assert maps_of(tag) == 0 and rig.budget.used == 0


# --- NET_SET_MTU -------------------------------------------------------------------------------


def test_net_set_mtu_keeps_the_tap_mtu_unless_allowed(fd_leak_check: None) -> None:
    rig = Rig()
    rig.backend.set_mtu(1500)  # the MTU the tap has: fine
    with pytest.raises(Exception, match=r"has MTU 1500.*--allow-mtu-change"):
        rig.backend.set_mtu(1280)
    assert rig.tap.mtu == 1500
    rig.close()
    allowed = Rig(allow_mtu_change=True)
    allowed.backend.set_mtu(1280)
    assert allowed.tap.mtu == 1280
    allowed.close()


# --- many hostile connections --------------------------------------------------------------


def _hostile(rig: Rig, tag: str, n: int) -> None:
    """One of the ways a connection can go wrong around memory; raises whatever it raises."""
    b = rig.backend
    case = n % 8
    if case == 0:  # accepted, then a ring that no longer fits the next table
        configs = running(rig, tag)
        b.set_mem_table(table(tag, (0, 16 * 1024, VA)), list(configs.items()))
    elif case == 1:  # refused by the kernel after the swap
        configs = running(rig, tag)
        rig.log.fail[("set_vring_addr", None)] = KernelError("VHOST_SET_VRING_ADDR", "f", 14)
        b.set_mem_table(table(tag, (0, 2 * MiB, VA)), list(configs.items()))
    elif case == 2:  # the device refuses the new table
        running(rig, tag)
        rig.log.fail[("set_mem_table", None)] = KernelError("VHOST_SET_MEM_TABLE", "f", 12)
        b.set_mem_table(table(tag, (0, 2 * MiB, VA)))
    elif case == 3:  # huge sparse
        b.set_mem_table(table(tag, (0, 1 << 45, VA)))
    elif case == 4:  # overlapping regions
        b.set_mem_table(table(tag, (0, MiB, VA), (MiB // 2, MiB, VA + 4 * MiB)))
    elif case == 5:  # the log replaced, then refused by the kernel
        running(rig, tag)
        b.set_log_base(0, LogRegion(64, 0, memfd(tag, 64)))
        rig.log.fail[("set_log_base", None)] = KernelError("VHOST_SET_LOG_BASE", "f", 14)
        b.set_log_base(0, LogRegion(64, 0, memfd(tag, 64)))
    elif case == 6:  # three tables in a row, then a hang-up with rings attached
        running(rig, tag)
        b.set_mem_table(table(tag, (0, 2 * MiB, VA)), [(0, ring())])
        b.set_mem_table(table(tag, (0, 3 * MiB, VA)), [(0, ring())])
    else:  # a file too short for its region
        fd = memfd(tag, 4096)
        b.set_mem_table([FrontendRegion(0, MiB, VA, 0, fd)])


def test_a_thousand_hostile_connections_leave_no_mapping_and_no_fd(
    tag: str, fd_leak_check: None
) -> None:
    budget = MappingBudget(4 * GiB, 8 * GiB)
    closer = Closer()
    before = len(Path("/proc/self/maps").read_text().splitlines())
    outcomes: dict[str, int] = {}
    for n in range(1000):
        rig = Rig(budget=budget, closer=closer)
        try:
            _hostile(rig, tag, n)
            outcome = "accepted"
        except (RemoteProtocolError, KernelError) as err:
            outcome = type(err).__name__
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        # what the session does with a failed connection: detach, then close
        for index in range(2):
            rig.backend.set_backend(index, False)
        rig.backend.close()
    closer.drain(timeout=60)
    after = len(Path("/proc/self/maps").read_text().splitlines())
    assert maps_of(tag) == 0
    assert after <= before + 2, f"/proc/self/maps grew from {before} to {after} lines"
    assert budget.used == 0
    assert outcomes == {"accepted": 125, "RemoteProtocolError": 500, "KernelError": 375}



# --- MemoryError -------------------------------------------------------------------------------


def test_memory_error_costs_one_connection_not_the_serve_loop(
    tmp_path: Path, fd_leak_check: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever runs out of address space (a recvmsg buffer, a session's allocation) fails
    the connection it happened on; the loop keeps serving the others."""
    from test_session import _call, _ServerHarness

    from shim import server

    harness = _ServerHarness(f"{tmp_path}/shim.sock")
    try:
        good, gcodec = harness.connect()
        bad, _ = harness.connect()
        bad_fd = harness.server.connections and max(harness.server.connections)
        real_recv = server._recv

        def recv(sock: Any) -> tuple[bytes, list[int], bool]:
            if sock.fileno() == bad_fd:
                raise MemoryError
            return real_recv(sock)

        monkeypatch.setattr(server, "_recv", recv)
        bad.sendall(p.raw_message(R.GET_FEATURES, 0x1, b""))
        bad.settimeout(5)
        try:
            data = bad.recv(64)
        except ConnectionResetError:  # dropped with the request unread
            data = b""
        assert data == b"", "the connection that hit MemoryError is dropped"
        (reply,) = _call(good, gcodec, R.GET_QUEUE_NUM)
        assert reply.payload == p.U64(1)
        assert harness.thread.is_alive()
        good.close()
        bad.close()
    finally:
        harness.stop()
