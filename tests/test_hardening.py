"""Host tier: the smaller hardening items of issue 17 -- the capability bounding set in the
drop's verification, the socket file's chown/chmod, and the options bounding mappings."""

from __future__ import annotations

import os
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from peers import in_child

from kvhost import abi
from kvhost.errors import KernelError, UsageError
from kvhost.memory import GiB, parse_size
from shim import privileges
from shim.cli import build_parser, check_combinations, mapping_budget
from shim.privileges import Identity

NOBODY = 65534


def test_verify_fails_when_the_bounding_set_is_left() -> None:
    """A drop that (wrongly) believed it cleared the bounding set: verify reads CapBnd and
    refuses to carry on."""

    def body(w: int) -> str:
        privileges._drop_bounding_set = lambda: True
        try:
            privileges.drop(Identity(NOBODY, NOBODY, ()))
        except KernelError as err:
            return str(err)
        return "dropped"

    result, status = in_child(body)
    assert status == 0, result
    assert "privileges are left after the drop" in result["ok"]
    assert "CapBnd is 0x" in result["ok"]


def test_verify_accepts_a_bounding_set_the_drop_could_not_clear() -> None:
    def body(w: int) -> int:
        privileges._prctl(abi.PR_SET_NO_NEW_PRIVS, 1)
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)
        privileges._capset_zero()
        return privileges.verify(Identity(NOBODY, NOBODY), bounding_cleared=False)

    result, status = in_child(body)
    assert (result, status) == ({"ok": 1}, 0)


@pytest.fixture
def open_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="kvhost-sockdir-"))
    try:
        yield path
    finally:
        for child in path.iterdir():
            child.unlink()
        path.rmdir()


def test_a_socket_directory_others_can_write_is_refused(open_dir: Path) -> None:
    open_dir.chmod(0o777)
    with pytest.raises(UsageError, match=r"writable by others .*and not sticky"):
        privileges.check_socket_dir(str(open_dir / "vm.sock"))
    open_dir.chmod(0o1777)  # sticky, like /tmp: nobody else can replace root's file
    privileges.check_socket_dir(str(open_dir / "vm.sock"))
    open_dir.chmod(0o755)
    privileges.check_socket_dir(str(open_dir / "vm.sock"))


def test_a_socket_directory_of_another_user_is_refused(open_dir: Path) -> None:
    os.chown(open_dir, NOBODY, NOBODY)
    with pytest.raises(UsageError, match=f"belongs to uid {NOBODY}"):
        privileges.check_socket_dir(str(open_dir / "vm.sock"))
    # the socket's own user (--user) may own it: it unlinks the socket at exit
    privileges.check_socket_dir(str(open_dir / "vm.sock"), NOBODY)


def test_socket_access_never_follows_a_link(open_dir: Path, fd_leak_check: None) -> None:
    """The file at the socket's path swapped for a symlink after bind: the target keeps its
    mode and owner, and the shim says what happened."""
    victim = open_dir / "victim"
    victim.write_text("secret")
    victim.chmod(0o600)
    link = open_dir / "vm.sock"
    link.symlink_to(victim)
    with pytest.raises(UsageError, match="is not the socket the shim bound"):
        privileges.set_socket_access(str(link), 0o666, NOBODY, NOBODY)
    st = victim.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o600, 0)
    link.unlink()
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(link))
        privileges.set_socket_access(str(link), 0o660, NOBODY, NOBODY)
        st = os.lstat(link)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o660, NOBODY, NOBODY)


def test_sizes_parse_with_binary_units() -> None:
    assert parse_size("64G", "--x") == 64 * GiB
    assert parse_size("512MiB", "--x") == 512 << 20
    assert parse_size("4096", "--x") == 4096
    for bad in ("", "G", "-1G", "1.5G", "0", "12Q"):
        with pytest.raises(UsageError, match=r"--x .*positive size"):
            parse_size(bad, "--x")


def test_mapping_options_and_their_combinations() -> None:
    args = build_parser().parse_args(
        ["--socket-path", "/x", "--max-guest-memory", "8G", "--max-mapped-memory", "20G"]
    )
    budget = mapping_budget(args)
    assert (budget.per_connection, budget.total) == (8 * GiB, 20 * GiB)
    args = build_parser().parse_args(
        ["--socket-path", "/x", "--max-guest-memory", "8G", "--max-mapped-memory", "4G"]
    )
    with pytest.raises(UsageError, match="--max-mapped-memory 4G is less than"):
        mapping_budget(args)
    args = build_parser().parse_args(
        ["--socket-path", "/x", "--user", "nobody", "--allow-mtu-change"]
    )
    with pytest.raises(UsageError, match="--allow-mtu-change needs CAP_NET_ADMIN"):
        check_combinations(args)


# --- binding a socket to one VM by its security label ---------------------------------------


def _own_label() -> str | None:
    """This process's security label as the LSM reports it, or None without one."""
    try:
        text = Path("/proc/self/attr/current").read_bytes().split(b"\0", 1)[0].decode()
    except OSError:
        return None
    return text.strip() or None


def test_peer_label_is_the_peers_security_label_or_none() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        assert privileges.peer_label(b) == _own_label()
        cred = privileges.peer_credentials(b, label=True)
        assert cred.label == _own_label() and cred.pid == os.getpid()


def test_allow_label_narrows_the_allow_list() -> None:
    svirt = "system_u:system_r:svirt_t:s0:c12,c34"
    other = "system_u:system_r:svirt_t:s0:c56,c78"
    allow = privileges.AllowList(labels=frozenset({svirt}))
    assert allow.refusal(privileges.PeerCred(1, 107, 107, (), svirt)) is None
    assert allow.refusal(privileges.PeerCred(1, 107, 107, (), other)) == (
        f"its security label {other!r} is not allowed (--allow-label)"
    )
    assert "no security module labels unix sockets here" in str(
        allow.refusal(privileges.PeerCred(1, 107, 107))
    )
    # with a uid list too, both must hold
    both = privileges.AllowList(uids=frozenset({107}), labels=frozenset({svirt}))
    assert both.refusal(privileges.PeerCred(1, 107, 107, (), svirt)) is None
    assert "not allowed" in str(both.refusal(privileges.PeerCred(1, 108, 108, (), svirt)))
    assert both.describe() == f"--allow-uid 107; --allow-gid none; --allow-label {svirt}"
    assert privileges.resolve_labels([svirt, svirt]) == frozenset({svirt})
    with pytest.raises(UsageError, match="one security label, without blanks"):
        privileges.resolve_labels(["a b"])


def test_a_peer_without_the_label_gets_nothing(open_dir: Path, fd_leak_check: None) -> None:
    from test_privileges import harness

    from kvhost.vhost_user import protocol as p

    allow = privileges.AllowList(labels=frozenset({"system_u:system_r:svirt_t:s0:c1,c2"}))
    with harness(open_dir / "l.sock", allow=allow) as h:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(h.path))
            data, _ = p.FrontendCodec().request(p.Request.GET_FEATURES, p.EMPTY, [])
            s.sendall(data)
            try:
                answer = s.recv(64)
            except ConnectionResetError:
                answer = b""
        assert answer == b"" and h.backends == []
