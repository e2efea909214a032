"""``kvhost install-host`` and the systemd unit: what lands where, the rewritten program
paths, ``systemd-analyze verify`` on the installed unit, the unit's sandbox, and errors.

Everything installs into a temporary --root (nothing is reloaded then); the unit is checked
by systemd's own verifier, which fails on a program it cannot execute.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from kvhost import manifest as mf
from kvhost.cli import main
from kvhost.commands import host
from kvhost.commands import versions as vcmd

REPO = Path(__file__).resolve().parent.parent
ENTRY_SHIM = str(Path(sysconfig.get_path("scripts")) / "kvhost-shim")
UNIT = host.UNIT_DIR / host.UNIT_NAME
SOCKET = host.UNIT_DIR / host.SOCKET_NAME


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def unit_settings(text: str) -> list[tuple[str, str]]:
    """(key, value) of every assignment, continuation lines joined, in order."""
    out: list[tuple[str, str]] = []
    joined = re.sub(r"\\\n\s*", " ", text)
    for line in joined.splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, _, value = line.partition("=")
            out.append((key.strip(), value.strip()))
    return out


def setting(text: str, key: str) -> list[str]:
    return [v for k, v in unit_settings(text) if k == key]


def verify(
    unit_dir: Path, instance: str = "vm1", kind: str = "service", *, dump: bool = False
) -> subprocess.CompletedProcess[str]:
    """``systemd-analyze verify`` of one instance; ``dump``: at debug level, where systemd
    prints every unit it loaded with its specifiers expanded."""
    env = {**os.environ, "SYSTEMD_LOG_LEVEL": "debug"} if dump else None
    return subprocess.run(
        ["systemd-analyze", "verify", str(unit_dir / f"kvhost-shim@{instance}.{kind}")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )


def loaded(unit_dir: Path, unit: str) -> dict[str, list[str]]:
    """What systemd itself made of ``unit`` (instance given): its settings as its debug
    dump prints them, specifiers expanded (a line is ``\t\tKey: value``)."""
    kind = unit.rsplit(".", 1)[1]
    instance = unit.split("@", 1)[1].rsplit(".", 1)[0]
    done = verify(unit_dir, instance, kind, dump=True)
    assert done.returncode == 0, done.stderr[-2000:]
    out: dict[str, list[str]] = {}
    inside = False
    for line in done.stdout.splitlines():
        if line.startswith("\t-> Unit "):
            inside = line == f"\t-> Unit {unit}:"
        elif inside and line.startswith("\t\t") and ": " in line:
            key, _, value = line.strip().partition(": ")
            out.setdefault(key, []).append(value)
    assert out, f"systemd-analyze printed no dump of {unit}"
    return out


@pytest.fixture
def installed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, str]:
    root = tmp_path / "root"
    rc, out, err = run(["install-host", "--root", str(root)], capsys)
    assert rc == 0, err
    return root, out


def test_shipped_files_agree_with_the_package() -> None:
    # systemd/ is the unit as an operator browsing the repository sees it: a relative
    # symlink to the package's copy, which is what install-host renders from
    unit = REPO / "systemd" / host.UNIT_NAME
    assert unit.is_symlink(), f"{unit} should be a symlink to ../kvhost/data/{host.UNIT_NAME}"
    assert not os.path.isabs(os.readlink(unit)), os.readlink(unit)
    assert unit.resolve() == (REPO / "kvhost" / "data" / host.UNIT_NAME).resolve()
    assert unit.read_text() == host.shipped_unit()
    assert json.loads(host.shipped_descriptor())["binary"] == host.SHIPPED_SHIM
    assert setting(host.shipped_unit(), "ExecStart")[0].split()[0] == host.SHIPPED_SHIM


def test_install_host_writes_every_file_with_this_installation_s_programs(
    installed: tuple[Path, str],
) -> None:
    root, out = installed
    expected = [
        root / host.RULES_DIR / vcmd.RULES_NAME,
        root / UNIT,
        root / host.DESCRIPTOR_DIR / host.DESCRIPTOR_NAME,
        root / host.SYSUSERS_FILE,
    ]
    listed = [line for line in out.splitlines() if line.startswith("installed ")]
    assert {f"installed {p}" for p in [*expected, root / SOCKET]} <= set(listed)
    assert "not reloading udev or systemd (--root given)" in out
    assert (root / host.ENV_DIR).is_dir()
    # the rule is install-udev's: this interpreter writes the manifest
    rule = expected[0].read_text().splitlines()[-1]
    words = shlex.split(rule.split('RUN+="')[1].rstrip('"'))
    assert words == [sys.executable, "-I", "-m", "kvhost.cli", "manifest", "--output",
                     str(mf.DEFAULT_PATH), "--kmsg"]  # fmt: skip
    # unit and descriptor run the entry point next to this interpreter
    unit = expected[1].read_text()
    assert setting(unit, "ExecStart")[0].split()[0] == ENTRY_SHIM
    assert json.loads(expected[2].read_text())["binary"] == ENTRY_SHIM
    # ... which runs this very environment (./run-tests: the checkout's .venv), not whatever
    # python3 a reboot's PATH would find
    shebang = host._interpreter(ENTRY_SHIM)
    # (compared as paths: a venv's python is a symlink to the system one, the same file)
    assert shebang == sys.executable, (shebang, sys.executable)
    done = subprocess.run(
        [ENTRY_SHIM, "--print-capabilities"], capture_output=True, text=True, env={}, cwd="/",
        check=False, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0 and json.loads(done.stdout) == {"type": "net"}
    assert expected[3].read_text().splitlines()[-1].startswith(f"u {host.SHIM_USER} - ")
    # a local install: the administrator's directory, not the distribution's /usr/share
    assert expected[2] == root / "etc/qemu/vhost-user/50-kvhost-net.json"
    assert not (root / "usr").exists()
    for path in expected:
        assert oct(path.stat().st_mode & 0o777) == "0o644", path
    assert sorted(os.listdir(root / host.UNIT_DIR)) == sorted(
        [host.UNIT_NAME, host.SOCKET_NAME, vcmd.MANIFEST_UNIT, "multi-user.target.wants"]
    )


@pytest.mark.parametrize("kind", ["service", "socket"])
@pytest.mark.parametrize("instance", ["vm1", "vm\\x2d1"])  # VM vm-1, as systemd-escape writes it
def test_systemd_verifies_the_installed_units(
    installed: tuple[Path, str], kind: str, instance: str
) -> None:
    root, _ = installed
    done = verify(root / host.UNIT_DIR, instance, kind)
    assert done.returncode == 0, done.stderr
    ours = [line for line in done.stderr.splitlines() if "kvhost-shim" in line]
    assert ours == [], ours  # unknown keys and bad values are only warnings: none allowed


def test_systemd_verify_bites(installed: tuple[Path, str]) -> None:
    root, _ = installed
    unit_dir = root / host.UNIT_DIR
    # the check bites: the same unit naming a program that is not there fails verification
    bad = unit_dir / "kvhost-shim-bad@.service"
    bad.write_text((unit_dir / host.UNIT_NAME).read_text().replace(ENTRY_SHIM, "/nonexistent/x"))
    broken = subprocess.run(
        ["systemd-analyze", "verify", str(unit_dir / "kvhost-shim-bad@vm1.service")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert broken.returncode != 0 and "/nonexistent/x" in broken.stderr


def test_unit_runs_one_shim_per_vm_with_its_recorded_version(installed: tuple[Path, str]) -> None:
    root, _ = installed
    unit = (root / UNIT).read_text()
    assert setting(unit, "EnvironmentFile") == [
        "/etc/kvhost/shim/%I.env",
        "-/run/kvhost/shim/%I.env",  # the libvirt hook's, read last
    ]
    argv = shlex.split(setting(unit, "ExecStart")[0])
    assert argv[1:3] == ["--fd", "3"]  # the socket kvhost-shim@%i.socket made
    assert setting(unit, "Requires") == ["kvhost-shim@%i.socket"]
    assert setting(unit, "After")[0].split()[0] == "kvhost-shim@%i.socket"
    pairs = dict(zip(argv[1::2], argv[2::2], strict=False))
    assert pairs["--interface-version"] == "${KVHOST_INTERFACE_VERSION}"
    assert pairs["--tap"] == "${KVHOST_TAP}"
    assert pairs["--user"] == "${KVHOST_USER}" and pairs["--group"] == "${KVHOST_GROUP}"
    assert "--socket-group" not in pairs  # the socket unit sets owner, group and mode
    assert pairs["--log-format"] == "${KVHOST_LOG_FORMAT}"
    assert pairs["--allow-uid"] == "${KVHOST_ALLOW_UID}"
    assert argv[-1] == "$KVHOST_SHIM_ARGS"  # unbraced: systemd splits it into words
    assert setting(unit, "RuntimeDirectory") == ["kvhost"]
    assert setting(unit, "RuntimeDirectoryPreserve") == ["yes"]
    assert setting(unit, "Restart") == ["on-failure"]
    assert setting(unit, "Type") == ["notify"]  # the shim sends READY=1 (shim.activation)


def test_the_socket_unit_listens_where_qemu_is_told_to_connect(
    installed: tuple[Path, str],
) -> None:
    root, _ = installed
    sock = (root / SOCKET).read_text()
    assert setting(sock, "ListenStream") == ["/run/kvhost/%I.sock"]
    assert setting(sock, "SocketUser") == [host.SHIM_USER]  # as the shim's own socket was
    assert setting(sock, "SocketGroup") == ["kvm"] and setting(sock, "SocketMode") == ["0660"]
    assert setting(sock, "RemoveOnStop") == ["yes"]
    assert not setting(sock, "Accept")  # one shim serves every connection of its VM


@pytest.mark.parametrize(
    ("vm", "instance"),
    [("vm1", "vm1"), ("vm-1", "vm\\x2d1"), ("web.prod_2", "web.prod_2"), ("db 1", "db\\x201")],
)
def test_a_vm_name_goes_through_systemd_escape(
    installed: tuple[Path, str], vm: str, instance: str
) -> None:
    """systemd itself expands %I back to the VM's name: its socket, its env files."""
    escaped = subprocess.run(["systemd-escape", vm], capture_output=True, text=True,
                             check=True, timeout=30).stdout.strip()  # fmt: skip
    assert escaped == instance
    unit_dir = installed[0] / host.UNIT_DIR
    socket_unit = loaded(unit_dir, f"kvhost-shim@{instance}.socket")
    assert socket_unit["ListenStream"] == [f"/run/kvhost/{vm}.sock"]
    assert socket_unit["Description"] == [f"kvhost-shim vhost-user socket for VM {vm}"]
    service = loaded(unit_dir, f"kvhost-shim@{instance}.service")
    assert service["EnvironmentFile"] == [
        f"/etc/kvhost/shim/{vm}.env", f"-/run/kvhost/shim/{vm}.env"
    ]
    assert f"kvhost-shim@{instance}.socket" in " ".join(service["Requires"])


