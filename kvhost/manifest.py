"""Manifests: what one host's kernel vhost-net can serve, as a file management reads.

A manifest is one JSON object (schema 1)::

    {
      "schema": 1,
      "backend": "vhost-net",
      "kernel_release": "6.1.0-56-amd64",
      "generated_at": "2026-01-01T12:00:00.123456Z",        # UTC, ISO 8601
      "generated_by": "kvhost 0.1.0",
      "latest": "org.kernel.vhost-net.v5",                  # newest supported version
      "supported": ["org.kernel.vhost-net.v1", ...],        # oldest first
      "versions": {"org.kernel.vhost-net.v1": "vhost-net:features=0x...,...", ...},
      "offer": {...},                                       # versions.Offer.to_json()
      "probe": {...}                                        # kvhost.probe.Probe.to_json()
    }

``versions`` spells out every supported name as a value list, so a reader whose registry is
older than the writer's can still interpret the file. Files are replaced atomically (temp
file in the same directory, fsync, rename, fsync of the directory): a reader sees the old
file or the new one, never a mix, however many writers race.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from kvhost import __version__
from kvhost import features as fb
from kvhost import versions as ver
from kvhost.errors import KvhostError, UsageError, VersionError

SCHEMA = 1
DEFAULT_PATH = Path("/run/kvhost/vhost-net.json")


class ManifestError(KvhostError):
    """No manifest could be generated (the probe found nothing servable) or written."""


class NoVersionServed(ManifestError):
    """The probe found nothing servable: this host serves no interface version at all
    (as opposed to a manifest that could not be written)."""


class ProbeJSON(ver.ProbeLike, Protocol):
    @property
    def kernel_release(self) -> str: ...

    def to_json(self) -> dict[str, Any]: ...


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def build(probe: ProbeJSON, *, generated_at: str | None = None) -> dict[str, Any]:
    """The manifest for ``probe``.

    Raises NoVersionServed (a ManifestError) when the host serves no version (the sentence
    says why), so a caller never replaces a good manifest with an empty one.
    """
    offer = ver.host_offer(probe)
    ok = ver.supported(offer)
    if not ok:
        oldest = ver.registry()[0]
        raise NoVersionServed(
            f"no manifest written: this host serves no interface version "
            f"({'; '.join(ver.missing(oldest, offer))})"
        )
    return {
        "schema": SCHEMA,
        "backend": ver.BACKEND,
        "kernel_release": probe.kernel_release,
        "generated_at": generated_at or _now(),
        "generated_by": f"kvhost {__version__}",
        "latest": ok[-1].label,
        "supported": [v.label for v in ok],
        "versions": {v.label: v.spec() for v in ok},
        "offer": offer.to_json(),
        "probe": probe.to_json(),
    }


def encode(manifest: dict[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode()


def write_atomic(
    path: Path, data: bytes, *, mode: int = 0o644, action: str = "write manifest"
) -> None:
    """Replace ``path`` with ``data`` atomically (same-directory temp file, fsync, rename).

    Creates the parent directory. Raises ManifestError "cannot ACTION PATH: reason" on any
    OS error (``action`` says what the caller was doing, e.g. "write NFD feature file");
    the previous file is then left untouched and no temp file remains.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise ManifestError(f"cannot {action} {path}: {err.strerror}") from err
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise ManifestError(f"cannot {action} {path}: {err.strerror}") from err
    # The rename is durable only once the directory entry is on disk.
    with contextlib.suppress(OSError):
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def generate(path: Path | None = DEFAULT_PATH) -> dict[str, Any]:
    """Probe this host and write its manifest to ``path`` (None: only return it).

    Raises ManifestError when the probe finds nothing servable or the file cannot be
    written; the previous manifest then stays in place.
    """
    from kvhost.probe import probe  # layer 4; imported late so reading manifests needs no cffi

    manifest = build(probe())
    if path is not None:
        write_atomic(path, encode(manifest))
    return manifest


# --- reading --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Manifest:
    """A manifest read back from a file."""

    path: str
    kernel_release: str
    generated_at: str
    latest: ver.InterfaceVersion
    supported: tuple[ver.InterfaceVersion, ...]
    offer: ver.Offer
    raw: dict[str, Any]

    @property
    def label(self) -> str:
        return f"{self.path} (kernel {self.kernel_release})"


