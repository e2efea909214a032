"""Link inspection and set-up over rtnetlink for the tests, the only module that talks to
pyroute2. Shipped code never imports it: kvhost configures links one way, with the SIOC
ioctls of :mod:`kvhost.tap`.

Small verbs on a network interface -- look up, read, bring up, set the MAC, create a bridge,
delete -- optionally inside a named network namespace, each raising
:class:`~kvhost.errors.KernelError` (op ``RTM_*``, device the interface name) when the kernel
refuses, and :class:`~kvhost.errors.UsageError` when a named interface or namespace does not
exist. pyroute2 is imported on first use so ``kvhost probe`` does not pay for it. The
namespace is entered with :func:`kvhost.netns.inside`, kvhost's one setns path, not with
pyroute2's own namespace switching: the socket opened in the body belongs to that namespace.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator
from typing import Any

from kvhost.errors import KernelError, UsageError
from kvhost.ioctl import kernel_error
from kvhost.netns import inside

_HINTS: dict[int, str] = {
    errno.EPERM: "changing links needs CAP_NET_ADMIN in the interface's network namespace",
    errno.EINVAL: "the kernel rejected the value (e.g. a MAC address the device cannot take)",
    errno.EBUSY: "the interface is busy",
    errno.ENODEV: "the interface disappeared",
}


def _kernel_error(op: str, device: str, exc: Exception) -> KernelError:
    code = int(getattr(exc, "code", 0) or errno.EIO)
    return kernel_error(op, device, code, _HINTS.get(code, ""))


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


def link_index(name: str, netns: str | None = None) -> int:
    """The ifindex of ``name``; UsageError if there is no such interface."""
    with inside(netns), _ipr("RTM_GETLINK", name) as ipr:
        found = ipr.link_lookup(ifname=name)
    if not found:
        where = f" in network namespace {netns!r}" if netns else ""
        raise UsageError(f"no network interface named {name!r}{where}")
    return int(found[0])


def _link_set(name: str, netns: str | None, **attrs: Any) -> None:
    with inside(netns):
        index = link_index(name)
        with _ipr("RTM_NEWLINK", name) as ipr:
            ipr.link("set", index=index, **attrs)


def set_up(name: str, netns: str | None = None) -> None:
    """Bring the interface up."""
    _link_set(name, netns, state="up")


def set_mac(name: str, mac: str, netns: str | None = None) -> None:
    """Set the interface's MAC address (``aa:bb:cc:dd:ee:ff``)."""
    _link_set(name, netns, address=mac)


def create_bridge(name: str, netns: str | None = None) -> int:
    """Create bridge ``name`` (up) and return its ifindex."""
    with inside(netns):
        with _ipr("RTM_NEWLINK", name) as ipr:
            ipr.link("add", ifname=name, kind="bridge")
        set_up(name)
        return link_index(name)


def delete_link(name: str, netns: str | None = None) -> None:
    """Delete the interface."""
    with inside(netns):
        index = link_index(name)
        with _ipr("RTM_DELLINK", name) as ipr:
            ipr.link("del", index=index)


def link_info(name: str, netns: str | None = None) -> dict[str, Any]:
    """A few attributes of the link: ``index``, ``mtu``, ``address``, ``up``, ``master``,
    ``rx_packets``, ``tx_packets``."""
    with inside(netns):
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
