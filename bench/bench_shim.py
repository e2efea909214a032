"""Benchmarks of kvhost-shim, run inside the test VM (needs /dev/vhost-net and root).

    python -m harness.testvm -- python3 bench/bench_shim.py [--frames N] [--trials K]

Every number is a ratio measured side by side in one run, so the (slow, TCG) machine cancels
out:

* datapath: TX frames/s through kernel vhost-net set up by a ``kvhost-shim`` process (driven
  by kvhost's vhost-user frontend) / frames/s through kernel vhost-net set up directly with
  kvhost's ioctls; the same ring code pushes the frames in both cases (target >= 0.99);
* the shim's context switches while 100,000 frames pass (target <= 10: it is off the
  datapath, asleep in select);
* control path: the shim's time from the first SET_FEATURES to the last ring started (bytes
  in, replies out, through Session and KernelBackend) / the same ioctls issued bare
  (target <= 2); stop: GET_VRING_BASE for both rings, message in -> reply out (<= 1 ms);
* memory: the shim process's RSS per connected VM, guest memory mappings excluded (<= 4 MiB).

``--profile`` adds, after the measured runs, instrumented rounds that say where the control
path's time goes: per request, the time inside the kernel's ioctls (timed around each
``fcntl.ioctl`` call) against everything else the shim does in Python, the same split for
the bare ioctls, and a cProfile of the shim's side. Instrumentation adds its own cost, so
those rounds are reported separately and never feed the targets.

Prints one line per measurement and a summary; exits 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import cProfile
import fcntl
import functools
import os
import pstats
import statistics
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from harness import netns  # noqa: E402
from harness.load import RSS_PER_CONNECTION  # noqa: E402
from harness.procfs import Footprint  # noqa: E402
from harness.shim_process import ShimProcess  # noqa: E402
from kvhost import features, versions  # noqa: E402
from kvhost import ioctl as kv_ioctl  # noqa: E402
from kvhost.memory import GuestMemory  # noqa: E402
from kvhost.tap import Tap, vnet_hdr_len  # noqa: E402
from kvhost.vhost import VhostNet, VringConfig  # noqa: E402
from kvhost.vhost_user import protocol as p  # noqa: E402
from kvhost.vhost_user.frontend import VhostUserFrontend  # noqa: E402
from kvhost.vhost_user.protocol import Request as R  # noqa: E402
from kvhost.virtqueue import SplitRing  # noqa: E402
from shim.closer import CLOSER  # noqa: E402
from shim.kernel_backend import KernelBackend  # noqa: E402
from shim.session import Session  # noqa: E402
from shim.tap_setup import TapSpec  # noqa: E402

MEMORY = [(0, 0xC0000), (0x100000, 32 << 20)]
BASE = 0x100000
RING = 256
FRAME = b"\x02\x00\x00\x00\x00\x01\x02\x00\x00\x00\x00\x02\x88\xb5" + bytes(50)
BUF = 2048
BATCH = 64
_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
#: the driver's wanted features: what QEMU 7.2 would take of v5
WANT = features.mask(["VERSION_1", "MRG_RXBUF", "EVENT_IDX", "CSUM", "GUEST_CSUM"])


# --- one TX blaster for both setups -------------------------------------------------------


def blast(mem: GuestMemory, ring: SplitRing, kick_fd: int, buf_gpa: int, total: int) -> float:
    """Push ``total`` frames through ``ring``, BATCH per kick; returns frames/s.

    The descriptor table and the avail ring are written once (slot i -> descriptor i ->
    buffer i); after that the driver only advances avail.idx and reads used.idx, so the
    kernel, not this Python loop, is what gets measured.
    """
    hdr = 12
    length = hdr + len(FRAME)
    for i in range(ring.size):
        mem.write(buf_gpa + i * BUF, bytes(hdr) + FRAME)
        mem.write(ring.desc_gpa + 16 * i, _DESC.pack(buf_gpa + i * BUF, length, 0, 0))
        mem.write(ring.avail_gpa + 4 + 2 * i, _U16.pack(i))
    avail_idx_gpa, used_idx_gpa = ring.avail_gpa + 2, ring.used_gpa + 2
    avail = _U16.unpack(mem.read(avail_idx_gpa, 2))[0]
    sent = 0
    t0 = time.perf_counter()
    while True:
        used = _U16.unpack(mem.read(used_idx_gpa, 2))[0]
        if sent >= total and used == avail:
            break
        n = min(BATCH, ring.size - ((avail - used) & 0xFFFF), total - sent)
        if n > 0:
            avail = (avail + n) & 0xFFFF
            mem.write(avail_idx_gpa, _U16.pack(avail))
            os.eventfd_write(kick_fd, 1)
            sent += n
        else:
            os.sched_yield()
    return total / (time.perf_counter() - t0)


# --- the shim as its own process ------------------------------------------------------------


V5 = "org.kernel.vhost-net.v5"


def start_shim(sock: str) -> ShimProcess:
    """``kvhost-shim`` serving v5, a tap created per connection, logging at INFO to
    ``SOCK.log``."""
    shim = ShimProcess(sock, Path(sock + ".log"), version=V5, verbose=False)
    # Python + imports start-up on a loaded TCG VM
    return shim.start(timeout=600)


def switches(shim: ShimProcess) -> int:
    """Voluntary + involuntary context switches of every thread of the shim that is not
    a vhost worker (since 6.4 those are threads of the owner)."""
    total = 0
    for task in Path(f"/proc/{shim.pid}/task").iterdir():
        text = (task / "status").read_text()
        name = text.splitlines()[0].split()[1]
        if name.startswith("vhost-"):
            continue
        for line in text.splitlines():
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                total += int(line.split()[1])
    return total


def stop_shim(shim: ShimProcess) -> None:
    status = shim.stop(timeout=60)
    if status != 0:
        raise RuntimeError(f"kvhost-shim exited {status}: {shim.log_text()}")


def shim_datapath(shim: ShimProcess, frames: int) -> tuple[float, int]:
    with GuestMemory.create(MEMORY) as mem, VhostUserFrontend(shim.socket_path, timeout=60) as fe:
        fe.handshake()
        dev = fe.start_net(mem, base_gpa=BASE, features=WANT)
        ring = dev.tx_ring(0)
        buf = BASE + (16 << 20)
        blast(mem, ring, dev.kick_fds[1], buf, 2 * BATCH)  # warm up
        before = switches(shim)
        rate = blast(mem, ring, dev.kick_fds[1], buf, frames)
        switched = switches(shim) - before
        fe.stop(dev)
    return rate, switched


# --- bare kvhost ----------------------------------------------------------------------------


class Bare:
    """vhost-net set up with kvhost's ioctls directly, the way the shim would."""

    def __init__(self, mem: GuestMemory, tap: Tap) -> None:
        self.mem = mem
        self.tap = tap
        self.dev = VhostNet()
        self.dev.set_owner()
        self.rings = [SplitRing(mem, i, RING, BASE + i * 0x2000) for i in range(2)]
        self.kicks = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(2)]
        self.calls = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(2)]

    def start(self) -> None:
        negotiated = WANT
        self.dev.set_features(negotiated & self.dev.get_features() & ~(1 << 27))
        self.tap.set_offload(features.tun_flags_for(negotiated))
        self.tap.set_vnet_hdr_size(vnet_hdr_len(negotiated))
        self.dev.set_mem_table(self.mem.regions)
        for r in self.rings:
            self.dev.set_vring_num(r.index, RING)
            self.dev.set_vring_base(r.index, 0)
            self.dev.set_vring_addr(
                r.index,
                VringConfig(
                    RING,
                    0,
                    self.mem.hva(r.desc_gpa),
                    self.mem.hva(r.used_gpa),
                    self.mem.hva(r.avail_gpa),
                    r.used_gpa,
                ),
            )
            self.dev.set_vring_kick(r.index, self.kicks[r.index])
            self.dev.set_vring_call(r.index, self.calls[r.index])
            self.dev.set_backend(r.index, self.tap.fds[0])

    def stop(self) -> None:
        for r in self.rings:
            self.dev.set_backend(r.index, -1)
            self.dev.get_vring_base(r.index)

    def close(self) -> None:
        self.dev.close()
        for fd in self.kicks + self.calls:
            os.close(fd)


