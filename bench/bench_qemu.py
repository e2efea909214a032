"""Real QEMU through kvhost-shim vs QEMU's own kernel vhost-net (``-netdev tap,vhost=on``).

    python -m harness.testvm -- python3 bench/bench_qemu.py [--reps N] [--qemu PATH]

Inside the test VM (needs /dev/vhost-net and root), in a fresh network namespace, with the
same ``virtio-net-pci`` device and the same qtest guest driver for both backends, each
measurement repeated ``--reps`` times (default 10), medians compared side by side. The
repetitions of the two backends alternate (shim, native, native, shim, ...): the TCG
machine's speed drifts over minutes, and both sides must see the same drift.

* DRIVER_OK round trip: the status write inside which QEMU starts vhost (driver reset and
  re-initialised each repetition on one QEMU per backend); shim / native, target <= 1.5;
* DRIVER_OK -> first TX frame on the tap: a frame is in the TX ring before DRIVER_OK and
  kicked right after; its arrival on the tap (AF_PACKET) is timed; shim / native <= 1.5;
* live migration (unix socket, return-path on) to a second QEMU (a second shim): total time
  and downtime as QEMU reports them, shim and native (reported; under TCG downtime is bimodal
  and a do-nothing backend lands tens of ms either side of native, so their difference is no
  target); the target is the shim's *own* share of the downtime, from the shims' events: on
  the source every GET_VRING_BASE request to reply (summed over the rings), on the
  destination the first ring message to the last ring running; its median <= 10 % of the
  native downtime median.

The shims run as ``kvhost-shim`` does by default (INFO logging); ``--shim-verbose`` runs them
with ``-v`` as the tests do (a debug line per ring event, written before the reply).

``--floor`` is a diagnostic run instead: the DRIVER_OK round trip (no frames) against
``bench/null_backend.c``, a vhost-user backend in C that answers every request and does
nothing else, side by side with the shim and with native vhost, to show how much of the
ratio is QEMU's own vhost-user work (which no backend can remove) and how much the shim's.

``--trace N`` is a diagnostic run instead: one shim whose every read (recvmsg -> Session ->
sendall, as the shim's socket sees it) is timestamped, and N DRIVER_OK writes; for the
last one it prints each vhost-user message QEMU sent with its arrival time relative to the
start of the DRIVER_OK write and the shim's time handling it, so the round trip can be
split into QEMU's own work, waiting for replies and the shim's work.

``--qemu PATH`` runs that QEMU for every machine (default: Debian's 7.2); run once with
``/opt/kvhost/qemu-10.0/bin/qemu-system-x86_64`` (scripts/install-deps) to compare QEMU
releases.

Prints one line per measurement and a summary; exits 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from harness import netns  # noqa: E402
from harness.frames import GUEST_MAC, PEER_MAC, frame  # noqa: E402
from harness.netns import TapPort  # noqa: E402
from harness.qemu.machine import (  # noqa: E402
    QEMU_BINARY,
    Machine,
    MachineConfig,
    TapBackend,
    VhostUserBackend,
    migrate,
)
from harness.qemu.virtio_pci import TX, VirtioNetDriver  # noqa: E402
from harness.rig import Rig  # noqa: E402
from harness.shim_process import SHIM_PROGRAM, ShimProcess  # noqa: E402
from kvhost import versions  # noqa: E402

PROPS = {"mac": GUEST_MAC.hex(":")}
TRACE_ENV = "KVHOST_BENCH_TRACE"


def start_shim(
    rig: Rig, name: str, tap: str, version: str | None, *, verbose: bool,
    trace: Path | None = None,
) -> ShimProcess:
    """:meth:`Rig.shim` on ``tap`` with the bench's choice of logging (and, with ``trace``,
    the traced shim of :func:`traced_shim_main` writing to that file); prints how long the
    shim took to listen."""
    program = SHIM_PROGRAM
    if trace is not None:
        program = (sys.executable, str(Path(__file__).resolve()), "--as-traced-shim")
        os.environ[TRACE_ENV] = str(trace)
    t0 = time.monotonic()
    # generous: Python start-up plus pyroute2's import take minutes on a loaded TCG machine
    shim = rig.shim(name, tap, version, verbose=verbose, timeout=600, program=program)
    print(f"{name} listening after {time.monotonic() - t0:.0f} s", flush=True)
    return shim


@dataclass
class _Read:
    """The socket read the traced shim is handling: monotonic ns stamps (woken, received,
    handled, last reply sent), the bytes, the backend's mapped table before it."""

    stamps: list[int]
    table: object
    data: bytes = b""
    kept: bool = False


