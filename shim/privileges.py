"""Least privilege for ``kvhost-shim``: who it runs as, what it can still open, who may connect.

Start-up order (``shim.cli``)::

    resolve --user/--group/--allow-*     names or numbers; UsageError for unknown ones
    check_device_access(/dev/vhost-net)  mode bits vs the target user, before anything exists
    ... tap set-up, socket creation      as root ...
    enter --netns (kvhost.netns.enter)   the tap's namespace becomes the shim's own: setns
                                         needs CAP_SYS_ADMIN, so it cannot happen per
                                         connection once privileges are gone
    drop(identity)                       bounding set, ambient set, setgroups, setresgid,
                                         setresuid, capset(0), PR_SET_NO_NEW_PRIVS, then
                                         verify(): every thread's /proc status must show
                                         the new ids and CapEff = CapPrm = CapAmb = CapInh = 0
    probe_device(/dev/vhost-net)         one open as the new user: the authoritative answer
                                         (ACLs and security modules included)

What is left after the drop is what file permissions give the user: ``/dev/vhost-net`` (by
its group), ``/dev/net/tun`` (world-accessible) and the taps made its own at start-up
(TUNSETOWNER/TUNSETGROUP, see :meth:`shim.tap_setup.TapSpec.prepare`).

Peers: :class:`AllowList` decides from SO_PEERCRED (and SO_PEERGROUPS for ``--allow-gid``)
whether a connected peer is served at all; :mod:`shim.server` asks it before anything else
happens for the connection.

The libc calls without a Python wrapper (prctl, capset) are declared as a table and
each failure becomes an ``OSError`` naming the call; they are process-credential calls, not
device ABI, so they live here rather than in :mod:`kvhost.abi`.
"""

from __future__ import annotations

import ctypes
import errno
import grp
import os
import pwd
import socket
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from kvhost import abi
from kvhost.errors import DeviceUnavailable, UsageError
from kvhost.ioctl import kernel_error, open_device

SO_PEERGROUPS = abi.SO_PEERGROUPS
SO_PEERSEC = abi.SO_PEERSEC
#: longest label read: Python's getsockopt takes at most 1024 bytes (a longer label is
#: ERANGE, refused like any unreadable one; sVirt contexts are ~40 bytes)
_LABEL_MAX = 1024

#: (uid_t)-1 means "leave unchanged" to the kernel: not an id anyone can have
ID_MAX = 0xFFFF_FFFE
CAP_LAST_CAP_PATH = Path("/proc/sys/kernel/cap_last_cap")
VHOST_NET_PATH = "/dev/vhost-net"
_UCRED = struct.Struct("=iII")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


_LIBC_SIGNATURES: dict[str, tuple[list[type], type]] = {
    "prctl": (
        [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong],
        ctypes.c_int,
    ),
    "capset": ([ctypes.c_void_p, ctypes.c_void_p], ctypes.c_int),
}
_libc = ctypes.CDLL(None, use_errno=True)
for _name, (_args, _ret) in _LIBC_SIGNATURES.items():
    getattr(_libc, _name).argtypes = _args
    getattr(_libc, _name).restype = _ret


def _libc_call(name: str, *args: object) -> int:
    """Call libc ``name``; -1 becomes OSError(errno, "name: strerror")."""
    result = int(getattr(_libc, name)(*args))
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")
    return result


def _prctl(option: int, arg2: int = 0, arg3: int = 0) -> int:
    return _libc_call("prctl", option, arg2, arg3, 0, 0)


