"""Kernel tier: taps through the real /dev/net/tun, each test in a fresh network namespace."""

from __future__ import annotations

import errno
import os

import pytest

from kvhost import abi, netlink
from kvhost.errors import KernelError, UsageError
from kvhost.features import TAP_OFFLOAD_BITS
from kvhost.tap import Tap, probe_offloads

pytestmark = pytest.mark.kernel


def test_single_queue_tap(netns: str, fd_leak_check: None) -> None:
    with Tap.create(vnet_hdr=True) as tap:
        assert tap.name.startswith("tap")
        assert len(tap.fds) == 1 and tap.fileno() == tap.fds[0]
        name, flags = tap.get_iff()
        assert name == tap.name
        assert flags & (abi.IFF_TAP | abi.IFF_NO_PI | abi.IFF_VNET_HDR) == (
            abi.IFF_TAP | abi.IFF_NO_PI | abi.IFF_VNET_HDR
        )
        assert not flags & abi.IFF_MULTI_QUEUE
        assert tap.features() & abi.IFF_VNET_HDR
        assert tap.get_vnet_hdr_size() == abi.VNET_HDR_LEN
        tap.set_vnet_hdr_size(12)
        assert tap.get_vnet_hdr_size() == 12
        with pytest.raises(KernelError) as info:
            tap.set_vnet_hdr_size(8)
        assert (info.value.op, info.value.errno) == ("TUNSETVNETHDRSZ", errno.EINVAL)
        tap.set_sndbuf(0x7FFFFFFF)
        assert tap.index == netlink.link_index(tap.name)
    with pytest.raises(UsageError):  # gone with its last fd
        netlink.link_index(tap.name)


def test_multi_queue_tap_has_one_fd_per_queue(netns: str, fd_leak_check: None) -> None:
    with Tap.create("kvmq0", queues=4) as tap:
        assert len(set(tap.fds)) == 4
        # every fd is an attached queue of the same multi-queue interface
        for q in range(4):
            name, flags = tap.get_iff(q)
            assert name == "kvmq0"
            assert flags & (abi.IFF_MULTI_QUEUE | abi.IFF_VNET_HDR) == (
                abi.IFF_MULTI_QUEUE | abi.IFF_VNET_HDR
            )
        # another process (here: another Tap) can attach a fifth queue by name
        with Tap.open("kvmq0", multi_queue=True) as extra:
            assert len(extra.fds) == 1
            assert extra.get_iff()[0] == "kvmq0"
        # a single-queue attach to a multi-queue tap is refused by the kernel
        with pytest.raises(KernelError) as info:
            Tap.open("kvmq0")
        assert info.value.op == "TUNSETIFF"
    with pytest.raises(UsageError, match="from 1 to 256"):
        Tap.create(queues=257)


def test_open_missing_tap_is_a_usage_error(netns: str) -> None:
    with pytest.raises(UsageError, match="no network interface named 'kvnope'"):
        Tap.open("kvnope")


def test_link_settings(netns: str, fd_leak_check: None) -> None:
    with Tap.create("kvlink0") as tap:
        tap.set_mtu(9000)
        tap.set_mac("02:00:00:00:00:01")
        tap.set_up()
        netlink.create_bridge("kvbr0")
        tap.attach_bridge("kvbr0")
        info = netlink.link_info("kvlink0")
        assert info["mtu"] == 9000
        assert info["up"]
        assert info["address"] == "02:00:00:00:00:01"
        assert info["master"] == netlink.link_index("kvbr0")
        with pytest.raises(UsageError, match="'kvnobr'"):
            tap.attach_bridge("kvnobr")
        with pytest.raises(KernelError) as err:
            tap.set_mtu(1 << 20)
        assert err.value.errno == errno.EINVAL
        netlink.delete_link("kvbr0")


def test_probe_offloads_agrees_with_the_kernel(netns: str, fd_leak_check: None) -> None:
    with Tap.create("kvoff0") as tap:
        accepted = probe_offloads(tap)
        assert "CSUM" in accepted
        assert tap.get_vnet_hdr_size() == abi.VNET_HDR_LEN  # restored
        tso = abi.TUN_F_CSUM | abi.TUN_F_TSO4
        for name, (flags, _) in TAP_OFFLOAD_BITS.items():
            trial = abi.TUN_F_CSUM | flags
            if name == "TSO_ECN":
                trial |= abi.TUN_F_TSO4
            if name.startswith("UDP_TUNNEL"):
                trial |= tso | abi.TUN_F_UDP_TUNNEL_GSO
                tap.set_vnet_hdr_size(abi.VNET_HDR_TUNNEL_LEN)
            try:
                tap.set_offload(trial)
                ok = True
            except KernelError as exc:
                assert exc.errno == errno.EINVAL
                ok = False
            assert ok == (name in accepted), name
    release = os.uname().release
    if release.startswith("6.1."):
        # reference section 8, measured on Debian's 6.1: no USO (6.2+), no UDP tunnel (6.17+)
        assert accepted == ("CSUM", "TSO4", "TSO6", "TSO_ECN", "UFO")
