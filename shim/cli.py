"""``kvhost-shim``: a vhost-user net backend program whose datapath is kernel vhost-net.

Follows QEMU's vhost-user backend program conventions (``docs/interop/vhost-user.rst``,
"Backend program conventions"): ``--socket-path PATH`` or ``--fd N``, ``--print-capabilities``
(which prints and exits whatever else the command line holds), no daemonizing, exit on
SIGTERM, and a non-zero exit with one sentence when the requested interface version cannot
be served here. Exit status: 0 after a clean stop, 1 when the
version cannot be served or the kernel refuses, 2 for usage errors. Under socket activation
(``kvhost-shim@VM.socket``, ``systemd-socket-activate``) the socket systemd made is served
with ``--fd 3`` (:mod:`shim.activation`): it listens before the shim has imported anything,
and a frontend that connects early waits in its backlog until the shim accepts. Once set up
and running as ``--user``, the shim sends ``READY=1`` to ``NOTIFY_SOCKET`` when one is set
(``Type=notify``).

Start-up order, so that everything privileged happens first and nothing is served before
the shim runs as ``--user``: resolve names and check option combinations -> probe the host
and choose the version -> check that the user can open the device nodes -> tap set-up (a
persistent tap given to the user, :meth:`TapSpec.prepare`; without ``--user``, an operator's
``--tap`` attached once, :meth:`TapSpec.check`) -> socket (mode, owner, group)
-> enter ``--netns`` -> drop privileges and verify -> open ``/dev/vhost-net`` once as the
user -> serve. At exit (clean or not, once the tap is set up) the tap the shim created is
deleted again, and an operator's tap gets back the owner and group it had.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

from kvhost import __version__, probe, versions
from kvhost.errors import KvhostError, UsageError, VersionError
from kvhost.memory import MappingBudget, format_size, parse_size
from kvhost.tap import TUN_PATH, Tap
from shim import activation, eventlog, privileges
from shim.closer import CLOSER
from shim.eventlog import event
from shim.kernel_backend import KernelBackend
from shim.privileges import VHOST_NET_PATH, AllowList, Identity
from shim.server import Limits, ShimConfig, ShimServer
from shim.session import Backend, unservable_reason
from shim.tap_setup import PreparedTap, TapSpec

log = logging.getLogger("kvhost.shim")

#: what ``--print-capabilities`` prints: a net backend (vhost-user.json's schema)
CAPABILITIES = {"type": "net"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvhost-shim",
        description="vhost-user net backend serving a pinned interface version with kernel "
        "vhost-net as the datapath.",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--socket-path", metavar="PATH", help="listen on this unix socket")
    where.add_argument(
        "--fd",
        type=int,
        metavar="N",
        help="serve on inherited fd N (a listening unix socket, or one connected socket); "
        "with socket activation (LISTEN_FDS, LISTEN_PID) the one systemd passed, --fd 3",
    )
    parser.add_argument(
        "--print-capabilities",
        action="store_true",
        help="print the backend capabilities as JSON and exit, ignoring every other option",
    )
    parser.add_argument("--version", action="version", version=f"kvhost-shim {__version__}")
    parser.add_argument(
        "--interface-version",
        metavar="V",
        help="serve exactly this version (registry name or value list) and refuse others; "
        "default: the newest this host serves, and frontends may select another",
    )
    parser.add_argument("--tap", metavar="NAME", help="use this existing tap")
    parser.add_argument("--bridge", metavar="BR", help="attach the tap to this bridge")
    parser.add_argument("--netns", metavar="NS", help="network namespace of the tap")
    parser.add_argument("--queues", type=int, default=1, metavar="N", help="queue pairs")
    parser.add_argument("--mtu", type=int, metavar="N", help="MTU to set on the tap")
    parser.add_argument(
        "--allow-mtu-change",
        action="store_true",
        help="let a frontend's NET_SET_MTU change the tap's MTU (default: only the MTU the "
        "tap has is accepted; a bridge takes the smallest MTU of its ports); not with --user",
    )
    limits = parser.add_argument_group("memory a frontend may map into the shim")
    limits.add_argument(
        "--max-guest-memory",
        metavar="SIZE",
        help="most memory one connection may map (its memory table and dirty log), e.g. "
        "256G; default: this host's RAM + swap",
    )
    limits.add_argument(
        "--max-mapped-memory",
        metavar="SIZE",
        help="most memory all connections together may map; default: twice "
        "--max-guest-memory's default",
    )
    access = parser.add_argument_group("least privilege and access")
    access.add_argument(
        "--user",
        metavar="USER",
        help="after set-up (tap, socket) run as this user (name or uid) with no capabilities; "
        "the shim must start as root",
    )
    access.add_argument(
        "--group",
        metavar="GROUP",
        help="with --user: run as this group (name or gid), also the only supplementary "
        "group; default: the user's primary group and no supplementary groups",
    )
    access.add_argument(
        "--socket-group",
        metavar="GROUP",
        help="socket file mode 0660 with this group (default: mode 0600, owned by --user or "
        "the shim's user)",
    )
    access.add_argument(
        "--allow-uid",
        action="append",
        default=[],
        metavar="UID",
        help="serve only peers (SO_PEERCRED) with this uid (name or number; repeatable), "
        "or with a gid given by --allow-gid; default: every peer that can open the socket",
    )
    access.add_argument(
        "--allow-gid",
        action="append",
        default=[],
        metavar="GID",
        help="serve peers whose primary or supplementary group is this (repeatable)",
    )
    access.add_argument(
        "--allow-label",
        action="append",
        default=[],
        metavar="LABEL",
        help="serve only peers whose security label (SO_PEERSEC) is this, exactly "
        "(repeatable; with SELinux sVirt, the VM's QEMU context, e.g. "
        "system_u:system_r:svirt_t:s0:c12,c34); in addition to --allow-uid/--allow-gid",
    )
    deadlines = parser.add_argument_group(
        "deadlines and limits (what a frontend that stalls or floods may hold; see "
        "docs/threat-model.md)"
    )
    deadlines.add_argument(
        "--max-connections",
        type=int,
        default=Limits.max_connections,
        metavar="N",
        help="serve at most N connections at once; beyond, a new one is closed with a log "
        "line (default: %(default)s)",
    )
    deadlines.add_argument(
        "--handshake-timeout",
        type=float,
        default=Limits.handshake_timeout,
        metavar="SECONDS",
        help="drop a connection that has not sent SET_OWNER this long after connecting "
        "(QEMU sends it at once; default: %(default)g)",
    )
    deadlines.add_argument(
        "--stall-timeout",
        type=float,
        default=Limits.stall_timeout,
        metavar="SECONDS",
        help="drop a frontend that leaves a message half-sent, or its replies unread, this "
        "long (default: %(default)g)",
    )
    deadlines.add_argument(
        "--idle-timeout",
        type=float,
        metavar="SECONDS",
        help="drop a connection past SET_OWNER that has no ring running and sends nothing "
        "this long, freeing the tap; default: off, because QEMU waits like that until the "
        "guest's driver starts the device (a paused VM, an incoming migration)",
    )
    parser.add_argument(
        "--log-format",
        choices=eventlog.LOG_FORMATS,
        default="text",
        help="text (default) or json: one JSON object per line",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def choose_version(
    text: str | None, offer: versions.Offer
) -> tuple[versions.InterfaceVersion, list[versions.InterfaceVersion], bool]:
    """(version to serve, versions a frontend may select, pinned?) for this host.

    Raises VersionError with one sentence when the version cannot be served here.
    """
    supported = [v for v in versions.supported(offer) if unservable_reason(v) is None]
    if text is None:
        if not supported:
            oldest = versions.registry()[0]
            why = unservable_reason(oldest) or "; ".join(versions.missing(oldest, offer))
            raise VersionError(f"this host serves no interface version: {oldest.label}: {why}")
        return supported[-1], supported, False
    wanted = versions.parse(text)
    reasons = versions.missing(wanted, offer)
    if reasons:
        raise VersionError(
            f"interface version {wanted.label} cannot be served on this host: {'; '.join(reasons)}"
        )
    reason = unservable_reason(wanted)
    if reason is not None:
        raise VersionError(reason)
    if not any(wanted.same_interface(v) for v in supported):
        supported.append(wanted)
    return wanted, supported, True


def _check_queues(queues: int, version: versions.InterfaceVersion) -> None:
    if queues < 1:
        raise UsageError(f"--queues {queues}: at least one queue pair is needed")
    if queues > version.max_queue_pairs:
        raise UsageError(
            f"--queues {queues} exceeds the {version.max_queue_pairs} queue pair(s) of "
            f"interface version {version.label}; use fewer queues or a newer version"
        )


def mapping_budget(args: argparse.Namespace) -> MappingBudget:
    """The bounds of ``--max-guest-memory`` / ``--max-mapped-memory`` (defaults:
    :meth:`MappingBudget.for_host`). Raises UsageError."""
    default = MappingBudget.for_host()
    one = (
        parse_size(args.max_guest_memory, "--max-guest-memory")
        if args.max_guest_memory is not None
        else default.per_connection
    )
    total = (
        parse_size(args.max_mapped_memory, "--max-mapped-memory")
        if args.max_mapped_memory is not None
        else max(default.total, one)
    )
    if total < one:
        raise UsageError(
            f"--max-mapped-memory {args.max_mapped_memory} is less than the "
            f"{format_size(one)} one connection may map; raise it or lower --max-guest-memory"
        )
    return MappingBudget(one, total)


def check_combinations(args: argparse.Namespace) -> None:
    """UsageError for options that cannot go together (before anything is resolved)."""
    if args.socket_path is None and args.fd is None:
        raise UsageError("give --socket-path PATH or --fd N")
    if args.group is not None and args.user is None:
        raise UsageError("--group applies to the user the shim drops to: give --user too")
    if args.socket_group is not None and args.fd is not None:
        raise UsageError(
            "--socket-group sets the mode of the socket file the shim creates; with --fd "
            "whoever created the socket sets its mode"
        )
    if args.allow_mtu_change and args.user is not None:
        raise UsageError(
            "--allow-mtu-change needs CAP_NET_ADMIN, which --user drops; set the tap's MTU "
            "with --mtu instead"
        )
    if args.user is not None and os.geteuid() != 0:
        raise UsageError(
            f"--user needs the shim to start as root (it runs as uid {os.geteuid()}): it "
            "creates the tap and the socket first, then drops to the user"
        )


@dataclass
class Program:
    """A set-up shim: the server, and under ``--user`` the identity and the prepared tap."""

    server: ShimServer
    who: Identity | None = None
    tap: PreparedTap | None = None


def build_server(args: argparse.Namespace) -> Program:
    """Everything before the privilege drop: resolve, probe, choose the version, then
    :func:`set_up` the tap and the socket. Raises UsageError / VersionError / KvhostError."""
    check_combinations(args)
    activation.check_fd(args.fd, activation.listen_fds())
    who = privileges.identity(args.user, args.group) if args.user is not None else None
    socket_gid = (
        privileges.resolve_group(args.socket_group, "--socket-group")
        if args.socket_group is not None
        else None
    )
    allow = AllowList(
        privileges.resolve_ids(args.allow_uid, "--allow-uid"),
        privileges.resolve_ids(args.allow_gid, "--allow-gid"),
        privileges.resolve_labels(args.allow_label),
    )
    limits = Limits(
        args.max_connections, args.handshake_timeout, args.stall_timeout, args.idle_timeout
    )
    offer = versions.host_offer(probe.probe())
    version, supported, pinned = choose_version(args.interface_version, offer)
    _check_queues(args.queues, version)
    budget = mapping_budget(args)
    if who is not None:
        privileges.check_device_access(who, VHOST_NET_PATH)
        privileges.check_device_access(who, TUN_PATH)

    def config(open_tap: Callable[[], Tap]) -> ShimConfig:
        def make_backend(name: str) -> Backend:
            # the closer the server waits for at exit (ShimConfig.closer's default)
            return KernelBackend(
                open_tap,
                args.queues,
                name=name,
                closer=CLOSER,
                budget=budget,
                allow_mtu_change=args.allow_mtu_change,
            )

        return ShimConfig(
            version, make_backend, supported, pinned, allow, closer=CLOSER, limits=limits
        )

    return set_up(args, config, who, socket_gid)


def set_up(
    args: argparse.Namespace,
    config: Callable[[Callable[[], Tap]], ShimConfig],
    who: Identity | None,
    socket_gid: int | None,
) -> Program:
    """The privileged part of the start-up, once every check has passed: under ``--user``
    the tap (:meth:`TapSpec.prepare`), then the socket, served with ``config(open_tap)``.

    Without ``--user``, an operator's ``--tap`` must exist already (:meth:`TapSpec.check`).
    When the socket cannot be made, the prepared tap is released again (deleted if the
    shim created it); a failure to release it is logged, and the socket's error is the one
    raised. Raises UsageError / KernelError.
    """
    spec = TapSpec(
        queues=args.queues,
        name=args.tap,
        create=args.tap is None,
        bridge=args.bridge,
        netns=args.netns,
        mtu=args.mtu,
    )
    prepared = None
    if who is None:
        spec.check()  # an operator's tap is opened per connection: is it there at all?
    else:
        prepared = spec.prepare(who.uid, who.gid)
        what = (
            f"created: persistent, owner uid {who.uid}, no group"
            if prepared.created
            else f"opened: {prepared.ownership_note}"
        )
        event(
            "tap",
            f"tap {prepared.name} {what}"
            + (f", in network namespace {args.netns}" if args.netns else ""),
            tap=prepared.name,
        )
    served = config(prepared.open if prepared is not None else spec.open)
    try:
        if args.socket_path is not None:
            server = ShimServer.listen(
                args.socket_path,
                served,
                mode=0o600 if socket_gid is None else 0o660,
                owner=None if who is None else who.uid,
                group=socket_gid if socket_gid is not None else (None if who is None else who.gid),
            )
        else:
            server = ShimServer.adopt(args.fd, served)
    except BaseException:
        release_tap(prepared)
        raise
    return Program(server, who, prepared)


def drop_privileges(program: Program) -> None:
    """Under ``--user``: enter the tap's namespace (``--netns``) for good, drop, verify, and
    open the device nodes once as the user. Raises UsageError / KernelError."""
    who = program.who
    if who is None:
        return
    if program.tap is not None:
        program.tap.enter_netns()
    dropped = privileges.drop(who)
    privileges.probe_device(who, VHOST_NET_PATH)
    privileges.probe_device(who, TUN_PATH)
    groups = ",".join(str(g) for g in who.groups) or "none"
    event(
        "privileges",
        f"running as {who} (supplementary groups: {groups}); no capabilities left "
        f"(CapEff = CapPrm = CapAmb = 0, bounding set "
        f"{'empty' if dropped.bounding_cleared else 'kept: no CAP_SETPCAP'}), no new "
        "privileges",
        uid=who.uid,
        gid=who.gid,
        result="dropped",
    )


def release_tap(tap: PreparedTap | None) -> None:
    """:meth:`PreparedTap.release`, logged; a failure is logged too, never raised (this runs
    on the way out, often while another error is being reported)."""
    if tap is None:
        return
    try:
        done = tap.release()
    except (KvhostError, OSError) as err:
        event("error", f"tap {tap.name} could not be released: {err}", level=logging.ERROR)
        return
    event("tap", done, tap=tap.name, result="removed" if tap.created else "released")


def _error(err: KvhostError) -> int:
    event("error", str(err), level=logging.ERROR, result="failed")
    return 2 if isinstance(err, UsageError) else 1


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    # vhost-user.rst: a backend asked for its capabilities prints them and exits, ignoring
    # other options -- so checked before the parser, which would reject an unknown one
    if "--print-capabilities" in words:
        print(json.dumps(CAPABILITIES))
        return 0
    args = build_parser().parse_args(words)
    handler = eventlog.configure(args.log_format, verbose=args.verbose)
    if args.socket_path is not None:
        eventlog.formatter_of(handler).socket = args.socket_path
    elif args.fd is not None:
        eventlog.formatter_of(handler).socket = activation.bound_path(args.fd)
    try:
        return _run(args)
    finally:
        eventlog.unconfigure(handler)


def _run(args: argparse.Namespace) -> int:
    try:
        program = build_server(args)
    except KvhostError as err:
        return _error(err)
    try:
        drop_privileges(program)
    except KvhostError as err:
        program.server.close()
        release_tap(program.tap)
        return _error(err)
    server = program.server

    def on_signal(signum: int, frame: FrameType | None) -> None:
        server.stop(reason=signal.Signals(signum).name)  # the loop logs it, not the handler

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # Type=notify: 'systemctl start' (the libvirt hook's) returns only now, or fails
    # naming the unit, instead of succeeding for a shim that then dies on its set-up
    problem = activation.notify_ready()
    if problem is not None:
        event("error", problem, level=logging.WARNING)
    try:
        server.serve()
    finally:
        release_tap(program.tap)
    event("stopped", "stopped", result="clean")
    return 0


if __name__ == "__main__":
    sys.exit(main())
