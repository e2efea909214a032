"""Kernel tier: QEMU 10.0 (bookworm-backports, unpacked beside Debian's 7.2) in front of the
shim and with its own vhost-net, and migration between the two QEMU releases on one kernel.

Issue 16. What each case shows:

* the shim behind QEMU 10.0, every version this kernel serves: the driver sees exactly the
  version's bits as QEMU's vhost-user netdev passes them, frames flow; USO never reaches the
  guest through vhost-user (QEMU asks its netdev peer for USO and only the tap netdev says
  yes), which the backend-features QEMU recorded prove it was offered;
* QEMU 10.0's own ``tap,vhost=on`` unpinned shows USO when the tap takes USO (6.2+) and
  RING_RESET when vhost-net has it (6.3+): exactly what breaks migrating to an older kernel;
* 7.2 -> 10.0 and 10.0 -> 7.2 at machine type ``pc-q35-7.2``, natively (each side pinned by
  ``kvhost qemu-args`` with its own QEMU) and through the shim (both shims pinned): migration
  completes, frames flow, the destination's vhost backend got SET_FEATURES with exactly the
  negotiated bits (else a vnet header size mismatch drops frames silently), and the source's
  dirty log was on while RAM was copied;
* unpinned where it must fail: QEMU's default machine types differ between releases, and a
  10.0 pinned to a USO version cannot land on 7.2; both fail with QEMU's own text.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import ExitStack

import pytest

from harness import netns
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
from harness.manifests import host_versions
from harness.qemu import virtio_status as vs
from harness.qemu.binaries import COMMON_MACHINE, QEMU_10, QEMU_72, label, require
from harness.qemu.errors import QemuExited
from harness.qemu.machine import Machine, MachineConfig, TapBackend, migrate
from harness.qemu.virtio_pci import DriverState, VirtioNetDriver
from harness.rig import Rig, exchange
from kvhost import abi, features, qemu_args, versions
from kvhost.errors import VersionError
from kvhost.probe import probe
from kvhost.vhost import VhostNet

pytestmark = [pytest.mark.kernel, pytest.mark.qemu]

USO = features.mask(["GUEST_USO4", "GUEST_USO6", "HOST_USO"])
RING_RESET = features.mask(["RING_RESET"])
VERSION_1 = features.mask(["VERSION_1"])
#: properties harness.qemu.machine sets itself (a modern-only device), as kvhost qemu-args
#: asks for every version with VERSION_1
MACHINE_FIXED = {"disable-modern": "off"}
#: what the driver reads from QEMU 10.0's unpinned tap,vhost=on device, per Debian kernel
OBSERVED_10 = {"6.12.": 0x1C0010130BFFFA7}



SUPPORTED = host_versions()
IDS = [v.label.rsplit(".", 1)[-1] for v in SUPPORTED]
PAIRS = [(QEMU_72, QEMU_10), (QEMU_10, QEMU_72)]
PAIR_IDS = ["7.2-to-10.0", "10.0-to-7.2"]


def _newest_pinnable(*binaries: str) -> versions.InterfaceVersion:
    """The newest modern version this kernel serves that every one of ``binaries`` can pin."""
    best = None
    for version in SUPPORTED:
        if not version.features & VERSION_1:
            continue
        try:
            for binary in binaries:
                qemu_args.device_properties(version, qemu_args.available_properties(binary))
        except VersionError:
            continue
        best = version
    assert best is not None, f"no version this kernel serves can be pinned on {binaries}"
    return best


def _pinned_props(version: versions.InterfaceVersion, binary: str) -> dict[str, str]:
    """``kvhost qemu-args VERSION --qemu BINARY`` as test-machine properties."""
    props = {"mac": GUEST_MAC.hex(":")}
    for item in qemu_args.device_properties(version, qemu_args.available_properties(binary)):
        key, _, value = item.partition("=")
        if key in MACHINE_FIXED:
            assert value == MACHINE_FIXED[key], item
            continue
        props[key] = value
    return props


# --- the shim behind QEMU 10.0 -----------------------------------------------------------


@pytest.mark.parametrize("version", SUPPORTED, ids=IDS)
def test_qemu10_through_the_shim_shows_exactly_the_version(
    version: versions.InterfaceVersion, netns_quiet: str
) -> None:
    legacy = is_legacy(version)
    with Rig() as rig:
        port = rig.port("kvn0")
        shim = rig.shim("shim", "kvn0", version.label)
        machine = rig.qemu("qemu10", shim, legacy=legacy, binary=require(QEMU_10),
                           properties=device_properties_for(version))
        drv = driver_for(machine, legacy)
        offered = drv.read_device_features()
        want = expected_device_bits(version)
        shown = offered & VHOST_USER_MASKED
        assert shown == want, (f"QEMU 10.0 shows {features.names(shown ^ want)} differently "
                               f"from {version.label}: {shown:#x} != {want:#x}")
        assert not offered & USO, features.names(offered & USO)
        drv.start(every_version_bit(drv))
        sent, received = exchange(drv, port, 2, "q10")
        assert (sent, received) == (2, 2)
        status = machine.qmp.virtio_status()
        acked = shim.acked_features()
        assert acked and acked[-1] == vs.vhost_acked(status), rig.diagnostics()
        assert acked[-1] & ~PLUMBING == want, features.names((acked[-1] & ~PLUMBING) ^ want)
        # QEMU got the version's USO bits from the shim and still hid them from the guest
        assert vs.vhost_offered(status) & USO == version.features & USO
        assert machine.stop() == 0, machine.stderr_text()


# --- QEMU 10.0's own vhost-net, unpinned -------------------------------------------------


def test_qemu10_native_unpinned_shows_what_kernel_and_tap_offer(netns: str) -> None:
    with VhostNet() as dev:
        kernel = dev.get_features()
    tun = probe().tun
    assert tun is not None, "no /dev/net/tun"
    tap_uso = "USO" in tun.offloads
    config = MachineConfig(backend=TapBackend("kvq0"), binary=require(QEMU_10),
                           device_properties={"mac": GUEST_MAC.hex(":")})
    with Machine(config, name="qemu10-native") as machine:
        drv = VirtioNetDriver.probe(machine.qtest)
        offered = drv.read_device_features()
        assert bool(offered & RING_RESET) == bool(kernel & RING_RESET), hex(offered)
        assert offered & USO == (USO if tap_uso else 0), features.names(offered & USO)
        release = os.uname().release
        for prefix, value in OBSERVED_10.items():
            if release.startswith(prefix):
                assert offered == value, f"{release}: {offered:#x} != observed {value:#x}"
        print(f"BASELINE qemu10_native_device_features={offered:#x} on {release}")
        assert machine.stop() == 0, machine.stderr_text()


# --- migration between QEMU releases ------------------------------------------------------


class _Side:
    """One QEMU of a migration with the tap it sends to, and its shim if any."""

    def __init__(self, machine: Machine, port: netns.TapPort) -> None:
        self.machine, self.port = machine, port


def _native_pair(stack: ExitStack, rig: Rig, src_bin: str, dst_bin: str,
                 src_props: dict[str, str], dst_props: dict[str, str],
                 machine_type: str) -> tuple[_Side, _Side]:
    sides = []
    for name, tap, binary, props, incoming in (
        ("source", "kvq0", src_bin, src_props, None),
        ("destination", "kvq1", dst_bin, dst_props, rig.migration_uri()),
    ):
        config = MachineConfig(backend=TapBackend(tap), binary=require(binary),
                               machine=machine_type, device_properties=props,
                               incoming=incoming)
        machine = rig.machine(name, config)
        netns.link_up(tap)
        port = netns.TapPort(tap)
        stack.callback(port.close)
        sides.append(_Side(machine, port))
    return sides[0], sides[1]


@pytest.fixture
def rig(netns: str) -> Iterator[tuple[ExitStack, Rig]]:
    with ExitStack() as stack, Rig() as r:
        yield stack, r


@pytest.mark.parametrize("backend", ["native", "shim"])
@pytest.mark.parametrize(("src_bin", "dst_bin"), PAIRS, ids=PAIR_IDS)
def test_pinned_migration_between_qemu_releases(
    rig: tuple[ExitStack, Rig], src_bin: str, dst_bin: str, backend: str
) -> None:
    stack, r = rig
    pin = _newest_pinnable(QEMU_72, QEMU_10)
    shims = []
    if backend == "native":
        src, dst = _native_pair(stack, r, src_bin, dst_bin, _pinned_props(pin, src_bin),
                                _pinned_props(pin, dst_bin), COMMON_MACHINE)
    else:
        ports = [r.port("kvs0"), r.port("kvs1")]
        shims = [r.shim("shim-a", "kvs0", pin.label), r.shim("shim-b", "kvs1", pin.label)]
        props = device_properties_for(pin)
        src = _Side(r.qemu("source", shims[0], legacy=False, properties=props,
                           binary=require(src_bin), machine=COMMON_MACHINE), ports[0])
        dst = _Side(r.qemu("destination", shims[1], legacy=False, properties=props,
                           incoming=r.migration_uri(), binary=require(dst_bin),
                           machine=COMMON_MACHINE), ports[1])
    drv = driver_for(src.machine, False)
    drv.start()
    assert exchange(drv, src.port, 2, "before") == (2, 2)

    logging: list[bool] = []
    result = migrate(src.machine, r.migration_uri(), destination=dst.machine,
                     during_copy=lambda: logging.append(
                         vs.log_enabled(src.machine.qmp.virtio_status())))
    assert result.status == "completed", (result, r.diagnostics())
    assert dst.machine.wait_incoming(timeout=60) == "running"
    assert logging == [True], f"source's dirty log during RAM copy: {logging}"

    rarp, _ = dst.port.expect(abi.ETH_P_RARP)
    assert rarp[6:12] == GUEST_MAC
    moved = attach_driver(dst.machine, DriverState.from_json(drv.save_state()), False)
    assert exchange(moved, dst.port, 2, "after") == (2, 2)

    status = dst.machine.qmp.virtio_status()
    negotiated = vs.guest_features(status)
    assert negotiated == drv.state.driver_features, features.names(
        negotiated ^ drv.state.driver_features)
    acked = vs.vhost_acked(status)
    wrong = vs.acked_mismatch(negotiated, acked, vs.vhost_offered(status))
    assert not wrong, (
        f"{label(dst_bin)} gave its vhost backend {features.names(acked & ~PLUMBING)}, "
        f"differing from the negotiated bits in {features.names(wrong)}")
    if shims:
        # the destination shim's own record of the SET_FEATURES it got and applied
        assert shims[1].acked_features()[-1] == acked, r.diagnostics()
        assert any(f & features.LOG_ALL for f in shims[0].acked_features()), r.diagnostics()
        assert shims[0].events("dirty_log"), r.diagnostics()
    assert dst.machine.stop() == 0, dst.machine.stderr_text()
    assert src.machine.stop() == 0, src.machine.stderr_text()


@pytest.mark.parametrize(("src_bin", "dst_bin"), PAIRS, ids=PAIR_IDS)
def test_default_machine_types_do_not_migrate_between_releases(
    rig: tuple[ExitStack, Rig], src_bin: str, dst_bin: str
) -> None:
    stack, r = rig
    pin = _newest_pinnable(QEMU_72, QEMU_10)
    # only the machine type is left unpinned: "pc" is each release's newest i440fx
    src, dst = _native_pair(stack, r, src_bin, dst_bin, _pinned_props(pin, src_bin),
                            _pinned_props(pin, dst_bin), "pc")
    VirtioNetDriver.probe(src.machine.qtest).start()
    migrate(src.machine, r.migration_uri(), destination=dst.machine)
    with pytest.raises(QemuExited):
        dst.machine.wait_incoming(timeout=60)
    err = dst.machine.stderr_text()
    names = {QEMU_72: "pc-i440fx-7.2", QEMU_10: "pc-i440fx-10.0"}
    assert (f"Machine type received is '{names[src_bin]}' and local is "
            f"'{names[dst_bin]}'") in err, err
    assert "load of migration failed" in err, err


def test_uso_pinned_qemu10_cannot_land_on_7_2(rig: tuple[ExitStack, Rig]) -> None:
    stack, r = rig
    newest_10, newest_72 = _newest_pinnable(QEMU_10), _newest_pinnable(QEMU_72)
    src, dst = _native_pair(stack, r, QEMU_10, QEMU_72, _pinned_props(newest_10, QEMU_10),
                            _pinned_props(newest_72, QEMU_72), COMMON_MACHINE)
    drv = VirtioNetDriver.probe(src.machine.qtest)
    drv.start()
    result = migrate(src.machine, r.migration_uri(), destination=dst.machine)
    uso = newest_10.features & USO
    if not uso:  # this kernel's tap has no USO: 10.0 can pin nothing 7.2 cannot
        assert newest_10.same_interface(newest_72), (newest_10.label, newest_72.label)
        assert result.status == "completed", (result, r.diagnostics())
        assert dst.machine.wait_incoming(timeout=60) == "running"
        return
    assert drv.state.driver_features & USO == uso
    with pytest.raises(QemuExited):
        dst.machine.wait_incoming(timeout=60)
    err = dst.machine.stderr_text()
    m = re.search(r"Features (0x[0-9a-f]+) unsupported\. Allowed features: (0x[0-9a-f]+)", err)
    assert m, err
    wanted, allowed = int(m.group(1), 16), int(m.group(2), 16)
    # USO and, for the newest 10.0 pin on 6.12, RING_RESET: what 7.2's pin turns off, as
    # in the qemu-devel report that needed host_uso/guest_uso4/guest_uso6 *and* queue_reset
    refused = drv.state.driver_features & (newest_10.features & ~newest_72.features)
    assert features.names(wanted & ~allowed) == features.names(refused), err
    assert refused & USO == uso
    assert "Failed to load virtio-net:virtio" in err, err
    assert result.status == "failed", result
