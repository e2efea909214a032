"""Sockets systemd passes to the shim (socket activation), read as sd_listen_fds(3) does.

systemd (a ``kvhost-shim@VM.socket`` unit) or ``systemd-socket-activate`` creates the
listening socket before the shim runs and passes it from fd 3 on, announced by two
variables: ``LISTEN_PID`` (the process they are meant for) and ``LISTEN_FDS`` (how many).
Variables meant for another process (a parent that did not clear them) are ignored; they
are cleared from the environment either way, so nothing the shim runs inherits them; and
every passed fd is marked close-on-exec.
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import MutableMapping

from kvhost.errors import UsageError

#: SD_LISTEN_FDS_START: the first fd systemd passes
LISTEN_FDS_START = 3
VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def listen_fds(environ: MutableMapping[str, str] | None = None, pid: int | None = None) -> range:
    """The fds systemd passed to this process (empty when none were), with the variables
    removed from ``environ`` (default ``os.environ``).

    Raises UsageError when the variables are meant for this process but malformed.
    """
    env = os.environ if environ is None else environ
    values = {name: env.pop(name, None) for name in VARIABLES}
    listen_pid, count = values["LISTEN_PID"], values["LISTEN_FDS"]
    if listen_pid is None:
        return range(0)
    if not listen_pid.isdigit():
        raise UsageError(f"LISTEN_PID={listen_pid!r} is not a process id; unset it")
    if int(listen_pid) != (os.getpid() if pid is None else pid):
        return range(0)
    if count is None or not count.isdigit():
        raise UsageError(
            f"LISTEN_PID names this process but LISTEN_FDS={count!r} is not a count of fds"
        )
    fds = range(LISTEN_FDS_START, LISTEN_FDS_START + int(count))
    for fd in fds:
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
            fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        except OSError as err:
            raise UsageError(
                f"LISTEN_FDS={count} but fd {fd} is not open ({err.strerror}): the socket "
                "unit or systemd-socket-activate did not pass it"
            ) from err
    return fds


def check_fd(fd: int | None, passed: range) -> None:
    """The ``--fd``/``--socket-path`` choice must fit what systemd passed. Raises UsageError.

    ``--fd N`` without passed fds is an fd inherited some other way (QEMU, libvirt, a test)
    and is left to the server to check.
    """
    if not passed:
        return
    where = (
        f"fd {passed.start}"
        if len(passed) == 1
        else f"fds {passed.start}-{passed.stop - 1}"
    )
    if fd is None:
        raise UsageError(
            f"systemd passed a listening socket ({where}, LISTEN_FDS): serve it with "
            f"--fd {passed.start} instead of --socket-path, or the shim would replace it"
        )
    if fd not in passed:
        raise UsageError(f"--fd {fd}: systemd passed {where} (LISTEN_FDS); use --fd {passed.start}")
    if len(passed) > 1:
        raise UsageError(
            f"systemd passed {where} (LISTEN_FDS); kvhost-shim serves one socket: give the "
            "socket unit a single ListenStream="
        )


def bound_path(fd: int) -> str | None:
    """The file name a unix socket on ``fd`` is bound to (None for anything else), so log
    lines name the socket systemd made as they name one the shim made."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return None
    try:
        name = sock.getsockname() if sock.family == socket.AF_UNIX else None
    finally:
        sock.detach()  # the fd stays the caller's
    return name if isinstance(name, str) and name else None


def notify_ready(environ: MutableMapping[str, str] | None = None) -> str | None:
    """Tell the service manager the shim is serving (sd_notify(3) ``READY=1``), when it
    asked (``NOTIFY_SOCKET``, set for a ``Type=notify`` unit). Returns None when told or
    not asked, else why telling failed: a missed notification is the manager's timeout to
    report, not a reason for the shim to stop serving.
    """
    env = os.environ if environ is None else environ
    where = env.get("NOTIFY_SOCKET", "")
    if not where:
        return None
    if where.startswith("@"):  # an abstract socket
        where = "\0" + where[1:]
    elif not where.startswith("/"):
        return f"NOTIFY_SOCKET={where!r} is not a unix socket path; readiness not sent"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(b"READY=1", where)
    except OSError as err:
        return f"cannot notify the service manager at {where!r}: {err.strerror}"
    return None
