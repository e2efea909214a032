"""Cross-kernel live migration: a VM started on Linux 6.12 moves to Linux 6.1 (issues 7, 16).

Debian 12 ships two kernels whose vhost-net differs: 6.12 adds RING_RESET (and the tap accepts
USO). A guest that starts on 6.12 with QEMU's own vhost-net negotiates RING_RESET and cannot be
loaded on 6.1 ("Features 0x... unsupported"). Pinning the VM to the interface version both
hosts support (``kvhost compat``) makes the move work: natively with ``kvhost qemu-args``, or
through ``kvhost-shim``. Debian's QEMU 7.2 shows that; QEMU 10.0 (issue 16) also gives a native
guest the tap's USO on 6.12, and 6.1 refuses those bits too, as reported upstream.

Theory of operation. The two kernels never run at the same time: QEMU migrates to a file
(``exec:cat > FILE``) and loads it later (``-incoming defer`` + ``migrate-incoming
"exec:cat FILE"``), through a state directory the host shares with both test VMs::

    host: plan.json (kernels, pinned version and why) -> boot 6.12 -> boot 6.1 -> report.json
    6.12 ("source" phase)                       6.1 ("destination" phase)
      kvhost manifest -> source/manifest.json     kvhost manifest -> destination/manifest.json
      per case, in a fresh network namespace:     kvhost compat (both manifests), before any load
        backend + QEMU, driver to DRIVER_OK,      per case, in a fresh network namespace:
        a frame each way, migrate to              backend + QEMU -incoming, load the stream,
        <case>/stream (dirty log read during        RARP, attach the driver, rings resume,
        the copy), save driver state                a frame each way, QEMU's SET_FEATURES
        -> <case>/source.json                       to vhost -> <case>/destination.json

The VM's version is recorded before it starts (as management would). The source boots before
the destination kernel has written a manifest in this run, so the host predicts the
destination's newest version from the registry's ``first_kernel`` annotations (data, see
docs/versions.md); the destination phase then runs ``kvhost compat`` on both real manifests and
the pinned cases fail unless it names exactly that version.

Cases (:data:`CASES`, data: backend, pinned or not, QEMU binary, machine type):
``native-unpinned``, ``shim-unpinned`` and ``native10-unpinned`` must fail to load with QEMU's
"Features ... unsupported" refusing at least the case's ``refused`` bits (RING_RESET; with
QEMU 10.0 also the USO bits) and only bits ``kvhost compat`` predicted missing;
``native-pinned``, ``shim-pinned`` and ``native10-pinned`` must load, resume the rings at the
saved indexes, move frames through 6.1's vhost-net, and 6.1's QEMU must have given its vhost
backend SET_FEATURES with exactly the negotiated bits; every case's source must have had the
dirty log on during the copy; ``manifests``: different ``latest``, and 6.12 supports every
version 6.1 does. :func:`evaluate` judges collected results; ``python -m harness.crosskernel``
runs everything (``run --case`` some cases) and prints a report (exit 0 only when every case
holds).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

from harness import netns
from harness.frames import TEST_ETHERTYPE
from harness.qemu import virtio_status as vs
from harness.qemu.binaries import QEMU_10, QEMU_72, require
from harness.qemu.errors import QemuError, QemuExited
from harness.qemu.machine import Machine, MachineConfig, TapBackend, VhostUserBackend, migrate
from harness.qemu.virtio_pci import RX, TX, DriverState, VirtioNetDriver
from harness.shim_process import ShimProcess
from kvhost import abi, qemu_args
from kvhost import features as fb
from kvhost import manifest as mf
from kvhost import versions as ver
from kvhost.errors import KvhostError, UsageError

SOURCE_KERNEL = "6.12"
DESTINATION_KERNEL = "6.1"
TAP = "kvx0"
GUEST_MAC = bytes.fromhex("525400c70001")
PEER_MAC = bytes.fromhex("02000000c7ef")
RING_RESET = fb.bit("RING_RESET")
#: "Features 0x... unsupported. Allowed features: 0x..." (hw/virtio/virtio.c, virtio_load)
FEATURES_ERROR = re.compile(
    r"Features (0x[0-9a-fA-F]+) unsupported\.\s*Allowed features: (0x[0-9a-fA-F]+)"
)
#: how long one QEMU/shim may take to come up in a TCG guest on a loaded 2-core machine
#: (QEMU 10.0 loads more modules than 7.2 and starts slower; only a ceiling, a run that
#: starts faster does not wait for it)
START_TIMEOUT = 180.0
FRAME_TIMEOUT = 10.0
SCRATCH = Path("/run/kvhost-crosskernel")


@dataclass(frozen=True, slots=True)
class Case:
    """One migration: which backend, pinned or each host's latest, what must happen."""

    name: str
    backend: str  # "native" (QEMU's tap,vhost=on) or "shim" (kvhost-shim over vhost-user)
    pinned: bool
    expect_load: bool
    issue_case: int
    #: the QEMU binary on both sides (one case never mixes releases: that is
    #: tests/test_kernel_qemu10.py's subject, on one kernel)
    qemu: str = QEMU_72
    #: the machine type on both sides; a stream only loads at the type it was saved at
    machine: str = "pc"
    #: unpinned cases: bits the guest must negotiate on the source and the destination must
    #: refuse (each also named by ``kvhost compat``'s reasons)
    refused: tuple[str, ...] = ("RING_RESET",)