def traced_shim_main(argv: list[str]) -> int:
    """``kvhost-shim`` with every socket read timestamped (monotonic ns) into the file named
    by $KVHOST_BENCH_TRACE at exit: ``start end request[!],...`` per read (! = NEED_REPLY).

    The shim's own read path (``ShimServer._readable``) runs unchanged; the stamps come from
    thin wrappers around the three steps it calls: ``_recv``, ``Session.receive``, ``_send``.
    """
    from kvhost.vhost_user import protocol as p
    from shim import cli, server
    from shim.session import Session

    # Cheap stamps only (monotonic_ns is a vDSO call): (woken, received, handled, sent, bytes)
    records: list[tuple[int, int, int, int, bytes, bool]] = []
    now: list[_Read] = []
    readable, recv, receive, send = (server.ShimServer._readable, server._recv,
                                     Session.receive, server._send)

    def traced_readable(self: server.ShimServer, conn: Any) -> None:
        read = _Read([time.monotonic_ns()], getattr(conn.session.backend, "table", None))
        now[:] = [read]
        readable(self, conn)
        if len(read.stamps) >= 3:  # the session got bytes: the happy path
            t0, t1, t2 = read.stamps[:3]
            records.append((t0, t1, t2, read.stamps[-1], read.data, read.kept))

    def traced_recv(sock: Any) -> tuple[bytes, list[int], bool]:
        out = recv(sock)
        now[0].stamps.append(time.monotonic_ns())
        return out

    def traced_receive(session: Session, data: bytes, fds: Sequence[int]) -> list[bytes]:
        replies = receive(session, data, fds)
        read = now[0]
        read.stamps.append(time.monotonic_ns())
        read.data = data
        read.kept = getattr(session.backend, "table", None) is read.table
        return replies

    def traced_send(sock: Any, data: bytes) -> int:
        sent = send(sock, data)
        read = now[0]
        read.stamps[3:] = [time.monotonic_ns()]
        return sent

    def describe(data: bytes, kept: bool) -> str:
        found, off = [], 0
        while off + p.HEADER_SIZE <= len(data):
            req, flags, size = p.HEADER.unpack_from(data, off)
            name = p._request_name(req) + ("!" if flags & 8 else "")
            if req == p.Request.SET_MEM_TABLE:
                name += " (mapping kept)" if kept else " (table mapped)"
            found.append(name)
            off += p.HEADER_SIZE + size
        return ",".join(found) or "(partial)"

    def dump() -> None:
        with open(os.environ[TRACE_ENV], "w") as out:
            for t0, t1, t2, t3, data, kept in records:
                out.write(f"{t0} {t3} recv {(t1 - t0) / 1e6:.2f} handle {(t2 - t1) / 1e6:.2f} "
                          f"send {(t3 - t2) / 1e6:.2f} {describe(data, kept)}\n")

    server.ShimServer._readable = traced_readable  # type: ignore[method-assign]
    server._recv = traced_recv
    server._send = traced_send
    Session.receive = traced_receive  # type: ignore[method-assign,assignment]
    atexit.register(dump)
    return cli.main(argv)


T = TypeVar("T")


def interleaved(runs: dict[str, Callable[[int], T]], reps: int, *, warm_up: bool) -> dict[
    str, list[T]
]:
    """Repetition i of every configuration, then repetition i + 1 of every one, in an order
    reversed each round: a TCG machine's speed drifts by tens of percent over minutes, and
    side-by-side configurations must see the same drift. With ``warm_up`` an extra first
    round is run and dropped (QEMU's first start of a device is slower)."""
    out: dict[str, list[T]] = {name: [] for name in runs}
    items = list(runs.items())
    for i in range(reps + 1 if warm_up else reps):
        for name, run in items if i % 2 == 0 else items[::-1]:
            value = run(i)
            if i or not warm_up:
                out[name].append(value)
    return out


