"""Which tap a connection gets, and a tap prepared once for a shim without privileges.

:class:`TapSpec` describes the tap (create or attach, name, namespace, MTU, bridge).
:meth:`TapSpec.open` is the per-connection ``open_tap`` of a privileged shim. For ``--user``,
:meth:`TapSpec.prepare` runs once as root before the drop: it makes the tap persistent (or
checks that an operator's tap is) and hands it to the shim's user, returning a
:class:`PreparedTap` whose :meth:`~PreparedTap.open` attaches without capabilities and whose
:meth:`~PreparedTap.release` puts back what was changed (:class:`_Ownership`) at exit.

Ownership of an operator's tap (the tun driver's rules)::

    tap's owner / group      the shim does                 release() restores
    ---------------------    ---------------------------   -------------------------
    uid / (none or gid)      nothing                       nothing
    none / gid               nothing                       nothing
    none / other             TUNSETGROUP gid               that group
    other or none / any      TUNSETOWNER uid (+ group)     the owner (0 if none) (+ group)

Errors: KernelError when the kernel refuses, UsageError when the operator asked for a tap
that cannot serve (not persistent, already in use, an MTU an unprivileged shim cannot set).
"""

from __future__ import annotations

import contextlib
import errno
from dataclasses import dataclass

from kvhost import abi
from kvhost import netns as kvnetns
from kvhost.errors import KernelError, KvhostError, UsageError
from kvhost.tap import Tap


@dataclass(frozen=True, slots=True)
class TapSpec:
    """Which tap a connection gets: the existing tap ``name`` (``create`` False) or a new one
    (named ``name``, or ``tapN`` by the kernel), in namespace ``netns``.

    ``mtu`` and ``bridge`` are applied to either; a created tap is also brought up (an
    existing tap's link state is the operator's).

    Two ways to use it: :meth:`open` per connection (the shim keeps its privileges, each
    connection gets a tap of its own), or :meth:`prepare` once at start-up for a shim that
    then drops them (``--user``): see :class:`PreparedTap`.
    """

    queues: int = 1
    name: str | None = None
    create: bool = True
    bridge: str | None = None
    netns: str | None = None
    mtu: int | None = None

    def open(self) -> Tap:
        """Open or create the tap. Raises KernelError / UsageError saying what failed."""
        tap = self._attach()
        try:
            self._configure(tap)
        except BaseException:
            tap.close()
            raise
        return tap

    def check(self) -> None:
        """Without ``--user``: attach to an existing tap once and let go, so that a missing
        or unusable one fails the start-up instead of every connection's SET_OWNER (where
        :meth:`open` would first meet it). A frontend whose connection fails reconnects at
        once: QEMU's vhost-user netdev retries before its monitor answers, so libvirt's
        ``virsh start`` would wait on it for ever. Nothing is configured (MTU, bridge: those
        stay per connection). A tap the shim creates needs no check. Raises KernelError /
        UsageError, as :meth:`open` would."""
        if not self.create:
            self._attach().close()

    def prepare(self, uid: int, gid: int) -> PreparedTap:
        """At start-up, as root: create (or open) the tap, apply MTU/bridge/up, and let
        ``uid``/``gid`` attach to it later without any capability.

        A created tap is made persistent (it must outlive the start-up fds) and given to
        ``uid`` alone (TUNSETOWNER, no group: see docs/threat-model.md, "Instances"). An
        existing one must already be persistent (else another process owns its
        lifetime); it is changed only as far as needed -- nothing when ``uid`` may attach
        already (it owns the tap, or the tap has no owner and group ``gid``), else
        TUNSETOWNER ``uid``, and TUNSETGROUP ``gid`` when another group is set -- and
        :meth:`PreparedTap.release` puts back what was changed. Raises KernelError /
        UsageError; a tap it created is removed again on failure, an existing one gets its
        owner and group back.
        """
        tap = self._attach()
        restore = _Ownership(None, None)
        try:
            flags = tap.get_iff()[1]
            if not self.create and not flags & abi.IFF_PERSIST:
                raise UsageError(
                    f"tap {tap.name} is not persistent, so another process owns its lifetime; "
                    f"with --user the shim needs a persistent tap ('ip tuntap add {tap.name} "
                    "mode tap', or omit --tap and let the shim create one)"
                )
            if self.create:
                tap.set_persist(True)
                # the owner alone: under the newer tun rule (a set owner *or* group
                # matches) a group lets every member attach, and the shim's group (kvm, for
                # /dev/vhost-net) is QEMU's too
                tap.set_owner(uid)
            else:
                restore = _give(tap, uid, gid)
            self._configure(tap)
            prepared = PreparedTap(
                tap.name,
                self.queues,
                multi_queue=bool(flags & abi.IFF_MULTI_QUEUE),
                created=self.create,
                netns=self.netns,
                restore=restore,
            )
        except BaseException:
            with contextlib.suppress(KvhostError):
                if self.create:
                    tap.set_persist(False)
                else:
                    restore.apply(tap)
            tap.close()
            raise
        tap.close()
        return prepared

    def _attach(self) -> Tap:
        if self.create:
            return Tap.create(self.name, queues=self.queues, netns=self.netns)
        if self.name is None:
            raise UsageError("an existing tap needs a name")
        return self._open_existing(self.name)

    def _configure(self, tap: Tap) -> None:
        if self.mtu is not None:
            tap.set_mtu(self.mtu)
        if self.bridge is not None:
            tap.attach_bridge(self.bridge)
        if self.create:
            tap.set_up()

    def _open_existing(self, name: str) -> Tap:
        try:
            return Tap.open(name, queues=self.queues, netns=self.netns)
        except KernelError as err:
            if err.errno != errno.EINVAL or self.queues != 1:
                raise
        # a multiqueue tap serving one queue pair
        return Tap.open(name, queues=1, netns=self.netns, multi_queue=True)


