"""Real QEMU through kvhost-shim vs QEMU's own kernel vhost-net (``-netdev tap,vhost=on``).

    python -m kvhost.testvm -- python3 bench/bench_qemu.py [--reps N]

Inside the test VM (needs /dev/vhost-net and root), in a fresh network namespace, with the
same ``virtio-net-pci`` device and the same qtest guest driver for both backends, each
measurement repeated ``--reps`` times (default 10), medians compared side by side:

* DRIVER_OK round trip: the status write inside which QEMU starts vhost (driver reset and
  re-initialised each repetition on one QEMU); shim / native, target <= 1.5;
* DRIVER_OK -> first TX frame on the tap: a frame is in the TX ring before DRIVER_OK and
  kicked right after; its arrival on the tap (AF_PACKET) is timed; shim / native <= 1.5;
* live migration (unix socket, return-path on) to a second QEMU (a second shim): total time
  and downtime as QEMU reports them; downtime median <= native median + 5 ms. Downtime under
  TCG is bimodal, so min/median/max are printed.

Prints one line per measurement and a summary; exits 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kvhost import netlink, scenario  # noqa: E402
from kvhost.qemu.machine import Machine, MachineConfig, TapBackend, migrate  # noqa: E402
from kvhost.qemu.virtio_pci import RX, TX, VirtioNetDriver  # noqa: E402
from kvhost.scenario import GUEST_MAC, PEER_MAC, Rig, TapPort, frame  # noqa: E402

PROPS = {"mac": GUEST_MAC.hex(":")}


def restart_loop(machine: Machine, port: TapPort, reps: int) -> tuple[list[float], list[float]]:
    """(DRIVER_OK round trips, DRIVER_OK -> first TX frame), seconds, ``reps`` each."""
    drv = VirtioNetDriver.probe(machine.qtest)
    round_trips, first_tx = [], []
    for i in range(reps + 1):  # the first round warms QEMU up and is not counted
        drv.reset()
        drv.negotiate()
        drv.setup_queue(RX)
        drv.setup_queue(TX)
        drv.post_rx(16, kick=False)
        out = frame(GUEST_MAC, PEER_MAC, f"first{i}")
        drv.send(out, kick=False)
        t0 = time.perf_counter()
        rt = drv.driver_ok()
        drv.notify(TX)
        _, arrived = port.expect(out)
        drv.wait_used(TX, 1)
        drv.pop_used(TX)
        if i:
            round_trips.append(rt)
            first_tx.append(arrived - t0)
    return round_trips, first_tx


def migration_loop(
    make_pair: Callable[[int], tuple[Machine, Machine, str]], reps: int
) -> tuple[list[int], list[int]]:
    """(total ms, downtime ms) of ``reps`` migrations of a started, transmitting guest."""
    totals, downs = [], []
    for i in range(reps):
        src, dst, uri = make_pair(i)
        try:
            drv = VirtioNetDriver.probe(src.qtest)
            drv.start()
            drv.send(frame(GUEST_MAC, PEER_MAC, f"mig{i}"))
            drv.wait_used(TX, 1)
            result = migrate(src, uri, destination=dst)
            if result.status != "completed":
                raise RuntimeError(
                    f"migration {i} {result.status}: {result.error}\n{dst.stderr_text()}"
                )
            dst.wait_incoming(timeout=30)
            assert result.total_ms is not None and result.downtime_ms is not None
            totals.append(result.total_ms)
            downs.append(result.downtime_ms)
        finally:
            dst.kill()
            src.kill()
    return totals, downs


def stats(values: list[float], scale: float = 1.0) -> str:
    v = [x * scale for x in values]
    return f"min {min(v):.2f} median {statistics.median(v):.2f} max {max(v):.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    if args.reps < 1:
        parser.error("--reps must be at least 1")
    ok = True
    with scenario.fresh_netns(), Rig() as rig:
        # -- start: shim -----------------------------------------------------------------
        port_s = rig.port("kvs0")
        shim_a = rig.shim("shim-a", "kvs0", None)
        print(f"shim serves {shim_a.served_version()}", flush=True)
        m = rig.qemu("qemu-s", shim_a, legacy=False, properties=PROPS)
        s_rt, s_tx = restart_loop(m, port_s, args.reps)
        m.stop()
        # -- start: native ---------------------------------------------------------------
        native = rig.machine(
            "qemu-n", MachineConfig(backend=TapBackend("kvq0", vhost=True), device_properties=PROPS)
        )
        netlink.set_up("kvq0")
        port_n = TapPort("kvq0")
        n_rt, n_tx = restart_loop(native, port_n, args.reps)
        port_n.close()
        native.stop()

        # -- migration: shim -------------------------------------------------------------
        rig.port("kvs1")
        shim_b = rig.shim("shim-b", "kvs1", shim_a.served_version())

        def shim_pair(i: int) -> tuple[Machine, Machine, str]:
            uri = f"unix:{rig.workdir / f'mig-s{i}.sock'}"
            src = rig.qemu(f"src-s{i}", shim_a, legacy=False, properties=PROPS)
            dst = rig.qemu(f"dst-s{i}", shim_b, legacy=False, properties=PROPS, incoming=uri)
            return src, dst, uri

        def native_pair(i: int) -> tuple[Machine, Machine, str]:
            uri = f"unix:{rig.workdir / f'mig-n{i}.sock'}"
            src = rig.machine(
                f"src-n{i}",
                MachineConfig(backend=TapBackend("kvq0", vhost=True), device_properties=PROPS),
            )
            dst = rig.machine(
                f"dst-n{i}",
                MachineConfig(
                    backend=TapBackend("kvq1", vhost=True), device_properties=PROPS, incoming=uri
                ),
            )
            return src, dst, uri

        s_total, s_down = migration_loop(shim_pair, args.reps)
        n_total, n_down = migration_loop(native_pair, args.reps)

    print(f"DRIVER_OK round trip ms    shim   {stats(s_rt, 1e3)}")
    print(f"DRIVER_OK round trip ms    native {stats(n_rt, 1e3)}")
    print(f"DRIVER_OK -> first TX ms   shim   {stats(s_tx, 1e3)}")
    print(f"DRIVER_OK -> first TX ms   native {stats(n_tx, 1e3)}")
    print(f"migration total ms         shim   {stats([float(x) for x in s_total])}")
    print(f"migration total ms         native {stats([float(x) for x in n_total])}")
    print(f"migration downtime ms      shim   {stats([float(x) for x in s_down])}")
    print(f"migration downtime ms      native {stats([float(x) for x in n_down])}")
    r_rt = statistics.median(s_rt) / statistics.median(n_rt)
    r_tx = statistics.median(s_tx) / statistics.median(n_tx)
    r_total = statistics.median(s_total) / statistics.median(n_total)
    d_down = statistics.median(s_down) - statistics.median(n_down)
    print("summary:")
    for name, value, target, good in (
        ("DRIVER_OK round trip shim/native", f"{r_rt:.2f}", "<= 1.5", r_rt <= 1.5),
        ("DRIVER_OK -> first TX shim/native", f"{r_tx:.2f}", "<= 1.5", r_tx <= 1.5),
        ("migration total shim/native", f"{r_total:.2f}", "(reported)", True),
        ("downtime median shim - native ms", f"{d_down:+.1f}", "<= +5", d_down <= 5),
    ):
        print(f"  {name:36s} {value:>7s}  target {target:10s} {'ok' if good else 'MISSED'}")
        ok &= good
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
