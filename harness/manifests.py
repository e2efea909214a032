"""Manifests of capped hosts, and the real ``kvhost compat`` run on manifest files.

Capped hosts: a destination whose shim is pinned to a version serves nothing beyond it, so
its manifest (:func:`capped_manifest`) is the probe's with the offer intersected with the
cap -- features, queue limits and MTU -- and ``supported``/``latest`` recomputed from that
offer; the cap itself is recorded under ``"cap"``. ``kvhost compat`` then judges it like any
other host.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from harness.errors import ScenarioError
from kvhost import manifest, versions


def capped_offer(offer: versions.Offer, cap: versions.InterfaceVersion) -> versions.Offer:
    """What a host serves when its shim is pinned to ``cap``: nothing beyond it."""
    return versions.Offer(
        offer.features & cap.features,
        min(offer.max_queue_size, cap.max_queue_size),
        min(offer.max_queue_pairs, cap.max_queue_pairs),
        offer.mtu and cap.mtu,
        offer.unservable,
        offer.problems,
    )


def capped_manifest(host: dict[str, Any], cap: versions.InterfaceVersion) -> dict[str, Any]:
    """``host``'s manifest (as :func:`kvhost.manifest.build` made it) for a host whose shim
    is pinned to ``cap`` (see the module docstring). ManifestError if nothing is left."""
    loaded = manifest.load(host)
    offer = capped_offer(loaded.offer, cap)
    ok = versions.supported(offer)
    if not ok:
        raise manifest.ManifestError(
            f"a host capped at {cap.label} serves no registry version: "
            f"{'; '.join(versions.missing(versions.registry()[0], offer))}")
    out = dict(host)
    out.update(latest=ok[-1].label, supported=[v.label for v in ok],
               versions={v.label: v.spec() for v in ok}, offer=offer.to_json(), cap=cap.spec())
    manifest.load(out)  # the result must read back like any manifest
    return out


def kvhost_compat(*paths: Path) -> tuple[int, dict[str, Any]]:
    """Run the real ``kvhost compat --json`` on manifest files: (exit status, its JSON)."""
    run = subprocess.run([sys.executable, "-m", "kvhost.cli", "compat", "--json",
                          *map(str, paths)], capture_output=True, text=True, check=False)
    try:
        return run.returncode, json.loads(run.stdout)
    except json.JSONDecodeError as err:
        raise ScenarioError(f"kvhost compat printed no JSON ({err}): {run.stdout!r} "
                            f"{run.stderr!r}") from None


def host_versions() -> list[versions.InterfaceVersion]:
    """The versions this kernel serves, for parametrizing kernel-tier tests at collection;
    empty on a host without vhost-net (where that tier is deselected, not skipped)."""
    from kvhost.probe import probe

    try:
        return versions.supported(versions.host_offer(probe()))
    except Exception:
        return []