#: Issue 16's QEMU 10.0 cases run 10.0 on both kernels at ``pc-q35-10.0``, named in full:
#: ``q35`` is an alias a later QEMU moves to its own newest type, and the stream carries the
#: concrete name. Not ``pc-q35-7.2`` (COMMON_MACHINE, for mixing 7.2 and 10.0): its compat
#: properties switch USO off (hw_compat_8_1), which would hide the very bits the unpinned
#: case is about.
QEMU10_MACHINE = "pc-q35-10.0"
#: what QEMU 10.0's native device shows on 6.12 beyond 6.1: the tap's USO (Linux 6.2) and
#: vhost-net's RING_RESET (6.3), the bits of the upstream report
QEMU10_REFUSED = ("RING_RESET", "GUEST_USO4", "GUEST_USO6", "HOST_USO")

CASES: tuple[Case, ...] = (
    Case("native-unpinned", "native", False, False, 1),
    Case("native-pinned", "native", True, True, 2),
    Case("shim-unpinned", "shim", False, False, 3),
    Case("shim-pinned", "shim", True, True, 4),
    Case("native10-unpinned", "native", False, False, 6, qemu=QEMU_10,
         machine=QEMU10_MACHINE, refused=QEMU10_REFUSED),
    Case("native10-pinned", "native", True, True, 7, qemu=QEMU_10, machine=QEMU10_MACHINE),
)


def case_by_name(name: str) -> Case:
    for case in CASES:
        if case.name == name:
            return case
    raise UsageError(f"unknown case {name!r}; cases are {', '.join(c.name for c in CASES)}")


# --- pure helpers (host-tier tested) --------------------------------------------------------


def release_tuple(release: str) -> tuple[int, ...]:
    """``6.12.117+deb12-amd64`` -> (6, 12, 117); UsageError when it starts with no number."""
    m = re.match(r"(\d+(?:\.\d+)*)", release)
    if not m:
        raise UsageError(f"kernel release {release!r} does not start with a version number")
    parts = tuple(int(p) for p in m.group(1).split("."))
    return parts + (0,) * (3 - len(parts))


def predicted_latest(release: str) -> ver.InterfaceVersion:
    """The newest registry version whose ``first_kernel`` is not after ``release``: what the
    registry's own history says that kernel provides. UsageError if none."""
    rel = release_tuple(release)
    best = None
    for v in ver.registry():
        if v.first_kernel is not None and release_tuple(v.first_kernel) <= rel:
            best = v
    if best is None:
        raise UsageError(f"the registry names no version that Linux {release} provides")
    return best


def parse_features_error(stderr: str) -> tuple[int, int] | None:
    """(features the stream carries, features the destination allows) from QEMU's stderr."""
    m = FEATURES_ERROR.search(stderr)
    if m is None:
        return None
    return int(m.group(1), 16), int(m.group(2), 16)


def _frame(src: bytes, dst: bytes, tag: str) -> bytes:
    payload = f"kvhost crosskernel {tag} {os.urandom(4).hex()}".encode().ljust(46, b".")
    return dst + src + TEST_ETHERTYPE.to_bytes(2, "big") + payload


# --- in-VM plumbing -------------------------------------------------------------------------


@contextlib.contextmanager
def _timed(r: dict[str, Any], step: str) -> Iterator[None]:
    """Record the body's wall time in ``r["timings_s"][step]`` (also when it raises)."""
    t0 = time.monotonic()
    try:
        yield
    finally:
        r.setdefault("timings_s", {})[step] = round(time.monotonic() - t0, 2)


def _receive(drv: VirtioNetDriver, frame: bytes, timeout: float = FRAME_TIMEOUT) -> None:
    """Wait until ``frame`` lands in the RX ring (other frames are skipped)."""
    deadline = time.monotonic() + timeout
    got: list[bytes] = []
    while time.monotonic() < deadline:
        try:
            got += drv.receive(timeout=max(0.1, deadline - time.monotonic()))
        except QemuError:
            break
        if frame in got:
            return
    raise KvhostError(f"frame written into {TAP} never reached the RX ring ({len(got)} others)")


def vhost_evidence(pid: int) -> dict[str, Any]:
    """Proof that process ``pid`` drives kernel vhost-net: its open /dev/vhost-net fds and
    the kernel's ``vhost-PID`` worker (a kernel thread before 6.4, a thread of ``pid`` since)."""
    fds = 0
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/vhost-net":
                    fds += 1
    worker = None
    wanted = f"vhost-{pid}"
    for comm in Path("/proc").glob("[0-9]*/task/[0-9]*/comm"):
        with contextlib.suppress(OSError):
            if comm.read_text().strip() == wanted:
                worker = int(comm.parent.name)
                break
    return {"pid": pid, "vhost_net_fds": fds, "worker_tid": worker}


#: Properties harness.qemu.machine sets itself: its device is modern-only, which is what
#: ``kvhost qemu-args`` asks for (``disable-modern=off``) for every version with VERSION_1.
MACHINE_FIXED = {"disable-modern": "off", "disable-legacy": "on"}


def _device_properties(case: Case, pin: str | None) -> tuple[dict[str, str], list[str]]:
    """(properties for the test machine, what ``kvhost qemu-args PIN`` printed)."""
    props = {"mac": GUEST_MAC.hex(":")}
    printed: list[str] = []
    if case.backend == "native" and case.pinned:
        if pin is None:
            raise UsageError("a pinned native case needs the pinned version")
        # The same library call as ``kvhost qemu-args PIN --qemu BINARY`` (a Python start
        # costs tens of seconds in a TCG guest on a loaded machine), asking the case's QEMU:
        # 10.0's line also switches off the USO bits 7.2 has no properties for.
        printed = qemu_args.device_properties(
            ver.parse(pin), qemu_args.available_properties(case.qemu))
        for item in printed:
            key, _, value = item.partition("=")
            if key in MACHINE_FIXED:
                if value != MACHINE_FIXED[key]:
                    raise UsageError(f"{pin} needs {key}={value} (a legacy device); the qtest "
                                     "driver is modern-only, pin a version with VERSION_1")
                continue
            props[key] = value
    return props, printed


