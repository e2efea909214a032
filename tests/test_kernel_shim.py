"""Kernel tier: kvhost's Python frontend -> kvhost-shim -> kernel vhost-net -> tap.

Everything here is real: the shim server runs in a thread of the test process (so
``fd_leak_check`` sees its fds too), inside the fresh network namespace of the ``netns_quiet``
fixture, with real /dev/vhost-net devices and real taps. Frames sent through a TX ring must
come out of the tap (seen by an AF_PACKET socket on the tap, the host side) byte for byte;
frames sent out of the tap from the host side must land in RX buffers byte for byte.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import mmap
import os
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar, Protocol

import pytest

from harness import netlink
from kvhost import abi, features, versions
from kvhost import ioctl as kv_ioctl
from kvhost.errors import RemoteProtocolError
from kvhost.memory import GuestMemory, MemoryRegion
from kvhost.vhost import LogRegion
from kvhost.vhost_user import protocol as p
from kvhost.vhost_user.frontend import (
    BackendRefused,
    NetDevice,
    VersionRefused,
    VhostUserFrontend,
)
from kvhost.vhost_user.protocol import Request as R
from shim.kernel_backend import KernelBackend
from shim.server import ShimConfig, ShimServer
from shim.session import Backend
from shim.tap_setup import TapSpec

pytestmark = pytest.mark.kernel

V1 = versions.parse("org.kernel.vhost-net.v1")
V5 = versions.parse("org.kernel.vhost-net.v5")

ETH_P_TEST = 0x88B5  # IEEE 802 local experimental ethertype: nothing else sends it
MEMORY = [(0, 0xC0000), (0x100000, 8 << 20)]  # QEMU-like: a low hole, then RAM
BASE_GPA = 0x100000


class Shim:
    """A ShimServer in a thread, one created tap per connection (``kvs1``, ``kvs2``...)."""

    def __init__(
        self,
        path: str,
        version: versions.InterfaceVersion,
        queues: int,
        *,
        pinned: bool = False,
        supported: list[versions.InterfaceVersion] | None = None,
        allow_mtu_change: bool = False,
    ) -> None:
        self.path = path
        self.queues = queues
        self.taps: list[str] = []

        def make_backend(name: str) -> Backend:
            tap = f"kvs{len(self.taps) + 1}"
            self.taps.append(tap)
            return KernelBackend(
                TapSpec(queues=queues, name=tap).open,
                queues,
                name=name,
                allow_mtu_change=allow_mtu_change,
            )

        config = ShimConfig(version, make_backend, supported or [version], pinned)
        self.server = ShimServer.listen(path, config)
        self.thread = threading.Thread(target=self.server.serve, name="shim", daemon=True)
        self.thread.start()

    def frontend(self) -> VhostUserFrontend:
        fe = VhostUserFrontend(self.path, timeout=60)
        fe.connect()
        return fe

    def wait_idle(self, timeout: float = 5.0) -> None:
        """Wait until the server has no connection left."""
        deadline = time.monotonic() + timeout
        while self.server.connections and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not self.server.connections, "the shim kept a connection open"

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(10)
        assert not self.thread.is_alive(), "the shim did not stop"


class ShimFactory(Protocol):
    """What the ``make_shim`` fixture yields: Shim's arguments minus the socket path."""

    def __call__(
        self,
        version: versions.InterfaceVersion = ...,
        queues: int = ...,
        *,
        pinned: bool = ...,
        supported: list[versions.InterfaceVersion] | None = ...,
        allow_mtu_change: bool = ...,
    ) -> Shim: ...


@pytest.fixture
def make_shim(tmp_path: Path, netns_quiet: str) -> Iterator[ShimFactory]:
    started: list[Shim] = []

    def make(
        version: versions.InterfaceVersion = V5,
        queues: int = 1,
        *,
        pinned: bool = False,
        supported: list[versions.InterfaceVersion] | None = None,
        allow_mtu_change: bool = False,
    ) -> Shim:
        path = str(tmp_path / f"shim{len(started)}.sock")
        shim = Shim(
            path,
            version,
            queues,
            pinned=pinned,
            supported=supported,
            allow_mtu_change=allow_mtu_change,
        )
        started.append(shim)
        return shim

    yield make
    for shim in started:
        shim.stop()


