"""Coverage-guided fuzzing of whole vhost-user *sequences* through the shim (atheris).

    python bench/fuzz_session.py                  # 100,000 sequences
    python bench/fuzz_session.py --runs 2000      # a smoke run (CI)

``bench/fuzz_protocol.py`` feeds single messages to the codec; this one drives what a
hostile frontend really talks to: a :class:`shim.session.Session` over the shim's own
:class:`shim.kernel_backend.KernelBackend`, which maps the memfds it is sent, translates
ring addresses and hands its objects to a closer thread. Only the kernel is replaced: a
fake vhost-net device and tap (``/dev/null`` fds, so every fd is real and counted) that
record what they are given, fail when the input says so, and check the one rule the real
kernel cannot survive -- while a ring is attached, its memory table and ring addresses must
lie in memory this process still has mapped (read from ``/proc/self/maps``).

Each input is decoded (``atheris.FuzzedDataProvider``) into: 1 or 2 queue pairs, an ioctl
number to fail at (or none), and up to 24 messages -- mostly well-formed requests with
values from small sets that reach deep states (QEMU's addresses, ring sizes, feature sets)
and fds of every kind (sparse memfds of several sizes, eventfds, a pipe, ``/dev/null``, or
the wrong count), sometimes raw bytes or two messages in one read.

After each sequence the connection is closed as the server closes it, the closer drained,
and then: no fd more than before (``/proc/self/fd``), no mapping of the fuzzer's memfds
left (``/proc/self/maps`` lines naming ``kvfuzz``), ``Session.receive`` never raised, no
internal error was logged. The total ``/proc/self/maps`` line count is printed too (the
Python heap moves it a little, so it is reported, not asserted). The last line printed is
``fuzz_session: N sequences ... result: ok`` or a failure; exit status 0 or 1.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import shutil
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import atheris

with atheris.instrument_imports(
    include=["shim.session", "shim.kernel_backend", "kvhost.memory", "kvhost.vhost_user"]
):
    from kvhost.vhost_user import protocol as p
    from shim import kernel_backend, session

from kvhost import abi, features, versions
from kvhost.ioctl import kernel_error
from kvhost.memory import MemoryRegion
from kvhost.tap import Tap
from kvhost.vhost import VhostNet, VringConfig
from shim.closer import Closer

R = p.Request
V5 = versions.parse("org.kernel.vhost-net.v5")
OFFERED = session.offered_features(V5)
PROTOCOL = int(session.OFFERED_PROTOCOL_FEATURES)
#: where the fuzzer's "QEMU" keeps guest memory (frontend virtual addresses)
VA = 0x7F00_0000_0000
MIB = 1 << 20
_state: dict[str, Any] = {
    "runs": 0, "target": 0, "fd_base": -1, "maps_base": 0, "maps_max": 0, "start": 0.0,
    "failed": 0, "attached": 0, "messages": 0, "ioctls": 0,
}
_corpus: list[Path] = []
_findings: list[str] = []


class Finding(Exception):
    """A broken property (not a refused input): the run stops and reports it."""


# --- the fake kernel -------------------------------------------------------------------


class Faults:
    """Counts ioctls in a sequence and fails the ``fail_at``-th (0: none)."""

    fail_at = 0
    count = 0

    @classmethod
    def next(cls, op: str, device: str) -> None:
        cls.count += 1
        _state["ioctls"] += 1
        if cls.count == cls.fail_at:
            raise kernel_error(op, device, 22, "injected by fuzz_session")


def _live_ranges() -> list[tuple[int, int]]:
    out = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            lo, hi = line.split(" ", 1)[0].split("-")
            out.append((int(lo, 16), int(hi, 16)))
    return out


def _mapped(ranges: list[tuple[int, int]], start: int, length: int) -> bool:
    """[start, start+length) is covered by consecutive live mappings (``ranges`` in
    address order, as /proc/self/maps lists them)."""
    end = start + length
    for lo, hi in ranges:
        if lo <= start < hi:
            start = hi
            if start >= end:
                return True
    return length == 0


class FakeVhostNet(VhostNet):
    """The verbs KernelBackend uses, recorded; the fd is /dev/null (real, counted)."""

    def __init__(self, path: str = "/dev/vhost-net", *, fd: int | None = None) -> None:
        super().__init__("/dev/null", fd=os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC))
        self.table: list[MemoryRegion] = []
        self.addrs: dict[int, VringConfig] = {}
        self.nums: dict[int, int] = {}
        self.attached: set[int] = set()
        self.log_base: int | None = None

    def _ioctl(self, req: abi.Ioctl, arg: Any = 0) -> int:
        raise Finding(f"KernelBackend issued ioctl {req!r}, which the fuzzer's fake lacks")

    def _enter(self, op: str) -> None:
        """Every ioctl: first the kernel's view must be sound, then maybe a fault."""
        self.fileno()  # raises on a closed device, as the kernel would (EBADF)
        if self.attached:
            ranges = _live_ranges()
            for r in self.table:
                if not _mapped(ranges, r.userspace_addr, r.memory_size):
                    raise Finding(
                        f"{op}: rings {sorted(self.attached)} are attached while the memory "
                        f"table region at 0x{r.userspace_addr:x} (+0x{r.memory_size:x}) is "
                        "not mapped"
                    )
            for i in self.attached:
                a, num = self.addrs.get(i), self.nums.get(i)
                if a is None or num is None:
                    raise Finding(f"{op}: ring {i} attached without addresses or size")
                desc, avail, used = kernel_backend.ring_lengths(num)
                for what, addr, n in (("desc", a.desc, desc), ("avail", a.avail, avail),
                                      ("used", a.used, used)):
                    if not _mapped(ranges, addr, n):
                        raise Finding(f"{op}: ring {i}'s {what} at 0x{addr:x} is not mapped")
        Faults.next(op, self.device)

    def set_owner(self) -> None:
        self._enter("VHOST_SET_OWNER")

    def reset_owner(self) -> None:
        self._enter("VHOST_RESET_OWNER")
        self.table, self.addrs, self.attached, self.log_base = [], {}, set(), None

    def get_features(self) -> int:
        self._enter("VHOST_GET_FEATURES")
        return V5.features | features.LOG_ALL

    def set_features(self, virtio_features: int) -> None:
        self._enter("VHOST_SET_FEATURES")

    def set_mem_table(self, regions: Any) -> None:
        self._enter("VHOST_SET_MEM_TABLE")
        self.table = list(regions)

    def set_log_base(self, base: int, region: Any = None) -> None:
        self._enter("VHOST_SET_LOG_BASE")
        self.log_base = base

    def set_vring_num(self, index: int, num: int) -> None:
        self._enter("VHOST_SET_VRING_NUM")
        self.nums[index] = num

    def set_vring_addr(self, index: int, config: VringConfig) -> None:
        self._enter("VHOST_SET_VRING_ADDR")
        self.addrs[index] = config

    def set_vring_base(self, index: int, base: int) -> None:
        self._enter("VHOST_SET_VRING_BASE")

    def get_vring_base(self, index: int) -> int:
        self._enter("VHOST_GET_VRING_BASE")
        return 0

    def set_vring_kick(self, index: int, fd: int) -> None:
        self._enter("VHOST_SET_VRING_KICK")

    def set_vring_call(self, index: int, fd: int) -> None:
        self._enter("VHOST_SET_VRING_CALL")

    def set_vring_err(self, index: int, fd: int) -> None:
        self._enter("VHOST_SET_VRING_ERR")

    def set_backend(self, index: int, fd: int) -> None:
        self._enter("VHOST_NET_SET_BACKEND")
        if fd >= 0:
            self.attached.add(index)
            _state["attached"] += 1
        else:
            self.attached.discard(index)


