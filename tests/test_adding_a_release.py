"""docs/architecture.md's "Adding a kernel release", followed once, on copies of the data.

The recipe's data edits (a row in features.json, an entry appended to versions.json) are made
on copies in a temporary directory; a subprocess with ``KVHOST_DATA_DIR`` pointing there runs
kvhost's own loading, masking and CLI code, exactly as the edited package would. A subprocess,
not monkeypatching: every bit class is derived from the table at import, and the point is to
show that nothing else needs editing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_versions import BASIC_OFFLOADS, probe_json

from kvhost import features as fb
from kvhost import qemu_args
from kvhost import versions as ver
from kvhost.errors import VersionError

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "kvhost" / "data"

#: the fake release's bit: the lowest number neither virtio nor kvhost names
FAKE_NUMBER = next(n for n in range(42, 64) if n not in fb.BITS)
FAKE_NAME = "KVHOST_TEST_FEATURE"
FAKE_PROPERTY = "kvhost_test_feature"
FAKE_RELEASE = "99.1"
NEW = f"{ver.NAME_PREFIX}v{len(ver.registry()) + 1}"
NEWEST = ver.registry()[-1]

#: VHOST_GET_FEATURES(_ARRAY) of 6.17 (tests/test_versions.py), the newest measured kernel
VHOST_617 = 0x10B3D008000 | (0xA << 64)
OFFLOADS_617 = [*BASIC_OFFLOADS, "USO", "UDP_TUNNEL_GSO", "UDP_TUNNEL_GSO_CSUM"]

#: runs in the subprocess: kvhost's code on the edited data, every observation as JSON
DRIVER = """
import contextlib, io, json, sys
from pathlib import Path
from kvhost import features as fb, manifest as mf, versions as ver
from kvhost.cli import main
from kvhost.probe import Probe

d, new, newest = Path(sys.argv[1]), sys.argv[2], sys.argv[3]

def cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return [rc, out.getvalue(), err.getvalue()]

offers, manifests = {}, {}
for host in ("with", "without"):
    probe = Probe.from_json(json.loads((d / f"probe-{host}.json").read_text()))
    offers[host] = ver.host_offer(probe)
    manifests[host] = str(d / f"manifest-{host}.json")
    mf.write_atomic(Path(manifests[host]), mf.encode(mf.build(probe)))