def socket_precheck(installed: tuple[Path, str], instance: str) -> subprocess.CompletedProcess[str]:
    """The socket unit's ExecStartPre, run the way systemd runs it ($$ -> $, %i -> instance)."""
    (pre,) = setting((installed[0] / SOCKET).read_text(), "ExecStartPre")
    argv = shlex.split(pre.replace("$$", "$").replace("%i", instance))
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)


def test_an_unescaped_dash_is_refused_with_the_right_unit_named(
    installed: tuple[Path, str],
) -> None:
    # 'systemctl start kvhost-shim@vm-1' means VM "vm/1": a socket QEMU is never told about
    bad = socket_precheck(installed, "vm-1")
    assert bad.returncode == 2
    assert bad.stderr == (
        "kvhost-shim@vm-1: a - in an instance name stands for /; name the unit "
        "kvhost-shim@NAME with NAME as printed by: systemd-escape VM\n"
    )
    for good in ("vm1", "vm\\x2d1"):
        ok = socket_precheck(installed, good)
        assert ok.returncode == 0 and ok.stderr == "", ok.stderr


def test_the_missing_variable_check_in_the_unit_runs(installed: tuple[Path, str]) -> None:
    """ExecStartPre's shell snippet, run the way systemd runs it ($$ -> $, %I -> name)."""
    root, _ = installed
    (pre,) = setting((root / UNIT).read_text(), "ExecStartPre")
    argv = shlex.split(pre.replace("$$", "$").replace("%I", "vm1"))
    assert argv[:2] == ["/bin/sh", "-c"]
    full = {"KVHOST_INTERFACE_VERSION": "org.kernel.vhost-net.v5", "KVHOST_TAP": "vm1tap"}
    ok = subprocess.run(argv, env=full, capture_output=True, text=True, check=False)
    assert ok.returncode == 0 and ok.stderr == ""
    for missing in full:
        env = {k: v for k, v in full.items() if k != missing}
        bad = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        assert bad.returncode == 2
        assert "KVHOST_INTERFACE_VERSION and KVHOST_TAP in /etc/kvhost/shim/vm1.env" in bad.stderr


