"""Named virtio and vhost feature bits, and what on a kernel host provides each.

A feature set is a plain ``int`` (arbitrary precision, so bits 64-127 of the 128-bit
``FEATURES_ARRAY`` fit). Everything kvhost knows per bit lives in one data file,
``kvhost/data/features.json`` (its ``comment`` explains the columns): the name and number
(mirroring ``linux/virtio_config.h``, ``linux/virtio_ring.h``, ``linux/virtio_net.h`` and
``linux/vhost.h``), which side provides it (vhost-net, a tap offload with its TUN_F_* flags,
or both), the first kernel release that does, and QEMU's device property for it. The tap
offload mapping here, the bit classes of :mod:`kvhost.versions` and the property list of
:mod:`kvhost.qemu_args` are derived from it, so a new kernel release's bits are new rows
there, not edits across modules (docs/architecture.md, "Adding a kernel release").
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from kvhost import abi

#: a directory holding edited copies of kvhost's data files (features.json, versions.json);
#: only tests set it, to follow docs/architecture.md's recipe without touching the package
DATA_DIR_ENV = "KVHOST_DATA_DIR"


def data_file(name: str) -> Path:
    """The data file ``name`` of this process: the shipped one, or the copy in
    ``$KVHOST_DATA_DIR`` when that is set."""
    override = os.environ.get(DATA_DIR_ENV)
    if override:
        return Path(override) / name
    # beside the module, not through importlib.resources: kvhost is installed as files
    # (never zipped), and resources' import pulls zipfile, tempfile and compression modules
    # into every shim process (about 40 ms and their memory, once per VM)
    return Path(__file__).resolve().parent / "data" / name


class Kind(Enum):
    TRANSPORT = "transport"
    NET = "net"
    VHOST = "vhost"


@dataclass(frozen=True, slots=True)
class Bit:
    """One row of the feature table.

    ``vhost_net``: vhost-net must advertise the bit; ``tap_offload``/``tun_flags``: the tap
    offload that provides it and its TUNSETOFFLOAD flags; ``multiqueue``: a multiqueue tap
    provides it (MQ). A bit with none of these is no backend's: QEMU's device model or
    plumbing. ``since``: the first mainline release providing it; ``qemu``: the
    ``virtio-net-pci`` property that switches it.
    """

    number: int
    name: str
    kind: Kind
    vhost_net: bool = False
    tap_offload: str | None = None
    tun_flags: int = 0
    multiqueue: bool = False
    since: str | None = None
    qemu: str | None = None


_PROVIDERS = {"vhost-net", "tap", "vhost-net+tap", "multiqueue-tap"}
_KEYS = {"bit", "name", "kind", "provider", "tap_offload", "tun_flags", "since", "qemu", "note"}


def load_table(text: str) -> tuple[Bit, ...]:
    """Parse the feature table (the text of a ``features.json``), rows in bit order.

    Raises ValueError naming the row when it is malformed or disagrees with another row.
    """
    rows: list[Bit] = []
    for raw in json.loads(text)["bits"]:
        try:
            rows.append(_row(raw))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"feature table row {raw!r}: {err}") from None
    _check_table(rows)
    return tuple(rows)


def _row(raw: dict[str, Any]) -> Bit:
    unknown = set(raw) - _KEYS
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)}")
    provider = raw.get("provider")
    if provider is not None and provider not in _PROVIDERS:
        raise ValueError(f"provider must be one of {sorted(_PROVIDERS)}")
    parts = set(provider.split("+")) if provider else set()
    offload = raw.get("tap_offload")
    if ("tap" in parts) != (offload is not None):
        raise ValueError("a tap-provided bit, and only one, names its tap_offload")
    flags = 0
    for flag in raw.get("tun_flags", []):
        # the numbers stay in kvhost.abi, where the header test checks them
        if not flag.startswith("TUN_F_") or not isinstance(getattr(abi, flag, None), int):
            raise ValueError(f"{flag} is not a TUN_F_* constant of kvhost.abi")
        flags |= getattr(abi, flag)
    if bool(offload) != bool(flags):
        raise ValueError("tap_offload and tun_flags go together")
    number = raw["bit"]
    if not isinstance(number, int) or not 0 <= number < MAX_BITS:
        raise ValueError(f"bit must be a number from 0 to {MAX_BITS - 1}")
    return Bit(
        number,
        str(raw["name"]),
        Kind(raw["kind"]),
        vhost_net="vhost-net" in parts,
        tap_offload=offload,
        tun_flags=flags,
        multiqueue="multiqueue-tap" in parts,
        since=raw.get("since"),
        qemu=raw.get("qemu"),
    )


def _check_table(rows: list[Bit]) -> None:
    numbers = [b.number for b in rows]
    if numbers != sorted(set(numbers)):
        raise ValueError("feature table rows must be in bit order, each number once")
    for column in ("name", "qemu"):
        values = [getattr(b, column) for b in rows if getattr(b, column)]
        dup = {v for v in values if values.count(v) > 1}
        if dup:
            raise ValueError(f"feature table: {column} {sorted(dup)} on more than one row")
    flags: dict[str, int] = {}
    for b in rows:
        if b.tap_offload and flags.setdefault(b.tap_offload, b.tun_flags) != b.tun_flags:
            raise ValueError(f"feature table: the {b.tap_offload} rows differ in tun_flags")


MAX_BITS = 128

TABLE: tuple[Bit, ...] = load_table(data_file("features.json").read_text())
BITS: dict[int, Bit] = {b.number: b for b in TABLE}
BY_NAME: dict[str, Bit] = {b.name: b for b in TABLE}

#: aliases accepted on input (kernel and QEMU spellings)
ALIASES: dict[str, str] = {
    "IOMMU_PLATFORM": "ACCESS_PLATFORM",
    "VHOST_F_LOG_ALL": "LOG_ALL",
    "VIRTIO_NET_HDR": "ANY_LAYOUT",
    "VHOST_USER_F_PROTOCOL_FEATURES": "PROTOCOL_FEATURES",
}

LOG_ALL = 1 << abi.VHOST_F_LOG_ALL
PROTOCOL_FEATURES = 1 << 30


def bit(name: str) -> int:
    """The mask of one named bit; accepts ``VIRTIO_NET_F_``/``VIRTIO_F_`` prefixes.

    Raises ``KeyError`` with the unknown name.
    """
    key = name.strip().upper()
    for prefix in ("VIRTIO_NET_F_", "VIRTIO_RING_F_", "VIRTIO_F_", "VHOST_F_"):
        if key.startswith(prefix):
            key = key[len(prefix) :]
            break
    key = ALIASES.get(key, key)
    if key not in BY_NAME:
        raise KeyError(name)
    return 1 << BY_NAME[key].number


def mask(names: Iterable[str]) -> int:
    """The union of named bits."""
    out = 0
    for n in names:
        out |= bit(n)
    return out


def iter_bits(features: int) -> Iterator[int]:
    """Bit numbers set in ``features``, lowest first."""
    n = 0
    while features:
        if features & 1:
            yield n
        features >>= 1
        n += 1


def name_of(number: int) -> str:
    """The name of bit ``number``; unnamed bits read ``BIT_<n>``."""
    b = BITS.get(number)
    return b.name if b else f"BIT_{number}"


def names(features: int) -> list[str]:
    """Names of every bit set in ``features``, lowest bit first."""
    return [name_of(n) for n in iter_bits(features)]


def to_words(features: int, words: int = abi.VHOST_FEATURES_ARRAY_WORDS) -> list[int]:
    """Split a feature set into 64-bit words, lowest first (FEATURES_ARRAY layout)."""
    if features >> (64 * words):
        raise ValueError(f"feature set 0x{features:x} needs more than {words} 64-bit words")
    return [(features >> (64 * i)) & 0xFFFF_FFFF_FFFF_FFFF for i in range(words)]


def from_words(words: Iterable[int]) -> int:
    out = 0
    for i, w in enumerate(words):
        out |= (w & 0xFFFF_FFFF_FFFF_FFFF) << (64 * i)
    return out


# Tap offloads and the virtio-net bits they provide. A GUEST_* bit means the guest may
# receive that offload, so the tap must be told (TUNSETOFFLOAD) it may pass such frames up;
# HOST_* bits only need the tap to accept vnet headers, plus the tap's support for the
# segmentation kind (UFO/USO) so that frames written into it are not rejected.
def _tap_offloads() -> dict[str, tuple[int, tuple[str, ...]]]:
    out: dict[str, tuple[int, tuple[str, ...]]] = {}
    for b in TABLE:
        if b.tap_offload:
            flags, names = out.get(b.tap_offload, (b.tun_flags, ()))
            out[b.tap_offload] = (flags, (*names, b.name))
    return out


#: offload name -> (TUN_F_* flags, the bits it provides), in the table's order
TAP_OFFLOAD_BITS: dict[str, tuple[int, tuple[str, ...]]] = _tap_offloads()


def tap_offload_features(offloads: Iterable[str]) -> int:
    """Virtio-net bits a tap with these accepted offload names can serve."""
    out = 0
    for name in offloads:
        out |= mask(TAP_OFFLOAD_BITS[name][1])
    return out


def tun_flags_for(features: int) -> int:
    """TUNSETOFFLOAD flags for negotiated virtio-net ``features`` (GUEST_* bits drive it).

    Mirrors QEMU's ``virtio_net_apply_guest_offloads``: the tap may hand up only what the
    guest said it can receive.
    """
    if not features & bit("GUEST_CSUM"):
        # every segmentation flag needs TUN_F_CSUM beside it
        return 0
    flags = 0
    for tun, names in TAP_OFFLOAD_BITS.values():
        # virtio's naming: GUEST_* is what the device hands the guest, so what the tap
        # hands up; an offload split over several GUEST_* bits (USO4+USO6) needs them all
        guest = mask(n for n in names if n.startswith("GUEST_"))
        if guest and features & guest == guest:
            flags |= tun
    return flags