# -- who: users, groups, peers ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Identity:
    """The uid/gid (and supplementary groups) the shim runs as after :func:`drop`."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    def __str__(self) -> str:
        return f"uid {_user_label(self.uid)} gid {_group_label(self.gid)}"


def _user_label(uid: int) -> str:
    try:
        return f"{uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return str(uid)


def _group_label(gid: int) -> str:
    try:
        return f"{gid} ({grp.getgrgid(gid).gr_name})"
    except KeyError:
        return str(gid)


def _number(text: str, option: str) -> int | None:
    if not (text.isascii() and text.isdigit()):
        return None
    value = int(text)
    if value > ID_MAX:
        raise UsageError(f"{option} {text}: ids go from 0 to {ID_MAX}")
    return value


def resolve_user(text: str, option: str = "--user") -> tuple[int, int | None]:
    """(uid, primary gid or None when the uid has no user database entry) for a user name
    or number. Raises UsageError for an unknown name."""
    number = _number(text, option)
    if number is not None:
        try:
            return number, pwd.getpwuid(number).pw_gid
        except KeyError:
            return number, None
    try:
        entry = pwd.getpwnam(text)
    except KeyError:
        raise UsageError(
            f"{option} {text}: no such user; give an existing user name or a numeric uid "
            "(create one with 'useradd --system --no-create-home NAME')"
        ) from None
    return entry.pw_uid, entry.pw_gid


def resolve_group(text: str, option: str = "--group") -> int:
    """The gid of a group name or number. Raises UsageError for an unknown name."""
    number = _number(text, option)
    if number is not None:
        return number
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise UsageError(
            f"{option} {text}: no such group; give an existing group name or a numeric gid"
        ) from None


def identity(user: str, group: str | None = None) -> Identity:
    """What ``--user USER [--group GROUP]`` means: USER's uid; GROUP as gid and only
    supplementary group, else USER's primary group and none. Raises UsageError for unknown
    names, root (uid or gid 0: dropping to it keeps root's powers), and a numeric uid
    without a user database entry and no ``--group``."""
    uid, primary = resolve_user(user)
    if uid == 0:
        raise UsageError(
            f"--user {user} is root: the shim would keep root's powers; name an unprivileged user"
        )
    if group is not None:
        gid = resolve_group(group)
        groups: tuple[int, ...] = (gid,)
        what = f"--group {group}"
    elif primary is None:
        raise UsageError(
            f"--user {user}: uid {uid} has no user database entry, so it has no primary "
            "group; add --group GROUP"
        )
    else:
        gid, groups, what = primary, (), f"the primary group of --user {user}"
    if gid == 0:
        raise UsageError(f"{what} is group root (gid 0); choose an unprivileged group")
    return Identity(uid, gid, groups)


def resolve_ids(texts: Iterable[str], option: str) -> frozenset[int]:
    """``--allow-uid``/``--allow-gid`` values (names or numbers, repeatable, and each may be
    a comma-separated list) as ids. Raises UsageError for unknown names."""
    out: set[int] = set()
    for text in texts:
        for part in text.split(","):
            part = part.strip()
            if not part:
                raise UsageError(f"{option} {text!r}: empty name in the list")
            if option == "--allow-uid":
                out.add(resolve_user(part, option)[0])
            else:
                out.add(resolve_group(part, option))
    return frozenset(out)


def resolve_labels(texts: Iterable[str]) -> frozenset[str]:
    """``--allow-label`` values, each one label (labels contain commas: no list syntax).
    Raises UsageError for an empty one or one with blanks."""
    out: set[str] = set()
    for text in texts:
        if not text or any(c.isspace() or c == "\0" for c in text):
            raise UsageError(
                f"--allow-label {text!r}: give one security label, without blanks, e.g. "
                "system_u:system_r:svirt_t:s0:c12,c34"
            )
        out.add(text)
    return frozenset(out)


@dataclass(frozen=True, slots=True)
class PeerCred:
    """A connected peer's credentials at connect() time (SO_PEERCRED, SO_PEERGROUPS, and
    SO_PEERSEC's label when asked for: None when no security module labels it)."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()
    label: str | None = None

    def __str__(self) -> str:
        return f"pid {self.pid} (uid {self.uid}, gid {self.gid})"


def peer_label(sock: socket.socket) -> str | None:
    """SO_PEERSEC of a connected unix socket: the peer's security label (an SELinux
    context such as sVirt's ``system_u:system_r:svirt_t:s0:c12,c34``, an AppArmor
    profile), or None when no security module reports one (ENOPROTOOPT). Raises OSError."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERSEC, _LABEL_MAX)
    except OSError as err:
        if err.errno == errno.ENOPROTOOPT:
            return None
        raise
    text = raw.split(b"\0", 1)[0].decode(errors="replace").strip()
    return text or None


def peer_credentials(
    sock: socket.socket, *, groups: bool = False, label: bool = False
) -> PeerCred:
    """SO_PEERCRED of a connected unix socket; with ``groups``, also its supplementary
    groups (SO_PEERGROUPS; empty before Linux 4.13 or beyond 256 groups); with ``label``,
    its security label (:func:`peer_label`). Raises OSError."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    extra: tuple[int, ...] = ()
    if groups:
        try:
            # Python's getsockopt takes at most 1024 bytes: 256 groups
            data = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)
        except OSError as err:
            # ERANGE: more than 256 groups; ENOPROTOOPT: before Linux 4.13. Either way
            # only the primary gid can be judged.
            if err.errno not in (errno.ERANGE, errno.ENOPROTOOPT):
                raise
            data = b""
        extra = struct.unpack(f"={len(data) // 4}I", data[: len(data) // 4 * 4])
    return PeerCred(pid, uid, gid, extra, peer_label(sock) if label else None)


@dataclass(frozen=True, slots=True)
class AllowList:
    """Which peers are served: a uid in ``uids``, or a primary or supplementary gid in
    ``gids``. Both empty: every peer that can open the socket file. ``labels``, when set,
    narrows that further: the peer's security label (SO_PEERSEC) must be one of them --
    with sVirt each VM's QEMU has a label of its own, so this binds a socket to one VM
    where uids cannot (every QEMU runs as the same user)."""

    uids: frozenset[int] = frozenset()
    gids: frozenset[int] = frozenset()
    labels: frozenset[str] = frozenset()

    @property
    def everyone(self) -> bool:
        return not self.uids and not self.gids and not self.labels

    def refusal(self, cred: PeerCred | None) -> str | None:
        """Why ``cred`` is not served, or None when it is."""
        if self.everyone:
            return None
        if cred is None:
            return "its credentials could not be read (SO_PEERCRED)"
        if self.labels and cred.label not in self.labels:
            if cred.label is None:
                return (
                    "its security label could not be read (SO_PEERSEC: no security module "
                    "labels unix sockets here), and --allow-label needs one"
                )
            return f"its security label {cred.label!r} is not allowed (--allow-label)"
        if not self.uids and not self.gids:
            return None
        if cred.uid in self.uids:
            return None
        if cred.gid in self.gids or not self.gids.isdisjoint(cred.groups):
            return None
        return f"uid {cred.uid} and gid {cred.gid} are not allowed ({self.describe()})"

    def describe(self) -> str:
        def ids(values: frozenset[int]) -> str:
            return ",".join(str(v) for v in sorted(values)) or "none"

        text = f"--allow-uid {ids(self.uids)}; --allow-gid {ids(self.gids)}"
        if self.labels:
            text += f"; --allow-label {','.join(sorted(self.labels))}"
        return text


# -- where: the socket file -------------------------------------------------------------


def check_socket_dir(path: str, user: int | None = None) -> None:
    """Raise UsageError when another user could replace the socket file at ``path`` between
    its bind and its chown/chmod (run as root, those would then change a file of the
    attacker's choosing; :func:`set_socket_access` refuses a replaced file too): its
    directory must not be writable by group or others unless it is sticky, and must
    belong to root, this process's user or ``user`` (the one the socket is for, who must
    be able to unlink it at exit)."""
    parent = os.path.dirname(os.path.abspath(path))
    try:
        st = os.stat(parent)
    except OSError:
        return  # bind fails and says why
    if st.st_uid not in (0, os.geteuid(), user):
        raise UsageError(
            f"socket directory {parent} belongs to uid {st.st_uid}, who could replace the "
            "socket file; put the socket in a directory of root's (e.g. /run/kvhost)"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        raise UsageError(
            f"socket directory {parent} is writable by others ({stat.filemode(st.st_mode)}) "
            "and not sticky, so another user could swap the socket file for a link; use a "
            "directory only its owner can write (e.g. /run/kvhost, mode 0755)"
        )


def set_socket_access(path: str, mode: int, owner: int | None, group: int | None) -> None:
    """chown/chmod the socket file just bound at ``path`` without following a symlink: the
    file is opened O_PATH|O_NOFOLLOW, must be a socket, and is changed through that very
    descriptor (``/proc/self/fd/N``; fchmod on the socket's own fd would change the socket,
    not its file). Raises OSError; UsageError when ``path`` is no longer a socket."""
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise UsageError(
                f"{path} is not the socket the shim bound (it was replaced); check who can "
                "write its directory"
            )
        link = f"/proc/self/fd/{fd}"
        if owner is not None or group is not None:
            os.chown(link, -1 if owner is None else owner, -1 if group is None else group)
        os.chmod(link, mode)
    finally:
        os.close(fd)


# -- what: the device node --------------------------------------------------------------


def _mode_sentence(path: str, st: os.stat_result) -> str:
    owner = _user_label(st.st_uid)
    group = _group_label(st.st_gid)
    return (
        f"{path} is {stat.filemode(st.st_mode)} (mode {stat.S_IMODE(st.st_mode):04o}, "
        f"owner {owner}, group {group})"
    )


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _advice(path: str, st: os.stat_result, who: Identity) -> str:
    if (st.st_mode >> 3) & 6 == 6 and st.st_gid != 0:
        return (
            f"run the shim with --group {_group_name(st.st_gid)} (the node's group), or give "
            f"the node to the shim's group: chgrp {_group_name(who.gid)} {path}; chmod 660 {path}"
        )
    return (
        f"give the node to a group the shim runs as: chgrp {_group_name(who.gid)} {path}; "
        f"chmod 660 {path} (the usual choice is group kvm: chgrp kvm {path}; chmod 660 {path} "
        "and --group kvm), and keep it with a udev rule"
    )


def check_device_access(who: Identity, path: str = VHOST_NET_PATH) -> None:
    """Raise UsageError (what the node's mode/owner/group are and what to do) unless the
    mode bits let ``who`` open ``path`` for reading and writing; DeviceUnavailable when the
    node is missing. Called before the drop: ACLs and security modules are judged by
    :func:`probe_device` after it."""
    try:
        st = os.stat(path)
    except FileNotFoundError as err:
        raise kernel_error(
            "open",
            path,
            err,
            "load the module with 'modprobe vhost_net'",
            kind=DeviceUnavailable,
        ) from err
    if who.uid == st.st_uid:
        bits = st.st_mode >> 6
    elif st.st_gid == who.gid or st.st_gid in who.groups:
        bits = st.st_mode >> 3
    else:
        bits = st.st_mode
    if bits & 6 == 6:
        return
    raise UsageError(
        f"the shim would run as {who} and could not open {path} for reading and writing: "
        f"{_mode_sentence(path, st)}; {_advice(path, st, who)}"
    )


def probe_device(who: Identity, path: str = VHOST_NET_PATH) -> None:
    """Open ``path`` once as the current (dropped) user. Raises UsageError naming the node's
    mode/owner/group and what to do when that is refused."""
    try:
        os.close(open_device(path))
    except DeviceUnavailable as err:
        if err.errno not in (errno.EACCES, errno.EPERM):
            raise
        try:
            st = os.stat(path)
        except OSError:
            raise UsageError(
                f"the shim, now {who}, cannot reach {path}: a directory on the way is closed to it"
            ) from err
        raise UsageError(
            f"the shim, now {who}, cannot open {path}: {_mode_sentence(path, st)}; "
            f"{_advice(path, st, who)} (if the mode bits already allow it, an ACL or a "
            "security module refuses the open)"
        ) from err


# -- how: dropping and verifying ---------------------------------------------------------


def read_status(pid: int | str = "self", tid: int | None = None) -> dict[str, str]:
    """``/proc/PID/status`` (or one thread's, ``/proc/PID/task/TID/status``) as a dict."""
    path = f"/proc/{pid}/status" if tid is None else f"/proc/{pid}/task/{tid}/status"
    out: dict[str, str] = {}
    for line in Path(path).read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


@dataclass(frozen=True, slots=True)
class Dropped:
    """What :func:`drop` achieved, for the log."""

    who: Identity
    bounding_cleared: bool
    threads: int


def _last_cap() -> int:
    try:
        return int(CAP_LAST_CAP_PATH.read_text())
    except (OSError, ValueError):
        return 63  # PR_CAPBSET_DROP answers EINVAL past the kernel's last cap


def _drop_bounding_set() -> bool:
    """Drop every capability from the bounding set; False when not permitted (no
    CAP_SETPCAP): the drop of the other sets still leaves nothing to use."""
    for cap in range(_last_cap() + 1):
        try:
            _prctl(abi.PR_CAPBSET_DROP, cap)
        except OSError as err:
            if err.errno == errno.EINVAL:  # a cap this kernel does not know: done
                break
            if err.errno == errno.EPERM:
                return False
            raise
    return True


def _capset_zero() -> None:
    header = _CapHeader(abi._LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _libc_call("capset", ctypes.addressof(header), ctypes.addressof(data))


def drop(who: Identity) -> Dropped:
    """Become ``who`` for good, with no capabilities and no way to gain any.

    Must run as root (UsageError otherwise). Raises KernelError when a step is refused or
    when :func:`verify` finds anything left.
    """
    if os.geteuid() != 0:
        raise UsageError(
            f"--user needs the shim to start as root (it runs as uid {os.geteuid()}): it "
            "creates the tap and the socket first, then drops to the user"
        )
    op = "prctl(PR_SET_KEEPCAPS, 0)"
    try:
        _prctl(abi.PR_SET_KEEPCAPS, 0)
        op = "prctl(PR_CAPBSET_DROP)"
        bounding = _drop_bounding_set()
        op = "prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)"
        try:
            _prctl(abi.PR_CAP_AMBIENT, abi.PR_CAP_AMBIENT_CLEAR_ALL)
        except OSError as err:
            if err.errno != errno.EINVAL:  # before Linux 4.3: no ambient set to clear
                raise
        op = f"setgroups({list(who.groups)})"
        os.setgroups(list(who.groups))
        op = f"setresgid({who.gid})"
        os.setresgid(who.gid, who.gid, who.gid)
        op = f"setresuid({who.uid})"
        os.setresuid(who.uid, who.uid, who.uid)
        # setresuid away from 0 already clears the permitted and effective sets unless
        # securebits say otherwise; capset(0) clears them (and the inheritable set) anyway
        op = "capset(0, 0, 0)"
        _capset_zero()
        op = "prctl(PR_SET_NO_NEW_PRIVS, 1)"
        _prctl(abi.PR_SET_NO_NEW_PRIVS, 1)
    except OSError as err:
        raise kernel_error(
            op, "the shim process", err, f"dropping privileges to {who} failed"
        ) from err
    threads = verify(who, bounding_cleared=bounding)
    return Dropped(who, bounding, threads)


def verify(who: Identity, *, bounding_cleared: bool = True) -> int:
    """Check every thread's ``/proc/self/task/*/status``: real/effective/saved/fs uid and
    gid are ``who``'s, the supplementary groups are exactly ``who.groups``, CapInh = CapPrm
    = CapEff = CapAmb = 0, CapBnd = 0 (unless ``bounding_cleared`` is False: :func:`drop`
    had no CAP_SETPCAP to clear it) and NoNewPrivs = 1. Returns the thread count; raises
    KernelError (naming the thread and what is left) otherwise."""
    tids = sorted(int(t) for t in os.listdir("/proc/self/task"))
    for tid in tids:
        status = read_status("self", tid)
        problems: list[str] = []
        if status.get("Uid", "").split() != [str(who.uid)] * 4:
            problems.append(f"Uid is {status.get('Uid')}, not {who.uid}")
        if status.get("Gid", "").split() != [str(who.gid)] * 4:
            problems.append(f"Gid is {status.get('Gid')}, not {who.gid}")
        if sorted(int(g) for g in status.get("Groups", "").split()) != sorted(set(who.groups)):
            problems.append(f"Groups is {status.get('Groups')!r}, not {list(who.groups)}")
        keys = ("CapInh", "CapPrm", "CapEff", "CapAmb") + (("CapBnd",) if bounding_cleared else ())
        for key in keys:
            # a missing line is a failure too: the kernel always reports each set
            value = int(status.get(key, "ffffffffffffffff"), 16)
            if value:
                problems.append(f"{key} is 0x{value:x}")
        if status.get("NoNewPrivs") != "1":
            problems.append(f"NoNewPrivs is {status.get('NoNewPrivs')}")
        if problems:
            raise kernel_error(
                "drop privileges",
                f"/proc/self/task/{tid}/status",
                errno.EPERM,
                f"privileges are left after the drop: {'; '.join(problems)}",
            )
    return len(tids)
