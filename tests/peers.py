"""What a peer of the shim's socket gets, seen from the peer: shared by the host-tier and
kernel-tier privilege tests (which run it in forked children with other uids)."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

from kvhost.vhost_user import protocol as p


def knock(path: Path, timeout: float) -> tuple[str, int]:
    """Connect to ``path`` and send GET_FEATURES: ("features", bits) when served,
    ("closed", own pid) when the shim hung up, ("denied", errno) when connect() failed."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
        except OSError as err:
            return "denied", err.errno or 0
        codec = p.FrontendCodec()
        data, _ = codec.request(p.Request.GET_FEATURES, p.EMPTY, [])
        with contextlib.suppress(OSError):
            s.sendall(data)
        chunk = b""
        with contextlib.suppress(OSError):
            chunk = s.recv(4096)
    if not chunk:
        return "closed", os.getpid()
    (reply,) = codec.receive(chunk)
    assert isinstance(reply.payload, p.U64)
    return "features", reply.payload.value