@contextlib.contextmanager
def _backend(case: Case, pin: str | None, work: Path, log_dir: Path,
             side: str, r: dict[str, Any]) -> Iterator[tuple[MachineConfig, ShimProcess | None]]:
    """The QEMU configuration for ``case`` and, for shim cases, the running shim."""
    props, r["qemu_args"] = _device_properties(case, pin)
    binary = require(case.qemu)
    if case.backend == "native":
        yield MachineConfig(backend=TapBackend(TAP, vhost=True), device_properties=props,
                            binary=binary, machine=case.machine), None
        return
    # the shim takes an existing tap (--tap), as an operator's setup would give it one
    netns.create_tap(TAP)
    shim = ShimProcess(str(work / "shim.sock"), log_dir / f"{side}-shim.log",
                       version=pin if case.pinned else None, tap=TAP, verbose=False,
                       name=f"{side} shim")
    try:
        shim.start(START_TIMEOUT)
        yield MachineConfig(backend=VhostUserBackend(shim.socket_path),
                            device_properties=props, binary=binary,
                            machine=case.machine), shim
    finally:
        shim.stop()
        subprocess.run(["ip", "link", "del", TAP], capture_output=True, check=False)


# --- phases (run inside the test VMs) -------------------------------------------------------


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as err:
        raise UsageError(f"cannot read {path}: {err}") from err


def _hex(value: int) -> str:
    return f"{value:#x}"


def _qemu_release(machine: Machine) -> str:
    """``major.minor.micro`` of the running QEMU, as it answers ``query-version``."""
    q = (machine.qmp.execute("query-version") or {}).get("qemu") or {}
    return f"{q.get('major')}.{q.get('minor')}.{q.get('micro')}"


def _vhost_status(machine: Machine) -> dict[str, Any]:
    """QEMU's own record of the device and its vhost backend (``x-query-virtio-status``):
    what the guest negotiated, what QEMU's last SET_FEATURES gave the backend, the backend's
    offer as QEMU keeps it, and whether the dirty log is on."""
    status = machine.qmp.virtio_status()
    return {"guest_features": _hex(vs.guest_features(status)),
            "acked_features": _hex(vs.vhost_acked(status)),
            "backend_features": _hex(vs.vhost_offered(status)),
            "log_enabled": vs.log_enabled(status)}


def _phase_case(case: Case, body: Callable[[dict[str, Any]], None],
                out: TextIO) -> dict[str, Any]:
    """Run ``body(result)``; any exception is recorded in the result, never raised."""
    result: dict[str, Any] = {"case": case.name, "kernel": os.uname().release, "error": None}
    start = time.monotonic()
    print(f"--- {case.name} ...", file=out, flush=True)
    try:
        body(result)
    except Exception as err:  # recorded for the host's verdict; the next case still runs
        result["error"] = f"{type(err).__name__}: {err}"
        result["traceback"] = traceback.format_exc()
    result["wall_s"] = round(time.monotonic() - start, 2)
    status = "ok" if result["error"] is None else f"ERROR {result['error']}"
    print(f"--- {case.name}: {status} ({result['wall_s']} s)", file=out, flush=True)
    return result


def run_source(state: Path, cases: Sequence[Case], out: TextIO = sys.stdout, *,
               libvirt: bool = True) -> int:
    """The 6.12 side: manifest, then per case backend + QEMU, traffic, migrate to a file;
    then (``libvirt``) the same story through libvirt (:mod:`harness.crosskernel_libvirt`)."""
    plan = _plan(state)
    pin = str(plan["pin"])
    t0 = time.monotonic()
    manifest = state / "source" / "manifest.json"
    mf.generate(manifest)  # = kvhost manifest --output MANIFEST
    lacking = ver.missing(ver.parse(pin), mf.read(manifest).offer)  # = kvhost check
    _write_json(state / "source" / "phase.json", {
        "kernel": os.uname().release, "pin_missing": lacking,
        "manifest_s": round(time.monotonic() - t0, 2)})
    for case in cases:
        case_dir = state / case.name
        case_dir.mkdir(parents=True, exist_ok=True)
        for stale in ("stream", "driver.json", "source.json", "destination.json"):
            with contextlib.suppress(FileNotFoundError):
                (case_dir / stale).unlink()

        def body(r: dict[str, Any], c: Case = case, d: Path = case_dir) -> None:
            _source_case(c, pin, d, r)

        result = _phase_case(case, body, out)
        _write_json(case_dir / "source.json", result)
    if libvirt:
        from harness import crosskernel_libvirt

        crosskernel_libvirt.run_source(state, pin, out)
    _write_json(state / "source" / "done.json", {"wall_s": round(time.monotonic() - t0, 2)})
    return 0