def bare_datapath(frames: int) -> float:
    with GuestMemory.create(MEMORY) as mem, Tap.create() as tap:
        tap.set_sndbuf(0x7FFF_FFFF)
        tap.set_up()
        bare = Bare(mem, tap)
        try:
            bare.start()
            buf = BASE + (16 << 20)
            blast(mem, bare.rings[1], bare.kicks[1], buf, 2 * BATCH)
            rate = blast(mem, bare.rings[1], bare.kicks[1], buf, frames)
            bare.stop()
        finally:
            bare.close()
    return rate


# --- control path, in process ---------------------------------------------------------------


class Feeder:
    """Feeds wire bytes to a Session the way the server does (no socket)."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.codec = p.FrontendCodec()

    def send(
        self, request: R, payload: p.Payload = p.EMPTY, fds: list[int] | None = None
    ) -> list[bytes]:
        data, out = self.codec.request(request, payload, fds or [])
        replies = self.session.receive(data, out)
        for r in replies:
            self.codec.receive(r)
        if self.session.done:
            raise RuntimeError(f"shim session failed: {self.session.error}")
        return replies


class ShimRound:
    """One shim control-path round in process: a fresh Session + KernelBackend taken to
    SET_OWNER, and the wire bytes of the start sequence and of the stop, encoded in
    advance so that only the shim's own work is timed."""

    def __init__(self, mem: GuestMemory, v5: versions.InterfaceVersion) -> None:
        backend = KernelBackend(TapSpec(queues=1).open, 1, name="bench")
        self.session = Session(backend, v5, name="bench")
        f = Feeder(self.session)
        f.send(R.GET_FEATURES)
        f.send(R.SET_OWNER)
        rings = [SplitRing(mem, i, RING, BASE + i * 0x2000) for i in range(2)]
        table = p.MemTable(
            tuple(
                p.MemRegion(r.guest_phys_addr, r.memory_size, r.userspace_addr, 0)
                for r in mem.regions
            )
        )
        self.efds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(4)]
        msgs: list[tuple[R, p.Payload, list[int]]] = [
            (R.SET_FEATURES, p.U64(WANT | features.PROTOCOL_FEATURES), []),
            (R.SET_MEM_TABLE, table, mem.fds),
        ]
        for r in rings:
            i = r.index
            msgs += [
                (R.SET_VRING_ENABLE, p.VringState(i, 1), []),
                (R.SET_VRING_NUM, p.VringState(i, RING), []),
                (R.SET_VRING_BASE, p.VringState(i, 0), []),
                (
                    R.SET_VRING_ADDR,
                    p.VringAddr(
                        i,
                        0,
                        mem.hva(r.desc_gpa),
                        mem.hva(r.used_gpa),
                        mem.hva(r.avail_gpa),
                        r.used_gpa,
                    ),
                    [],
                ),
                (R.SET_VRING_KICK, p.VringFile(i), [self.efds[i]]),
                (R.SET_VRING_CALL, p.VringFile(i), [self.efds[2 + i]]),
            ]
        self.start_wire = [
            (req.name, *f.codec.request(req, payload, [os.dup(fd) for fd in fds]))
            for req, payload, fds in msgs
        ]
        self.stop_wire = [f.codec.request(R.GET_VRING_BASE, p.VringState(i, 0))[0] for i in (0, 1)]

    def running(self) -> bool:
        return all(v.state.value == "running" for v in self.session.vrings)

    def close(self) -> None:
        self.session.close()
        for fd in self.efds:
            os.close(fd)
        # The devices close on the closer's thread; let that finish so the next round is
        # not measured against this one's teardown (as with the old synchronous close).
        CLOSER.drain()


