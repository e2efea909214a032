"""The libvirt hook (``python -m kvhost.libvirt_hook``) driven as libvirt drives it: argv
``DOMAIN OP SUBOP -``, the domain XML on stdin, judged by fake manifests, with a stand-in
shim that listens on its socket like kvhost-shim (the real one needs /dev/vhost-net: the
kernel tier runs it under real libvirtd)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_libvirt_stamp import ALL_PROPS, DATA, manifest
from test_versions import V, probe_61, probe_612

from kvhost import libvirt as lv
from kvhost import libvirt_hook as hook
from kvhost import versions as ver

REPO = Path(__file__).resolve().parent.parent

FAKE_SHIM = """\
import json, os, signal, socket, sys
args = sys.argv[1:]
path = args[args.index("--socket-path") + 1]
print(json.dumps({"event": "args", "argv": args}), flush=True)
s = socket.socket(socket.AF_UNIX)
s.bind(path)
s.listen()
def stop(*_):
    os.unlink(path)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
signal.pause()
"""


class Host:
    """A scratch /run/kvhost, /etc/kvhost/shim and manifests for one test."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.sockets = tmp / "run"
        self.state = tmp / "run" / "shim"
        self.config = tmp / "etc"
        self.sockets.mkdir()
        self.config.mkdir()
        self.m61 = manifest(tmp, "61.json", probe_61())
        self.m612 = manifest(tmp, "612.json", probe_612())
        self.shim = tmp / "fake_shim.py"
        self.shim.write_text(FAKE_SHIM)

    def xml(self, name: str = "vhostuser.xml", version: str | None = None) -> bytes:
        data = (DATA / name).read_bytes().replace(b"/run/kvhost/", f"{self.sockets}/".encode())
        if version is not None:
            doc = lv.parse(data)
            lv.stamp(doc, ver.parse(version), ALL_PROPS if lv.needs_qemu(doc) else None)
            data = lv.serialize(doc)
        return data

    def run(self, op: str, subop: str, xml: bytes, manifest: Path | None = None,
            domain: str = "vm1", init: str = "direct",
            extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "kvhost.libvirt_hook", *extra,
                "--socket-dir", str(self.sockets), "--state-dir", str(self.state),
                "--config-dir", str(self.config), "--init", init, "--timeout", "20",
                "--shim", f"{sys.executable} {self.shim}"]
        if manifest is not None:
            argv += ["--manifest", str(manifest)]
        path = f"{self.tmp / 'bin'}:{os.environ['PATH']}"  # a fake systemctl, when made
        env = {"LC_ALL": "C", "PATH": path, "HOME": "/root",
               "PYTHONPATH": str(REPO)}  # what libvirt passes, plus where kvhost is
        return subprocess.run([*argv, domain, op, subop, "-"], input=xml.decode(), text=True,
                              capture_output=True, env=env, timeout=60, check=False)

    def pid(self, name: str = "vm1") -> int:
        return int((self.state / f"{name}.pid").read_text())


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path)


def gone(pid: int) -> bool:
    for _ in range(100):
        if not hook._alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_prepare_starts_the_shim_at_the_recorded_version_and_release_cleans_up(
    host: Host,
) -> None:
    xml = host.xml(version=V[5])
    done = host.run("prepare", "begin", xml, host.m61)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    sock = host.sockets / "vm1.sock"
    assert hook._listening(str(sock))
    pid = host.pid()
    first = json.loads((host.state / "vm1.log").read_text().splitlines()[0])
    argv = first["argv"]
    assert argv[argv.index("--interface-version") + 1] == V[5]
    assert argv[argv.index("--socket-path") + 1] == str(sock) and "--tap" not in argv
    done = host.run("release", "end", xml, host.m61)
    assert done.returncode == 0, done.stderr
    assert gone(pid)
    assert sorted(p.name for p in host.state.iterdir()) == ["vm1.log"]
    assert not sock.exists()