class IoctlLog:
    """Stands in for ``fcntl`` inside kvhost.ioctl (the one place ioctls are issued) and
    records each request's name; the shim serves from a thread of this process."""

    NAMES: ClassVar[dict[int, str]] = {i.number: i.name for i in abi.ALL_IOCTLS}

    def __init__(self) -> None:
        self.names: list[str] = []

    def ioctl(self, fd: int, request: int, arg: object = 0, mutate: bool = True) -> object:
        self.names.append(self.NAMES.get(request, hex(request)))
        return fcntl.ioctl(fd, request, arg, mutate)  # type: ignore[call-overload]


@contextlib.contextmanager
def ioctls_issued(
    monkeypatch: pytest.MonkeyPatch, fe: VhostUserFrontend
) -> Iterator[list[str]]:
    """The ioctls the shim issues for what ``fe`` sends in the body. Most requests get no
    reply, so a last request that does (the shim answers in order) makes sure the shim has
    handled everything before the recording stops."""
    log = IoctlLog()
    with monkeypatch.context() as m:
        m.setattr(kv_ioctl, "fcntl", log)
        yield log.names
        fe.get_queue_num()


def packet_socket(ifname: str) -> socket.socket:
    s = socket.socket(
        socket.AF_PACKET, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.htons(abi.ETH_P_ALL)
    )
    s.bind((ifname, 0))
    s.settimeout(0.2)
    return s


def test_frames(n: int, tag: str) -> list[bytes]:
    """Distinct frames (different source MACs and lengths, so multiqueue taps hash them
    apart) with the test ethertype."""
    out = []
    for i in range(n):
        src = bytes([0x52, 0x54, 0x00, 0x12, i >> 8 & 0xFF, i & 0xFF])
        body = f"{tag} frame {i} ".encode() * (3 + i % 7)
        out.append(b"\x02\x00\x00\x00\x00\x01" + src + struct.pack("!H", ETH_P_TEST) + body)
    return out


test_frames.__test__ = False  # type: ignore[attr-defined]


def captured(sock: socket.socket, want: int, timeout: float = 5.0) -> list[bytes]:
    """Test-ethertype frames the tap interface received (not ones the host sent)."""
    out: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(out) < want and time.monotonic() < deadline:
        try:
            data, addr = sock.recvfrom(65536)
        except TimeoutError:
            continue
        if addr[2] != abi.PACKET_OUTGOING and data[12:14] == struct.pack("!H", ETH_P_TEST):
            out.append(data)
    return out


def start(fe: VhostUserFrontend, mem: GuestMemory, queue_pairs: int = 1) -> NetDevice:
    fe.handshake()
    return fe.start_net(mem, queue_pairs=queue_pairs, base_gpa=BASE_GPA)


def assert_alive(fe: VhostUserFrontend, shim: Shim) -> None:
    """The connection still answers, and the shim still serves it."""
    assert fe.get_features() & features.PROTOCOL_FEATURES
    assert fe.get_queue_num() == min(shim.queues, 8)


# --- the datapath --------------------------------------------------------------------------


@pytest.mark.parametrize("queue_pairs", [1, 4])
def test_frames_pass_both_ways_byte_for_byte(
    fd_leak_check: None, make_shim: ShimFactory, queue_pairs: int
) -> None:
    shim = make_shim(V5, queue_pairs)
    with GuestMemory.create(MEMORY) as mem, shim.frontend() as fe:
        dev = start(fe, mem, queue_pairs)
        (tap,) = shim.taps
        with packet_socket(tap) as cap:
            # TX: every queue pair's frames come out of the tap unchanged
            sent: list[bytes] = []
            for qp in range(queue_pairs):
                frames = test_frames(3, f"tx qp{qp}")
                assert dev.send(frames, qp) == len(frames)
                sent += frames
                assert dev.wait_tx_done(qp, timeout=5)
            assert sorted(captured(cap, len(sent))) == sorted(sent)
            # RX: frames sent out of the tap from the host side land in RX buffers
            incoming = test_frames(8 * queue_pairs, "rx")
            for frame in incoming:
                cap.send(frame)
            got: list[bytes] = []
            deadline = time.monotonic() + 10
            while len(got) < len(incoming) and time.monotonic() < deadline:
                for qp in range(queue_pairs):
                    got += [
                        f
                        for f in dev.receive(qp, timeout=0.05)
                        if f[12:14] == struct.pack("!H", ETH_P_TEST)
                    ]
            assert sorted(got) == sorted(incoming)
        bases = fe.stop(dev)
        # the kernel's own ring positions come back: 3 frames consumed per TX ring
        assert [bases[2 * qp + 1] for qp in range(queue_pairs)] == [3] * queue_pairs
    shim.wait_idle()


