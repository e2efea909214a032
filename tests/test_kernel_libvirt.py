"""Kernel tier: real libvirtd 9.0 runs kvhost's hook (issue 15, management through libvirt).

Inside the test VM (booted with ``--overlay-rwdir /etc --overlay-rwdir /var/lib``) this
sets libvirt up as /work/shared/reference/libvirt-in-test-vm.md describes, installs the hook
with ``kvhost install-host --root`` staging and copies it into the overlay's /etc, then:
a domain stamped with this kernel's latest version starts with the shim the hook started
at that version, and leaves nothing behind after ``virsh destroy``; a domain stamped with a
version this kernel cannot serve does not start, and virsh shows the hook's line; save stops
the shim, restore of an image recording such a version is refused and of one recording this
host's version brings the shim back; a native ``<driver name='vhost'>`` interface reaches
QEMU with exactly the ``kvhost qemu-args`` properties.

Inside the test VM nothing here skips: without libvirt, a writable /etc or vhost-net the
tests fail and say why. Outside it (a host with vhost-net runs the kernel tier directly)
they skip with that reason: they rewrite /etc/passwd and /etc/libvirt.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_versions import V, probe_612

from harness import libvirtd as libvirtd_harness
from harness.libvirtd import PATH, SOCKETS, STATE, native_domain, sh, virsh
from kvhost import libvirt as lv
from kvhost import manifest as mf
from kvhost import qemu_args
from kvhost import versions as ver
from kvhost.errors import VersionError
from kvhost.libvirt_hook import _alive, _listening

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

RESULTS = Path(os.environ.get("KVHOST_RESULTS", "/var/tmp"))


def vhostuser_domain(name: str, socket: Path | str) -> str:
    return libvirtd_harness.vhostuser_domain(name, socket, RESULTS)


def stamp_to_file(tmp_path: Path, name: str, xml: str) -> tuple[Path, str]:
    """``kvhost libvirt stamp`` (this host's latest) from one file to another, as an operator
    runs it before ``virsh define``; returns the stamped file and what the command said."""
    raw, stamped = tmp_path / f"{name}.xml", tmp_path / f"{name}-stamped.xml"
    raw.write_text(xml)
    done = sh([sys.executable, "-m", "kvhost.cli", "libvirt", "stamp", str(raw), "-o",
               str(stamped)])  # fmt: skip
    assert done.returncode == 0, done.stderr
    return stamped, done.stderr


def require_libvirt_vm(test_file: str) -> None:
    """Skip outside the disposable test VM (these tests rewrite /etc/passwd and /etc/libvirt
    and start their own libvirtd: never on a real host, whose vhost-net lets the kernel
    tier run outside the VM); inside it, fail saying what is missing."""
    if not os.environ.get("KVHOST_IN_TESTVM"):
        pytest.skip("runs only inside the disposable test VM: KVHOST_FORCE_VM=1 ./run-tests, "
                    "or python -m harness.testvm --overlay-rwdir /etc --overlay-rwdir /var/lib "
                    f"-- python -m pytest -m kernel {test_file}")
    why = libvirtd_harness.check_ready()
    if why is not None:
        pytest.fail(why, pytrace=False)


@pytest.fixture(scope="module")
def libvirtd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    require_libvirt_vm("tests/test_kernel_libvirt.py")
    with libvirtd_harness.running(RESULTS, tmp_path_factory.mktemp("stage")) as hook:
        yield hook


def _events(name: str) -> list[dict[str, object]]:
    out = []
    for line in (STATE / f"{name}.log").read_text().splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def test_start_runs_the_shim_at_the_recorded_version_and_destroy_cleans_up(
    libvirtd: Path, tmp_path: Path
) -> None:
    name, sock = "kvt1", SOCKETS / "kvt1.sock"
    stamped, said = stamp_to_file(tmp_path, name, vhostuser_domain(name, sock))
    assert said.strip().endswith(f"recorded {V[5]}")  # Debian's 6.1: v5
    assert virsh("define", str(stamped)).returncode == 0
    try:
        started = virsh("start", name)
        assert started.returncode == 0, started.stderr
        pid = int((STATE / f"{name}.pid").read_text())
        assert _alive(pid) and _listening(str(sock))
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert cmdline[cmdline.index(b"--interface-version") + 1] == V[5].encode()
        events = _events(name)
        listening = [e for e in events if e["event"] == "listening"]
        assert listening and listening[0]["version"] == V[5], events
        for _ in range(200):  # QEMU connects while it starts; the log line may trail
            if any(e["event"] == "accepted" for e in _events(name)):
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"QEMU never connected to the shim: {_events(name)}")
        xml = virsh("dumpxml", name).stdout
        (RESULTS / f"{name}-dumpxml.xml").write_text(xml)  # libvirt's own formatting, kept
        assert lv.recorded(lv.parse(xml.encode()).root) == V[5], xml  # the metadata survives
        destroyed = virsh("destroy", name)
        assert destroyed.returncode == 0, destroyed.stderr
        for _ in range(100):
            if not _alive(pid):
                break
            time.sleep(0.1)
        assert not _alive(pid)
        assert not sock.exists()
        assert not (STATE / f"{name}.pid").exists() and not (STATE / f"{name}.env").exists()
    finally:
        virsh("destroy", name)
        virsh("undefine", name)


def test_a_version_this_kernel_lacks_does_not_start(libvirtd: Path, tmp_path: Path) -> None:
    name, sock = "kvt2", SOCKETS / "kvt2.sock"
    raw = tmp_path / "kvt2.xml"
    raw.write_text(vhostuser_domain(name, sock))
    m612 = tmp_path / "612.json"
    mf.write_atomic(m612, mf.encode(mf.build(probe_612())))
    stamped = tmp_path / "kvt2-stamped.xml"
    # recorded for a 6.12 fleet, as management would on a host of it
    done = sh([sys.executable, "-m", "kvhost.cli", "libvirt", "stamp", str(raw), "-o",
               str(stamped), "--manifest", str(m612)])  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert virsh("define", str(stamped)).returncode == 0
    try:
        started = virsh("start", name)
        assert started.returncode != 0
        err = " ".join(started.stderr.split())
        assert "Hook script execution failed" in err, err
        assert f"VM {name} cannot start" in err and V[7] in err and "RING_RESET" in err, err
        assert not (STATE / f"{name}.pid").exists() and not sock.exists()
        assert virsh("domstate", name).stdout.strip() == "shut off"
    finally:
        virsh("destroy", name)
        virsh("undefine", name)


def _json_value(value: str) -> object:
    return {"on": True, "off": False}.get(value, int(value) if value.isdigit() else value)


def test_a_native_vhost_net_interface_reaches_qemu_pinned(libvirtd: Path, tmp_path: Path) -> None:
    """QEMU's own vhost-net, stamped: libvirt turns the attributes and the override into
    exactly the properties 'kvhost qemu-args' computes (libvirt 9.0, QEMU 7.2)."""
    name, tap = "kvt3", "kvtap3"
    assert sh(["ip", "tuntap", "add", "dev", tap, "mode", "tap"]).returncode == 0
    stamped, _ = stamp_to_file(tmp_path, name, native_domain(name, tap))
    assert virsh("define", str(stamped)).returncode == 0
    try:
        started = virsh("start", name)
        assert started.returncode == 0, started.stderr
        pid = int(Path(f"/run/libvirt/qemu/{name}.pid").read_text())
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        (RESULTS / f"{name}-qemu-argv.txt").write_bytes(b"\n".join(argv))
        devices = [json.loads(a) for a in argv if a.startswith(b"{") and b"virtio-net-pci" in a]
        netdevs = [json.loads(a) for a in argv if a.startswith(b"{") and b'"tap"' in a]
        assert len(devices) == 1 and len(netdevs) == 1, argv
        # libvirt opens /dev/vhost-net only for type='kvm' domains; under the test VM's TCG
        # the tap is plain, but the guest-visible device is what migration depends on
        want = {
            k: _json_value(v)
            for k, v in (p.split("=") for p in qemu_args.device_properties(
                ver.parse(V[5]), qemu_args.available_properties()))
        }  # fmt: skip
        dev = devices[0]
        wrong = {k: (dev[k], v) for k, v in want.items() if k in dev and dev[k] != v}
        assert not wrong, (wrong, dev)
        assert not [k for k in want if k not in dev], dev
    finally:
        virsh("destroy", name)
        virsh("undefine", name)
        sh(["ip", "link", "del", tap])


def _stamp_stdin(xml: str, *args: str) -> str:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{PATH}")
    done = subprocess.run([sys.executable, "-m", "kvhost.cli", "libvirt", "stamp", "-", *args],
                          input=xml, capture_output=True, text=True, env=env, timeout=300,
                          check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_save_and_restore_go_through_the_hook(libvirtd: Path, tmp_path: Path) -> None:
    """save: release end stops the shim; restore: restore begin checks the version in the
    image's XML (refusing one this kernel lacks), prepare begin starts the shim again."""
    name, sock = "kvt4", SOCKETS / "kvt4.sock"
    raw = tmp_path / "kvt4.xml"
    raw.write_text(_stamp_stdin(vhostuser_domain(name, sock)))
    assert virsh("define", str(raw)).returncode == 0
    image = tmp_path / "kvt4.save"
    try:
        assert virsh("start", name).returncode == 0
        first = int((STATE / f"{name}.pid").read_text())
        saved = virsh("save", name, str(image))
        assert saved.returncode == 0, saved.stderr
        for _ in range(100):
            if not _alive(first):
                break
            time.sleep(0.1)
        assert not _alive(first) and not sock.exists() and not (STATE / f"{name}.pid").exists()
        # the image's XML recorded for a 6.12 fleet: this 6.1 host must refuse to restore it
        m612 = tmp_path / "612.json"
        mf.write_atomic(m612, mf.encode(mf.build(probe_612())))
        image_xml = virsh("save-image-dumpxml", str(image)).stdout
        bad = tmp_path / "bad.xml"
        bad.write_text(_stamp_stdin(image_xml, "--force", "--manifest", str(m612)))
        defined = virsh("save-image-define", str(image), str(bad))
        assert defined.returncode == 0, defined.stderr
        refused = virsh("restore", str(image))
        err = " ".join(refused.stderr.split())
        assert refused.returncode != 0 and f"VM {name} cannot be restored here" in err, err
        assert V[7] in err and "RING_RESET" in err, err
        assert not (STATE / f"{name}.pid").exists()
        # back to the version this host serves: the restore goes through
        good = tmp_path / "good.xml"
        good.write_text(_stamp_stdin(image_xml, "--force"))
        assert virsh("save-image-define", str(image), str(good)).returncode == 0
        restored = virsh("restore", str(image))
        assert restored.returncode == 0, restored.stderr
        second = int((STATE / f"{name}.pid").read_text())
        assert _alive(second) and _listening(str(sock))
        cmdline = Path(f"/proc/{second}/cmdline").read_bytes().split(b"\0")
        assert cmdline[cmdline.index(b"--interface-version") + 1] == V[5].encode()
        assert virsh("destroy", name).returncode == 0
        for _ in range(100):
            if not _alive(second):
                break
            time.sleep(0.1)
        assert not _alive(second) and not sock.exists()
    finally:
        virsh("destroy", name)
        virsh("undefine", name)


# --- bad input (issue 15): each gets a clear line and leaves no process or file behind ----


def _leftovers(name: str, sock: Path) -> list[str]:
    """Whatever a domain's start left on this host: files, socket, processes naming it."""
    files = [STATE / f"{name}.{ext}" for ext in ("pid", "env", "log")] + [sock]
    found = [str(p) for p in files if p.exists()]
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        # the shim has the socket path in its argv, QEMU has guest=NAME
        if str(sock).encode() in argv or any(a.startswith(f"guest={name},".encode())
                                             for a in argv):  # fmt: skip
            found.append(f"pid {entry.name}: {b' '.join(argv).decode(errors='replace')}")
    return found


def _refused_start(name: str, sock: Path, xml: str, tmp_path: Path,
                   timeout: float = 120) -> str:
    """Define ``xml``, ``virsh start`` it expecting the hook to refuse; the refusal as one
    line. Asserts it came within ``timeout`` and left nothing."""
    path = tmp_path / f"{name}-final.xml"
    path.write_text(xml)
    defined = virsh("define", str(path))
    assert defined.returncode == 0, defined.stderr
    try:
        began = time.monotonic()
        started = virsh("start", name, timeout=timeout)
        took = time.monotonic() - began
        (RESULTS / f"{name}-refused.txt").write_text(f"{took:.1f} s\n{started.stderr}")
        assert started.returncode != 0, started.stdout
        err = libvirtd_harness.one_line(started.stderr)
        assert "Hook script execution failed" in err and f"{name} prepare begin -" in err, err
        assert virsh("domstate", name).stdout.strip() == "shut off"
        assert _leftovers(name, sock) == []
        return err
    finally:
        virsh("destroy", name)
        virsh("undefine", name)


def _with_recorded(xml: bytes, text: str) -> str:
    """``xml`` (stamped) with ``text`` as its recorded interface-version, as a hand edit."""
    doc = lv.parse(xml)
    net = doc.root.find(f"metadata/{{{lv.KVHOST_NS}}}net")
    assert net is not None
    net.set("interface-version", text)
    return lv.serialize(doc).decode()


@pytest.mark.parametrize(
    ("slug", "text"),
    [("malformed", "vhost-net:features=EVENT_IDX,queue-size"),
     ("unknown", "org.kernel.vhost-net.v99")],
)
def test_a_bad_recorded_version_is_refused_at_start(
    libvirtd: Path, tmp_path: Path, slug: str, text: str
) -> None:
    name = f"kvt5{slug[0]}"
    sock = SOCKETS / f"{name}.sock"
    stamped, _ = stamp_to_file(tmp_path, name, vhostuser_domain(name, sock))
    edited = _with_recorded(stamped.read_bytes(), text)
    with pytest.raises(VersionError) as why:  # what kvhost says of that text
        lv.recorded_version(lv.parse(edited.encode()).root, f"domain {name}")
    err = _refused_start(name, sock, edited, tmp_path)
    assert f"kvhost: VM {name}: domain {name} records interface-version {text!r}: " in err, err
    assert libvirtd_harness.one_line(f"kvhost: VM {name}: {why.value}") in err, err
    assert ("is not key=value" if slug == "malformed" else "unknown interface version") in err


def test_the_installed_hook_ignores_operations_it_does_not_handle(
    libvirtd: Path, tmp_path: Path
) -> None:
    """Run as libvirt runs it (argv, the XML on stdin, libvirt's environment), for a stamped
    kvhost domain: exit 0, no output, no file, no process."""
    name, sock = "kvt6", SOCKETS / "kvt6.sock"
    stamped, _ = stamp_to_file(tmp_path, name, vhostuser_domain(name, sock))
    env = {"LC_ALL": "C", "PATH": PATH, "HOME": "/root"}
    for op, subop in [("start", "begin"), ("stopped", "begin"), ("reconnect", "begin"),
                      ("attach", "begin"), ("prepare", "end"), ("migrate", "end"),
                      ("restore", "end"), ("started", "end"), ("release", "begin"),
                      ("no-such-op", "sideways")]:  # fmt: skip
        done = subprocess.run([str(libvirtd), name, op, subop, "-"],
                              input=stamped.read_bytes(), env=env, cwd="/",
                              capture_output=True, timeout=120, check=False)  # fmt: skip
        assert (done.returncode, done.stdout, done.stderr) == (0, b"", b""), (op, subop, done)
        assert _leftovers(name, sock) == [], (op, subop)


def test_an_unstamped_domain_runs_at_latest_and_the_hook_says_so_once(
    libvirtd: Path, tmp_path: Path
) -> None:
    """No kvhost metadata: served at this host's latest. The hook's warning (not
    migration-safe, how to stamp) goes to syslog: libvirt drops a successful hook's stderr.
    The test VM runs no syslog daemon, so this test is /dev/log for the start."""
    import socket as socketlib

    name, sock = "kvt7", SOCKETS / "kvt7.sock"
    raw = tmp_path / f"{name}.xml"
    raw.write_text(vhostuser_domain(name, sock))
    assert lv.recorded(lv.parse(raw.read_bytes()).root) is None
    assert not Path("/dev/log").exists(), "a syslog daemon runs: read its log instead"
    log = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_DGRAM)
    log.bind("/dev/log")
    assert virsh("define", str(raw)).returncode == 0
    try:
        started = virsh("start", name)
        assert started.returncode == 0, started.stderr
        pid = int((STATE / f"{name}.pid").read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert cmdline[cmdline.index(b"--interface-version") + 1] == V[5].encode()
        log.settimeout(0.5)
        lines = []
        with contextlib.suppress(TimeoutError):
            while True:
                lines.append(log.recv(65536).decode(errors="replace"))
        (RESULTS / f"{name}-syslog.txt").write_text("\n".join(lines))
        warned = [line for line in lines if "records no interface version" in line]
        assert len(warned) == 1, lines
        (line,) = warned
        assert "kvhost-hook" in line and f"VM {name} records no interface version" in line
        assert f"{V[5]}, which is not migration-safe" in line, line
        assert f"'virsh dumpxml --inactive {name} | kvhost libvirt stamp - -o {name}.xml'" \
            in line  # fmt: skip
        assert "records no interface version" not in (RESULTS / "libvirtd.log").read_text()
        assert virsh("destroy", name).returncode == 0
        for _ in range(100):
            if not _alive(pid):
                break
            time.sleep(0.1)
        assert not _alive(pid)
    finally:
        log.close()
        Path("/dev/log").unlink(missing_ok=True)
        virsh("destroy", name)
        virsh("undefine", name)


def test_a_shim_that_cannot_start_fails_virsh_start_promptly(
    libvirtd: Path, tmp_path: Path
) -> None:
    """The operator's env file names a tap that does not exist. kvhost-shim (direct mode,
    no --user) used to listen anyway and fail each of QEMU's connections at SET_OWNER;
    QEMU's vhost-user netdev reconnects for ever before its monitor answers, and 'virsh
    start' hung for over 300 s. Now the shim checks the tap before it listens."""
    name, sock, tap = "kvt8", SOCKETS / "kvt8.sock", "kvnotap8"
    config = Path("/etc/kvhost/shim")
    config.mkdir(parents=True, exist_ok=True)
    (config / f"{name}.env").write_text(f"KVHOST_TAP={tap}\n")
    try:
        stamped, _ = stamp_to_file(tmp_path, name, vhostuser_domain(name, sock))
        began = time.monotonic()
        err = _refused_start(name, sock, stamped.read_text(), tmp_path)
        assert time.monotonic() - began < 90, err
        assert (f"kvhost: VM {name}: kvhost-shim exited 2: no network interface named "
                f"{tap!r}") in err, err
    finally:
        (config / f"{name}.env").unlink(missing_ok=True)


def test_a_native_only_domain_this_kernel_cannot_serve_does_not_start(
    libvirtd: Path, tmp_path: Path
) -> None:
    """No shim, no socket: prepare begin still judges a stamped native vhost-net domain."""
    name, tap = "kvt9", "kvtap9"
    assert sh(["ip", "tuntap", "add", "dev", tap, "mode", "tap"]).returncode == 0
    try:
        # recorded for a 6.12 fleet; this QEMU (7.2) cannot pin v7 itself (no USO
        # properties), so the stamp's own device settings are v5's and only the record says
        # v7, as a domain stamped where a newer QEMU runs would arrive here
        pinned = _stamp_stdin(native_domain(name, tap), "--version", V[5])
        xml = _with_recorded(pinned.encode(), V[7])
        assert lv.recorded(lv.parse(xml.encode()).root) == V[7]
        err = _refused_start(name, Path("/nonexistent"), xml, tmp_path)
        assert f"kvhost: VM {name} cannot start: this host (kernel " in err, err
        assert f"cannot serve {V[7]}: " in err and "RING_RESET" in err, err
    finally:
        sh(["ip", "link", "del", tap])
