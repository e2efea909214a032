"""Host tier: the shim's per-connection state machine (shim.session).

The session is driven with real wire bytes through kvhost's FrontendCodec and talks to a
*recording* backend: these tests check the state logic (which verbs are called, in which
order, with which arguments, and what is answered), never what the kernel does with them --
that is tests/test_kernel_shim.py's job, against a real kernel.
"""

from __future__ import annotations

import array
import errno
import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from harness.device import GUEST, QEMU_PROTOCOL
from kvhost import features, versions
from kvhost.errors import KernelError, VersionError
from kvhost.memory import FrontendRegion
from kvhost.vhost import LogRegion, VringConfig
from kvhost.vhost_user import protocol as p
from kvhost.vhost_user.protocol import Request as R
from shim.server import ShimConfig, ShimServer
from shim.session import (
    OFFERED_PROTOCOL_FEATURES,
    ConnectionState,
    Session,
    VringState,
    unservable_reason,
)

V1 = versions.parse("org.kernel.vhost-net.v1")
V4 = versions.parse("org.kernel.vhost-net.v4")
V5 = versions.parse("org.kernel.vhost-net.v5")



class RecordingBackend:
    """Implements shim.session.Backend by recording each call; owns (closes) fds like the
    real one. ``fail`` maps a verb name to the exception it raises instead."""

    def __init__(self, queue_pairs: int = 1, max_mem_regions: int = 8) -> None:
        self._pairs = queue_pairs
        self._max = max_mem_regions
        self.calls: list[tuple[object, ...]] = []
        self.fail: dict[str, BaseException] = {}
        self.bases: dict[int, int] = {}
        self.closed = 0

    @property
    def queue_pairs(self) -> int:
        return self._pairs

    @property
    def max_mem_regions(self) -> int:
        return self._max

    def _rec(self, *call: object) -> None:
        self.calls.append(call)
        exc = self.fail.get(str(call[0]))
        if exc is not None:
            raise exc

    def set_owner(self) -> None:
        self._rec("set_owner")

    def reset_owner(self) -> None:
        self._rec("reset_owner")

    def set_features(self, virtio_features: int) -> None:
        self._rec("set_features", virtio_features)

    def set_mem_table(
        self, regions: Sequence[FrontendRegion], rings: Sequence[tuple[int, VringConfig]] = ()
    ) -> None:
        for r in regions:
            os.close(r.fd)
        self._rec(
            "set_mem_table",
            [(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset) for r in regions],
        )

    def set_log_base(self, base: int, region: LogRegion | None = None) -> None:
        assert region is not None
        os.close(region.fd)
        self._rec("set_log_base", region.size, region.offset)

    def set_vring_num(self, index: int, num: int) -> None:
        self._rec("set_vring_num", index, num)

    def set_vring_base(self, index: int, base: int) -> None:
        self._rec("set_vring_base", index, base)

    def set_vring_addr(self, index: int, config: VringConfig) -> None:
        c = config
        self._rec("set_vring_addr", index, c.flags, c.desc, c.used, c.avail, c.log_addr)

    def set_vring_kick(self, index: int, fd: int) -> None:
        os.close(fd)
        self._rec("set_vring_kick", index)

    def set_vring_call(self, index: int, fd: int) -> None:
        if fd >= 0:
            os.close(fd)
        self._rec("set_vring_call", index, fd >= 0)

    def set_vring_err(self, index: int, fd: int) -> None:
        if fd >= 0:
            os.close(fd)
        self._rec("set_vring_err", index, fd >= 0)

    def set_backend(self, index: int, attach: bool) -> None:
        # recorded as the two verbs the tests read: a ring attached or detached
        self._rec("attach" if attach else "detach", index)

    def get_vring_base(self, index: int) -> int:
        self._rec("get_vring_base", index)
        return self.bases.get(index, 0)

    def send_rarp(self, mac: bytes) -> None:
        self._rec("send_rarp", mac)

    def set_mtu(self, mtu: int) -> None:
        self._rec("set_mtu", mtu)

    def close(self) -> None:
        self.closed += 1
        self.calls.append(("close",))

    def verbs(self) -> list[object]:
        return [c[0] for c in self.calls]

    def rings(self, verb: str) -> list[int]:
        """The ring index each recorded ``verb`` call got, in call order."""
        out: list[int] = []
        for call in self.calls:
            if call[0] == verb:
                assert isinstance(call[1], int), call
                out.append(call[1])
        return out