def restart(drv: VirtioNetDriver, port: TapPort, i: int) -> tuple[float, float]:
    """(DRIVER_OK round trip, DRIVER_OK -> first TX frame on the tap), seconds: the driver
    resets the device and starts it again with a frame already in the TX ring."""
    drv.prepare()
    out = frame(GUEST_MAC, PEER_MAC, f"first{i}")
    drv.send(out, kick=False)
    t0 = time.perf_counter()
    rt = drv.driver_ok()
    drv.notify(TX)
    _, arrived = port.expect(out)
    drv.wait_used(TX, 1)
    drv.pop_used(TX)
    return rt, arrived - t0


def round_trip(drv: VirtioNetDriver, i: int) -> float:
    """The DRIVER_OK round trip alone (no frame), seconds: works against a backend that
    moves no packets."""
    drv.prepare()
    return drv.driver_ok()


def floor_run(reps: int, qemu: str) -> int:
    """DRIVER_OK round trips, then migration downtimes, of the same idle device: null
    backend (C), shim, native, one after the other (no frame moves: the null backend has
    no datapath)."""
    from shim.session import OFFERED_PROTOCOL_FEATURES, offered_features

    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        print("--floor needs a C compiler (cc or gcc) to build bench/null_backend.c")
        return 2
    with netns.fresh("kvbench"), Rig() as rig, contextlib.ExitStack() as stack:
        binary = rig.workdir / "null_backend"
        subprocess.run([compiler, "-O2", "-o", str(binary), str(REPO / "bench/null_backend.c")],
                       check=True)
        rig.port("kvs0")
        shim = start_shim(rig, "shim-f", "kvs0", None, verbose=False)
        label = shim.served_version()
        served = versions.by_name(label) if label is not None else None
        assert served is not None, f"shim-f serves {label!r}"
        offered = offered_features(served)
        def null_backend(name: str) -> str:
            sock = rig.workdir / f"{name}.sock"
            proc = subprocess.Popen(
                [str(binary), str(sock), f"{offered:x}", f"{int(OFFERED_PROTOCOL_FEATURES):x}"],
                stderr=subprocess.PIPE,
            )
            assert proc.stderr is not None
            stack.callback(proc.stderr.close)
            stack.callback(proc.wait)
            stack.callback(proc.kill)
            # it serves one frontend, then exits
            line = proc.stderr.readline().decode(errors="replace")
            if not line.startswith("null_backend: listening"):
                raise RuntimeError(f"null backend {name} did not start: {line.strip()!r}")
            return str(sock)

        def null_qemu(name: str, incoming: str | None = None) -> Machine:
            return rig.machine(name, MachineConfig(
                backend=VhostUserBackend(null_backend(name)), device_properties=PROPS,
                incoming=incoming, binary=qemu))

        machines = {
            "null backend (C)": null_qemu("qemu-null"),
            "shim": rig.qemu("qemu-s", shim, legacy=False, properties=PROPS, binary=qemu),
            "native": rig.machine("qemu-n", MachineConfig(
                backend=TapBackend("kvq0", vhost=True), device_properties=PROPS,
                binary=qemu)),
        }
        netns.link_up("kvq0")
        drivers = {name: VirtioNetDriver.probe(m.qtest) for name, m in machines.items()}
        rts = interleaved(
            {name: functools.partial(round_trip, drv) for name, drv in drivers.items()},
            reps, warm_up=True,
        )
        for m in machines.values():
            m.stop()

        rig.port("kvs1")
        shim_b = start_shim(rig, "shim-g", "kvs1", label, verbose=False)

        def null_pair(i: int) -> tuple[Machine, Machine, str]:
            uri = f"unix:{rig.workdir / f'mig-z{i}.sock'}"
            return null_qemu(f"src-z{i}"), null_qemu(f"dst-z{i}", incoming=uri), uri

        migrations = interleaved(
            {
                name: functools.partial(migrate_once, pair, transmit=False)
                for name, pair in (("null backend (C)", null_pair),
                                   ("shim", shim_pairs(rig, shim, shim_b, qemu)),
                                   ("native", native_pairs(rig, qemu)))
            },
            reps, warm_up=False,
        )
        downs = {name: [run[1] for run in runs] for name, runs in migrations.items()}
    n = statistics.median(rts["native"])
    for name, values in rts.items():
        print(f"floor: DRIVER_OK round trip ms {name:17s} {stats(values, 1e3)}  "
              f"/ native {statistics.median(values) / n:.2f}")
    nd = statistics.median(downs["native"])
    for name, ms in downs.items():
        print(f"floor: migration downtime ms  {name:17s} {stats([float(x) for x in ms])}  "
              f"median - native {statistics.median(ms) - nd:+.1f}")
    return 0


