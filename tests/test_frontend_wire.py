"""Wire-level behaviour of the Python vhost-user frontend against a scripted fake peer.

The peer is a thread on the other end of a socketpair that decodes with BackendCodec and
answers from a table; it checks what the frontend *sends* (bytes, flags, fds), nothing about
a datapath (that is tested end to end against the shim and the real kernel elsewhere).
"""

from __future__ import annotations

import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from kvhost import features as fb
from kvhost.errors import LocalProtocolError, RemoteProtocolError, UsageError
from kvhost.memory import GuestMemory
from kvhost.vhost import LogRegion
from kvhost.vhost_user import protocol as p
from kvhost.vhost_user.frontend import (
    BackendRefused,
    FrontendState,
    VersionRefused,
    VhostUserFrontend,
)
from kvhost.virtqueue import SplitRing

BACKEND_FEATURES = fb.mask(["VERSION_1", "MRG_RXBUF", "EVENT_IDX", "LOG_ALL"]) | (1 << 30)
BACKEND_PROTOCOL = int(
    p.ProtocolFeature.MQ | p.ProtocolFeature.LOG_SHMFD | p.ProtocolFeature.REPLY_ACK
    | p.ProtocolFeature.RARP | p.ProtocolFeature.MTU
    | p.ProtocolFeature.KVHOST_INTERFACE_VERSION
)
VERSIONS = p.VersionList("v2", ("v1", "v2"))


@dataclass
class Seen:
    request: p.Request | int
    flags: int
    payload: p.Payload
    fd_ids: list[tuple[int, int, int]]  # (st_dev, st_ino, mode) of each fd received


Handler = Callable[[p.Message], p.Payload | None]


class FakePeer:
    """A backend that records every request and answers from ``answers``."""

    def __init__(self, sock: socket.socket, answers: dict[p.Request, Handler]) -> None:
        self.sock = sock
        self.answers = answers
        self.seen: list[Seen] = []
        self.error: BaseException | None = None
        self.close_on: p.Request | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        codec = p.BackendCodec()
        try:
            while True:
                data, fds, _, _ = socket.recv_fds(self.sock, 65536, p.MAX_FDS)
                if not data:
                    return
                for msg in codec.receive(data, fds):
                    ids = []
                    for fd in msg.fds:
                        st = os.fstat(fd)
                        ids.append((st.st_dev, st.st_ino, stat.S_IFMT(st.st_mode)))
                    p.close_fds(msg.fds)
                    self.seen.append(Seen(msg.request, int(msg.flags), msg.payload, ids))
                    if msg.request == self.close_on:
                        return
                    handler = self.answers.get(p.Request(msg.request))
                    reply = handler(msg) if handler else None
                    if reply is None and msg.need_reply:
                        reply = p.U64(0)
                    if reply is not None:
                        self.sock.sendall(p.BackendCodec.reply(msg, reply))
        except BaseException as err:  # surfaced by the test through .error
            self.error = err
        finally:
            codec.close()
            self.sock.close()

    def join(self) -> None:
        self.thread.join(5)
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error

    def requests(self) -> list[p.Request | int]:
        return [s.request for s in self.seen]


def default_answers() -> dict[p.Request, Handler]:
    return {
        p.Request.GET_FEATURES: lambda m: p.U64(BACKEND_FEATURES),
        p.Request.GET_PROTOCOL_FEATURES: lambda m: p.U64(BACKEND_PROTOCOL),
        p.Request.GET_QUEUE_NUM: lambda m: p.U64(2),
        p.Request.GET_INTERFACE_VERSIONS: lambda m: VERSIONS,
        p.Request.SET_INTERFACE_VERSION: lambda m: p.U64(
            0 if isinstance(m.payload, p.VersionString) and m.payload.version in VERSIONS.supported
            else p.VersionStatus.UNSUPPORTED),
        p.Request.GET_VRING_BASE: lambda m: p.VringState(
            m.payload.index if isinstance(m.payload, p.VringState) else 0, 7),
        p.Request.SET_LOG_BASE: lambda m: p.EMPTY,
    }


