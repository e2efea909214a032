"""kvhost.cgroup's reading of /proc, on written /proc-shaped trees (the moves themselves, and
what the kernel does with them, are in tests/test_kernel_cgroup.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvhost import cgroup

V2_MOUNTINFO = (
    "22 1 0:21 / / rw,relatime - ext4 /dev/vda rw\n"
    "30 24 0:24 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 "
    "rw,nsdelegate\n"
    "31 24 0:24 /machine /mnt/sub rw,relatime - cgroup2 cgroup2 rw\n"
)
V1_MOUNTINFO = (
    "25 24 0:22 / /sys/fs/cgroup/systemd rw,nosuid - cgroup cgroup rw,xattr,name=systemd\n"
    "26 24 0:23 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid - cgroup cgroup rw,cpu,cpuacct\n"
    "27 24 0:25 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n"
)


def task(proc: Path, pid: int, comm: str, ppid: int, cg: str, tid: int | None = None) -> None:
    d = proc / str(pid) if tid is None else proc / str(pid) / "task" / str(tid)
    d.mkdir(parents=True, exist_ok=True)
    (d / "comm").write_text(comm + "\n")
    (d / "stat").write_text(f"{tid or pid} ({comm}) S {ppid} 0 0\n")
    (d / "cgroup").write_text(cg)


def proc_tree(tmp: Path, mountinfo: str) -> Path:
    proc = tmp / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "mountinfo").write_text(mountinfo)
    return proc


def test_v2_membership_and_directory(tmp_path: Path) -> None:
    proc = proc_tree(tmp_path, V2_MOUNTINFO)
    task(proc, 40, "qemu", 1, "0::/machine/qemu-1-vm1.libvirt-qemu/emulator\n")
    assert cgroup.membership(40, proc) == [
        cgroup.Membership(0, "", "/machine/qemu-1-vm1.libvirt-qemu/emulator")]
    # the bind mount of a sub-cgroup (/mnt/sub) is not the hierarchy's root: not used
    assert cgroup.directories(40, proc) == [
        Path("/sys/fs/cgroup/machine/qemu-1-vm1.libvirt-qemu/emulator")]


def test_v1_hierarchies_map_to_their_mounts(tmp_path: Path) -> None:
    proc = proc_tree(tmp_path, V1_MOUNTINFO)
    task(proc, 40, "qemu", 1, "3:cpu,cpuacct:/machine/vm1\n1:name=systemd:/machine/vm1\n"
                              "0::/machine/vm1\n5:pids:/unmounted\n")
    assert cgroup.directories(40, proc) == [
        Path("/sys/fs/cgroup/cpu,cpuacct/machine/vm1"),
        Path("/sys/fs/cgroup/systemd/machine/vm1"),
        Path("/sys/fs/cgroup/unified/machine/vm1"),
    ]


def test_no_mounted_hierarchy_says_what_to_mount(tmp_path: Path) -> None:
    proc = proc_tree(tmp_path, "22 1 0:21 / / rw - ext4 /dev/vda rw\n")
    task(proc, 40, "qemu", 1, "0::/\n")
    with pytest.raises(cgroup.CgroupError, match="mount cgroup2 on /sys/fs/cgroup"):
        cgroup.directories(40, proc)


def test_unreadable_or_garbled_cgroup_files_are_named(tmp_path: Path) -> None:
    proc = proc_tree(tmp_path, V2_MOUNTINFO)
    with pytest.raises(cgroup.CgroupError, match=r"cannot read .*/41/cgroup.*alive"):
        cgroup.membership(41, proc)
    task(proc, 42, "x", 1, "garbage\n")
    with pytest.raises(cgroup.CgroupError, match="cannot parse line 'garbage'"):
        cgroup.membership(42, proc)


def test_workers_are_kthreads_of_kthreadd_or_threads_of_the_owner(tmp_path: Path) -> None:
    proc = proc_tree(tmp_path, V2_MOUNTINFO)
    task(proc, 100, "python3", 1, "0::/\n")
    task(proc, 100, "python3", 1, "0::/\n", tid=100)
    task(proc, 100, "vhost-100", 1, "0::/\n", tid=105)  # >= 6.4: a thread of the shim
    task(proc, 200, "vhost-100", 2, "0::/\n")  # < 6.4: a kthread named for its owner
    task(proc, 300, "vhost-100", 1, "0::/\n")  # a user process with that name: not one
    task(proc, 400, "vhost-1000", 2, "0::/\n")  # another owner's
    assert cgroup.vhost_workers(100, proc) == [105, 200]
