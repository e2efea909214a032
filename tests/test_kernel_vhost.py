"""Kernel tier: every VhostNet ioctl against the real /dev/vhost-net, in QEMU's order, and
the KernelError each misuse earns."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import ExitStack

import pytest

from kvhost import features
from kvhost.errors import KernelError
from kvhost.ioctl import read_max_mem_regions
from kvhost.memory import GuestMemory, MemoryRegion
from kvhost.tap import Tap
from kvhost.vhost import RX, TX, VhostNet, VringConfig
from kvhost.virtqueue import SplitRing

pytestmark = pytest.mark.kernel

RING = 256


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory.create([(0, 1 << 20), (0x100000, 1 << 20)]) as mem:
        yield mem


def _setup_rings(dev: VhostNet, mem: GuestMemory, stack: ExitStack) -> list[SplitRing]:
    """SET_VRING_NUM, _BASE, _ADDR, _KICK, _CALL, _ERR per ring, as QEMU does at DRIVER_OK."""
    rings = []
    for i in (RX, TX):
        ring = SplitRing(mem, i, RING, 0x8000 * i)
        dev.set_vring_num(i, RING)
        dev.set_vring_base(i, 0)
        dev.set_vring_addr(
            i,
            VringConfig(
                RING,
                0,
                mem.hva(ring.desc_gpa),
                mem.hva(ring.used_gpa),
                mem.hva(ring.avail_gpa),
                log_addr=ring.used_gpa,
            ),
        )
        for setter in (dev.set_vring_kick, dev.set_vring_call, dev.set_vring_err):
            efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            stack.callback(os.close, efd)
            setter(i, efd)
        rings.append(ring)
    return rings


def test_every_ioctl_in_qemu_order(netns: str, memory: GuestMemory, fd_leak_check: None) -> None:
    with ExitStack() as stack:
        tap = stack.enter_context(Tap.create("kvq0", vnet_hdr=True))
        tap.set_vnet_hdr_size(12)
        dev = stack.enter_context(VhostNet())
        offered = dev.get_features()
        assert offered & features.bit("VERSION_1")
        fork = dev.get_fork_from_owner()
        if fork is not None:  # 6.17+ and backports: must be set before SET_OWNER
            dev.set_fork_from_owner(fork)
        dev.set_owner()
        backend = dev.get_backend_features()
        dev.set_backend_features(backend)
        dev.set_features(offered & features.mask(["MRG_RXBUF", "VERSION_1", "EVENT_IDX"]))
        dev.set_mem_table(memory.regions)
        _setup_rings(dev, memory, stack)
        dev.set_busyloop_timeout(TX, 50)
        assert dev.get_busyloop_timeout(TX) == 50
        dev.set_busyloop_timeout(TX, 0)
        for i in (RX, TX):
            dev.set_backend(i, tap.fileno())
        # stop, as QEMU does: detach, then read where each ring stopped
        for i in (RX, TX):
            dev.set_backend(i, -1)
            assert dev.get_vring_base(i) == 0
        # a migrated ring position survives a stop
        dev.set_vring_base(TX, 4711)
        assert dev.get_vring_base(TX) == 4711
        # dirty log: base and eventfd (the log must cover guest memory to be enabled)
        log = stack.enter_context(GuestMemory.create([(0x10000000, 0x1000)]))
        dev.set_log_base(log.hva(0x10000000))
        logfd = os.eventfd(0, os.EFD_CLOEXEC)
        stack.callback(os.close, logfd)
        dev.set_log_fd(logfd)
        dev.set_log_fd(-1)
        dev.reset_owner()
        dev.set_owner()  # ownership can be taken again after a reset


def test_mem_table_before_owner_is_eperm(memory: GuestMemory) -> None:
    with VhostNet() as dev, pytest.raises(KernelError) as info:
        dev.set_mem_table(memory.regions)
    assert (info.value.op, info.value.errno) == ("VHOST_SET_MEM_TABLE", errno.EPERM)
    assert info.value.device == "/dev/vhost-net"
    assert "VHOST_SET_OWNER" in str(info.value)


@pytest.mark.parametrize("num", [0, 3, 1000, 65536])
def test_ring_size_not_power_of_two_is_einval(num: int) -> None:
    with VhostNet() as dev:
        dev.set_owner()
        with pytest.raises(KernelError) as info:
            dev.set_vring_num(RX, num)
    assert (info.value.op, info.value.errno) == ("VHOST_SET_VRING_NUM", errno.EINVAL)
    assert "power of two" in str(info.value)


def test_ring_index_out_of_range_is_enobufs() -> None:
    with VhostNet() as dev:
        dev.set_owner()
        with pytest.raises(KernelError) as info:
            dev.set_vring_num(2, 256)
    assert info.value.errno == errno.ENOBUFS


def test_second_owner_is_ebusy() -> None:
    with VhostNet() as dev:
        dev.set_owner()
        with pytest.raises(KernelError) as info:
            dev.set_owner()
    assert (info.value.op, info.value.errno) == ("VHOST_SET_OWNER", errno.EBUSY)


def test_unoffered_feature_is_eopnotsupp() -> None:
    with VhostNet() as dev:
        offered = dev.get_features()
        missing = next(b for b in range(64) if not offered >> b & 1)
        with pytest.raises(KernelError) as info:
            dev.set_features(1 << missing)
    assert (info.value.op, info.value.errno) == ("VHOST_SET_FEATURES", errno.EOPNOTSUPP)


def test_misaligned_avail_ring_is_einval(memory: GuestMemory) -> None:
    with VhostNet() as dev:
        dev.set_owner()
        dev.set_mem_table(memory.regions)
        dev.set_vring_num(TX, RING)
        with pytest.raises(KernelError) as info:
            dev.set_vring_addr(
                TX, VringConfig(RING, 0, memory.hva(0), memory.hva(0x2000), memory.hva(0x1001))
            )
    assert (info.value.op, info.value.errno) == ("VHOST_SET_VRING_ADDR", errno.EINVAL)


def test_too_many_memory_regions_is_e2big() -> None:
    limit = read_max_mem_regions()
    regions = [MemoryRegion(i * 0x1000, 0x1000, 0x10000000 + i * 0x1000) for i in range(limit + 1)]
    with VhostNet() as dev:
        dev.set_owner()
        with pytest.raises(KernelError) as info:
            dev.set_mem_table(regions)
    assert (info.value.op, info.value.errno) == ("VHOST_SET_MEM_TABLE", errno.E2BIG)
    assert f"at most {limit}" in str(info.value)


@pytest.mark.parametrize("kind", ["/dev/null", "pipe"])
def test_non_tap_backend_is_enotsock(kind: str, memory: GuestMemory, fd_leak_check: None) -> None:
    with ExitStack() as stack:
        dev = stack.enter_context(VhostNet())
        dev.set_owner()
        dev.set_features(dev.get_features() & features.mask(["MRG_RXBUF", "VERSION_1"]))
        dev.set_mem_table(memory.regions)
        _setup_rings(dev, memory, stack)
        if kind == "pipe":
            r, w = os.pipe()
            stack.callback(os.close, r)
            stack.callback(os.close, w)
            fd = r
        else:
            fd = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
            stack.callback(os.close, fd)
        with pytest.raises(KernelError) as info:
            dev.set_backend(TX, fd)
    assert (info.value.op, info.value.errno) == ("VHOST_NET_SET_BACKEND", errno.ENOTSOCK)
    assert "not a tap" in str(info.value)


def test_features_array_absent_or_consistent() -> None:
    with VhostNet() as dev:
        wide = dev.get_features_array()
        plain = dev.get_features()
        dev.set_owner()
        # after SET_OWNER an absent FEATURES_ARRAY reaches the ring ioctl path instead
        assert (dev.get_features_array() is None) == (wide is None)
    if wide is None:
        assert dev.features_array is False
    else:
        assert wide & (1 << 64) - 1 == plain & (1 << 64) - 1


def test_use_after_close_is_refused(fd_leak_check: None) -> None:
    dev = VhostNet()
    dev.close()
    dev.close()
    with pytest.raises(ValueError, match="closed"):
        dev.get_features()