class Peer:
    """A frontend speaking real vhost-user bytes to a Session (no socket in between)."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.codec = p.FrontendCodec()

    def send(
        self,
        request: R,
        payload: p.Payload = p.EMPTY,
        fds: Sequence[int] = (),
        *,
        need_reply: bool = False,
    ) -> list[p.Message]:
        data, out_fds = self.codec.request(request, payload, fds, need_reply=need_reply)
        return self.feed(data, out_fds)

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> list[p.Message]:
        replies: list[p.Message] = []
        for chunk in self.session.receive(data, list(fds)):
            replies.extend(self.codec.receive(chunk))
        self.session.log_events()  # as the server does, once the replies are sent
        return replies

    def u64(self, request: R, value: int | None = None, *, need_reply: bool = False) -> int | None:
        payload: p.Payload = p.EMPTY if value is None else p.U64(value)
        replies = self.send(request, payload, need_reply=need_reply)
        if not replies:
            return None
        (reply,) = replies
        assert isinstance(reply.payload, p.U64)
        return reply.payload.value

    def vring_state(self, request: R, index: int, num: int) -> list[p.Message]:
        return self.send(request, p.VringState(index, num))

    def vring_file(self, request: R, index: int) -> list[p.Message]:
        return self.send(request, p.VringFile(index), [os.eventfd(0, os.EFD_CLOEXEC)])

    def negotiate(self, protocol: int = QEMU_PROTOCOL) -> None:
        assert self.u64(R.GET_FEATURES) is not None
        assert self.u64(R.GET_PROTOCOL_FEATURES) is not None
        self.u64(R.SET_PROTOCOL_FEATURES, protocol)
        self.codec.protocol_features = protocol

    def mem_table(
        self, regions: Sequence[tuple[int, int, int]], *, need_reply: bool = False
    ) -> list[p.Message]:
        table = p.MemTable(tuple(p.MemRegion(gpa, size, va, 0) for gpa, size, va in regions))
        fds = [os.memfd_create("t", os.MFD_CLOEXEC) for _ in regions]
        return self.send(R.SET_MEM_TABLE, table, fds, need_reply=need_reply)

    def configure_ring(self, index: int, base: int = 0) -> None:
        self.vring_state(R.SET_VRING_NUM, index, 256)
        self.vring_state(R.SET_VRING_BASE, index, base)
        va = 0x7F00_0000_0000 + index * 0x10000
        self.send(R.SET_VRING_ADDR, p.VringAddr(index, 0, va, va + 0x2000, va + 0x1000, index))
        self.vring_file(R.SET_VRING_KICK, index)
        self.vring_file(R.SET_VRING_CALL, index)


def make(
    queue_pairs: int = 1,
    version: versions.InterfaceVersion = V5,
    *,
    supported: Sequence[versions.InterfaceVersion] = (),
    pinned: bool = False,
) -> tuple[Session, RecordingBackend, Peer]:
    backend = RecordingBackend(queue_pairs)
    session = Session(backend, version, supported=supported, pinned=pinned, name="test")
    return session, backend, Peer(session)


def owned(
    queue_pairs: int = 1, version: versions.InterfaceVersion = V5
) -> tuple[Session, RecordingBackend, Peer]:
    session, backend, peer = make(queue_pairs, version)
    peer.negotiate()
    peer.send(R.SET_OWNER)
    return session, backend, peer


def state_now(session: Session) -> ConnectionState:
    """``session.state``, for a check after a call that changes it: mypy keeps the narrowing
    of an earlier ``assert session.state is X`` across method calls and would call a later
    ``is Y`` impossible; a function's result has the declared type again."""
    return session.state


def ring_state_now(session: Session, ring: int) -> VringState:
    """``session.vrings[ring].state``, for the same reason as state_now."""
    return session.vrings[ring].state


def offered(version: versions.InterfaceVersion) -> int:
    return versions.serve_features(version) | features.PROTOCOL_FEATURES | features.LOG_ALL


# --- QEMU's real order ---------------------------------------------------------------------


def test_qemu_72_startup_and_driver_ok_sequence(fd_leak_check: None) -> None:
    """Reference §3: the exact order Debian's QEMU 7.2 sends, start to DRIVER_OK to quit."""
    session, backend, peer = make()
    # startup
    assert peer.u64(R.GET_FEATURES) == offered(V5)
    assert peer.u64(R.GET_PROTOCOL_FEATURES) == int(OFFERED_PROTOCOL_FEATURES)
    peer.u64(R.SET_PROTOCOL_FEATURES, QEMU_PROTOCOL)
    peer.codec.protocol_features = QEMU_PROTOCOL
    assert peer.u64(R.GET_QUEUE_NUM) == 1
    assert backend.calls == []
    assert peer.send(R.SET_OWNER) == []
    assert backend.verbs() == ["set_owner"]
    assert peer.u64(R.GET_FEATURES) == offered(V5)
    for i in (0, 1):
        peer.vring_file(R.SET_VRING_CALL, i)
        peer.vring_file(R.SET_VRING_ERR, i)
    for i in (0, 1):
        peer.vring_state(R.SET_VRING_ENABLE, i, 1)
    # DRIVER_OK: enables first, then features and the table, then the rings
    for i in (0, 1):
        peer.vring_state(R.SET_VRING_ENABLE, i, 1)
    assert peer.u64(R.SET_FEATURES, GUEST | features.PROTOCOL_FEATURES) is None
    (ack,) = peer.mem_table([(0, 0xC0000, 0x7F00_0000_0000)], need_reply=True)
    assert ack.payload == p.U64(0)
    for i in (0, 1):
        peer.configure_ring(i)
    assert session.state is ConnectionState.OWNED
    assert [r.state for r in session.vrings] == [VringState.RUNNING, VringState.RUNNING]
    set_features = [c for c in backend.calls if c[0] == "set_features"]
    assert set_features == [("set_features", GUEST)]  # PROTOCOL_FEATURES never reaches it
    # each ring attaches right after its kick, before the trailing SET_VRING_CALL
    v = backend.verbs()
    assert v[v.index("set_vring_kick") + 1] == "attach"
    assert v.count("attach") == 2
    assert v.index("set_owner") < v.index("set_features") < v.index("set_mem_table")
    # quit
    backend.bases = {0: 7, 1: 9}
    for i, want in ((0, 7), (1, 9)):
        (reply,) = peer.vring_state(R.GET_VRING_BASE, i, 0)
        assert reply.payload == p.VringState(i, want)
    assert backend.calls[-4:] == [
        ("detach", 0),
        ("get_vring_base", 0),
        ("detach", 1),
        ("get_vring_base", 1),
    ]
    assert [r.state for r in session.vrings] == [VringState.STOPPED, VringState.STOPPED]
    session.close()
    assert state_now(session) is ConnectionState.CLOSED
    assert backend.closed == 1


def test_multiqueue_init_repeats_per_pair_and_owner_is_taken_once(fd_leak_check: None) -> None:
    """QEMU runs its vhost-user init once per queue pair on the same socket."""
    session, backend, peer = make(queue_pairs=4, version=V4)
    for _ in range(4):
        peer.negotiate()
        assert peer.u64(R.GET_QUEUE_NUM) == 4
        peer.send(R.SET_OWNER)
    assert backend.verbs().count("set_owner") == 1
    peer.u64(R.SET_FEATURES, features.mask(["MRG_RXBUF", "MQ"]) | features.PROTOCOL_FEATURES)
    peer.mem_table([(0, 1 << 20, 0x7F00_0000_0000)])
    for i in range(8):
        peer.vring_state(R.SET_VRING_ENABLE, i, 1)
        peer.configure_ring(i)
    assert sorted(backend.rings("attach")) == list(range(8))
    assert session.state is ConnectionState.OWNED


