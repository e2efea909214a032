"""Put a kvhost-shim, and the kernel's vhost workers it owns, into its VM's cgroups.

Why: the kernel charges a vhost worker's CPU to the cgroups of the worker's *owner*, the
process that issued VHOST_SET_OWNER. With QEMU's own vhost-net that is QEMU; behind kvhost it
is the shim, so without a move the VM's datapath escapes the VM's cgroup (libvirt's
``cputune``, ``emulatorpin``, a pod's limits). Where the worker lives (docs/cgroups.md)::

    kernel < 6.4   kthread "vhost-<owner pid>", a child of kthreadd; VHOST_SET_OWNER copies the
                   owner's cgroups onto it once (vhost_attach_cgroups); moving the owner
                   later does not move it, so it is moved by its own tid
    kernel >= 6.4  vhost_task: a thread "vhost-<owner pid>" of the owner's thread group;
                   writing the owner's pid to cgroup.procs moves all its threads, the
                   workers included

:func:`join` does both moves and then reads every worker's ``/proc/TID/cgroup`` back, so
a kernel that moved less than asked is an error, never a silent success. It works with the
unified hierarchy (cgroup v2) and with v1 hierarchies, each found through
``/proc/self/mountinfo``. Moving needs write access to the destination's ``cgroup.procs``
(on v2 also to the common ancestor's): root, as libvirt's hook runs.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

from kvhost.errors import UsageError


class CgroupError(UsageError):
    """A process could not be put into, or read from, a cgroup; the message says which and
    what to do."""


@dataclass(frozen=True)
class Membership:
    """One line of ``/proc/PID/cgroup``: hierarchy id, controllers ('' on v2), path."""

    hierarchy: int
    controllers: str
    path: str


def membership(pid: int | str, proc: Path = Path("/proc")) -> list[Membership]:
    """The cgroups of task ``pid`` (a process or a thread id). Raises CgroupError."""
    where = proc / str(pid) / "cgroup"
    try:
        text = where.read_text()
    except OSError as err:
        raise CgroupError(f"cannot read {where}: {err.strerror}; is process {pid} alive?") from err
    out = []
    for line in text.splitlines():
        hid, sep, rest = line.partition(":")
        controllers, sep2, path = rest.partition(":")
        if not (sep and sep2 and hid.isdigit()):
            raise CgroupError(f"{where}: cannot parse line {line!r}")
        out.append(Membership(int(hid), controllers, path))
    return out


def mounts(mountinfo: Path = Path("/proc/self/mountinfo")) -> dict[str, Path]:
    """Mount point of each cgroup hierarchy, keyed like :attr:`Membership.controllers`
    ('' for cgroup2, e.g. 'cpu,cpuacct' or 'name=systemd' for v1). Only mounts of a
    hierarchy's root count: a bind mount of a sub-cgroup cannot reach the VM's."""
    out: dict[str, Path] = {}
    for line in mountinfo.read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3 or fields[3] != "/":
            continue
        fstype, options = tail[0], tail[2].split(",")
        if fstype == "cgroup2":
            out.setdefault("", Path(fields[4]))
        elif fstype == "cgroup":
            known = [o for o in options if o not in ("rw", "ro") and not o.startswith(
                ("nosuid", "nodev", "noexec", "relatime", "clone_children", "release_agent",
                 "noprefix", "xattr", "cpuset_v2_mode"))]  # fmt: skip
            out.setdefault(",".join(known), Path(fields[4]))
    return out


def directories(pid: int | str, proc: Path = Path("/proc")) -> list[Path]:
    """The cgroup directories of task ``pid``, one per mounted hierarchy it is in.
    Raises CgroupError when none is mounted (then nothing could be moved)."""
    table = mounts(proc / "self" / "mountinfo")
    out = []
    for m in membership(pid, proc):
        root = table.get(m.controllers)
        if root is not None:
            out.append(root / m.path.lstrip("/"))
    if not out:
        raise CgroupError(
            f"process {pid} is in no mounted cgroup hierarchy (mounts: "
            f"{', '.join(map(str, table.values())) or 'none'}); mount cgroup2 on /sys/fs/cgroup"
        )
    return out


def vhost_workers(owner: int, proc: Path = Path("/proc")) -> list[int]:
    """Task ids of the vhost workers ``owner`` created: threads of its own on Linux >= 6.4,
    kthreads (children of kthreadd, pid 2) before. Both are called ``vhost-<owner>``."""
    name = f"vhost-{owner}"[:15]  # TASK_COMM_LEN - 1
    out = []
    for task in _tasks(proc / str(owner) / "task"):
        if _comm(proc / str(owner) / "task" / task) == name:
            out.append(int(task))
    for task in _tasks(proc):
        if _comm(proc / task) == name and _ppid(proc / task) == 2:
            out.append(int(task))
    return sorted(set(out))


@dataclass(frozen=True)
class Moved:
    """What :func:`join` did: ``owner`` and ``workers`` now share ``like``'s cgroups."""

    owner: int
    like: int
    workers: tuple[int, ...]
    directories: tuple[Path, ...]

    def describe(self) -> str:
        tids = ", ".join(map(str, self.workers)) or "none yet"
        return (f"process {self.owner} and its vhost workers ({tids}) joined process "
                f"{self.like}'s cgroups: {', '.join(map(str, self.directories))}")