def test_the_operators_tap_is_passed(host: Host) -> None:
    (host.config / "vm1.env").write_text("KVHOST_TAP=vm1tap\nKVHOST_SHIM_ARGS=\n")
    xml = host.xml(version=V[5])
    assert host.run("prepare", "begin", xml, host.m61).returncode == 0
    argv = json.loads((host.state / "vm1.log").read_text().splitlines()[0])["argv"]
    assert argv[argv.index("--tap") + 1] == "vm1tap"
    assert host.run("release", "end", xml).returncode == 0


def test_release_after_a_crash_leaves_nothing(host: Host) -> None:
    xml = host.xml(version=V[5])
    assert host.run("prepare", "begin", xml, host.m61).returncode == 0
    pid = host.pid()
    os.kill(pid, signal.SIGKILL)  # the shim dies without removing its socket
    assert gone(pid) and (host.sockets / "vm1.sock").exists()
    assert host.run("release", "end", xml).returncode == 0
    assert not (host.sockets / "vm1.sock").exists() and not (host.state / "vm1.pid").exists()


def test_a_version_this_host_lacks_fails_the_start_naming_the_bits(host: Host) -> None:
    done = host.run("prepare", "begin", host.xml(version=V[7]), host.m61)
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    assert "VM vm1 cannot start" in line and V[7] in line and "RING_RESET" in line
    assert not host.state.exists() or not list(host.state.iterdir())


@pytest.mark.parametrize("op", ["migrate", "restore"])
@pytest.mark.parametrize("name", ["vhostuser.xml", "native.xml"])
def test_migrate_and_restore_refuse_an_unservable_version(host: Host, op: str, name: str) -> None:
    xml = host.xml(name, version=V[7])
    done = host.run(op, "begin", xml, host.m61)
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    verb = "migrate here" if op == "migrate" else "be restored here"
    assert f"VM vm1 cannot {verb}" in line and "61.json" in line and "RING_RESET" in line
    assert not host.state.exists()
    ok = host.run(op, "begin", xml, host.m612)
    assert ok.returncode == 0 and ok.stderr == "" and not host.state.exists()


def test_an_unstamped_domain_runs_at_latest_with_one_warning(host: Host) -> None:
    xml = host.xml()
    done = host.run("prepare", "begin", xml, host.m612)
    assert done.returncode == 0
    (line,) = done.stderr.splitlines()
    assert "records no interface version" in line and V[7] in line
    assert "not migration-safe" in line and "kvhost libvirt stamp" in line
    argv = json.loads((host.state / "vm1.log").read_text().splitlines()[0])["argv"]
    assert argv[argv.index("--interface-version") + 1] == V[7]
    assert host.run("release", "end", xml).returncode == 0
    # nothing recorded: nothing to check before a migration
    assert host.run("migrate", "begin", xml, host.m61).returncode == 0


def test_a_dead_shim_fails_the_start_with_its_last_line(host: Host) -> None:
    host.shim.write_text("import sys\nprint('no tap here', flush=True)\nsys.exit(2)\n")
    done = host.run("prepare", "begin", host.xml(version=V[5]), host.m61)
    assert done.returncode == 1
    assert "kvhost-shim exited 2: no tap here" in done.stderr
    assert not (host.state / "vm1.pid").exists()


def test_a_shim_refusing_its_tap_fails_the_start_with_its_message(host: Host) -> None:
    """kvhost-shim without --user checks an operator's tap before it listens (a missing one
    used to fail only each of QEMU's connections, and QEMU retried for ever under a waiting
    'virsh start'); its JSON error line reaches virsh as the message alone."""
    (host.config / "vm1.env").write_text("KVHOST_TAP=kvnotap0\n")
    # the last lines kvhost-shim --log-format json writes for a tap that is not there
    record = {"time": "2026-01-01T00:00:00.000Z", "level": "error", "event": "error",
              "socket": None, "connection": None, "peer_pid": None, "peer_uid": None,
              "peer_gid": None, "version": None, "result": "failed",
              "message": "no network interface named 'kvnotap0' (refused by the kernel)"}
    host.shim.write_text(
        "import json, sys\n"
        "args = sys.argv[1:]\n"
        "assert args[args.index('--tap') + 1] == 'kvnotap0'\n"
        f"print(json.dumps({record!r}), flush=True)\n"
        "sys.exit(1)\n"
    )
    started = time.monotonic()
    done = host.run("prepare", "begin", host.xml(version=V[5]), host.m61)
    assert time.monotonic() - started < 15  # the hook's --timeout is 20: it saw the exit
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "kvhost: VM vm1: kvhost-shim exited 1: no network interface named 'kvnotap0' "
        "(refused by the kernel)"
    ]
    assert not (host.state / "vm1.pid").exists() and not (host.sockets / "vm1.sock").exists()
    assert not (host.state / "vm1.log").exists()  # its reason is in the line above
    assert host.run("release", "end", host.xml(version=V[5]), host.m61).returncode == 0
    assert list(host.state.iterdir()) == []


