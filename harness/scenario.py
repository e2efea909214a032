"""The single-host end-to-end scenario: real QEMU, kvhost-shim, kernel vhost-net, migration.

Used by the kernel-tier tests (``tests/test_kernel_qemu_shim.py``), the demo
(:mod:`harness.demo`) and the benchmark (``bench/bench_qemu.py``). Everything is real: Debian's
unmodified QEMU is the vhost-user frontend, ``kvhost-shim`` runs as its own process (the
program operators run), the rings run in the kernel's vhost-net, the guest driver is the
qtest driver of :mod:`harness.qemu` (modern, or :mod:`harness.qemu.legacy_pci` for versions
without VERSION_1, which QEMU only puts behind a legacy device).

:func:`run` is the whole story, in a fresh network namespace it creates and removes::

    probe -> manifest -> tap kvs0 + shim A (version V) -> QEMU A (vhost-user)
          -> guest driver to DRIVER_OK -> frames TX (seen on kvs0) and RX (sent on kvs0)
          -> tap kvs1 + shim B (pinned) -> QEMU B (-incoming) -> migrate, return-path on
          -> RARP on kvs1, driver continues on B, frames both ways through B's vhost-net
          -> ScenarioResult (with what each shim logged) -> teardown, always

The pieces (:class:`Rig`, :class:`ShimProcess`, :func:`capped_manifest`)
are public so tests can build the variants (failing migrations, native baselines).

What the shim did is read from its own log (``-v``): the SET_FEATURES values, every
GET/SET_VRING_BASE, the dirty log mapping and the RARP announcements (see
:meth:`ShimProcess.events`).

Capped hosts: a destination whose shim is pinned to a version serves nothing beyond it, so
its manifest (:func:`capped_manifest`) is the probe's with the offer intersected with the
cap -- features, queue limits and MTU -- and ``supported``/``latest`` recomputed from that
offer; the cap itself is recorded under ``"cap"``. ``kvhost compat`` then judges it like any
other host.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from harness import netns
from harness.qemu.legacy_pci import LegacyVirtioNet
from harness.qemu.machine import Machine, MachineConfig, MigrationResult, VhostUserBackend, migrate
from harness.qemu.virtio_pci import RX, TX, DriverState, VirtioNetDriver
from kvhost import features, manifest, versions
from kvhost.errors import KvhostError, UsageError
from kvhost.memory import GuestMemory
from kvhost.probe import probe
from kvhost.vhost_user.frontend import NetDevice, VhostUserFrontend

ETH_P_RARP = 0x8035
#: IEEE 802 local experimental ethertype: nothing else in the namespace sends it
TEST_ETHERTYPE = 0x88B5
GUEST_MAC = bytes.fromhex("525400aa0001")
PEER_MAC = bytes.fromhex("02000000beef")

#: QEMU 7.2's vhost-user ``user_feature_bits``: the device bits QEMU masks with the
#: backend's GET_FEATURES and the only bits it forwards in SET_FEATURES. Everything else
#: the device shows (MAC, STATUS, CTRL_*) is QEMU's own.
VHOST_USER_MASKED = features.mask(
    [
        "NOTIFY_ON_EMPTY", "INDIRECT_DESC", "EVENT_IDX", "ANY_LAYOUT", "VERSION_1",
        "CSUM", "GUEST_CSUM", "GSO", "GUEST_TSO4", "GUEST_TSO6", "GUEST_ECN", "GUEST_UFO",
        "HOST_TSO4", "HOST_TSO6", "HOST_ECN", "HOST_UFO", "MRG_RXBUF", "MTU",
        "ACCESS_PLATFORM", "RING_PACKED", "RING_RESET", "RSS", "HASH_REPORT",
        "GUEST_ANNOUNCE", "MQ",
    ]
)
#: legacy-only bits: a modern (VERSION_1) device hides them from the driver
LEGACY_ONLY = features.mask(["NOTIFY_ON_EMPTY", "ANY_LAYOUT"])
#: plumbing bits in SET_FEATURES that are not part of the interface
PLUMBING = features.PROTOCOL_FEATURES | features.LOG_ALL
VERSION_1 = features.mask(["VERSION_1"])
#: control-queue bits the qtest drivers accept when asked to take every version bit: MQ
#: needs CTRL_VQ; the driver never sets up the control queue, and QEMU never needs it
MQ_WITH_CTRL = features.mask(["MQ", "CTRL_VQ"])


class ScenarioError(KvhostError):
    """A scenario step failed; the message names the step and carries the logs."""


class ShimStartError(ScenarioError):
    """``kvhost-shim`` exited instead of listening; ``exit_status`` and its ``log``."""

    def __init__(self, message: str, *, exit_status: int | None, log: str) -> None:
        self.exit_status = exit_status
        self.log = log
        super().__init__(f"{message}\nshim log:\n{log.rstrip()}")


# --- frames and taps ------------------------------------------------------------------------


def frame(src: bytes, dst: bytes, tag: str) -> bytes:
    """A 60-byte test frame (ethertype 0x88b5) whose payload names ``tag`` uniquely."""
    payload = f"kvhost {tag} {os.urandom(4).hex()}".encode().ljust(46, b".")
    return dst + src + TEST_ETHERTYPE.to_bytes(2, "big") + payload


# --- the shim as a process ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProcUsage:
    """CPU time and context switches of one process (from /proc)."""

    cpu_seconds: float
    voluntary: int
    involuntary: int

    @classmethod
    def of(cls, pid: int) -> ProcUsage:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        cpu = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
        status = Path(f"/proc/{pid}/status").read_text()

        def count(key: str) -> int:
            match = re.search(rf"^{key}:\s+(\d+)", status, re.MULTILINE)
            return int(match.group(1)) if match else 0

        return cls(cpu, count("voluntary_ctxt_switches"), count("nonvoluntary_ctxt_switches"))

    def __sub__(self, other: ProcUsage) -> ProcUsage:
        return ProcUsage(self.cpu_seconds - other.cpu_seconds, self.voluntary - other.voluntary,
                         self.involuntary - other.involuntary)

    @property
    def switches(self) -> int:
        return self.voluntary + self.involuntary


@dataclass(frozen=True, slots=True)
class ShimEvent:
    """One thing the shim logged: ``kind`` is SET_FEATURES (value), GET_VRING_BASE /
    SET_VRING_BASE (ring, value), LOG_MAPPED (value = bytes) or RARP (text = MAC)."""

    kind: str
    value: int = 0
    ring: int = -1
    text: str = ""


_FEATURES = re.compile(r"(?:SET_FEATURES|features acked under interface version \S+:) "
                       r"0x([0-9a-f]+)")
_VRING_BASE = re.compile(r"((?:GET|SET)_VRING_BASE) vring (\d+) base (\d+)")
_LOG_MAPPED = re.compile(r"dirty log mapped \((\d+) bytes\)")
_RARP = re.compile(r"RARP announced for (\S+)")
_LISTENING = re.compile(r"listening on \S+, interface version (\S+)")
#: how :class:`ShimProcess` runs kvhost-shim: the installed package, with this interpreter
SHIM_PROGRAM = (sys.executable, "-m", "shim.cli")


class ShimProcess:
    """``kvhost-shim`` as a child process, logging (``-v``) to ``log_path``.

    :meth:`start` returns once the socket listens and the shim logged so; ShimStartError
    (exit status and log) if the shim exits first. :meth:`stop` sends SIGTERM and returns
    the exit status.

    ``program`` is the command before the shim's options (default :data:`SHIM_PROGRAM`,
    ``python -m shim.cli``); a diagnostic wrapper around the same program (the benchmark's
    traced shim) takes its place there and gets the same options.
    """

    def __init__(self, socket_path: str, log_path: Path, *, version: str | None = None,
                 tap: str | None = None, verbose: bool = True, name: str = "shim",
                 program: Sequence[str] = SHIM_PROGRAM) -> None:
        self.socket_path = socket_path
        self.log_path = log_path
        self.version = version
        self.tap = tap
        self.name = name
        self.argv = [*program, "--socket-path", socket_path]
        if version is not None:
            self.argv += ["--interface-version", version]
        if tap is not None:
            self.argv += ["--tap", tap]
        if verbose:
            self.argv.append("-v")
        self._proc: subprocess.Popen[bytes] | None = None
        self.exit_status: int | None = None

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise UsageError(f"{self.name}: not started")
        return self._proc.pid

    def start(self, timeout: float = 120.0) -> ShimProcess:
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=log, close_fds=True)
        deadline = time.monotonic() + timeout
        while True:
            status = self._proc.poll()
            if status is not None:
                self.exit_status = status
                raise ShimStartError(f"{self.name}: kvhost-shim exited with status {status} "
                                     f"before listening ({' '.join(self.argv[1:])})",
                                     exit_status=status, log=self.log_text())
            # ready = the socket exists and the shim said so (its log line follows the bind)
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.stat(self.socket_path).st_mode) and self.served_version():
                    return self
            if time.monotonic() > deadline:
                self.kill()
                raise ShimStartError(f"{self.name}: not listening after {timeout} s",
                                     exit_status=None, log=self.log_text())
            time.sleep(0.02)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def usage(self) -> ProcUsage:
        return ProcUsage.of(self.pid)

    def events(self) -> list[ShimEvent]:
        """What the shim logged, in order (see :class:`ShimEvent`)."""
        out: list[ShimEvent] = []
        for line in self.log_text().splitlines():
            if m := _VRING_BASE.search(line):
                out.append(ShimEvent(m.group(1), int(m.group(3)), int(m.group(2))))
            elif m := _FEATURES.search(line):
                out.append(ShimEvent("SET_FEATURES", int(m.group(1), 16)))
            elif m := _LOG_MAPPED.search(line):
                out.append(ShimEvent("LOG_MAPPED", int(m.group(1))))
            elif m := _RARP.search(line):
                out.append(ShimEvent("RARP", text=m.group(1)))
        return out

    def acked_features(self) -> list[int]:
        """Every SET_FEATURES value the shim logged (the first one at least is always
        logged; with ``-v`` all of them)."""
        seen: list[int] = []
        for e in self.events():
            if e.kind == "SET_FEATURES" and (not seen or seen[-1] != e.value):
                seen.append(e.value)
        return seen

    def ring_bases(self, kind: str) -> list[tuple[int, int]]:
        """(ring, base) of every ``GET_VRING_BASE`` or ``SET_VRING_BASE`` logged."""
        return [(e.ring, e.value) for e in self.events() if e.kind == kind]

    def served_version(self) -> str | None:
        m = _LISTENING.search(self.log_text())
        return m.group(1) if m else None

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, wait (SIGKILL after ``timeout``); the exit status."""
        if self._proc is None:
            return 0
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self.exit_status = self._proc.returncode
        return self.exit_status

    def wait_quiet(self, interval: float = 0.5, timeout: float = 60.0) -> ProcUsage:
        """Wait until the shim sleeps (no context switch for ``interval`` s): QEMU sends the
        tail of a ring start without waiting for replies, so the shim may still be working
        on it when DRIVER_OK returns. Returns the usage at that point."""
        deadline = time.monotonic() + timeout
        last = self.usage()
        while True:
            time.sleep(interval)
            now = self.usage()
            if (now - last).switches == 0 or time.monotonic() > deadline:
                return now
            last = now

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        if self._proc is not None:
            self.exit_status = self._proc.returncode


