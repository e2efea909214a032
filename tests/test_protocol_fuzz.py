"""Property tests of the vhost-user codec: whatever arrives, only RemoteProtocolError comes
out, and no fd handed to the codec is ever leaked (counted in /proc/self/fd)."""

from __future__ import annotations

import itertools
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvhost.errors import RemoteProtocolError
from kvhost.vhost_user.protocol import (
    EMPTY,
    HEADER,
    U64,
    BackendCodec,
    FrontendCodec,
    LogBase,
    MemRegion,
    MemTable,
    Message,
    Payload,
    ProtocolFeature,
    RarpMac,
    Request,
    VersionString,
    VringAddr,
    VringFile,
    VringState,
    close_fds,
)
from kvhost.vhost_user.protocol import _Decoder as Decoder

SETTINGS = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# A chunk: some bytes and how many fds arrive with them.
chunks = st.lists(st.tuples(st.binary(max_size=96), st.integers(0, 10)), max_size=8)


def assert_not_a_bug(err: RemoteProtocolError) -> None:
    """The codec turns its own unexpected exceptions into RemoteProtocolError (so a peer
    can never crash a server) but chains them: a chained non-protocol cause is a bug."""
    cause = err.__cause__
    assert cause is None or isinstance(cause, UnicodeDecodeError), repr(cause)


def feed(codec: Decoder, parts: list[tuple[bytes, int]]) -> None:
    """Feed chunks with fresh eventfds; close what comes back; check nothing leaks."""
    before = open_fds()
    try:
        for data, nfds in parts:
            fds = [os.eventfd(0) for _ in range(nfds)]
            try:
                msgs = codec.receive(data, fds)
            except RemoteProtocolError as err:
                assert_not_a_bug(err)
                break
            for msg in msgs:
                assert isinstance(msg, Message)
                close_fds(msg.fds)
    finally:
        codec.close()
    assert open_fds() == before


def header(request: int, flags: int, size: int) -> bytes:
    return HEADER.pack(request, flags, size)


# Headers that pass the header checks often, so payload decoding gets exercised too.
plausible_requests = st.sampled_from([int(r) for r in Request] + [0, 99, 0x4B560003])
plausible_chunks = st.lists(
    st.tuples(
        st.builds(
            lambda req, flags, body, extra: header(req, flags, len(body) + extra) + body,
            plausible_requests,
            st.sampled_from([0x1, 0x9, 0x5, 0x0, 0x21]),
            st.binary(max_size=80),
            st.sampled_from([0, 0, 0, 1, -1]).map(abs),
        ),
        st.integers(0, 3),
    ),
    max_size=6,
)


@SETTINGS
@given(chunks)
def test_backend_random_bytes(parts: list[tuple[bytes, int]]) -> None:
    feed(BackendCodec(), parts)


@SETTINGS
@given(plausible_chunks)
def test_backend_plausible_headers(parts: list[tuple[bytes, int]]) -> None:
    feed(BackendCodec(), parts)


def primed_frontend() -> FrontendCodec:
    codec = FrontendCodec()
    codec.protocol_features = int(ProtocolFeature.REPLY_ACK | ProtocolFeature.LOG_SHMFD)
    codec.request(Request.GET_FEATURES)
    codec.request(Request.GET_INTERFACE_VERSIONS)
    codec.request(Request.GET_VRING_BASE, VringState(0, 0))
    codec.request(Request.SET_OWNER, need_reply=True)
    return codec


@SETTINGS
@given(chunks)
def test_frontend_random_bytes(parts: list[tuple[bytes, int]]) -> None:
    feed(primed_frontend(), parts)


@SETTINGS
@given(plausible_chunks)
def test_frontend_plausible_headers(parts: list[tuple[bytes, int]]) -> None:
    feed(primed_frontend(), parts)


# --- valid streams: any chunking decodes to the same messages; one flipped byte never escapes


u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
regions = st.builds(MemRegion, u64, u64, u64, u64)
version_text = st.text(
    st.characters(min_codepoint=0x20, exclude_categories=["Cs"], exclude_characters="\x7f"),
    min_size=1, max_size=40,
)

