"""Kernel tier: Debian's unmodified QEMU in front of kvhost-shim, kernel vhost-net behind it.

Issue 5, end to end with the real client: negotiation per interface version, traffic after
DRIVER_OK through the kernel (not Python), live migration across shims that serve different
versions (fails unpinned exactly as fleets see it, and ``kvhost compat`` predicted it;
succeeds pinned to the compat version), QEMU's native vhost-net pinned with ``kvhost
qemu-args`` showing the same device, and a booted Linux guest pinging through the shim.

The pieces come from the harness (:mod:`harness.rig`, :mod:`harness.shim_process`...); the
shim runs as its own process (``python -m shim.cli``) and what it did is read from its log.
Time is spent on QEMU start-ups, so the full story (traffic + same-version migration) runs
once per module and several tests assert on its result.
"""

from __future__ import annotations

import json
import lzma
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.device import (
    PLUMBING,
    VHOST_USER_MASKED,
    attach_driver,
    device_properties_for,
    driver_for,
    every_version_bit,
    expected_device_bits,
    is_legacy,
)
from harness.frames import GUEST_MAC
from harness.manifests import capped_manifest, host_versions, kvhost_compat
from harness.qemu.legacy_pci import LegacyVirtioNet
from harness.qemu.machine import QEMU_BINARY, MachineConfig, TapBackend, migrate
from harness.qemu.virtio_pci import RX, TX, DriverState
from harness.rig import Rig, exchange
from harness.shim_process import (
    ShimProcess,
    first_per_ring,
    last_per_ring,
    start_shim_expecting_failure,
)
from harness.single_host import ScenarioResult
from harness.single_host import run as run_scenario
from kvhost import abi, features, manifest, versions
from kvhost.probe import probe

pytestmark = [pytest.mark.kernel, pytest.mark.qemu]

EVENT_IDX = features.mask(["EVENT_IDX"])
#: what "the device" means when comparing shim and native: the interface bits plus MTU
INTERFACE = versions.INTERFACE_BITS | features.mask(["MTU"])



SUPPORTED = host_versions()
IDS = [v.label.rsplit(".", 1)[-1] for v in SUPPORTED]

#: device features the driver read through the shim, per version label (filled by the
#: negotiation tests, reused by the native comparison so QEMU starts once per version)
SHIM_DEVICE: dict[str, int] = {}


