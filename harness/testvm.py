"""Run a command under a real Linux kernel that has vhost-net, in a throw-away test VM.

Development machines and CI here run a kernel without ``/dev/vhost-net``. This module boots
one of Debian's kernels (``/boot/vmlinuz-*``) under QEMU with TCG through virtme-ng, with
the host root filesystem visible read-only, runs one command inside, and returns its exit
status. The command's output goes to a log in a results directory shared back with
``--rwdir`` (the VM console drops and interleaves lines); the log is streamed to our stdout
while the VM runs, so a user sees progress, and the exit status comes back in a file.

Usage::

    python -m harness.testvm [--kernel 6.1|6.12|PATH] [--rwdir DIR]... -- CMD [ARG...]

Exit status: the command's, or 125 when the VM itself could not start or lost the command.
"""

from __future__ import annotations

import argparse
import compileall
import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO

from kvhost.errors import UsageError

VM_FAILED = 125
DEFAULT_KERNEL = "6.1"
REPO = Path(__file__).resolve().parent.parent


def find_kernel(spec: str) -> Path:
    """Resolve ``6.1``, ``6.12`` or a path to an installed kernel image."""
    if "/" in spec:
        path = Path(spec)
        if not path.is_file():
            raise UsageError(f"kernel image {spec} does not exist")
        return path
    pattern = re.compile(rf"vmlinuz-{re.escape(spec)}[.\-+]")
    found = sorted(p for p in glob.glob("/boot/vmlinuz-*") if pattern.search(p))
    if not found:
        pkg = "linux-image-amd64" if spec == "6.1" else f"linux-image-{spec}-amd64"
        raise UsageError(
            f"no Linux {spec} kernel in /boot: install it with 'apt-get install {pkg}'"
        )
    return Path(found[-1])


def kernel_release(image: Path) -> str:
    return image.name.removeprefix("vmlinuz-")


def _script(cmd: list[str], results: Path, env: dict[str, str]) -> str:
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
    log = results / "log"
    rc = results / "rc"
    return (
        "#!/bin/sh\n"
        f"{exports}"
        "modprobe vhost_net 2>/dev/null; modprobe tun 2>/dev/null\n"
        "mkdir -p /run/kvhost\n"
        f"cd {shlex.quote(str(Path.cwd()))}\n"
        f"{shlex.join(cmd)} > {shlex.quote(str(log))} 2>&1 < /dev/null\n"
        f"echo $? > {shlex.quote(str(rc))}\n"
        "sync\n"
    )


def run(
    cmd: list[str],
    *,
    kernel: str = DEFAULT_KERNEL,
    rwdirs: tuple[str, ...] = (),
    overlay_rwdirs: tuple[str, ...] = (),
    memory: str = "2G",
    cpus: int = 2,
    quiet: bool = False,
    out: TextIO | None = None,
) -> int:
    """Boot ``kernel``, run ``cmd`` inside, stream its log; return its exit status."""
    stream: TextIO = out if out is not None else sys.stdout
    if shutil.which("vng") is None:
        raise UsageError("virtme-ng is not installed: pip install virtme-ng")
    if shutil.which("qemu-system-x86_64") is None:
        raise UsageError("QEMU is not installed: apt-get install qemu-system-x86")
    image = find_kernel(kernel)
    # Inside the VM the repo is read-only and every file read crosses 9p under TCG: without
    # bytecode on disk each Python process there recompiles kvhost and the harness from
    # source (tens of seconds per process). Compile here, where it takes a second.
    for tree in ("kvhost", "shim", "harness", "tests"):
        compileall.compile_dir(str(REPO / tree), quiet=1)
    results = Path(tempfile.mkdtemp(prefix="kvhost-vm-", dir="/var/tmp"))
    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/local/sbin:/usr/local/bin:/usr/sbin:"
        "/usr/bin:/sbin:/bin",
        "PYTHONPATH": str(REPO),
        "KVHOST_IN_TESTVM": kernel_release(image),
        "KVHOST_RESULTS": str(results),
    }
    for key in ("CI", "KVHOST_PYTEST_ARGS", "TERM"):
        if key in os.environ:
            env[key] = os.environ[key]
    script = results / "run.sh"
    script.write_text(_script(cmd, results, env))
    script.chmod(0o755)
    argv = [
        "vng", "--run", str(image), "--disable-kvm", "--memory", memory, "--cpus", str(cpus),
        "--rwdir", str(results),
    ]
    for d in rwdirs:
        argv += ["--rwdir", d]
    for d in overlay_rwdirs:  # writable in the VM, the writes never reach the host
        argv += [f"--overlay-rwdir={d}"]
    argv += ["--exec", str(script)]
    if not quiet:
        print(f"[testvm] booting Linux {kernel_release(image)} under QEMU TCG "
              f"(about 20-40 s) ...", file=stream, flush=True)
    start = time.monotonic()
    console = results / "console"
    log = results / "log"
    with console.open("wb") as con:
        proc = subprocess.Popen(argv, stdout=con, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        pos = 0
        announced = False
        while True:
            done = proc.poll() is not None
            if log.exists():
                if not announced and not quiet:
                    print(f"[testvm] booted in {time.monotonic() - start:.0f} s; running: "
                          f"{shlex.join(cmd)}", file=stream, flush=True)
                    announced = True
                with log.open("rb") as f:
                    f.seek(pos)
                    chunk = f.read()
                    pos += len(chunk)
                if chunk and not quiet:
                    stream.write(chunk.decode(errors="replace"))
                    stream.flush()
            if done:
                break
            time.sleep(0.5)
    rcfile = results / "rc"
    if not rcfile.exists():
        tail = console.read_bytes()[-4000:].decode(errors="replace")
        print(f"[testvm] the test VM did not run the command to the end (vng exit "
              f"{proc.returncode}); console tail:\n{tail}", file=sys.stderr)
        return VM_FAILED
    rc = int(rcfile.read_text().strip() or VM_FAILED)
    if not quiet:
        print(f"[testvm] Linux {kernel_release(image)}: command exited {rc} after "
              f"{time.monotonic() - start:.0f} s (log: {log})", file=stream, flush=True)
    return rc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.testvm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernel", default=DEFAULT_KERNEL,
                        help="6.1 (linux-image-amd64), 6.12, or a path to a vmlinuz")
    parser.add_argument("--rwdir", action="append", default=[],
                        help="host directory the VM may write to (repeatable)")
    parser.add_argument("--overlay-rwdir", action="append", default=[],
                        help="directory writable in the VM, changes kept from the host "
                        "(e.g. /etc for libvirt's configuration; repeatable)")
    parser.add_argument("--memory", default="2G")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        parser.error("give the command to run after --")
    try:
        return run(cmd, kernel=args.kernel, rwdirs=tuple(args.rwdir),
                   overlay_rwdirs=tuple(args.overlay_rwdir), memory=args.memory, cpus=args.cpus)
    except UsageError as err:
        print(f"harness.testvm: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
