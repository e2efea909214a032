"""Memory per VM of the deployment the unit file makes, run inside the test VM (root,
/dev/vhost-net):

    python -m harness.testvm -- python bench/bench_memory.py [--processes 16] [--connections 16]

``kvhost-shim@.service`` runs one shim process per VM, so what a VM costs a host is the
proportional set size (PSS: shared pages divided among the processes sharing them) of one idle
shim process. Measured side by side in one run:

* N idle ``kvhost-shim`` processes (listening, no connection): PSS per process, and the same
  for N bare ``python`` processes of the same interpreter that only sleep (the floor no Python
  program goes below);
* one shim with N connected frontends (handshake, rings started): PSS growth per connection,
  guest memory (memfd mappings) excluded, since that is the VM's own memory.

Prints one line per measurement and the shim/bare ratio. Not a timed test: numbers for notes.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kvhost.memory import GuestMemory  # noqa: E402
from kvhost.vhost_user.frontend import VhostUserFrontend  # noqa: E402

V5 = "org.kernel.vhost-net.v5"
MEMORY = [(0, 0xC0000), (0x100000, 32 << 20)]
BASE = 0x100000
SHIM = [sys.executable, "-m", "shim.cli"]


def pss(pid: int, *, without_memfd: bool = False) -> int:
    """PSS of ``pid`` in bytes; ``without_memfd`` leaves out memfd-backed mappings."""
    if not without_memfd:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no Pss line in /proc/{pid}/smaps_rollup")
    total, skip = 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        first = line.split(maxsplit=1)[0]
        if "-" in first and not first.endswith(":"):  # a mapping's header line
            skip = "/memfd:" in line
        elif first == "Pss:" and not skip:
            total += int(line.split()[1]) * 1024
    return total


def wait_listening(proc: subprocess.Popen[bytes], sock: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(sock):
        if proc.poll() is not None:
            raise RuntimeError(f"kvhost-shim exited {proc.returncode} before listening on {sock}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"kvhost-shim not listening on {sock} after {timeout} s")
        time.sleep(0.05)


def settle() -> None:
    # pages touched during start-up are counted once the processes sleep
    time.sleep(1.0)


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def idle_shims(n: int, tmp: str) -> float:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(n):
            sock = f"{tmp}/idle{i}.sock"
            procs.append(subprocess.Popen(
                [*SHIM, "--socket-path", sock, "--interface-version", V5],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                cwd=REPO,
            ))  # fmt: skip
            wait_listening(procs[-1], sock)
        settle()
        return statistics.fmean(pss(p.pid) for p in procs)
    finally:
        stop(procs)


def bare_pythons(n: int) -> float:
    procs = [
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
        for _ in range(n)
    ]
    try:
        settle()
        return statistics.fmean(pss(p.pid) for p in procs)
    finally:
        stop(procs)


def per_connection(n: int, tmp: str) -> float:
    sock = f"{tmp}/conn.sock"
    proc = subprocess.Popen(
        [*SHIM, "--socket-path", sock, "--interface-version", V5],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
    )  # fmt: skip
    mems: list[GuestMemory] = []
    fes: list[VhostUserFrontend] = []
    try:
        wait_listening(proc, sock)
        settle()
        base = pss(proc.pid, without_memfd=True)
        for _ in range(n):
            mems.append(GuestMemory.create(MEMORY))
            fes.append(VhostUserFrontend(sock, timeout=120))
            fes[-1].connect()
            fes[-1].handshake()
            fes[-1].start_net(mems[-1], base_gpa=BASE)
        settle()
        return (pss(proc.pid, without_memfd=True) - base) / n
    finally:
        for fe in fes:
            fe.close()
        for mem in mems:
            mem.close()
        stop([proc])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--processes", type=int, default=16, help="idle shims (and bare pythons)")
    ap.add_argument("--connections", type=int, default=16, help="connections on one shim")
    args = ap.parse_args()
    if not os.path.exists("/dev/vhost-net"):
        print("needs /dev/vhost-net: run it inside the test VM (python -m harness.testvm -- ...)")
        return 2
    mib = 2**20
    with tempfile.TemporaryDirectory(prefix="kvbench-mem-", dir="/run") as tmp:
        shim = idle_shims(args.processes, tmp)
        bare = bare_pythons(args.processes)
        conn = per_connection(args.connections, tmp)
    print(f"idle shim PSS per process ({args.processes} processes): {shim / mib:.2f} MiB")
    print(f"bare python PSS per process ({args.processes} processes): {bare / mib:.2f} MiB")
    print(f"ratio idle shim / bare python: {shim / bare:.2f}")
    print(f"one shim, PSS growth per connection ({args.connections} connections, guest memory "
          f"excluded): {conn / mib:.2f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
