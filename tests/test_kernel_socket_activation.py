"""Kernel tier: kvhost-shim socket-activated, as ``kvhost-shim@VM.socket`` starts it.

``systemd-socket-activate`` stands in for systemd (there is no systemd as PID 1 in the test
VM): it makes the listening socket, and only when the first client connects does it exec
``kvhost-shim --fd 3`` with ``LISTEN_FDS``/``LISTEN_PID`` set. The client -- kvhost's own
vhost-user frontend -- connects before the shim has imported anything and must be served:
QEMU's start-up handshake (SET_OWNER opens real /dev/vhost-net and a tap) answered at the
pinned version, ``READY=1`` on ``NOTIFY_SOCKET`` (what ``Type=notify`` waits for), then a
clean stop on SIGTERM.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvhost import features, versions
from kvhost.libvirt_hook import _listening
from kvhost.vhost_user.frontend import VhostUserFrontend

pytestmark = pytest.mark.kernel

V5 = versions.parse("org.kernel.vhost-net.v5")


def events(log: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


def test_a_client_that_connects_before_the_shim_runs_is_served(
    tmp_path: Path, netns_quiet: str
) -> None:
    path = tmp_path / "vm-1.sock"  # a VM name systemd-escape would escape: vm\x2d1
    log = tmp_path / "shim.log"
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # systemd's NOTIFY_SOCKET
    manager.bind(str(tmp_path / "notify"))
    manager.settimeout(120)
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["systemd-socket-activate", "--listen", str(path), "-E", "PYTHONPATH",
             "-E", "NOTIFY_SOCKET", "--",
             sys.executable, "-m", "shim.cli", "--fd", "3", "--interface-version", V5.label,
             "--log-format", "json"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not _listening(str(path)):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "systemd-socket-activate did not listen"
            time.sleep(0.02)
        assert events(log) == []  # nothing of the shim has run yet
        with VhostUserFrontend(str(path), timeout=120) as fe:  # connects
            connected = datetime.datetime.now(datetime.UTC)
            fe.handshake()  # waits in the backlog until the shim accepts
            assert fe.features == (
                versions.serve_features(V5) | features.PROTOCOL_FEATURES | features.LOG_ALL
            )
        seen = events(log)
        listening = next(e for e in seen if e["event"] == "listening")
        assert listening["socket"] == str(path) and listening["version"] == V5.label
        assert "listening on fd 3" in str(listening["message"])
        started = datetime.datetime.fromisoformat(str(listening["time"]).replace("Z", "+00:00"))
        assert started > connected - datetime.timedelta(milliseconds=5), (started, connected)
        assert any(e["event"] == "accepted" for e in seen), seen
        assert manager.recv(100) == b"READY=1"  # what Type=notify waits for
        assert proc.poll() is None  # the shim serves on after its first client left
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()
        assert events(log)[-1]["event"] == "stopped"
    finally:
        manager.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