def start_shim_expecting_failure(version: str, workdir: Path,
                                 timeout: float = 120.0) -> tuple[int, str]:
    """Run ``kvhost-shim --interface-version version`` and return (exit status, log) when it
    exits; ScenarioError if it starts listening instead."""
    shim = ShimProcess(str(workdir / "refused.sock"), workdir / "refused.log", version=version,
                       tap="kvnone", name="refused shim")
    try:
        shim.start(timeout)
    except ShimStartError as err:
        if err.exit_status is None:
            raise
        return err.exit_status, err.log
    shim.stop()
    raise ScenarioError(f"kvhost-shim accepted interface version {version} on this host")


# --- what a process holds (fault and load tests) --------------------------------------------


@dataclass(frozen=True, slots=True)
class Footprint:
    """What process ``pid`` holds, read from /proc: open fds (all, ``/dev/vhost-net``,
    ``/dev/net/tun``, sockets), mappings (all, memfd-backed: guest memory and dirty logs),
    ``VmRSS`` and the resident bytes of every mapping that is not memfd-backed (smaps)."""

    fds: int
    vhost_fds: int
    tun_fds: int
    sockets: int
    mappings: int
    memfd_mappings: int
    rss: int
    rss_without_memfd: int

    @classmethod
    def of(cls, pid: int) -> Footprint:
        links = _fd_links(pid)
        maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
        rss_kib = 0
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss_kib = int(line.split()[1])
        return cls(
            fds=len(links),
            vhost_fds=sum(t == "/dev/vhost-net" for t in links.values()),
            tun_fds=sum(t == "/dev/net/tun" for t in links.values()),
            sockets=sum(t.startswith("socket:") for t in links.values()),
            mappings=len(maps),
            memfd_mappings=sum("/memfd:" in line for line in maps),
            rss=rss_kib * 1024,
            rss_without_memfd=smaps_rss(Path(f"/proc/{pid}/smaps").read_text()),
        )

    def counts(self) -> tuple[int, int, int, int, int]:
        """(fds, vhost fds, tun fds, sockets, memfd mappings): what must return exactly."""
        return self.fds, self.vhost_fds, self.tun_fds, self.sockets, self.memfd_mappings

    def describe(self) -> str:
        return (f"{self.fds} fds ({self.vhost_fds} vhost-net, {self.tun_fds} tun, "
                f"{self.sockets} sockets), {self.mappings} mappings ({self.memfd_mappings} "
                f"memfd), VmRSS {self.rss / 2**20:.2f} MiB, without memfd "
                f"{self.rss_without_memfd / 2**20:.2f} MiB")