def test_queue_num_is_capped_by_the_version() -> None:
    session, _backend, peer = make(queue_pairs=4, version=V1)
    peer.negotiate()
    assert peer.u64(R.GET_QUEUE_NUM) == 1
    peer.send(R.SET_OWNER)
    peer.vring_file(R.SET_VRING_CALL, 2)  # ring 2 = pair 1: not served under v1
    assert session.state is ConnectionState.FAILED
    assert "vrings 0-1" in (session.error or "")


# --- features and the pinned version -------------------------------------------------------


def test_get_features_offers_exactly_the_version_plus_plumbing() -> None:
    for v in versions.registry():
        if unservable_reason(v) is not None:
            continue
        _, _, peer = make(version=v)
        got = peer.u64(R.GET_FEATURES)
        assert got == versions.serve_features(v) | (1 << 30) | (1 << 26)


def test_versions_with_bits_above_63_cannot_be_served_over_vhost_user() -> None:
    wide = versions.parse(
        "vhost-net:features=VERSION_1+GUEST_UDP_TUNNEL_GSO+HOST_UDP_TUNNEL_GSO+GUEST_TSO4"
        "+HOST_TSO4+CSUM+GUEST_CSUM,queue-size=256,queue-pairs=1,mtu=off"
    )
    reason = unservable_reason(wide)
    assert reason is not None
    assert "GUEST_UDP_TUNNEL_GSO" in reason
    assert unservable_reason(V5) is None
    with pytest.raises(VersionError, match="64"):
        make(version=wide)
    # and it is never listed as selectable
    session, _, _ = make(version=V5, supported=[V1, wide, V5])
    assert session.supported == [V1, V5]


def test_set_features_with_a_newer_bit_is_refused_naming_it(
    fd_leak_check: None, caplog: pytest.LogCaptureFixture
) -> None:
    session, backend, peer = owned(version=V1)
    newer = features.bit("RING_RESET")
    assert not offered(V1) & newer
    caplog.set_level(logging.ERROR, "kvhost.shim")
    legacy = features.mask(["CSUM", "GUEST_CSUM", "INDIRECT_DESC"])
    (ack,) = peer.send(R.SET_FEATURES, p.U64(legacy | newer), need_reply=True)
    assert ack.payload == p.U64(1)
    assert session.state is ConnectionState.FAILED
    assert "RING_RESET" in (session.error or "")
    assert "RING_RESET" in caplog.text
    assert "set_features" not in backend.verbs()
    assert backend.closed == 1


def test_log_all_is_accepted_and_passed_on() -> None:
    session, backend, peer = owned()
    peer.u64(R.SET_FEATURES, GUEST | features.LOG_ALL | features.PROTOCOL_FEATURES)
    assert backend.calls[-1] == ("set_features", GUEST | features.LOG_ALL)
    assert session.state is ConnectionState.OWNED


def test_without_protocol_features_rings_start_enabled(fd_leak_check: None) -> None:
    session, backend, peer = make()
    peer.send(R.SET_OWNER)
    peer.u64(R.SET_FEATURES, GUEST)
    peer.mem_table([(0, 1 << 20, 0x7F00_0000_0000)])
    peer.configure_ring(0)
    assert ("attach", 0) in backend.calls
    assert session.vrings[0].state is VringState.RUNNING


def test_protocol_features_not_offered_are_refused() -> None:
    session, _, peer = make()
    peer.send(R.SET_PROTOCOL_FEATURES, p.U64(int(p.ProtocolFeature.PAGEFAULT)))
    assert session.state is ConnectionState.FAILED
    assert "PAGEFAULT" in (session.error or "")


# --- the version extension -----------------------------------------------------------------


def _ext_peer(
    version: versions.InterfaceVersion,
    supported: Sequence[versions.InterfaceVersion],
    *,
    pinned: bool = False,
) -> tuple[Session, RecordingBackend, Peer]:
    session, backend, peer = make(version=version, supported=supported, pinned=pinned)
    peer.negotiate(int(OFFERED_PROTOCOL_FEATURES))
    return session, backend, peer


def _set_version(peer: Peer, text: str) -> int:
    (reply,) = peer.send(R.SET_INTERFACE_VERSION, p.VersionString(text))
    assert isinstance(reply.payload, p.U64)
    return reply.payload.value


def test_interface_versions_are_listed_and_selectable() -> None:
    session, _, peer = _ext_peer(version=V5, supported=[V1, V4, V5])
    (reply,) = peer.send(R.GET_INTERFACE_VERSIONS)
    assert reply.payload == p.VersionList(V5.label, (V1.label, V4.label, V5.label))
    assert _set_version(peer, V1.spec()) == p.VersionStatus.OK
    assert session.version == V1
    assert peer.u64(R.GET_FEATURES) == offered(V1)


def test_interface_version_refusals_keep_the_connection() -> None:
    session, _, peer = _ext_peer(version=V4, supported=[V1, V4])
    assert _set_version(peer, "org.kernel.vhost-net.v999") == p.VersionStatus.UNKNOWN
    assert _set_version(peer, V5.label) == p.VersionStatus.UNSUPPORTED
    assert session.version == V4
    peer.send(R.SET_OWNER)
    peer.u64(R.SET_FEATURES, features.bit("MRG_RXBUF"))
    assert _set_version(peer, V1.label) == p.VersionStatus.BAD_STATE
    assert session.version == V4
    assert session.state is ConnectionState.OWNED


def test_pinned_version_cannot_be_changed() -> None:
    session, _, peer = _ext_peer(version=V4, supported=[V1, V4, V5], pinned=True)
    (reply,) = peer.send(R.GET_INTERFACE_VERSIONS)
    assert reply.payload == p.VersionList(V4.label, (V4.label,))
    assert _set_version(peer, V1.label) == p.VersionStatus.PINNED
    assert _set_version(peer, V4.spec()) == p.VersionStatus.OK
    assert session.version == V4


def test_set_interface_version_without_bit_63_is_a_bad_state() -> None:
    session, _, peer = make(version=V4, supported=[V1, V4])
    peer.negotiate()  # QEMU's set: no bit 63
    assert _set_version(peer, V1.label) == p.VersionStatus.BAD_STATE
    assert session.version == V4


