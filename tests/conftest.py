"""Test tiers.

* Host tier (no marker): pure logic, bytes in and out; runs anywhere.
* Kernel tier (``@pytest.mark.kernel``): needs a real kernel with ``/dev/vhost-net`` and
  ``/dev/net/tun``. ``./run-tests`` runs it directly on such a host, otherwise inside the test
  VM (``python -m harness.testvm``). Such a test never skips: run without the device it fails,
  saying how to run it, so a CI that lost its kernel tier goes red.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import netns as testns


def pytest_report_header() -> list[str]:
    # Which interpreter a tier really ran (the checkout's .venv, not the system one), in the
    # log of every tier, inside the test VM too.
    where = os.environ.get("KVHOST_IN_TESTVM")
    kernel = f"test VM, Linux {where}" if where else f"host, Linux {os.uname().release}"
    return [f"kvhost tier on {kernel}: sys.executable={sys.executable} sys.prefix={sys.prefix}"]


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture(autouse=True)
def _kernel_tier_guard(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("kernel") is None:
        return
    if not Path("/dev/vhost-net").exists():
        pytest.fail(
            "kernel-tier test run on a kernel without /dev/vhost-net: run it through "
            "./run-tests (it boots the test VM) or on a host with vhost_net loaded",
            pytrace=False,
        )


@pytest.fixture
def fd_leak_check() -> Iterator[None]:
    """Fails the test if it leaves file descriptors open."""
    before = _open_fds()
    yield
    closer = sys.modules.get("shim.closer")
    if closer is not None:  # the shim closes dropped connections' devices on a thread
        closer.CLOSER.drain(timeout=60)
    after = _open_fds()
    leaked = {fd: _readlink(fd) for fd in after - before}
    leaked = {fd: target for fd, target in leaked.items() if target is not None}
    assert not leaked, f"file descriptors leaked: {leaked}"


def _readlink(fd: str) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None  # closed in the meantime: the fd listing's own handle


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh network namespace the test runs in, removed afterwards.

    The whole test process enters it (pytest is single-threaded), so taps, AF_PACKET
    sockets, netlink calls and child processes (QEMU, the shim) all land there and no
    traffic can reach any other namespace. ``ip netns add`` creates it: pyroute2's own
    creation forks a helper process, which under TCG took up to 40 s and sometimes timed out.
    """
    with testns.fresh("kvtest", ipv6=True) as name:
        yield name


@pytest.fixture
def netns_quiet() -> Iterator[str]:
    """As :func:`netns`, with IPv6 off in the namespace: no router or neighbour
    solicitations from the host side of new taps land in RX rings between a test's frames."""
    with testns.fresh("kvtest", ipv6=False) as name:
        yield name


@pytest.fixture
def other_netns() -> Iterator[str]:
    """A network namespace the test process is not in, removed afterwards: for code that
    must act in a namespace it was given, not the one it runs in."""
    with testns.created("kvother") as name:
        yield name