def smaps_rss(text: str) -> int:
    """Resident bytes of every mapping in ``/proc/<pid>/smaps`` text that is not backed
    by a memfd (guest memory is the frontend's, mapped by the shim, touched by vhost)."""
    total = 0
    memfd = False
    for line in text.splitlines():
        head = line.split(maxsplit=1)[0] if line.strip() else ""
        if head.endswith(":"):
            if head == "Rss:" and not memfd:
                total += int(line.split()[1]) * 1024
        elif "-" in head:
            memfd = "/memfd:" in line
    return total


def _fd_links(pid: int) -> dict[int, str]:
    out: dict[int, str] = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed while listing
            out[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
    return out


def tap_names(pid: int) -> list[str]:
    """The tap interface of every ``/dev/net/tun`` fd process ``pid`` holds (fdinfo's
    ``iff:`` line), in fd order; a tun fd not attached to an interface is left out."""
    names: list[str] = []
    for fd, target in sorted(_fd_links(pid).items()):
        if target != "/dev/net/tun":
            continue
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
                if line.startswith("iff:"):
                    names.append(line.split()[1])
    return names


def wait_footprint(pid: int, check: Callable[[Footprint], bool], timeout: float = 30.0,
                   what: str = "footprint") -> Footprint:
    """Poll :meth:`Footprint.of` until ``check`` holds; ScenarioError (with the last
    footprint) after ``timeout`` s. Closing a vhost-net fd takes 30-40 ms under TCG, so a
    connection's devices disappear a while after its socket."""
    deadline = time.monotonic() + timeout
    while True:
        now = Footprint.of(pid)
        if check(now):
            return now
        if time.monotonic() > deadline:
            fds = ", ".join(f"{fd}:{target}" for fd, target in sorted(_fd_links(pid).items()))
            raise ScenarioError(f"process {pid}: {what} not reached in {timeout} s; it holds "
                                f"{now.describe()}; fds {fds}")
        time.sleep(0.02)


# --- versions, manifests, drivers -----------------------------------------------------------


def is_legacy(version: versions.InterfaceVersion) -> bool:
    """True for versions without VERSION_1: QEMU serves them only through a legacy device."""
    return not version.features & VERSION_1


def device_properties_for(version: versions.InterfaceVersion) -> dict[str, str]:
    """Device properties that let QEMU's device show every bit the backend may offer:
    ``mq`` and ``host_mtu`` are opt-in device features in QEMU (off by default)."""
    props = {"mac": GUEST_MAC.hex(":")}
    if version.features & features.mask(["MQ"]):
        props["mq"] = "on"
    if version.mtu:
        props["host_mtu"] = "1500"
    return props


def expected_device_bits(version: versions.InterfaceVersion) -> int:
    """The backend-masked bits a device shows (and QEMU acks) for ``version`` served through
    vhost-user: the version's bits, minus the legacy-only ones behind a modern device."""
    bits = versions.serve_features(version) & VHOST_USER_MASKED
    return bits if is_legacy(version) else bits & ~LEGACY_ONLY


def driver_for(machine: Machine, legacy: bool) -> VirtioNetDriver:
    """The qtest guest driver of ``machine``'s device (legacy or modern)."""
    if legacy:
        return LegacyVirtioNet.probe(machine.qtest)
    return VirtioNetDriver.probe(machine.qtest)


def attach_driver(machine: Machine, state: DriverState, legacy: bool) -> VirtioNetDriver:
    if legacy:
        return LegacyVirtioNet.attach(machine.qtest, state)
    return VirtioNetDriver.attach(machine.qtest, state)


def every_version_bit(drv: VirtioNetDriver) -> int:
    """Driver features taking every offered bit a version may hold (MQ included, with the
    CTRL_VQ it requires), nothing of the rest of QEMU's control features."""
    offered = drv.read_device_features()
    return offered & (VHOST_USER_MASKED | MQ_WITH_CTRL) & ~features.mask(
        ["GUEST_ANNOUNCE", "RING_PACKED", "ACCESS_PLATFORM", "RSS", "HASH_REPORT"])


def capped_offer(offer: versions.Offer, cap: versions.InterfaceVersion) -> versions.Offer:
    """What a host serves when its shim is pinned to ``cap``: nothing beyond it."""
    return versions.Offer(
        offer.features & cap.features,
        min(offer.max_queue_size, cap.max_queue_size),
        min(offer.max_queue_pairs, cap.max_queue_pairs),
        offer.mtu and cap.mtu,
        offer.unservable,
        offer.problems,
    )


def capped_manifest(host: dict[str, Any], cap: versions.InterfaceVersion) -> dict[str, Any]:
    """``host``'s manifest (as :func:`kvhost.manifest.build` made it) for a host whose shim
    is pinned to ``cap`` (see the module docstring). ManifestError if nothing is left."""
    loaded = manifest.load(host)
    offer = capped_offer(loaded.offer, cap)
    ok = versions.supported(offer)
    if not ok:
        raise manifest.ManifestError(
            f"a host capped at {cap.label} serves no registry version: "
            f"{'; '.join(versions.missing(versions.registry()[0], offer))}")
    out = dict(host)
    out.update(latest=ok[-1].label, supported=[v.label for v in ok],
               versions={v.label: v.spec() for v in ok}, offer=offer.to_json(), cap=cap.spec())
    manifest.load(out)  # the result must read back like any manifest
    return out


def kvhost_compat(*paths: Path) -> tuple[int, dict[str, Any]]:
    """Run the real ``kvhost compat --json`` on manifest files: (exit status, its JSON)."""
    run = subprocess.run([sys.executable, "-m", "kvhost.cli", "compat", "--json",
                          *map(str, paths)], capture_output=True, text=True, check=False)
    try:
        return run.returncode, json.loads(run.stdout)
    except json.JSONDecodeError as err:
        raise ScenarioError(f"kvhost compat printed no JSON ({err}): {run.stdout!r} "
                            f"{run.stderr!r}") from None


# --- the rig --------------------------------------------------------------------------------


class Rig:
    """Shims, taps, QEMUs and packet sockets of one scenario; everything is torn down on
    exit (QEMUs killed, shims stopped, sockets closed), whatever happened.

    The caller must already be in a network namespace of its own (:func:`harness.netns.fresh`,
    or the tests' ``netns`` fixture).
    """

    def __init__(self, workdir: Path | None = None) -> None:
        self._stack = ExitStack()
        if workdir is None:
            workdir = Path(self._stack.enter_context(
                tempfile.TemporaryDirectory(prefix="kvscen-", dir=_scratch_dir())))
        self.workdir = workdir
        self.shims: list[ShimProcess] = []
        self.machines: list[Machine] = []

    def __enter__(self) -> Rig:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()

    def port(self, tap: str) -> netns.TapPort:
        """Create tap ``tap`` (up) and bind a packet socket to it."""
        netns.create_tap(tap)
        port = netns.TapPort(tap)
        self._stack.callback(port.close)
        return port

    def shim(self, name: str, tap: str | None, version: str | None, *,
             socket_path: str | None = None, verbose: bool = True,
             timeout: float = 120.0, program: Sequence[str] = SHIM_PROGRAM) -> ShimProcess:
        """Start a shim (``program``, see :class:`ShimProcess`) on the existing ``tap``
        (None: the shim creates a tap per connection) serving ``version`` (None: the
        host's latest, unpinned), listening on ``socket_path`` (default: ``<name>.sock`` in
        the work directory); ShimStartError if it does not listen within ``timeout`` s."""
        path = socket_path or str(self.workdir / f"{name}.sock")
        shim = ShimProcess(path, self.workdir / f"{name}.log", version=version, tap=tap,
                           name=name, verbose=verbose, program=program)
        self._stack.callback(shim.kill)
        self._stack.callback(shim.stop)
        self.shims.append(shim)
        return shim.start(timeout)

    def qemu(self, name: str, shim: ShimProcess, *, legacy: bool,
             properties: dict[str, str] | None = None, incoming: str | None = None) -> Machine:
        """Start QEMU with its vhost-user netdev on ``shim``'s socket."""
        config = MachineConfig(
            backend=VhostUserBackend(shim.socket_path),
            device_properties=properties or {"mac": GUEST_MAC.hex(":")},
            incoming=incoming, legacy=legacy,
        )
        return self.machine(name, config)

    def machine(self, name: str, config: MachineConfig, timeout: float = 180.0) -> Machine:
        """Start QEMU; ``timeout`` is generous because a loaded TCG machine is slow."""
        machine = Machine(config, name=name)
        self._stack.callback(machine.kill)
        self.machines.append(machine)
        return machine.start(timeout=timeout)

    def diagnostics(self) -> str:
        """Every shim log and QEMU stderr so far, for error messages."""
        parts = []
        for shim in self.shims:
            parts.append(f"--- {shim.name} log ---\n{shim.log_text().rstrip()}")
        for machine in self.machines:
            parts.append(f"--- {machine.name} stderr (exit {machine.exit_status}) ---\n"
                         f"{machine.stderr_text().rstrip()}")
        return "\n".join(parts)

    def migration_uri(self) -> str:
        return f"unix:{self.workdir / 'migrate.sock'}"


def _scratch_dir() -> str | None:
    # the test VM's /tmp is a small overlay; /run is tmpfs there and on most hosts
    return "/run" if os.access("/run", os.W_OK) else None


def exchange(drv: VirtioNetDriver, port: netns.TapPort, count: int, tag: str) -> tuple[int, int]:
    """``count`` frames guest -> tap and ``count`` tap -> guest; each is checked byte for
    byte. Returns (sent, received). ScenarioError when one is lost."""
    for i in range(count):
        out = frame(GUEST_MAC, PEER_MAC, f"{tag}-tx{i}")
        drv.send(out)
        port.expect(out)
        drv.wait_used(TX, 1)
        drv.pop_used(TX)
    received = 0
    for i in range(count):
        into = frame(PEER_MAC, GUEST_MAC, f"{tag}-rx{i}")
        port.send(into)
        receive_exact(drv, into)
        received += 1
    return count, received


def receive_exact(drv: VirtioNetDriver, wanted: bytes, timeout: float = 10.0) -> None:
    """Wait until ``wanted`` lands in the RX ring (other frames are skipped)."""
    deadline = time.monotonic() + timeout
    got: list[bytes] = []
    while time.monotonic() < deadline:
        got += drv.receive(timeout=max(0.1, deadline - time.monotonic()))
        if wanted in got:
            return
    raise ScenarioError(f"frame not in the RX ring; got ethertypes "
                        f"{[g[12:14].hex() for g in got]}")


# --- many Python frontends at once (load tests, bench/bench_load.py) ------------------------

#: one frontend's guest memory: a QEMU-like low region, then room for two 256-entry rings
#: and their 2 KiB buffers
LOAD_MEMORY = [(0, 0xC0000), (0x100000, 2 << 20)]
LOAD_BASE_GPA = 0x100000
#: issue 6's target for the shim's memory per connection, guest memory excluded
RSS_PER_CONNECTION = 4 << 20
#: fds per load frontend: socket, 2 memfds, 4 eventfds; the shim: socket, vhost-net, tun
FDS_PER_FRONTEND = 8
_SO_RCVBUFFORCE = 33
_SOL_PACKET = 263
_PACKET_STATISTICS = 6


def raise_nofile(frontends: int) -> None:
    """Soft RLIMIT_NOFILE of this process (and of the shim it starts, which inherits it) at
    least enough for ``frontends`` load frontends (:data:`FDS_PER_FRONTEND` each) plus 1024
    to spare. Raises ValueError (from setrlimit) when the hard limit is lower and this
    process may not raise it."""
    need = 1024 + FDS_PER_FRONTEND * frontends
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, max(hard, need)))


