"""The version subcommands of ``kvhost``: exit codes, one-line errors, JSON, the udev rule.

Commands that would probe this host are given a probe fixture (the real probe is exercised
in tests/test_kernel_manifest.py inside the test VM); ``qemu-args`` asks the real QEMU.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from test_versions import V, probe_61, probe_612, probe_json

import kvhost.probe
from kvhost import manifest as mf
from kvhost import qemu_args
from kvhost import versions as ver
from kvhost.cli import main
from kvhost.commands import versions as cmd
from kvhost.errors import VersionError
from kvhost.probe import Probe

REPO = Path(__file__).resolve().parent.parent


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def manifests(tmp_path: Path) -> tuple[str, str]:
    paths = []
    for name, p in (("612.json", probe_612()), ("61.json", probe_61())):
        path = tmp_path / name
        mf.write_atomic(path, mf.encode(mf.build(p)))
        paths.append(str(path))
    return paths[0], paths[1]


def test_check_against_manifests(
    manifests: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    m612, m61 = manifests
    rc, out, _ = run(["check", V[5], "--manifest", m61], capsys)
    assert rc == 0 and out == f"{m61} (kernel 6.1.0-56-amd64) can serve {V[5]}\n"
    rc, out, _ = run(["check", V[7], "--manifest", m61], capsys)
    assert rc == 1
    assert out == (
        f"{m61} (kernel 6.1.0-56-amd64) cannot serve {V[7]}: missing feature bits "
        "RING_RESET, GUEST_USO4, GUEST_USO6, HOST_USO\n"
    )
    rc, out, _ = run(["check", ver.parse(V[7]).spec(), "--manifest", m612, "--json"], capsys)
    assert rc == 0 and json.loads(out)["version"] == V[7]
    big = ver.parse(V[5]).spec().replace("queue-pairs=8", "queue-pairs=64")
    rc, out, _ = run(["check", big, "--manifest", m61], capsys)
    assert rc == 1 and out.rstrip().endswith("64 queue pairs exceed this host's 8")


@pytest.mark.parametrize("command", ["check", "qemu-args"])
def test_bad_version_exits_2_with_one_line(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, err = run(
        [command, "vhost-net:features=CSUM+NOPE,queue-size=1,queue-pairs=1,mtu=on"], capsys
    )
    assert rc == 2 and out == ""
    assert err.count("\n") == 1
    assert err.startswith(f"kvhost {command}: unknown feature bit name 'NOPE'")
    assert V[1] in err and V[8] in err


def test_compat(manifests: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(["compat", *manifests], capsys)
    lines = out.splitlines()
    assert rc == 0 and lines[0] == V[5]
    assert "RING_RESET" in lines[1] and lines[1].startswith("  note: a VM created at")
    rc, out, _ = run(["compat", *manifests, "--json"], capsys)
    doc = json.loads(out)
    assert doc["version"] == V[5] and doc["spec"] == ver.parse(V[5]).spec()


def test_compat_none_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = mf.build(probe_61())
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(dict(doc, supported=[V[1]], latest=V[1])))
    b.write_text(json.dumps(dict(doc, supported=[V[2]], latest=V[2])))
    rc, out, err = run(["compat", str(a), str(b)], capsys)
    assert rc == 1 and out == ""
    assert err.startswith("no common interface version: no version is supported by every host")


def test_compat_bad_manifest_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "x.json").write_text("[]")
    rc, _, err = run(["compat", str(tmp_path / "x.json")], capsys)
    assert rc == 2 and "is not a JSON object" in err


def test_versions_marks_supported(
    manifests: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, _ = run(["versions", "--manifest", manifests[1], "--json"], capsys)
    doc = json.loads(out)
    assert rc == 0 and doc["latest"] == V[5]
    assert [r["supported"] for r in doc["versions"]] == [True] * 5 + [False] * 3
    assert doc["versions"][6]["missing"] == [
        "missing feature bits RING_RESET, GUEST_USO4, GUEST_USO6, HOST_USO"
    ]
    rc, out, _ = run(["versions", "--manifest", manifests[0]], capsys)
    marks = [line[1] for line in out.splitlines()[1:]]
    assert marks == ["*"] * 6 + [">", " "]


def test_versions_on_a_host_without_vhost_net(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    why = "/dev/vhost-net is not available: run 'modprobe vhost_net'"
    monkeypatch.setattr(
        kvhost.probe, "probe", lambda: Probe.from_json(probe_json("6.1", None, [], vhost_error=why))
    )
    rc, out, _ = run(["versions"], capsys)
    assert rc == 0 and out.splitlines()[-1] == f"this host serves no version: {why}"
    rc, out, _ = run(["check", V[1]], capsys)
    assert rc == 1 and out == f"this host (kernel 6.1) cannot serve {V[1]}: {why}\n"


def test_manifest_command_writes_or_keeps_the_previous(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out_path = tmp_path / "run" / "vhost-net.json"
    monkeypatch.setattr(kvhost.probe, "probe", probe_612)
    rc, out, _ = run(["manifest", "--output", str(out_path)], capsys)
    assert rc == 0
    assert (
        out == f"wrote {out_path}: kernel 6.12.117+deb12-amd64: latest {V[7]}, 7 versions "
        "supported\n"
    )
    before = out_path.read_bytes()
    why = "/dev/vhost-net does not exist"
    monkeypatch.setattr(
        kvhost.probe, "probe", lambda: Probe.from_json(probe_json("6.1", None, [], vhost_error=why))
    )
    rc, out, err = run(["manifest", "--output", str(out_path)], capsys)
    assert rc == 1 and out == ""
    assert (
        err == f"kvhost manifest: no manifest written: this host serves no interface "
        f"version ({why})\n"
    )
    assert out_path.read_bytes() == before
    monkeypatch.setattr(kvhost.probe, "probe", probe_61)
    rc, out, _ = run(["manifest", "--output", "-"], capsys)
    assert rc == 0 and json.loads(out)["latest"] == V[5]


# --- qemu-args ------------------------------------------------------------------------------

QEMU_72_HELP = """virtio-net-pci options:
  any_layout=<bool>      - on/off (default: true)
  csum=<bool>            - on/off (default: true)
  disable-modern=<bool>  -  (default: false)
  host_mtu=<uint16>      -  (default: 0)
  mrg_rxbuf=<bool>       - on/off (default: true)
  virtio-backend=<child<virtio-net-device>>