# --- rings ---------------------------------------------------------------------------------


def test_enable_and_disable_attach_and_detach(fd_leak_check: None) -> None:
    session, backend, peer = owned()
    peer.u64(R.SET_FEATURES, GUEST | features.PROTOCOL_FEATURES)
    peer.mem_table([(0, 1 << 20, 0x7F00_0000_0000)])
    peer.configure_ring(0)
    assert session.vrings[0].state is VringState.STARTED  # not enabled yet
    assert "attach" not in backend.verbs()
    peer.vring_state(R.SET_VRING_ENABLE, 0, 1)
    assert backend.calls[-1] == ("attach", 0)
    peer.vring_state(R.SET_VRING_ENABLE, 0, 0)
    assert backend.calls[-1] == ("detach", 0)
    assert session.vrings[0].state is VringState.STARTED
    # a ring stopped by GET_VRING_BASE needs a new kick before it runs again
    peer.vring_state(R.GET_VRING_BASE, 0, 0)
    peer.vring_state(R.SET_VRING_ENABLE, 0, 1)
    assert ring_state_now(session, 0) is VringState.STOPPED
    peer.vring_file(R.SET_VRING_KICK, 0)
    assert ring_state_now(session, 0) is VringState.RUNNING


def test_resizing_a_running_ring_fails_the_connection(fd_leak_check: None) -> None:
    session, backend, peer = owned()
    peer.u64(R.SET_FEATURES, GUEST)
    peer.mem_table([(0, 1 << 20, 0x7F00_0000_0000)])
    peer.configure_ring(0)
    peer.vring_state(R.SET_VRING_NUM, 0, 128)
    assert session.state is ConnectionState.FAILED
    assert "GET_VRING_BASE first" in (session.error or "")
    # failing stops the running ring before closing the devices
    assert backend.calls[-2:] == [("detach", 0), ("close",)]


@pytest.mark.parametrize("num", [0, 3, 2048, 1 << 20])
def test_ring_sizes_outside_the_version_are_refused(num: int) -> None:
    session, backend, peer = owned(version=V1)
    peer.vring_state(R.SET_VRING_NUM, 0, num)
    assert session.state is ConnectionState.FAILED
    assert "power of two from 1 to 1024" in (session.error or "")
    assert "set_vring_num" not in backend.verbs()


def test_ring_address_before_the_memory_table_fails() -> None:
    session, _, peer = owned()
    peer.send(R.SET_VRING_ADDR, p.VringAddr(0, 0, 0x1000, 0x3000, 0x2000, 0))
    assert session.state is ConnectionState.FAILED
    assert "before SET_MEM_TABLE" in (session.error or "")


def test_kick_without_fd_is_refused(fd_leak_check: None) -> None:
    session, _, peer = owned()
    peer.send(R.SET_VRING_KICK, p.VringFile(0, no_fd=True))
    assert session.state is ConnectionState.FAILED
    assert "polling mode" in (session.error or "")


def test_call_without_fd_unbinds() -> None:
    session, backend, peer = owned()
    peer.send(R.SET_VRING_CALL, p.VringFile(1, no_fd=True))
    assert backend.calls[-1] == ("set_vring_call", 1, False)
    assert session.state is ConnectionState.OWNED


# --- bad input and wrong state -------------------------------------------------------------


@pytest.mark.parametrize(
    "request_", [R.SET_FEATURES, R.SET_MEM_TABLE, R.SET_VRING_NUM, R.SEND_RARP]
)
def test_device_messages_before_set_owner_fail(fd_leak_check: None, request_: R) -> None:
    session, backend, peer = make()
    peer.negotiate()
    payloads: dict[R, p.Payload] = {
        R.SET_FEATURES: p.U64(0),
        R.SET_VRING_NUM: p.VringState(0, 256),
        R.SEND_RARP: p.RarpMac(bytes(6)),
    }
    payload = payloads.get(request_, p.EMPTY)
    if request_ is R.SET_MEM_TABLE:
        peer.mem_table([(0, 4096, 0x1000)])
    else:
        peer.send(request_, payload)
    assert session.state is ConnectionState.FAILED
    assert "before SET_OWNER" in (session.error or "")
    assert backend.calls == [("close",)]


def test_unknown_request_gets_a_failure_ack_and_fails(fd_leak_check: None) -> None:
    session, _backend, _peer = owned()
    flags = p.HeaderFlag.VERSION | p.HeaderFlag.NEED_REPLY
    out = session.receive(p.raw_message(0x77, flags, b""), [])
    assert len(out) == 1
    request, _, size = p.HEADER.unpack_from(out[0])
    assert (request, size, out[0][p.HEADER_SIZE :]) == (0x77, 8, p.U64(1).pack())
    assert session.state is ConnectionState.FAILED
    assert "unknown request 119" in (session.error or "")


def test_unsupported_known_request_fails(fd_leak_check: None) -> None:
    session, _, _peer = owned()
    fd = os.eventfd(0)
    session.receive(p.raw_message(R.SET_LOG_FD, p.HeaderFlag.VERSION, b""), [fd])
    assert session.state is ConnectionState.FAILED
    assert "SET_LOG_FD is not supported" in (session.error or "")
    with pytest.raises(OSError) as err:
        os.fstat(fd)
    assert err.value.errno == errno.EBADF


@pytest.mark.parametrize("request_", [R.ADD_MEM_REG, R.REM_MEM_REG])
def test_memory_slot_requests_are_refused_as_unsupported(
    fd_leak_check: None, request_: R
) -> None:
    """CONFIGURE_MEM_SLOTS is never offered: a slot request is not decoded (Raw, its fd
    closed by the codec) and fails the connection with a failure ack naming it."""
    session, backend, _peer = owned()
    session.protocol_features |= int(p.ProtocolFeature.REPLY_ACK)
    flags = p.HeaderFlag.VERSION | p.HeaderFlag.NEED_REPLY
    fd = os.eventfd(0)
    out = session.receive(p.raw_message(request_, flags, bytes(40)), [fd])
    assert [p.HEADER.unpack_from(o) for o in out] == [(int(request_), 0x5, 8)]
    assert out[0][p.HEADER_SIZE :] == p.U64(1).pack()
    assert session.state is ConnectionState.FAILED
    assert f"{request_.name} is not supported" in (session.error or "")
    assert ("close",) in backend.calls
    with pytest.raises(OSError):
        os.fstat(fd)