@dataclass(frozen=True, slots=True)
class _Ownership:
    """What :meth:`TapSpec.prepare` changed on an operator's tap: the previous owner and
    group to put back (None: that one was not changed). The kernel cannot unset an owner
    (TUNSETOWNER refuses -1), so a tap that had none gets root (uid 0), which lets nobody
    attach who could not before except processes with euid 0 that lack CAP_NET_ADMIN."""

    owner: int | None
    group: int | None
    had_owner: bool = True

    @property
    def changed(self) -> bool:
        return self.owner is not None or self.group is not None

    def apply(self, tap: Tap) -> None:
        if self.owner is not None:
            tap.set_owner(self.owner)
        if self.group is not None:
            tap.set_group(self.group)

    def describe(self) -> str:
        parts = []
        if self.owner is not None:
            parts.append(
                f"owner uid {self.owner}"
                + ("" if self.had_owner else " (it had none; the kernel cannot clear an owner)")
            )
        if self.group is not None:
            parts.append(f"group gid {self.group}")
        return " and ".join(parts) or "nothing to restore"


def _give(tap: Tap, uid: int, gid: int) -> _Ownership:
    """Let ``uid`` (running as ``gid``) attach to the existing tap, changing no more than
    needed; what to put back. Both tun rules are met: the old one (each set owner or group
    must match; 6.1 still has it, tests/test_kernel_instances.py) and the newer one (a set
    owner or group matches)."""
    owner, group = tap.owner_and_group()
    if (owner == uid and group in (None, gid)) or (owner is None and group == gid):
        return _Ownership(None, None)
    if owner is None and group is not None:
        # only a group is set: handing the group over is enough under both rules, and it
        # can be put back exactly (an owner, once set, cannot be cleared)
        tap.set_group(gid)
        return _Ownership(None, group)
    tap.set_owner(uid)
    restore = _Ownership(0 if owner is None else owner, None, had_owner=owner is not None)
    if group is not None and group != gid:
        try:
            tap.set_group(gid)
        except BaseException:
            with contextlib.suppress(KvhostError):
                restore.apply(tap)
            raise
        restore = _Ownership(restore.owner, group, restore.had_owner)
    return restore