@pytest.fixture
def pair(fd_leak_check: None) -> Iterator[tuple[VhostUserFrontend, FakePeer]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    front = VhostUserFrontend(sock=a, timeout=5)
    peer = FakePeer(b, default_answers())
    try:
        yield front, peer
    finally:
        front.close()
        peer.join()


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory.create([(0, 0x100000), (0x100000, 0x400000)]) as mem:
        yield mem


def test_handshake_with_version_mirrors_qemu(pair: tuple[VhostUserFrontend, FakePeer]) -> None:
    front, peer = pair
    versions = front.handshake(version="v1")
    assert versions == VERSIONS
    assert front.state is FrontendState.NEGOTIATED
    front.close()
    peer.join()
    R = p.Request
    assert peer.requests() == [
        R.GET_FEATURES, R.GET_PROTOCOL_FEATURES, R.SET_PROTOCOL_FEATURES,
        R.GET_INTERFACE_VERSIONS, R.SET_INTERFACE_VERSION, R.GET_QUEUE_NUM, R.SET_OWNER,
        R.GET_FEATURES,
    ]
    assert peer.seen[2].payload == p.U64(BACKEND_PROTOCOL)  # all of ours incl. bit 63
    set_version = peer.seen[4]
    assert set_version.payload == p.VersionString("v1")
    assert set_version.flags == 0x9  # VERSION | NEED_REPLY
    assert front.queue_num == 2


def test_handshake_without_version_never_uses_bit_63(
    pair: tuple[VhostUserFrontend, FakePeer],
) -> None:
    front, peer = pair
    assert front.handshake() is None
    front.close()
    peer.join()
    assert peer.seen[2].payload == p.U64(BACKEND_PROTOCOL & ~(1 << 63))
    assert p.Request.GET_INTERFACE_VERSIONS not in peer.requests()


def test_refused_version_fails_the_connection(pair: tuple[VhostUserFrontend, FakePeer]) -> None:
    front, _peer = pair
    with pytest.raises(VersionRefused, match=r"'v9'.*UNSUPPORTED") as info:
        front.handshake(version="v9")
    assert info.value.status == p.VersionStatus.UNSUPPORTED
    assert front.state is FrontendState.FAILED and front.fileno() == -1
    with pytest.raises(LocalProtocolError, match="failed"):
        front.get_features()


def test_set_mem_table_sends_regions_and_their_memfds(
    pair: tuple[VhostUserFrontend, FakePeer], memory: GuestMemory
) -> None:
    front, peer = pair
    front.handshake()
    front.set_mem_table(memory)
    front.close()
    peer.join()
    seen = peer.seen[-1]
    assert seen.request == p.Request.SET_MEM_TABLE
    assert seen.flags == 0x9  # acked, like QEMU with REPLY_ACK
    assert seen.payload == p.MemTable((
        p.MemRegion(0, 0x100000, memory.hva(0), 0),
        p.MemRegion(0x100000, 0x400000, memory.hva(0x100000), 0),
    ))
    ours = []
    for fd in memory.fds:
        st = os.fstat(fd)
        ours.append((st.st_dev, st.st_ino, stat.S_IFMT(st.st_mode)))
    assert seen.fd_ids == ours


def test_start_net_sequence_addresses_and_fds(
    pair: tuple[VhostUserFrontend, FakePeer], memory: GuestMemory
) -> None:
    front, peer = pair
    front.handshake()
    dev = front.start_net(memory, queue_pairs=2, ring_size=64, mtu=1500)
    assert front.state is FrontendState.RUNNING
    rings = [(r.index, r.desc_gpa, r.avail_gpa, r.used_gpa) for r in dev.rings]
    kick_ids = [os.fstat(fd).st_ino for fd in dev.kick_fds]
    bases = front.stop(dev)
    assert bases == [7, 7, 7, 7]
    front.close()
    peer.join()
    R = p.Request
    start = peer.requests().index(R.SET_VRING_ENABLE)
    per_ring = [R.SET_VRING_NUM, R.SET_VRING_BASE, R.SET_VRING_ADDR, R.SET_VRING_KICK,
                R.SET_VRING_CALL]
    assert peer.requests()[start:] == (
        [R.SET_VRING_ENABLE] * 4
        + [R.SET_FEATURES, R.SET_MEM_TABLE, R.NET_SET_MTU] + per_ring * 2
        + [R.SET_FEATURES] + per_ring * 2
        + [R.GET_VRING_BASE] * 4
    )
    feats = [s.payload for s in peer.seen if s.request == R.SET_FEATURES]
    assert feats == [p.U64(BACKEND_FEATURES & ~fb.LOG_ALL)] * 2  # bit 30 kept, LOG_ALL not
    addrs = [s.payload for s in peer.seen if s.request == R.SET_VRING_ADDR]
    assert addrs == [
        p.VringAddr(i, 0, memory.hva(desc), memory.hva(used), memory.hva(avail), used)
        for i, desc, avail, used in rings
    ]
    kicks = [s for s in peer.seen if s.request == R.SET_VRING_KICK]
    assert [k.payload for k in kicks] == [p.VringFile(i) for i in range(4)]
    assert [k.fd_ids[0][1] for k in kicks] == kick_ids
    assert all(k.fd_ids[0][2] == 0 for k in kicks)  # anonymous inode: an eventfd


def test_tx_frame_lands_in_the_ring_with_a_header_and_a_kick(
    pair: tuple[VhostUserFrontend, FakePeer], memory: GuestMemory
) -> None:
    front, _peer = pair
    dev = front.start_net(memory, ring_size=16)
    frame = bytes.fromhex("ffffffffffff525400123456 0806") + b"x" * 46
    assert dev.send([frame]) == 1
    tx = dev.tx_ring()
    assert memory.read(tx.avail_gpa + 2, 2) == b"\x01\x00"  # avail.idx published
    head = int.from_bytes(memory.read(tx.avail_gpa + 4, 2), "little")
    addr = int.from_bytes(memory.read(tx.desc_gpa + 16 * head, 8), "little")
    length = int.from_bytes(memory.read(tx.desc_gpa + 16 * head + 8, 4), "little")
    assert length == 12 + len(frame)  # VERSION_1: 12-byte virtio-net header
    assert memory.read(addr, length) == bytes(12) + frame
    assert os.read(dev.kick_fds[tx.index], 8) == (1).to_bytes(8, "little")
    rx = dev.rx_ring()
    assert int.from_bytes(memory.read(rx.avail_gpa + 2, 2), "little") == 16  # RX prefilled


def test_rx_reads_used_buffers_after_a_call(
    pair: tuple[VhostUserFrontend, FakePeer], memory: GuestMemory
) -> None:
    front, _peer = pair
    dev = front.start_net(memory, ring_size=8)
    rx: SplitRing = dev.rx_ring()
    # Play device: take avail slot 0's buffer, fill it, return it through the used ring.
    head = int.from_bytes(memory.read(rx.avail_gpa + 4, 2), "little")
    addr = int.from_bytes(memory.read(rx.desc_gpa + 16 * head, 8), "little")
    memory.write(addr, bytes(12) + b"hello-frame")
    memory.write(rx.used_gpa + 4, head.to_bytes(4, "little") + (23).to_bytes(4, "little"))
    memory.write(rx.used_gpa + 2, (1).to_bytes(2, "little"))
    os.write(dev.call_fds[rx.index], (1).to_bytes(8, "little"))
    assert dev.receive(timeout=2) == [b"hello-frame"]


def test_nonzero_ack_raises_backend_refused(pair: tuple[VhostUserFrontend, FakePeer]) -> None:
    front, peer = pair
    peer.answers[p.Request.NET_SET_MTU] = lambda m: p.U64(22)
    front.handshake()
    with pytest.raises(BackendRefused, match=r"NET_SET_MTU.*22") as info:
        front.net_set_mtu(70000)
    assert info.value.status == 22 and front.state is FrontendState.FAILED


def test_backend_closing_mid_reply_is_a_remote_error(
    pair: tuple[VhostUserFrontend, FakePeer],
) -> None:
    front, peer = pair
    peer.close_on = p.Request.GET_PROTOCOL_FEATURES
    with pytest.raises(RemoteProtocolError, match="closed the connection while "
                       "GET_PROTOCOL_FEATURES awaited"):
        front.handshake()
    assert front.state is FrontendState.FAILED


def test_silent_backend_times_out(fd_leak_check: None) -> None:
    a, b = socket.socketpair()
    with (
        VhostUserFrontend(sock=a, timeout=0.2) as front,
        pytest.raises(RemoteProtocolError, match="did not answer GET_FEATURES within"),
    ):
        front.get_features()
    b.close()


def test_log_base_waits_for_reply_with_log_shmfd(
    pair: tuple[VhostUserFrontend, FakePeer],
) -> None:
    front, peer = pair
    front.handshake()
    log = os.memfd_create("log", os.MFD_CLOEXEC)
    try:
        front.set_log_base(0, LogRegion(4096, 0, log))
        front.send_rarp("52:54:00:12:34:56")
    finally:
        os.close(log)
    front.close()
    peer.join()
    assert peer.seen[-2].payload == p.LogBase(4096, 0) and len(peer.seen[-2].fd_ids) == 1
    assert peer.seen[-1].payload == p.RarpMac(bytes.fromhex("525400123456"))


def test_bad_arguments_are_usage_errors(
    pair: tuple[VhostUserFrontend, FakePeer], memory: GuestMemory
) -> None:
    front, _peer = pair
    front.handshake()
    with pytest.raises(UsageError, match="serves 2 queue pairs"):
        front.start_net(memory, queue_pairs=3)
    with pytest.raises(UsageError, match="give more memory"):
        front.start_net(memory, ring_size=1024, buf_size=4096)
    with pytest.raises(UsageError, match="exactly one"):
        VhostUserFrontend()


def test_connect_to_missing_socket_says_so(tmp_path: os.PathLike[str]) -> None:
    front = VhostUserFrontend(os.path.join(tmp_path, "nope.sock"))
    with pytest.raises(RemoteProtocolError, match="is the backend running"):
        front.connect()
    front.close()


def test_connect_waits_out_a_full_backlog_then_applies_the_timeout(
    tmp_path: os.PathLike[str],
) -> None:
    """Like QEMU, connect() blocks while the backend's listen backlog is full, instead of
    failing with EAGAIN as a socket with a timeout would; the timeout bounds replies."""
    path = os.path.join(tmp_path, "busy.sock")
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener,
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as first,
    ):
        listener.bind(path)
        listener.listen(0)
        first.connect(path)  # backlog 0 still queues one: the next connect finds it full
        front = VhostUserFrontend(path, timeout=0.2)
        outcome: list[BaseException | None] = []

        def connect() -> None:
            try:
                front.connect()
                outcome.append(None)
            except BaseException as err:
                outcome.append(err)

        waiter = threading.Thread(target=connect, daemon=True)
        waiter.start()
        waiter.join(1.0)  # five timeouts: a non-blocking connect would have failed by now
        assert outcome == [] and waiter.is_alive()
        accepted = [listener.accept()[0]]  # room in the queue: the waiting connect gets in
        waiter.join(5)
        assert outcome == [None]
        accepted.append(listener.accept()[0])
        try:
            start = time.monotonic()
            with pytest.raises(RemoteProtocolError, match=r"GET_FEATURES within 0\.2 s"):
                front.get_features()  # the backend never answers
            assert time.monotonic() - start < 3
        finally:
            front.close()
            for conn in accepted:
                conn.close()


def test_wait_closed_and_send_raw(pair: tuple[VhostUserFrontend, FakePeer]) -> None:
    front, peer = pair
    peer.close_on = p.Request.SET_OWNER
    front.send_raw(p.raw_message(p.Request.SET_OWNER, 0x1, b""))
    assert front.wait_closed(2)
    assert front.state is FrontendState.FAILED