def test_the_unit_s_sandbox(installed: tuple[Path, str]) -> None:
    unit = (installed[0] / UNIT).read_text()
    (caps,) = setting(unit, "CapabilityBoundingSet")
    # no CAP_CHOWN: the socket is systemd's, the shim creates none
    assert set(caps.split()) == {"CAP_NET_ADMIN", "CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP"}
    assert setting(unit, "DevicePolicy") == ["closed"]
    assert setting(unit, "DeviceAllow") == ["/dev/vhost-net rw", "/dev/net/tun rw"]
    assert setting(unit, "RestrictAddressFamilies") == ["AF_UNIX AF_NETLINK"]
    assert setting(unit, "NoNewPrivileges") == ["yes"]
    assert setting(unit, "ProtectSystem") == ["strict"]
    assert setting(unit, "PrivateTmp") == ["yes"]
    assert setting(unit, "RestrictNamespaces") == ["yes"]
    # nothing that would strip root of its capabilities before the set-up ran
    assert not setting(unit, "SecureBits") and not setting(unit, "User")


def test_protect_home_relaxes_only_for_a_shim_under_a_home_directory() -> None:
    system = ("/usr/local/bin/kvhost-shim", "/usr/bin/python3")
    assert setting(host.render_unit(*system, code_dirs=["/usr/lib/python3/dist-packages/kvhost"]),
                   "ProtectHome") == ["yes"]  # fmt: skip
    for shim, python, code in (
        ("/home/op/venv/bin/kvhost-shim", "/home/op/venv/bin/python", "/srv/kvhost"),
        ("/usr/local/bin/kvhost-shim", "/root/.pyenv/versions/3.11.7/bin/python", "/srv/kvhost"),
        (*system, "/root/src/kvhost/kvhost"),  # pip install -e of a clone in /root
    ):
        assert setting(host.render_unit(shim, python, [code]), "ProtectHome") == ["read-only"]
    # by default the code is where kvhost is imported from
    here = host.render_unit(*system)
    expected = "read-only" if str(Path(host.__file__).resolve()).startswith(("/root/", "/home/")) \
        else "yes"
    assert setting(here, "ProtectHome") == [expected]