class _UnprivilegedTap(Tap):
    """A tap attached by a shim without CAP_NET_ADMIN: link changes are impossible, so an
    MTU request succeeds only when the tap already has that MTU."""

    def set_mtu(self, n: int) -> None:
        current = self.get_mtu()
        if current == n:
            return
        raise UsageError(
            f"tap {self.name} has MTU {current} and the shim, running without CAP_NET_ADMIN "
            f"(--user), cannot change it to {n}; start the shim with --mtu {n}"
        )


class PreparedTap:
    """A persistent tap :meth:`TapSpec.prepare` made the shim user's; :meth:`open` is the
    per-connection ``open_tap`` of :class:`KernelBackend`, :meth:`release` undoes the
    preparation at exit.

    Each connection attaches to the tap by name (TUNSETIFF: the tun driver lets the tap's
    owner do that without capabilities) and detaches when its backend closes the tap. One
    connection at a time: while one holds the tap, another is refused at SET_OWNER (a
    multi-queue tap would otherwise take both frontends' queues). NET_SET_MTU succeeds only
    for the MTU the tap has (:class:`_UnprivilegedTap`).

    ``netns``: the tap lives there. Until :meth:`enter_netns` the calling thread is assumed
    to be elsewhere and every attach enters ``netns`` for its duration (root only); after
    it, attaches happen where the thread is. With ``--netns`` the shim calls
    :meth:`enter_netns` before dropping privileges, so reopening needs no setns then.
    """

    def __init__(
        self,
        name: str,
        queues: int,
        *,
        multi_queue: bool,
        created: bool,
        netns: str | None,
        restore: _Ownership | None = None,
    ) -> None:
        self.name = name
        self.queues = queues
        self.multi_queue = multi_queue
        #: the shim created it, so :meth:`release` deletes it at exit
        self.created = created
        self.netns = netns
        #: what :meth:`release` gives back to an operator's tap
        self.restore = restore if restore is not None else _Ownership(None, None)
        self._entered = False
        self._holder: Tap | None = None

    @property
    def ownership_note(self) -> str:
        """What :meth:`TapSpec.prepare` did to the tap's ownership, for the log."""
        if self.created:
            return "created it, persistent, owned by the shim's user (no group)"
        if not self.restore.changed:
            return "left its owner and group as they were: the shim's user may attach"
        return f"gave it to the shim's user; at exit it gets back {self.restore.describe()}"

    def enter_netns(self) -> None:
        """Move the calling thread into the tap's namespace for good (no-op without one).
        Raises UsageError / KernelError (see :func:`kvhost.netns.enter`)."""
        if self.netns is not None and not self._entered:
            kvnetns.enter(self.netns)
            self._entered = True

    def _where(self) -> str | None:
        return None if self._entered else self.netns

    def open(self) -> Tap:
        """Attach one fd per queue. Raises UsageError while another connection holds the
        tap, KernelError when the kernel refuses (ownership changed, tap gone)."""
        holder = self._holder
        if holder is not None and holder.fds:
            # also when the previous connection's tap still waits in the closer thread:
            # KernelBackend.set_owner drains the closer and retries once for that case
            raise UsageError(
                f"tap {self.name} already serves another connection of this shim; one "
                "frontend at a time"
            )
        tap = _UnprivilegedTap.open(
            self.name, queues=self.queues, multi_queue=self.multi_queue, netns=self._where()
        )
        self._holder = tap
        return tap

    def release(self) -> str:
        """Undo :meth:`TapSpec.prepare`: delete the tap the shim created (attach one queue,
        clear TUNSETPERSIST, close -- the last fd gone, the kernel deletes it), or give an
        operator's tap back its previous owner and group (it is never deleted). Works
        after the drop (the tap is the user's). Returns what it did, for the log. Raises
        KernelError / UsageError.
        """
        if not self.created and not self.restore.changed:
            return f"tap {self.name} left as it was"
        tap = Tap.open(self.name, queues=1, multi_queue=self.multi_queue, netns=self._where())
        try:
            if self.created:
                tap.set_persist(False)
            else:
                self.restore.apply(tap)
        finally:
            tap.close()
        if self.created:
            return f"tap {self.name} removed"
        return f"tap {self.name} released: {self.restore.describe()} restored"