def test_truncated_header_then_garbage_fails_without_raising() -> None:
    session, backend, _ = owned()
    assert session.receive(b"\x01\x00\x00", []) == []
    assert session.state is ConnectionState.OWNED  # just incomplete so far
    session.receive(b"\x00\x07\x00\x00\x00" + b"\xff" * 4, [])
    assert state_now(session) is ConnectionState.FAILED
    assert "malformed message" in (session.error or "")
    assert backend.closed == 1


def test_wrong_fd_count_closes_every_fd(fd_leak_check: None) -> None:
    session, _, peer = owned()
    data, _ = peer.codec.request(R.SET_VRING_KICK, p.VringFile(0), [0])
    fds = [os.eventfd(0), os.eventfd(0)]
    session.receive(data, fds)
    assert session.state is ConnectionState.FAILED
    assert "2 fds" in (session.error or "")


def test_too_many_regions_for_this_host_fail(fd_leak_check: None) -> None:
    backend = RecordingBackend(max_mem_regions=2)
    session = Session(backend, V5, name="test")
    peer = Peer(session)
    peer.negotiate()
    peer.send(R.SET_OWNER)
    peer.mem_table([(0, 4096, 0x10000), (0x10000, 4096, 0x20000), (0x20000, 4096, 0x30000)])
    assert session.state is ConnectionState.FAILED
    assert "at most 2" in (session.error or "")
    assert "set_mem_table" not in backend.verbs()


def test_messages_after_failure_are_ignored_and_their_fds_closed(fd_leak_check: None) -> None:
    session, backend, peer = owned()
    peer.vring_state(R.SET_VRING_NUM, 9, 256)
    assert session.state is ConnectionState.FAILED
    n = len(backend.calls)
    data, _ = peer.codec.request(R.SET_VRING_KICK, p.VringFile(0), [0])
    assert session.receive(data, [os.eventfd(0)]) == []
    assert len(backend.calls) == n


def test_kernel_refusal_fails_the_connection_with_a_failure_ack() -> None:
    session, backend, peer = owned()
    backend.fail["set_mem_table"] = KernelError("VHOST_SET_MEM_TABLE", "/dev/vhost-net", 7)
    (ack,) = peer.mem_table([(0, 4096, 0x1000)], need_reply=True)
    assert ack.payload == p.U64(1)
    assert session.state is ConnectionState.FAILED
    assert "refused by the kernel" in (session.error or "")


def test_mtu_refused_by_the_tap_keeps_the_connection() -> None:
    session, backend, peer = owned()
    backend.fail["set_mtu"] = KernelError("RTM_NEWLINK", "tap0", errno.EINVAL)
    assert peer.u64(R.NET_SET_MTU, 9000, need_reply=True) == 1
    assert session.state is ConnectionState.OWNED
    del backend.fail["set_mtu"]
    assert peer.u64(R.NET_SET_MTU, 1400, need_reply=True) == 0
    assert backend.calls[-1] == ("set_mtu", 1400)
    assert peer.u64(R.NET_SET_MTU, 20, need_reply=True) == 1


def test_a_backend_bug_costs_the_connection_not_the_process(
    caplog: pytest.LogCaptureFixture,
) -> None:
    session, backend, peer = owned()
    backend.fail["send_rarp"] = RuntimeError("boom")
    peer.send(R.SEND_RARP, p.RarpMac(bytes.fromhex("525400123456")))
    assert session.state is ConnectionState.FAILED
    assert "internal error" in (session.error or "")
    assert "boom" in caplog.text


def test_log_base_needs_log_shmfd_and_is_answered(fd_leak_check: None) -> None:
    session, backend, peer = owned()
    fd = os.memfd_create("log", os.MFD_CLOEXEC)
    (reply,) = peer.send(R.SET_LOG_BASE, p.LogBase(4096, 0), [fd])
    assert reply.request == R.SET_LOG_BASE
    assert backend.calls[-1] == ("set_log_base", 4096, 0)

    session, backend, peer = make()
    peer.negotiate(int(p.ProtocolFeature.REPLY_ACK))
    peer.send(R.SET_OWNER)
    peer.send(R.SET_LOG_BASE, p.LogBase(4096, 0), [os.memfd_create("log", os.MFD_CLOEXEC)])
    assert session.state is ConnectionState.FAILED
    assert "LOG_SHMFD" in (session.error or "")


def test_rarp_and_mtu_reach_the_backend() -> None:
    _session, backend, peer = owned()
    peer.send(R.SEND_RARP, p.RarpMac(bytes.fromhex("525400123456")))
    peer.u64(R.NET_SET_MTU, 1500)
    assert backend.calls[-2:] == [
        ("send_rarp", bytes.fromhex("525400123456")),
        ("set_mtu", 1500),
    ]


def test_reset_owner_stops_rings_and_forgets_setup(fd_leak_check: None) -> None:
    session, backend, peer = owned()
    peer.u64(R.SET_FEATURES, GUEST)
    peer.mem_table([(0, 1 << 20, 0x7F00_0000_0000)])
    peer.configure_ring(0)
    peer.send(R.RESET_OWNER)
    assert backend.calls[-2:] == [("detach", 0), ("reset_owner",)]
    assert session.vrings[0].state is VringState.STOPPED
    assert not session.has_mem_table
    peer.send(R.SET_VRING_ADDR, p.VringAddr(0, 0, 0x1000, 0x3000, 0x2000, 0))
    assert session.state is ConnectionState.FAILED


def test_close_stops_running_rings() -> None:
    session, backend, peer = owned()
    peer.u64(R.SET_FEATURES, GUEST)
    peer.mem_table([(0, 1 << 20, 0x7F00_0000_0000)])
    peer.configure_ring(1)
    session.close()
    assert backend.calls[-2:] == [("detach", 1), ("close",)]
    assert session.done




