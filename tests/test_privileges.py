"""Host tier: least privilege and access of kvhost-shim (shim.privileges, shim.eventlog, the
socket side of shim.server, the option checks of shim.cli).

Everything here is real but needs no /dev/vhost-net: names resolve against this host's user
database, sockets are real unix sockets, peers are forked children that setuid() to other
ids, and the privilege drop runs in a forked child whose /proc status the parent reads.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import pwd
import socket
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from peers import in_child, knock
from test_session import V5, RecordingBackend, offered

from kvhost import features
from kvhost import netns as kvnetns
from kvhost.errors import DeviceUnavailable, KernelError, UsageError
from kvhost.vhost_user import protocol as p
from kvhost.vhost_user.protocol import Request as R
from shim import eventlog, privileges
from shim.cli import main
from shim.privileges import AllowList, Identity, PeerCred
from shim.server import ShimConfig, ShimServer

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (setuid, chown)")

#: ids no account on a test host uses (numeric, so no user database entry is needed)
PEER = 60000
OTHER = 60001
NOBODY = 65534


# --- names and numbers ---------------------------------------------------------------------


def test_users_and_groups_resolve_by_name_and_number() -> None:
    root = pwd.getpwuid(0).pw_name
    assert privileges.resolve_user(root) == (0, 0)
    assert privileges.resolve_user("0") == (0, 0)
    assert privileges.resolve_user(str(PEER)) == (PEER, None)  # no database entry
    assert privileges.resolve_group("0") == 0
    assert privileges.resolve_group(str(PEER)) == PEER


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda: privileges.resolve_user("no-such-user-kvhost"),
            "--user no-such-user-kvhost: no such user",
        ),
        (
            lambda: privileges.resolve_group("no-such-group-kvhost"),
            "--group no-such-group-kvhost: no such group",
        ),
        (lambda: privileges.resolve_user("4294967295"), "ids go from 0 to 4294967294"),
        (lambda: privileges.identity("0"), "is root: the shim would keep root's powers"),
        (lambda: privileges.identity(str(PEER)), "has no user database entry.*add --group"),
        (lambda: privileges.identity(str(PEER), "0"), "--group 0 is group root"),
        (lambda: privileges.resolve_ids(["0,,1"], "--allow-uid"), "empty name in the list"),
        (
            lambda: privileges.resolve_ids(["nobody-kvhost"], "--allow-gid"),
            "--allow-gid nobody-kvhost: no such group",
        ),
    ],
)
def test_bad_names_are_usage_errors(call: Callable[[], object], match: str) -> None:
    with pytest.raises(UsageError, match=match):
        call()


def test_identity_takes_group_as_gid_and_only_supplementary_group() -> None:
    assert privileges.identity(str(PEER), str(OTHER)) == Identity(PEER, OTHER, (OTHER,))
    # any user by name whose primary group is not root: every Debian base system has several
    # (daemon, bin, nobody...), so this never needs to skip
    entry = next(e for e in pwd.getpwall() if e.pw_uid != 0 and e.pw_gid != 0)
    assert privileges.identity(entry.pw_name) == Identity(entry.pw_uid, entry.pw_gid, ())


def test_allow_ids_accept_lists_and_repeats() -> None:
    assert privileges.resolve_ids(["0", f"{PEER},{OTHER}"], "--allow-uid") == {0, PEER, OTHER}
    assert privileges.resolve_ids([], "--allow-gid") == frozenset()


def test_allow_list_decides_by_uid_gid_and_supplementary_groups() -> None:
    peer = PeerCred(pid=42, uid=PEER, gid=PEER, groups=(PEER, OTHER))
    assert AllowList().refusal(peer) is None  # no list: everyone who can open the socket
    assert AllowList().refusal(None) is None
    assert AllowList(uids=frozenset({PEER})).refusal(peer) is None
    assert AllowList(gids=frozenset({PEER})).refusal(peer) is None
    assert AllowList(gids=frozenset({OTHER})).refusal(peer) is None  # supplementary
    why = AllowList(uids=frozenset({0}), gids=frozenset({7})).refusal(peer)
    assert why == f"uid {PEER} and gid {PEER} are not allowed (--allow-uid 0; --allow-gid 7)"
    assert "could not be read" in str(AllowList(uids=frozenset({0})).refusal(None))


# --- device node access --------------------------------------------------------------------


@pytest.fixture
def node(tmp_path: Path) -> Path:
    """A file standing in for a device node: only its mode bits and ids matter here."""
    path = tmp_path / "vhost-net"
    path.write_bytes(b"")
    return path


@pytest.mark.parametrize(
    ("mode", "owner", "group", "allowed"),
    [
        (0o600, PEER, 0, True),  # the user owns it
        (0o660, 0, PEER, True),  # the user's group
        (0o660, 0, OTHER, True),  # a supplementary group of the user
        (0o666, 0, 0, True),  # everyone
        (0o600, 0, PEER, False),  # group has no bits
        (0o640, 0, PEER, False),  # read-only for the group
        (0o066, PEER, 0, False),  # owner bits win over group/other bits, as in the kernel
    ],
)
def test_device_access_follows_the_mode_bits(
    node: Path, mode: int, owner: int, group: int, allowed: bool
) -> None:
    os.chown(node, owner, group)
    node.chmod(mode)
    who = Identity(PEER, PEER, (OTHER,))
    if allowed:
        privileges.check_device_access(who, str(node))
        return
    with pytest.raises(UsageError) as err:
        privileges.check_device_access(who, str(node))
    text = str(err.value)
    assert f"{node} is {stat.filemode(stat.S_IFREG | mode)} (mode {mode:04o}" in text
    assert f"owner {owner}" in text and f"group {group}" in text
    assert f"chgrp {PEER} {node}; chmod 660 {node}" in text


def test_device_access_suggests_the_nodes_group_when_it_has_access(node: Path) -> None:
    os.chown(node, 0, OTHER)
    node.chmod(0o660)
    with pytest.raises(UsageError, match=f"run the shim with --group {OTHER}"):
        privileges.check_device_access(Identity(PEER, PEER, ()), str(node))


def test_missing_device_node_says_which_module(tmp_path: Path) -> None:
    with pytest.raises(DeviceUnavailable, match="modprobe vhost_net"):
        privileges.check_device_access(Identity(PEER, PEER), str(tmp_path / "vhost-net"))


def test_unknown_network_namespace_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="ip netns add kvhost-no-such-ns"):
        kvnetns.enter("kvhost-no-such-ns")


# --- the drop itself, in forked children ----------------------------------------------------


def test_drop_leaves_no_capabilities_and_the_parent_sees_it(sock_dir: Path) -> None:
    """The child drops to nobody-like ids; while it waits, the parent reads its /proc status
    (the independent witness), then the child proves it cannot regain anything."""
    secret = sock_dir / "root-only"
    secret.write_text("x")
    secret.chmod(0o600)
    seen: dict[str, str] = {}
    go_r, go_w = os.pipe()

    def body(w: int) -> dict[str, Any]:
        os.close(go_w)
        who = Identity(NOBODY, NOBODY, (NOBODY,))
        dropped = privileges.drop(who)
        os.write(w, b'{"ready": true}\n')
        os.read(go_r, 1)  # the parent has read our status
        out: dict[str, Any] = {"threads": dropped.threads, "bounding": dropped.bounding_cleared}
        try:
            os.setuid(0)
            out["setuid"] = "worked"
        except PermissionError:
            out["setuid"] = "refused"
        try:
            secret.read_text()
            out["secret"] = "read"
        except PermissionError:
            out["secret"] = "refused"
        try:
            privileges.probe_device(who, str(secret))
        except UsageError as err:
            out["probe"] = str(err)
        return out

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        try:
            result: dict[str, Any] = {"ok": body(w)}
        except BaseException as err:
            result = {"error": f"{type(err).__name__}: {err}"}
        os.write(w, json.dumps(result).encode() + b"\n")
        os._exit(0)
    os.close(w)
    os.close(go_r)
    with os.fdopen(r, "rb") as f:
        first = f.readline()
        if b"ready" in first:
            seen = privileges.read_status(pid)
        os.write(go_w, b"x")
        os.close(go_w)
        last = (f.read().splitlines() or [first])[-1]
    os.waitpid(pid, 0)
    result = json.loads(last)
    assert "ok" in result, result
    assert seen, f"the child never got to drop: {first!r}"
    for key in ("CapInh", "CapPrm", "CapEff", "CapAmb", "CapBnd"):
        assert int(seen[key], 16) == 0, (key, seen[key])
    assert seen["NoNewPrivs"] == "1"
    assert seen["Uid"].split() == [str(NOBODY)] * 4
    assert seen["Gid"].split() == [str(NOBODY)] * 4
    assert seen["Groups"].split() == [str(NOBODY)]
    out = result["ok"]
    assert out == {
        "threads": 1,
        "bounding": True,
        "setuid": "refused",
        "secret": "refused",
        "probe": out["probe"],
    }
    assert f"cannot open {secret}: {secret} is -rw------- (mode 0600, owner 0" in out["probe"]


def test_drop_with_a_second_thread_fails_loudly() -> None:
    """prctl and capset act per thread: a thread the drop did not run on would keep
    NO_NEW_PRIVS unset, and verify() must say so rather than carry on."""

    def body(w: int) -> str:
        stop = threading.Event()
        threading.Thread(target=stop.wait, daemon=True).start()
        try:
            privileges.drop(Identity(NOBODY, NOBODY, ()))
        except KernelError as err:
            return str(err)
        finally:
            stop.set()
        return "dropped"

    result, status = in_child(body)
    assert status == 0, result
    assert "privileges are left after the drop" in result["ok"]
    assert "NoNewPrivs is 0" in result["ok"]


def test_drop_needs_root() -> None:
    def body(w: int) -> str:
        os.setresuid(NOBODY, NOBODY, NOBODY)
        try:
            privileges.drop(Identity(PEER, PEER))
        except UsageError as err:
            return str(err)
        return "dropped"

    result, _ = in_child(body)
    assert result["ok"].startswith(
        f"--user needs the shim to start as root (it runs as uid {NOBODY})"
    )


# --- the socket file and the allow list ------------------------------------------------------


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A directory other uids can traverse (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="kvhost-priv-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for child in path.iterdir():
            child.unlink()
        path.rmdir()


class Harness:
    """A ShimServer with recording backends in a thread."""

    def __init__(self, path: Path, allow: AllowList | None = None, **listen: Any) -> None:
        self.backends: list[RecordingBackend] = []

        def make_backend(name: str) -> RecordingBackend:
            self.backends.append(RecordingBackend())
            return self.backends[-1]

        config = ShimConfig(V5, make_backend, [V5], allow=allow or AllowList())
        self.path = path
        self.server = ShimServer.listen(str(path), config, **listen)
        self.thread = threading.Thread(target=self.server.serve, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(5)
        assert not self.thread.is_alive()


@contextlib.contextmanager
def harness(path: Path, **kw: Any) -> Iterator[Harness]:
    h = Harness(path, **kw)
    try:
        yield h
    finally:
        h.stop()


def _connect_as(path: Path, uid: int, gid: int, groups: tuple[int, ...] = ()) -> tuple[Any, int]:
    """A forked peer with these ids connects and asks GET_FEATURES: ("features", value),
    ("closed", 0) when the shim hung up on it, or ("denied", errno) when connect() failed."""

    result, status = in_child(lambda w: knock(path, 5), uid=uid, gid=gid, groups=groups)
    assert status == 0, result
    kind, value = result["ok"]
    return kind, value


def test_socket_is_0600_even_with_an_open_umask(sock_dir: Path, fd_leak_check: None) -> None:
    old = os.umask(0)
    try:
        with harness(sock_dir / "a.sock") as h:
            assert os.umask(0) == 0  # listen() put the umask back
            st = os.stat(h.path)
            assert stat.S_IMODE(st.st_mode) == 0o600
            assert (st.st_uid, st.st_gid) == (0, 0)
            # nobody else gets in: the kernel refuses the connect on the mode alone
            assert _connect_as(h.path, PEER, PEER) == ("denied", errno.EACCES)
            assert not h.backends
    finally:
        os.umask(old)


def test_socket_group_and_owner(sock_dir: Path, fd_leak_check: None) -> None:
    with harness(sock_dir / "g.sock", mode=0o660, owner=NOBODY, group=PEER) as h:
        st = os.stat(h.path)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o660, NOBODY, PEER)
        assert _connect_as(h.path, PEER, PEER) == ("features", offered(V5))
        assert _connect_as(h.path, OTHER, OTHER) == ("denied", errno.EACCES)
        assert len(h.backends) == 1


def test_refused_peer_is_logged_and_gets_nothing(
    sock_dir: Path, fd_leak_check: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "kvhost.shim")
    allow = AllowList(uids=frozenset({0}), gids=frozenset({OTHER}))
    with harness(sock_dir / "r.sock", allow=allow, mode=0o666) as h:
        kind, pid = _connect_as(h.path, PEER, PEER)
        assert kind == "closed"
        # a supplementary group in --allow-gid is enough (SO_PEERGROUPS)
        assert _connect_as(h.path, PEER, PEER, (OTHER,)) == ("features", offered(V5))
        # and so is the uid
        assert _connect_as(h.path, 0, PEER) == ("features", offered(V5))
        assert len(h.backends) == 2  # no backend (no kernel device) for the refused peer
    refused = [
        r for r in caplog.records if getattr(r, "kvhost_event", {}).get("event") == "refused"
    ]
    assert len(refused) == 1
    fields = refused[0].kvhost_event  # type: ignore[attr-defined]
    assert (fields["peer_pid"], fields["peer_uid"], fields["peer_gid"]) == (pid, PEER, PEER)
    assert fields["socket"] == str(h.path)
    message = refused[0].getMessage()
    assert f"from pid {pid} (uid {PEER}, gid {PEER})" in message
    assert (
        f"uid {PEER} and gid {PEER} are not allowed (--allow-uid 0; --allow-gid {OTHER})" in message
    )


# --- the log -------------------------------------------------------------------------------


def test_connection_events_come_out_as_json_lines(
    sock_dir: Path, fd_leak_check: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "kvhost.shim")
    path = sock_dir / "j.sock"
    with harness(path) as h:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(str(path))
        codec = p.FrontendCodec()
        for request, payload in (
            (R.GET_FEATURES, p.EMPTY),
            (R.SET_OWNER, p.EMPTY),
            (R.SET_FEATURES, p.U64(offered(V5) & ~(1 << 26))),
            (R.GET_QUEUE_NUM, p.EMPTY),
        ):
            data, _ = codec.request(request, payload, [])
            s.sendall(data)
        while codec.awaiting:
            codec.receive(s.recv(4096))
        s.close()
        while h.server.connections:
            threading.Event().wait(0.01)
    formatter = eventlog.EventFormatter("json", socket=str(path))
    lines = [formatter.format(r) for r in caplog.records]
    objs = [json.loads(line) for line in lines]
    assert all("\n" not in line for line in lines)
    for obj in objs:
        assert set(eventlog.KEYS) <= obj.keys()
        assert obj["socket"] == str(path)
        assert obj["time"].endswith("Z")
    by_event = {o["event"]: o for o in objs}
    assert {"listening", "accepted", "version", "closed"} <= by_event.keys()
    accepted, version, closed = by_event["accepted"], by_event["version"], by_event["closed"]
    assert accepted["peer_pid"] == os.getpid() and accepted["peer_uid"] == 0
    assert accepted["connection"] == version["connection"] == closed["connection"]
    assert version["version"] == V5.label and version["result"] == "locked"
    assert closed["result"] == "frontend hung up" and closed["version"] == V5.label
    # the session's own lines: same stream, the connection named; what it did to the device
    # ("features") as a number, not only in the message
    session_lines = [o for o in objs if o["event"] in ("log", "features")]
    assert session_lines and all(o["connection"] == accepted["connection"] for o in session_lines)
    assert by_event["features"]["features"] & features.PROTOCOL_FEATURES
    # the text form of the closed line names socket, peer, version and result
    text = eventlog.EventFormatter("text").format(
        next(r for r in caplog.records if getattr(r, "kvhost_event", {}).get("event") == "closed")
    )
    assert text.startswith(
        f"kvhost-shim: {accepted['connection']} closed: frontend hung up (on {path}"
    )
    assert f"pid {os.getpid()}" in text and V5.label in text


def test_formatter_keeps_tracebacks_inside_one_json_line() -> None:
    record = logging.LogRecord("kvhost.shim", logging.ERROR, __file__, 1, "boom %s", ("x",), None)
    try:
        raise ValueError("inner")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    line = eventlog.EventFormatter("json").format(record)
    obj = json.loads(line)
    assert obj["event"] == "log" and obj["level"] == "error"
    assert obj["message"].startswith("boom x\nTraceback") and "ValueError: inner" in obj["message"]
    with pytest.raises(ValueError, match="log format 'xml'"):
        eventlog.EventFormatter("xml")  # type: ignore[arg-type]


def test_unconfigure_puts_the_kvhost_logger_back() -> None:
    kvhost = logging.getLogger("kvhost")
    before = kvhost.level
    kvhost.setLevel(logging.WARNING)
    try:
        handler = eventlog.configure("json", verbose=True, stream=io.StringIO())
        assert kvhost.level == logging.DEBUG and handler in logging.getLogger().handlers
        eventlog.unconfigure(handler)
        assert kvhost.level == logging.WARNING
        assert handler not in logging.getLogger().handlers
    finally:
        kvhost.setLevel(before)


# --- the program's option checks ------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--socket-path", "/run/x.sock", "--group", "kvm"], "--group applies to the user"),
        (["--fd", "3", "--socket-group", "0"], "--socket-group sets the mode of the socket file"),
        (["--socket-path", "/run/x.sock", "--user", "no-such-user-kvhost"], "no such user"),
        (["--socket-path", "/run/x.sock", "--user", "root"], "is root"),
        (["--socket-path", "/run/x.sock", "--allow-uid", "no-such-user-kvhost"], "--allow-uid"),
        (
            ["--socket-path", "/run/x.sock", "--socket-group", "no-such-group-kvhost"],
            "--socket-group",
        ),
    ],
)
def test_bad_combinations_exit_2_before_anything_is_created(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvhost-shim: ") and message in err
    assert not Path("/run/x.sock").exists()


def test_errors_are_json_too(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--log-format", "json", "--socket-path", "/run/x.sock", "--group", "0"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    obj = json.loads(line)
    assert obj["event"] == "error" and obj["level"] == "error" and obj["result"] == "failed"
    assert "--group applies" in obj["message"] and obj["socket"] == "/run/x.sock"


def test_print_capabilities_is_unchanged(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--print-capabilities", "--user", "root"]) == 0
    assert json.loads(capsys.readouterr().out) == {"type": "net"}
