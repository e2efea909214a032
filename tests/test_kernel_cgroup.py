"""Kernel tier: where the vhost worker of a kvhost-shim lands in the cgroup tree, and that
:func:`kvhost.cgroup.join` puts it with the VM (issue 15, docs/cgroups.md).

The first test measures with the shim alone, in cgroups it makes under the cgroup2 root:
the worker starts in its owner's (the shim's) cgroup; moving the shim's process moves the
worker on Linux >= 6.4 (a thread of the shim) and not before (a kthread, attached once at
VHOST_SET_OWNER); ``join`` moves both. The second runs real libvirtd (the fixture of
test_kernel_libvirt.py): after ``virsh start`` the hook has moved the shim and its worker
into QEMU's cgroup, and ``virsh destroy`` leaves no cgroup behind. Each writes what it saw
to ``$KVHOST_RESULTS/cgroup-<kernel>.txt``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_kernel_libvirt import (  # the one libvirtd fixture and domain of that tier
    RESULTS,
    libvirtd,
    stamp_to_file,
    vhostuser_domain,
)

from harness import netns as testns
from harness.libvirtd import SOCKETS, STATE, virsh
from harness.shim_process import ShimProcess
from kvhost import cgroup
from kvhost.libvirt_hook import _alive
from kvhost.vhost_user.frontend import VhostUserFrontend

pytestmark = pytest.mark.kernel
__all__ = ["libvirtd"]  # a fixture, used by name

KERNEL = tuple(int(x) for x in os.uname().release.split("-")[0].split(".")[:2])
#: vhost_task (a thread of the owner) replaced the vhost kthread in Linux 6.4
THREAD_WORKERS = KERNEL >= (6, 4)


def _record(line: str) -> None:
    with open(RESULTS / f"cgroup-{os.uname().release}.txt", "a") as f:
        f.write(line + "\n")
    print(line)


def _v2_root() -> Path:
    root = cgroup.mounts().get("")
    if root is None:
        pytest.fail(f"no cgroup2 mount in this VM's /proc/self/mountinfo: mount it on "
                    f"/sys/fs/cgroup ({cgroup.mounts()})", pytrace=False)
    return root


def _wait_workers(pid: int, n: int, timeout: float = 60) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        workers = cgroup.vhost_workers(pid)
        if len(workers) >= n or time.monotonic() > deadline:
            return workers
        time.sleep(0.1)


@pytest.fixture
def groups() -> Iterator[tuple[Path, Path]]:
    """Two fresh cgroups, "shim" and "vm", under a parent named for this test run."""
    parent = _v2_root() / f"kvhost-test-{os.getpid()}"
    shim_cg, vm_cg = parent / "shim", parent / "vm"
    for d in (parent, shim_cg, vm_cg):
        d.mkdir()
    try:
        yield shim_cg, vm_cg
    finally:
        for d in (shim_cg, vm_cg):
            # whatever is left (a test that failed half-way) goes back to the root
            for pid in (d / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):
                    (d.parent.parent / "cgroup.procs").write_text(pid)
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)
        parent.rmdir()


def _path(pid: int) -> str:
    return "".join(m.path for m in cgroup.membership(pid) if not m.controllers)


def test_the_worker_follows_the_shim_into_the_vm_cgroup(
    netns: str, groups: tuple[Path, Path], tmp_path: Path
) -> None:
    shim_cg, vm_cg = groups
    testns.create_tap("kvcg0")
    shim = ShimProcess(str(tmp_path / "s.sock"), tmp_path / "s.log", tap="kvcg0",
                       verbose=False).start()  # fmt: skip
    vm = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        (shim_cg / "cgroup.procs").write_text(str(shim.pid))
        (vm_cg / "cgroup.procs").write_text(str(vm.pid))
        with VhostUserFrontend(shim.socket_path, timeout=60) as fe:
            fe.set_owner()  # the shim's VHOST_SET_OWNER: the worker is born here
            workers = _wait_workers(shim.pid, 1)
            assert len(workers) == 1, f"no vhost-{shim.pid} worker: {workers}"
            worker = workers[0]
            is_thread = (Path(f"/proc/{shim.pid}/task") / str(worker)).exists()
            assert is_thread == THREAD_WORKERS, (os.uname().release, worker)
            born = _path(worker)
            _record(f"{os.uname().release}: worker {worker} "
                    f"({'thread' if is_thread else 'kthread'}) born in {born}; "
                    f"shim in {_path(shim.pid)}")
            assert born == _path(shim.pid) == f"/{shim_cg.parent.name}/shim"
            # the owner's process alone, as cgroup.procs moves it
            (vm_cg / "cgroup.procs").write_text(str(shim.pid))
            after = _path(worker)
            _record(f"{os.uname().release}: after moving only process {shim.pid} to "
                    f"{_path(shim.pid)}: worker in {after}")
            assert after == (_path(vm.pid) if THREAD_WORKERS else born)
            (shim_cg / "cgroup.procs").write_text(str(shim.pid))  # back, for join
            moved = cgroup.join(shim.pid, vm.pid)
            _record(f"{os.uname().release}: join: {moved.describe()}")
            assert moved.workers == (worker,)
            assert _path(worker) == _path(shim.pid) == _path(vm.pid) == (
                f"/{vm_cg.parent.name}/vm")
            assert not (shim_cg / "cgroup.procs").read_text().split()
    finally:
        vm.kill()
        vm.wait()
        shim.stop()
        subprocess.run(["ip", "link", "del", "kvcg0"], check=False, capture_output=True)


def test_libvirt_start_puts_the_datapath_in_qemus_cgroup(
    libvirtd: Path, tmp_path: Path
) -> None:
    name, sock = "kvcg1", SOCKETS / "kvcg1.sock"
    stamped, _ = stamp_to_file(tmp_path, name, vhostuser_domain(name, sock))
    assert virsh("define", str(stamped)).returncode == 0
    try:
        started = virsh("start", name)
        assert started.returncode == 0, started.stderr
        shim = int((STATE / f"{name}.pid").read_text())
        qemu = int(Path(f"/run/libvirt/qemu/{name}.pid").read_text())
        workers = _wait_workers(shim, 1)
        assert len(workers) == 1, f"no vhost-{shim} worker: {workers}"
        want = cgroup.membership(qemu)
        vm_dirs = cgroup.directories(qemu)
        _record(f"{os.uname().release}: libvirt: QEMU {qemu} in "
                f"{' '.join(m.path for m in want)}; shim {shim} in "
                f"{' '.join(m.path for m in cgroup.membership(shim))}; worker {workers[0]} in "
                f"{' '.join(m.path for m in cgroup.membership(workers[0]))}")
        # libvirt did make one for the domain: joining the root would prove nothing
        assert all(m.path not in ("", "/") for m in want), want
        assert cgroup.membership(workers[0]) == want
        assert cgroup.membership(shim) == want
        destroyed = virsh("destroy", name)
        assert destroyed.returncode == 0, destroyed.stderr
        for _ in range(100):
            if not _alive(shim):
                break
            time.sleep(0.1)
        assert not _alive(shim)
        # stopped end stopped the shim before libvirt removed the cgroups it was in
        assert not [d for d in vm_dirs if d.exists()], vm_dirs
    finally:
        virsh("destroy", name)
        virsh("undefine", name)