def _offer_from_json(d: dict[str, Any]) -> ver.Offer:
    return ver.Offer(
        int(d["features"], 16),
        int(d["max_queue_size"]),
        int(d["max_queue_pairs"]),
        bool(d["mtu"]),
        fb.mask(d.get("unservable", [])),
        tuple(d.get("problems", [])),
    )


def load(data: dict[str, Any], path: str = "<manifest>") -> Manifest:
    """Interpret a decoded manifest. Raises UsageError naming the file and the problem."""
    try:
        if data.get("schema") != SCHEMA:
            raise UsageError(
                f"manifest {path} has schema {data.get('schema')!r}; this kvhost reads "
                f"schema {SCHEMA}"
            )
        if data.get("backend") != ver.BACKEND:
            raise UsageError(f"manifest {path} is for backend {data.get('backend')!r}")
        specs: dict[str, str] = data["versions"]
        supported = []
        for name in data["supported"]:
            v = ver.parse(specs[name])
            known = ver.by_name(name)
            if known is not None and not known.same_interface(v):
                raise UsageError(
                    f"manifest {path} defines {name} as {specs[name]}, but the registry "
                    f"says {known.spec()}: one side's registry was edited"
                )
            supported.append(known or ver.InterfaceVersion(name, *v.values()))
        latest = next(v for v in supported if v.name == data["latest"])
        return Manifest(
            path,
            str(data["kernel_release"]),
            str(data["generated_at"]),
            latest,
            tuple(supported),
            _offer_from_json(data["offer"]),
            data,
        )
    except UsageError:
        raise
    except (KeyError, TypeError, ValueError, StopIteration, VersionError, AttributeError) as e:
        raise UsageError(f"manifest {path} is malformed ({type(e).__name__}: {e})") from None


def read(path: str | Path) -> Manifest:
    """Read and check a manifest file. Raises UsageError naming the file and the problem."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise UsageError(f"cannot read manifest {path}: {err.strerror}") from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UsageError(f"manifest {path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise UsageError(f"manifest {path} is not a JSON object")
    return load(data, str(path))


# --- compat ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Compat:
    """The newest version every host supports (None: there is none) and why not newer."""

    version: ver.InterfaceVersion | None
    reasons: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version.label if self.version else None,
            "spec": self.version.spec() if self.version else None,
            "reasons": list(self.reasons),
        }


def host_offer(path: str | Path | None = None) -> tuple[ver.Offer, str]:
    """What a host offers and a label for messages: the host whose manifest is at ``path``,
    or, without one, this host by probing its kernel. Raises ManifestError/UsageError for a
    manifest that cannot be read, and what :func:`kvhost.probe.probe` raises."""
    if path is not None:
        m = read(path)
        return m.offer, m.label
    from kvhost.probe import probe  # layer 4; imported late so reading manifests needs no cffi

    p = probe()
    return ver.host_offer(p), f"this host (kernel {p.kernel_release})"


def compat(manifests: Sequence[Manifest]) -> Compat:
    """The version to record for a VM that must move freely among these hosts.

    ``reasons`` names, for each host whose latest version another host cannot serve, the
    bits and limits that are missing there: exactly why an unpinned VM would fail to migrate.
    """
    if not manifests:
        raise UsageError("compat needs at least one manifest")
    common = [
        v
        for v in manifests[0].supported
        if all(any(v.same_interface(w) for w in m.supported) for m in manifests[1:])
    ]
    reasons: list[str] = []
    for src in manifests:
        for dst in manifests:
            if src is dst:
                continue
            lack = ver.missing(src.latest, dst.offer)
            if lack:
                reasons.append(
                    f"a VM created at {src.label}'s latest {src.latest.label} cannot move to "
                    f"{dst.label}: {'; '.join(lack)}"
                )
    if not common:
        ranges = ", ".join(
            f"{m.label} supports {m.supported[0].label} to {m.latest.label}" for m in manifests
        )
        reasons.insert(0, f"no version is supported by every host ({ranges})")
        return Compat(None, tuple(reasons))
    return Compat(common[-1], tuple(reasons))