def _source_case(case: Case, pin: str, case_dir: Path, r: dict[str, Any]) -> None:
    work = SCRATCH / f"src-{case.name}"
    work.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        with _timed(r, "netns"):
            # IPv6 off: no neighbour discovery chatter in the rings
            stack.enter_context(netns.fresh("kvx-src"))
        with _timed(r, "backend"):
            config, shim = stack.enter_context(_backend(case, pin, work, case_dir, "source", r))
        r["device_properties"] = dict(config.device_properties)
        machine = Machine(config, name=f"source-{case.name}")
        stack.callback(machine.kill)
        try:
            with _timed(r, "qemu_start"):
                machine.start(timeout=START_TIMEOUT)
        finally:
            r["qemu_stderr"] = machine.stderr_text()
        if case.backend == "native":
            netns.link_up(TAP)
        port = netns.TapPort(TAP)
        stack.callback(port.close)

        drv = VirtioNetDriver.probe(machine.qtest)
        r["driver_ok_ms"] = round(drv.start() * 1e3, 2)
        r["device_features"] = _hex(drv.state.device_features)
        r["driver_features"] = _hex(drv.state.driver_features)
        r["vhost"] = vhost_evidence(shim.pid if shim else machine.pid)
        r["qemu_version"] = _qemu_release(machine)
        if shim is not None:
            r["shim_version"] = shim.served_version()

        before = _frame(GUEST_MAC, PEER_MAC, "before")
        drv.send(before)
        port.expect(before, FRAME_TIMEOUT)
        drv.wait_used(TX, 1)
        drv.pop_used(TX)
        into = _frame(PEER_MAC, GUEST_MAC, "before-rx")
        port.send(into)
        _receive(drv, into)
        r["frames_before"] = {"tx": True, "rx": True}

        r["vhost_status"] = _vhost_status(machine)
        stream = case_dir / "stream"
        # The dirty log is the source's part of a migration whatever the transport: QEMU
        # turns it on when RAM copying starts, into a file as over a socket. Looked at once
        # while RAM is copied (migrate holds the bandwidth low until then).
        logging: list[bool] = []
        with _timed(r, "migrate"):
            result = migrate(machine, f"exec:cat > {shlex.quote(str(stream))}",
                             return_path=False, timeout=300,
                             during_copy=lambda: logging.append(
                                 vs.log_enabled(machine.qmp.virtio_status())))
        r["log_during_copy"] = logging
        r["migration"] = {"status": result.status, "total_ms": result.total_ms,
                          "downtime_ms": result.downtime_ms, "setup_ms": result.setup_ms,
                          "wall_ms": round(result.wall_ms, 1), "error": result.error}
        r["run_state_after"] = machine.qmp.query_status()
        r["stream_bytes"] = stream.stat().st_size if stream.exists() else None
        (case_dir / "driver.json").write_text(drv.save_state())
        r["saved_used"] = {"rx": drv.state.queues[RX].last_used,
                           "tx": drv.state.queues[TX].last_used}
        r["qemu_exit"] = machine.stop()
        r["qemu_stderr"] = machine.stderr_text()
        if shim is not None:
            r["shim_exit"] = shim.stop()
            r["shim_stderr"] = shim.log_text()


def run_destination(state: Path, cases: Sequence[Case], out: TextIO = sys.stdout, *,
                    libvirt: bool = True) -> int:
    """The 6.1 side: manifest, compat over both, then per case load the stream and go on;
    then (``libvirt``) virsh restore of what the source's libvirt part saved."""
    plan = _plan(state)
    t0 = time.monotonic()
    src_manifest = state / "source" / "manifest.json"
    dst_manifest = state / "destination" / "manifest.json"
    mf.generate(dst_manifest)
    # = kvhost compat --json SRC DST, before any stream is loaded: the prediction
    compat = mf.compat([mf.read(src_manifest), mf.read(dst_manifest)])
    _write_json(state / "destination" / "compat.json", {
        "exit": 0 if compat.version else 1, "result": compat.to_json(),
        "manifest_and_compat_s": round(time.monotonic() - t0, 2)})
    version = compat.version.label if compat.version else None
    pin = str(plan["pin"])
    for case in cases:
        case_dir = state / case.name
        with contextlib.suppress(FileNotFoundError):
            (case_dir / "destination.json").unlink()

        def body(r: dict[str, Any], c: Case = case, d: Path = case_dir) -> None:
            r["compat_version"] = version
            _destination_case(c, pin, d, r)

        result = _phase_case(case, body, out)
        _write_json(case_dir / "destination.json", result)
    if libvirt:
        from harness import crosskernel_libvirt

        crosskernel_libvirt.run_destination(state, pin, out)
    _write_json(state / "destination" / "done.json", {"wall_s": round(time.monotonic() - t0, 2)})
    return 0


