"""Kernel tier: taps through the real /dev/net/tun, each test in a fresh network namespace."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable

import pytest

from harness import netlink
from kvhost import abi
from kvhost import netns as kvnetns
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


def test_a_closed_tap_is_a_usage_error(netns: str, fd_leak_check: None) -> None:
    tap = Tap.create("kvshut0")
    tap.close()
    with pytest.raises(UsageError, match="tap kvshut0 is closed"):
        tap.fileno()
    with pytest.raises(UsageError, match="tap kvshut0 is closed"):
        tap.get_vnet_hdr_size()


def test_link_settings_in_another_namespace_enter_it_once_per_call(
    netns: str, other_netns: str, fd_leak_check: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    entered: list[str | None] = []
    real_inside = kvnetns.inside

    def counting_inside(name: str | None) -> contextlib.AbstractContextManager[None]:
        entered.append(name)
        return real_inside(name)

    def once(call: Callable[[], object]) -> object:
        entered.clear()
        result = call()
        assert entered == [other_netns], call
        return result

    with Tap.create("kvfar0", netns=other_netns) as tap:
        netlink.create_bridge("kvfarbr0", other_netns)
        monkeypatch.setattr(kvnetns, "inside", counting_inside)
        once(tap.set_up)
        once(lambda: tap.set_mtu(1400))
        assert once(tap.get_mtu) == 1400
        once(lambda: tap.attach_bridge("kvfarbr0"))
        assert once(tap.owner_and_group) == (None, None)
        index = once(lambda: tap.index)
        with pytest.raises(UsageError, match=f"'kvfarbr1' in network namespace '{other_netns}'"):
            once(lambda: tap.attach_bridge("kvfarbr1"))
        with pytest.raises(UsageError, match=f"'kvnope' in network namespace '{other_netns}'"):
            once(lambda: Tap.open("kvnope", netns=other_netns))
        monkeypatch.undo()
        info = netlink.link_info("kvfar0", other_netns)
        assert (info["index"], info["up"], info["mtu"]) == (index, True, 1400)
        assert info["master"] == netlink.link_index("kvfarbr0", other_netns)
        with pytest.raises(UsageError):  # it is there, not here
            netlink.link_index("kvfar0")


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
