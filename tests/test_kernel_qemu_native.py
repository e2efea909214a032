"""Kernel tier: Debian's real QEMU with its own kernel vhost-net (``-netdev tap,vhost=on``),
driven by the qtest virtio driver of :mod:`harness.qemu`. These are the native baselines the
shim is compared with (issue 5) and the layer issue 7 migrates with.

Each test runs in a fresh network namespace; QEMU is our child, so it inherits it and the
taps QEMU creates (``ifname=``, not persistent) exist only there and vanish with QEMU.
Measured numbers are printed as ``BASELINE name=value`` lines (run pytest with ``-s``).
"""

from __future__ import annotations

import os
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from harness.frames import TEST_ETHERTYPE
from harness.netns import TapPort, link_up
from harness.qemu.errors import QemuExited
from harness.qemu.machine import (
    Machine,
    MachineConfig,
    TapBackend,
    VhostUserBackend,
    migrate,
)
from harness.qemu.virtio_pci import RX, TX, DriverState, VirtioNetDriver
from kvhost import abi, features
from kvhost.vhost import VhostNet

pytestmark = [pytest.mark.kernel, pytest.mark.qemu]

GUEST_MAC = bytes.fromhex("525400aa0001")
PEER_MAC = bytes.fromhex("02000000beef")

#: Bits QEMU 7.2's vhost-net masks with what the kernel offers (hw/net/vhost_net.c
#: kernel_feature_bits): the device may offer one of these only if VHOST_GET_FEATURES has it.
KERNEL_MASKED = features.mask(
    [
        "NOTIFY_ON_EMPTY",
        "INDIRECT_DESC",
        "EVENT_IDX",
        "MRG_RXBUF",
        "VERSION_1",
        "ACCESS_PLATFORM",
        "RING_PACKED",
        "RING_RESET",
        "MTU",
        "HASH_REPORT",
    ]
)
RING_RESET = features.mask(["RING_RESET"])
#: What the driver reads under QEMU 7.2 + native vhost-net, per Debian kernel (reference §8).
OBSERVED = {"6.1.": 0x130BFFFA7, "6.12.": 0x10130BFFFA7}


def _frame(src: bytes, dst: bytes, tag: str) -> bytes:
    payload = f"kvhost {tag} {os.urandom(4).hex()}".encode().ljust(46, b".")
    return dst + src + TEST_ETHERTYPE.to_bytes(2, "big") + payload


def _native(tap: str, incoming: str | None = None) -> MachineConfig:
    return MachineConfig(
        backend=TapBackend(tap, vhost=True),
        device_properties={"mac": GUEST_MAC.hex(":")},
        incoming=incoming,
    )


@pytest.fixture
def started(netns: str) -> Iterator[tuple[Machine, TapPort]]:
    with ExitStack() as stack:
        machine = stack.enter_context(Machine(_native("kvq0"), name="native"))
        link_up("kvq0")
        port = TapPort("kvq0")
        stack.callback(port.close)
        yield machine, port
        assert machine.exit_status is None, machine.stderr_text()


def _receive_tagged(drv: VirtioNetDriver, frame: bytes, timeout: float = 5.0) -> None:
    """Wait until ``frame`` lands in the RX ring; other host chatter (IPv6 ND) is skipped."""
    deadline = time.monotonic() + timeout
    got: list[bytes] = []
    while time.monotonic() < deadline:
        got += drv.receive(timeout=max(0.1, deadline - time.monotonic()))
        if frame in got:
            return
    raise AssertionError(f"frame not in RX ring; got {[g[12:14].hex() for g in got]}")


def test_native_device_features_follow_the_kernel(started: tuple[Machine, TapPort]) -> None:
    machine, _ = started
    with VhostNet() as dev:
        kernel = dev.get_features()
    drv = VirtioNetDriver.probe(machine.qtest)
    offered = drv.read_device_features()
    print(f"BASELINE device_features={offered:#x} vhost_features={kernel:#x}")
    # RING_RESET is the 6.1 <-> 6.12 difference: offered exactly when the kernel has it.
    assert bool(offered & RING_RESET) == bool(kernel & RING_RESET)
    masked_extra = offered & KERNEL_MASKED & ~kernel
    assert not masked_extra, f"device offers {features.names(masked_extra)} vhost lacks"
    release = os.uname().release
    for prefix, value in OBSERVED.items():
        if release.startswith(prefix):
            assert offered == value, f"{release}: {offered:#x} != observed {value:#x}"
    # the driver's negotiation must land on FEATURES_OK with a VERSION_1 subset
    accepted = drv.negotiate()
    assert accepted & ~offered == 0 and accepted & features.mask(["VERSION_1"])


