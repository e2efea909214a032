"""``kvhost libvirt stamp``: record a domain's interface version before ``virsh define``.

Thin: reads the XML, picks the version (explicit, this host's latest, or the newest all the
given manifests share, as ``kvhost compat``), checks the hosts can serve it, and lets
:mod:`kvhost.libvirt` rewrite the XML. Nothing is written unless every step succeeded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from kvhost import libvirt as lv
from kvhost import manifest as mf
from kvhost import qemu_args
from kvhost import versions as ver
from kvhost.errors import UsageError, VersionError


def register(sub: Any) -> None:
    p = sub.add_parser("libvirt", help="libvirt integration: stamp domain XML with a version")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    s = verbs.add_parser(
        "stamp",
        help="record the interface version in a domain XML (before 'virsh define')",
        description="Write kvhost's <metadata> element and pin every native vhost-net "
        "interface (<driver name='vhost'>) to the version with libvirt's offload attributes "
        "and <qemu:override>. The version is --version, else the newest every --manifest "
        "host supports (as 'kvhost compat'), else this host's latest.",
    )
    s.add_argument("domain", metavar="DOMAIN.xml", help="domain XML file, or - for stdin")
    s.add_argument("-o", "--output", metavar="OUT", help="write here (default: stdout)")
    s.add_argument("--version", dest="iface_version", metavar="V", help="version to record")
    s.add_argument(
        "--manifest",
        nargs="+",
        metavar="M.json",
        help="manifests of the hosts the VM must run on (default: this host)",
    )
    s.add_argument(
        "--host-manifest",
        metavar="M.json",
        help=f"this host's manifest (default {mf.DEFAULT_PATH}, else probe the kernel)",
    )
    s.add_argument("--qemu", default=None,
                   help="QEMU binary whose properties pin native interfaces (default: the "
                   "domain's <emulator>, else qemu-system-x86_64 on PATH)")
    s.add_argument("--force", action="store_true",
                   help="replace a different version already recorded in the domain")
    s.set_defaults(func=_stamp)


def _read(path: str) -> bytes:
    try:
        return sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as err:
        raise UsageError(f"cannot read {path}: {err.strerror}") from err


def _stamp(args: argparse.Namespace) -> int:
    source = "stdin" if args.domain == "-" else args.domain
    doc = lv.parse(_read(args.domain), source)
    if args.manifest:
        hosts = [lv.Host(m.offer, m.label) for m in map(mf.read, args.manifest)]
    else:
        hosts = [lv.this_host(Path(args.host_manifest) if args.host_manifest else None)]
    if args.iface_version:
        version = ver.parse(args.iface_version)
    elif args.manifest:
        result = mf.compat([mf.read(p) for p in args.manifest])
        if result.version is None:
            raise VersionError("no common interface version: " + "; ".join(result.reasons))
        version = result.version
    else:
        version = ver.latest(hosts[0].offer)
    for host in hosts:
        why = lv.refusal(version, host)
        if why:
            raise VersionError(why)
    qemu = args.qemu or lv.emulator(doc) or "qemu-system-x86_64"
    available = qemu_args.available_properties(qemu) if lv.needs_qemu(doc) else None
    lv.stamp(doc, version, available, force=args.force, source=source)
    data = lv.serialize(doc)
    if args.output in (None, "-"):
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    else:
        try:
            mf.write_atomic(Path(args.output), data, mode=0o644, action="write")
        except mf.ManifestError as err:
            raise UsageError(str(err)) from err
    print(f"{source}: recorded {version.label}", file=sys.stderr)
    return 0