Pair = Callable[[int], tuple[Machine, Machine, str]]


def shim_pairs(rig: Rig, src: ShimProcess, dst: ShimProcess, qemu: str) -> Pair:
    """Migration pair i: a QEMU on ``src``'s socket, an incoming one on ``dst``'s, the URI."""

    def pair(i: int) -> tuple[Machine, Machine, str]:
        uri = f"unix:{rig.workdir / f'mig-s{i}.sock'}"
        return (
            rig.qemu(f"src-s{i}", src, legacy=False, properties=PROPS, binary=qemu),
            rig.qemu(f"dst-s{i}", dst, legacy=False, properties=PROPS, incoming=uri,
                     binary=qemu),
            uri,
        )

    return pair


def native_pairs(rig: Rig, qemu: str) -> Pair:
    """Migration pair i with QEMU's own vhost-net: taps kvq0 (source) and kvq1."""

    def pair(i: int) -> tuple[Machine, Machine, str]:
        uri = f"unix:{rig.workdir / f'mig-n{i}.sock'}"
        return (
            rig.machine(f"src-n{i}", MachineConfig(
                backend=TapBackend("kvq0", vhost=True), device_properties=PROPS,
                binary=qemu)),
            rig.machine(f"dst-n{i}", MachineConfig(
                backend=TapBackend("kvq1", vhost=True), device_properties=PROPS, incoming=uri,
                binary=qemu)),
            uri,
        )

    return pair


def shim_share_ms(
    shims: tuple[ShimProcess, ShimProcess], before: tuple[int, int]
) -> float:
    """The shims' own share of one migration's downtime, from their events since ``before``
    (each shim's event count then): on the source, every GET_VRING_BASE from request to reply
    (summed over the rings); on the destination, the first ring message of the start to the
    last ring running (the largest ``start_us``)."""
    src_events = shims[0].events()[before[0]:]
    dst_events = shims[1].events()[before[1]:]
    stop_us = sum(int(e["took_us"]) for e in src_events
                  if e.get("event") == "vring_base" and e.get("request") == "GET_VRING_BASE")
    starts = [int(e["start_us"]) for e in dst_events
              if e.get("event") == "vring" and e.get("start_us") is not None]
    if not stop_us or not starts:
        raise RuntimeError("the shims logged no ring stop on the source or no ring start on "
                           "the destination for this migration")
    return (stop_us + max(starts)) / 1e3


def migrate_once(
    make_pair: Pair, i: int, *, transmit: bool = True,
    shims: tuple[ShimProcess, ShimProcess] | None = None,
) -> tuple[int, int, float | None]:
    """(total ms, downtime ms, the shims' share ms or None) of one migration of a started
    guest that has sent a frame (``transmit``) or not, to a fresh destination QEMU."""
    before = (len(shims[0].events()), len(shims[1].events())) if shims else (0, 0)
    src, dst, uri = make_pair(i)
    try:
        drv = VirtioNetDriver.probe(src.qtest)
        drv.start()
        if transmit:
            drv.send(frame(GUEST_MAC, PEER_MAC, f"mig{i}"))
            drv.wait_used(TX, 1)
        result = migrate(src, uri, destination=dst)
        if result.status != "completed":
            raise RuntimeError(
                f"migration {i} {result.status}: {result.error}\n{dst.stderr_text()}"
            )
        dst.wait_incoming(timeout=30)
        assert result.total_ms is not None and result.downtime_ms is not None
        share = None if shims is None else shim_share_ms(shims, before)
        return result.total_ms, result.downtime_ms, share
    finally:
        dst.kill()
        src.kill()