v = ver.parse(new)
print(json.dumps({
    "registry": ver.names(),
    "loaded": [x.name for x in ver.load_registry(d / "versions.json")],
    "bit": fb.bit(sys.argv[4]),
    "features": v.features,
    "spec_round_trip": ver.parse(v.spec()).name,
    "serve": ver.serve_features(v),
    "offered": offers["with"].features,
    "latest_with": ver.latest(offers["with"]).name,
    "latest_without": ver.latest(offers["without"]).name,
    "missing_with": ver.missing(v, offers["with"]),
    "missing_without": ver.missing(v, offers["without"]),
    "versions": cli("versions", "--manifest", manifests["with"]),
    "versions_without": cli("versions", "--manifest", manifests["without"]),
    "check_without": cli("check", new, "--manifest", manifests["without"]),
    "pin_new": cli("qemu-args", new, "--qemu", str(d / "qemu-with")),
    "pin_newest": cli("qemu-args", newest, "--qemu", str(d / "qemu-with")),
    "refuse": cli("qemu-args", new, "--qemu", str(d / "qemu-without")),
}))
"""


def _fake_qemu(path: Path, props: set[str]) -> None:
    """A stand-in for ``qemu-system-x86_64 -device virtio-net-pci,help``."""
    lines = "\n".join(f"  {p}=<bool>  - on/off" for p in sorted(props))
    path.write_text(f"#!/bin/sh\ncat <<'EOF'\nvirtio-net-pci options:\n{lines}\nEOF\n")
    path.chmod(0o755)


def _follow_the_recipe(d: Path) -> None:
    # 1. one row per new bit, in bit order
    table = json.loads((DATA / "features.json").read_text())
    table["bits"].append(
        {
            "bit": FAKE_NUMBER,
            "name": FAKE_NAME,
            "kind": "transport",
            "provider": "vhost-net",
            "since": FAKE_RELEASE,
            "qemu": FAKE_PROPERTY,
        }
    )
    table["bits"].sort(key=lambda row: row["bit"])
    (d / "features.json").write_text(json.dumps(table, indent=2))
    # 2. abi.py: a vhost-net bit brings no constant beyond its number, which the header test
    #    checks once the installed headers name it; the headers never name a fake one
    # 3. one appended version: the newest entry's bits plus the new one
    registry = json.loads((DATA / "versions.json").read_text())
    entry = dict(registry["versions"][-1])
    entry.update(
        name=NEW,
        first_kernel=FAKE_RELEASE,
        adds=f"{FAKE_NAME} (a test's fake release)",
        features=[*entry["features"], FAKE_NAME],
    )
    registry["versions"].append(entry)
    (d / "versions.json").write_text(json.dumps(registry, indent=2))


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("release")
    _follow_the_recipe(d)
    with_bit = probe_json(f"{FAKE_RELEASE}.0", VHOST_617 | 1 << FAKE_NUMBER, OFFLOADS_617)
    (d / "probe-with.json").write_text(json.dumps(with_bit))
    (d / "probe-without.json").write_text(json.dumps(probe_json("6.17.0", VHOST_617, OFFLOADS_617)))
    props = {p for p, _ in qemu_args.PROPERTY_BITS} | {
        "disable-modern",
        "disable-legacy",
        "rx_queue_size",
        "tx_queue_size",
        "host_mtu",
    }
    _fake_qemu(d / "qemu-with", props | {FAKE_PROPERTY})
    _fake_qemu(d / "qemu-without", props)
    env = dict(os.environ, **{fb.DATA_DIR_ENV: str(d)})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, str(d), NEW, NEWEST.label, FAKE_NAME],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_the_new_version_loads_and_parses(observed: dict[str, Any]) -> None:
    assert observed["registry"] == [*ver.names(), NEW]
    assert observed["loaded"] == observed["registry"]
    assert observed["bit"] == 1 << FAKE_NUMBER
    assert observed["features"] == NEWEST.features | 1 << FAKE_NUMBER
    assert observed["spec_round_trip"] == NEW


def test_the_new_bit_is_masked_like_any_vhost_net_bit(observed: dict[str, Any]) -> None:
    assert observed["serve"] == observed["features"] | ver.MTU
    assert observed["offered"] & 1 << FAKE_NUMBER


def test_a_host_offering_the_bit_supports_it_one_lacking_it_is_told_why(
    observed: dict[str, Any],
) -> None:
    assert observed["latest_with"] == NEW and observed["missing_with"] == []
    assert observed["latest_without"] == NEWEST.name
    assert observed["missing_without"] == [f"missing feature bits {FAKE_NAME}"]
    rc, out, _ = observed["check_without"]
    assert rc == 1
    assert out.rstrip().endswith(f"cannot serve {NEW}: missing feature bits {FAKE_NAME}")


def test_kvhost_versions_lists_it(observed: dict[str, Any]) -> None:
    rc, out, _ = observed["versions"]
    lines = out.splitlines()
    assert rc == 0 and lines[-1].startswith(f" > {NEW:<26} since {FAKE_RELEASE:<7} {FAKE_NAME}")
    rc, out, _ = observed["versions_without"]
    lines = out.splitlines()
    assert rc == 0 and lines[-1].startswith(f"   {NEW}")
    assert lines[-2].startswith(f" > {NEWEST.name}")


def test_qemu_args_pins_it_or_refuses_it(observed: dict[str, Any]) -> None:
    rc, new, _ = observed["pin_new"]
    assert rc == 0
    rc, newest, _ = observed["pin_newest"]
    assert rc == 0
    # the one difference between the two pinnings is the new bit's property
    assert new.strip().split(",") == [
        p.replace(f"{FAKE_PROPERTY}=off", f"{FAKE_PROPERTY}=on") for p in newest.strip().split(",")
    ]
    assert f"{FAKE_PROPERTY}=on" in new
    rc, out, err = observed["refuse"]
    assert rc == 2 and out == ""
    assert f"lacks {FAKE_NAME} (no {FAKE_PROPERTY} property)" in err
    assert f"the newest version it can pin is {NEWEST.name}" in err


# --- the shipped table ----------------------------------------------------------------------


def _release(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


@pytest.mark.parametrize("version", ver.registry(), ids=lambda v: v.name)
def test_each_version_starts_with_the_release_of_its_newest_bit(
    version: ver.InterfaceVersion,
) -> None:
    # the registry's first_kernel and the table's since tell one history twice; a new row
    # with a wrong since (or a version with a wrong first_kernel) shows up here
    rows = [fb.BITS[n] for n in fb.iter_bits(version.features)]
    assert all(b.since for b in rows), [b.name for b in rows if not b.since]
    assert version.first_kernel == max((b.since for b in rows if b.since), key=_release)


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ({"bit": 0, "name": "X", "kind": "net"}, "each number once"),
        ({"bit": 200, "name": "X", "kind": "net"}, "from 0 to 127"),
        ({"bit": 43, "name": "CSUM", "kind": "net"}, "name"),
        ({"bit": 43, "name": "X", "kind": "net", "provider": "tap"}, "tap_offload"),
        (
            {"bit": 43, "name": "X", "kind": "net", "provider": "tap", "tap_offload": "X",
             "tun_flags": ["TUN_F_NOPE"]},
            "TUN_F_NOPE",
        ),
        (
            {"bit": 43, "name": "X", "kind": "net", "provider": "tap", "tap_offload": "USO",
             "tun_flags": ["TUN_F_USO4"]},
            "USO rows differ",
        ),
        ({"bit": 43, "name": "X", "kind": "net", "qemu": "csum"}, "qemu"),
        ({"bit": 43, "name": "X", "kind": "net", "provider": "kernel"}, "provider"),
        ({"bit": 43, "name": "X", "kind": "net", "sinse": "7.0"}, "unknown keys"),
    ],
)
def test_the_table_loader_names_a_bad_row(row: dict[str, Any], problem: str) -> None:
    table = json.loads((DATA / "features.json").read_text())
    table["bits"] = sorted([*table["bits"], row], key=lambda r: r["bit"])
    with pytest.raises(ValueError, match=problem):
        fb.load_table(json.dumps(table))


def test_a_version_naming_a_bit_the_table_lacks_is_refused(tmp_path: Path) -> None:
    registry = json.loads((DATA / "versions.json").read_text())
    registry["versions"][-1]["features"].append(FAKE_NAME)
    (tmp_path / "versions.json").write_text(json.dumps(registry))
    with pytest.raises(VersionError, match=f"{NEWEST.name} names unknown bit '{FAKE_NAME}'"):
        ver.load_registry(tmp_path / "versions.json")
