"""The exception tree of kvhost.

Every error names who is at fault, so callers (and operators reading logs) know whom
to blame and what to fix::

    KvhostError
     ├── KernelError            the kernel refused an ioctl or a device could not be opened
     │    └── DeviceUnavailable  a device node is missing, not permitted, or its module not loaded
     ├── RemoteProtocolError    the vhost-user peer sent something malformed or out of order
     ├── LocalProtocolError     kvhost itself tried to send something the protocol forbids
     ├── VersionError           an interface version is malformed, unknown, or cannot be served
     └── UsageError             the operator asked for something impossible (bad flag, bad path)
"""

from __future__ import annotations

import errno as _errno
import os


class KvhostError(Exception):
    """Base class of every error kvhost raises on purpose."""


class KernelError(KvhostError):
    """The kernel refused an operation.

    ``op`` is the ioctl or syscall name, ``device`` the path or name of the device it was
    issued on, ``errno`` the raw error number and ``hint`` what it most likely means.
    """

    def __init__(self, op: str, device: str, err: int, hint: str = "") -> None:
        self.op = op
        self.device = device
        self.errno = err
        self.hint = hint
        name = _errno.errorcode.get(err, str(err))
        text = f"{op} on {device} failed: {name} ({os.strerror(err)})"
        if hint:
            text += f": {hint}"
        super().__init__(text)


class DeviceUnavailable(KernelError):
    """A device node could not be opened (missing, permission, module not loaded)."""


class RemoteProtocolError(KvhostError):
    """The vhost-user peer violated the protocol; the connection must be failed."""


class LocalProtocolError(KvhostError):
    """kvhost was asked to send or do something the protocol does not allow."""


class VersionError(KvhostError):
    """An interface version is malformed, unknown, or cannot be served on this host."""


class UsageError(KvhostError):
    """The operator asked for something impossible; the message says what to change."""