def _destination_case(case: Case, pin: str, case_dir: Path, r: dict[str, Any]) -> None:
    stream = case_dir / "stream"
    saved_text = (case_dir / "driver.json").read_text() if (case_dir / "driver.json").exists() \
        else None
    if not stream.exists() or saved_text is None:
        raise UsageError(f"{case_dir}: no migration stream or driver state from the source "
                         "phase; run the source phase first")
    work = SCRATCH / f"dst-{case.name}"
    work.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        with _timed(r, "netns"):
            stack.enter_context(netns.fresh("kvx-dst"))
        with _timed(r, "backend"):
            config, shim = stack.enter_context(
                _backend(case, pin, work, case_dir, "destination", r))
        config = replace(config, incoming="defer")
        r["device_properties"] = dict(config.device_properties)
        machine = Machine(config, name=f"destination-{case.name}")
        stack.callback(machine.kill)
        try:
            with _timed(r, "qemu_start"):
                machine.start(timeout=START_TIMEOUT)
        finally:
            r["qemu_stderr"] = machine.stderr_text()
        if case.backend == "native":
            netns.link_up(TAP)
        port = netns.TapPort(TAP)  # bound before the load, so the self-announce is seen
        stack.callback(port.close)
        r["qemu_version"] = _qemu_release(machine)
        if shim is not None:
            r["shim_version"] = shim.served_version()

        t0 = time.monotonic()
        machine.qmp.execute("migrate-incoming", {"uri": f"exec:cat {shlex.quote(str(stream))}"})
        try:
            r["run_state"] = machine.wait_incoming(timeout=300)
            r["loaded"] = True
        except QemuExited:
            r["loaded"] = False
            with contextlib.suppress(QemuError):
                machine.wait(timeout=10)
            r["qemu_exit"] = machine.exit_status
            r["qemu_stderr"] = machine.stderr_text()
            if shim is not None:
                r["shim_exit"] = shim.stop()
                r["shim_stderr"] = shim.log_text()
            return
        r["load_ms"] = round((time.monotonic() - t0) * 1e3, 1)

        rarp, _ = port.expect(abi.ETH_P_RARP, FRAME_TIMEOUT)
        r["rarp_mac"] = rarp[6:12].hex(":")
        saved = DriverState.from_json(saved_text)
        drv = VirtioNetDriver.attach(machine.qtest, saved)
        r["resumed_used"] = {"rx": drv.used_idx(RX), "tx": drv.used_idx(TX)}
        r["device_features"] = _hex(drv.read_device_features())
        r["driver_features"] = _hex(saved.driver_features)

        after = _frame(GUEST_MAC, PEER_MAC, "after")
        drv.send(after)
        port.expect(after, FRAME_TIMEOUT)
        r["used_after_tx"] = drv.wait_used(TX, 1)
        drv.pop_used(TX)
        into = _frame(PEER_MAC, GUEST_MAC, "after-rx")
        port.send(into)
        _receive(drv, into)
        r["frames_after"] = {"tx": True, "rx": True}
        r["vhost"] = vhost_evidence(shim.pid if shim else machine.pid)
        r["vhost_status"] = _vhost_status(machine)

        r["qemu_exit"] = machine.stop()
        r["qemu_stderr"] = machine.stderr_text()
        if shim is not None:
            r["shim_exit"] = shim.stop()
            r["shim_stderr"] = shim.log_text()


def _plan(state: Path) -> dict[str, Any]:
    plan = read_json(state / "plan.json")
    if not isinstance(plan, dict) or "pin" not in plan:
        raise UsageError(f"{state}/plan.json is missing: the host writes it before booting "
                         "(python -m harness.crosskernel run)")
    return plan


# --- host side: boots, collection, verdicts, report -----------------------------------------


def make_plan(source_kernel: str, destination_kernel: str, pin: str | None,
              cases: Sequence[Case] = CASES) -> dict[str, Any]:
    """The plan the host writes before the first boot (kernels resolved to images)."""
    from harness.testvm import find_kernel, kernel_release

    src = kernel_release(find_kernel(source_kernel))
    dst = kernel_release(find_kernel(destination_kernel))
    if pin is None:
        chosen = predicted_latest(dst)
        why = (f"the newest registry version whose first kernel is not after {dst} "
               f"(first_kernel {chosen.first_kernel}); checked against kvhost compat on the "
               "real manifests in the destination phase")
    else:
        chosen = ver.parse(pin)
        why = "given with --pin"
    return {"source_kernel": src, "destination_kernel": dst, "pin": chosen.label,
            "pin_spec": chosen.spec(), "pin_reason": why,
            "cases": [c.name for c in cases]}


def run_scenario(state: Path, *, source_kernel: str = SOURCE_KERNEL,
                 destination_kernel: str = DESTINATION_KERNEL, pin: str | None = None,
                 cases: Sequence[Case] = CASES, out: TextIO = sys.stdout) -> dict[str, Any]:
    """Boot ``source_kernel`` then ``destination_kernel``, run ``cases`` in each, and return
    :func:`collect`'s result (with boot exit statuses and times). UsageError for a missing
    kernel/tool."""
    from harness import testvm

    state.mkdir(parents=True, exist_ok=True)
    plan = make_plan(source_kernel, destination_kernel, pin, cases)
    selected = [] if list(cases) == list(CASES) else [
        arg for c in cases for arg in ("--case", c.name)]
    _write_json(state / "plan.json", plan)
    boots: dict[str, Any] = {}
    for phase, kernel in (("source", source_kernel), ("destination", destination_kernel)):
        print(f"[crosskernel] {phase} phase on Linux {plan[phase + '_kernel']} "
              f"(pinned cases use {plan['pin']}; python {sys.executable}, prefix "
              f"{sys.prefix})", file=out, flush=True)
        t0 = time.monotonic()
        # /etc and /var/lib writable (in the VM only) for libvirt: harness.libvirtd
        rc = testvm.run([sys.executable, "-m", "harness.crosskernel", phase,
                         "--state", str(state), *selected], kernel=kernel,
                        rwdirs=(str(state),), overlay_rwdirs=("/etc", "/var/lib"), out=out)
        boots[phase] = {"exit": rc, "vm_s": round(time.monotonic() - t0, 1)}
        if rc != 0:
            print(f"[crosskernel] {phase} phase exited {rc}", file=out, flush=True)
    _write_json(state / "boots.json", boots)
    report = collect(state)
    _write_json(state / "report.json", report)
    return report


def planned_cases(plan: Mapping[str, Any] | None) -> list[Case]:
    """The cases a plan names (every case for a plan that names none)."""
    names = (plan or {}).get("cases")
    return [case_by_name(n) for n in names] if names else list(CASES)


