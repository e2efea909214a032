"""Kernel tier: the manifest of the running kernel, and ``check`` agreeing with ``probe``.

Runs inside the test VM (Debian's 6.1 by default; ``--kernel 6.12`` also works).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.crosskernel import predicted_latest
from kvhost import features as fb
from kvhost import manifest as mf
from kvhost import nfd
from kvhost import versions as ver
from kvhost.cli import main
from kvhost.probe import probe
from kvhost.vhost import VhostNet

pytestmark = pytest.mark.kernel

#: newest version per Debian kernel, from the measured values of reference section 8
EXPECTED_LATEST = {"6.1.": "org.kernel.vhost-net.v5", "6.12.": "org.kernel.vhost-net.v7"}


@pytest.fixture
def scratch() -> Iterator[Path]:
    # /tmp inside the test VM is an overlay other tests share; /run is ours
    path = Path("/run") / f"kvtest-manifest-{os.getpid()}"
    path.mkdir(parents=True, exist_ok=True)
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


def _expected_latest(release: str) -> str:
    """Measured for the two Debian kernels (reference section 8); for any other kernel, what
    the registry's own first_kernel history predicts (a distro backport would show up here as
    a failure worth reading, not as a skip)."""
    for prefix, name in EXPECTED_LATEST.items():
        if release.startswith(prefix):
            return name
    return str(predicted_latest(release).name)


def test_manifest_names_the_version_this_kernel_supports(
    scratch: Path, fd_leak_check: None
) -> None:
    release = os.uname().release
    expected = _expected_latest(release)
    path = scratch / "vhost-net.json"
    written = mf.generate(path)
    m = mf.read(path)
    assert m.raw == written
    assert m.kernel_release == release
    assert m.latest.name == expected
    names = [v.name for v in ver.registry()]
    assert [v.name for v in m.supported] == names[: names.index(expected) + 1]
    # the embedded probe carries the raw GET_FEATURES value of this very kernel
    with VhostNet() as dev:
        raw = dev.get_features()
    assert int(m.raw["probe"]["vhost_net"]["features"], 16) == raw
    assert m.offer.unservable == raw & fb.bit("ACCESS_PLATFORM")
    assert m.offer.features & fb.bit("LOG_ALL") == 0


def test_check_agrees_with_probe(scratch: Path, capsys: pytest.CaptureFixture[str]) -> None:
    offer = ver.host_offer(probe())
    path = scratch / "vhost-net.json"
    assert main(["manifest", "--output", str(path)]) == 0
    capsys.readouterr()
    for v in ver.registry():
        expected = 0 if not ver.missing(v, offer) else 1
        assert v.name is not None
        assert main(["check", v.name]) == expected, v.name
        live = capsys.readouterr().out
        assert main(["check", v.name, "--manifest", str(path)]) == expected, v.name
        from_file = capsys.readouterr().out
        assert live.split(" can", 1)[1] == from_file.split(" can", 1)[1]
        if expected:
            assert "missing feature bits" in live


def test_nfd_labels_name_what_this_kernel_serves(
    scratch: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    expected = _expected_latest(os.uname().release)
    out, nfd_path = scratch / "vhost-net.json", scratch / "kvhost"
    assert main(["manifest", "--output", str(out), "--nfd", str(nfd_path)]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out} and {nfd_path}: kernel ")
    labels = nfd.parse(nfd_path.read_text())
    names = [v.name for v in ver.registry()]
    assert labels == {
        **{f"kvhost.io/{n}": "true" for n in names[: names.index(expected) + 1]},
        "kvhost.io/vhost-net.latest": expected,
    }
    # one label per version the live probe supports, no more
    offer = ver.host_offer(probe())
    for v in ver.registry():
        assert (f"kvhost.io/{v.name}" in labels) == (not ver.missing(v, offer)), v.name
    assert labels == nfd.labels(json.loads(out.read_text()))


def test_cli_entry_point_probes_for_real(scratch: Path) -> None:
    path = scratch / "vhost-net.json"
    done = subprocess.run(
        [sys.executable, "-m", "kvhost.cli", "manifest", "--output", str(path), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert json.loads(path.read_text()) == printed
    latest = printed["latest"]
    ok = subprocess.run(
        [sys.executable, "-m", "kvhost.cli", "check", latest],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