def control_path(trials: int) -> tuple[float, float, float, float]:
    """Minimums (shim start s, bare start s, shim stop s, bare stop s) over ``trials``
    interleaved rounds; a first round warms up caches (cffi type parsing, imports) and is
    not counted."""
    v5 = versions.by_name("org.kernel.vhost-net.v5")
    assert v5 is not None
    shim_t, bare_t, stop_t, bare_stop_t = [], [], [], []
    per_request: dict[str, list[float]] = {}
    for _ in range(trials + 1):
        with GuestMemory.create(MEMORY) as mem:
            rnd = ShimRound(mem, v5)
            session = rnd.session
            t0 = time.perf_counter()
            for name, data, out in rnd.start_wire:
                t1 = time.perf_counter()
                session.receive(data, out)
                per_request.setdefault(name, []).append(time.perf_counter() - t1)
            shim_t.append(time.perf_counter() - t0)
            assert rnd.running(), session.error
            t0 = time.perf_counter()
            for data in rnd.stop_wire:
                (_reply,) = session.receive(data, [])
            stop_t.append(time.perf_counter() - t0)
            rnd.close()
        with GuestMemory.create(MEMORY) as mem, Tap.create() as tap:
            bare = Bare(mem, tap)
            try:
                t0 = time.perf_counter()
                bare.start()
                bare_t.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                bare.stop()
                bare_stop_t.append(time.perf_counter() - t0)
            finally:
                bare.close()
    slow = sorted(((min(v), k) for k, v in per_request.items()), reverse=True)
    print(
        "control: shim per request (min ms): "
        + ", ".join(f"{k} {t * 1e3:.2f}" for t, k in slow[:6])
    )
    for what, values in (
        ("shim start", shim_t),
        ("bare start", bare_t),
        ("shim stop", stop_t),
        ("bare stop", bare_stop_t),
    ):
        print(
            f"control: {what} ms min {min(values[1:]) * 1e3:.2f} median "
            f"{statistics.median(values[1:]) * 1e3:.2f}"
        )
    # Each round runs the shim then the bare ioctls, so a round's two times share the
    # machine's speed of the moment (it drifts by tens of percent over minutes).
    paired = sorted(s / b for s, b in zip(shim_t[1:], bare_t[1:], strict=True))
    print(
        f"control: start ratio per round (shim / bare) min {paired[0]:.2f} median "
        f"{statistics.median(paired):.2f} max {paired[-1]:.2f}"
    )
    # A TCG vCPU on a shared host is descheduled for milliseconds at random: the minimum
    # over many rounds is the cost of the work itself.
    return min(shim_t[1:]), min(bare_t[1:]), min(stop_t[1:]), min(bare_stop_t[1:])