def join(owner: int, like: int, proc: Path = Path("/proc")) -> Moved:
    """Move process ``owner`` (every thread) and its vhost worker kthreads into the cgroups
    of process ``like``, then check every worker landed there. Raises CgroupError."""
    target = directories(like, proc)
    workers = vhost_workers(owner, proc)
    threads = set(_tasks(proc / str(owner) / "task"))
    for directory in target:
        _write(directory / "cgroup.procs", owner, f"process {owner}")
        for tid in workers:
            if str(tid) not in threads:  # a kthread: attached once at SET_OWNER, move it
                _write(directory / "cgroup.procs", tid, f"vhost kthread {tid}")
    want = membership(like, proc)
    for tid in (owner, *workers):
        got = membership(tid, proc)
        if got != want:
            raise CgroupError(
                f"task {tid} is in {_show(got)} after the move, not process {like}'s "
                f"{_show(want)}; the kernel did not move it (see docs/cgroups.md)"
            )
    return Moved(owner, like, tuple(workers), tuple(target))


def _write(procs: Path, pid: int, what: str) -> None:
    try:
        fd = os.open(procs, os.O_WRONLY)
        try:
            os.write(fd, f"{pid}\n".encode())
        finally:
            os.close(fd)
    except OSError as err:
        hint = _HINTS.get(err.errno or 0, "")
        raise CgroupError(
            f"moving {what} into {procs.parent} failed: {err.strerror}"
            + (f"; {hint}" if hint else "")
        ) from err


_HINTS = {
    errno.EACCES: "run as root (libvirt's hook does), or delegate the VM's cgroup to the user",
    errno.EPERM: "run as root (libvirt's hook does), or delegate the VM's cgroup to the user",
    errno.EBUSY: "cgroup v2 allows processes only in cgroups whose children have no controllers",
    errno.EINVAL: "the kernel refuses to move this task (a kthread bound to a CPU?)",
    errno.ENOENT: "the VM's cgroup is gone: is the VM still running?",
    errno.ESRCH: "the task exited",
}


def _show(ms: list[Membership]) -> str:
    return " ".join(f"{m.controllers or 'v2'}:{m.path}" for m in ms)


def _tasks(directory: Path) -> list[str]:
    try:
        return [n for n in os.listdir(directory) if n.isdigit()]
    except OSError:
        return []


def _comm(task: Path) -> str:
    try:
        return (task / "comm").read_text().rstrip("\n")
    except OSError:
        return ""


def _ppid(task: Path) -> int:
    try:
        stat = (task / "stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1