PAYLOADS: dict[Request, st.SearchStrategy[Payload]] = {
    Request.SET_FEATURES: st.builds(U64, u64),
    Request.SET_MEM_TABLE: st.builds(MemTable, st.lists(regions, min_size=1, max_size=8)
                                     .map(tuple)),
    Request.SET_LOG_BASE: st.builds(LogBase, u64, u64),
    Request.SET_VRING_NUM: st.builds(VringState, u32, u32),
    Request.SET_VRING_ADDR: st.builds(VringAddr, u32, u32, u64, u64, u64, u64),
    Request.SET_VRING_CALL: st.builds(VringFile, st.integers(0, 255), st.booleans()),
    Request.SEND_RARP: st.builds(RarpMac, st.binary(min_size=6, max_size=6)),
    Request.SET_INTERFACE_VERSION: st.builds(VersionString, version_text),
}
messages = st.one_of(
    *[st.tuples(st.just(r), p) for r, p in PAYLOADS.items()],
    st.tuples(
        st.sampled_from([Request.GET_FEATURES, Request.SET_OWNER, Request.GET_INTERFACE_VERSIONS]),
        st.just(EMPTY),
    ),
)


def fd_count(payload: Payload) -> int:
    if isinstance(payload, MemTable | VringFile):
        return payload.fd_count
    return 1 if isinstance(payload, LogBase) else 0


@SETTINGS
@given(st.lists(messages, min_size=1, max_size=5), st.data())
def test_valid_stream_any_chunking(
    msgs: list[tuple[Request, Payload]], data: st.DataObject
) -> None:
    before = open_fds()
    front = FrontendCodec()
    stream = b""
    starts: list[tuple[int, int]] = []  # (offset, fd count) per message
    for request, payload in msgs:
        fds = [-1] * fd_count(payload)  # placeholders: the encoder does not touch fds
        encoded, _ = front.request(request, payload, fds)
        starts.append((len(stream), len(fds)))
        stream += encoded
    # Cut the stream; every chunk may start at most one fd-carrying message, and its fds
    # ride with the chunk holding that message's first byte, as the kernel delivers them.
    cuts = sorted(set(data.draw(st.lists(st.integers(1, len(stream) - 1), max_size=6))
                      if len(stream) > 1 else []))
    for off, _ in starts[1:]:
        cuts.append(off)  # force a cut before every message: one sendmsg per message
    cuts = sorted(set(cuts))
    bounds = [0, *cuts, len(stream)]
    back = BackendCodec()
    got: list[Message] = []
    for lo, hi in itertools.pairwise(bounds):
        nfds = sum(n for off, n in starts if lo <= off < hi)
        got += back.receive(stream[lo:hi], [os.eventfd(0) for _ in range(nfds)])
    assert [(m.request, m.payload) for m in got] == msgs
    assert [len(m.fds) for m in got] == [n for _, n in starts]
    for m in got:
        close_fds(m.fds)
    assert open_fds() == before


@SETTINGS
@given(st.lists(messages, min_size=1, max_size=4), st.data())
def test_mutated_valid_stream(msgs: list[tuple[Request, Payload]], data: st.DataObject) -> None:
    front = FrontendCodec()
    stream = bytearray()
    nfds = 0
    for request, payload in msgs:
        fds = [-1] * fd_count(payload)
        nfds += len(fds)
        stream += front.request(request, payload, fds)[0]
    pos = data.draw(st.integers(0, len(stream) - 1))
    stream[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        cut = data.draw(st.integers(0, len(stream)))
        del stream[cut : cut + data.draw(st.integers(1, 16))]
    feed(BackendCodec(), [(bytes(stream), min(nfds, 8))])


def test_atheris_fuzz_target_smoke() -> None:
    """The coverage-guided target in bench/ runs and reports a clean result (CI smoke)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent.parent / "bench" / "fuzz_protocol.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--runs", "3000"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-2000:]
    assert proc.returncode == 0, last
    assert last.startswith("fuzz_protocol: 3000 inputs") and last.endswith("result: ok"), last


@SETTINGS
@given(st.lists(messages, min_size=2, max_size=5))
def test_backend_decodes_a_burst_of_messages_in_one_read(
    msgs: list[tuple[Request, Payload]]
) -> None:
    """QEMU sends without waiting, so one read can hold several whole messages. Only the
    last may carry fds: the kernel ends a read after the sendmsg that carried fds."""
    msgs = [m for m in msgs[:-1] if fd_count(m[1]) == 0] + msgs[-1:]
    before = open_fds()
    front = FrontendCodec()
    stream = b"".join(front.request(r, p, [-1] * fd_count(p))[0] for r, p in msgs)
    nfds = fd_count(msgs[-1][1])
    got = BackendCodec().receive(stream, [os.eventfd(0) for _ in range(nfds)])
    assert [(m.request, m.payload) for m in got] == msgs
    assert [len(m.fds) for m in got] == [0] * (len(msgs) - 1) + [nfds]
    for m in got:
        close_fds(m.fds)
    assert open_fds() == before
