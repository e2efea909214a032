"""Kernel tier: live ``virsh migrate`` between two real libvirtd 9.0 instances (issue 15).

Both instances run in the one test VM (Debian's 6.1 under TCG), as
/work/shared/reference/libvirt-in-test-vm.md records: A is :func:`harness.libvirtd.running`;
B (:func:`harness.libvirtd.second_instance`) runs in its own mount namespace with private
/run, /etc/libvirt, /var/lib/libvirt, /var/log/libvirt and /var/cache/libvirt, its own
host UUID, virtlogd, hook state and shims.

**Both daemons run on the same kernel.** So that "the destination cannot serve this
version" can happen at all, B's hook judges versions by a manifest of an *older* host: B's
/run/kvhost/vhost-net.json is built with kvhost's own manifest code from a probe of a
mainline 3.10 kernel (``VHOST_GET_FEATURES`` 0x3d008000 and a multiqueue tap, the
``KERNEL_HISTORY`` row of tests/test_versions.py), whose latest version is v4 (v5 adds
VERSION_1, which vhost-net has since 3.19). B's QEMU and shim really run on 6.1; only
the hook's judgement is the older host's. What is checked:

* a vhost-user domain stamped with A's latest (v5 on 6.1) is refused by B's hook at
  ``migrate begin``: virsh shows the hook's line (VM, version, missing bits), the domain
  still runs on A with its shim, and B has no shim, socket, pid/env/log file or QEMU;
* the same for a native ``<driver name='vhost'>`` domain;
* a domain stamped with the compat version of both manifests (v4) migrates: B's hook starts
  B's shim at v4, A's shim is gone after the source's ``release end``, the guest driver
  (played over qtest) that was at DRIVER_OK on A carries on on B (same status and queues,
  a frame sent after the migration is used by B's vhost-net), and QEMU on B shows exactly
  v4's device bits.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_kernel_libvirt import require_libvirt_vm
from test_versions import BASIC_OFFLOADS, V, probe_json

from harness import device
from harness import libvirtd as lvd
from harness.frames import GUEST_MAC, PEER_MAC, frame
from harness.libvirtd import SOCKETS, STATE, Instance, migrate, one_line, sh, virsh
from harness.qemu.legacy_pci import LegacyVirtioNet
from harness.qemu.virtio_pci import DRIVER_OK, TX
from kvhost import features as fb
from kvhost import libvirt as lv
from kvhost import manifest as mf
from kvhost import probe
from kvhost import versions as ver
from kvhost.libvirt_hook import _alive, _listening

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

RESULTS = Path(os.environ.get("KVHOST_RESULTS", "/var/tmp"))
#: the older host B's hook judges by: mainline 3.10 (tests/test_versions.py KERNEL_HISTORY)
OLDER_RELEASE = "3.10.0"
OLDER_VHOST_FEATURES = 0x3D008000


@dataclass(frozen=True)
class Hosts:
    a_manifest: Path  # A's own, from probing this kernel
    b_manifest: Path  # B's /run/kvhost/vhost-net.json, seen from outside B
    b: Instance


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    require_libvirt_vm("tests/test_kernel_libvirt_migrate.py")
    work = tmp_path_factory.mktemp("migrate")
    older = probe.Probe.from_json(probe_json(OLDER_RELEASE, OLDER_VHOST_FEATURES,
                                             BASIC_OFFLOADS))  # fmt: skip
    with lvd.running(RESULTS, work / "stage"):
        a_manifest = work / "a.json"
        mf.write_atomic(a_manifest, mf.encode(mf.build(probe.probe())))
        with lvd.second_instance(RESULTS, work / "b",
                                 manifest=mf.encode(mf.build(older))) as b:  # fmt: skip
            yield Hosts(a_manifest, b.path(mf.DEFAULT_PATH), b)


def stamp(tmp_path: Path, name: str, xml: str, *args: str) -> Path:
    raw, stamped = tmp_path / f"{name}.xml", tmp_path / f"{name}-stamped.xml"
    raw.write_text(xml)
    done = sh([sys.executable, "-m", "kvhost.cli", "libvirt", "stamp", str(raw), "-o",
               str(stamped), *args])  # fmt: skip
    assert done.returncode == 0, done.stderr
    return stamped


def b_refusal(hosts: Hosts, version: str) -> str:
    """What B's hook says of ``version``: B's manifest, under the path B's hook reads it
    at (kvhost's own refusal text, so the bits and their order are the hook's)."""
    m = mf.read(hosts.b_manifest)
    label = m.label.replace(str(hosts.b_manifest), str(mf.DEFAULT_PATH))
    why = lv.refusal(ver.parse(version), lv.Host(m.offer, label))
    assert why is not None
    return why


def wait_gone(pid: int) -> bool:
    for _ in range(200):
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


def assert_nothing_in_b(hosts: Hosts, name: str) -> None:
    b = hosts.b
    listed = b.virsh("list", "--all", "--name")
    assert listed.returncode == 0 and name not in listed.stdout.split(), listed.stdout
    left = [b.path(STATE / f"{name}.{ext}") for ext in ("pid", "env", "log")]
    left.append(b.path(SOCKETS / f"{name}.sock"))
    assert [p for p in left if p.exists()] == []
    mine = {pid: argv for pid, argv in b.processes().items()
            if any(name in a for a in argv)}  # fmt: skip
    assert mine == {}, mine  # no shim for it, no QEMU


def check_refused(hosts: Hosts, name: str, version: str, slug: str) -> None:
    """virsh migrate fails with B's hook line, and the domain runs on at A."""
    done = migrate(name, hosts.b)
    err = one_line(done.stderr)
    (RESULTS / f"migrate-refused-{slug}.txt").write_text(done.stderr)  # the report quotes it
    assert done.returncode != 0, done.stdout
    assert "Hook script execution failed" in err and f"{name} migrate begin -" in err, err
    assert f"kvhost: VM {name} cannot migrate here: {one_line(b_refusal(hosts, version))}" \
        in err, err  # fmt: skip
    assert version in err and "VERSION_1" in err and OLDER_RELEASE in err, err
    assert virsh("domstate", name).stdout.strip() == "running"
    assert_nothing_in_b(hosts, name)


