"""What this host's kernel offers a vhost-net backend, as plain data.

:func:`probe` asks the kernel directly -- it never infers from the release string, since
distribution and stable kernels carry backports (reference section 1e.2):

* ``/dev/vhost-net``: VHOST_GET_FEATURES_ARRAY (count 2) or else VHOST_GET_FEATURES,
  VHOST_GET_BACKEND_FEATURES, VHOST_GET_FORK_FROM_OWNER presence. No SET_OWNER, so
  probing starts no vhost worker.
* ``/dev/net/tun``: TUNGETFEATURES, and the TUN_F_* offloads a temporary tap accepts
  (creating that tap needs CAP_NET_ADMIN; it is gone when the probe returns).
* ``max_mem_regions`` from the vhost module, and which vhost device nodes exist and open.

A failure of one part is recorded as a one-sentence reason (``vhost_net_error``,
``tun_error``, ``devices[path].error``) instead of raising, so a probe always completes.
The JSON shape (:meth:`Probe.to_json`) is documented in ``docs/probe-json.md`` and stable:
fields are only ever added.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvhost import abi, features
from kvhost.errors import DeviceUnavailable, KernelError
from kvhost.ioctl import ioctl, open_device, read_max_mem_regions
from kvhost.tap import TUN_PATH, probe_offloads
from kvhost.vhost import ABSENT_ERRNOS, DEFAULT_PATH, VhostNet

SCHEMA = 1

#: device nodes reported in ``devices``, in report order
DEVICE_PATHS: tuple[str, ...] = ("/dev/vhost-net", "/dev/vhost-vsock", "/dev/vhost-scsi", TUN_PATH)

#: TUNGETFEATURES flag names (linux/if_tun.h)
TUN_FLAG_NAMES: dict[int, str] = {
    abi.IFF_TUN: "TUN",
    abi.IFF_TAP: "TAP",
    abi.IFF_NAPI: "NAPI",
    abi.IFF_NAPI_FRAGS: "NAPI_FRAGS",
    abi.IFF_NO_CARRIER: "NO_CARRIER",
    abi.IFF_MULTI_QUEUE: "MULTI_QUEUE",
    abi.IFF_NO_PI: "NO_PI",
    abi.IFF_ONE_QUEUE: "ONE_QUEUE",
    abi.IFF_VNET_HDR: "VNET_HDR",
    abi.IFF_TUN_EXCL: "TUN_EXCL",
}

#: VHOST_BACKEND_F_* bit numbers (linux/vhost_types.h)
BACKEND_FEATURE_NAMES: dict[int, str] = {
    abi.VHOST_BACKEND_F_IOTLB_MSG_V2: "IOTLB_MSG_V2",
    abi.VHOST_BACKEND_F_IOTLB_BATCH: "IOTLB_BATCH",
    abi.VHOST_BACKEND_F_IOTLB_ASID: "IOTLB_ASID",
    abi.VHOST_BACKEND_F_SUSPEND: "SUSPEND",
    abi.VHOST_BACKEND_F_RESUME: "RESUME",
    abi.VHOST_BACKEND_F_ENABLE_AFTER_DRIVER_OK: "ENABLE_AFTER_DRIVER_OK",
    abi.VHOST_BACKEND_F_DESC_ASID: "DESC_ASID",
    abi.VHOST_BACKEND_F_IOTLB_PERSIST: "IOTLB_PERSIST",
}

_MODULES = {
    "/dev/vhost-net": "vhost_net",
    "/dev/vhost-vsock": "vhost_vsock",
    "/dev/vhost-scsi": "vhost_scsi",
    TUN_PATH: "tun",
}


def tun_flag_names(flags: int) -> list[str]:
    """Names of the IFF_* flags set in ``flags``; unknown bits read ``0x...``."""
    out = [name for bit, name in sorted(TUN_FLAG_NAMES.items()) if flags & bit]
    rest = flags & ~sum(TUN_FLAG_NAMES)
    if rest:
        out.append(f"0x{rest:x}")
    return out


def backend_feature_names(mask: int) -> list[str]:
    """Names of the ``1 << VHOST_BACKEND_F_*`` bits set in ``mask``."""
    return [BACKEND_FEATURE_NAMES.get(n, f"BIT_{n}") for n in features.iter_bits(mask)]


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """A device node: whether it exists, whether this process can open it, and why not."""

    exists: bool
    opens: bool
    error: str | None = None


@dataclass(frozen=True, slots=True)
class VhostNetInfo:
    """What ``/dev/vhost-net`` reports."""

    #: every offered bit, including bits above 63 when ``features_array``
    features: int
    #: VHOST_GET_FEATURES_ARRAY worked (6.17+); otherwise only bits 0-63 are known
    features_array: bool
    #: VHOST_GET_BACKEND_FEATURES (a mask of 1 << VHOST_BACKEND_F_*); None before 4.19
    backend_features: int | None
    #: the VHOST_SET/GET_FORK_FROM_OWNER ioctls exist (numbers 0x84/0x85)
    fork_owner: bool


@dataclass(frozen=True, slots=True)
class TunInfo:
    """What ``/dev/net/tun`` reports."""

    #: TUNGETFEATURES (IFF_* flags)
    features: int
    #: names from kvhost.features.TAP_OFFLOAD_BITS the tap accepted; empty when the offload
    #: probe could not run (then ``Probe.tun_error`` says why)
    offloads: tuple[str, ...]
    multi_queue: bool
    vnet_hdr: bool


@dataclass(frozen=True, slots=True)
class Probe:
    """One probe of this host. JSON: :meth:`to_json` / :meth:`from_json`."""

    kernel_release: str
    vhost_net: VhostNetInfo | None
    vhost_net_error: str | None
    tun: TunInfo | None
    tun_error: str | None
    max_mem_regions: int
    devices: dict[str, DeviceInfo] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The documented JSON shape (``docs/probe-json.md``); feature sets as hex strings."""
        vn: dict[str, Any] | None = None
        if self.vhost_net is not None:
            v = self.vhost_net
            vn = {
                "features": hex(v.features),
                "feature_names": features.names(v.features),
                "features_array": v.features_array,
                "backend_features": None if v.backend_features is None else hex(v.backend_features),
                "backend_feature_names": backend_feature_names(v.backend_features or 0),
                "fork_owner": v.fork_owner,
            }
        tun: dict[str, Any] | None = None
        if self.tun is not None:
            t = self.tun
            tun = {
                "features": hex(t.features),
                "feature_names": tun_flag_names(t.features),
                "offloads": list(t.offloads),
                "offload_features": hex(features.tap_offload_features(t.offloads)),
                "multi_queue": t.multi_queue,
                "vnet_hdr": t.vnet_hdr,
            }
        return {
            "schema": SCHEMA,
            "kernel_release": self.kernel_release,
            "vhost_net": vn,
            "vhost_net_error": self.vhost_net_error,
            "tun": tun,
            "tun_error": self.tun_error,
            "max_mem_regions": self.max_mem_regions,
            "devices": {
                path: {"exists": d.exists, "opens": d.opens, "error": d.error}
                for path, d in self.devices.items()
            },
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Probe:
        """Rebuild a probe from :meth:`to_json` output (derived ``*_names`` fields and
        unknown fields are ignored, so newer writers stay readable).

        Raises ``ValueError`` naming the first missing or mistyped field.
        """
        r = _Reader(data, "probe")
        schema = r.get_int("schema")
        if schema < 1:
            raise ValueError(f"probe: schema {schema} is not a kvhost probe schema (expected 1+)")
        vn = r.optional_obj("vhost_net")
        tun = r.optional_obj("tun")
        devices = r.get_obj("devices")
        return cls(
            kernel_release=r.get_str("kernel_release"),
            vhost_net=None
            if vn is None
            else VhostNetInfo(
                features=vn.get_hex("features"),
                features_array=vn.get_bool("features_array"),
                backend_features=vn.optional_hex("backend_features"),
                fork_owner=vn.get_bool("fork_owner"),
            ),
            vhost_net_error=r.optional_str("vhost_net_error"),
            tun=None
            if tun is None
            else TunInfo(
                features=tun.get_hex("features"),
                offloads=tuple(tun.offloads("offloads")),
                multi_queue=tun.get_bool("multi_queue"),
                vnet_hdr=tun.get_bool("vnet_hdr"),
            ),
            tun_error=r.optional_str("tun_error"),
            max_mem_regions=r.get_int("max_mem_regions"),
            devices={
                path: DeviceInfo(
                    exists=d.get_bool("exists"),
                    opens=d.get_bool("opens"),
                    error=d.optional_str("error"),
                )
                for path, d in devices.items_obj()
            },
        )


class _Reader:
    """Typed field access on decoded JSON with errors that name the field's path."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
        self.data = data
        self.where = where

    def _get(self, key: str) -> Any:
        if key not in self.data:
            raise ValueError(f"{self.where}.{key}: missing")
        return self.data[key]

    def _bad(self, key: str, expected: str) -> ValueError:
        return ValueError(f"{self.where}.{key}: expected {expected}, got {self.data[key]!r}")

    def get_str(self, key: str) -> str:
        v = self._get(key)
        if not isinstance(v, str):
            raise self._bad(key, "a string")
        return v

    def optional_str(self, key: str) -> str | None:
        return None if self._get(key) is None else self.get_str(key)

    def get_bool(self, key: str) -> bool:
        v = self._get(key)
        if not isinstance(v, bool):
            raise self._bad(key, "true or false")
        return v

    def get_int(self, key: str) -> int:
        v = self._get(key)
        if not isinstance(v, int) or isinstance(v, bool):
            raise self._bad(key, "an integer")
        return v

    def get_hex(self, key: str) -> int:
        v = self._get(key)
        if isinstance(v, str) and v.lower().startswith("0x"):
            try:
                n = int(v, 16)
            except ValueError:
                raise self._bad(key, "a hex string like '0x1d008000'") from None
            if n >= 0:
                return n
        raise self._bad(key, "a hex string like '0x1d008000'")

    def optional_hex(self, key: str) -> int | None:
        return None if self._get(key) is None else self.get_hex(key)

    def get_obj(self, key: str) -> _Reader:
        return _Reader(self._get(key), f"{self.where}.{key}")

    def optional_obj(self, key: str) -> _Reader | None:
        return None if self._get(key) is None else self.get_obj(key)

    def items_obj(self) -> list[tuple[str, _Reader]]:
        return [(k, _Reader(v, f"{self.where}[{k!r}]")) for k, v in self.data.items()]

    def offloads(self, key: str) -> list[str]:
        v = self._get(key)
        known = features.TAP_OFFLOAD_BITS
        if not isinstance(v, list) or not all(isinstance(x, str) and x in known for x in v):
            raise self._bad(key, f"a list of offload names from {sorted(known)}")
        return v


# -- probing ---------------------------------------------------------------------------------
def _module_loaded(name: str) -> bool:
    return Path("/sys/module", name).exists()


def unavailable_sentence(path: str, err: KernelError) -> str:
    """One sentence: why ``path`` cannot be used and what to do about it."""
    module = _MODULES.get(path, "")
    if isinstance(err, DeviceUnavailable) and err.errno in (
        errno.ENOENT,
        errno.ENXIO,
        errno.ENODEV,
    ):
        if module and not _module_loaded(module):
            return (
                f"{path} is not available because the {module} kernel module is not loaded: "
                f"run 'modprobe {module}' as root (and check that the kernel was built with it)"
            )
        if err.errno == errno.ENOENT:
            return (
                f"{path} does not exist although the {module or 'driver'} module is loaded: "
                "create the node (udev normally does; 'udevadm trigger' or 'mknod') and retry"
            )
    if isinstance(err, DeviceUnavailable) and err.errno in (errno.EPERM, errno.EACCES):
        return (
            f"no permission to open {path}: run as root, add the user to the group owning "
            f"it (ls -l {path}), or have a privileged process pass the fd in"
        )
    return f"{path} is not usable: {err}"


def probe_devices(paths: tuple[str, ...] = DEVICE_PATHS) -> dict[str, DeviceInfo]:
    """Whether each device node exists and opens read-write (each is closed at once)."""
    out: dict[str, DeviceInfo] = {}
    for path in paths:
        exists = os.path.exists(path)
        try:
            os.close(open_device(path))
        except DeviceUnavailable as err:
            out[path] = DeviceInfo(exists, False, unavailable_sentence(path, err))
        else:
            out[path] = DeviceInfo(exists, True, None)
    return out


def probe_vhost_net(path: str = DEFAULT_PATH) -> VhostNetInfo:
    """Features of vhost-net; raises KernelError (DeviceUnavailable when it cannot open)."""
    with VhostNet(path) as dev:
        feats = dev.get_features()
        try:
            backend: int | None = dev.get_backend_features()
        except KernelError as err:
            if err.errno not in ABSENT_ERRNOS:
                raise
            backend = None
        fork = dev.get_fork_from_owner() is not None
        return VhostNetInfo(feats, bool(dev.features_array), backend, fork)


def probe_tun() -> tuple[TunInfo, str | None]:
    """TUNGETFEATURES plus accepted offloads; the second value says why the offload probe
    could not run (then offloads is empty). Raises KernelError if /dev/net/tun is unusable.
    """
    fd = open_device(TUN_PATH)
    try:
        # answered by /dev/net/tun itself, before any tap is attached
        buf = bytearray(4)
        ioctl(fd, abi.TUNGETFEATURES, buf, device=TUN_PATH)
        flags = int.from_bytes(buf, "little")
    finally:
        os.close(fd)
    offloads: tuple[str, ...] = ()
    reason: str | None = None
    try:
        offloads = probe_offloads()
    except KernelError as err:
        reason = f"cannot probe tap offloads, which needs a temporary tap: {err}"
    info = TunInfo(
        features=flags,
        offloads=offloads,
        multi_queue=bool(flags & abi.IFF_MULTI_QUEUE),
        vnet_hdr=bool(flags & abi.IFF_VNET_HDR),
    )
    return info, reason


def probe() -> Probe:
    """Probe this host; never raises for an unusable device (see the module docstring)."""
    devices = probe_devices()
    vhost: VhostNetInfo | None = None
    vhost_error: str | None = None
    try:
        vhost = probe_vhost_net()
    except KernelError as err:
        vhost_error = unavailable_sentence(DEFAULT_PATH, err)
    tun: TunInfo | None = None
    tun_error: str | None = None
    try:
        tun, tun_error = probe_tun()
    except KernelError as err:
        tun_error = unavailable_sentence(TUN_PATH, err)
    return Probe(
        kernel_release=os.uname().release,
        vhost_net=vhost,
        vhost_net_error=vhost_error,
        tun=tun,
        tun_error=tun_error,
        max_mem_regions=read_max_mem_regions(abi.VHOST_DEFAULT_MAX_MEM_REGIONS),
        devices=devices,
    )


# -- human rendering -------------------------------------------------------------------------
def _wrap(words: list[str], indent: int, width: int = 100) -> str:
    lines: list[str] = []
    line = ""
    for w in words:
        if line and indent + len(line) + 1 + len(w) > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}" if line else w
    lines.append(line)
    return ("\n" + " " * indent).join(lines) if line else "(none)"


def format_text(p: Probe) -> str:
    """The human report of ``kvhost probe``."""
    col = 18
    rows: list[tuple[str, str]] = [("kernel", p.kernel_release)]
    if p.vhost_net is not None:
        v = p.vhost_net
        how = "GET_FEATURES_ARRAY, 128 bits" if v.features_array else "GET_FEATURES, 64 bits"
        rows.append(("vhost-net features", f"0x{v.features:x} ({how})"))
        rows.append(("", _wrap(features.names(v.features), col)))
        if v.backend_features is None:
            rows.append(("backend features", "none (VHOST_GET_BACKEND_FEATURES absent)"))
        else:
            names = " ".join(backend_feature_names(v.backend_features)) or "none"
            rows.append(("backend features", f"0x{v.backend_features:x} {names}"))
        rows.append(("fork owner", "supported" if v.fork_owner else "not supported (no ioctl)"))
    else:
        rows.append(("vhost-net", f"unavailable: {p.vhost_net_error}"))
    if p.tun is not None:
        t = p.tun
        rows.append(("tun features", f"0x{t.features:x} {' '.join(tun_flag_names(t.features))}"))
        rows.append(("tap offloads", " ".join(t.offloads) or "none"))
        if p.tun_error:
            rows.append(("", p.tun_error))
    else:
        rows.append(("tun", f"unavailable: {p.tun_error}"))
    rows.append(("max mem regions", str(p.max_mem_regions)))
    for i, (path, d) in enumerate(p.devices.items()):
        state = "opens" if d.opens else ("exists, does not open" if d.exists else "missing")
        rows.append(("devices" if i == 0 else "", f"{path:<17} {state}"))
    return "\n".join(f"{k:<{col - 1}} {v}".rstrip() for k, v in rows)
