"""Coverage-guided fuzzing of the vhost-user codec (atheris / libFuzzer).

    python bench/fuzz_protocol.py                 # 1,000,000 inputs
    python bench/fuzz_protocol.py --runs 20000    # a smoke run (CI)

Each input drives one fresh codec (backend or frontend side) with a sequence of chunks, each
carrying 0..15 real eventfds. The property: only RemoteProtocolError may come out of
``receive``, every fd handed in is either returned inside a Message or closed, and the
process's fd count never grows (checked every 1,000 inputs and at the end). The last line
printed is ``fuzz_protocol: N inputs ... result: ok`` or a failure; exit status 0 or 1.

Input format (so the seed corpus can hold real messages)::

    byte 0            bit 0: 0 = BackendCodec, 1 = FrontendCodec (primed with requests)
    then repeated:    byte: low nibble = number of fds with the chunk
                      byte: chunk length L (0..255), then L bytes of data
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["kvhost.vhost_user.protocol"]):
    from kvhost.vhost_user import protocol as p

from kvhost.errors import RemoteProtocolError

_state = {"runs": 0, "target": 0, "baseline": -1, "errors": 0, "messages": 0, "start": 0.0}
_corpus: list[Path] = []


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _frontend() -> p.FrontendCodec:
    codec = p.FrontendCodec()
    codec.protocol_features = int(p.ProtocolFeature.REPLY_ACK | p.ProtocolFeature.LOG_SHMFD)
    codec.request(p.Request.GET_FEATURES)
    codec.request(p.Request.GET_INTERFACE_VERSIONS)
    codec.request(p.Request.GET_VRING_BASE, p.VringState(0, 0))
    codec.request(p.Request.SET_INTERFACE_VERSION, p.VersionString("v1"))
    codec.request(
        p.Request.SET_MEM_TABLE, p.MemTable((p.MemRegion(0, 1, 2, 3),)), [-1], need_reply=True
    )
    return codec


def _chunks(data: bytes) -> list[tuple[bytes, int]]:
    out = []
    i = 1
    while i + 1 < len(data):
        nfds, length = data[i] & 0x0F, data[i + 1]
        out.append((data[i + 2 : i + 2 + length], nfds))
        i += 2 + length
    return out


def _finish(result: str, code: int) -> None:
    elapsed = time.monotonic() - _state["start"]
    runs = _state["runs"]
    print(
        f"fuzz_protocol: {runs} inputs in {elapsed:.1f} s ({runs / max(elapsed, 1e-9):.0f}/s), "
        f"{_state['errors']} rejected with RemoteProtocolError, {_state['messages']} messages "
        f"decoded, open fds {_open_fds()} (baseline {_state['baseline']}), result: {result}",
        flush=True,
    )
    for path in _corpus:
        shutil.rmtree(path, ignore_errors=True)
    # libFuzzer never returns from Fuzz(); leave without running its exit path.
    os._exit(code)


def _check_fds() -> None:
    now = _open_fds()
    if now != _state["baseline"]:
        _finish(f"FAIL: open fds went from {_state['baseline']} to {now} (leak)", 1)


def test_one_input(data: bytes) -> None:
    if _state["baseline"] < 0:  # libFuzzer has loaded its corpus by now
        _state["baseline"] = _open_fds()
        _state["start"] = time.monotonic()
    codec: p.BackendCodec | p.FrontendCodec
    codec = _frontend() if data[:1] and data[0] & 1 else p.BackendCodec()
    try:
        for chunk, nfds in _chunks(data):
            fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(nfds)]
            try:
                msgs = codec.receive(chunk, fds)
            except RemoteProtocolError as err:
                # The codec converts its own unexpected exceptions (chained as the cause)
                # so no peer can crash a server; for the fuzzer those are findings.
                cause = err.__cause__
                if cause is not None and not isinstance(cause, UnicodeDecodeError):
                    raise cause from err
                _state["errors"] += 1
                break
            _state["messages"] += len(msgs)
            for msg in msgs:
                p.close_fds(msg.fds)
    except BaseException as err:  # anything but RemoteProtocolError is a finding
        print(f"fuzz_protocol: input {data.hex()} raised {err!r}", flush=True)
        _finish(f"FAIL: {type(err).__name__} escaped the codec", 1)
    finally:
        codec.close()
    _state["runs"] += 1
    if _state["runs"] % 1000 == 0:
        _check_fds()
    if _state["runs"] >= _state["target"]:
        _check_fds()
        _finish("ok", 0)


def _seed(corpus: Path) -> None:
    """Valid messages of every kind, as inputs in the format above."""
    front = p.FrontendCodec()
    front.protocol_features = int(p.ProtocolFeature.REPLY_ACK | p.ProtocolFeature.LOG_SHMFD)
    region = p.MemRegion(0x100000, 0x100000, 0x7F0000000000, 0)
    requests: list[tuple[p.Request, p.Payload, int]] = [
        (p.Request.GET_FEATURES, p.EMPTY, 0),
        (p.Request.SET_FEATURES, p.U64(0x1_3000_8000), 0),
        (p.Request.SET_MEM_TABLE, p.MemTable((region, region)), 2),
        (p.Request.SET_LOG_BASE, p.LogBase(4096, 0), 1),
        (p.Request.SET_VRING_NUM, p.VringState(0, 256), 0),
        (p.Request.SET_VRING_ADDR, p.VringAddr(0, 1, 1, 2, 3, 4), 0),
        (p.Request.SET_VRING_KICK, p.VringFile(1), 1),
        (p.Request.SET_VRING_CALL, p.VringFile(1, no_fd=True), 0),
        (p.Request.SEND_RARP, p.RarpMac(b"\x52\x54\0\1\2\3"), 0),
        (p.Request.SET_LOG_FD, p.LogFd(), 1),
        # not interpreted (CONFIGURE_MEM_SLOTS is never offered): decoded as Raw
        (p.Request.ADD_MEM_REG, p.Raw(bytes(8) + region.pack()), 1),
        (p.Request.REM_MEM_REG, p.Raw(bytes(8) + region.pack()), 0),
        (p.Request.SET_INTERFACE_VERSION, p.VersionString("org.kernel.vhost-net.v3"), 0),
    ]
    for i, (request, payload, nfds) in enumerate(requests):
        data, _ = front.request(request, payload, [-1] * nfds)
        (corpus / f"req{i}").write_bytes(bytes([0, nfds, len(data)]) + data)
    replies = [
        p.BackendCodec.reply(p.Message(p.Request.GET_FEATURES, p.HeaderFlag.VERSION), p.U64(7)),
        p.BackendCodec.reply(
            p.Message(p.Request.GET_INTERFACE_VERSIONS, p.HeaderFlag.VERSION),
            p.VersionList("v2", ("v1", "v2")),
        ),
        p.BackendCodec.reply(
            p.Message(p.Request.GET_VRING_BASE, p.HeaderFlag.VERSION), p.VringState(0, 5)
        ),
    ]
    stream = b"".join(replies)
    (corpus / "replies").write_bytes(bytes([1, 0, len(stream)]) + stream)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1_000_000, help="inputs to run")
    parser.add_argument("--max-len", type=int, default=512, help="longest input in bytes")
    args, rest = parser.parse_known_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    corpus = Path(tempfile.mkdtemp(prefix="kvhost-fuzz-"))
    _corpus.append(corpus)
    _seed(corpus)
    _state["target"] = args.runs
    argv = [
        sys.argv[0],
        f"-max_len={args.max_len}",
        "-runs=-1",
        "-print_final_stats=0",
        str(corpus),
        *rest,
    ]
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