def collect(state: Path) -> dict[str, Any]:
    """Everything both phases wrote for the planned cases, plus the verdicts
    (:func:`evaluate`)."""
    plan = read_json(state / "plan.json")
    report: dict[str, Any] = {
        "state": str(state),
        "plan": plan,
        "boots": read_json(state / "boots.json"),
        "source": {"manifest": read_json(state / "source" / "manifest.json"),
                   "phase": read_json(state / "source" / "phase.json"),
                   "done": read_json(state / "source" / "done.json")},
        "destination": {"manifest": read_json(state / "destination" / "manifest.json"),
                        "compat": read_json(state / "destination" / "compat.json"),
                        "done": read_json(state / "destination" / "done.json")},
        "cases": {c.name: {"source": read_json(state / c.name / "source.json"),
                           "destination": read_json(state / c.name / "destination.json")}
                  for c in planned_cases(plan)},
    }
    from harness import crosskernel_libvirt

    report["libvirt"] = crosskernel_libvirt.collect(state)
    report["verdicts"] = {name: problems for name, problems in evaluate(report).items()}
    return report


def _features(value: Any) -> int | None:
    return int(value, 16) if isinstance(value, str) else None


def bits_named(text: str) -> list[str]:
    """The feature bit names ``text`` mentions (a compat reason, a hook's refusal), in order,
    each once."""
    names: list[str] = []
    for word in re.findall(r"[A-Z][A-Z0-9_]+", text):
        with contextlib.suppress(KeyError):
            fb.bit(word)
            if word not in names:
                names.append(word)
    return names


def _missing_bits_named(compat: Mapping[str, Any] | None) -> set[str]:
    """Bit names the compat reasons say a VM at one host's latest lacks elsewhere."""
    result = (compat or {}).get("result") or {}
    return {name for reason in result.get("reasons", []) for name in bits_named(str(reason))}


def evaluate(report: Mapping[str, Any]) -> dict[str, list[str]]:
    """Per case (and ``manifests``), the list of problems; empty means the case holds."""
    verdicts: dict[str, list[str]] = {}
    plan = report.get("plan") or {}
    pin = plan.get("pin")
    compat = report["destination"].get("compat")
    compat_version = ((compat or {}).get("result") or {}).get("version")
    predicted = _missing_bits_named(compat)
    for case in (case_by_name(name) for name in report["cases"]):
        p: list[str] = []
        src = report["cases"][case.name]["source"]
        dst = report["cases"][case.name]["destination"]
        if src is None:
            verdicts[case.name] = ["the source phase wrote no result"]
            continue
        if src.get("error"):
            p.append(f"source failed: {src['error']}")
        elif src.get("migration", {}).get("status") != "completed":
            p.append(f"source migration did not complete: {src.get('migration')}")
        elif src.get("log_during_copy") != [True]:
            p.append(f"the source's dirty log while RAM was copied: "
                     f"{src.get('log_during_copy')} (x-query-virtio-status log-enabled)")
        if dst is None:
            verdicts[case.name] = [*p, "the destination phase wrote no result"]
            continue
        stderr = dst.get("qemu_stderr") or ""
        if dst.get("error"):
            p.append(f"destination failed: {dst['error']}\nQEMU stderr:\n{stderr}")
            verdicts[case.name] = p
            continue
        dev = _features(src.get("device_features")) or 0
        drv_src = _features(src.get("driver_features")) or 0
        if case.pinned:
            if compat_version != pin:
                p.append(f"kvhost compat on the two manifests says {compat_version}, but the "
                         f"VM was pinned to {pin} before it started")
            if drv_src & RING_RESET:
                p.append("pinned source guest negotiated RING_RESET")
            beyond = drv_src & ver.INTERFACE_BITS & ~ver.parse(pin).features if pin else 0
            if beyond:
                p.append(f"pinned source guest negotiated {fb.names(beyond)} beyond {pin}")
            if case.backend == "shim":
                for side, r in (("source", src), ("destination", dst)):
                    if r.get("shim_version") != pin:
                        p.append(f"{side} shim served {r.get('shim_version')}, not {pin}")
            if not dst.get("loaded"):
                p.append(f"destination did not load (exit {dst.get('qemu_exit')}):\n{stderr}")
            else:
                p += _loaded_problems(src, dst)
        else:
            must = fb.mask(case.refused)
            if drv_src & must != must:
                p.append(f"unpinned source guest did not negotiate "
                         f"{fb.names(must & ~drv_src)} (device {dev:#x}, driver {drv_src:#x})")
            if dst.get("loaded"):
                p.append("the unpinned stream loaded on the destination; expected QEMU's "
                         "'Features ... unsupported'")
            else:
                exit_status = dst.get("qemu_exit")
                if not exit_status:
                    p.append(f"destination QEMU exit status {exit_status!r}, expected non-zero")
                parsed = parse_features_error(stderr)
                if parsed is None:
                    p.append(f"no 'Features 0x... unsupported' in QEMU's stderr:\n{stderr}")
                else:
                    carried, allowed = parsed
                    lacking = set(fb.names(carried & ~allowed))
                    if not set(case.refused) <= lacking:
                        p.append(f"QEMU refused {sorted(lacking)}, not all of "
                                 f"{list(case.refused)}")
                    if not lacking <= predicted:
                        p.append(f"QEMU refused {sorted(lacking - predicted)} which kvhost "
                                 f"compat did not predict ({sorted(predicted)})")
            if not set(case.refused) <= predicted:
                p.append(f"kvhost compat did not name "
                         f"{sorted(set(case.refused) - predicted)}: {compat}")
        verdicts[case.name] = p
    verdicts["manifests"] = _manifest_problems(report)
    if "libvirt" in report:
        from harness import crosskernel_libvirt

        verdicts.update(crosskernel_libvirt.evaluate(report))
    return verdicts


