"""Load benchmark of kvhost-shim: N frontends at once, run inside the test VM.

    python -m harness.testvm -- python3 bench/bench_load.py [--frontends 256] [--frames 2]

One ``kvhost-shim`` process (no ``--tap``: it creates a tap per connection) in a fresh
network namespace. N of kvhost's Python frontends: threads of a few forked worker processes
(64 each; written when the frontend still used ``select``, which cannot wait on an fd above
1023 -- it polls now, so one process could hold them all, as tests/test_kernel_load.py does
for 64), all released together by a barrier. Each connects (a blocking connect, as QEMU's),
does QEMU's handshake (SET_OWNER: the shim opens a kernel vhost-net device and creates a
tap) and starts one queue pair; then each passes ``--frames`` frames out through its own
device and tap and as many in, checked byte for byte (:func:`harness.load.load_traffic`).

Reported, with issue 6's targets:

* start latency under the connect storm, connect -> rings started, p50 and p99
  (target p99 <= 5 x p50);
* the shim's memory per connection: RSS from /proc/PID/smaps without the memfd mappings
  (guest memory), loaded minus idle, divided by N (target <= 4 MiB);
* the shim's CPU time per connection set up (what serialises a storm: one thread serves all).

Prints one line per measurement; exits 1 if a frontend failed or a target is missed.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Barrier
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from harness import netns  # noqa: E402
from harness.load import (  # noqa: E402
    RSS_PER_CONNECTION,
    close_all,
    connect_storm,
    load_traffic,
    percentile,
    raise_nofile,
)
from harness.procfs import Footprint, tap_names, wait_footprint  # noqa: E402
from harness.rig import Rig  # noqa: E402
from kvhost.errors import KvhostError  # noqa: E402

PER_PROCESS = 64
P99_OVER_P50 = 5.0

#: what a worker reports: per frontend (index, start seconds, error), traffic (out, in) or
#: the traffic error
Report = tuple[list[tuple[int, float, str | None]], tuple[int, int] | str]


def worker(path: str, first: int, count: int, frames: int, gate: Barrier,
           pipe: Connection) -> None:
    """In a forked process: ``count`` frontends through the storm and the traffic check,
    the report sent up ``pipe``; then hold the connections until the parent says "close"."""
    fronts = connect_storm(path, count, first_index=first, ready=gate.wait)
    started = [(f.index, f.start_seconds, f.error) for f in fronts]
    gate.wait()  # every worker's storm is over: no set-up competes with the traffic
    traffic: tuple[int, int] | str
    if any(f.error for f in fronts):
        traffic = "not run: a frontend failed to start"
    else:
        try:
            traffic = load_traffic(fronts, frames=frames, timeout=120)
        except KvhostError as err:
            traffic = str(err)
    pipe.send((started, traffic))
    pipe.recv()
    close_all(fronts)
    pipe.send("closed")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frontends", type=int, default=256)
    ap.add_argument("--frames", type=int, default=2)
    args = ap.parse_args()
    n = args.frontends
    if n < 2:
        ap.error("--frontends must be at least 2")
    raise_nofile(n)
    ctx = multiprocessing.get_context("fork")
    ok = True
    with netns.fresh("kvload"), Rig() as rig:
        shim = rig.shim("shim", None, None, verbose=False, timeout=300)
        pid = shim.pid
        close_all(connect_storm(shim.socket_path, 1))  # first-use allocations
        idle = wait_footprint(pid, lambda f: f.vhost_fds == 0 and f.tun_fds == 0)
        print(f"shim idle: {idle.describe()}", flush=True)
        parts = [(first, min(PER_PROCESS, n - first)) for first in range(0, n, PER_PROCESS)]
        gate = ctx.Barrier(len(parts) + 1, timeout=1800)
        pipes, procs = [], []
        for first, count in parts:
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=worker, args=(shim.socket_path, first, count,
                                                    args.frames, gate, theirs))
            proc.start()
            pipes.append(ours)
            procs.append(proc)
        try:
            cpu = shim.usage()
            gate.wait()
            began = time.perf_counter()
            gate.wait()  # every worker's storm is over
            storm = time.perf_counter() - began
            shim_cpu = (shim.usage() - cpu).cpu_seconds / n
            reports: list[Report] = [p.recv() for p in pipes]
            loaded = Footprint.of(pid)
        except BaseException:
            for proc in procs:
                proc.kill()
            raise
        starts = [(i, s, e) for started, _ in reports for i, s, e in started]
        failed = [e for _, _, e in starts if e]
        print(f"storm: {n - len(failed)}/{n} frontends started in {storm:.1f} s "
              f"({len(parts)} worker processes); shim CPU {shim_cpu * 1e3:.0f} ms per "
              "connection set up", flush=True)
        traffic = [t for _, t in reports]
        broken = [t for t in traffic if isinstance(t, str)]
        if failed or broken:
            print("FAILED:\n  " + "\n  ".join(str(e) for e in [*failed, *broken][:10]))
            ok = False
        else:
            out = sum(t[0] for t in traffic if not isinstance(t, str))
            into = sum(t[1] for t in traffic if not isinstance(t, str))
            print(f"traffic: {out} frames out and {into} in, byte for byte, each frontend "
                  "through its own vhost-net device and tap")
            held = (loaded.vhost_fds, loaded.tun_fds, len(set(tap_names(pid))))
            if held != (n, n, n):
                print(f"FAILED: the shim holds {held} vhost-net fds, tun fds, taps for {n}")
                ok = False
        for pipe in pipes:
            pipe.send("close")
        for pipe, proc in zip(pipes, procs, strict=True):
            pipe.recv()
            proc.join(60)
        t0 = time.perf_counter()
        final = wait_footprint(pid, lambda f: f.counts() == idle.counts(), timeout=300,
                               what="idle after every frontend hung up")
        print(f"teardown: all {n} connections released {time.perf_counter() - t0:.1f} s after "
              f"the last hang-up; shim {final.describe()}")
        if shim.stop() != 0:
            print(f"FAILED: kvhost-shim exit status {shim.exit_status}")
            ok = False
    if failed:
        return 1
    times = [s for _, s, _ in starts]
    p50, p99 = percentile(times, 50), percentile(times, 99)
    ratio = p99 / p50
    print(f"start latency under a {n}-frontend connect storm: p50 {p50 * 1e3:.0f} ms, p99 "
          f"{p99 * 1e3:.0f} ms, min {min(times) * 1e3:.0f} ms, max {max(times) * 1e3:.0f} "
          f"ms; p99/p50 {ratio:.2f} (target <= {P99_OVER_P50:g})")
    per_conn = (loaded.rss_without_memfd - idle.rss_without_memfd) / n
    print(f"memory: shim RSS per connection {per_conn / 2**20:.3f} MiB without guest memory "
          f"(idle {idle.rss_without_memfd / 2**20:.1f} MiB, loaded "
          f"{loaded.rss_without_memfd / 2**20:.1f} MiB, VmRSS {loaded.rss / 2**20:.1f} MiB, "
          f"{loaded.memfd_mappings} memfd mappings; target <= {RSS_PER_CONNECTION >> 20} MiB)")
    ok &= ratio <= P99_OVER_P50 and per_conn <= RSS_PER_CONNECTION
    print("all targets met" if ok else "TARGET MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
