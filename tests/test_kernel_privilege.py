"""Kernel tier: kvhost-shim under ``--user`` -- set up as root, then no capabilities at all,
and still the datapath end to end.

The shim is ``shim.cli.main`` in a forked child of the test process (the program exactly as
``kvhost-shim`` runs it, minus a Python start-up that costs tens of seconds under TCG), logging
JSON into a file. It runs as uid/gid 65534 with ``/dev/vhost-net`` lent to gid 65534 on the
VM's devtmpfs (restored afterwards); peers with other ids are forked children that setuid().
Everything happens in the fresh network namespace of the ``netns`` (or ``netns_quiet``)
fixture, which the shim is also told to use (``--netns``), so the namespace path of the
privilege drop is the one run.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from peers import in_child, knock
from test_kernel_shim import BASE_GPA, MEMORY, captured, packet_socket, test_frames

from harness import netlink
from kvhost import abi
from kvhost.errors import RemoteProtocolError, UsageError
from kvhost.memory import GuestMemory
from kvhost.tap import Tap
from kvhost.vhost_user.frontend import BackendRefused, VhostUserFrontend
from shim import privileges
from shim.cli import main
from shim.tap_setup import TapSpec

pytestmark = pytest.mark.kernel

NOBODY = 65534  # the shim's uid and gid
PEER = 60000  # a local user in the socket group, not in the allow list
OTHER = 60001  # a local user outside the socket group
VHOST = "/dev/vhost-net"


@contextlib.contextmanager
def vhost_node(gid: int, mode: int) -> Iterator[None]:
    """/dev/vhost-net with group ``gid`` and ``mode`` for the test; restored afterwards."""
    st = os.stat(VHOST)
    os.chown(VHOST, -1, gid)
    os.chmod(VHOST, mode)
    try:
        yield
    finally:
        os.chown(VHOST, st.st_uid, st.st_gid)
        os.chmod(VHOST, stat.S_IMODE(st.st_mode))


@pytest.fixture
def run_dir() -> Iterator[Path]:
    """A directory under /run the shim user owns (so it can unlink its socket at exit)."""
    path = Path(f"/run/kvhost-priv-{os.getpid()}-{os.urandom(3).hex()}")
    path.mkdir(mode=0o755)
    os.chown(path, NOBODY, NOBODY)
    try:
        yield path
    finally:
        for child in path.iterdir():
            child.unlink()
        path.rmdir()


@dataclass
class ShimChild:
    """``kvhost-shim`` forked from the test process; its JSON log in ``log``."""

    pid: int
    log: Path
    socket: Path
    status: int | None = None

    @classmethod
    def start(cls, argv: list[str], log: Path, socket_path: Path) -> ShimChild:
        log.write_text("")
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 99
            try:
                fd = os.open(log, os.O_WRONLY | os.O_APPEND)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.close(fd)
                sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
                sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
                code = main(argv)
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        return cls(pid, log, socket_path)

    def events(self) -> list[dict[str, Any]]:
        lines = self.log.read_text().splitlines()
        try:
            return [json.loads(line) for line in lines]
        except ValueError:
            raise AssertionError("a log line is not JSON:\n" + "\n".join(lines)) from None

    def find(self, event: str, **fields: object) -> list[dict[str, Any]]:
        return [
            e
            for e in self.events()
            if e["event"] == event and all(e.get(k) == v for k, v in fields.items())
        ]

    def wait_for(self, event: str, timeout: float = 120.0, **fields: object) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.find(event, **fields)
            if found:
                return found[-1]
            if self.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(
            f"no {event} event (shim status {self.status}):\n{self.log.read_text()}"
        )

    def poll(self) -> int | None:
        if self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
        return self.status

    def wait(self, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.status is None:
            self.kill()
            raise AssertionError(f"the shim did not exit:\n{self.log.read_text()}")
        return self.status

    def kill(self) -> None:
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.status = -9


def pass_traffic(fe: VhostUserFrontend, mem: GuestMemory, tap: str, tag: str) -> None:
    fe.handshake()
    dev = fe.start_net(mem, base_gpa=BASE_GPA, mtu=1400)
    with packet_socket(tap) as cap:
        frames = test_frames(3, f"{tag} tx")
        assert dev.send(frames) == 3
        assert dev.wait_tx_done(timeout=10)
        assert sorted(captured(cap, 3, timeout=10)) == sorted(frames)
        incoming = test_frames(3, f"{tag} rx")
        for frame in incoming:
            cap.send(frame)
        got: list[bytes] = []
        deadline = time.monotonic() + 10
        while len(got) < 3 and time.monotonic() < deadline:
            got += [f for f in dev.receive(0, timeout=0.2) if f[12:14] == incoming[0][12:14]]
        assert sorted(got) == sorted(incoming)


def test_shim_without_capabilities_serves_traffic(netns_quiet: str, run_dir: Path) -> None:
    sock = run_dir / "vm.sock"
    argv = [
        "--socket-path", str(sock),
        "--user", str(NOBODY), "--group", str(NOBODY),
        "--socket-group", str(PEER),
        "--allow-uid", "0",
        "--mtu", "1400",
        "--netns", netns_quiet,
        "--log-format", "json",
    ]  # fmt: skip
    with vhost_node(NOBODY, 0o660):
        shim = ShimChild.start(argv, run_dir / "shim.log", sock)
        try:
            shim.wait_for("privileges")
            # -- what the kernel says about the running shim
            status = privileges.read_status(shim.pid)
            for key in ("CapInh", "CapPrm", "CapEff", "CapAmb", "CapBnd"):
                assert int(status[key], 16) == 0, (key, status[key])
            assert status["NoNewPrivs"] == "1"
            assert status["Uid"].split() == [str(NOBODY)] * 4
            assert status["Gid"].split() == [str(NOBODY)] * 4
            assert status["Groups"].split() == [str(NOBODY)]
            assert os.listdir(f"/proc/{shim.pid}/task") == [str(shim.pid)]
            # -- the socket file and the tap it set up as root
            st = os.stat(sock)
            assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o660, NOBODY, PEER)
            tap = shim.find("tap")[0]["tap"]
            assert netlink.link_info(tap)["mtu"] == 1400
            with Tap.open(tap) as probe_fd:  # as root: attach, look, detach
                assert probe_fd.get_iff()[1] & abi.IFF_PERSIST
            # -- peers: not allowed by uid -> refused and logged; not in the group -> EACCES
            refused = in_child(lambda w: knock(sock, 30), uid=PEER, gid=PEER)[0]
            assert refused["ok"][0] == "closed", refused
            peer_pid = refused["ok"][1]
            event = shim.wait_for("refused", peer_pid=peer_pid)
            assert (event["peer_uid"], event["peer_gid"]) == (PEER, PEER)
            assert event["socket"] == str(sock) and "not allowed" in event["result"]
            denied = in_child(lambda w: knock(sock, 30), uid=OTHER, gid=OTHER)[0]
            assert denied == {"ok": ["denied", errno.EACCES]}
            # -- the datapath, through the unprivileged shim
            with GuestMemory.create(MEMORY) as mem, VhostUserFrontend(str(sock), timeout=60) as fe:
                pass_traffic(fe, mem, tap, "first")
                # a second frontend while the first holds the tap: refused at SET_OWNER
                with (
                    VhostUserFrontend(str(sock), timeout=60) as fe2,
                    pytest.raises(RemoteProtocolError),
                ):
                    fe2.handshake()
                # MTU: the tap's own value is fine, another one is refused with the reason
                fe.net_set_mtu(1400)
                with pytest.raises(BackendRefused):
                    fe.net_set_mtu(1500)
            assert netlink.link_info(tap)["mtu"] == 1400
            log = shim.log.read_text()
            assert "already serves another connection of this shim" in log
            assert "cannot change it to 1500; start the shim with --mtu 1500" in log
            # -- a reconnect reopens the tap as the unprivileged user
            shim.wait_for("closed", connection="connection 2")
            with GuestMemory.create(MEMORY) as mem, VhostUserFrontend(str(sock), timeout=60) as fe:
                pass_traffic(fe, mem, tap, "again")
            version = shim.wait_for("version", connection="connection 4")
            assert version["version"] == shim.find("listening")[0]["version"]
            assert version["peer_pid"] == os.getpid() and version["peer_uid"] == 0
            # -- a clean stop deletes the tap the shim created, and the socket
            os.kill(shim.pid, signal.SIGTERM)
            assert shim.wait() == 0, shim.log.read_text()
        finally:
            shim.kill()
    with pytest.raises(UsageError, match="no network interface"):
        netlink.link_index(tap)
    assert not sock.exists()
    events = [e["event"] for e in shim.events()]
    for name in ("listening", "tap", "privileges", "accepted", "refused", "version", "closed",
                 "stopping", "stopped"):  # fmt: skip
        assert name in events, (name, events)
    assert shim.find("tap", result="removed")
    (closed,) = shim.find("closed", connection="connection 2")
    assert closed["result"] == "frontend hung up" and closed["peer_pid"] == os.getpid()
    (busy,) = shim.find("closed", connection="connection 3")
    assert "already serves another connection" in busy["result"]


def test_inaccessible_vhost_net_stops_the_shim_before_anything_exists(
    netns: str, run_dir: Path
) -> None:
    sock = run_dir / "vm.sock"
    argv = ["--socket-path", str(sock), "--user", str(NOBODY), "--group", str(NOBODY)]
    with vhost_node(0, 0o600):
        shim = ShimChild.start(argv, run_dir / "shim.log", sock)
        assert shim.wait() == 2
    text = shim.log.read_text()
    assert "/dev/vhost-net is crw------- (mode 0600, owner 0 (root), group 0 (root))" in text
    try:
        group = grp.getgrgid(NOBODY).gr_name
    except KeyError:
        group = str(NOBODY)
    assert f"chgrp {group} /dev/vhost-net; chmod 660 /dev/vhost-net" in text
    assert not sock.exists()
    assert [name for _, name in socket.if_nameindex()] == ["lo"]  # no tap was created


def test_prepared_tap_is_the_users_and_only_the_users(netns: str) -> None:
    """TapSpec.prepare on an existing persistent tap: the user (and no one else without
    capabilities) attaches; the tap is not the shim's to delete; a non-persistent tap is
    refused."""
    subprocess.run(["ip", "tuntap", "add", "dev", "kvpriv0", "mode", "tap"], check=True)
    try:
        prepared = TapSpec(name="kvpriv0", create=False, mtu=1300).prepare(NOBODY, NOBODY)
        assert not prepared.created

        def attach() -> list[object]:
            with prepared.open() as tap:
                tap.set_mtu(1300)  # its own MTU: fine
                try:
                    tap.set_mtu(1500)
                except UsageError as err:
                    return [tap.get_iff()[0], str(err)]
            return ["changed the MTU"]

        ok = in_child(lambda w: attach(), uid=NOBODY, gid=NOBODY)[0]
        assert ok["ok"][0] == "kvpriv0", ok
        assert "cannot change it to 1500" in ok["ok"][1]
        other = in_child(lambda w: attach(), uid=PEER, gid=PEER)[0]
        assert "TUNSETIFF" in other["error"] and "EPERM" in other["error"], other
        with Tap.open("kvpriv0") as look:
            assert look.owner_and_group() == (NOBODY, None)  # the owner is enough to attach
        # not created by the shim: stays, and gets an owner that lets nobody new attach (the
        # kernel cannot unset one)
        assert prepared.release() == "tap kvpriv0 released: owner uid 0 (it had none; the " \
            "kernel cannot clear an owner) restored"
        assert netlink.link_info("kvpriv0")["mtu"] == 1300
        with Tap.open("kvpriv0") as look:
            assert look.owner_and_group() == (0, None)
    finally:
        subprocess.run(["ip", "tuntap", "del", "dev", "kvpriv0", "mode", "tap"], check=True)
    # a tap another process holds (not persistent): its lifetime is not the shim's to decide
    with Tap.create("kvpriv1", queues=2), pytest.raises(UsageError, match="not persistent"):
        TapSpec(name="kvpriv1", create=False).prepare(NOBODY, NOBODY)
