"""The one place kvhost issues ioctls and opens device nodes.

``ioctl()`` turns every errno into a :class:`~kvhost.errors.KernelError` that names the
request, the device and what the failure most likely means for the user. The hint table is
data: a per-request entry wins over the generic per-errno entry. :func:`kernel_error` is the
same mapping for every other syscall (socket, write, setns, rtnetlink, prctl...): kvhost
builds a KernelError from an errno nowhere else.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path
from typing import Any

from kvhost.abi import Ioctl
from kvhost.errors import DeviceUnavailable, KernelError

MAX_MEM_REGIONS_PATH = Path("/sys/module/vhost/parameters/max_mem_regions")


def read_max_mem_regions(default: int = 64) -> int:
    """The vhost module's ``max_mem_regions`` parameter, or ``default`` if unreadable."""
    try:
        return int(MAX_MEM_REGIONS_PATH.read_text().strip())
    except (OSError, ValueError):
        return default


def kernel_error(
    op: str,
    device: str,
    err: OSError | int,
    hint: str = "",
    *,
    kind: type[KernelError] = KernelError,
) -> KernelError:
    """The :class:`KernelError` (or ``kind``, e.g. DeviceUnavailable) for ``op`` on
    ``device`` failing with ``err`` (an OSError or an errno; an OSError without one counts
    as EIO). ``hint`` says what it means for the user. Raise it ``from`` the OSError."""
    code = (err.errno or errno.EIO) if isinstance(err, OSError) else err
    return kind(op, device, code, hint)


def _hint(req: Ioctl, err: int) -> str:
    specific = _REQUEST_HINTS.get((req.name, err))
    if specific is not None:
        return str(specific() if callable(specific) else specific)
    if err == errno.ENOTTY:
        return f"this kernel has no {req.name} (added in Linux {req.since})"
    generic = _ERRNO_HINTS.get(err)
    return generic or ""


def _e2big_mem_table() -> str:
    return (
        f"too many memory regions: this kernel accepts at most {read_max_mem_regions()} "
        f"({MAX_MEM_REGIONS_PATH}); raise it with 'modprobe vhost max_mem_regions=N' "
        "or use fewer, larger regions"
    )


_ERRNO_HINTS: dict[int, str] = {
    errno.EBUSY: "the device is busy (owner already set, or a backend is attached to the ring)",
    errno.EFAULT: "the kernel could not access an address passed in (unmapped or outside "
    "the memory table)",
    errno.EPERM: "the calling process is not the device's owner (VHOST_SET_OWNER in another "
    "process) or lacks privileges",
    errno.EINVAL: "the kernel rejected an argument value",
    errno.EOPNOTSUPP: "the kernel does not support a flag or feature bit passed in",
    errno.ENOTSOCK: "the fd is not a tap, macvtap or packet socket",
    errno.EBADF: "the fd passed in is not open",
    errno.ENOBUFS: "the ring index is out of range",
}

_REQUEST_HINTS: dict[tuple[str, int], Any] = {
    ("VHOST_SET_MEM_TABLE", errno.E2BIG): _e2big_mem_table,
    ("VHOST_SET_MEM_TABLE", errno.EPERM): "set the owner first (VHOST_SET_OWNER)",
    ("VHOST_SET_VRING_NUM", errno.EINVAL): "the ring size must be a power of two from 1 to 32768",
    ("VHOST_SET_VRING_NUM", errno.EBUSY): "detach the backend from the ring before resizing it",
    ("VHOST_SET_FEATURES", errno.EOPNOTSUPP): "a feature bit this kernel does not offer was "
    "requested",
    ("VHOST_SET_FEATURES", errno.EFAULT): "VHOST_F_LOG_ALL needs a valid log base and vring "
    "log addresses first",
    ("VHOST_SET_OWNER", errno.EBUSY): "the device already has an owner",
    ("VHOST_SET_FORK_FROM_OWNER", errno.EBUSY): "must be set before VHOST_SET_OWNER",
    ("VHOST_NET_SET_BACKEND", errno.ENOTSOCK): "the backend fd is not a tap, macvtap or "
    "AF_PACKET socket",
    ("VHOST_NET_SET_BACKEND", errno.EFAULT): "the ring's addresses are not accessible through "
    "the memory table",
    ("VHOST_SET_VRING_ADDR", errno.EINVAL): "misaligned ring address (avail 2, used 4 bytes)",
    ("TUNSETIFF", errno.EPERM): "creating or attaching a tap needs CAP_NET_ADMIN or "
    "ownership of the tap (TUNSETOWNER)",
    ("TUNSETIFF", errno.EBUSY): "the tap exists with other flags, or all its queues are taken",
    ("TUNSETIFF", errno.EINVAL): "the tap exists with different flags (multi-queue or not)",
    ("TUNSETOFFLOAD", errno.EINVAL): "this kernel's tap does not accept one of the offload flags",
    ("TUNSETVNETHDRSZ", errno.EINVAL): "vnet header size must be at least 10",
}


def ioctl(fd: int, req: Ioctl, arg: Any = 0, *, device: str, mutate: bool = True) -> int:
    """Issue ``req`` on ``fd``; ``arg`` is an int, bytes, or a writable buffer.

    A writable buffer is filled in place by the kernel when ``mutate`` is true.
    Returns the syscall's return value. Raises :class:`KernelError` on any errno.
    """
    try:
        if isinstance(arg, int):
            return int(fcntl.ioctl(fd, req.number, arg))
        if isinstance(arg, bytes):
            fcntl.ioctl(fd, req.number, arg)
            return 0
        return int(fcntl.ioctl(fd, req.number, arg, mutate))
    except OSError as err:
        code = err.errno or errno.EIO
        raise kernel_error(req.name, device, code, _hint(req, code)) from err


#: device node name -> how to make it appear
_OPEN_HINTS: dict[str, str] = {
    "vhost-net": "load the module with 'modprobe vhost_net'",
    "tun": "load the module with 'modprobe tun'",
    "vhost-vsock": "load the module with 'modprobe vhost_vsock'",
    "vhost-scsi": "load the module with 'modprobe vhost_scsi'",
}


def open_device(path: str, flags: int = os.O_RDWR) -> int:
    """Open a device node close-on-exec; failures become :class:`DeviceUnavailable`.

    The message says which of missing / not permitted / module not loaded applies and
    what to do about it.
    """
    todo = _OPEN_HINTS.get(Path(path).name, "load its kernel module")
    try:
        return os.open(path, flags | os.O_CLOEXEC)
    except OSError as err:
        code = err.errno or 0
        if code == errno.ENOENT:
            hint = f"{path} does not exist: {todo}"
        elif code in (errno.EACCES, errno.EPERM):
            hint = (
                f"no permission to open {path}: run as root, add the user to the device's "
                "group (often 'kvm'), or have a privileged process pass the fd in"
            )
        elif code in (errno.ENODEV, errno.ENXIO):
            hint = f"{path} exists but no driver is bound: {todo}"
        else:
            hint = ""
        raise kernel_error("open", path, code, hint, kind=DeviceUnavailable) from err