def test_close_closes_the_backend_even_when_a_detach_fails(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Found by bench/fuzz_session.py: a refused VHOST_NET_SET_BACKEND -1 at hang-up used to
    skip the backend's close, leaking its devices, tap and mappings."""
    session, backend, peer = owned()
    peer.u64(R.SET_FEATURES, GUEST)
    peer.mem_table([(0, 1 << 20, 0x7F00_0000_0000)])
    peer.configure_ring(0)
    backend.fail["detach"] = KernelError("VHOST_NET_SET_BACKEND", "/dev/vhost-net", errno.EINVAL)
    session.close()
    assert backend.closed == 1 and state_now(session) is ConnectionState.CLOSED
    assert "detaching the rings failed (closing the devices anyway)" in caplog.text
    session.close()  # idempotent
    assert backend.closed == 1

class _SlowBackend(RecordingBackend):
    """Kernel calls that take ``DELAY`` seconds: the ring-stop and ring-start events must
    account for them."""

    DELAY = 0.02

    def set_vring_num(self, index: int, num: int) -> None:
        time.sleep(self.DELAY)
        super().set_vring_num(index, num)

    def get_vring_base(self, index: int) -> int:
        time.sleep(self.DELAY)
        return super().get_vring_base(index)


def _events(caplog: pytest.LogCaptureFixture, name: str) -> list[tuple[int, dict[str, object]]]:
    return [
        (r.levelno, r.kvhost_event)  # type: ignore[attr-defined]
        for r in caplog.records
        if getattr(r, "kvhost_event", {}).get("event") == name
    ]


def test_ring_stop_and_start_events_time_the_shim_s_share(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """What bench_qemu sums into the shim's share of migration downtime: each GET_VRING_BASE
    says how long it took (request to reply), each running ring how long since the first ring
    message of its start; both at info level, so a default shim logs them."""
    caplog.set_level(logging.DEBUG, logger="kvhost.shim")
    backend = _SlowBackend()
    session = Session(backend, V5, name="test")
    peer = Peer(session)
    peer.negotiate()
    peer.send(R.SET_OWNER)
    peer.u64(R.SET_FEATURES, GUEST)
    peer.mem_table([(0, 1 << 20, 0x7F00_0000_0000)])
    for i in (0, 1):
        peer.configure_ring(i)
    running = _events(caplog, "vring")
    assert [(lvl, e["vring"]) for lvl, e in running] == [(logging.INFO, 0), (logging.INFO, 1)]
    first, second = (int(e["start_us"]) for _, e in running)  # type: ignore[call-overload]
    # one start, measured from ring 0's SET_VRING_NUM: both slow SET_VRING_NUMs lie in ring 1's
    assert first >= 1e6 * backend.DELAY and second >= 2e6 * backend.DELAY and second > first
    for i in (0, 1):
        peer.vring_state(R.GET_VRING_BASE, i, 0)
    stops = [(lvl, e) for lvl, e in _events(caplog, "vring_base")
             if e["request"] == "GET_VRING_BASE"]  # fmt: skip
    assert [(lvl, e["vring"]) for lvl, e in stops] == [(logging.INFO, 0), (logging.INFO, 1)]
    assert all(int(e["took_us"]) >= 1e6 * backend.DELAY for _, e in stops)  # type: ignore[call-overload]
    # a new start is timed from its own first ring message, not the previous start's
    caplog.clear()
    t0 = time.monotonic()
    peer.configure_ring(0)
    elapsed_us = (time.monotonic() - t0) * 1e6
    ((_, again),) = _events(caplog, "vring")
    assert 0 <= int(again["start_us"]) <= elapsed_us  # type: ignore[call-overload]
    session.close()


def test_events_wait_until_the_replies_are_out(caplog: pytest.LogCaptureFixture) -> None:
    """A ring stop's reply is ready before its event is logged: the server sends the replies,
    then calls log_events (a JSON line costs more than the stop itself)."""
    caplog.set_level(logging.INFO, logger="kvhost.shim")
    session = Session(RecordingBackend(), V5, name="test")
    peer = Peer(session)
    peer.negotiate()
    peer.send(R.SET_OWNER)
    data, _ = peer.codec.request(R.GET_VRING_BASE, p.VringState(0, 0))
    (reply,) = session.receive(data, [])
    assert peer.codec.receive(reply)[0].payload == p.VringState(0, 0)
    assert _events(caplog, "vring_base") == []
    session.log_events()
    ((level, stop),) = _events(caplog, "vring_base")
    assert (level, stop["request"], stop["vring"]) == (logging.INFO, "GET_VRING_BASE", 0)
    session.log_events()  # each event once
    assert len(_events(caplog, "vring_base")) == 1
    session.close()


# --- the socket layer around the session (shim.server), still with recording backends ------


class _ServerHarness:
    """A ShimServer on a temporary socket path, run in a thread, with recording backends."""

    def __init__(self, path: str) -> None:
        self.backends: list[RecordingBackend] = []

        def make_backend(name: str) -> RecordingBackend:
            b = RecordingBackend()
            self.backends.append(b)
            return b

        self.server = ShimServer.listen(path, ShimConfig(V5, make_backend, [V5]))
        self.path = path
        self.thread = threading.Thread(target=self.server.serve, daemon=True)
        self.thread.start()

    def connect(self) -> tuple[socket.socket, p.FrontendCodec]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(5)
        sock.connect(self.path)
        codec = p.FrontendCodec()
        _call(sock, codec, R.GET_FEATURES)  # the connection is accepted once this returns
        return sock, codec

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(5)
        assert not self.thread.is_alive()


def _call(
    sock: socket.socket,
    codec: p.FrontendCodec,
    request: R,
    payload: p.Payload = p.EMPTY,
    fds: Sequence[int] = (),
) -> list[p.Message]:
    data, out_fds = codec.request(request, payload, fds)
    sock.sendmsg(
        [data],
        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, bytes(_fd_array(out_fds)))] if out_fds else [],
    )
    if not codec.awaiting:
        return []
    replies: list[p.Message] = []
    while not replies:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("shim closed the connection")
        replies = codec.receive(chunk)
    return replies