def trace_run(reps: int, verbose: bool, qemu: str) -> int:
    """Time the shim's part of the DRIVER_OK round trip message by message (see --trace)."""
    with netns.fresh("kvbench"), Rig() as rig:
        trace = rig.workdir / "shim.trace"
        port = rig.port("kvs0")
        shim = start_shim(rig, "shim-t", "kvs0", None, verbose=verbose, trace=trace)
        m = rig.qemu("qemu-t", shim, legacy=False, properties=PROPS, binary=qemu)
        drv = VirtioNetDriver.probe(m.qtest)
        windows = []
        for i in range(reps):
            drv.prepare()
            out = frame(GUEST_MAC, PEER_MAC, f"trace{i}")
            drv.send(out, kick=False)
            t0 = time.monotonic_ns()
            drv.driver_ok()
            t1 = time.monotonic_ns()
            drv.notify(TX)
            port.expect(out)
            drv.wait_used(TX, 1)
            drv.pop_used(TX)
            windows.append((t0, t1))
        m.stop()
        shim.stop()
        lines = [ln.split(" ", 2) for ln in trace.read_text().splitlines()]
    print("trace: per DRIVER_OK write, each socket read of the shim: arrival ms (from the "
          "start of the write) + shim ms, messages (! = NEED_REPLY); '|' marks the write's "
          "return")
    busy_all = []
    for n, (t0, t1) in enumerate(windows):
        ends = [i for i, (a, _, _) in enumerate(lines) if int(a) > t1]
        after = ends[0] if ends else len(lines)
        shown, busy = [], 0
        for i, (a, b, what) in enumerate(lines):
            start, end = int(a), int(b)
            if t0 <= start <= t1 or (start > t1 and i < after + 12):
                if i == after:
                    shown.append("|")
                if start <= t1:
                    busy += min(end, t1) - start
                shown.append(f"{(start - t0) / 1e6:.1f}+{(end - start) / 1e6:.2f} {what}")
        busy_all.append(busy / 1e6)
        print(f"trace: #{n} write {(t1 - t0) / 1e6:.2f} ms, shim busy inside {busy / 1e6:.2f} ms:"
              f" {'; '.join(shown)}")
    writes = [(b - a) / 1e6 for a, b in windows]
    print(f"trace: after the first write: shim busy inside the write median "
          f"{statistics.median(busy_all[1:] or busy_all):.2f} ms, write median "
          f"{statistics.median(writes[1:] or writes):.2f} ms")
    return 0


def release_line(qemu: str) -> str:
    out = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=60,
                         check=False)
    return (out.stdout or out.stderr).splitlines()[0] if (out.stdout or out.stderr) else "?"