class FakeTap(Tap):
    """A tap whose queue fds are /dev/null: writes (RARP) succeed, ioctls are recorded."""

    def __init__(self, queues: int) -> None:
        fds = [os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC) for _ in range(queues)]
        super().__init__("kvfuzz0", fds, 0, None)

    def _ioctl(self, req: abi.Ioctl, arg: object = 0, queue: int = 0) -> int:
        if not self.fds:
            raise self._closed()
        Faults.next(f"tap ioctl {req!r}", "tap kvfuzz0")
        return 0

    def get_vnet_hdr_size(self) -> int:
        self._ioctl(abi.TUNGETVNETHDRSZ)
        return abi.VNET_HDR_MRG_LEN

    def set_mtu(self, n: int) -> None:
        self._ioctl(abi.TUNSETOFFLOAD)


def install_fakes() -> None:
    """A KernelBackend without an ``open_device`` parameter opens its devices by its
    module-level name ``VhostNet``: from now on, in this process, every one is the fake (so
    only in the fuzzer's own process)."""
    vars(kernel_backend)["VhostNet"] = FakeVhostNet


def _backend(pairs: int) -> kernel_backend.KernelBackend:
    extra: dict[str, Any] = {}
    if "open_device" in inspect.signature(kernel_backend.KernelBackend).parameters:
        extra["open_device"] = FakeVhostNet
    return kernel_backend.KernelBackend(
        lambda: FakeTap(pairs), pairs, closer=_CLOSER, **extra
    )

