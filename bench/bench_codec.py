"""Host-native cost of one vhost-user message through the codec and the session.

    python bench/bench_codec.py [--messages N] [--repeats K]
    python bench/bench_codec.py --instructions [--rounds R]

No kernel, no socket, no VM: a frontend's encoded bytes go straight into
``BackendCodec.receive`` ("codec") and into ``Session.receive`` with a backend that only
keeps the fds it is handed ("session", codec included). Prints one line per message kind,
in microseconds per message (the best of K runs of N messages, so a neighbour on the shared
machine inflates fewer of them), then the QEMU-like start sequence per message and whole.

``--instructions`` counts instead of timing: CPU instructions per start sequence, under
valgrind's callgrind. Two runs of R rounds each -- one feeding the sequence, one only making
the same sessions and fds -- and their difference over R is the codec and the session alone,
whatever the neighbours on a shared machine do to the clock (PYTHONHASHSEED is fixed so the
two runs hash alike).

Only the public API is used, so the same script measures an older tree: put that tree first
on PYTHONPATH and run it again (interleave timed runs: A B A B).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if __package__ in (None, ""):
    # a tree on PYTHONPATH wins; otherwise the checkout this script belongs to
    sys.path.append(str(Path(__file__).resolve().parent.parent))

from harness.device import GUEST
from harness.device import QEMU_PROTOCOL as PROTOCOL
from kvhost import features, versions
from kvhost.memory import FrontendRegion
from kvhost.vhost_user import protocol as p
from kvhost.vhost_user.protocol import Request as R
from shim.session import Session

if TYPE_CHECKING:  # absent from trees before the shared verb set, which this script measures too
    from kvhost.vhost import LogRegion, VringConfig

VERSION = versions.parse("org.kernel.vhost-net.v5")
TABLE = p.MemTable((
    p.MemRegion(0, 0xC0000, 0x7F00_0000_0000, 0),
    p.MemRegion(0x100000, 0x3F00000, 0x7F00_0010_0000, 0x100000),
))


class KeepingBackend:
    """shim.session.Backend that does nothing but keep the fds it is given (closed by the
    caller outside the timed loop), so the numbers are codec + session only."""

    queue_pairs = 1
    max_mem_regions = 8

    def __init__(self) -> None:
        self.fds: list[int] = []

    def _keep(self, fd: int) -> None:
        if fd >= 0:
            self.fds.append(fd)

    def set_owner(self) -> None: ...
    def reset_owner(self) -> None: ...
    def set_features(self, virtio_features: int) -> None: ...

    def set_mem_table(
        self, regions: Sequence[FrontendRegion], rings: Sequence[tuple[int, VringConfig]] = ()
    ) -> None:
        for r in regions:
            self._keep(r.fd)

    # The verbs take both the current shapes and those of trees before the shared verb set
    # (set_log_base(fd, size, offset), set_vring_addr(ring, flags, desc, used, avail, log),
    # start_vring/stop_vring), so one script measures either tree.
    def set_log_base(
        self, base: int, region: LogRegion | int | None = None, old_offset: int | None = None
    ) -> None:
        if old_offset is not None:
            self._keep(base)
        elif region is not None and not isinstance(region, int):
            self._keep(region.fd)

    def set_vring_num(self, index: int, num: int) -> None: ...
    def set_vring_base(self, index: int, base: int) -> None: ...
    def set_vring_addr(self, index: int, config: VringConfig | int, *old: int) -> None: ...

    def set_vring_kick(self, index: int, fd: int) -> None:
        self._keep(fd)

    def set_vring_call(self, index: int, fd: int) -> None:
        self._keep(fd)

    def set_vring_err(self, index: int, fd: int) -> None:
        self._keep(fd)

    def set_backend(self, index: int, attach: bool) -> None: ...
    def start_vring(self, ring: int) -> None: ...
    def stop_vring(self, ring: int) -> None: ...

    def get_vring_base(self, index: int) -> int:
        return 0

    def send_rarp(self, mac: bytes) -> None: ...
    def set_mtu(self, mtu: int) -> None: ...
    def close(self) -> None: ...

    def close_fds(self) -> None:
        p.close_fds(self.fds)
        self.fds.clear()


def encode(request: R, payload: p.Payload = p.EMPTY, nfds: int = 0,
           need_reply: bool = False) -> tuple[bytes, int]:
    front = p.FrontendCodec()
    front.protocol_features = PROTOCOL
    data, _ = front.request(request, payload, [-1] * nfds, need_reply=need_reply)
    return data, nfds


#: (label, the message, whether it needs a memory table first)
SINGLE: list[tuple[str, tuple[bytes, int], bool]] = [
    ("SET_VRING_NUM", encode(R.SET_VRING_NUM, p.VringState(0, 256)), False),
    ("SET_VRING_ADDR", encode(R.SET_VRING_ADDR, p.VringAddr(
        0, 0, 0x7F00_0000_0000, 0x7F00_0000_2000, 0x7F00_0000_1000, 0)), True),
    ("SET_VRING_BASE", encode(R.SET_VRING_BASE, p.VringState(0, 0)), False),
    ("SET_VRING_KICK", encode(R.SET_VRING_KICK, p.VringFile(0), 1), False),
    ("SET_VRING_CALL", encode(R.SET_VRING_CALL, p.VringFile(0), 1), False),
    ("SET_VRING_ENABLE", encode(R.SET_VRING_ENABLE, p.VringState(0, 1)), False),
    ("GET_VRING_BASE", encode(R.GET_VRING_BASE, p.VringState(0, 0)), False),
    ("SET_FEATURES", encode(R.SET_FEATURES, p.U64(GUEST | features.PROTOCOL_FEATURES)), False),
    ("SET_MEM_TABLE+ack", encode(R.SET_MEM_TABLE, TABLE, 2, need_reply=True), False),
]


def start_sequence() -> list[tuple[bytes, int]]:
    """QEMU 7.2's order for one queue pair: negotiation, SET_OWNER, calls/errs and enables
    at init, DRIVER_OK (enables, features, the table, each ring), then the stop."""
    out = [
        encode(R.GET_FEATURES),
        encode(R.GET_PROTOCOL_FEATURES),
        encode(R.SET_PROTOCOL_FEATURES, p.U64(PROTOCOL)),
        encode(R.GET_QUEUE_NUM),
        encode(R.SET_OWNER),
        encode(R.GET_FEATURES),
    ]
    for i in (0, 1):
        out += [encode(R.SET_VRING_CALL, p.VringFile(i), 1),
                encode(R.SET_VRING_ERR, p.VringFile(i), 1)]
    for _ in range(2):
        out += [encode(R.SET_VRING_ENABLE, p.VringState(i, 1)) for i in (0, 1)]
    out += [encode(R.SET_FEATURES, p.U64(GUEST | features.PROTOCOL_FEATURES)),
            encode(R.SET_MEM_TABLE, TABLE, 2, need_reply=True)]
    for i in (0, 1):
        va = 0x7F00_0000_0000 + i * 0x10000
        out += [
            encode(R.SET_VRING_NUM, p.VringState(i, 256)),
            encode(R.SET_VRING_BASE, p.VringState(i, 0)),
            encode(R.SET_VRING_ADDR, p.VringAddr(i, 0, va, va + 0x2000, va + 0x1000, 0)),
            encode(R.SET_VRING_KICK, p.VringFile(i), 1),
            encode(R.SET_VRING_CALL, p.VringFile(i), 1),
        ]
    out += [encode(R.GET_VRING_BASE, p.VringState(i, 0)) for i in (0, 1)]
    return out


def owned_session(backend: KeepingBackend, *, table: bool) -> Session:
    session = Session(backend, VERSION, name="bench")
    for data, _ in (encode(R.SET_PROTOCOL_FEATURES, p.U64(PROTOCOL)), encode(R.SET_OWNER)):
        session.receive(data, [])
    if table:
        data, nfds = encode(R.SET_MEM_TABLE, TABLE, 2)
        session.receive(data, [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(nfds)])
    return session


def best_of(repeats: int, run: Callable[[], float]) -> float:
    return min(run() for _ in range(repeats))


def time_codec(data: bytes, nfds: int, n: int) -> float:
    """µs per message through BackendCodec.receive alone (fds closed after the loop)."""
    fd_sets = [[os.eventfd(0, os.EFD_CLOEXEC) for _ in range(nfds)] for _ in range(n)]
    codec = p.BackendCodec()
    kept: list[p.Message] = []
    receive = codec.receive
    t0 = time.perf_counter()
    for fds in fd_sets:
        kept += receive(data, fds)
    elapsed = time.perf_counter() - t0
    assert len(kept) == n, "the message did not decode"
    for msg in kept:
        p.close_fds(msg.fds)
    return elapsed / n * 1e6


def time_session(data: bytes, nfds: int, n: int, *, table: bool) -> float:
    """µs per message through Session.receive (codec, state machine, reply encoding)."""
    backend = KeepingBackend()
    session = owned_session(backend, table=table)
    fd_sets = [[os.eventfd(0, os.EFD_CLOEXEC) for _ in range(nfds)] for _ in range(n)]
    receive = session.receive
    t0 = time.perf_counter()
    for fds in fd_sets:
        receive(data, fds)
    elapsed = time.perf_counter() - t0
    assert not session.done, session.error
    backend.close_fds()
    return elapsed / n * 1e6


def time_sequence(sequence: list[tuple[bytes, int]], rounds: int) -> float:
    """µs for the whole start sequence, one fresh session per round."""
    total = 0.0
    for _ in range(rounds):
        backend = KeepingBackend()
        session = Session(backend, VERSION, name="bench")
        fd_sets = [[os.eventfd(0, os.EFD_CLOEXEC) for _ in range(nfds)]
                   for _, nfds in sequence]
        t0 = time.perf_counter()
        for (data, _), fds in zip(sequence, fd_sets, strict=True):
            session.receive(data, fds)
        total += time.perf_counter() - t0
        assert not session.done, session.error
        backend.close_fds()
    return total / rounds * 1e6


def sequence_rounds(sequence: list[tuple[bytes, int]], rounds: int, *, feed: bool) -> None:
    """``rounds`` fresh sessions and their fds; with ``feed`` each is given the sequence,
    without it the fds are only closed (the baseline the instruction count subtracts)."""
    for _ in range(rounds):
        backend = KeepingBackend()
        session = Session(backend, VERSION, name="bench")
        fd_sets = [[os.eventfd(0, os.EFD_CLOEXEC) for _ in range(nfds)]
                   for _, nfds in sequence]
        if feed:
            for (data, _), fds in zip(sequence, fd_sets, strict=True):
                session.receive(data, fds)
            assert not session.done, session.error
            backend.close_fds()
        else:
            for fds in fd_sets:
                p.close_fds(fds)


_COLLECTED = re.compile(r"Collected : (\d+)")


def count_instructions(mode: str, rounds: int) -> int:
    """Instructions callgrind counts for this script's ``--count-run MODE ROUNDS``."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit("--instructions needs valgrind (apt-get install valgrind)")
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(
            [valgrind, "--tool=callgrind", f"--callgrind-out-file={tmp}/out",
             sys.executable, __file__, "--count-run", mode, str(rounds)],
            env=dict(os.environ, PYTHONHASHSEED="0"), capture_output=True, text=True,
            timeout=3600, check=False,
        )  # fmt: skip
    found = _COLLECTED.search(done.stderr)
    if done.returncode != 0 or found is None:
        raise SystemExit(f"callgrind run {mode} failed (exit {done.returncode}):\n"
                         f"{done.stdout}{done.stderr[-2000:]}")
    return int(found.group(1))


