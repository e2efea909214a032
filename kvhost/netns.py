"""Network namespaces: entering one, for good or for the body of a ``with``.

Deliberately free of pyroute2 (the harness's netlink): inside a TCG test VM importing it costs a
minute or more, and the shim enters its ``--netns`` at every start. Namespaces made with
``ip netns add`` are entered with setns(2) through ctypes: :func:`enter` (for good)
and :func:`inside` (for a ``with`` body) are the only places kvhost's own code calls setns --
the shim's ``--netns``, :mod:`kvhost.tap`, :mod:`harness.netlink` (instead of pyroute2's own
namespace switching) and the tests go through them. Throw-away namespaces and taps for tests
are the harness's (:mod:`harness.netns`).

setns moves only the calling thread, so a process must be single-threaded while it is inside
a namespace it expects its children (QEMU, the shim) to inherit.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator

from kvhost import abi
from kvhost.errors import UsageError
from kvhost.ioctl import kernel_error

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
