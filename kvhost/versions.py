"""Interface versions of kernel vhost-net: the model, the two spellings, masking.

An *interface version* fixes everything a guest can see of a vhost-net backend:

* ``features``: the guest-visible backend feature bits: the ring/transport bits vhost-net
  advertises (NOTIFY_ON_EMPTY, ANY_LAYOUT, INDIRECT_DESC, EVENT_IDX, VERSION_1, RING_RESET,
  IN_ORDER, UDP-tunnel GSO), the virtio-net offload bits the tap provides (CSUM, GUEST_CSUM,
  TSO4/6, ECN, UFO, USO) and MQ;
* ``max_queue_size``: the largest ring the backend accepts;
* ``max_queue_pairs``: the most queue pairs a VM may use;
* ``mtu``: whether the backend serves VIRTIO_NET_F_MTU (the guest may be told an MTU).

VHOST_F_LOG_ALL (26) and VHOST_USER_F_PROTOCOL_FEATURES (30) are never part of a version:
they are backend plumbing the shim adds itself. A version is written either as a registry
name (``org.kernel.vhost-net.v5``) or as a self-describing value list; both are accepted
everywhere. The grammar (docs/versions.md has the long form)::

    value-list = "vhost-net:" item *("," item)        ; each key exactly once
    item       = "features=" feats / "queue-size=" N / "queue-pairs=" N / "mtu=" ("on"/"off")
    feats      = term *("+" term)                      ; the union of the terms
    term       = "0x" HEX / bit-name                   ; bit names as in kvhost.features

Masking: serving version V means offering exactly V's bits (:func:`serve_features`); a host
*supports* V when its :class:`Offer` has all of V's bits and meets each of V's limits
(:func:`missing` says why not). Bits the kernel advertises but kvhost cannot serve through the
shim (ACCESS_PLATFORM: the shim does no IOTLB translation) never count as offered, and no
registry version contains one, so one unservable bit never strands the rest of the ladder.

This module is pure logic (layer 2): it reads what a host has from any object shaped like
:class:`kvhost.probe.Probe` (see :class:`ProbeLike`) and never touches a device.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Protocol

from kvhost import features as fb
from kvhost.errors import VersionError

BACKEND = "vhost-net"
NAME_PREFIX = "org.kernel.vhost-net."

#: vhost's VHOST_SET_VRING_NUM accepts a power of two up to 0xffff in every release
KERNEL_MAX_QUEUE_SIZE = 32768
#: virtio-net's max_virtqueue_pairs range (virtio 1.x, 5.1.4)
MAX_QUEUE_PAIRS = 0x8000
#: queue pairs every multiqueue tap accepts: MAX_TAP_QUEUES was 8 when IFF_MULTI_QUEUE
#: arrived in 3.8 and only grew later; the probe does not measure the real limit
MULTIQUEUE_TAP_PAIRS = 8

#: bits that are backend plumbing, not interface; the reason shown when someone puts one in
NOT_INTERFACE: dict[int, str] = {
    fb.bit("LOG_ALL"): "it is dirty-log plumbing the backend adds itself",
    fb.bit("PROTOCOL_FEATURES"): "it is vhost-user plumbing the shim adds itself",
    fb.bit("MTU"): "MTU support is written mtu=on",
}

#: bits a kernel may advertise that kvhost cannot serve; they never count as offered
UNSERVABLE: dict[int, str] = {
    fb.bit("ACCESS_PLATFORM"): "kvhost's shim does no IOTLB translation",
}


def _bits(provides: Callable[[fb.Bit], bool]) -> int:
    return fb.mask(b.name for b in fb.TABLE if provides(b))


# The bit classes below come from the provider column of kvhost/data/features.json.
#: bits vhost-net must advertise (reference §2); the UDP-tunnel CSUM pair is here although
#: no release advertises it yet, so no host offers it
VHOST_NET_BITS = _bits(lambda b: b.vhost_net)
#: virtio-net bits that exist only through tap offloads
TAP_BITS = _bits(lambda b: b.tap_offload is not None)
#: bits that need vhost-net's header handling *and* the tap's offload (UDP-tunnel GSO)
TUNNEL_BITS = _bits(lambda b: b.vhost_net and b.tap_offload is not None)
#: multiqueue taps provide it, and with it queue pairs beyond one
MQ = _bits(lambda b: b.multiqueue)
MTU = fb.bit("MTU")
#: every bit a vhost-net interface version may contain
INTERFACE_BITS = VHOST_NET_BITS | TAP_BITS | MQ


@dataclass(frozen=True, slots=True)
class InterfaceVersion:
    """One interface version. ``name`` is None for an unregistered value list.

    ``first_kernel`` and ``adds`` are registry annotations; they do not take part in
    comparisons (two versions with the same values are the same interface, see
    :meth:`same_interface`).
    """

    name: str | None
    features: int
    max_queue_size: int
    max_queue_pairs: int
    mtu: bool
    first_kernel: str | None = field(default=None, compare=False)
    adds: str | None = field(default=None, compare=False)

    def spec(self) -> str:
        """The canonical self-describing value list; ``parse(v.spec())`` gives ``v`` back."""
        return (
            f"{BACKEND}:features=0x{self.features:x},queue-size={self.max_queue_size},"
            f"queue-pairs={self.max_queue_pairs},mtu={'on' if self.mtu else 'off'}"
        )

    @property
    def label(self) -> str:
        """The registry name when there is one, else the value list."""
        return self.name or self.spec()

    def values(self) -> tuple[int, int, int, bool]:
        return (self.features, self.max_queue_size, self.max_queue_pairs, self.mtu)

    def same_interface(self, other: InterfaceVersion) -> bool:
        """True when both fix the same guest-visible interface, whatever their names."""
        return self.values() == other.values()

    def feature_names(self) -> list[str]:
        return fb.names(self.features)


@dataclass(frozen=True, slots=True)
class Offer:
    """What one host can serve through kvhost.

    ``features`` holds only servable interface bits; ``unservable`` the bits the kernel
    advertised that kvhost cannot serve; ``problems`` one sentence per reason the host
    cannot serve anything at all (e.g. no /dev/vhost-net).
    """

    features: int
    max_queue_size: int
    max_queue_pairs: int
    mtu: bool
    unservable: int = 0
    problems: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "features": f"0x{self.features:x}",
            "feature_names": fb.names(self.features),
            "max_queue_size": self.max_queue_size,
            "max_queue_pairs": self.max_queue_pairs,
            "mtu": self.mtu,
            "unservable": fb.names(self.unservable),
            "problems": list(self.problems),
        }


# --- what a host offers ---------------------------------------------------------------------


class VhostNetLike(Protocol):
    @property
    def features(self) -> int: ...


class TunLike(Protocol):
    @property
    def offloads(self) -> tuple[str, ...]: ...

    @property
    def multi_queue(self) -> bool: ...

    @property
    def vnet_hdr(self) -> bool: ...


class ProbeLike(Protocol):
    """The part of :class:`kvhost.probe.Probe` this module reads."""

    @property
    def vhost_net(self) -> VhostNetLike | None: ...

    @property
    def vhost_net_error(self) -> str | None: ...

    @property
    def tun(self) -> TunLike | None: ...

    @property
    def tun_error(self) -> str | None: ...


def host_offer(probe: ProbeLike) -> Offer:
    """What the probed host can serve: vhost-net's interface bits minus unservable ones,
    plus the tap offloads the kernel accepted, plus MQ when taps are multiqueue.

    A host without a usable /dev/vhost-net or /dev/net/tun offers nothing; ``problems`` says
    why, in the probe's own words.
    """
    problems: list[str] = []
    if probe.vhost_net is None:
        problems.append(probe.vhost_net_error or "/dev/vhost-net is unavailable")
    if probe.tun is None:
        problems.append(probe.tun_error or "/dev/net/tun is unavailable")
    elif probe.tun_error:
        # the tap offload probe could not run: without it no offload bit is known
        problems.append(probe.tun_error)
    if problems or probe.vhost_net is None or probe.tun is None:
        return Offer(0, 0, 0, False, 0, tuple(problems))

    kernel = probe.vhost_net.features
    unservable = 0
    for b in UNSERVABLE:
        unservable |= kernel & b
    ring = kernel & VHOST_NET_BITS & ~unservable & ~TUNNEL_BITS
    tap = fb.tap_offload_features(probe.tun.offloads) if probe.tun.vnet_hdr else 0
    # vhost-net must size the 24-byte tunnel header and the tap must accept the offload
    tunnel = kernel & tap & TUNNEL_BITS
    offered = ring | (tap & ~TUNNEL_BITS) | tunnel
    pairs = 1
    if probe.tun.multi_queue:
        offered |= MQ
        pairs = MULTIQUEUE_TAP_PAIRS
    # The tap's MTU is set (SIOCSIFMTU) on every kernel, so MTU is always servable.
    return Offer(offered, KERNEL_MAX_QUEUE_SIZE, pairs, True, unservable, ())


# --- the registry ---------------------------------------------------------------------------


def registry() -> list[InterfaceVersion]:
    """The published versions, oldest first (a fresh list; the data file is read once).

    Raises VersionError when the shipped data file is inconsistent (a packaging bug).
    """
    return list(_registry())


@cache
def _registry() -> tuple[InterfaceVersion, ...]:
    return load_registry(fb.data_file("versions.json"))


def load_registry(path: Path) -> tuple[InterfaceVersion, ...]:
    """The versions of the registry file at ``path``, oldest first; :func:`registry` reads
    the shipped one (or ``$KVHOST_DATA_DIR``'s copy, see kvhost.features.data_file).

    Raises VersionError when an entry names an unknown bit or is not a valid interface.
    """
    raw = json.loads(path.read_text())
    out: list[InterfaceVersion] = []
    for entry in raw["versions"]:
        name = entry["name"]
        try:
            feats = fb.mask(entry["features"])
        except KeyError as err:
            raise VersionError(f"registry entry {name} names unknown bit {err}") from None
        v = InterfaceVersion(
            name,
            feats,
            int(entry["queue_size"]),
            int(entry["queue_pairs"]),
            bool(entry["mtu"]),
            entry.get("first_kernel"),
            entry.get("adds"),
        )
        problem = _invalid(v)
        if problem:
            raise VersionError(f"registry entry {name} is invalid: {problem}")
        out.append(v)
    return tuple(out)


def names() -> list[str]:
    return [v.label for v in registry()]


def by_name(name: str) -> InterfaceVersion | None:
    for v in _registry():
        if v.name == name:
            return v
    return None


def registered(version: InterfaceVersion) -> InterfaceVersion:
    """The registry entry with the same values as ``version``, else ``version`` itself."""
    for v in registry():
        if v.same_interface(version):
            return v
    return version


# --- parsing --------------------------------------------------------------------------------

_EXAMPLE = f"{BACKEND}:features=MRG_RXBUF+EVENT_IDX+...,queue-size=1024,queue-pairs=8,mtu=on"
_KEYS = ("features", "queue-size", "queue-pairs", "mtu")
_NUMBER = re.compile(r"[0-9]+")


def _fail(problem: str) -> VersionError:
    return VersionError(
        f"{problem}; known versions are {', '.join(names())}, or a value list such as "
        f"{_EXAMPLE} (see docs/versions.md)"
    )


def parse(text: str) -> InterfaceVersion:
    """A registry name or a value list -> the version (the registry entry when the values
    match one).

    Raises VersionError, one sentence naming what is wrong and listing the known versions.
    """
    text = text.strip()
    if not text:
        raise _fail("empty interface version")
    if not text.startswith(f"{BACKEND}:"):
        found = by_name(text)
        if found is not None:
            return found
        if ":" in text and "=" in text:
            backend = text.split(":", 1)[0]
            raise _fail(f"value list {text!r} is for backend {backend!r}, not {BACKEND!r}")
        raise _fail(f"unknown interface version {text!r}")
    return registered(_parse_values(text, text[len(BACKEND) + 1 :]))


def _parse_values(text: str, body: str) -> InterfaceVersion:
    seen: dict[str, str] = {}
    for item in body.split(","):
        key, sep, value = item.partition("=")
        key, value = key.strip().lower(), value.strip()
        if not sep or not key or not value:
            raise _fail(f"{item.strip()!r} in {text!r} is not key=value")
        if key not in _KEYS:
            raise _fail(f"unknown key {key!r} in {text!r} (keys: {', '.join(_KEYS)})")
        if key in seen:
            raise _fail(f"key {key!r} appears twice in {text!r}")
        seen[key] = value
    absent = [k for k in _KEYS if k not in seen]
    if absent:
        raise _fail(f"{text!r} lacks {', '.join(absent)}, a value list must give all of {_KEYS}")
    v = InterfaceVersion(
        None,
        _parse_features(seen["features"], text),
        _parse_int("queue-size", seen["queue-size"], text),
        _parse_int("queue-pairs", seen["queue-pairs"], text),
        _parse_switch(seen["mtu"], text),
    )
    problem = _invalid(v)
    if problem:
        raise _fail(f"{text!r} is not a valid interface: {problem}")
    return v


def _parse_features(value: str, text: str) -> int:
    out = 0
    for term in value.split("+"):
        term = term.strip()
        if term.lower().startswith("0x"):
            try:
                out |= int(term, 16)
            except ValueError:
                raise _fail(f"{term!r} in {text!r} is not a hexadecimal number") from None
        elif term:
            try:
                out |= fb.bit(term)
            except KeyError:
                raise _fail(f"unknown feature bit name {term!r} in {text!r}") from None
        else:
            raise _fail(f"empty term in features of {text!r}")
    return out


def _parse_int(key: str, value: str, text: str) -> int:
    if not _NUMBER.fullmatch(value):
        raise _fail(f"{key}={value} in {text!r} is not a decimal number")
    return int(value)


def _parse_switch(value: str, text: str) -> bool:
    if value.lower() in ("on", "true", "yes", "1"):
        return True
    if value.lower() in ("off", "false", "no", "0"):
        return False
    raise _fail(f"mtu={value} in {text!r} must be on or off")


def _invalid(v: InterfaceVersion) -> str | None:
    """Why ``v`` is not a well-formed vhost-net interface, or None."""
    if v.features >> fb.MAX_BITS:
        return f"feature bits above {fb.MAX_BITS - 1} do not exist in virtio"
    for b, why in NOT_INTERFACE.items():
        if v.features & b:
            return f"{fb.names(b)[0]} cannot be part of a version: {why}"
    stray = v.features & ~INTERFACE_BITS
    if stray:
        return (
            f"{', '.join(fb.names(stray))} "
            f"{'is not a bit' if len(fb.names(stray)) == 1 else 'are not bits'} a vhost-net "
            "backend provides (QEMU's device model sets such bits itself)"
        )
    size = v.max_queue_size
    if not 1 <= size <= KERNEL_MAX_QUEUE_SIZE or size & (size - 1):
        return f"queue-size={size} must be a power of two from 1 to {KERNEL_MAX_QUEUE_SIZE}"
    if not 1 <= v.max_queue_pairs <= MAX_QUEUE_PAIRS:
        return f"queue-pairs={v.max_queue_pairs} must be from 1 to {MAX_QUEUE_PAIRS}"
    if v.max_queue_pairs > 1 and not v.features & MQ:
        return f"queue-pairs={v.max_queue_pairs} needs the MQ bit"
    return None


# --- masking --------------------------------------------------------------------------------


def missing_bits(version: InterfaceVersion, offer: Offer) -> int:
    """Bits of ``version`` the host cannot offer."""
    return version.features & ~offer.features


def missing(version: InterfaceVersion, offer: Offer) -> list[str]:
    """Why ``offer`` cannot serve ``version``: one phrase per reason; empty = supported."""
    if offer.problems:
        return list(offer.problems)
    out: list[str] = []
    lack = missing_bits(version, offer)
    if lack:
        parts = []
        for n in fb.iter_bits(lack):
            why = UNSERVABLE.get(1 << n)
            if why and offer.unservable & (1 << n):
                parts.append(f"{fb.name_of(n)} (the kernel offers it but {why})")
            elif why:
                parts.append(f"{fb.name_of(n)} ({why})")
            else:
                parts.append(fb.name_of(n))
        out.append(f"missing feature bits {', '.join(parts)}")
    if version.max_queue_size > offer.max_queue_size:
        out.append(
            f"queue size {version.max_queue_size} exceeds this host's {offer.max_queue_size}"
        )
    if version.max_queue_pairs > offer.max_queue_pairs:
        why = "" if offer.features & MQ else " (its tap has no IFF_MULTI_QUEUE)"
        out.append(
            f"{version.max_queue_pairs} queue pairs exceed this host's {offer.max_queue_pairs}{why}"
        )
    if version.mtu and not offer.mtu:
        out.append("MTU support is not offered")
    return out


def supports(offer: Offer, version: InterfaceVersion) -> bool:
    return not missing(version, offer)


def supported(offer: Offer) -> list[InterfaceVersion]:
    """Registry versions ``offer`` can serve, oldest first."""
    return [v for v in registry() if supports(offer, v)]


def latest(offer: Offer) -> InterfaceVersion:
    """The newest registry version ``offer`` can serve.

    Raises VersionError saying why the host serves none.
    """
    ok = supported(offer)
    if ok:
        return ok[-1]
    oldest = registry()[0]
    raise VersionError(
        f"this host serves no interface version: {oldest.label} needs "
        f"{'; '.join(missing(oldest, offer))}"
    )


def serve_features(version: InterfaceVersion) -> int:
    """The bits a backend serving ``version`` offers in GET_FEATURES: exactly the version's
    bits, plus VIRTIO_NET_F_MTU when it has MTU support. PROTOCOL_FEATURES and LOG_ALL are
    not included; the shim adds them itself."""
    return version.features | (MTU if version.mtu else 0)