def _fd_array(fds: Sequence[int]) -> bytes:
    return array.array("i", fds).tobytes()


def test_server_isolates_a_failing_connection(
    tmp_path: Path, fd_leak_check: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "kvhost.shim")
    harness = _ServerHarness(f"{tmp_path}/shim.sock")
    try:
        good, gcodec = harness.connect()
        bad, _ = harness.connect()
        (reply,) = _call(good, gcodec, R.GET_FEATURES)
        assert reply.payload == p.U64(offered(V5))
        bad.sendall(p.raw_message(R.GET_FEATURES, 0x2, b""))
        assert bad.recv(64) == b""  # dropped
        # the other connection still works, and fds still travel with its messages
        _call(good, gcodec, R.SET_OWNER)
        efd = os.eventfd(0, os.EFD_CLOEXEC)
        _call(good, gcodec, R.SET_VRING_CALL, p.VringFile(0), [efd])
        os.close(efd)  # the shim got its own copy
        (reply,) = _call(good, gcodec, R.GET_QUEUE_NUM)
        assert reply.payload == p.U64(1)
        assert harness.backends[0].calls[-1] == ("set_vring_call", 0, True)
        assert harness.backends[1].closed == 1
        assert "protocol version 2" in caplog.text
        assert "connection 2 closed: failed" in caplog.text
        good.close()
        bad.close()
    finally:
        harness.stop()
    assert all(b.closed == 1 for b in harness.backends)
    assert not os.path.exists(harness.path)


def test_server_hang_up_mid_setup_closes_the_session(
    tmp_path: Path, fd_leak_check: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "kvhost.shim")
    harness = _ServerHarness(f"{tmp_path}/shim.sock")
    try:
        sock, codec = harness.connect()
        _call(sock, codec, R.SET_OWNER)
        # half a SET_FEATURES, then gone
        sock.sendall(p.raw_message(R.SET_FEATURES, 1, p.U64(0).pack())[:15])
        sock.close()
        deadline = time.monotonic() + 5
        while harness.server.connections and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not harness.server.connections
        assert harness.backends[0].closed == 1
        assert "hung up in the middle of a message" in caplog.text
    finally:
        harness.stop()


def test_server_stop_closes_live_connections(tmp_path: Path, fd_leak_check: None) -> None:
    harness = _ServerHarness(f"{tmp_path}/shim.sock")
    sock, codec = harness.connect()
    _call(sock, codec, R.SET_OWNER)
    _call(sock, codec, R.GET_FEATURES)
    harness.stop()
    assert harness.backends[0].closed == 1
    assert sock.recv(16) == b""
    sock.close()


# --- the program: version choice, descriptor, capabilities ---------------------------------


def _offer(names: list[str], pairs: int = 8) -> versions.Offer:
    return versions.Offer(features.mask(names), 32768, pairs, True)


V5_HOST = [*features.names(V5.features)]


def test_default_version_is_the_newest_servable_and_selectable() -> None:
    from shim.cli import choose_version

    version, supported, pinned = choose_version(None, _offer(V5_HOST))
    assert version == V5 and not pinned
    assert supported == [v for v in versions.registry() if v.features & ~V5.features == 0]


def test_pinned_version_must_be_servable_here() -> None:
    from shim.cli import choose_version

    version, _, pinned = choose_version(V1.label, _offer(V5_HOST))
    assert version == V1 and pinned
    with pytest.raises(VersionError, match=r"org.kernel.vhost-net.v7 cannot be served.*RING_RESET"):
        choose_version("org.kernel.vhost-net.v7", _offer(V5_HOST))
    with pytest.raises(VersionError, match="this host serves no interface version"):
        choose_version(None, versions.Offer(0, 0, 0, False, 0, ("no /dev/vhost-net",)))


def test_queues_beyond_the_version_are_a_usage_error() -> None:
    from kvhost.errors import UsageError
    from shim.cli import _check_queues

    _check_queues(1, V1)
    with pytest.raises(UsageError, match="exceeds the 1 queue pair"):
        _check_queues(2, V1)