def load_mac(index: int) -> bytes:
    """The source MAC of load frontend ``index`` (locally administered, unique)."""
    return bytes([0x02, 0x4B, 0x56]) + index.to_bytes(3, "big")


@dataclass
class LoadFrontend:
    """One Python frontend of a connect storm: its guest memory, connection and device,
    the time from connect to rings started, the tap its frames came out of, or why it
    failed."""

    index: int
    memory: GuestMemory
    frontend: VhostUserFrontend | None = None
    device: NetDevice | None = None
    start_seconds: float = 0.0
    tap: str | None = None
    error: str | None = None

    def start(self, path: str, timeout: float) -> None:
        begin = time.perf_counter()
        try:
            # connect() waits out a full listen backlog as QEMU does: a storm must not fail
            # where QEMU would wait
            self.frontend = VhostUserFrontend(path, timeout=timeout)
            self.frontend.connect()
            self.frontend.handshake()
            self.device = self.frontend.start_net(self.memory, base_gpa=LOAD_BASE_GPA)
        except (KvhostError, OSError) as err:
            self.error = f"frontend {self.index}: {err}"
            return
        self.start_seconds = time.perf_counter() - begin

    def close(self) -> None:
        if self.frontend is not None:
            self.frontend.close()
        self.memory.close()