def resume_problems(src: Mapping[str, Any], dst: Mapping[str, Any], moved: str) -> list[str]:
    """How the rings failed to carry on after ``moved`` (``"migration"``, ``"restore"``): the
    used indexes the destination read against those the source saved, TX after one more
    frame, and a frame each way. Empty when they carried on."""
    p: list[str] = []
    saved = src.get("saved_used") or {}
    resumed = dst.get("resumed_used") or {}
    if resumed != saved or not saved.get("tx"):
        p.append(f"rings resumed at used indexes {resumed}, saved {saved}")
    if dst.get("used_after_tx") != (saved.get("tx", 0) + 1) & 0xFFFF:
        p.append(f"TX used.idx after one more frame is {dst.get('used_after_tx')}, "
                 f"expected {saved.get('tx', 0) + 1}")
    if dst.get("frames_after") != {"tx": True, "rx": True}:
        p.append(f"frames after {moved}: {dst.get('frames_after')}")
    return p


def _loaded_problems(src: Mapping[str, Any], dst: Mapping[str, Any]) -> list[str]:
    p = resume_problems(src, dst, "migration")
    if dst.get("rarp_mac") != GUEST_MAC.hex(":"):
        p.append(f"self-announce RARP carried {dst.get('rarp_mac')}, not the guest MAC")
    if dst.get("device_features") != src.get("device_features"):
        p.append(f"device features changed: {src.get('device_features')} -> "
                 f"{dst.get('device_features')}")
    p += _set_features_problems(src, dst)
    vhost = dst.get("vhost") or {}
    if not vhost.get("vhost_net_fds") or vhost.get("worker_tid") is None:
        p.append(f"destination traffic did not go through kernel vhost-net: {vhost}")
    if not str(dst.get("kernel", "")).startswith("6.1."):
        p.append(f"destination ran on {dst.get('kernel')}, not Linux 6.1")
    if dst.get("qemu_exit") != 0:
        p.append(f"destination QEMU exit {dst.get('qemu_exit')}: {dst.get('qemu_stderr')}")
    return p


def _set_features_problems(src: Mapping[str, Any], dst: Mapping[str, Any]) -> list[str]:
    """The destination QEMU must have given 6.1's vhost backend exactly what the guest
    negotiated on 6.12 (plumbing aside), as its x-query-virtio-status records."""
    status = dst.get("vhost_status") or {}
    negotiated = _features(status.get("guest_features"))
    acked = _features(status.get("acked_features"))
    offered = _features(status.get("backend_features"))
    if negotiated is None or acked is None or offered is None:
        return [f"no x-query-virtio-status record from the destination: {status}"]
    p: list[str] = []
    if negotiated != _features(src.get("driver_features")):
        p.append(f"destination QEMU holds guest features {negotiated:#x}, the guest "
                 f"negotiated {src.get('driver_features')}")
    wrong = vs.acked_mismatch(negotiated, acked, offered)
    if wrong:
        p.append(f"destination SET_FEATURES {acked:#x} differs from the negotiated bits in "
                 f"{fb.names(wrong)}")
    return p


def _manifest_problems(report: Mapping[str, Any]) -> list[str]:
    src = report["source"].get("manifest")
    dst = report["destination"].get("manifest")
    if not src or not dst:
        return ["a manifest is missing"]
    p: list[str] = []
    if src["latest"] == dst["latest"]:
        p.append(f"both kernels name latest {src['latest']}")
    lacking = [v for v in dst["supported"] if v not in src["supported"]]
    if lacking:
        p.append(f"{src['kernel_release']} lacks {lacking}, which {dst['kernel_release']} has")
    for name in dst["supported"]:
        if name in src["supported"] and src["versions"][name] != dst["versions"][name]:
            p.append(f"{name} is spelled differently: {src['versions'][name]} vs "
                     f"{dst['versions'][name]}")
    return p