"""


def test_parse_help() -> None:
    assert qemu_args.parse_help(QEMU_72_HELP) == {
        "any_layout",
        "csum",
        "disable-modern",
        "host_mtu",
        "mrg_rxbuf",
        "virtio-backend",
    }


def test_properties_follow_the_version_and_what_qemu_knows() -> None:
    all_props = {p for p, _ in qemu_args.PROPERTY_BITS} | {
        "disable-modern",
        "disable-legacy",
        "rx_queue_size",
        "tx_queue_size",
        "host_mtu",
    }
    v7 = qemu_args.device_properties(ver.parse(V[7]), all_props)
    assert {
        "host_uso=on",
        "guest_uso4=on",
        "queue_reset=on",
        "in_order=off",
        "iommu_platform=off",
        "disable-modern=off",
        "mq=on",
    } <= set(v7)
    v1 = qemu_args.device_properties(ver.parse(V[1]), all_props)
    assert {
        "mrg_rxbuf=off",
        "event_idx=off",
        "mq=off",
        "disable-modern=on",
        "disable-legacy=off",
        "rx_queue_size=1024",
        "queue_reset=off",
        "host_uso=off",
        "indirect_desc=on",
        "csum=on",
    } <= set(v1)
    no_mtu = ver.parse(ver.parse(V[5]).spec().replace("mtu=on", "mtu=off"))
    assert "host_mtu=0" in qemu_args.device_properties(no_mtu, all_props)
    small = ver.parse(ver.parse(V[5]).spec().replace("queue-size=1024", "queue-size=128"))
    with pytest.raises(VersionError, match="rings are 256 to 1024"):
        qemu_args.device_properties(small, all_props)


@pytest.mark.qemu
def test_qemu_args_with_the_installed_qemu(capsys: pytest.CaptureFixture[str]) -> None:
    known = qemu_args.available_properties()
    rc, out, _ = run(["qemu-args", V[5]], capsys)
    props = out.strip().split(",")
    assert rc == 0
    assert {p.split("=")[0] for p in props} <= known
    assert "queue_reset=off" in props and "mrg_rxbuf=on" in props
    if "host_uso" not in known:  # Debian's QEMU 7.2: USO versions cannot be pinned
        rc, out, err = run(["qemu-args", V[7]], capsys)
        assert rc == 2 and "no guest_uso4 property" in err
        assert f"the newest version it can pin is {V[5]}" in err
    # the installed QEMU accepts every property we emit
    done = subprocess.run(
        [
            "qemu-system-x86_64",
            "-M",
            "pc",
            "-accel",
            "tcg",
            "-nodefaults",
            "-display",
            "none",
            "-S",
            "-monitor",
            "stdio",
            "-device",
            "virtio-net-pci," + out.strip(),
        ],
        input="quit\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr


# --- udev -----------------------------------------------------------------------------------


def test_shipped_rule_and_unit_are_the_rendered_ones() -> None:
    shipped = (REPO / "udev" / cmd.RULES_NAME).read_text()
    assert shipped == cmd.render_rule(cmd.SHIPPED_COMMAND, str(mf.DEFAULT_PATH))
    unit = (REPO / "systemd" / cmd.MANIFEST_UNIT).read_text()
    assert unit == cmd.render_manifest_unit(cmd.SHIPPED_COMMAND, str(mf.DEFAULT_PATH))


def rules(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def test_install_udev_writes_a_runnable_rule_and_its_unit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    units = tmp_path / "units"
    rc, out, _ = run(
        ["install-udev", "--rules-dir", str(tmp_path), "--unit-dir", str(units),
         "--manifest", "/run/kvtest/vhost-net.json"],
        capsys,
    )  # fmt: skip
    assert rc == 0 and out.splitlines()[:2] == [
        f"installed {tmp_path / cmd.RULES_NAME}", f"installed {units / cmd.MANIFEST_UNIT}"
    ]
    systemd, fallback = rules((tmp_path / cmd.RULES_NAME).read_text())
    # under systemd: the unit, pulled in by the device (udev's RUN is for very short tasks)
    assert systemd == (
        'ACTION!="remove", SUBSYSTEM=="misc", KERNEL=="vhost-net|tun", '
        'TEST=="/run/systemd/system", TAG+="systemd", '
        'ENV{SYSTEMD_WANTS}+="kvhost-manifest.service"'
    )
    assert "RUN" not in systemd
    # without: udev runs the probe itself
    assert fallback.startswith(
        'ACTION=="add", SUBSYSTEM=="misc", KERNEL=="vhost-net|tun", '
        'TEST!="/run/systemd/system", RUN+="'
    )
    words = shlex.split(fallback.split('RUN+="')[1].rstrip('"'))
    expected = [sys.executable, "-I", "-m", "kvhost.cli", "manifest", "--output",
                "/run/kvtest/vhost-net.json"]  # fmt: skip
    assert words == [*expected, "--kmsg"]
    (start,) = [
        line.removeprefix("ExecStart=")
        for line in (units / cmd.MANIFEST_UNIT).read_text().splitlines()
        if line.startswith("ExecStart=")
    ]
    assert shlex.split(start) == expected  # the journal has its output: no --kmsg
    # the program both name really is kvhost (udev and systemd give it no PYTHONPATH)
    done = subprocess.run(
        [*words[:4], "--version"], capture_output=True, text=True, env={}, cwd="/", check=False
    )
    assert done.returncode == 0 and done.stdout.startswith("kvhost ")
    verified = subprocess.run(
        ["systemd-analyze", "verify", str(units / cmd.MANIFEST_UNIT)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert verified.returncode == 0, verified.stderr
    assert "kvhost-manifest" not in verified.stderr.replace(str(units), ""), verified.stderr


@pytest.mark.parametrize(
    ("command", "fragment"),
    [
        ("/opt/my dir/kvhost", "udev RUN cannot carry"),
        ("kvhost", "udev and systemd run programs by absolute path"),
    ],
)
def test_install_udev_refuses_commands_udev_cannot_run(
    tmp_path: Path, command: str, fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, _, err = run(
        [
            "install-udev",
            "--rules-dir",
            str(tmp_path),
            "--command",
            shlex.quote(command) if " " in command else command,
        ],
        capsys,
    )
    assert rc == 2 and fragment in err
    assert not (tmp_path / cmd.RULES_NAME).exists()