# --- where the time goes (instrumented, not part of the targets) ----------------------------


class IoctlClock:
    """Stands in for the ``fcntl`` module inside kvhost.ioctl and times every ioctl; also
    times the device layer around it (every public method of kvhost.vhost.VhostNet and
    kvhost.tap.Tap, outermost call only), which the shim and the bare setup share."""

    def __init__(self) -> None:
        self.ns = 0
        self.calls = 0
        self.device_ns = 0
        self._depth = 0
        self._saved: list[tuple[type, str, Any]] = []

    def wrap_devices(self) -> None:
        for cls in (VhostNet, Tap):
            for name, fn in list(vars(cls).items()):
                if name.startswith("_") or not callable(fn) or name in ("fileno", "close"):
                    continue
                self._saved.append((cls, name, fn))
                setattr(cls, name, self._timed(fn))

    def unwrap_devices(self) -> None:
        for cls, name, fn in self._saved:
            setattr(cls, name, fn)
        self._saved.clear()

    def _timed(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kw: Any) -> Any:
            if self._depth:
                return fn(*args, **kw)
            self._depth += 1
            t0 = time.perf_counter_ns()
            try:
                return fn(*args, **kw)
            finally:
                self.device_ns += time.perf_counter_ns() - t0
                self._depth -= 1

        return timed

    def ioctl(self, fd: int, request: int, arg: Any = 0, mutate: bool = True) -> Any:
        t0 = time.perf_counter_ns()
        try:
            return fcntl.ioctl(fd, request, arg, mutate)
        finally:
            self.ns += time.perf_counter_ns() - t0
            self.calls += 1

    def take(self) -> tuple[int, int, int]:
        out = (self.ns, self.calls, self.device_ns)
        self.ns = self.calls = self.device_ns = 0
        return out