# --- inputs -> sequences -----------------------------------------------------------------

_SIZES = [0, 4096, MIB, 2 * MIB, 1 << 30, 1 << 40]


def _fd(fdp: atheris.FuzzedDataProvider, size: int) -> int:
    """An fd of the kind the input picks; a memfd is ``size`` bytes (sparse)."""
    kind = fdp.ConsumeIntInRange(0, 9)
    if kind <= 5:
        fd = os.memfd_create("kvfuzz", os.MFD_CLOEXEC)
        os.ftruncate(fd, size if kind else fdp.PickValueInList(_SIZES))
        return fd
    if kind <= 7:
        return os.eventfd(0, os.EFD_CLOEXEC)
    if kind == 8:
        r, w = os.pipe2(os.O_CLOEXEC)
        os.close(w)
        return r
    return os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)


def _u64(fdp: atheris.FuzzedDataProvider, common: list[int]) -> int:
    if fdp.ConsumeIntInRange(0, 7):
        return int(fdp.PickValueInList(common))
    return int(fdp.ConsumeIntInRange(0, (1 << 64) - 1))


def _ring_va(fdp: atheris.FuzzedDataProvider, index: int) -> int:
    base = VA + index * 0x10000
    return base + int(fdp.PickValueInList([0, 0, 0x1000, 0x2000, 8, 2 * MIB - 0x1000, -0x1000]))


