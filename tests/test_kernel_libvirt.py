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


@pytest.fixture(scope="module")
def libvirtd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if not os.environ.get("KVHOST_IN_TESTVM"):
        # it rewrites /etc/passwd, /etc/libvirt and starts its own libvirtd: never on a
        # real host, whose vhost-net lets the kernel tier run outside the VM
        pytest.skip("runs only inside the disposable test VM: KVHOST_FORCE_VM=1 ./run-tests, "
                    "or python -m harness.testvm --overlay-rwdir /etc --overlay-rwdir /var/lib "
                    "-- python -m pytest -m kernel tests/test_kernel_libvirt.py")
    why = libvirtd_harness.check_ready()
    if why is not None:
        pytest.fail(why, pytrace=False)
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