def connect_storm(path: str, count: int, *, first_index: int = 0, timeout: float = 300.0,
                  ready: Callable[[], object] | None = None) -> list[LoadFrontend]:
    """``count`` frontends (numbered from ``first_index``), one thread each, released
    together once all are set up and ``ready()`` (e.g. a barrier shared with other
    processes) returned: each connects, does QEMU's handshake (SET_OWNER included) and
    starts one queue pair. Returns them all, failed ones with ``error`` set; the caller
    closes them (:func:`close_all`)."""
    fronts = [LoadFrontend(i, GuestMemory.create(LOAD_MEMORY, name=f"load-{i}"))
              for i in range(first_index, first_index + count)]
    gate = threading.Barrier(count + 1)

    def run(front: LoadFrontend) -> None:
        gate.wait()
        front.start(path, timeout)

    threads = [threading.Thread(target=run, args=(f,), name=f"load-{f.index}") for f in fronts]
    for t in threads:
        t.start()
    if ready is not None:
        ready()
    gate.wait()
    for t in threads:
        t.join()
    return fronts


def close_all(fronts: list[LoadFrontend]) -> None:
    for front in fronts:
        front.close()


def load_traffic(fronts: list[LoadFrontend], frames: int = 2,
                 timeout: float = 30.0) -> tuple[int, int]:
    """Every started frontend sends ``frames`` frames (source MAC :func:`load_mac`); each
    must come out of one tap, the same for all of them and no other frontend's; then as
    many frames sent into that tap must land in that frontend's RX ring, byte for byte.
    Sets each ``tap``; returns (frames out, frames in). ScenarioError naming the frontend
    on a lost, misrouted or altered frame."""
    sniff = socket.socket(socket.AF_PACKET, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                          socket.htons(netns.ETH_P_ALL))
    try:
        # every frame of every tap in the namespace lands here: net.core.rmem_max (208 KiB
        # by default, ~300 small frames) would drop some, so force the size (root)
        try:
            sniff.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, 32 << 20)
        except PermissionError:
            sniff.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 20)
        owner: dict[bytes, LoadFrontend] = {}
        for front in fronts:
            assert front.device is not None, front.error
            out = [frame(load_mac(front.index), PEER_MAC, f"l{front.index}t{k}")
                   for k in range(frames)]
            for f in out:
                owner[f] = front
            if front.device.send(out) != len(out):
                raise ScenarioError(f"frontend {front.index}: TX ring full")
        deadline = time.monotonic() + timeout
        while owner and time.monotonic() < deadline:
            sniff.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data, addr = sniff.recvfrom(65536)
            except TimeoutError:
                break
            sender = owner.pop(data, None) if addr[2] != netns.PACKET_OUTGOING else None
            if sender is None:
                continue
            if sender.tap not in (None, addr[0]):
                raise ScenarioError(f"frontend {sender.index}: frames came out of both "
                                    f"{sender.tap} and {addr[0]}")
            sender.tap = addr[0]
        if owner:
            lost = sorted({f.index for f in owner.values()})
            _, drops = struct.unpack("=II", sniff.getsockopt(_SOL_PACKET, _PACKET_STATISTICS, 8))
            raise ScenarioError(f"{len(owner)} TX frames of frontends {lost[:10]} never came "
                                f"out of a tap (the capture socket dropped {drops} frames)")
        taps = [f.tap for f in fronts]
        if len(set(taps)) != len(taps):
            raise ScenarioError("two frontends' frames came out of the same tap")
        sent_in = 0
        for front in fronts:
            assert front.device is not None and front.tap is not None
            into = [frame(PEER_MAC, GUEST_MAC, f"l{front.index}r{k}") for k in range(frames)]
            for f in into:
                sniff.sendto(f, (front.tap, 0))
            got: list[bytes] = []
            until = time.monotonic() + timeout
            while len(got) < len(into) and time.monotonic() < until:
                got += [g for g in front.device.receive(0, timeout=0.5)
                        if g[12:14] == TEST_ETHERTYPE.to_bytes(2, "big")]
            if sorted(got) != sorted(into):
                raise ScenarioError(f"frontend {front.index} (tap {front.tap}): RX got "
                                    f"{len(got)} test frames, {len(set(got) & set(into))} of "
                                    f"the {len(into)} sent into its tap")
            sent_in += len(into)
        return frames * len(fronts), sent_in
    finally:
        sniff.close()


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile ``q`` (0-100) of ``values``."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


