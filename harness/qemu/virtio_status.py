"""Feature words out of QMP ``x-query-virtio-status``, which QEMU (7.2 and 10.0 alike) answers
with *decoded* lists (``"VIRTIO_NET_F_MRG_RXBUF: Driver can merge receive buffers"``) instead
of numbers, plus ``unknown-dev-features`` for bits it has no name for.

The ``vhost-dev`` part is what QEMU gave its vhost backend: ``acked-features`` is the value of
its last SET_FEATURES (VHOST_SET_FEATURES for kernel vhost-net, the vhost-user message for a
backend such as the shim), ``log-enabled`` whether the dirty log is on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kvhost import features as fb
from kvhost.errors import KvhostError

#: QEMU's names that differ from kvhost's (features.json)
_RENAMED = {"IOMMU_PLATFORM": "ACCESS_PLATFORM"}
_PREFIXES = ("VIRTIO_NET_F_", "VIRTIO_RING_F_", "VIRTIO_F_", "VHOST_USER_F_", "VHOST_F_")
#: bits QEMU adds to SET_FEATURES for its own plumbing (vhost-user protocol features, the
#: dirty log): never negotiated with the guest, so left out when the two are compared
PLUMBING = fb.PROTOCOL_FEATURES | fb.LOG_ALL


def _bit(entry: str) -> int:
    name, _, description = entry.partition(":")
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            short = _RENAMED.get(name[len(prefix):], name[len(prefix):])
            # QEMU 7.2 and 10.0 label bit 55 "VIRTIO_NET_F_GUEST_USO4: Driver can receive
            # USOv6" (a copy-paste slip in hw/virtio/virtio-qmp.c): the text tells them apart
            if short == "GUEST_USO4" and "USOv6" in description:
                short = "GUEST_USO6"
            try:
                return fb.bit(short)
            except KeyError:
                break
    raise KvhostError(f"x-query-virtio-status names a feature kvhost does not know: {entry!r}")


def decode(word: Mapping[str, Any]) -> int:
    """One decoded feature word (``{"transports": [...], "dev-features": [...],
    "unknown-dev-features": N}``) as an integer."""
    value = int(word.get("unknown-dev-features", 0))
    for key in ("transports", "dev-features"):
        for entry in word.get(key, []):
            value |= _bit(str(entry))
    return value


def vhost_dev(status: Mapping[str, Any]) -> Mapping[str, Any]:
    dev = status.get("vhost-dev")
    if not isinstance(dev, Mapping):
        raise KvhostError("x-query-virtio-status has no vhost-dev: the device is not "
                          f"started on a vhost backend (status {dict(status)!r:.300})")
    return dev


def vhost_acked(status: Mapping[str, Any]) -> int:
    """The features in QEMU's last SET_FEATURES to its vhost backend."""
    return decode(vhost_dev(status)["acked-features"])


def vhost_offered(status: Mapping[str, Any]) -> int:
    """The features QEMU's vhost layer keeps of the backend's offer (its feature mask)."""
    return decode(vhost_dev(status)["features"])


def guest_features(status: Mapping[str, Any]) -> int:
    """What the guest driver negotiated."""
    return decode(status["guest-features"])


def log_enabled(status: Mapping[str, Any]) -> bool:
    return bool(vhost_dev(status).get("log-enabled"))


def acked_mismatch(negotiated: int, acked: int, offered: int) -> int:
    """The bits by which QEMU's SET_FEATURES to its vhost backend (``acked``, plumbing aside)
    differs from what the guest ``negotiated`` within the backend's offer (``offered``): 0
    when the backend got exactly the negotiated bits. After a migration a difference is
    silent breakage (a vnet header size the backend does not use drops every frame)."""
    return (acked & ~PLUMBING) ^ (negotiated & offered & ~PLUMBING)