def _message(fdp: atheris.FuzzedDataProvider) -> tuple[bytes, list[int]]:
    """One request (bytes, fds); the fds are new and the caller's."""
    pick = fdp.ConsumeIntInRange(0, 21)
    flags = 0x1 | (0x8 if fdp.ConsumeBool() else 0)
    ring = fdp.PickValueInList([0, 0, 1, 1, 2, 3, 4, 0xFFFF])
    payload: p.Payload = p.EMPTY
    fds: list[int] = []
    if pick == 0:
        request = R.GET_FEATURES
    elif pick == 1:
        request = R.SET_FEATURES
        payload = p.U64(_u64(fdp, [OFFERED, OFFERED & ~features.LOG_ALL,
                                   OFFERED & ~features.PROTOCOL_FEATURES, 1 << 32]))
    elif pick == 2:
        request = R.GET_PROTOCOL_FEATURES
    elif pick == 3:
        request = R.SET_PROTOCOL_FEATURES
        payload = p.U64(_u64(fdp, [PROTOCOL, PROTOCOL & ~int(p.ProtocolFeature.LOG_SHMFD)]))
    elif pick == 4:
        request = R.SET_OWNER
    elif pick == 5:
        request = R.RESET_OWNER
    elif pick in (6, 7):
        request = R.SET_MEM_TABLE
        regions = []
        for i in range(fdp.ConsumeIntInRange(1, 9)):
            size = fdp.PickValueInList([2 * MIB, 2 * MIB, MIB, 4096, 0, 1 << 40])
            gpa = fdp.PickValueInList([i * 2 * MIB, i * 2 * MIB, 0, (1 << 64) - 4096])
            va = fdp.PickValueInList([VA + i * 2 * MIB, VA + i * 2 * MIB, VA, 1 << 63])
            offset = fdp.PickValueInList([0, 0, 4096, MIB])
            regions.append(p.MemRegion(gpa, size, va, offset))
            fds.append(_fd(fdp, size + offset))
        if len(regions) <= 8:
            payload = p.MemTable(tuple(regions))
        else:  # one too many: MemTable refuses to pack it, so by hand
            body = struct.pack("<II", len(regions), 0) + b"".join(r.pack() for r in regions)
            return p.raw_message(request, flags, body), fds
    elif pick == 8:
        request = R.SET_LOG_BASE
        size = fdp.PickValueInList([4096, 8, 0, 1 << 20])
        offset = fdp.PickValueInList([0, 0, 4096])
        payload = p.LogBase(size, offset)
        fds.append(_fd(fdp, size + offset))
    elif pick == 9:
        request = R.SET_VRING_NUM
        payload = p.VringState(ring, fdp.PickValueInList([256, 256, 1024, 1, 3, 32768, 65536]))
    elif pick == 10:
        request = R.SET_VRING_BASE
        payload = p.VringState(ring, fdp.PickValueInList([0, 5, 0xFFFF, 0x10000]))
    elif pick in (11, 12):
        request = R.SET_VRING_ADDR
        va = _ring_va(fdp, ring)
        log = fdp.PickValueInList([0, 0x2000, 1 << 50])
        payload = p.VringAddr(ring, fdp.PickValueInList([0, 0, 1, 2]), va, va + 0x2000,
                              va + 0x1000, log)
    elif pick in (13, 14, 15):
        request = fdp.PickValueInList([R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR])
        no_fd = fdp.ConsumeIntInRange(0, 5) == 0
        payload = p.VringFile(ring & 0xFF, no_fd=no_fd)  # the index has 8 bits here
        if not no_fd:
            fds.append(os.eventfd(0, os.EFD_CLOEXEC) if fdp.ConsumeIntInRange(0, 4)
                       else _fd(fdp, 4096))
    elif pick == 16:
        request = R.GET_VRING_BASE
        payload = p.VringState(ring, 0)
    elif pick == 17:
        request = R.SET_VRING_ENABLE
        payload = p.VringState(ring, fdp.PickValueInList([0, 1, 1, 2]))
    elif pick == 18:
        request = fdp.PickValueInList([R.SEND_RARP, R.NET_SET_MTU, R.GET_QUEUE_NUM])
        if request == R.SEND_RARP:
            payload = p.RarpMac(b"\x52\x54\x00\x12\x34\x56")
        elif request == R.NET_SET_MTU:
            payload = p.U64(fdp.PickValueInList([1500, 9000, 67, 1 << 40]))
    elif pick == 19:
        request = fdp.PickValueInList([R.GET_INTERFACE_VERSIONS, R.SET_INTERFACE_VERSION])
        if request == R.SET_INTERFACE_VERSION:
            payload = p.VersionString(fdp.PickValueInList([V5.label, "org.kernel.vhost-net.v1",
                                                           "nonsense"]))
    else:  # raw: any request id, any bytes, any fds
        request = fdp.ConsumeIntInRange(0, 60)
        body = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64))
        fds = [_fd(fdp, 4096) for _ in range(fdp.ConsumeIntInRange(0, 2))]
        return p.raw_message(request, flags, body), fds
    body = payload.pack()
    if fdp.ConsumeIntInRange(0, 15) == 0:  # the wrong number of fds
        if fds and fdp.ConsumeBool():
            os.close(fds.pop())
        else:
            fds.append(os.eventfd(0, os.EFD_CLOEXEC))
    return p.raw_message(request, flags, body), fds


