"""Link configuration over rtnetlink, the only module that talks to pyroute2.

Small verbs on a network interface -- up, MTU, MAC, bridge attach, move to or work inside a
named network namespace -- each raising :class:`~kvhost.errors.KernelError` (op ``RTM_*``,
device the interface name) when the kernel refuses, and
:class:`~kvhost.errors.UsageError` when a named interface, bridge or namespace does not
exist. pyroute2 is imported on first use so ``kvhost probe`` does not pay for it.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator
from typing import Any

from kvhost.errors import KernelError, UsageError

_HINTS: dict[int, str] = {
    errno.EPERM: "changing links needs CAP_NET_ADMIN in the interface's network namespace",
    errno.EINVAL: "the kernel rejected the value (e.g. MTU outside the device's range)",
    errno.EBUSY: "the interface is busy (e.g. already enslaved to another master)",
    errno.ENODEV: "the interface disappeared",
}


def _kernel_error(op: str, device: str, exc: Exception) -> KernelError:
    code = int(getattr(exc, "code", 0) or errno.EIO)
    return KernelError(op, device, code, _HINTS.get(code, ""))


@contextlib.contextmanager
def _ipr(op: str = "RTM_GETLINK", device: str = "") -> Iterator[Any]:
    """An rtnetlink socket; kernel refusals inside the body become KernelError(op, device)."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with IPRoute() as ipr:
            yield ipr
    except NetlinkError as exc:
        raise _kernel_error(op, device, exc) from exc


@contextlib.contextmanager
def in_netns(name: str | None) -> Iterator[None]:
    """Run the body inside network namespace ``name`` (``/run/netns/NAME``); None: stay.

    Everything the calling thread creates there (tap fds, sockets) keeps that namespace.
    Raises UsageError when the namespace does not exist.
    """
    if name is None:
        yield
        return
    from pyroute2 import netns as pr_netns

    if name not in pr_netns.listnetns():
        raise UsageError(
            f"network namespace {name!r} does not exist: create it with 'ip netns add {name}'"
        )
    pr_netns.pushns(name)
    try:
        yield
    finally:
        pr_netns.popns()


def link_index(name: str, netns: str | None = None) -> int:
    """The ifindex of ``name``; UsageError if there is no such interface."""
    with in_netns(netns), _ipr("RTM_GETLINK", name) as ipr:
        found = ipr.link_lookup(ifname=name)
    if not found:
        where = f" in network namespace {netns!r}" if netns else ""
        raise UsageError(f"no network interface named {name!r}{where}")
    return int(found[0])


def _link_set(name: str, netns: str | None, **attrs: Any) -> None:
    with in_netns(netns):
        index = link_index(name)
        with _ipr("RTM_NEWLINK", name) as ipr:
            ipr.link("set", index=index, **attrs)


def set_up(name: str, netns: str | None = None) -> None:
    """Bring the interface up."""
    _link_set(name, netns, state="up")


def set_down(name: str, netns: str | None = None) -> None:
    """Bring the interface down."""
    _link_set(name, netns, state="down")


def set_mtu(name: str, mtu: int, netns: str | None = None) -> None:
    """Set the MTU (68 .. the device maximum; KernelError EINVAL outside)."""
    if mtu <= 0:
        raise UsageError(f"MTU {mtu} must be a positive number of bytes")
    _link_set(name, netns, mtu=mtu)


def set_mac(name: str, mac: str, netns: str | None = None) -> None:
    """Set the interface's MAC address (``aa:bb:cc:dd:ee:ff``)."""
    _link_set(name, netns, address=mac)


def attach_bridge(name: str, bridge: str, netns: str | None = None) -> None:
    """Enslave ``name`` to the existing bridge ``bridge`` (UsageError if it is missing)."""
    with in_netns(netns):
        master = link_index(bridge)
        _link_set(name, None, master=master)


def create_bridge(name: str, netns: str | None = None) -> int:
    """Create bridge ``name`` (up) and return its ifindex."""
    with in_netns(netns):
        with _ipr("RTM_NEWLINK", name) as ipr:
            ipr.link("add", ifname=name, kind="bridge")
        set_up(name)
        return link_index(name)


def delete_link(name: str, netns: str | None = None) -> None:
    """Delete the interface."""
    with in_netns(netns):
        index = link_index(name)
        with _ipr("RTM_DELLINK", name) as ipr:
            ipr.link("del", index=index)


def move_to_netns(name: str, target: str, netns: str | None = None) -> None:
    """Move the interface into network namespace ``target`` (its fds keep working)."""
    from pyroute2 import netns as pr_netns

    if target not in pr_netns.listnetns():
        raise UsageError(
            f"network namespace {target!r} does not exist: create it with 'ip netns add {target}'"
        )
    _link_set(name, netns, net_ns_fd=target)


def link_info(name: str, netns: str | None = None) -> dict[str, Any]:
    """A few attributes of the link: ``index``, ``mtu``, ``address``, ``up``, ``master``,
    ``rx_packets``, ``tx_packets``."""
    with in_netns(netns):
        index = link_index(name)
        with _ipr("RTM_GETLINK", name) as ipr:
            msg = ipr.get_links(index)[0]
    stats = msg.get_attr("IFLA_STATS64") or {}
    return {
        "index": index,
        "mtu": msg.get_attr("IFLA_MTU"),
        "address": msg.get_attr("IFLA_ADDRESS"),
        "up": bool(msg["flags"] & 1),
        "master": msg.get_attr("IFLA_MASTER"),
        "rx_packets": stats.get("rx_packets"),
        "tx_packets": stats.get("tx_packets"),
    }