def test_a_vhostuser_domain_at_as_latest_is_refused_by_bs_hook(
    hosts: Hosts, tmp_path: Path
) -> None:
    name, sock = "kvm1", SOCKETS / "kvm1.sock"
    stamped = stamp(tmp_path, name, lvd.vhostuser_domain(name, sock, RESULTS),
                    "--manifest", str(hosts.a_manifest))  # fmt: skip
    assert lv.recorded(lv.parse(stamped.read_bytes()).root) == V[5]  # A (6.1): v5
    assert virsh("define", str(stamped)).returncode == 0
    try:
        started = virsh("start", name)
        assert started.returncode == 0, started.stderr
        pid = int((STATE / f"{name}.pid").read_text())
        check_refused(hosts, name, V[5], "vhostuser")
        # A's shim was never touched: the same process, still serving QEMU
        assert _alive(pid) and _listening(str(sock))
        assert int((STATE / f"{name}.pid").read_text()) == pid
    finally:
        virsh("destroy", name)
        virsh("undefine", name)


def test_a_native_vhost_domain_at_as_latest_is_refused_by_bs_hook(
    hosts: Hosts, tmp_path: Path
) -> None:
    name, tap = "kvm2", "kvmtap2"
    assert sh(["ip", "tuntap", "add", "dev", tap, "mode", "tap"]).returncode == 0
    stamped = stamp(tmp_path, name, lvd.native_domain(name, tap),
                    "--manifest", str(hosts.a_manifest))  # fmt: skip
    assert lv.recorded(lv.parse(stamped.read_bytes()).root) == V[5]
    assert virsh("define", str(stamped)).returncode == 0
    try:
        started = virsh("start", name)
        assert started.returncode == 0, started.stderr
        check_refused(hosts, name, V[5], "native")
    finally:
        virsh("destroy", name)
        virsh("undefine", name)
        sh(["ip", "link", "del", tap])


def qmp(b: Instance, name: str, command: str, **arguments: object) -> object:
    """A QMP command to QEMU on B (through B's libvirtd); its ``return``."""
    cmd: dict[str, object] = {"execute": command}
    if arguments:
        cmd["arguments"] = arguments
    done = b.virsh("qemu-monitor-command", name, json.dumps(cmd))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["return"]


def feature_bits(listed: dict[str, object]) -> tuple[int, list[str]]:
    """x-query-virtio-status decodes feature words into 'VIRTIO_NET_F_MRG_RXBUF: ...'
    strings: the bits kvhost's table names, and the names it does not know."""
    bits, other = 0, []
    for key in ("transports", "dev-features"):
        for text in listed.get(key, []):  # type: ignore[attr-defined]
            full = str(text).split(":", 1)[0].strip()
            short = full
            for prefix in ("VIRTIO_NET_F_", "VIRTIO_RING_F_", "VIRTIO_F_", "VHOST_USER_F_",
                           "VHOST_F_"):
                short = short.removeprefix(prefix)
            if short in fb.BY_NAME:
                bits |= fb.bit(short)
            else:
                other.append(full)
    return bits, other