def instructions(rounds: int) -> None:
    sequence = start_sequence()
    fed = count_instructions("feed", rounds)
    dry = count_instructions("dry", rounds)
    per_sequence = (fed - dry) / rounds
    print(f"start sequence: {per_sequence:,.0f} instructions ({per_sequence / len(sequence):,.0f}"
          f" per message, {len(sequence)} messages; callgrind, {rounds} rounds fed minus "
          "not fed)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000, help="messages per timed run")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs; the best counts")
    parser.add_argument("--instructions", action="store_true",
                        help="count instructions per start sequence under callgrind instead")
    parser.add_argument("--rounds", type=int, default=200,
                        help="start sequences per callgrind run (with --instructions)")
    parser.add_argument("--count-run", nargs=2, metavar=("MODE", "ROUNDS"),
                        help=argparse.SUPPRESS)  # what --instructions runs under callgrind
    args = parser.parse_args()
    if args.count_run:
        mode, rounds = args.count_run
        sequence_rounds(start_sequence(), int(rounds), feed=mode == "feed")
        return 0
    print(f"bench_codec: {p.__file__}")
    if args.instructions:
        if args.rounds < 1:
            parser.error(f"--rounds must be at least 1, not {args.rounds}")
        instructions(args.rounds)
        return 0
    n, k = args.messages, args.repeats
    print(f"bench_codec: {p.__file__}")
    print(f"{'message':20} {'codec µs':>9} {'session µs':>11}")
    for label, (data, nfds), table in SINGLE:
        codec_us = best_of(k, lambda d=data, f=nfds: time_codec(d, f, n))  # type: ignore[misc]
        session_us = best_of(
            k, lambda d=data, f=nfds, t=table: time_session(d, f, n, table=t)  # type: ignore[misc]
        )
        print(f"{label:20} {codec_us:9.2f} {session_us:11.2f}")
    sequence = start_sequence()
    rounds = max(1, n // len(sequence))
    whole = best_of(k, lambda: time_sequence(sequence, rounds))
    print(f"{'start sequence':20} {'':9} {whole / len(sequence):11.2f}  per message "
          f"({len(sequence)} messages, {whole:.0f} µs whole)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
