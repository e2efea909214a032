"""What QEMU's virtio-net device shows and acks for an interface version served over
vhost-user, and the qtest guest driver (modern, or legacy for versions without VERSION_1,
which QEMU only puts behind a legacy device) that drives it."""

from __future__ import annotations

from harness.frames import GUEST_MAC
from harness.qemu import virtio_status as vs
from harness.qemu.legacy_pci import LegacyVirtioNet
from harness.qemu.machine import Machine
from harness.qemu.virtio_pci import DriverState, VirtioNetDriver
from kvhost import features, versions
from kvhost.vhost_user import protocol as p

#: what QEMU 7.2 acks of the shim's protocol features (it does not know bit 63)
QEMU_PROTOCOL = int(
    p.ProtocolFeature.MQ
    | p.ProtocolFeature.LOG_SHMFD
    | p.ProtocolFeature.RARP
    | p.ProtocolFeature.REPLY_ACK
    | p.ProtocolFeature.MTU
)
#: the device bits a modern Linux guest driver acks of a v5 backend, in short
GUEST = features.mask(["VERSION_1", "MRG_RXBUF", "EVENT_IDX", "CSUM", "GUEST_CSUM"])

#: QEMU 7.2's vhost-user ``user_feature_bits``: the device bits QEMU masks with the
#: backend's GET_FEATURES and the only bits it forwards in SET_FEATURES. Everything else
#: the device shows (MAC, STATUS, CTRL_*) is QEMU's own.
VHOST_USER_MASKED = features.mask(
    [
        "NOTIFY_ON_EMPTY", "INDIRECT_DESC", "EVENT_IDX", "ANY_LAYOUT", "VERSION_1",
        "CSUM", "GUEST_CSUM", "GSO", "GUEST_TSO4", "GUEST_TSO6", "GUEST_ECN", "GUEST_UFO",
        "HOST_TSO4", "HOST_TSO6", "HOST_ECN", "HOST_UFO", "MRG_RXBUF", "MTU",
        "ACCESS_PLATFORM", "RING_PACKED", "RING_RESET", "RSS", "HASH_REPORT",
        "GUEST_ANNOUNCE", "MQ",
    ]
)
#: legacy-only bits: a modern (VERSION_1) device hides them from the driver
LEGACY_ONLY = features.mask(["NOTIFY_ON_EMPTY", "ANY_LAYOUT"])
#: plumbing bits in SET_FEATURES that are not part of the interface
PLUMBING = vs.PLUMBING
VERSION_1 = features.mask(["VERSION_1"])
#: control-queue bits the qtest drivers accept when asked to take every version bit: MQ
#: needs CTRL_VQ; the driver never sets up the control queue, and QEMU never needs it
MQ_WITH_CTRL = features.mask(["MQ", "CTRL_VQ"])


def is_legacy(version: versions.InterfaceVersion) -> bool:
    """True for versions without VERSION_1: QEMU serves them only through a legacy device."""
    return not version.features & VERSION_1


def device_properties_for(version: versions.InterfaceVersion) -> dict[str, str]:
    """Device properties that let QEMU's device show every bit the backend may offer:
    ``mq`` and ``host_mtu`` are opt-in device features in QEMU (off by default)."""
    props = {"mac": GUEST_MAC.hex(":")}
    if version.features & features.mask(["MQ"]):
        props["mq"] = "on"
    if version.mtu:
        props["host_mtu"] = "1500"
    return props


def expected_device_bits(version: versions.InterfaceVersion) -> int:
    """The backend-masked bits a device shows (and QEMU acks) for ``version`` served through
    vhost-user: the version's bits, minus the legacy-only ones behind a modern device."""
    bits = versions.serve_features(version) & VHOST_USER_MASKED
    return bits if is_legacy(version) else bits & ~LEGACY_ONLY


def driver_for(machine: Machine, legacy: bool) -> VirtioNetDriver:
    """The qtest guest driver of ``machine``'s device (legacy or modern)."""
    if legacy:
        return LegacyVirtioNet.probe(machine.qtest)
    return VirtioNetDriver.probe(machine.qtest)


def attach_driver(machine: Machine, state: DriverState, legacy: bool) -> VirtioNetDriver:
    if legacy:
        return LegacyVirtioNet.attach(machine.qtest, state)
    return VirtioNetDriver.attach(machine.qtest, state)


def every_version_bit(drv: VirtioNetDriver) -> int:
    """Driver features taking every offered bit a version may hold (MQ included, with the
    CTRL_VQ it requires), nothing of the rest of QEMU's control features."""
    offered = drv.read_device_features()
    return offered & (VHOST_USER_MASKED | MQ_WITH_CTRL) & ~features.mask(
        ["GUEST_ANNOUNCE", "RING_PACKED", "ACCESS_PLATFORM", "RSS", "HASH_REPORT"])
