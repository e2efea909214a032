"""What a peer of the shim's socket gets, seen from the peer, and forked children with other
ids to run it in: shared by the host-tier and kernel-tier privilege tests."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

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


def in_child(
    body: Callable[[int], Any],
    *,
    uid: int | None = None,
    gid: int | None = None,
    groups: Sequence[int] = (),
) -> tuple[dict[str, Any], int]:
    """Fork; the child takes ``gid`` and ``uid`` when given (with ``groups`` as its only
    supplementary groups), runs ``body(write_fd)`` and sends ``{"ok": result}`` (JSON-able)
    or ``{"error": "Type: text"}`` as its last line on ``write_fd`` (``body`` may write
    lines of its own before). Returns (that dict, the child's exit status: 1 after an
    error)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 0
        try:
            os.close(r)
            if gid is not None:
                os.setgroups(list(groups))
                os.setresgid(gid, gid, gid)
            if uid is not None:
                os.setresuid(uid, uid, uid)
            out: dict[str, Any] = {"ok": body(w)}
        except BaseException as err:
            out = {"error": f"{type(err).__name__}: {err}"}
            status = 1
        try:
            os.write(w, json.dumps(out).encode() + b"\n")
        finally:
            os._exit(status)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        lines = f.read().splitlines()
    _, status = os.waitpid(pid, 0)
    result: dict[str, Any] = json.loads(lines[-1])
    return result, os.waitstatus_to_exitcode(status)
