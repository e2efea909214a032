"""Kernel tier, issue 6 "Load": 64 frontends at once against one ``kvhost-shim``.

The shim runs as its own process without ``--tap``, so it creates one tap per connection;
kvhost's Python frontend runs 64 times as threads of the test process, released together
by a barrier (a connect storm). Every frontend must connect, negotiate, get its own kernel
vhost-net device and tap, and pass frames both ways byte for byte through them. Measured
and printed: each frontend's start latency (connect to rings started; p50/p99) and the
shim's memory per connection (RSS without the memfd guest-memory mappings, from smaps).
``bench/bench_load.py`` is the same at N = 256 with the targets.
"""

from __future__ import annotations

import pytest

from harness.load import (
    RSS_PER_CONNECTION,
    close_all,
    connect_storm,
    load_traffic,
    percentile,
    raise_nofile,
)
from harness.procfs import Footprint, tap_names, wait_footprint
from harness.rig import Rig

pytestmark = pytest.mark.kernel

FRONTENDS = 64


def test_64_frontends_at_once_each_through_its_own_device(netns_quiet: str) -> None:
    raise_nofile(FRONTENDS)
    with Rig() as rig:
        shim = rig.shim("shim", None, None, verbose=False)
        pid = shim.pid
        before = Footprint.of(pid)
        # one connection first: the shim's first-use allocations are not per connection.
        # Idle means every fd count is back where it was, not just the devices: the closer
        # thread closes a dropped connection's memory fds after its vhost-net and tap fds.
        close_all(connect_storm(shim.socket_path, 1))
        idle = wait_footprint(pid, lambda f: f.counts() == before.counts(),
                              what="idle after the first connection")
        fronts = connect_storm(shim.socket_path, FRONTENDS)
        try:
            failed = [f.error for f in fronts if f.error]
            assert not failed, failed[:5]
            wait_footprint(pid, lambda f: f.vhost_fds == FRONTENDS
                           and f.tun_fds == FRONTENDS, what=f"{FRONTENDS} devices")
            taps = tap_names(pid)
            assert len(set(taps)) == FRONTENDS, taps
            out, into = load_traffic(fronts, frames=2)
            assert out == into == 2 * FRONTENDS
            assert sorted(f.tap or "" for f in fronts) == sorted(taps)
            busy = Footprint.of(pid)
        finally:
            close_all(fronts)
        final = wait_footprint(pid, lambda f: f.counts() == idle.counts(), timeout=60,
                               what="idle after every frontend hung up")
        assert shim.stop() == 0, shim.log_text()[-3000:]
    starts = [f.start_seconds for f in fronts]
    p50, p99 = percentile(starts, 50), percentile(starts, 99)
    per_conn = (busy.rss_without_memfd - idle.rss_without_memfd) / FRONTENDS
    print(f"\n[load] {FRONTENDS} frontends at once: all started, {out} frames out and {into} "
          f"in through {FRONTENDS} vhost-net devices and taps; start latency p50 "
          f"{p50 * 1e3:.0f} ms, p99 {p99 * 1e3:.0f} ms (p99/p50 {p99 / p50:.2f}), max "
          f"{max(starts) * 1e3:.0f} ms; shim memory per connection {per_conn / 2**20:.3f} MiB "
          f"without guest memory (idle {idle.describe()}; loaded {busy.describe()}; "
          f"after {final.describe()})")
    assert per_conn <= RSS_PER_CONNECTION, f"{per_conn / 2**20:.2f} MiB per connection"