def test_a_domain_pinned_to_the_compat_version_migrates_with_its_shim(
    hosts: Hosts, tmp_path: Path
) -> None:
    name, sock = "kvm3", SOCKETS / "kvm3.sock"
    # the qtest socket and BIOS under /run, which each instance has privately: both QEMUs
    # bind the same path string, and a QEMU unlinks its listening socket's path at exit, so
    # under a shared /tmp A's exit would remove the socket B's QEMU listens on
    work = Path("/run/kvhost-qtest")
    work.mkdir(exist_ok=True)
    domain = lvd.driven_domain(name, work, sock=sock)
    hosts.b.path(work).mkdir(exist_ok=True)
    shutil.copy(work / "hlt.bin", hosts.b.path(work / "hlt.bin"))
    on_b = dataclasses.replace(domain, qtest=hosts.b.path(domain.qtest))
    # v4 has no VERSION_1: QEMU serves it only behind a device with a legacy interface, which
    # the qtest legacy driver plays (the harness's own domains are modern-only)
    xml = domain.xml.replace("'virtio-non-transitional'", "'virtio-transitional'")
    assert xml != domain.xml
    stamped = stamp(tmp_path, name, xml, "--manifest", str(hosts.a_manifest),
                    "--manifest", str(hosts.b_manifest))  # fmt: skip
    compat = mf.compat([mf.read(hosts.a_manifest), mf.read(hosts.b_manifest)])
    assert compat.version is not None and compat.version.label == V[4]
    assert lv.recorded(lv.parse(stamped.read_bytes()).root) == V[4]
    version = ver.parse(V[4])
    assert virsh("define", str(stamped)).returncode == 0
    try:
        started = virsh("start", name)
        assert started.returncode == 0, started.stderr
        a_pid = int((STATE / f"{name}.pid").read_text())
        # the guest driver at DRIVER_OK on A, and a frame through A's vhost-net
        client = domain.connect()
        try:
            drv = LegacyVirtioNet.probe(client)
            drv.start()
            drv.send(frame(GUEST_MAC, PEER_MAC, "before migration"))
            sent = drv.wait_used(TX, 1, timeout=30)
            state = drv.state
        finally:
            client.close()

        done = migrate(name, hosts.b)
        (RESULTS / "migrate-pinned.txt").write_text(done.stdout + done.stderr)
        assert done.returncode == 0, done.stderr
        assert hosts.b.virsh("domstate", name).stdout.strip() == "running"
        assert virsh("domstate", name).stdout.strip() == "shut off"  # persistent on A

        # B's hook started B's shim at the recorded version
        b_pid = int(hosts.b.path(STATE / f"{name}.pid").read_text())
        assert b_pid in hosts.b.processes() and _alive(b_pid)
        argv = Path(f"/proc/{b_pid}/cmdline").read_bytes().split(b"\0")
        assert argv[argv.index(b"--interface-version") + 1] == V[4].encode()
        events = [json.loads(line) for line in
                  hosts.b.path(STATE / f"{name}.log").read_text().splitlines()
                  if line.startswith("{")]  # fmt: skip
        assert [e["version"] for e in events if e["event"] == "listening"] == [V[4]], events
        assert any(e["event"] == "accepted" for e in events), events
        # A's shim went at the source's stopped/release end
        assert wait_gone(a_pid)
        assert not sock.exists()
        assert not (STATE / f"{name}.pid").exists() and not (STATE / f"{name}.env").exists()

        # the driver carries on on B: same device status and queues, and the TX ring moves
        client = on_b.connect()
        try:
            moved = LegacyVirtioNet.attach(client, state)
            assert moved.status() & DRIVER_OK
            moved.send(frame(GUEST_MAC, PEER_MAC, "after migration"))
            assert moved.wait_used(TX, 1, timeout=30) == (sent + 1) & 0xFFFF
        finally:
            client.close()

        # QEMU on B: the device bits the backend masks are exactly v4's, the backend
        # (B's shim) offered exactly v4 (plus the vhost-user plumbing bits)
        found = qmp(hosts.b, name, "x-query-virtio")
        assert isinstance(found, list)
        (path,) = [d["path"] for d in found if d["name"] == "virtio-net"]
        status = qmp(hosts.b, name, "x-query-virtio-status", path=path)
        assert isinstance(status, dict)
        (RESULTS / "migrate-virtio-status.json").write_text(json.dumps(status, indent=1))
        assert status["vhost-started"] is True
        shown, _ = feature_bits(status["host-features"])
        # mq and host_mtu are QEMU's opt-ins (libvirt sets them only with <driver queues> and
        # <mtu>, which this domain has not): the device shows every other bit of v4's
        want = device.expected_device_bits(version) & ~fb.mask(["MQ", "MTU"])
        assert shown & device.VHOST_USER_MASKED == want, (
            fb.names(shown & device.VHOST_USER_MASKED), fb.names(want))
        offered, _ = feature_bits(status["vhost-dev"]["features"])
        assert offered & ~device.PLUMBING == ver.serve_features(version), (
            fb.names(offered), fb.names(ver.serve_features(version)))
        acked, _ = feature_bits(status["guest-features"])
        assert acked == state.driver_features, (fb.names(acked),
                                                fb.names(state.driver_features))
    finally:
        hosts.b.virsh("destroy", name)
        virsh("destroy", name)
        virsh("undefine", name)
