"""Errors raised while driving a real QEMU.

All derive from :class:`kvhost.errors.KvhostError`, and say whom to blame::

    KvhostError
     └── QemuError              QEMU misbehaved or is gone; carries its exit status and stderr
          ├── QemuExited         the process exited (or never came up) while we needed it
          ├── QtestError         a qtest command got ``FAIL``/``ERR`` or an unparsable reply
          └── QmpError           a QMP command returned an error object
"""

from __future__ import annotations

from kvhost.errors import KvhostError


class QemuError(KvhostError):
    """QEMU failed. ``exit_status`` is None while the process still runs; ``stderr`` is all
    QEMU printed so far (usually the real reason)."""

    def __init__(self, message: str, *, exit_status: int | None = None, stderr: str = "") -> None:
        self.exit_status = exit_status
        self.stderr = stderr
        text = message
        if exit_status is not None:
            text += f" (QEMU exit status {exit_status})"
        if stderr.strip():
            text += "\nQEMU stderr:\n" + stderr.rstrip()
        super().__init__(text)


class QemuExited(QemuError):
    """QEMU exited (or closed its socket) while a command was in flight."""


class QtestError(QemuError):
    """A qtest command was refused (``FAIL``/``ERR``) or answered with garbage."""


class QmpError(QemuError):
    """A QMP command returned ``{"error": {"class": ..., "desc": ...}}``."""

    def __init__(
        self,
        command: str,
        error_class: str,
        desc: str,
        *,
        exit_status: int | None = None,
        stderr: str = "",
    ) -> None:
        self.command = command
        self.error_class = error_class
        self.desc = desc
        super().__init__(
            f"QMP {command} failed: {error_class}: {desc}", exit_status=exit_status, stderr=stderr
        )