# --- the property ----------------------------------------------------------------------


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _maps() -> tuple[int, int]:
    """(lines of /proc/self/maps, lines naming the fuzzer's memfds)."""
    with open("/proc/self/maps") as f:
        lines = f.readlines()
    return len(lines), sum("kvfuzz" in line for line in lines)


class _Errors(logging.Handler):
    """A logged traceback (log.exception) is a shim bug, whatever the input was."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            _findings.append(f"logged an internal error: {record.getMessage()}")


class _InlineCloser(Closer):
    """Runs each close job at once, in submission order: the shim's threaded closer costs a
    thread start and two hand-offs per connection, half of a sequence's time under load,
    and the order of the jobs -- what the property depends on -- is the same."""

    def submit(self, what: str, job: Callable[[], None]) -> None:
        self._call(what, job)


_CLOSER = _InlineCloser("kvfuzz-closer")


def _prefix(stage: int, pairs: int) -> list[tuple[bytes, list[int]]]:
    """QEMU's own opening (stage >= 1: the connect-time burst; >= 2: DRIVER_OK, every ring
    running), so random messages also land on a device in use, not only on a new one."""
    out: list[tuple[bytes, list[int]]] = []

    def add(request: R, payload: p.Payload = p.EMPTY, fds: list[int] | None = None) -> None:
        out.append((p.raw_message(request, 0x1, payload.pack()), fds or []))

    if stage >= 1:
        add(R.GET_FEATURES)
        add(R.GET_PROTOCOL_FEATURES)
        add(R.SET_PROTOCOL_FEATURES, p.U64(PROTOCOL))
        add(R.SET_OWNER)
    if stage >= 2:
        add(R.SET_FEATURES, p.U64(OFFERED & ~features.LOG_ALL))
        memfd = os.memfd_create("kvfuzz", os.MFD_CLOEXEC)
        os.ftruncate(memfd, 2 * MIB)
        add(R.SET_MEM_TABLE, p.MemTable((p.MemRegion(0, 2 * MIB, VA, 0),)), [memfd])
        for ring in range(2 * pairs):
            va = VA + ring * 0x10000
            add(R.SET_VRING_NUM, p.VringState(ring, 256))
            add(R.SET_VRING_BASE, p.VringState(ring, 0))
            add(R.SET_VRING_ADDR, p.VringAddr(ring, 0, va, va + 0x2000, va + 0x1000, 0))
            add(R.SET_VRING_ENABLE, p.VringState(ring, 1))
            add(R.SET_VRING_KICK, p.VringFile(ring), [os.eventfd(0, os.EFD_CLOEXEC)])
            add(R.SET_VRING_CALL, p.VringFile(ring), [os.eventfd(0, os.EFD_CLOEXEC)])
    return out


def _one(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    pairs = 1 + fdp.ConsumeIntInRange(0, 1)
    Faults.count, Faults.fail_at = 0, fdp.ConsumeIntInRange(1, 40) if fdp.ConsumeBool() else 0
    backend = _backend(pairs)
    sess = session.Session(backend, V5, supported=[V5], name="kvfuzz")
    try:
        for data, fds in _prefix(fdp.ConsumeIntInRange(0, 2), pairs):
            sess.receive(data, fds)
        for _ in range(fdp.ConsumeIntInRange(1, 24)):
            if fdp.remaining_bytes() == 0:
                break
            data, fds = _message(fdp)
            if fdp.ConsumeIntInRange(0, 9) == 0 and fdp.remaining_bytes():
                more, more_fds = _message(fdp)  # two in one read: fds go to the last one
                data, fds = data + more, fds + more_fds
            _state["messages"] += 1
            sess.receive(data, fds)
            if sess.error is not None and "internal error" in sess.error:
                raise Finding(f"session failed with an internal error: {sess.error}")
            if _findings:
                raise Finding(_findings[0])
            if sess.done:
                _state["failed"] += 1
                break
    finally:
        # what ShimServer._drop does
        sess.close()
        sess.codec.close()
        _CLOSER.drain()


def test_one_input(data: bytes) -> None:
    if _state["fd_base"] < 0:  # libFuzzer has loaded its corpus by now
        _state["fd_base"] = _open_fds()
        _state["maps_base"] = _state["maps_max"] = _maps()[0]
        _state["start"] = time.monotonic()
    try:
        _one(data)
    except Finding as err:
        print(f"fuzz_session: input {data.hex()}: {err}", flush=True)
        _finish(f"FAIL: {err}", 1)
    except BaseException as err:  # Session.receive must never raise
        print(f"fuzz_session: input {data.hex()} raised {err!r}", flush=True)
        _finish(f"FAIL: {type(err).__name__} escaped the session", 1)
    if _findings:  # e.g. a close job that failed on the closer's thread
        print(f"fuzz_session: input {data.hex()}: {_findings[0]}", flush=True)
        _finish(f"FAIL: {_findings[0]}", 1)
    fds = _open_fds()
    lines, ours = _maps()
    _state["maps_max"] = max(_state["maps_max"], lines)
    if fds != _state["fd_base"] or ours:
        print(f"fuzz_session: input {data.hex()} left {fds - _state['fd_base']} fd(s) and "
              f"{ours} memfd mapping(s)", flush=True)
        _finish("FAIL: fds or mappings leaked", 1)
    _state["runs"] += 1
    if _state["runs"] % 10_000 == 0:
        _progress()
    if _state["runs"] >= _state["target"]:
        _finish("ok", 0)


def _progress(result: str | None = None) -> None:
    elapsed = time.monotonic() - _state["start"]
    runs = _state["runs"]
    lines, ours = _maps()
    print(
        f"fuzz_session: {runs} sequences in {elapsed:.1f} s ({runs / max(elapsed, 1e-9):.0f}/s), "
        f"{_state['messages']} messages, {_state['ioctls']} fake ioctls, "
        f"{_state['attached']} ring attaches, {_state['failed']} connections failed; open fds "
        f"{_open_fds()} (baseline {_state['fd_base']}), memfd mappings {ours}, maps lines "
        f"{lines} (baseline {_state['maps_base']}, max {_state['maps_max']})"
        + ("" if result is None else f", result: {result}"),
        flush=True,
    )


def _finish(result: str, code: int) -> None:
    _progress(result)
    for path in _corpus:
        shutil.rmtree(path, ignore_errors=True)
    os._exit(code)  # libFuzzer never returns from Fuzz(); leave without its exit path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100_000, help="sequences to run")
    parser.add_argument("--max-len", type=int, default=1024, help="longest input in bytes")
    args, rest = parser.parse_known_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    install_fakes()
    shim_log = logging.getLogger("kvhost.shim")
    shim_log.handlers[:] = [_Errors(logging.ERROR)]
    shim_log.propagate = False
    shim_log.setLevel(logging.ERROR)
    corpus = Path(tempfile.mkdtemp(prefix="kvhost-fuzz-session-"))
    _corpus.append(corpus)
    _state["target"] = args.runs
    argv = [sys.argv[0], f"-max_len={args.max_len}", "-runs=-1", "-print_final_stats=0",
            "-len_control=0", str(corpus), *rest]
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
