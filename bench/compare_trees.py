"""A/B of two kvhost trees in one boot: the same benchmark, the trees' runs interleaved.

    python -m harness.testvm -- python bench/compare_trees.py \\
        --a /var/tmp/kvhost-before --b . [--rounds 2] -- bench/bench_shim.py --trials 3

A refactor may not make the benchmarks worse by more than noise, and under TCG the machine's
speed drifts over minutes: so each round runs the benchmark once per tree (A, B, then B, A in
the next round), each from its own tree (working directory and import path), and every line
the benchmarks print is shown under its tree's label. Each benchmark already prints ratios
measured side by side within its run; this puts the two trees' ratios next to each other.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path


def run_in(tree: Path, argv: list[str], timeout: float) -> tuple[int, str]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    done = subprocess.run(
        [sys.executable, *argv], cwd=tree, env=env, capture_output=True, text=True,
        timeout=timeout, check=False,
    )  # fmt: skip
    return done.returncode, done.stdout + done.stderr


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--a", type=Path, required=True, help="first tree (e.g. before a change)")
    ap.add_argument("--b", type=Path, required=True, help="second tree (e.g. after it)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per benchmark run")
    ap.add_argument("bench", nargs=argparse.REMAINDER, help="-- SCRIPT [ARGS...], tree-relative")
    args = ap.parse_args()
    bench = args.bench[1:] if args.bench[:1] == ["--"] else args.bench
    if not bench:
        ap.error("name the benchmark after --, e.g. -- bench/bench_shim.py")
    trees = {"A": args.a.resolve(), "B": args.b.resolve()}
    for label, tree in trees.items():
        if not (tree / bench[0]).is_file():
            ap.error(f"tree {label} ({tree}) has no {bench[0]}")
    failed = 0
    for rnd in range(args.rounds):
        order = ["A", "B"] if rnd % 2 == 0 else ["B", "A"]
        for label in order:
            rc, out = run_in(trees[label], bench, args.timeout)
            print(f"=== round {rnd + 1}, tree {label} ({trees[label]}): exit {rc}", flush=True)
            for line in out.splitlines():
                print(f"[{label}] {line}", flush=True)
            failed |= rc != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