def test_print_capabilities_and_missing_socket(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from shim.cli import main

    assert main(["--print-capabilities"]) == 0
    assert json.loads(capsys.readouterr().out) == {"type": "net"}
    assert main([]) == 2
    assert "give --socket-path PATH or --fd N" in capsys.readouterr().err


def test_qemu_descriptor_ships_in_the_package() -> None:
    import json
    from importlib import resources

    text = resources.files("kvhost").joinpath("data/50-kvhost-net.json").read_text()
    desc = json.loads(text)
    assert desc["type"] == "net"
    assert desc["binary"].endswith("/kvhost-shim")
    assert desc["description"]


def test_server_on_an_inherited_connected_socket_ends_with_it(fd_leak_check: None) -> None:
    """--fd with a connected socket (a socketpair end, as libvirt passes): one connection,
    and the server returns when it closes."""
    backends: list[RecordingBackend] = []

    def make_backend(name: str) -> RecordingBackend:
        backends.append(RecordingBackend())
        return backends[-1]

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    server = ShimServer.adopt(theirs.detach(), ShimConfig(V5, make_backend, [V5]))
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    ours.settimeout(5)
    (reply,) = _call(ours, p.FrontendCodec(), R.GET_FEATURES)
    assert reply.payload == p.U64(offered(V5))
    ours.close()
    thread.join(5)
    assert not thread.is_alive()
    assert backends[0].closed == 1


def test_server_refuses_an_fd_that_is_not_a_unix_stream_socket() -> None:
    from kvhost.errors import UsageError

    config = ShimConfig(V5, lambda name: RecordingBackend(), [V5])
    r, w = os.pipe()
    try:
        with pytest.raises(UsageError, match=f"--fd {r} is not"):
            ShimServer.adopt(r, config)
    finally:
        os.close(r)
        os.close(w)


# --- ring rules the session owns (the backend receives validated values) ------------------


def _addr(index: int, va: int, flags: int = 0, log: int = 0) -> p.VringAddr:
    return p.VringAddr(index, flags, va, va + 0x2000, va + 0x1000, log)


@pytest.mark.parametrize(
    ("addr", "text"),
    [
        (_addr(0, 0x7F00_0000_0000, flags=2), "unknown flags 0x2"),
        (_addr(0, 0x7F00_0000_0008), "descriptor table at 0x7f0000000008 is not 16-byte"),
        (p.VringAddr(0, 0, 0x7F00_0000_0000, 0x7F00_0000_2002, 0x7F00_0000_1000, 0), "used ring"),
        (p.VringAddr(0, 0, 0x7F00_0000_0000, 0x7F00_0000_2000, 0x7F00_0000_1001, 0), "avail ring"),
        (_addr(0, 0x7F00_0000_0000, flags=1), "logging requested before SET_LOG_BASE"),
    ],
)
def test_bad_ring_addresses_never_reach_the_backend(addr: p.VringAddr, text: str) -> None:
    session, backend, peer = owned()
    peer.mem_table([(0, 1 << 20, 0x7F00_0000_0000)])
    peer.vring_state(R.SET_VRING_NUM, 0, 256)
    peer.send(R.SET_VRING_ADDR, addr)
    assert session.state is ConnectionState.FAILED
    assert text in (session.error or "")
    assert "set_vring_addr" not in backend.verbs()


def test_a_log_too_short_for_memory_is_refused_either_way_round() -> None:
    # 1 GiB of guest memory needs 32 KiB of log (one bit per 4 KiB page)
    session, backend, peer = owned()
    peer.mem_table([(0, 1 << 30, 0x7F00_0000_0000)])
    peer.send(R.SET_LOG_BASE, p.LogBase(4096, 0), [os.memfd_create("log", os.MFD_CLOEXEC)])
    assert "needs 32768 bytes" in (session.error or "")
    assert "set_log_base" not in backend.verbs()

    session, backend, peer = owned()
    peer.send(R.SET_LOG_BASE, p.LogBase(4096, 0), [os.memfd_create("log", os.MFD_CLOEXEC)])
    peer.mem_table([(0, 1 << 30, 0x7F00_0000_0000)])
    assert "needs 32768 bytes" in (session.error or "")
    assert "set_mem_table" not in backend.verbs()


def test_repeats_the_kernel_keeps_are_not_passed_on(fd_leak_check: None) -> None:
    """QEMU resends SET_FEATURES and SET_VRING_NUM at every DRIVER_OK; the kernel keeps both
    across a ring stop, so the backend hears each value once."""
    session, backend, peer = owned()
    for _ in range(2):
        peer.u64(R.SET_FEATURES, GUEST | features.PROTOCOL_FEATURES)
        peer.mem_table([(0, 1 << 20, 0x7F00_0000_0000)])
        peer.vring_state(R.SET_VRING_ENABLE, 0, 1)
        peer.configure_ring(0)
        peer.send(R.GET_VRING_BASE, p.VringState(0, 0))
    assert backend.verbs().count("set_features") == 1
    assert backend.verbs().count("set_vring_num") == 1
    assert backend.verbs().count("set_vring_base") == 2
    assert session.state is ConnectionState.OWNED


def test_a_new_table_carries_the_configured_rings_and_a_resize_rechecks_addresses(
    fd_leak_check: None,
) -> None:
    session, backend, peer = owned()
    seen: list[list[tuple[int, VringConfig]]] = []
    original = backend.set_mem_table

    def spy(
        regions: Sequence[FrontendRegion], rings: Sequence[tuple[int, VringConfig]] = ()
    ) -> None:
        seen.append(list(rings))
        original(regions, rings)

    backend.set_mem_table = spy  # type: ignore[method-assign]
    peer.u64(R.SET_FEATURES, GUEST | features.PROTOCOL_FEATURES)
    peer.mem_table([(0, 1 << 20, 0x7F00_0000_0000)])
    peer.vring_state(R.SET_VRING_ENABLE, 0, 1)
    peer.configure_ring(0)
    peer.mem_table([(0, 2 << 20, 0x7F00_0000_0000)])
    va = 0x7F00_0000_0000
    assert seen == [[], [(0, VringConfig(256, 0, va, va + 0x2000, va + 0x1000, 0))]]
    # stopped, resized, restarted without new addresses: the old ones are checked again
    peer.send(R.GET_VRING_BASE, p.VringState(0, 0))
    peer.vring_state(R.SET_VRING_NUM, 0, 512)
    backend.calls.clear()
    peer.vring_file(R.SET_VRING_KICK, 0)
    assert backend.calls == [
        ("set_vring_kick", 0),
        ("set_vring_addr", 0, 0, va, va + 0x2000, va + 0x1000, 0),
        ("attach", 0),
    ]
    assert session.vrings[0].addr == VringConfig(512, 0, va, va + 0x2000, va + 0x1000, 0)


def test_the_backends_share_the_kernel_devices_verbs() -> None:
    """One verb set (rust-vmm's VhostBackend): the same names and parameters for the
    kernel device, the shim's backend, the recording one and the vhost-user frontend (the
    other transport). vhost-net's set_backend is a
    device extra: the shim's takes attach/detach, the tap fd being its own handle."""
    import inspect

    from kvhost.vhost import VhostNet
    from kvhost.vhost_user.frontend import VhostUserFrontend
    from shim.kernel_backend import KernelBackend
    from shim.session import Backend

    verbs = [
        "set_owner",
        "reset_owner",
        "set_features",
        "set_mem_table",
        "set_log_base",
        "set_vring_num",
        "set_vring_addr",
        "set_vring_base",
        "get_vring_base",
        "set_vring_kick",
        "set_vring_call",
        "set_vring_err",
    ]

    def params(cls: type, verb: str) -> list[str]:
        """The parameters every caller passes (a transport may add optional ones)."""
        found = inspect.signature(getattr(cls, verb)).parameters.values()
        return [q.name for q in found if q.default is inspect.Parameter.empty]

    for verb in verbs:
        want = params(VhostNet, verb)
        for cls in (Backend, KernelBackend, RecordingBackend, VhostUserFrontend):
            assert params(cls, verb) == want, (cls.__name__, verb)
    assert hasattr(KernelBackend, "get_features") and hasattr(VhostNet, "get_features")