def test_the_unit_s_options_are_the_shim_s(installed: tuple[Path, str]) -> None:
    """Every option ExecStart passes exists in kvhost-shim's parser, with example values."""
    from shim.cli import build_parser

    unit = (installed[0] / UNIT).read_text()
    env = dict(
        KVHOST_INTERFACE_VERSION="org.kernel.vhost-net.v5",
        KVHOST_TAP="vm1tap",
        KVHOST_SHIM_ARGS="--bridge br0 --allow-gid 64055",
    )
    for line in setting(unit, "Environment"):
        for word in shlex.split(line):
            key, _, value = word.partition("=")
            env.setdefault(key, value)
    words = shlex.split(setting(unit, "ExecStart")[0].replace("%i", "vm1"))[1:]
    argv: list[str] = []
    for w in words:
        if w.startswith("${"):
            argv.append(env[w[2:-1]])
        elif w.startswith("$"):
            argv += env[w[1:]].split()
        else:
            argv.append(w)
    args = build_parser().parse_args(argv)
    assert args.fd == 3 and args.socket_path is None
    assert args.interface_version == "org.kernel.vhost-net.v5" and args.tap == "vm1tap"


# --- the manifest ---------------------------------------------------------------------------


def test_the_manifest_unit_is_installed_and_enabled_for_boot(installed: tuple[Path, str]) -> None:
    root, out = installed
    unit = root / host.UNIT_DIR / vcmd.MANIFEST_UNIT
    words = shlex.split(setting(unit.read_text(), "ExecStart")[0])
    assert words == [sys.executable, "-I", "-m", "kvhost.cli", "manifest", "--output",
                     str(mf.DEFAULT_PATH)]  # fmt: skip
    assert setting(unit.read_text(), "Type") == ["oneshot"]
    # /run is empty after a reboot and a static /dev/vhost-net node sends no event: the
    # unit is enabled, as 'systemctl enable' does it
    wants = root / host.UNIT_DIR / "multi-user.target.wants" / vcmd.MANIFEST_UNIT
    assert os.readlink(wants) == f"/{host.UNIT_DIR / vcmd.MANIFEST_UNIT}"
    assert f"systemd: {vcmd.MANIFEST_UNIT} enabled (writes the manifest at every boot)" in out
    assert (
        f"manifest: not written (--root given): {vcmd.MANIFEST_UNIT} writes it when that "
        "system boots"
    ) in out.splitlines()
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_without_vhost_net_install_says_when_the_manifest_comes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = argparse.Namespace(manifest="/run/kvhost/vhost-net.json", nfd="/etc/nfd/kvhost",
                              nfd_prefix="kvhost.io")  # fmt: skip
    missing = str(tmp_path / "vhost-net")
    assert host.write_manifest(args, device=missing) == 0
    assert capsys.readouterr().out == (
        f"manifest: not written: this host has no {missing} (modprobe vhost_net loads it); "
        "when it appears, udev writes /run/kvhost/vhost-net.json and /etc/nfd/kvhost "
        "(kvhost-manifest.service under systemd)\n"
    )
    assert not (tmp_path / "vhost-net.json").exists()


