"""Kernel tier: what keeps one VM's shim instance (or its compromised QEMU) away from another
VM's tap -- issue 17 item 6, and docs/threat-model.md "Instances".

Two shim instances prepare their taps as the unit does (``TapSpec.prepare`` as root: a
persistent tap given to the instance's user), then forked children with no capabilities
stand in for a compromised shim or QEMU and try to attach to the *other* instance's tap.
Everything runs in the fresh network namespace of the ``netns`` fixture.

What holds (asserted): a created tap carries an owner and no group, so neither QEMU (uid
``QEMU``, in the shim's shared group like Debian's libvirt-qemu in kvm) nor an instance with
another uid can attach it, queue or no queue; and distinct instance uids cannot signal each
other. What does not (asserted too, so a change in it shows): instances sharing one uid --
the unit's default ``kvhost`` -- can attach each other's tap while it is detached, and add
a queue to each other's multi-queue tap.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest
from peers import in_child

from kvhost.errors import KernelError
from kvhost.tap import Tap
from shim.tap_setup import PreparedTap, TapSpec

pytestmark = pytest.mark.kernel

A = 60011  # instance A's user (a per-VM KVHOST_USER)
B = 60012  # instance B's user
QEMU = 60013  # the hypervisor's user, libvirt-qemu's stand-in
SHARED_GROUP = 60100  # the group every instance runs as and QEMU is in (kvm's stand-in)


def attach(name: str, *, queues: int = 1, multi_queue: bool = False) -> str:
    """In a child: try to attach to ``name``; "attached" or the errno's name."""
    try:
        with Tap.open(name, queues=queues, multi_queue=multi_queue):
            return "attached"
    except KernelError as err:
        return errno.errorcode.get(err.errno, str(err.errno))


def as_user(uid: int, name: str, *, queues: int = 1, multi_queue: bool = False) -> str:
    result, status = in_child(
        lambda w: attach(name, queues=queues, multi_queue=multi_queue),
        uid=uid,
        gid=SHARED_GROUP,
        groups=[SHARED_GROUP],
    )
    assert status == 0, result
    return str(result["ok"])


@pytest.fixture
def taps(netns: str) -> Iterator[dict[str, PreparedTap]]:
    """Three instances' taps, prepared as the shim does under the unit: A's and B's for
    distinct users, C's for A's user too (two instances sharing a uid)."""
    prepared: dict[str, PreparedTap] = {}
    try:
        prepared["a"] = TapSpec(name="kvinstA").prepare(A, SHARED_GROUP)
        prepared["b"] = TapSpec(name="kvinstB").prepare(B, SHARED_GROUP)
        prepared["c"] = TapSpec(name="kvinstC").prepare(A, SHARED_GROUP)
        prepared["mq"] = TapSpec(name="kvinstM", queues=2).prepare(B, SHARED_GROUP)
        yield prepared
    finally:
        for tap in prepared.values():
            tap.release()


def test_created_taps_have_an_owner_and_no_group(taps: dict[str, PreparedTap]) -> None:
    for key, uid in (("a", A), ("b", B), ("c", A), ("mq", B)):
        with Tap.open(taps[key].name, queues=taps[key].queues, multi_queue=key == "mq") as t:
            assert t.owner_and_group() == (uid, None), key


def test_an_instance_with_its_own_uid_cannot_take_another_vms_tap(
    taps: dict[str, PreparedTap],
) -> None:
    assert as_user(A, "kvinstA") == "attached"  # its own
    assert as_user(A, "kvinstB") == "EPERM"
    assert as_user(B, "kvinstA") == "EPERM"
    # nor add a queue to another VM's multi-queue tap
    assert as_user(A, "kvinstM", queues=1, multi_queue=True) == "EPERM"
    assert as_user(B, "kvinstM", queues=1, multi_queue=True) == "attached"


def test_a_compromised_qemu_in_the_shims_group_cannot_attach_any_tap(
    taps: dict[str, PreparedTap],
) -> None:
    """QEMU shares the instances' group (kvm on Debian): the taps carry no group, so that
    gives it nothing under either tun rule (each set one must match, as in 6.1; or either
    set one suffices, as in later kernels -- where a group would let QEMU in)."""
    for name in ("kvinstA", "kvinstB", "kvinstC"):
        assert as_user(QEMU, name) == "EPERM", name
    assert as_user(QEMU, "kvinstM", queues=1, multi_queue=True) == "EPERM"


def test_instances_sharing_a_uid_can_take_each_others_detached_tap(
    taps: dict[str, PreparedTap],
) -> None:
    """What does NOT hold with the unit's default (one ``kvhost`` user for every instance):
    C's tap is A's user's too. While C's shim holds it (single queue), A is refused; while
    C is disconnected, A attaches."""
    assert as_user(A, "kvinstC") == "attached"
    with taps["c"].open():  # C's connection holds its one queue
        assert as_user(A, "kvinstC") == "EBUSY"


def test_distinct_instance_uids_cannot_signal_each_other(netns: str) -> None:
    """A compromised shim can kill every process of its own uid, i.e. every instance
    sharing it; another uid's it cannot."""
    victim = subprocess.Popen(
        ["sleep", "60"], preexec_fn=lambda: os.setresuid(B, B, B)
    )
    try:
        time.sleep(0.1)

        def kill(w: int) -> str:
            try:
                os.kill(victim.pid, signal.SIGTERM)
            except PermissionError:
                return "EPERM"
            return "killed"

        other, _ = in_child(kill, uid=A, gid=SHARED_GROUP)
        assert other == {"ok": "EPERM"}
        assert victim.poll() is None
        same, _ = in_child(kill, uid=B, gid=SHARED_GROUP)
        assert same == {"ok": "killed"}
        assert victim.wait(10) == -signal.SIGTERM
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait(10)