def test_the_hook_waits_for_its_own_shims_socket_not_the_path_string(host: Host) -> None:
    """/proc/net/unix is per network namespace: another libvirtd's shim (a mount namespace of
    its own, as in a second instance on one host) may listen on the same path string. The
    hook must return only once *its* shim listens, or QEMU finds no socket file. Here an
    unlinked listener keeps the path string, and the shim binds late."""
    import socket as socketlib

    sock = host.sockets / "vm1.sock"
    other = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    other.bind(str(sock))
    other.listen()
    sock.unlink()  # still in /proc/net/unix under that path, as the other namespace's is
    try:
        assert hook._listening(str(sock))
        host.shim.write_text("import time\ntime.sleep(1.5)\n" + FAKE_SHIM)
        xml = host.xml(version=V[5])
        done = host.run("prepare", "begin", xml, host.m61)
        assert done.returncode == 0, done.stderr
        assert sock.exists()  # the shim's own, bound before the hook returned
        assert hook._listening(str(sock), host.pid())
        assert host.run("release", "end", xml, host.m61).returncode == 0
    finally:
        other.close()


def test_without_vhost_net_or_manifest_the_default_path_says_so(host: Host) -> None:
    if Path("/dev/vhost-net").exists() or Path("/run/kvhost/vhost-net.json").exists():
        pytest.skip("this host has vhost-net or a manifest: the probe path is not the error one")
    done = host.run("prepare", "begin", host.xml())
    assert done.returncode == 1
    assert "serves no interface version" in done.stderr and "vhost_net" in done.stderr


@pytest.mark.parametrize(
    ("op", "subop"),
    [("start", "begin"), ("stopped", "begin"), ("reconnect", "begin"),
     ("attach", "begin"), ("prepare", "end"), ("migrate", "end")],
)
def test_other_operations_do_nothing(host: Host, op: str, subop: str) -> None:
    done = host.run(op, subop, host.xml(version=V[7]), host.m61)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    assert not host.state.exists()


def test_started_without_a_running_shim_fails_saying_so(host: Host) -> None:
    done = host.run("started", "begin", host.xml(version=V[5]), host.m61)
    assert done.returncode == 1
    assert "VM vm1: the shim of vm1 is not running" in done.stderr, done.stderr


def test_started_with_cgroup_shim_leaves_the_datapath_alone(host: Host) -> None:
    done = host.run("started", "begin", host.xml(version=V[5]), host.m61,
                    extra=("--cgroup", "shim"))  # fmt: skip
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_started_without_qemus_pid_file_names_the_option(host: Host) -> None:
    xml = host.xml(version=V[5])
    assert host.run("prepare", "begin", xml, host.m61).returncode == 0
    pid = host.pid()
    try:
        done = host.run("started", "begin", xml, host.m61,
                        extra=("--qemu-pid-dir", str(host.tmp / "nowhere")))
        assert done.returncode == 1
        assert f"cannot read QEMU's pid from {host.tmp / 'nowhere' / 'vm1.pid'}" in done.stderr
        assert "--qemu-pid-dir" in done.stderr
    finally:
        host.run("release", "end", xml, host.m61)
    assert gone(pid)


def test_a_bad_cgroup_choice_is_refused(host: Host) -> None:
    done = host.run("started", "begin", host.xml(version=V[5]), host.m61,
                    extra=("--cgroup", "pod"))  # fmt: skip
    assert done.returncode == 1 and "--cgroup must be vm or shim, not 'pod'" in done.stderr