def format_report(report: Mapping[str, Any]) -> str:
    """A short human report: kernels, versions, features per case, outcome, numbers."""
    lines: list[str] = []
    plan = report.get("plan") or {}
    src_m = report["source"].get("manifest") or {}
    dst_m = report["destination"].get("manifest") or {}
    compat = ((report["destination"].get("compat") or {}).get("result") or {})
    lines.append("kvhost cross-kernel migration (Linux "
                 f"{plan.get('source_kernel')} -> {plan.get('destination_kernel')})")
    for side, m in (("source", src_m), ("destination", dst_m)):
        offer = m.get("offer", {})
        lines.append(f"  {side:<11} {m.get('kernel_release')}: latest {m.get('latest')}, "
                     f"{len(m.get('supported', []))} versions, vhost-net+tap offer "
                     f"{offer.get('features')}")
    lines.append(f"  kvhost compat: {compat.get('version')} "
                 f"(VM pinned to {plan.get('pin')} before it started)")
    for reason in compat.get("reasons", []):
        lines.append(f"    {reason}")
    verdicts = report.get("verdicts") or {}
    for case in (case_by_name(name) for name in report["cases"]):
        src = report["cases"][case.name]["source"] or {}
        dst = report["cases"][case.name]["destination"] or {}
        ok = not verdicts.get(case.name)
        mig = src.get("migration") or {}
        drv = _features(src.get("driver_features"))
        head = (f"  [{'PASS' if ok else 'FAIL'}] {case.issue_case}. {case.name} "
                f"(QEMU {src.get('qemu_version')}, {case.machine})")
        if drv is not None:
            head += (f": device offered {src.get('device_features')}, guest negotiated "
                     f"{drv:#x} ({', '.join(fb.names(drv))})")
        lines.append(head)
        lines.append(f"      source: migration {mig.get('status')} (QEMU: total "
                     f"{mig.get('total_ms')} ms, downtime {mig.get('downtime_ms')} ms; wall "
                     f"{mig.get('wall_ms')} ms), stream {src.get('stream_bytes')} bytes, "
                     f"dirty log during the copy {src.get('log_during_copy')}")
        if dst.get("loaded"):
            status = dst.get("vhost_status") or {}
            lines.append(f"      destination: loaded in {dst.get('load_ms')} ms, rings resumed "
                         f"at {dst.get('resumed_used')}, frames after migration "
                         f"{dst.get('frames_after')}, vhost worker {dst.get('vhost')}, "
                         f"SET_FEATURES {status.get('acked_features')}")
        elif dst:
            err = parse_features_error(dst.get("qemu_stderr") or "")
            refused = fb.names(err[0] & ~err[1]) if err else None
            first = (dst.get("qemu_stderr") or dst.get("error") or "").strip().splitlines()
            lines.append(f"      destination: refused (QEMU exit {dst.get('qemu_exit')}): "
                         f"{first[0] if first else '?'}; refused bits {refused}")
        for problem in verdicts.get(case.name, []):
            lines.append(f"      PROBLEM: {problem}")
    ok = not verdicts.get("manifests")
    lines.append(f"  [{'PASS' if ok else 'FAIL'}] 5. manifests: latest {src_m.get('latest')} "
                 f"vs {dst_m.get('latest')}; 6.12 supports all of 6.1's versions")
    for problem in verdicts.get("manifests", []):
        lines.append(f"      PROBLEM: {problem}")
    if "libvirt" in report:
        from harness import crosskernel_libvirt

        lines += crosskernel_libvirt.format_lines(report)
    boots = report.get("boots") or {}
    if boots:
        lines.append("  VM time (boot + cases + shutdown): " + ", ".join(
            f"{k} {boots[k].get('vm_s')} s (exit {boots[k].get('exit')})"
            for k in ("source", "destination") if k in boots))
    return "\n".join(lines)


def passed(report: Mapping[str, Any]) -> bool:
    return not any(report.get("verdicts", {}).values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.crosskernel",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="boot 6.12 then 6.1, run every case, print the report "
                         "(the default)")
    run.add_argument("--state", help="state directory shared with the VMs "
                     "(default: a new /var/tmp/kvhost-crosskernel-*)")
    run.add_argument("--pin", help="the version pinned cases use (default: predicted for the "
                     "destination kernel from the registry)")
    run.add_argument("--source-kernel", default=SOURCE_KERNEL)
    run.add_argument("--destination-kernel", default=DESTINATION_KERNEL)
    run.add_argument("--json", action="store_true", help="print the report as JSON")
    run.add_argument("--case", action="append", help="only this case (repeatable; the "
                     "report then judges only these)")
    plan = sub.add_parser("plan", help="only write STATE/plan.json (for running the phases "
                          "by hand with harness.testvm)")
    plan.add_argument("--state", required=True)
    plan.add_argument("--pin")
    plan.add_argument("--source-kernel", default=SOURCE_KERNEL)
    plan.add_argument("--destination-kernel", default=DESTINATION_KERNEL)
    plan.add_argument("--case", action="append", help="only this case (repeatable)")
    for name, text in (("source", "inside the VM booted on the source kernel"),
                       ("destination", "inside the VM booted on the destination kernel"),
                       ("report", "print the report of an earlier run")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--state", required=True)
        p.add_argument("--case", action="append", help="only this case (repeatable); "
                       "skips the libvirt part (python -m harness.crosskernel_libvirt runs it)")
        if name == "report":
            p.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    command = args.command or "run"
    try:
        cases = [case_by_name(n) for n in args.case] if getattr(args, "case", None) \
            else list(CASES)
        if command in ("source", "destination"):
            state = Path(args.state)
            phase = run_source if command == "source" else run_destination
            return phase(state, cases, libvirt=not args.case)
        if command == "plan":
            plan_path = Path(args.state) / "plan.json"
            _write_json(plan_path, make_plan(args.source_kernel, args.destination_kernel,
                                             args.pin, cases))
            print(f"wrote {plan_path}")
            return 0
        if command == "report":
            report = collect(Path(args.state))
        else:
            import tempfile

            state = Path(getattr(args, "state", None) or tempfile.mkdtemp(
                prefix="kvhost-crosskernel-", dir="/var/tmp"))
            report = run_scenario(
                state, source_kernel=getattr(args, "source_kernel", SOURCE_KERNEL),
                destination_kernel=getattr(args, "destination_kernel", DESTINATION_KERNEL),
                pin=getattr(args, "pin", None), cases=cases)
        if getattr(args, "json", False):
            print(json.dumps(report, indent=1))
        else:
            print(format_report(report))
            print(f"  results: {report['state']}")
        return 0 if passed(report) else 1
    except UsageError as err:
        print(f"harness.crosskernel: {err}", file=sys.stderr)
        return 2
    except KvhostError as err:
        print(f"harness.crosskernel: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