def breakdown(rounds: int) -> None:
    """Print the kernel-ioctl / Python split of the shim's start and stop and of the bare
    ioctls, per request (minimum over ``rounds`` rounds), then a cProfile of the shim."""
    v5 = versions.by_name("org.kernel.vhost-net.v5")
    assert v5 is not None
    clock = IoctlClock()
    real = kv_ioctl.fcntl  # type: ignore[attr-defined]
    kv_ioctl.fcntl = clock  # type: ignore[attr-defined,assignment]
    clock.wrap_devices()
    split: dict[str, list[tuple[int, int, int, int]]] = {}

    def timed(name: str, fn: Callable[[], object]) -> None:
        clock.take()
        t0 = time.perf_counter_ns()
        fn()
        total = time.perf_counter_ns() - t0
        ns, calls, device = clock.take()
        split.setdefault(name, []).append((total, ns, calls, device))

    profile = cProfile.Profile()
    try:
        for _ in range(rounds):
            with GuestMemory.create(MEMORY) as mem:
                rnd = ShimRound(mem, v5)
                feed = rnd.session.receive
                for name, data, out in rnd.start_wire:
                    timed(f"shim {name}", functools.partial(feed, data, out))
                for i, data in enumerate(rnd.stop_wire):
                    timed(f"shim stop GET_VRING_BASE {i}", functools.partial(feed, data, []))
                rnd.close()
            with GuestMemory.create(MEMORY) as mem, Tap.create() as tap:
                bare = Bare(mem, tap)
                try:
                    timed("bare start", bare.start)
                    timed("bare stop", bare.stop)
                finally:
                    bare.close()
        kv_ioctl.fcntl = real  # type: ignore[attr-defined]
        clock.unwrap_devices()
        for _ in range(rounds):
            with GuestMemory.create(MEMORY) as mem:
                rnd = ShimRound(mem, v5)
                profile.enable()
                for _name, data, out in rnd.start_wire:
                    rnd.session.receive(data, out)
                for data in rnd.stop_wire:
                    rnd.session.receive(data, [])
                profile.disable()
                rnd.close()
    finally:
        kv_ioctl.fcntl = real  # type: ignore[attr-defined]
        clock.unwrap_devices()
    print(
        f"breakdown (instrumented, min of {rounds} rounds), ms: total = kernel (inside "
        "fcntl.ioctl) + devices (kvhost VhostNet/Tap Python around it, shared with bare) + "
        "rest (shim or bench Python, other syscalls)"
    )
    sums = {"shim start": [0, 0, 0, 0], "shim stop": [0, 0, 0, 0]}

    def line(name: str, total: int, ns: int, calls: int, device: int) -> None:
        print(
            f"  {name:32s} total {total / 1e6:7.3f}  kernel {ns / 1e6:6.3f} ({calls:2d})  "
            f"devices {(device - ns) / 1e6:6.3f}  rest {(total - device) / 1e6:7.3f}"
        )

    for name, values in split.items():
        total, ns, calls, device = min(values)
        line(name, total, ns, calls, device)
        key = "shim stop" if "stop" in name else "shim start"
        if name.startswith("shim"):
            for j, v in enumerate((total, ns, calls, device)):
                sums[key][j] += v
    for key, (total, ns, calls, device) in sums.items():
        line(f"{key} (sum of minima)", total, ns, calls, device)
    print("cProfile of the shim's start + stop (tottime, top 20):")
    stats = pstats.Stats(profile, stream=sys.stdout)
    stats.sort_stats("tottime").print_stats(20)


