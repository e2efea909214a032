"""Many Python vhost-user frontends at once against one shim: a connect storm and traffic
through every connection (the load tests and ``bench/bench_load.py``)."""

from __future__ import annotations

import resource
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from harness.errors import ScenarioError
from harness.frames import GUEST_MAC, PEER_MAC, TEST_ETHERTYPE, frame
from kvhost import abi
from kvhost.errors import KvhostError
from kvhost.memory import GuestMemory
from kvhost.vhost_user.frontend import NetDevice, VhostUserFrontend

#: one frontend's guest memory: a QEMU-like low region, then room for two 256-entry rings
#: and their 2 KiB buffers
LOAD_MEMORY = [(0, 0xC0000), (0x100000, 2 << 20)]
LOAD_BASE_GPA = 0x100000
#: issue 6's target for the shim's memory per connection, guest memory excluded
RSS_PER_CONNECTION = 4 << 20
#: fds per load frontend: socket, 2 memfds, 4 eventfds; the shim: socket, vhost-net, tun
FDS_PER_FRONTEND = 8


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
                          socket.htons(abi.ETH_P_ALL))
    try:
        # every frame of every tap in the namespace lands here: net.core.rmem_max (208 KiB
        # by default, ~300 small frames) would drop some, so force the size (root)
        try:
            sniff.setsockopt(socket.SOL_SOCKET, abi.SO_RCVBUFFORCE, 32 << 20)
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
            sender = owner.pop(data, None) if addr[2] != abi.PACKET_OUTGOING else None
            if sender is None:
                continue
            if sender.tap not in (None, addr[0]):
                raise ScenarioError(f"frontend {sender.index}: frames came out of both "
                                    f"{sender.tap} and {addr[0]}")
            sender.tap = addr[0]
        if owner:
            lost = sorted({f.index for f in owner.values()})
            stats = sniff.getsockopt(abi.SOL_PACKET, abi.PACKET_STATISTICS, abi.TPACKET_STATS.size)
            _, drops = abi.TPACKET_STATS.unpack(stats)
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