def test_stopped_end_already_stops_the_shim(host: Host) -> None:
    """libvirt removes QEMU's cgroups between 'stopped end' and 'release end'; a shim
    moved into them must be gone by then."""
    xml = host.xml(version=V[5])
    assert host.run("prepare", "begin", xml, host.m61).returncode == 0
    pid = host.pid()
    done = host.run("stopped", "end", xml, host.m61)
    assert done.returncode == 0, done.stderr
    assert gone(pid)
    assert not (host.sockets / "vm1.sock").exists()
    assert host.run("release", "end", xml, host.m61).returncode == 0  # and again: no-op


def test_a_domain_without_kvhost_is_fast_and_imports_nothing_heavy(host: Host) -> None:
    xml = b"<domain type='kvm'><name>plain</name><devices><interface type='network'>" \
          b"<source network='default'/></interface></devices></domain>"
    for op in ("prepare", "migrate", "restore", "release"):
        subop = "end" if op == "release" else "begin"
        done = host.run(op, subop, xml, None, "plain")
        assert (done.returncode, done.stderr) == (0, "")
    assert not host.state.exists()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    timed = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "kvhost.libvirt_hook", "plain", "prepare",
         "begin", "-"], input=xml, capture_output=True, env=env, timeout=60, check=False)
    assert timed.returncode == 0
    imported = timed.stderr.decode()
    for heavy in ("cffi", "kvhost.versions", "kvhost.probe", "argparse", "xml"):
        assert heavy not in imported


def test_bad_invocations_say_how_it_is_called() -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "kvhost.libvirt_hook", "vm1"], input="",
                          capture_output=True, text=True, env=env, timeout=60, check=False)
    assert done.returncode == 2 and "usage:" in done.stderr


FAKE_SYSTEMCTL = """\
#!/bin/sh
# systemctl as far as the hook uses it: start/stop one kvhost-shim@ESCAPED instance (the
# service and its socket), NAME unescaped as the units' %I is
echo "$@" >> {log}
name=${{2#kvhost-shim@}}; name=$(systemd-escape --unescape -- "${{name%.service}}")
case "$1" in
start) setsid {python} {shim} --socket-path {sockets}/$name.sock \
           --interface-version "$(sed -n 's/^KVHOST_INTERFACE_VERSION=//p' {state}/$name.env)" \
           > {state}/$name.unit-log 2>&1 < /dev/null &
       echo $! > {state}/$name.unit-pid ;;
stop) pidfile={state}/$name.unit-pid
      [ -f $pidfile ] && kill $(cat $pidfile); rm -f $pidfile ;;
is-failed) exit 1 ;;
esac
"""


def fake_systemctl(host: Host) -> Path:
    bindir = host.tmp / "bin"
    bindir.mkdir()
    log = host.tmp / "systemctl.log"
    script = bindir / "systemctl"
    script.write_text(FAKE_SYSTEMCTL.format(log=log, python=sys.executable, shim=host.shim,
                                            sockets=host.sockets, state=host.state))
    script.chmod(0o755)
    return log


def test_under_systemd_the_unit_gets_the_version_through_its_env_file(host: Host) -> None:
    calls = fake_systemctl(host)
    xml = host.xml(version=V[5])
    done = host.run("prepare", "begin", xml, host.m61, init="systemd")
    assert done.returncode == 0, done.stderr
    assert (host.state / "vm1.env").read_text() == f"KVHOST_INTERFACE_VERSION={V[5]}\n"
    # (while it waits for the socket the hook also asks 'is-failed', to stop waiting early)
    assert [c for c in calls.read_text().splitlines() if not c.startswith("is-failed")] == [
        "start kvhost-shim@vm1.service"
    ]
    assert hook._listening(str(host.sockets / "vm1.sock"))
    pid = int((host.state / "vm1.unit-pid").read_text())
    done = host.run("release", "end", xml, init="systemd")
    assert done.returncode == 0, done.stderr
    # the socket unit too, or QEMU's next connect would start the shim again
    last = calls.read_text().splitlines()[-1]
    assert last == "stop kvhost-shim@vm1.service kvhost-shim@vm1.socket"
    assert gone(pid) and not (host.state / "vm1.env").exists()
    assert not (host.sockets / "vm1.sock").exists()