def rss_per_vm(shim: ShimProcess, vms: int) -> float:
    time.sleep(0.2)
    base = Footprint.of(shim.pid).rss_without_memfd
    mems = [GuestMemory.create(MEMORY) for _ in range(vms)]
    fes = [VhostUserFrontend(shim.socket_path, timeout=60) for _ in range(vms)]
    try:
        for fe, mem in zip(fes, mems, strict=True):
            fe.connect()
            fe.handshake()
            dev = fe.start_net(mem, base_gpa=BASE, features=WANT)
            dev.send([FRAME] * 32)
            dev.wait_tx_done(timeout=5)
        time.sleep(0.2)
        grown = Footprint.of(shim.pid).rss_without_memfd - base
    finally:
        for fe in fes:
            fe.close()
        for mem in mems:
            mem.close()
    return grown / vms


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=100_000)
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--vms", type=int, default=4)
    ap.add_argument("--control-trials", type=int, default=40)
    ap.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="after the measurements, ROUNDS instrumented rounds showing where the control "
        "path's time goes (kernel ioctls vs Python, cProfile)",
    )
    ap.add_argument("--control-only", action="store_true", help="skip datapath and memory")
    args = ap.parse_args()
    ok = True
    with netns.fresh("kvbench"):
        shim_s, bare_s, stop_s, bare_stop_s = control_path(args.control_trials)
        start_ratio = shim_s / bare_s
        print(
            f"control: shim start {shim_s * 1e3:.2f} ms, bare ioctls {bare_s * 1e3:.2f} ms, "
            f"ratio {start_ratio:.2f} (target <= 2)"
        )
        print(
            f"control: stop (GET_VRING_BASE x2, in -> out) {stop_s * 1e3:.3f} ms (target <= 1 ms);"
            f" the same ioctls bare {bare_stop_s * 1e3:.3f} ms"
        )
        ok &= start_ratio <= 2 and stop_s <= 1e-3
        if args.profile:
            breakdown(args.profile)
        if args.control_only:
            print("all control targets met" if ok else "TARGET MISSED")
            return 0 if ok else 1

        sock = f"/run/kvbench-{os.getpid()}.sock"
        shim = start_shim(sock)
        try:
            shim_rates, bare_rates, switched = [], [], []
            for _ in range(args.trials):
                rate, sw = shim_datapath(shim, args.frames)
                shim_rates.append(rate)
                switched.append(sw)
                bare_rates.append(bare_datapath(args.frames))
            ratio = max(shim_rates) / max(bare_rates)
            print(
                f"datapath: shim {max(shim_rates):,.0f} frames/s, bare {max(bare_rates):,.0f} "
                f"frames/s, ratio {ratio:.3f} (target >= 0.99); all shim "
                f"{[round(r) for r in shim_rates]}, bare {[round(r) for r in bare_rates]}"
            )
            print(
                f"datapath: shim context switches during {args.frames:,} frames: "
                f"{max(switched)} (target <= 10; per trial {switched})"
            )
            ok &= ratio >= 0.99 and max(switched) <= 10
            per_vm = rss_per_vm(shim, args.vms)
            print(
                f"memory: shim RSS per connected VM {per_vm / 2**20:.2f} MiB without guest "
                f"memory ({args.vms} VMs; target <= {RSS_PER_CONNECTION >> 20} MiB)"
            )
            ok &= per_vm <= RSS_PER_CONNECTION
        finally:
            stop_shim(shim)
    print("all targets met" if ok else "TARGET MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