def stats(values: list[float], scale: float = 1.0) -> str:
    v = [x * scale for x in values]
    return f"min {min(v):.2f} median {statistics.median(v):.2f} max {max(v):.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--shim-verbose", action="store_true",
                        help="run the shims with -v (debug logging), as the tests do")
    parser.add_argument("--floor", action="store_true",
                        help="diagnose instead: DRIVER_OK round trips against a do-nothing "
                             "C backend, the shim and native vhost")
    parser.add_argument("--trace", type=int, metavar="N", default=0,
                        help="diagnose instead: N DRIVER_OK writes, the last one traced")
    parser.add_argument("--qemu", metavar="PATH", default=QEMU_BINARY,
                        help=f"QEMU binary for every machine (default {QEMU_BINARY})")
    args = parser.parse_args()
    if args.reps < 1:
        parser.error("--reps must be at least 1")
    qemu = args.qemu
    if not (os.path.isfile(qemu) and os.access(qemu, os.X_OK)):
        parser.error(f"--qemu {qemu}: no executable there (QEMU 10.0 is unpacked by "
                     "scripts/install-deps into /opt/kvhost/qemu-10.0)")
    print(f"QEMU: {qemu}: {release_line(qemu)}", flush=True)
    if args.trace:
        return trace_run(args.trace, args.shim_verbose, qemu)
    if args.floor:
        return floor_run(args.reps, qemu)
    ok = True
    verbose = args.shim_verbose
    print(f"shims log at {'DEBUG (-v)' if verbose else 'INFO (the default)'}", flush=True)
    with netns.fresh("kvbench"), Rig() as rig:
        # -- start: shim and native, repetitions interleaved --------------------------------
        port_s = rig.port("kvs0")
        shim_a = start_shim(rig, "shim-a", "kvs0", None, verbose=verbose)
        print(f"shim serves {shim_a.served_version()}", flush=True)
        m_s = rig.qemu("qemu-s", shim_a, legacy=False, properties=PROPS, binary=qemu)
        m_n = rig.machine("qemu-n", MachineConfig(
            backend=TapBackend("kvq0", vhost=True), device_properties=PROPS, binary=qemu))
        netns.link_up("kvq0")
        port_n = TapPort("kvq0")
        starts = interleaved(
            {
                "shim": functools.partial(restart, VirtioNetDriver.probe(m_s.qtest), port_s),
                "native": functools.partial(restart, VirtioNetDriver.probe(m_n.qtest), port_n),
            },
            args.reps, warm_up=True,
        )
        port_n.close()
        m_s.stop()
        m_n.stop()
        s_rt, s_tx = ([run[k] for run in starts["shim"]] for k in (0, 1))
        n_rt, n_tx = ([run[k] for run in starts["native"]] for k in (0, 1))

        # -- migration: shim -------------------------------------------------------------
        rig.port("kvs1")
        shim_b = start_shim(rig, "shim-b", "kvs1", shim_a.served_version(),
                            verbose=verbose)

        migrations = interleaved(
            {"shim": functools.partial(migrate_once, shim_pairs(rig, shim_a, shim_b, qemu),
                                       shims=(shim_a, shim_b)),
             "native": functools.partial(migrate_once, native_pairs(rig, qemu))},
            args.reps, warm_up=False,
        )
        s_total = [run[0] for run in migrations["shim"]]
        s_down = [run[1] for run in migrations["shim"]]
        n_total = [run[0] for run in migrations["native"]]
        n_down = [run[1] for run in migrations["native"]]
        s_share = [run[2] for run in migrations["shim"] if run[2] is not None]

    print(f"DRIVER_OK round trip ms    shim   {stats(s_rt, 1e3)}")
    print(f"DRIVER_OK round trip ms    native {stats(n_rt, 1e3)}")
    print(f"DRIVER_OK -> first TX ms   shim   {stats(s_tx, 1e3)}")
    print(f"DRIVER_OK -> first TX ms   native {stats(n_tx, 1e3)}")
    print(f"migration total ms         shim   {stats([float(x) for x in s_total])}")
    print(f"migration total ms         native {stats([float(x) for x in n_total])}")
    print(f"migration downtime ms      shim   {stats([float(x) for x in s_down])}")
    print(f"migration downtime ms      native {stats([float(x) for x in n_down])}")
    print(f"shim's share of downtime ms       {stats(s_share)}  (its own events)")
    r_rt = statistics.median(s_rt) / statistics.median(n_rt)
    r_tx = statistics.median(s_tx) / statistics.median(n_tx)
    r_total = statistics.median(s_total) / statistics.median(n_total)
    d_down = statistics.median(s_down) - statistics.median(n_down)
    r_share = statistics.median(s_share) / statistics.median(n_down)
    print("summary:")
    for name, value, target, good in (
        ("DRIVER_OK round trip shim/native", f"{r_rt:.2f}", "<= 1.5", r_rt <= 1.5),
        ("DRIVER_OK -> first TX shim/native", f"{r_tx:.2f}", "<= 1.5", r_tx <= 1.5),
        ("migration total shim/native", f"{r_total:.2f}", "(reported)", True),
        ("downtime median shim - native ms", f"{d_down:+.1f}", "(reported)", True),
        ("shim's share / native downtime", f"{r_share:.2f}", "<= 0.10", r_share <= 0.10),
    ):
        print(f"  {name:36s} {value:>7s}  target {target:10s} {'ok' if good else 'MISSED'}")
        ok &= good
    return 0 if ok else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--as-traced-shim"]:
        sys.exit(traced_shim_main(sys.argv[2:]))
    sys.exit(main())