def _wait_acked(shim: ShimProcess, timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        acked = shim.acked_features()
        if acked:
            return acked
        time.sleep(0.05)
    raise AssertionError(f"the shim logged no SET_FEATURES:\n{shim.log_text()}")


def _shim_device_features(version: versions.InterfaceVersion) -> tuple[int, int]:
    """(device features the driver reads, SET_FEATURES the shim got) with ``version``."""
    legacy = is_legacy(version)
    with Rig() as rig:
        rig.port("kvn0")
        shim = rig.shim("shim", "kvn0", version.label)
        assert shim.served_version() == version.label, shim.log_text()
        machine = rig.qemu("qemu", shim, legacy=legacy,
                           properties=device_properties_for(version))
        drv = driver_for(machine, legacy)
        offered = drv.read_device_features()
        drv.reset()
        drv.negotiate(every_version_bit(drv))
        drv.setup_queue(RX)
        drv.setup_queue(TX)
        drv.driver_ok()
        acked = _wait_acked(shim)
        assert machine.stop() == 0, machine.stderr_text()
    SHIM_DEVICE[version.label] = offered
    return offered, acked[0]


def test_this_kernel_serves_versions() -> None:
    assert SUPPORTED, "the probe finds no servable interface version on this kernel"


@pytest.mark.parametrize("version", SUPPORTED, ids=IDS)
def test_negotiation_exposes_exactly_the_version(
    version: versions.InterfaceVersion, netns_quiet: str, tmp_path: Path
) -> None:
    offered, acked = _shim_device_features(version)
    want = expected_device_bits(version)
    shown = offered & VHOST_USER_MASKED
    assert shown == want, (
        f"device shows {features.names(shown ^ want)} differently from {version.label}: "
        f"{shown:#x} != {want:#x}")
    # QEMU forwards only backend bits: with the driver taking every version bit, SET_FEATURES
    # carries exactly the version (plus the vhost-user plumbing bit)
    assert acked & features.PROTOCOL_FEATURES, f"SET_FEATURES {acked:#x} lacks bit 30"
    assert acked & ~PLUMBING == want, (
        f"SET_FEATURES {acked:#x}: {features.names((acked & ~PLUMBING) ^ want)} differ")


def test_unservable_version_is_refused_at_start(tmp_path: Path) -> None:
    offer = versions.host_offer(probe())
    refused = [v for v in versions.registry() if not versions.supports(offer, v)]
    if not refused:
        pytest.fail("this kernel serves every registered version; nothing to refuse")
    version = refused[-1]
    status, log = start_shim_expecting_failure(version.label, tmp_path)
    assert status == 1, log
    assert f"interface version {version.label} cannot be served on this host" in log, log
    for reason in versions.missing(version, offer):
        assert reason in log, f"{reason!r} not in the shim's message:\n{log}"


# --- the full story: traffic and same-version migration --------------------------------


@pytest.fixture(scope="module")
def story() -> ScenarioResult:
    return run_scenario(frames=16)


def test_traffic_both_ways_through_kernel_vhost(story: ScenarioResult) -> None:
    assert story.frames_sent == 16 and story.frames_received == 16
    # the frames moved while the shim slept in select(): Python is not on the datapath
    usage = story.traffic_shim_usage
    assert usage.switches <= 2, f"shim woke up {usage.switches} times during traffic"
    assert usage.cpu_seconds <= 0.02, f"shim used {usage.cpu_seconds:.3f} s CPU during traffic"
    assert story.driver_ok_ms > 0


def test_story_negotiated_latest_version(story: ScenarioResult) -> None:
    latest = versions.parse(story.latest)
    assert story.served == story.latest == story.supported[-1]
    assert story.negotiated & ~PLUMBING & ~versions.serve_features(latest) == 0
    assert story.negotiated & features.mask(["VERSION_1"])


def test_story_migration_resumes_rings_on_destination(story: ScenarioResult) -> None:
    m = story.migration
    assert m.status == "completed", m
    assert story.destination_state == "running"
    assert m.downtime_ms is not None and m.total_ms is not None and m.downtime_ms <= m.total_ms
    src = last_per_ring(story.source_get_bases)
    dst = first_per_ring(story.destination_set_bases)
    assert src and src == dst, (story.source_get_bases, story.destination_set_bases)
    assert src[TX] == story.frames_sent and src[RX] == story.frames_received
    assert story.log_all and story.log_mapped, story.logs["shim-a"]
    assert story.rarp_seen
    assert story.frames_after_migration == 2
    assert story.driver_tx_used == story.frames_sent + 1
    assert story.destination_exit == 0 and story.source_exit == 0
    assert story.shim_exits == [0, 0], story.logs


# --- migration across shims serving different versions -----------------------------------


def _capped(latest: versions.InterfaceVersion) -> versions.InterfaceVersion:
    """A destination that lacks EVENT_IDX but keeps VERSION_1 (so the same modern device
    can start there): what an older backend looks like to a VM created on this host."""
    return versions.InterfaceVersion(None, latest.features & ~EVENT_IDX, latest.max_queue_size,
                                     latest.max_queue_pairs, latest.mtu)


def _manifests(tmp: Path) -> tuple[Path, Path, versions.InterfaceVersion,
                                   versions.InterfaceVersion]:
    host = manifest.build(probe())
    latest = versions.parse(host["latest"])
    cap = _capped(latest)
    src, dst = tmp / "source.json", tmp / "destination.json"
    manifest.write_atomic(src, manifest.encode(host))
    manifest.write_atomic(dst, manifest.encode(capped_manifest(host, cap)))
    return src, dst, latest, cap


def test_unpinned_migration_to_capped_shim_fails_as_compat_predicted(
    netns_quiet: str, tmp_path: Path
) -> None:
    src_manifest, dst_manifest, latest, cap = _manifests(tmp_path)
    status, compat = kvhost_compat(src_manifest, dst_manifest)
    assert status == 0, compat
    # the prediction: the common version is older than the source's latest, because the
    # destination lacks EVENT_IDX
    assert compat["version"] != latest.label, compat
    assert any("EVENT_IDX" in r and "cannot move" in r for r in compat["reasons"]), compat

    with Rig() as rig:
        port = rig.port("kvs0")
        rig.port("kvs1")
        shim_a = rig.shim("shim-a", "kvs0", None)  # not pinned: the host's latest
        shim_b = rig.shim("shim-b", "kvs1", cap.spec())
        assert shim_a.served_version() == latest.label
        props = {"mac": GUEST_MAC.hex(":")}  # the VM is not pinned either
        src = rig.qemu("qemu-a", shim_a, legacy=False, properties=props)
        dst = rig.qemu("qemu-b", shim_b, legacy=False, properties=props,
                       incoming=rig.migration_uri())
        drv = driver_for(src, legacy=False)
        drv.start()
        assert drv.state.driver_features & EVENT_IDX
        exchange(drv, port, 1, "before")

        result = migrate(src, rig.migration_uri(), destination=dst)
        assert result.status == "failed", result
        dst_status = dst.wait(timeout=30)
        assert dst_status != 0
        err = dst.stderr_text()
        match = re.search(r"Features 0x([0-9a-f]+) unsupported\. Allowed features: "
                          r"0x([0-9a-f]+)", err)
        assert match, err
        guest, allowed = int(match.group(1), 16), int(match.group(2), 16)
        assert guest & ~allowed == EVENT_IDX, features.names(guest & ~allowed)
        assert "load of migration failed" in err, err
        # the source VM keeps running, and so does its datapath
        assert src.qmp.query_status() == "running"
        exchange(drv, port, 1, "after-failed")


def test_pinned_migration_at_compat_version_completes(netns_quiet: str, tmp_path: Path) -> None:
    src_manifest, dst_manifest, _, _ = _manifests(tmp_path)
    status, compat = kvhost_compat(src_manifest, dst_manifest)
    assert status == 0 and compat["version"], compat
    version = versions.parse(compat["version"])
    legacy = is_legacy(version)
    with Rig() as rig:
        src_port = rig.port("kvs0")
        dst_port = rig.port("kvs1")
        shim_a = rig.shim("shim-a", "kvs0", version.label)
        shim_b = rig.shim("shim-b", "kvs1", version.label)
        props = device_properties_for(version)
        src = rig.qemu("qemu-a", shim_a, legacy=legacy, properties=props)
        dst = rig.qemu("qemu-b", shim_b, legacy=legacy, properties=props,
                       incoming=rig.migration_uri())
        drv = driver_for(src, legacy)
        drv.start()
        sent, received = exchange(drv, src_port, 3, "a")

        result = migrate(src, rig.migration_uri(), destination=dst)
        assert result.status == "completed", (result, dst.stderr_text())
        assert dst.wait_incoming(timeout=30) == "running"
        rarp, _ = dst_port.expect(abi.ETH_P_RARP)
        assert rarp[6:12] == GUEST_MAC
        moved = attach_driver(dst, DriverState.from_json(drv.save_state()), legacy)
        assert isinstance(moved, LegacyVirtioNet) == legacy
        assert moved.used_idx(TX) == sent
        exchange(moved, dst_port, 1, "b")  # through the destination's kernel vhost-net
        assert moved.used_idx(TX) == sent + 1

        src_bases = last_per_ring(shim_a.ring_bases("GET_VRING_BASE"))
        dst_bases = first_per_ring(shim_b.ring_bases("SET_VRING_BASE"))
        assert src_bases == dst_bases == {RX: received, TX: sent}, (
            shim_a.log_text(), shim_b.log_text())
        acked = shim_a.acked_features()
        assert any(f & features.LOG_ALL for f in acked), shim_a.log_text()
        assert shim_a.events("dirty_log"), shim_a.log_text()
        assert shim_b.events("rarp"), shim_b.log_text()
        assert shim_b.served_version() == version.label
        assert dst.stop() == 0 and src.stop() == 0
        assert shim_a.stop() == 0 and shim_b.stop() == 0


# --- QEMU's native vhost-net pinned with kvhost qemu-args ---------------------------------


def _qemu_args(version: versions.InterfaceVersion) -> dict[str, str]:
    run = subprocess.run([sys.executable, "-m", "kvhost.cli", "qemu-args", version.label,
                          "--json"], capture_output=True, text=True, check=True)
    props: list[str] = json.loads(run.stdout)
    return dict(p.split("=", 1) for p in props)


@pytest.mark.parametrize("version", SUPPORTED, ids=IDS)
def test_native_pinned_device_equals_shim_device(
    version: versions.InterfaceVersion, netns_quiet: str, tmp_path: Path
) -> None:
    if version.label not in SHIM_DEVICE:
        _shim_device_features(version)
    shim_offered = SHIM_DEVICE[version.label]
    props = _qemu_args(version)
    legacy = props.pop("disable-modern", "off") == "on"
    assert props.pop("disable-legacy", "on" if not legacy else "off") == ("off" if legacy
                                                                            else "on")
    assert legacy == is_legacy(version)
    props.update(device_properties_for(version))
    with Rig() as rig:
        machine = rig.machine("native", MachineConfig(
            backend=TapBackend("kvq0", vhost=True), device_properties=props, legacy=legacy))
        native = driver_for(machine, legacy).read_device_features()
        assert machine.stop() == 0, machine.stderr_text()
    diff = (native ^ shim_offered) & INTERFACE
    assert not diff, (f"{version.label}: native {native:#x} vs shim {shim_offered:#x} differ "
                      f"in {features.names(diff)}")
    assert native & INTERFACE == expected_device_bits(version) & INTERFACE


# --- a booted guest ---------------------------------------------------------------------------


def _cpio(entries: list[tuple[str, int, bytes, int]]) -> bytes:
    """A newc cpio archive of (name, mode, data, rdev (major << 8 | minor))."""
    out = bytearray()

    def pad(n: int) -> bytes:
        return b"\0" * (-n % 4)

    for ino, (name, mode, data, rdev) in enumerate([*entries, ("TRAILER!!!", 0, b"", 0)], 1):
        raw = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev >> 8, rdev & 0xFF, len(raw), 0]
        header = b"070701" + b"".join(f"{f:08x}".encode() for f in fields)
        out += header + raw + pad(len(header) + len(raw)) + data + pad(len(data))
    return bytes(out)


