"""Manifest generation wall time beside ``python -c pass``, measured in the same run.

    python bench/bench_manifest.py [--runs N] [--output PATH]

Both are timed as fresh processes (what udev pays per event): ``python -m kvhost.cli
manifest --output PATH`` versus ``python -c pass``. Prints min/median/max of each and the
ratio of medians. Needs a host with /dev/vhost-net (run it inside the test VM otherwise:
``python -m harness.testvm -- python3 bench/bench_manifest.py``).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _time(argv: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return elapsed


def _row(label: str, xs: list[float]) -> str:
    return (
        f"{label:<28} min {min(xs) * 1e3:8.1f} ms  median {statistics.median(xs) * 1e3:8.1f} ms"
        f"  max {max(xs) * 1e3:8.1f} ms"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--output", help="manifest path (default: a temporary directory)")
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory(dir="/run" if Path("/run").is_dir() else None)
    out = args.output or str(Path(tmp.name) / "vhost-net.json")
    baseline: list[float] = []
    manifest: list[float] = []
    cmd = [sys.executable, "-m", "kvhost.cli", "manifest", "--output", out]
    _time(cmd)  # warm the page cache for both
    for _ in range(args.runs):
        baseline.append(_time([sys.executable, "-c", "pass"]))
        manifest.append(_time(cmd))
    print(_row("python -c pass", baseline))
    print(_row("kvhost manifest", manifest))
    ratio = statistics.median(manifest) / statistics.median(baseline)
    print(f"ratio (median manifest / median python -c pass): {ratio:.1f}x over {args.runs} runs")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
