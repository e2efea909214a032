"""``./demo``: kvhost end to end on this machine, with a short readable report.

Runs :func:`harness.single_host.run` -- probe, manifest, kvhost-shim at this kernel's latest
interface version, Debian's QEMU against it, traffic through kernel vhost-net, live migration
to a second shim pinned to the same version -- and prints what happened.

A host without ``/dev/vhost-net`` (most development machines and CI runners) runs it inside
the test VM (:mod:`harness.testvm`, a real Debian kernel under QEMU), whose log streams here
while it boots and runs; the report is passed back as JSON through a shared directory.

Exit status: 0 when every step worked, 1 when one failed (the reason is printed), 125 when
the test VM could not run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from harness.qemu.errors import QemuError
from kvhost import versions
from kvhost.errors import KvhostError

REPORT_NAME = "demo-report.json"


def collect(version: str | None) -> dict[str, Any]:
    """Run the scenario here (needs /dev/vhost-net, root) and return the report's data."""
    from harness import single_host
    from harness.device import PLUMBING
    from harness.shim_process import first_per_ring, last_per_ring

    def progress(text: str) -> None:
        print(f"[demo] {text}", flush=True)

    r = single_host.run(version=version, progress=progress)
    src = last_per_ring(r.source_get_bases)
    dst = first_per_ring(r.destination_set_bases)
    return {
        "kernel": r.kernel,
        "supported": r.supported,
        "served": r.served,
        "destination_served": r.destination_served,
        "negotiated": f"0x{r.negotiated & ~PLUMBING:x}",
        "negotiated_names": r.negotiated_names,
        "driver_ok_ms": round(r.driver_ok_ms, 2),
        "frames_sent": r.frames_sent,
        "frames_received": r.frames_received,
        "frames_after_migration": r.frames_after_migration,
        "shim_cpu_ms_during_traffic": round(r.traffic_shim_usage.cpu_seconds * 1e3, 1),
        "shim_wakeups_during_traffic": r.traffic_shim_usage.switches,
        "migration": r.migration.status,
        "migration_total_ms": r.migration.total_ms,
        "migration_downtime_ms": r.migration.downtime_ms,
        "rings_resumed": bool(src) and src == dst,
        "ring_bases": {str(k): v for k, v in sorted(src.items())},
        "dirty_logging": r.log_all and r.log_mapped,
        "rarp_on_destination": r.rarp_seen,
    }


def render(d: dict[str, Any]) -> str:
    """The human report."""
    latest = d["supported"][-1] if d["supported"] else "none"
    names = d["negotiated_names"]
    lines = [
        "",
        "kvhost demo report",
        "==================",
        f"kernel                 {d['kernel']}",
        f"versions supported     {', '.join(v.rsplit('.', 1)[-1] for v in d['supported'])}"
        f"  (latest {latest})",
        f"version served         {d['served']} (source), {d['destination_served']} "
        "(destination)",
        f"features negotiated    {d['negotiated']}:",
    ]
    row: list[str] = []
    for name in names:
        if len(", ".join([*row, name])) > 60:
            lines.append("                         " + ", ".join(row) + ",")
            row = []
        row.append(name)
    if row:
        lines.append("                         " + ", ".join(row))
    ok = "yes" if d["rings_resumed"] else "NO"
    lines += [
        f"DRIVER_OK round trip   {d['driver_ok_ms']} ms (QEMU starts the kernel rings inside)",
        f"frames passed          {d['frames_sent']} out + {d['frames_received']} in through "
        f"kernel vhost-net; the shim used {d['shim_cpu_ms_during_traffic']} ms CPU and woke "
        f"{d['shim_wakeups_during_traffic']} times meanwhile",
        f"live migration         {d['migration']}: total {d['migration_total_ms']} ms, "
        f"downtime {d['migration_downtime_ms']} ms",
        f"after migration        rings resumed at {d['ring_bases']}: {ok}; dirty log "
        f"{'on' if d['dirty_logging'] else 'OFF'}; RARP on destination tap "
        f"{'seen' if d['rarp_on_destination'] else 'MISSING'}; "
        f"{d['frames_after_migration']} frames through the destination's vhost-net",
        "",
    ]
    return "\n".join(lines)


def _inside(version: str | None, report_dir: Path | None) -> int:
    try:
        data = collect(version)
    except (KvhostError, QemuError, OSError) as err:
        print(f"[demo] failed: {err}", file=sys.stderr)
        return 1
    if report_dir is not None:
        (report_dir / REPORT_NAME).write_text(json.dumps(data))
    print(render(data))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", dest="iface", metavar="V",
                        help="interface version to serve (default: this kernel's latest)")
    parser.add_argument("--kernel", default="6.1", help="test VM kernel (6.1 or 6.12)")
    parser.add_argument("--skip-cross-kernel", action="store_true",
                        help="skip the second part: a VM moved from Linux 6.12 to Linux 6.1")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--report-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.iface is not None:
        try:
            versions.parse(args.iface)
        except KvhostError as err:
            parser.error(str(err))
    if os.geteuid() != 0:
        print("[demo] needs root (taps, network namespaces): run it with sudo",
              file=sys.stderr)
        return 1
    if args.inside or os.path.exists("/dev/vhost-net"):
        return _inside(args.iface, args.report_dir)

    from harness import testvm

    print("[demo] this kernel has no /dev/vhost-net: running inside the test VM "
          f"(Linux {args.kernel}, booting takes a minute under TCG)", flush=True)
    with tempfile.TemporaryDirectory(prefix="kvhost-demo-", dir="/var/tmp") as shared:
        cmd = [sys.executable, "-m", "harness.demo", "--inside", "--report-dir", shared]
        if args.iface:
            cmd += ["--version", args.iface]
        status = testvm.run(cmd, kernel=args.kernel, rwdirs=(shared,), quiet=False)
        report = Path(shared) / REPORT_NAME
        if status == 0 and report.exists():
            print("[demo] the report above came from inside the VM; the kernel is the VM's")
    if status != 0 or args.skip_cross_kernel:
        return status
    return _cross_kernel()


def _cross_kernel() -> int:
    """Part two: the migration real fleets fail, 6.12 -> 6.1, unpinned and pinned."""
    from harness import crosskernel

    print("\n[demo] part two: a VM started on Linux 6.12 migrates to Linux 6.1 "
          "(boots 6.12, then 6.1; several minutes under TCG)", flush=True)
    with tempfile.TemporaryDirectory(prefix="kvhost-demo-xk-", dir="/var/tmp") as state:
        report = crosskernel.run_scenario(Path(state))
        print(crosskernel.format_report(report))
        return 0 if crosskernel.passed(report) else 1


if __name__ == "__main__":
    sys.exit(main())