def _module_chain(moddir: Path, names: list[str]) -> list[Path]:
    """The .ko files of ``names`` and their dependencies, dependencies first."""
    deps: dict[str, list[str]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[Path(mod).name.split(".ko")[0]] = [mod, *rest.split()]
    order: list[str] = []

    def visit(path: str) -> None:
        key = Path(path).name.split(".ko")[0]
        for dep in deps[key][1:]:
            visit(dep)
        if deps[key][0] not in order:
            order.append(deps[key][0])

    for name in names:
        if name not in deps:
            pytest.fail(f"module {name} not in {moddir}/modules.dep (built in?)")
        visit(deps[name][0])
    return [moddir / rel for rel in order]


def _initramfs(workdir: Path, peer: str, address: str, release: str) -> Path:
    moddir = Path("/lib/modules") / release
    modules = _module_chain(moddir, ["virtio_pci", "virtio_net"])
    busybox = shutil.which("busybox") or "/bin/busybox"
    init = f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
for m in {' '.join(p.name.replace('.xz', '') for p in modules)}; do insmod /lib/$m; done
ip link set eth0 up
ip addr add {address}/16 dev eth0
if ping -c 3 -w 60 {peer}; then echo KVHOST-PING-OK; else echo KVHOST-PING-FAILED; fi
poweroff -f
"""
    entries: list[tuple[str, int, bytes, int]] = [
        ("dev", stat.S_IFDIR | 0o755, b"", 0),
        ("dev/console", stat.S_IFCHR | 0o600, b"", 5 << 8 | 1),
        ("bin", stat.S_IFDIR | 0o755, b"", 0),
        ("proc", stat.S_IFDIR | 0o755, b"", 0),
        ("sys", stat.S_IFDIR | 0o755, b"", 0),
        ("lib", stat.S_IFDIR | 0o755, b"", 0),
        ("bin/busybox", stat.S_IFREG | 0o755, Path(busybox).read_bytes(), 0),
        ("init", stat.S_IFREG | 0o755, init.encode(), 0),
    ]
    for mod in modules:
        data = mod.read_bytes()
        if mod.suffix == ".xz":
            data = lzma.decompress(data)
        entries.append((f"lib/{mod.name.replace('.xz', '')}", stat.S_IFREG | 0o644, data, 0))
    path = workdir / "initramfs.cpio"
    path.write_bytes(_cpio(entries))
    return path


@pytest.mark.slow
def test_booted_guest_pings_peer_through_shim(netns_quiet: str, tmp_path: Path) -> None:
    kernel = Path("/boot") / f"vmlinuz-{os.uname().release}"
    assert kernel.exists(), f"{kernel} missing: the guest boots the running kernel's image"
    peer, address = "169.254.77.1", "169.254.77.2"
    initrd = _initramfs(tmp_path, peer, address, os.uname().release)
    with Rig() as rig:
        rig.port("kvg0")
        subprocess.run(["ip", "addr", "add", f"{peer}/16", "dev", "kvg0"], check=True)
        shim = rig.shim("shim", "kvg0", None)
        serial = tmp_path / "serial.log"
        argv = [
            QEMU_BINARY, "-nodefaults", "-no-user-config", "-display", "none",
            "-machine", "pc", "-accel", "tcg", "-m", "256M",
            "-object", "memory-backend-memfd,id=mem,size=256M,share=on",
            "-numa", "node,memdev=mem", "-no-reboot",
            "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", "console=ttyS0 panic=-1 loglevel=4",
            "-serial", f"file:{serial}",
            "-chardev", f"socket,id=vhu0,path={shim.socket_path}",
            "-netdev", "vhost-user,id=n0,chardev=vhu0",
            "-device", f"virtio-net-pci,netdev=n0,vectors=0,mac={GUEST_MAC.hex(':')}",
        ]
        with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as qemu:
            try:
                out, _ = qemu.communicate(timeout=600)
            except subprocess.TimeoutExpired:
                qemu.kill()
                out, _ = qemu.communicate()
                pytest.fail(f"guest did not finish in 600 s; serial:\n{_tail(serial)}")
        console = serial.read_text(errors="replace")
        assert "KVHOST-PING-OK" in console, f"{out.decode(errors='replace')}\n{_tail(serial)}"
        assert re.search(r"3 packets transmitted, [1-3] packets received", console), console
        acked = shim.acked_features()
        assert acked and acked[0] & features.mask(["VERSION_1"]), shim.log_text()
        assert shim.stop() == 0, shim.log_text()


def _tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no serial log)"