# --- the whole story ------------------------------------------------------------------------


@dataclass
class ScenarioResult:
    """Everything the demo's report and the tests need from one :func:`run`."""

    kernel: str
    supported: list[str]
    latest: str
    served: str
    destination_served: str
    legacy: bool
    device_features: int
    negotiated: int
    driver_ok_ms: float
    frames_sent: int
    frames_received: int
    traffic_shim_usage: ProcUsage
    migration: MigrationResult
    destination_state: str
    rarp_seen: bool
    frames_after_migration: int
    source_get_bases: list[tuple[int, int]]
    destination_set_bases: list[tuple[int, int]]
    source_acked: list[int]
    log_mapped: bool
    source_exit: int
    destination_exit: int
    shim_exits: list[int]
    driver_tx_used: int
    manifest_json: str
    logs: dict[str, str] = field(default_factory=dict)

    @property
    def negotiated_names(self) -> list[str]:
        return features.names(self.negotiated & ~PLUMBING)

    @property
    def log_all(self) -> bool:
        return any(f & features.LOG_ALL for f in self.source_acked)


Progress = Callable[[str], None]


def run(*, version: str | None = None, destination_version: str | None = None,
        frames: int = 8, workdir: Path | None = None,
        progress: Progress | None = None) -> ScenarioResult:
    """The whole single-host story (module docstring) in a fresh network namespace.

    ``version``: what shim A serves (None: the host's latest); ``destination_version``:
    shim B's pin (None: the same as A's). Raises ScenarioError (or QemuError) naming the
    step that failed; everything started is torn down in every case.
    """
    say = progress or (lambda text: None)
    with netns.fresh("kvscen"), Rig(workdir) as rig:
        try:
            return _run(rig, say, version, destination_version, frames)
        except (KvhostError, OSError) as err:
            raise ScenarioError(f"{err}\n{rig.diagnostics()}") from err


