"""Kubernetes node-feature-discovery labels for this host's interface versions.

NFD's ``local`` feature source turns each file in
``/etc/kubernetes/node-feature-discovery/features.d/`` into node labels: one
``<namespace>/<name>[=<value>]`` per line, ``#`` starts a comment, the value defaults to
``true``, files over 64 kB are ignored, and so are dot files -- which is why
:func:`kvhost.manifest.write_atomic` (temp file ``.NAME.XXXX.tmp``, fsync, rename) is the
right writer: nfd-worker sees the old file or the new one, never a partial one.

kvhost writes, for a manifest whose latest version is v5 (prefix ``kvhost.io`` by default)::

    # kvhost: interface versions of kernel vhost-net on this node (kernel 6.1.0-56-amd64)
    # generated 2026-01-01T12:00:00.000000Z by kvhost 0.1.0
    kvhost.io/org.kernel.vhost-net.v1=true
    ...
    kvhost.io/org.kernel.vhost-net.v5=true
    kvhost.io/vhost-net.latest=org.kernel.vhost-net.v5

A label's name part is the registry name itself, so a scheduler places a VM whose recorded
version is V with the node selector ``kvhost.io/V: "true"``, no mapping table needed.
Kubernetes limits a label name part (and a value) to 63 characters of ``[A-Za-z0-9._-]``,
starting and ending alphanumeric, and the prefix to a DNS subdomain of at most 253; a name
that does not fit is refused here rather than silently dropped by nfd-master. nfd-master
also refuses namespaces under ``kubernetes.io`` / ``k8s.io`` except its own
``feature.node.kubernetes.io``; NFD releases that allow only that namespace need
``-extra-label-ns=kvhost.io`` (or ``--nfd-prefix feature.node.kubernetes.io``).
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any

from kvhost import manifest as mf
from kvhost.errors import UsageError

DEFAULT_DIR = Path("/etc/kubernetes/node-feature-discovery/features.d")
DEFAULT_PATH = DEFAULT_DIR / "kvhost"
DEFAULT_PREFIX = "kvhost.io"
#: the name part of the label carrying the latest version as its value
LATEST_NAME = "vhost-net.latest"
#: nfd-worker ignores larger feature files
MAX_FILE_SIZE = 64 * 1024

_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?")
_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
#: the only namespaces under kubernetes.io nfd-master accepts from a feature file
_NFD_OWN = ("feature.node.kubernetes.io", "profile.node.kubernetes.io")


def check_prefix(prefix: str) -> str:
    """``prefix`` if it is a label namespace nfd-master accepts. Raises UsageError why not."""
    labels = prefix.split(".")
    if not (0 < len(prefix) <= 253 and all(_DNS_LABEL.fullmatch(x) for x in labels)):
        raise UsageError(
            f"NFD label prefix {prefix!r} is not a DNS subdomain (lower-case letters, digits, "
            "'-' and '.', at most 253 characters); use e.g. kvhost.io"
        )
    reserved = any(prefix == d or prefix.endswith("." + d) for d in ("kubernetes.io", "k8s.io"))
    if reserved and prefix not in _NFD_OWN:
        raise UsageError(
            f"nfd-master drops labels in {prefix!r}: namespaces under kubernetes.io and k8s.io "
            "are reserved; use kvhost.io or feature.node.kubernetes.io"
        )
    return prefix


def check_name(name: str, what: str) -> str:
    """``name`` if it is a valid label name part (or non-empty value). Raises ManifestError."""
    if not _NAME.fullmatch(name):
        raise mf.ManifestError(
            f"{what} {name!r} cannot be a Kubernetes label name: at most 63 characters of "
            "letters, digits, '.', '_' and '-', starting and ending with a letter or digit"
        )
    return name


def labels(manifest: dict[str, Any], prefix: str = DEFAULT_PREFIX) -> dict[str, str]:
    """The node labels for a manifest built by :func:`kvhost.manifest.build`, in file order:
    one ``PREFIX/NAME=true`` per supported version (oldest first), then the latest.

    Raises UsageError for a bad prefix, ManifestError for a version name no label can carry.
    """
    check_prefix(prefix)
    out = {
        f"{prefix}/{check_name(name, 'interface version')}": "true"
        for name in manifest["supported"]
    }
    out[f"{prefix}/{LATEST_NAME}"] = check_name(manifest["latest"], "interface version")
    return out


def render(manifest: dict[str, Any], prefix: str = DEFAULT_PREFIX) -> str:
    """The feature file text for ``manifest`` (see the module docstring)."""
    head = (
        f"# kvhost: interface versions of kernel {manifest['backend']} on this node "
        f"(kernel {manifest['kernel_release']})\n"
        f"# generated {manifest['generated_at']} by {manifest['generated_by']}\n"
    )
    text = head + "".join(f"{k}={v}\n" for k, v in labels(manifest, prefix).items())
    if len(text.encode()) > MAX_FILE_SIZE:  # a registry of ~1000 versions; say so, not drop
        raise mf.ManifestError(f"NFD feature file would exceed nfd-worker's {MAX_FILE_SIZE} B")
    return text


def parse(text: str) -> dict[str, str]:
    """Labels of a feature file, read as nfd-worker reads one (comments skipped, value
    ``true`` when absent). Raises ValueError for a line without a namespace."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if "/" not in key:
            raise ValueError(f"feature file line {line!r} has no label namespace")
        out[key] = value if sep else "true"
    return out


def check_path(path: Path) -> Path:
    """``path`` if nfd-worker would read a file there. Raises UsageError why not."""
    if path.name.startswith(".") or str(path) == "-":
        raise UsageError(
            f"--nfd {path}: nfd-worker ignores dot files and reads only files; give a path "
            f"such as {DEFAULT_PATH}"
        )
    return path


def write(path: Path, manifest: dict[str, Any], prefix: str = DEFAULT_PREFIX) -> str:
    """Atomically replace the feature file at ``path``; returns the text written.

    Raises UsageError (bad path or prefix) or ManifestError (cannot write; the previous file
    is left in place).
    """
    text = render(manifest, prefix)
    mf.write_atomic(check_path(Path(path)), text.encode(), action="write NFD feature file")
    return text


def withdraw(path: Path) -> bool:
    """Remove the feature file (the host serves no version: its labels must not promise
    one). Returns whether a file was there. Raises ManifestError when it cannot be removed."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    except OSError as err:
        raise mf.ManifestError(f"cannot remove NFD feature file {path}: {err.strerror}") from err
    with contextlib.suppress(OSError):
        dfd = os.open(Path(path).parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return True