def test_rarp_reaches_the_host_side_of_the_tap(fd_leak_check: None, make_shim: ShimFactory) -> None:
    shim = make_shim()
    with GuestMemory.create(MEMORY) as mem, shim.frontend() as fe:
        start(fe, mem)
        with packet_socket(shim.taps[0]) as cap:
            fe.send_rarp("52:54:00:ab:cd:ef")
            mac = bytes.fromhex("525400abcdef")
            deadline = time.monotonic() + 5
            frame = b""
            while time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    data, addr = cap.recvfrom(2048)
                    rarp = data[12:14] == abi.ETH_P_RARP.to_bytes(2, "big")
                    if rarp and addr[2] != abi.PACKET_OUTGOING:
                        frame = data
                        break
        assert frame[:6] == b"\xff" * 6 and frame[6:12] == mac
        assert frame[14:22] == struct.pack("!HHBBH", 1, 0x0800, 6, 4, 3)  # reverse request
        assert frame[22:28] == mac and frame[32:38] == mac
        assert len(frame) == 60
    shim.wait_idle()


def test_net_set_mtu_accepts_only_the_tap_mtu_by_default(
    fd_leak_check: None, make_shim: ShimFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A frontend lowering its tap's MTU would lower its bridge's: only the MTU the tap
    has is accepted (the frontend gives up on the refusal, as QEMU does)."""
    caplog.set_level(logging.WARNING, "kvhost.shim")
    shim = make_shim()
    with GuestMemory.create(MEMORY) as mem, shim.frontend() as fe:
        fe.handshake()
        fe.start_net(mem, base_gpa=BASE_GPA)
        fe.net_set_mtu(1500)
        assert netlink.link_info(shim.taps[0])["mtu"] == 1500
        with pytest.raises(BackendRefused, match="NET_SET_MTU"):
            fe.net_set_mtu(1280)
    shim.wait_idle()
    assert "has MTU 1500 and this shim lets no frontend change it" in caplog.text
    assert "cannot change it to 1280; start the shim with --mtu 1280" in caplog.text


def test_net_set_mtu_sets_the_tap_mtu_when_allowed(
    fd_leak_check: None, make_shim: ShimFactory
) -> None:
    shim = make_shim(allow_mtu_change=True)
    with GuestMemory.create(MEMORY) as mem, shim.frontend() as fe:
        fe.handshake()
        fe.start_net(mem, base_gpa=BASE_GPA, mtu=1280)
        assert netlink.link_info(shim.taps[0])["mtu"] == 1280
    shim.wait_idle()


def test_dirty_log_marks_pages_the_kernel_writes(
    fd_leak_check: None, make_shim: ShimFactory
) -> None:
    """LOG_SHMFD end to end: log fd mapped by the shim and given to the kernel, LOG_ALL via
    SET_FEATURES, vring log addresses: an RX frame dirties its buffer's and the used
    ring's pages in the frontend's copy of the log."""
    shim = make_shim()
    top = max(gpa + size for gpa, size in MEMORY)
    log_size = -(-top // (4096 * 8))
    log_fd = os.memfd_create("dirty-log", os.MFD_CLOEXEC)
    try:
        os.ftruncate(log_fd, log_size)
        with (
            GuestMemory.create(MEMORY) as mem,
            shim.frontend() as fe,
            mmap.mmap(log_fd, log_size) as log_map,
        ):
            dev = start(fe, mem)
            fe.set_log_base(0, LogRegion(log_size, 0, log_fd))
            fe.set_features(fe.acked_features | features.LOG_ALL)
            for ring in dev.rings:
                fe.set_vring_addr_for(ring, log=True)
            with packet_socket(shim.taps[0]) as cap:
                (frame,) = test_frames(1, "dirty")
                cap.send(frame)
                got = [f for f in dev.receive(0, timeout=5) if f[12:14] == frame[12:14]]
            assert got == [frame]
            used_page = dev.rx_ring(0).used_gpa // 4096
            dirty = {
                i * 8 + b for i, byte in enumerate(log_map[:]) for b in range(8) if byte >> b & 1
            }
            assert used_page in dirty
            # packet buffers lie above every ring; only RX data is written there
            buffers_from = max(r.used_gpa for r in dev.rings) // 4096 + 1
            assert any(page >= buffers_from for page in dirty)
    finally:
        os.close(log_fd)
    shim.wait_idle()


# --- versions ------------------------------------------------------------------------------


def test_pinned_low_version_refuses_a_newer_bit(
    fd_leak_check: None, make_shim: ShimFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "kvhost.shim")
    shim = make_shim(V1, pinned=True)
    with shim.frontend() as fe:
        fe.handshake()
        want = versions.serve_features(V1) | features.PROTOCOL_FEATURES | features.LOG_ALL
        assert fe.features == want
        newer = features.bit("VERSION_1")  # what a VM started on a v5 host negotiated
        with pytest.raises(RemoteProtocolError):
            fe.set_features(
                versions.serve_features(V1) | newer | features.PROTOCOL_FEATURES, ack=True
            )
    shim.wait_idle()
    assert "VERSION_1" in caplog.text and "does not offer" in caplog.text


def test_frontend_selects_a_version_and_a_pin_refuses_others(
    fd_leak_check: None, make_shim: ShimFactory
) -> None:
    shim = make_shim(V5, supported=[V1, V5])
    with shim.frontend() as fe:
        listed = fe.handshake(version=V1.label)
        assert listed is not None and listed.supported == (V1.label, V5.label)
        assert fe.features == (
            versions.serve_features(V1) | features.PROTOCOL_FEATURES | features.LOG_ALL
        )
    pinned = make_shim(V5, supported=[V1, V5], pinned=True)
    with pinned.frontend() as fe, pytest.raises(VersionRefused) as err:
        fe.handshake(version=V1.label)
    assert err.value.status == p.VersionStatus.PINNED
    shim.wait_idle()
    pinned.wait_idle()


# --- bad input: each dropped with a clear log line, the witness keeps working ---------------


@pytest.fixture
def witness(make_shim: ShimFactory) -> Iterator[tuple[Shim, VhostUserFrontend, NetDevice]]:
    """A shim with one healthy, running connection that must survive the bad one."""
    shim = make_shim()
    with GuestMemory.create(MEMORY) as mem, shim.frontend() as fe:
        dev = start(fe, mem)
        yield shim, fe, dev
        # still moving packets through the kernel after the other connection died
        with packet_socket(shim.taps[0]) as cap:
            frames = test_frames(2, "witness")
            dev.send(frames)
            assert sorted(captured(cap, 2)) == sorted(frames)
        assert_alive(fe, shim)


class BadPeer:
    """A second connection to the witness's shim, for one piece of bad input.

    Depending on it brings the witness (which must keep passing traffic), the fd-leak check
    and INFO logging of the shim.
    """

    def __init__(self, shim: Shim, caplog: pytest.LogCaptureFixture) -> None:
        self.shim = shim
        self.caplog = caplog
        self.fe = shim.frontend()

    def wait_connections(self, n: int) -> None:
        deadline = time.monotonic() + 5
        while len(self.shim.server.connections) > n and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(self.shim.server.connections) == n

    def wait_log(self, why: str) -> None:
        deadline = time.monotonic() + 5
        while why not in self.caplog.text and time.monotonic() < deadline:
            time.sleep(0.01)
        assert why in self.caplog.text, self.caplog.text

    def dropped(self, why: str) -> None:
        """The shim closed this connection, logged ``why``, and only the witness is left."""
        if self.fe.state.value not in ("failed", "closed"):  # else the frontend saw the refusal
            assert self.fe.wait_closed(5), "the shim kept the bad connection open"
        self.fe.close()
        self.wait_connections(1)
        self.wait_log(why)


@pytest.fixture
def bad(
    witness: tuple[Shim, VhostUserFrontend, NetDevice],
    fd_leak_check: None,
    caplog: pytest.LogCaptureFixture,
) -> Iterator[BadPeer]:
    caplog.set_level(logging.INFO, "kvhost.shim")
    peer = BadPeer(witness[0], caplog)
    try:
        yield peer
    finally:
        peer.fe.close()


def _table(mem: GuestMemory) -> p.MemTable:
    regions = mem.regions
    return p.MemTable(
        tuple(p.MemRegion(r.guest_phys_addr, r.memory_size, r.userspace_addr, 0) for r in regions)
    )


def test_truncated_header(bad: BadPeer) -> None:
    bad.fe.send_raw(p.raw_message(R.GET_FEATURES, 1, b"")[:7])
    bad.fe.close()
    bad.wait_log("hung up in the middle of a message")


def test_size_larger_than_payload(bad: BadPeer) -> None:
    bad.fe.send_raw(p.raw_message(R.SET_FEATURES, 1, bytes(8), size=4096))
    bad.dropped("SET_FEATURES announces a 4096-byte payload")


def test_unknown_request(bad: BadPeer) -> None:
    bad.fe.handshake()
    bad.fe.send_raw(p.raw_message(0x99, p.HeaderFlag.VERSION | p.HeaderFlag.NEED_REPLY, b""))
    bad.dropped("unknown request 153 (0x99) is not supported")


def test_wrong_fd_count(bad: BadPeer) -> None:
    bad.fe.handshake()
    a, b = os.eventfd(0, os.EFD_CLOEXEC), os.eventfd(0, os.EFD_CLOEXEC)
    try:
        bad.fe.send_raw(p.raw_message(R.SET_VRING_CALL, 1, p.VringFile(0).pack()), [a, b])
    finally:
        os.close(a)
        os.close(b)
    bad.dropped("SET_VRING_CALL came with 2 fds; it needs 1")


def test_mem_table_with_fewer_fds_than_regions(bad: BadPeer) -> None:
    bad.fe.handshake()
    with GuestMemory.create(MEMORY) as mem:
        bad.fe.send_raw(p.raw_message(R.SET_MEM_TABLE, 1, _table(mem).pack()), mem.fds[:1])
    bad.dropped("SET_MEM_TABLE came with 1 fds; it needs 2")


def test_ring_address_outside_memory(bad: BadPeer) -> None:
    fe = bad.fe
    fe.handshake()
    with GuestMemory.create(MEMORY) as mem:
        fe.set_features(fe.features & ~features.LOG_ALL)
        fe.set_mem_table(mem)
        fe.set_vring_num(0, 256)
        last = mem.regions[-1]
        outside = last.userspace_addr + last.memory_size - 0x800  # the ring runs off the end
        fe.send_raw(
            *fe.codec.request(
                R.SET_VRING_ADDR,
                p.VringAddr(0, 0, outside, mem.hva(BASE_GPA), mem.hva(BASE_GPA + 0x1000), 0),
            )
        )
        bad.dropped("is outside every memory region")


def test_overlapping_regions(bad: BadPeer) -> None:
    bad.fe.handshake()
    with GuestMemory.create([(0, 1 << 20), (1 << 20, 1 << 20)]) as mem:
        a, b = mem.regions
        overlapping = [a, MemoryRegion(0x80000, b.memory_size, b.userspace_addr, b.fd)]
        with contextlib.suppress(RemoteProtocolError):
            bad.fe.set_mem_table(overlapping)
        bad.dropped("overlap")


def test_too_many_regions_for_the_protocol(bad: BadPeer) -> None:
    bad.fe.handshake()
    regions = [(i << 20, 1 << 16) for i in range(9)]
    with GuestMemory.create(regions) as mem:
        head = struct.pack("=II", 9, 0)
        body = b"".join(
            p.MemRegion(r.guest_phys_addr, r.memory_size, r.userspace_addr, 0).pack()
            for r in mem.regions
        )  # packed by hand: the codec itself refuses to build a table this large
        bad.fe.send_raw(p.raw_message(R.SET_MEM_TABLE, 1, head + body), mem.fds[:8])
    bad.dropped("memory table announces 9 regions")


def test_message_in_the_wrong_state(bad: BadPeer) -> None:
    bad.fe.get_features()
    with GuestMemory.create(MEMORY) as mem:
        bad.fe.send_raw(*bad.fe.codec.request(R.SET_MEM_TABLE, _table(mem), mem.fds))
    bad.dropped("SET_MEM_TABLE is not allowed before SET_OWNER")


def test_resizing_a_running_ring(bad: BadPeer) -> None:
    with GuestMemory.create(MEMORY) as mem:
        start(bad.fe, mem)
        bad.fe.send_raw(*bad.fe.codec.request(R.SET_VRING_NUM, p.VringState(1, 128)))
        bad.dropped("stop it with GET_VRING_BASE first")


def test_frontend_disconnect_mid_setup(bad: BadPeer) -> None:
    fe = bad.fe
    fe.handshake()
    with GuestMemory.create(MEMORY) as mem:
        fe.set_features(fe.features & ~features.LOG_ALL)
        fe.set_mem_table(mem)
        fe.set_vring_num(0, 256)
        fe.close()
    bad.wait_connections(1)
    bad.wait_log("closed: frontend hung up")


def test_sigterm_like_stop_detaches_rings_and_closes_everything(
    fd_leak_check: None, make_shim: ShimFactory
) -> None:
    shim = make_shim()
    with GuestMemory.create(MEMORY) as mem, shim.frontend() as fe:
        start(fe, mem)
        shim.stop()
        assert fe.wait_closed(5)
    assert not Path(shim.path).exists()
    # the tap vanished with its last fd
    with pytest.raises(Exception, match="no network interface"):
        netlink.link_index(shim.taps[0])


def test_restart_on_one_connection_skips_only_what_the_kernel_already_has(
    fd_leak_check: None, make_shim: ShimFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """QEMU repeats its whole start sequence at every DRIVER_OK on one connection. The shim
    issues no ioctl for what the kernel already has (same features, the same regions of the
    same memfds, same ring sizes and addresses): frames must flow after such a restart, and
    after one with new guest memory, which must replace the table."""
    shim = make_shim()

    def traffic(dev: NetDevice, tag: str) -> None:
        with packet_socket(shim.taps[0]) as cap:
            frames = test_frames(3, tag)
            assert dev.send(frames) == len(frames)
            assert dev.wait_tx_done(timeout=5)
            assert sorted(captured(cap, len(frames))) == sorted(frames)

    with shim.frontend() as fe:
        with GuestMemory.create(MEMORY) as mem:
            dev = start(fe, mem)
            (conn,) = shim.server.connections.values()
            backend = conn.session.backend
            assert isinstance(backend, KernelBackend)
            first_table = backend.table
            traffic(dev, "first")
            assert fe.stop(dev)[1] == 3
            with ioctls_issued(monkeypatch, fe) as issued:
                again = fe.start_net(mem, base_gpa=BASE_GPA)
            # what a ring start needs every time, and nothing the kernel already has
            # (one RX and one TX ring: each issues each of these once)
            assert Counter(issued) == {
                "VHOST_SET_VRING_BASE": 2,
                "VHOST_SET_VRING_KICK": 2,
                "VHOST_NET_SET_BACKEND": 2,
                "VHOST_SET_VRING_CALL": 2,
            }, issued
            assert backend.table is first_table  # the same memfds: the mapping was kept
            traffic(again, "again")
            assert fe.stop(again)[1] == 3
        with GuestMemory.create(MEMORY) as other:
            moved = fe.start_net(other, base_gpa=BASE_GPA)
            assert backend.table is not first_table  # new memfds: a new table
            traffic(moved, "moved")
            assert fe.stop(moved)[1] == 3
    shim.wait_idle()


def test_tap_header_is_set_at_connect_and_changed_only_for_a_legacy_driver(
    fd_leak_check: None, make_shim: ShimFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SET_OWNER gives the tap the 12-byte header every VERSION_1 or MRG_RXBUF driver uses,
    so SET_FEATURES (inside QEMU's DRIVER_OK) need not set it; a driver without either gets
    the 10-byte header, and frames pass with each."""
    shim = make_shim()
    modern = features.mask(["VERSION_1", "MRG_RXBUF", "GUEST_CSUM"])
    legacy = features.mask(["CSUM"])
    with GuestMemory.create(MEMORY) as mem, shim.frontend() as fe:
        fe.handshake()
        (conn,) = shim.server.connections.values()
        backend = conn.session.backend
        assert isinstance(backend, KernelBackend) and backend.tap is not None
        tap = backend.tap
        for wanted, hdr_len in ((modern, abi.VNET_HDR_MRG_LEN), (legacy, abi.VNET_HDR_LEN)):
            with ioctls_issued(monkeypatch, fe) as issued:
                dev = fe.start_net(mem, base_gpa=BASE_GPA, features=wanted)
            assert ("TUNSETVNETHDRSZ" in issued) == (hdr_len != abi.VNET_HDR_MRG_LEN), issued
            # tap offloads: none at connect, TUN_F_CSUM for GUEST_CSUM, none again for legacy
            assert "TUNSETOFFLOAD" in issued, issued
            assert tap.get_vnet_hdr_size() == hdr_len
            with packet_socket(tap.name) as cap:
                frames = test_frames(3, f"hdr {hdr_len}")
                assert dev.send(frames) == len(frames)
                assert dev.wait_tx_done(timeout=5)
                assert sorted(captured(cap, len(frames))) == sorted(frames)
            fe.stop(dev)
    shim.wait_idle()
