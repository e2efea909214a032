"""Named virtio and vhost feature bits.

A feature set is a plain ``int`` (arbitrary precision, so bits 64-127 of the 128-bit
``FEATURES_ARRAY`` fit). The table below is the single source of bit names; it mirrors
``linux/virtio_config.h``, ``linux/virtio_ring.h``, ``linux/virtio_net.h`` and ``linux/vhost.h``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import Enum

from kvhost import abi


class Kind(Enum):
    TRANSPORT = "transport"
    NET = "net"
    VHOST = "vhost"


@dataclass(frozen=True, slots=True)
class Bit:
    number: int
    name: str
    kind: Kind


_BITS: tuple[tuple[int, str, Kind], ...] = (
    # linux/virtio_net.h
    (0, "CSUM", Kind.NET),
    (1, "GUEST_CSUM", Kind.NET),
    (2, "CTRL_GUEST_OFFLOADS", Kind.NET),
    (3, "MTU", Kind.NET),
    (5, "MAC", Kind.NET),
    (6, "GSO", Kind.NET),
    (7, "GUEST_TSO4", Kind.NET),
    (8, "GUEST_TSO6", Kind.NET),
    (9, "GUEST_ECN", Kind.NET),
    (10, "GUEST_UFO", Kind.NET),
    (11, "HOST_TSO4", Kind.NET),
    (12, "HOST_TSO6", Kind.NET),
    (13, "HOST_ECN", Kind.NET),
    (14, "HOST_UFO", Kind.NET),
    (15, "MRG_RXBUF", Kind.NET),
    (16, "STATUS", Kind.NET),
    (17, "CTRL_VQ", Kind.NET),
    (18, "CTRL_RX", Kind.NET),
    (19, "CTRL_VLAN", Kind.NET),
    (20, "CTRL_RX_EXTRA", Kind.NET),
    (21, "GUEST_ANNOUNCE", Kind.NET),
    (22, "MQ", Kind.NET),
    (23, "CTRL_MAC_ADDR", Kind.NET),
    # linux/virtio_config.h, linux/virtio_ring.h, linux/vhost.h
    (24, "NOTIFY_ON_EMPTY", Kind.TRANSPORT),
    (26, "LOG_ALL", Kind.VHOST),
    (27, "ANY_LAYOUT", Kind.TRANSPORT),  # also VHOST_NET_F_VIRTIO_NET_HDR
    (28, "INDIRECT_DESC", Kind.TRANSPORT),
    (29, "EVENT_IDX", Kind.TRANSPORT),
    (30, "PROTOCOL_FEATURES", Kind.VHOST),  # VHOST_USER_F_PROTOCOL_FEATURES (QEMU)
    (32, "VERSION_1", Kind.TRANSPORT),
    (33, "ACCESS_PLATFORM", Kind.TRANSPORT),
    (34, "RING_PACKED", Kind.TRANSPORT),
    (35, "IN_ORDER", Kind.TRANSPORT),
    (36, "ORDER_PLATFORM", Kind.TRANSPORT),
    (37, "SR_IOV", Kind.TRANSPORT),
    (38, "NOTIFICATION_DATA", Kind.TRANSPORT),
    (39, "NOTIF_CONFIG_DATA", Kind.TRANSPORT),
    (40, "RING_RESET", Kind.TRANSPORT),
    (41, "ADMIN_VQ", Kind.TRANSPORT),
    (46, "GUEST_UDP_TUNNEL_GSO_MAPPED", Kind.NET),
    (47, "GUEST_UDP_TUNNEL_GSO_CSUM_MAPPED", Kind.NET),
    (50, "DEVICE_STATS", Kind.NET),
    (52, "VQ_NOTF_COAL", Kind.NET),
    (53, "NOTF_COAL", Kind.NET),
    (54, "GUEST_USO4", Kind.NET),
    (55, "GUEST_USO6", Kind.NET),
    (56, "HOST_USO", Kind.NET),
    (57, "HASH_REPORT", Kind.NET),
    (59, "GUEST_HDRLEN", Kind.NET),
    (60, "RSS", Kind.NET),
    (61, "RSC_EXT", Kind.NET),
    (62, "STANDBY", Kind.NET),
    (63, "SPEED_DUPLEX", Kind.NET),
    (65, "GUEST_UDP_TUNNEL_GSO", Kind.NET),
    (66, "GUEST_UDP_TUNNEL_GSO_CSUM", Kind.NET),
    (67, "HOST_UDP_TUNNEL_GSO", Kind.NET),
    (68, "HOST_UDP_TUNNEL_GSO_CSUM", Kind.NET),
)

BITS: dict[int, Bit] = {n: Bit(n, name, kind) for n, name, kind in _BITS}
BY_NAME: dict[str, Bit] = {b.name: b for b in BITS.values()}

#: aliases accepted on input (kernel and QEMU spellings)
ALIASES: dict[str, str] = {
    "IOMMU_PLATFORM": "ACCESS_PLATFORM",
    "VHOST_F_LOG_ALL": "LOG_ALL",
    "VIRTIO_NET_HDR": "ANY_LAYOUT",
    "VHOST_USER_F_PROTOCOL_FEATURES": "PROTOCOL_FEATURES",
}

LOG_ALL = 1 << abi.VHOST_F_LOG_ALL
PROTOCOL_FEATURES = 1 << 30
MAX_BITS = 128


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
TAP_OFFLOAD_BITS: dict[str, tuple[int, tuple[str, ...]]] = {
    "CSUM": (abi.TUN_F_CSUM, ("CSUM", "GUEST_CSUM")),
    "TSO4": (abi.TUN_F_TSO4, ("GUEST_TSO4", "HOST_TSO4")),
    "TSO6": (abi.TUN_F_TSO6, ("GUEST_TSO6", "HOST_TSO6")),
    "TSO_ECN": (abi.TUN_F_TSO_ECN, ("GUEST_ECN", "HOST_ECN")),
    "UFO": (abi.TUN_F_UFO, ("GUEST_UFO", "HOST_UFO")),
    "USO": (abi.TUN_F_USO4 | abi.TUN_F_USO6, ("GUEST_USO4", "GUEST_USO6", "HOST_USO")),
    "UDP_TUNNEL_GSO": (
        abi.TUN_F_UDP_TUNNEL_GSO,
        ("GUEST_UDP_TUNNEL_GSO", "HOST_UDP_TUNNEL_GSO"),
    ),
    "UDP_TUNNEL_GSO_CSUM": (
        abi.TUN_F_UDP_TUNNEL_GSO_CSUM,
        ("GUEST_UDP_TUNNEL_GSO_CSUM", "HOST_UDP_TUNNEL_GSO_CSUM"),
    ),
}


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
    flags = 0
    if features & bit("GUEST_CSUM"):
        flags |= abi.TUN_F_CSUM
        if features & bit("GUEST_TSO4"):
            flags |= abi.TUN_F_TSO4
        if features & bit("GUEST_TSO6"):
            flags |= abi.TUN_F_TSO6
        if features & bit("GUEST_ECN"):
            flags |= abi.TUN_F_TSO_ECN
        if features & bit("GUEST_UFO"):
            flags |= abi.TUN_F_UFO
        if features & bit("GUEST_USO4") and features & bit("GUEST_USO6"):
            flags |= abi.TUN_F_USO4 | abi.TUN_F_USO6
        if features & bit("GUEST_UDP_TUNNEL_GSO"):
            flags |= abi.TUN_F_UDP_TUNNEL_GSO
        if features & bit("GUEST_UDP_TUNNEL_GSO_CSUM"):
            flags |= abi.TUN_F_UDP_TUNNEL_GSO_CSUM
    return flags
