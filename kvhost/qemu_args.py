"""QEMU ``virtio-net-pci`` properties that pin the guest-visible interface to a version.

When QEMU drives kernel vhost-net itself (``-netdev tap,vhost=on``) there is no shim to mask
features, but QEMU's device has one on/off property per feature bit. Turning off every bit the
version lacks (and on every bit it has) makes the device offer exactly the version's backend
bits, whatever the host kernel could do beyond them.

Only properties the installed QEMU knows are emitted: a QEMU without, say, ``host_uso``
(added in QEMU 8.1) cannot offer that bit at all, so nothing needs turning off. If the
version *needs* a bit for which QEMU has no property, QEMU cannot provide that version and
:func:`device_properties` raises VersionError instead of emitting a line that silently
offers less.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Collection
from functools import cache

from kvhost import features as fb
from kvhost.errors import UsageError, VersionError
from kvhost.versions import InterfaceVersion, registry

DEVICE = "virtio-net-pci"

#: (QEMU property, feature bit) in the order they are emitted: the qemu column of
#: kvhost/data/features.json, in bit order (QEMU 10.1 added the UDP-tunnel ones)
PROPERTY_BITS: tuple[tuple[str, str], ...] = tuple((b.qemu, b.name) for b in fb.TABLE if b.qemu)

#: virtio-net rx/tx_queue_size must be a power of two in this range (hw/net/virtio-net.c)
QEMU_MIN_QUEUE_SIZE = 256
QEMU_MAX_QUEUE_SIZE = 1024
#: QEMU's TX ring for a tap peer (the vhost=on case these properties pin) is at most 256:
#: 7.2 silently clamps a larger tx_queue_size to it, 10.0 refuses to start ("Invalid
#: tx_queue_size (= 1024), must be a power of 2 between 256 and 256"). Both observed.
QEMU_TAP_MAX_TX_QUEUE_SIZE = 256

_PROP_LINE = re.compile(r"^\s+([A-Za-z0-9_.-]+)=<")


def parse_help(text: str) -> frozenset[str]:
    """Property names from ``qemu-system-* -device DEVICE,help`` output."""
    return frozenset(m.group(1) for line in text.splitlines() if (m := _PROP_LINE.match(line)))


@cache
def available_properties(qemu: str = "qemu-system-x86_64") -> frozenset[str]:
    """The ``virtio-net-pci`` properties the given QEMU binary knows.

    Raises UsageError when the binary cannot be run or lists no properties.
    """
    try:
        out = subprocess.run(
            [qemu, "-nodefaults", "-machine", "none", "-device", f"{DEVICE},help"],
            capture_output=True,
            text=True,
            # listing properties starts QEMU's whole module system: seconds under emulation
            # and load (a test VM under TCG exceeded 30 s once)
            timeout=120,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise UsageError(f"cannot run {qemu} to list {DEVICE} properties: {err}") from err
    props = parse_help(out.stdout + out.stderr)
    if not props:
        raise UsageError(
            f"{qemu} listed no {DEVICE} properties (exit {out.returncode}): "
            f"{(out.stderr or out.stdout).strip()[:200]}"
        )
    return props


def _newest_expressible(available: Collection[str]) -> InterfaceVersion | None:
    best = None
    for v in registry():
        if not _unexpressible(v, available):
            best = v
    return best


def _unexpressible(version: InterfaceVersion, available: Collection[str]) -> list[str]:
    # VERSION_1 has no property of its own: disable-modern pins it.
    known = {fb.bit(b) for _, b in PROPERTY_BITS} | {fb.bit("VERSION_1")}
    out = []
    for prop, name in PROPERTY_BITS:
        if version.features & fb.bit(name) and prop not in available:
            out.append(f"{name} (no {prop} property)")
    for n in fb.iter_bits(version.features):
        if 1 << n not in known:
            out.append(f"{fb.name_of(n)} (no property maps to it)")
    return out


def device_properties(version: InterfaceVersion, available: Collection[str]) -> list[str]:
    """``prop=value`` strings pinning a ``virtio-net-pci`` device to ``version``.

    ``available`` is the property set of the QEMU that will run (see
    :func:`available_properties`). Raises VersionError when that QEMU cannot offer one of
    the version's bits or its queue size.
    """
    lacking = _unexpressible(version, available)
    if lacking:
        best = _newest_expressible(available)
        hint = f"; the newest version it can pin is {best.label}" if best else ""
        raise VersionError(
            f"this QEMU cannot offer {version.label}: it lacks {', '.join(lacking)}{hint}"
        )
    out: list[str] = []
    for prop, name in PROPERTY_BITS:
        if prop in available:
            out.append(f"{prop}={'on' if version.features & fb.bit(name) else 'off'}")
    # VERSION_1 is the modern interface: without it the device must be legacy-only.
    if "disable-modern" in available:
        if version.features & fb.bit("VERSION_1"):
            out.append("disable-modern=off")
        else:
            out += ["disable-modern=on", "disable-legacy=off"]
    size = min(version.max_queue_size, QEMU_MAX_QUEUE_SIZE)
    if size < QEMU_MIN_QUEUE_SIZE:
        raise VersionError(
            f"{version.label} caps rings at {version.max_queue_size} entries but QEMU's "
            f"{DEVICE} rings are {QEMU_MIN_QUEUE_SIZE} to {QEMU_MAX_QUEUE_SIZE}"
        )
    if "rx_queue_size" in available:
        out.append(f"rx_queue_size={size}")
    if "tx_queue_size" in available:
        # what 7.2 ran with anyway, so VMs pinned before keep their guest-visible ring size
        out.append(f"tx_queue_size={min(size, QEMU_TAP_MAX_TX_QUEUE_SIZE)}")
    if not version.mtu and "host_mtu" in available:
        out.append("host_mtu=0")
    return out
