"""``kvhost probe [--json]``: what this kernel offers a vhost-net backend.

Exit status 0 when vhost-net and tun are both usable; 1 otherwise, after one sentence on
stderr saying what is missing and what to do (with ``--json`` the JSON is still printed
on stdout, its ``*_error`` fields carrying the same sentences).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from kvhost.probe import format_text, probe


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "probe",
        help="report vhost-net and tap features of this kernel",
        description="Ask the kernel what /dev/vhost-net and /dev/net/tun offer: feature bits "
        "(hex and names), backend features, tun features, accepted tap offloads, "
        "max_mem_regions, fork-owner support and which vhost device nodes open.",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the JSON shape of docs/probe-json.md"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    result = probe()
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    problems = [e for e in (result.vhost_net_error,) if e]
    if result.tun is None and result.tun_error:
        problems.append(result.tun_error)
    if problems:
        for sentence in problems:
            print(f"kvhost probe: {sentence}", file=sys.stderr)
        return 1
    if not args.json:
        print(format_text(result))
    return 0
