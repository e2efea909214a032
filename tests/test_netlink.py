"""Host tier: harness.netlink's namespace handling, on the host's own kernel (bridges need
neither /dev/vhost-net nor /dev/net/tun), in a namespace the test process is not in."""

from __future__ import annotations

import os

import pytest

from harness import netlink
from harness import netns as testns
from kvhost.errors import UsageError


def _own_netns() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def test_link_verbs_act_in_the_named_namespace_and_come_back(
    other_netns: str, fd_leak_check: None
) -> None:
    home = _own_netns()
    index = netlink.create_bridge("kvnlbr0", other_netns)
    assert _own_netns() == home
    with pytest.raises(UsageError, match="no network interface named 'kvnlbr0'"):
        netlink.link_index("kvnlbr0")  # not here: only in other_netns
    assert netlink.link_index("kvnlbr0", other_netns) == index
    netlink.set_mac("kvnlbr0", "02:00:00:00:00:07", other_netns)
    info = netlink.link_info("kvnlbr0", other_netns)
    assert (info["index"], info["up"], info["address"]) == (index, True, "02:00:00:00:00:07")
    listed = testns.run(
        ["ip", "-n", other_netns, "-o", "link", "show", "kvnlbr0"], "ip link"
    ).stdout
    assert "02:00:00:00:00:07" in listed
    netlink.delete_link("kvnlbr0", other_netns)
    with pytest.raises(UsageError, match=f"'kvnlbr0' in network namespace '{other_netns}'"):
        netlink.link_index("kvnlbr0", other_netns)
    assert _own_netns() == home


def test_a_missing_namespace_is_a_usage_error_saying_how_to_make_it() -> None:
    home = _own_netns()
    with pytest.raises(UsageError, match="'kvnl-none' does not exist: create it with 'ip netns"):
        netlink.link_info("lo", "kvnl-none")
    assert _own_netns() == home