def test_under_systemd_the_unit_name_is_the_escaped_socket_name(host: Host) -> None:
    calls = fake_systemctl(host)
    xml = host.xml(version=V[5]).replace(b"vm1.sock", b"vm-1.sock")
    done = host.run("prepare", "begin", xml, host.m61, init="systemd")
    assert done.returncode == 0, done.stderr
    started = [c for c in calls.read_text().splitlines() if not c.startswith("is-failed")]
    assert started == ["start kvhost-shim@vm\\x2d1.service"]  # systemd-escape vm-1
    assert (host.state / "vm-1.env").read_text() == f"KVHOST_INTERFACE_VERSION={V[5]}\n"
    assert hook._listening(str(host.sockets / "vm-1.sock"))
    done = host.run("release", "end", xml, init="systemd")
    assert done.returncode == 0, done.stderr
    assert calls.read_text().splitlines()[-1] == (
        "stop kvhost-shim@vm\\x2d1.service kvhost-shim@vm\\x2d1.socket"
    )
    assert not (host.sockets / "vm-1.sock").exists()


# --- kvhost install-host ------------------------------------------------------------------


def test_install_host_installs_the_hook_running_this_installation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kvhost.cli import main
    from kvhost.commands import host as hostcmd

    root = tmp_path / "root"
    assert main(["install-host", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    path = root / hostcmd.HOOK_FILE
    assert f"installed {path}" in out and "restart libvirtd" in out
    assert oct(path.stat().st_mode & 0o777) == "0o755"
    text = path.read_text()
    assert text.startswith("#!/bin/sh\n")
    last = shlex.split(text.splitlines()[-1])
    assert last == [f"PYTHONPATH={REPO}", "exec", sys.executable, "-S", "-m",
                    "kvhost.libvirt_hook", "$@"]  # fmt: skip
    # as libvirt runs it: an empty environment but for LC_ALL, PATH and HOME, cwd /
    env = {"LC_ALL": "C", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"}
    plain = subprocess.run([str(path), "vm1", "prepare", "begin", "-"], input=b"<domain/>",
                           env=env, cwd="/", capture_output=True, timeout=60, check=False)
    assert (plain.returncode, plain.stderr) == (0, b"")
    h = Host(tmp_path)
    refused = subprocess.run(
        [str(path), "--manifest", str(h.m61), "--socket-dir", str(h.sockets), "vm1", "migrate",
         "begin", "-"],
        input=h.xml(version=V[7]), env=env, cwd="/", capture_output=True, timeout=60,
        check=False,
    )
    assert refused.returncode == 1 and b"VM vm1 cannot migrate here" in refused.stderr


def test_install_host_passes_a_non_default_manifest_to_the_hook(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kvhost.cli import main
    from kvhost.commands import host as hostcmd

    root = tmp_path / "root"
    assert main(["install-host", "--root", str(root), "--manifest", "/var/lib/k.json"]) == 0
    capsys.readouterr()
    last = shlex.split((root / hostcmd.HOOK_FILE).read_text().splitlines()[-1])
    assert last[-3:] == ["--manifest", "/var/lib/k.json", "$@"]


def test_prepare_refuses_a_native_only_domain_this_host_cannot_serve(host: Host) -> None:
    """A native <driver name='vhost'> interface has no shim, but QEMU's own vhost-net must
    back the pinned device: prepare begin judges it like migrate and restore begin."""
    xml = host.xml("native.xml", version=V[7])
    assert b"/run/kvhost/" not in xml and str(host.sockets).encode() not in xml
    done = host.run("prepare", "begin", xml, host.m61)
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"kvhost: VM vm1 cannot start: {host.m61}") and V[7] in line, line
    assert "RING_RESET" in line, line
    assert not host.state.exists()
    for servable in (host.run("prepare", "begin", xml, host.m612),
                     host.run("prepare", "begin", host.xml("native.xml", version=V[5]),
                              host.m61)):  # fmt: skip
        assert (servable.returncode, servable.stdout, servable.stderr) == (0, "", "")
    assert not host.state.exists()