def test_native_traffic_both_directions(started: tuple[Machine, TapPort]) -> None:
    machine, port = started
    drv = VirtioNetDriver.probe(machine.qtest)
    round_trips, first_tx = [], []
    for round_ in range(5):  # reset + restart each time: vhost stops and starts again
        drv.prepare()
        out = _frame(GUEST_MAC, PEER_MAC, f"tx{round_}")
        drv.send(out, kick=False)  # in the ring before DRIVER_OK; kicked right after it
        t0 = time.perf_counter()
        round_trips.append(drv.driver_ok())
        drv.notify(TX)
        got, arrived = port.expect(out)
        first_tx.append(arrived - t0)
        assert got == out
        drv.wait_used(TX, 1)
        assert [desc for desc, _ in drv.pop_used(TX)] == [0]

        into = _frame(PEER_MAC, GUEST_MAC, f"rx{round_}")
        used_before = drv.used_idx(RX)
        port.send(into)
        _receive_tagged(drv, into)
        assert drv.used_idx(RX) != used_before
    print(
        f"BASELINE native_driver_ok_ms median={statistics.median(round_trips) * 1e3:.2f} "
        f"min={min(round_trips) * 1e3:.2f} max={max(round_trips) * 1e3:.2f}"
    )
    print(
        f"BASELINE native_driver_ok_to_tx_ms median={statistics.median(first_tx) * 1e3:.2f} "
        f"min={min(first_tx) * 1e3:.2f} max={max(first_tx) * 1e3:.2f}"
    )


def test_native_live_migration_continues_on_destination(fd_leak_check: None, netns: str) -> None:
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kvmig-")))
        uri = f"unix:{tmp / 'migrate.sock'}"
        src = stack.enter_context(Machine(_native("kvq0"), name="source"))
        dst = stack.enter_context(Machine(_native("kvq1", uri), name="destination"))
        for tap in ("kvq0", "kvq1"):
            link_up(tap)
        src_port, dst_port = TapPort("kvq0"), TapPort("kvq1")
        stack.callback(src_port.close)
        stack.callback(dst_port.close)

        drv = VirtioNetDriver.probe(src.qtest)
        drv.start()
        before = _frame(GUEST_MAC, PEER_MAC, "before")
        drv.send(before)
        src_port.expect(before)
        drv.wait_used(TX, 1)
        drv.pop_used(TX)

        assert dst.qmp.query_status() == "inmigrate"
        result = migrate(src, uri, destination=dst)
        assert result.status == "completed", (result, src.stderr_text(), dst.stderr_text())
        assert dst.wait_incoming(timeout=10) == "running"
        assert src.qmp.query_status() == "postmigrate"
        assert result.downtime_ms is not None and result.total_ms is not None
        assert 0 < result.downtime_ms <= result.total_ms
        print(f"BASELINE native_migration total_ms={result.total_ms} "
              f"downtime_ms={result.downtime_ms} wall_ms={result.wall_ms:.0f}")

        # QEMU announces the guest's MAC on the destination tap (self-announce RARP)
        rarp, _ = dst_port.expect(abi.ETH_P_RARP)
        assert rarp[6:12] == GUEST_MAC

        # the driver continues from its saved JSON state; rings resume at the migrated indexes
        saved = DriverState.from_json(drv.save_state())
        moved = VirtioNetDriver.attach(dst.qtest, saved)
        assert moved.used_idx(TX) == saved.queues[TX].last_used == 1
        after = _frame(GUEST_MAC, PEER_MAC, "after")
        moved.send(after)
        got, _ = dst_port.expect(after)
        assert got == after
        assert moved.wait_used(TX, 1) == 2
        into = _frame(PEER_MAC, GUEST_MAC, "after-rx")
        dst_port.send(into)
        _receive_tagged(moved, into)

        assert dst.stop() == 0, dst.stderr_text()
        assert src.stop() == 0, src.stderr_text()
        assert "error" not in dst.stderr_text().lower(), dst.stderr_text()


def test_vhost_user_backend_line_and_death_report(fd_leak_check: None, netns: str) -> None:
    """The vhost-user spelling reaches QEMU (it connects and sends GET_FEATURES first), and
    when the backend hangs up QEMU's own complaint comes back in the error."""
    with tempfile.TemporaryDirectory(prefix="kvvhu-") as tmp:
        path = os.path.join(tmp, "backend.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(1)
        first: list[bytes] = []

        def backend() -> None:
            conn, _ = listener.accept()
            first.append(conn.recv(12))  # one header: u32 request, u32 flags, u32 size
            # QEMU 7.2 retries a failed vhost-user init by reconnecting for as long as
            # the socket accepts connections: the listener must go for QEMU to give up.
            listener.close()
            os.unlink(path)
            conn.close()

        thread = threading.Thread(target=backend, daemon=True)
        thread.start()
        m = Machine(MachineConfig(backend=VhostUserBackend(path)), name="vhost-user")
        with pytest.raises(QemuExited) as info:
            m.start(timeout=20)
        thread.join(5)
    assert first and int.from_bytes(first[0][:4], "little") == 1  # VHOST_USER_GET_FEATURES
    assert info.value.exit_status not in (None, 0)
    assert "vhost" in info.value.stderr.lower(), info.value.stderr
    assert m.exit_status == info.value.exit_status
