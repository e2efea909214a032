"""The two QEMU releases the tests run side by side, and how to tell which one a binary is.

Debian 12's own QEMU 7.2 is the system's ``/usr/bin/qemu-system-x86_64``; QEMU 10.0 from
``bookworm-backports`` is unpacked beside it by ``scripts/install-deps`` and run through the
wrapper it writes (its own ``-L`` data directories and module directory, see README "Two
QEMUs"). ``KVHOST_QEMU10`` names another QEMU 10 wrapper or binary.
"""

from __future__ import annotations

import os
import re
import subprocess
from functools import cache

from kvhost.errors import UsageError

QEMU_72 = "/usr/bin/qemu-system-x86_64"
QEMU_10 = os.environ.get("KVHOST_QEMU10", "/opt/kvhost/qemu-10.0/bin/qemu-system-x86_64")

#: the machine type both releases know and migrate with: 10.0's compat properties for it
#: turn off what 7.2 lacks (USO: hw_compat_8_1) and keep what 7.2 has (queue_reset)
COMMON_MACHINE = "pc-q35-7.2"

_VERSION = re.compile(r"QEMU emulator version (\d+)\.(\d+)\.(\d+)")


def require(binary: str) -> str:
    """``binary`` if it runs, else UsageError saying how to install it."""
    if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
        how = ("run scripts/install-deps, which unpacks QEMU 10.0 from bookworm-backports "
               "there" if binary == QEMU_10 else "apt-get install qemu-system-x86")
        raise UsageError(f"QEMU binary {binary} is missing: {how}")
    return binary


@cache
def release(binary: str) -> tuple[int, int, int]:
    """(major, minor, micro) from ``binary --version``; UsageError when it does not say."""
    require(binary)
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                             timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise UsageError(f"cannot run {binary} --version: {err}") from err
    m = _VERSION.search(out.stdout)
    if m is None:
        raise UsageError(f"{binary} --version printed no 'QEMU emulator version X.Y.Z': "
                         f"{(out.stdout + out.stderr).strip()[:200]!r}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def label(binary: str) -> str:
    """``"7.2"`` / ``"10.0"``: the release for test ids and reports."""
    major, minor, _ = release(binary)
    return f"{major}.{minor}"