def _run(rig: Rig, say: Progress, version: str | None, destination_version: str | None,
         frames: int) -> ScenarioResult:
    say("probing the kernel")
    host = probe()
    offer = versions.host_offer(host)
    supported = versions.supported(offer)
    latest = versions.latest(offer)
    chosen = versions.parse(version) if version else latest
    dest = versions.parse(destination_version) if destination_version else chosen
    legacy = is_legacy(chosen)
    if is_legacy(dest) != legacy:
        raise UsageError(f"{chosen.label} and {dest.label} need different device types "
                         "(one has VERSION_1, the other not): no migration possible")
    built = manifest.build(host)
    manifest_path = rig.workdir / "manifest.json"
    manifest.write_atomic(manifest_path, manifest.encode(built))
    say(f"manifest written: latest {built['latest']}")

    src_port = rig.port("kvs0")
    dst_port = rig.port("kvs1")
    say(f"starting kvhost-shim A at {chosen.label}")
    shim_a = rig.shim("shim-a", "kvs0", chosen.spec() if chosen.name is None
                      else chosen.label)
    props = device_properties_for(chosen)
    say("starting QEMU A (vhost-user -> shim A)")
    src = rig.qemu("qemu-a", shim_a, legacy=legacy, properties=props)
    drv = driver_for(src, legacy)
    device_features = drv.read_device_features()
    driver_ok = drv.start()
    say(f"guest driver at DRIVER_OK ({driver_ok * 1e3:.1f} ms round trip)")

    before = shim_a.wait_quiet()
    sent, received = exchange(drv, src_port, frames, "a")
    traffic_usage = shim_a.usage() - before
    say(f"{sent} frames out and {received} in through kernel vhost-net")

    say(f"starting kvhost-shim B pinned to {dest.label} and QEMU B (-incoming)")
    shim_b = rig.shim("shim-b", "kvs1", dest.spec() if dest.name is None else dest.label)
    dst = rig.qemu("qemu-b", shim_b, legacy=legacy, properties=props,
                   incoming=rig.migration_uri())
    say("live-migrating A -> B (return-path on)")
    result = migrate(src, rig.migration_uri(), destination=dst)
    if result.status != "completed":
        raise ScenarioError(f"migration {result.status}: {result.error}\n"
                            f"destination stderr: {dst.stderr_text()}")
    state = dst.wait_incoming(timeout=30)
    rarp, _ = dst_port.expect(ETH_P_RARP)
    moved = attach_driver(dst, DriverState.from_json(drv.save_state()), legacy)
    after_sent, after_received = exchange(moved, dst_port, 1, "b")
    tx_used = moved.used_idx(TX)
    say(f"migration {result.status}: total {result.total_ms} ms, downtime "
        f"{result.downtime_ms} ms; traffic continues on B")

    dest_exit = dst.stop()
    src_exit = src.stop()
    shim_exits = [shim_a.stop(), shim_b.stop()]
    acked = shim_a.acked_features()
    return ScenarioResult(
        kernel=host.kernel_release,
        supported=[v.label for v in supported],
        latest=latest.label,
        served=shim_a.served_version() or chosen.label,
        destination_served=shim_b.served_version() or dest.label,
        legacy=legacy,
        device_features=device_features,
        negotiated=acked[0] if acked else 0,
        driver_ok_ms=driver_ok * 1e3,
        frames_sent=sent,
        frames_received=received,
        traffic_shim_usage=traffic_usage,
        migration=result,
        destination_state=state,
        rarp_seen=rarp[6:12] == GUEST_MAC,
        frames_after_migration=after_sent + after_received,
        source_get_bases=shim_a.ring_bases("GET_VRING_BASE"),
        destination_set_bases=shim_b.ring_bases("SET_VRING_BASE"),
        source_acked=acked,
        log_mapped=any(e.kind == "LOG_MAPPED" for e in shim_a.events()),
        source_exit=src_exit,
        destination_exit=dest_exit,
        shim_exits=shim_exits,
        driver_tx_used=tx_used,
        manifest_json=manifest_path.read_text(),
        logs={"shim-a": shim_a.log_text(), "shim-b": shim_b.log_text(),
              "qemu-a": src.stderr_text(), "qemu-b": dst.stderr_text()},
    )


def last_per_ring(bases: list[tuple[int, int]]) -> dict[int, int]:
    """The last base logged for each ring."""
    return {ring: base for ring, base in bases}


def first_per_ring(bases: list[tuple[int, int]]) -> dict[int, int]:
    """The first base logged for each ring."""
    out: dict[int, int] = {}
    for ring, base in bases:
        out.setdefault(ring, base)
    return out


__all__ = [
    "RX",
    "TX",
    "ProcUsage",
    "Rig",
    "ScenarioResult",
    "ShimProcess",
    "capped_manifest",
    "capped_offer",
    "exchange",
    "frame",
    "kvhost_compat",
    "run",
]