def test_a_failing_probe_is_an_error_after_the_files_are_in(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A device node that is there but no vhost-net device (an empty file): the probe's own
    error, exit 1, and what to run once it is fixed."""
    node = tmp_path / "vhost-net"
    node.touch()
    args = argparse.Namespace(manifest=str(tmp_path / "m.json"), nfd=None,
                              nfd_prefix="kvhost.io")  # fmt: skip
    if Path("/dev/vhost-net").exists():
        pytest.skip("this host has vhost-net: the kernel tier covers a real write")
    assert host.write_manifest(args, device=str(node)) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("manifest: not written: ") and "vhost" in err[0]
    assert err[1] == ("the files above are installed; fix that, then run 'kvhost manifest' "
                      "or 'systemctl start kvhost-manifest.service'")  # fmt: skip
    assert not (tmp_path / "m.json").exists()


# --- errors ---------------------------------------------------------------------------------


def test_not_root_without_root_dir_is_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    rc, out, err = run(["install-host"], capsys)
    assert rc == 2 and out == ""
    assert err.startswith("kvhost install-host: install-host writes under /etc (and the manifest")
    assert "run it as root, or stage the files with --root DIR" in err


def test_an_unwritable_target_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "root"
    (root / "etc" / "udev").mkdir(parents=True)
    (root / "etc" / "udev" / "rules.d").write_text("not a directory")
    rc, _, err = run(["install-host", "--root", str(root)], capsys)
    assert rc == 2
    assert err.startswith(f"kvhost install-host: cannot install {root}/etc/udev/rules.d/")
    assert not (root / UNIT).exists()  # stopped at the first failure


@pytest.mark.parametrize(
    ("shim", "fragment"),
    [
        ("kvhost-shim", "--shim must be an absolute path"),
        ("/opt/my shim", "use a path without blanks"),
        ("/opt/100%/shim", "use a path without blanks"),
    ],
)
def test_bad_shim_paths_are_refused_before_writing(
    shim: str, fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, _, err = run(["install-host", "--root", str(tmp_path / "r"), "--shim", shim], capsys)
    assert rc == 2 and fragment in err
    assert not (tmp_path / "r").exists()


def test_install_host_with_nfd_and_no_reload(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "root"
    rc, out, _ = run(
        ["install-host", "--root", str(root), "--no-reload", "--nfd", "/etc/nfd/kvhost"], capsys
    )
    assert rc == 0 and "Kubernetes nodes" not in out
    rule = (root / host.RULES_DIR / vcmd.RULES_NAME).read_text()
    assert rule.rstrip().endswith('--kmsg --nfd /etc/nfd/kvhost"')
    # idempotent: a second run replaces the files with the same bytes
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert run(["install-host", "--root", str(root), "--nfd", "/etc/nfd/kvhost"], capsys)[0] == 0
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before


def test_systemd_sysusers_accepts_the_user_entry(installed: tuple[Path, str]) -> None:
    root, _ = installed
    done = subprocess.run(
        ["systemd-sysusers", f"--root={root}", "--dry-run", str(root / host.SYSUSERS_FILE)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"Creating user '{host.SHIM_USER}'" in done.stdout + done.stderr


def test_programs_root_runs_must_be_root_s_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The unit's shim, the udev rule's program: refused when another user owns them or
    can write them or a directory above them (install-host changes nothing then)."""
    shim = tmp_path / "bin" / "kvhost-shim"
    shim.parent.mkdir()
    shim.write_text("#!/bin/sh\n")
    shim.chmod(0o755)
    argv = ["install-host", "--root", str(tmp_path / "r"), "--shim", str(shim)]
    assert run(argv, capsys)[0] == 0
    shim.chmod(0o777)
    rc, _, err = run(argv, capsys)
    assert rc == 2 and f"{shim} is writable by others (-rwxrwxrwx)" in err
    shim.chmod(0o755)
    shim.parent.chmod(0o777)
    rc, _, err = run(argv, capsys)
    assert rc == 2 and f"{shim.parent} is writable by others" in err
    shim.parent.chmod(0o755)
    os.chown(shim, 65534, 65534)
    rc, _, err = run(argv, capsys)
    assert rc == 2 and f"{shim} belongs to uid 65534, not root" in err
    os.chown(shim, 0, 0)
    rc, _, err = run([*argv, "--command", f"{shim.parent}/nope"], capsys)
    assert rc == 2 and "the udev rule's program" in err
