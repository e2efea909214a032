"""``kvhost-shim``: a vhost-user net backend program whose datapath is kernel vhost-net.

Follows QEMU's vhost-user backend program conventions (``docs/interop/vhost-user.rst``,
"Backend program conventions"): ``--socket-path PATH`` or ``--fd N``, ``--print-capabilities``,
no daemonizing, exit on SIGTERM, and a non-zero exit with one sentence when the requested
interface version cannot be served here. Exit status: 0 after a clean stop, 1 when the
version cannot be served or the kernel refuses, 2 for usage errors.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from types import FrameType

from kvhost import probe, versions
from kvhost.errors import KvhostError, UsageError, VersionError
from shim.kernel_backend import KernelBackend, TapSpec
from shim.server import ShimConfig, ShimServer
from shim.session import Backend, unservable_reason

log = logging.getLogger("kvhost.shim")


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
        help="serve on inherited fd N (a listening unix socket, or one connected socket)",
    )
    parser.add_argument(
        "--print-capabilities",
        action="store_true",
        help="print the backend capabilities as JSON and exit",
    )
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


def build_server(args: argparse.Namespace) -> ShimServer:
    """Probe the host, choose the version and open the socket (the CLI minus signals)."""
    if args.socket_path is None and args.fd is None:
        raise UsageError("give --socket-path PATH or --fd N")
    offer = versions.host_offer(probe.probe())
    version, supported, pinned = choose_version(args.interface_version, offer)
    _check_queues(args.queues, version)
    spec = TapSpec(
        queues=args.queues,
        name=args.tap,
        create=args.tap is None,
        bridge=args.bridge,
        netns=args.netns,
        mtu=args.mtu,
    )

    def make_backend(name: str) -> Backend:
        return KernelBackend(spec.open, args.queues, name=name)

    config = ShimConfig(version, make_backend, supported, pinned)
    if args.socket_path is not None:
        return ShimServer.listen(args.socket_path, config)
    return ShimServer.adopt(args.fd, config)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.print_capabilities:
        print(json.dumps({"type": "net"}))
        return 0
    logging.basicConfig(level=logging.INFO, format="kvhost-shim: %(message)s", stream=sys.stderr)
    # -v is about the shim's own decisions, not the libraries' internals (pyroute2's
    # netlink traces would bury them)
    logging.getLogger("kvhost").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        server = build_server(args)
    except UsageError as err:
        print(f"kvhost-shim: {err}", file=sys.stderr)
        return 2
    except (VersionError, KvhostError) as err:
        print(f"kvhost-shim: {err}", file=sys.stderr)
        return 1

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("%s received, stopping", signal.Signals(signum).name)
        server.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
