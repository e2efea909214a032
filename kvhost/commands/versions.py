"""Version subcommands: ``manifest``, ``versions``, ``check``, ``compat``, ``qemu-args``,
``install-udev``. Thin: each parses, calls kvhost.versions / manifest / qemu_args, prints."""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from kvhost import manifest as mf
from kvhost import nfd, qemu_args
from kvhost import versions as ver
from kvhost.errors import KvhostError, UsageError

DEFAULT_RULES_DIR = Path("/etc/udev/rules.d")
RULES_NAME = "90-kvhost.rules"
#: where ``pip install`` puts the entry point for the system interpreter; the rules file
#: shipped in udev/ uses it, ``kvhost install-udev`` writes the running interpreter instead
SHIPPED_COMMAND = ("/usr/local/bin/kvhost",)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "manifest",
        help="probe the kernel and write this host's version manifest",
        description="Probe kernel vhost-net and tun and atomically write the manifest "
        "(latest and supported interface versions). Exit 1, leaving any previous manifest "
        "in place, when the host serves no version.",
    )
    p.add_argument(
        "--output",
        default=str(mf.DEFAULT_PATH),
        help=f"manifest path (default {mf.DEFAULT_PATH}; '-' prints it without writing)",
    )
    p.add_argument("--json", action="store_true", help="also print the manifest as JSON")
    p.add_argument(
        "--kmsg",
        action="store_true",
        help="also log the outcome to the kernel log (/dev/kmsg), as the udev rule does",
    )
    add_nfd_options(p)
    p.set_defaults(func=manifest_command)

    p = sub.add_parser(
        "versions",
        help="list the interface version registry, marking what this host supports",
    )
    p.add_argument("--manifest", help="judge by this manifest instead of probing this host")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_versions)

    p = sub.add_parser(
        "check",
        help="exit 0 if this host (or a manifest) can serve VERSION, else say what is missing",
    )
    p.add_argument("version", metavar="VERSION", help="registry name or value list")
    p.add_argument("--manifest", help="judge by this manifest instead of probing this host")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_check)

    p = sub.add_parser(
        "compat",
        help="the newest version every host (one manifest each) supports",
    )
    p.add_argument("manifests", metavar="MANIFEST", nargs="+")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_compat)

    p = sub.add_parser(
        "qemu-args",
        help="virtio-net-pci properties pinning QEMU's own vhost-net (tap,vhost=on) to VERSION",
    )
    p.add_argument("version", metavar="VERSION", help="registry name or value list")
    p.add_argument("--qemu", default="qemu-system-x86_64", help="QEMU binary to ask")
    p.add_argument("--json", action="store_true", help="print a JSON list of prop=value")
    p.set_defaults(func=_qemu_args)

    p = sub.add_parser(
        "install-udev",
        help="install the udev rule (and the kvhost-manifest.service it starts under systemd) "
        "that writes the manifest when vhost-net or tun appears",
    )
    p.add_argument("--rules-dir", default=str(DEFAULT_RULES_DIR))
    p.add_argument(
        "--unit-dir",
        default=str(DEFAULT_UNIT_DIR),
        help=f"where {MANIFEST_UNIT} goes (default {DEFAULT_UNIT_DIR})",
    )
    p.add_argument("--manifest", default=str(mf.DEFAULT_PATH), help="manifest path the rule writes")
    p.add_argument(
        "--command",
        help="kvhost command for the rule (default: this interpreter with -m kvhost.cli)",
    )
    p.add_argument(
        "--reload",
        action="store_true",
        help="run 'udevadm control --reload' (and 'systemctl daemon-reload' under systemd) "
        "afterwards",
    )
    add_nfd_options(p, for_rule=True)
    p.set_defaults(func=_install_udev)


def add_nfd_options(p: argparse.ArgumentParser, *, for_rule: bool = False) -> None:
    rule = "the rule also writes " if for_rule else "also write "
    p.add_argument(
        "--nfd",
        metavar="PATH",
        help=rule + "a node-feature-discovery feature file here (one label per supported "
        f"version; usually {nfd.DEFAULT_PATH}); removed when the host serves no version",
    )
    p.add_argument(
        "--nfd-prefix",
        default=nfd.DEFAULT_PREFIX,
        metavar="NS",
        help=f"label namespace of the NFD labels (default {nfd.DEFAULT_PREFIX})",
    )


# --- helpers --------------------------------------------------------------------------------


def _kmsg(level: int, text: str) -> None:
    # The kernel log reaches dmesg and the journal even from a udev RUN program.
    with contextlib.suppress(OSError), open("/dev/kmsg", "w") as f:
        f.write(f"<{level}>kvhost: {text}\n")


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


# --- subcommands ----------------------------------------------------------------------------


def manifest_command(args: argparse.Namespace) -> int:
    """``kvhost manifest`` (``output``, ``nfd``, ``nfd_prefix``, ``kmsg``, ``json``); also
    what ``install-host`` runs. Raises KvhostError."""
    out = None if args.output == "-" else Path(args.output)
    nfd_path = nfd.check_path(Path(args.nfd)) if args.nfd else None
    prefix = nfd.check_prefix(args.nfd_prefix)
    try:
        try:
            m = mf.generate(out)
        except mf.NoVersionServed as err:
            # A label is a promise to the scheduler; a manifest only informs local tools and
            # keeps its last good content (a transient probe failure must not blank it).
            if nfd_path is None:
                raise
            try:
                removed = nfd.withdraw(nfd_path)
            except mf.ManifestError as stuck:
                raise mf.ManifestError(
                    f"{err}; and {stuck}, so this node still advertises the versions in it"
                ) from stuck
            if removed:
                raise mf.NoVersionServed(
                    f"{err}; removed {nfd_path} so this node advertises no version"
                ) from err
            raise
    except KvhostError as err:
        if args.kmsg:
            _kmsg(4, f"manifest {args.output} not updated: {err}")
        raise
    if nfd_path is not None:
        try:
            nfd.write(nfd_path, m, prefix)
        except KvhostError as err:
            if args.kmsg:
                _kmsg(4, f"wrote manifest {args.output}, but NFD feature file {nfd_path} "
                      f"not updated: {err}")
            raise
    summary = (
        f"kernel {m['kernel_release']}: latest {m['latest']}, "
        f"{len(m['supported'])} versions supported"
    )
    wrote = f"{args.output}" + (f" and {nfd_path}" if nfd_path else "")
    if args.kmsg:
        _kmsg(6, f"wrote {wrote}: {summary}")
    if args.json or out is None:
        _print_json(m)
        if nfd_path is not None:  # stdout carries only the JSON
            print(f"wrote {nfd_path}: {summary}", file=sys.stderr)
    else:
        print(f"wrote {wrote}: {summary}")
    return 0


def _versions(args: argparse.Namespace) -> int:
    offer, host = mf.host_offer(args.manifest or None)
    ok = ver.supported(offer)
    newest = ok[-1].name if ok else None
    rows = []
    for v in ver.registry():
        lack = ver.missing(v, offer)
        rows.append(
            {
                "name": v.name,
                "spec": v.spec(),
                "first_kernel": v.first_kernel,
                "adds": v.adds,
                "features": v.feature_names(),
                "supported": not lack,
                "latest": v.name == newest,
                "missing": lack,
            }
        )
    if args.json:
        _print_json(
            {"host": host, "latest": newest, "problems": list(offer.problems), "versions": rows}
        )
        return 0
    print(f"interface versions ({host}; * = supported here, > = latest here)")
    for r in rows:
        mark = ">" if r["latest"] else "*" if r["supported"] else " "
        print(f" {mark} {r['name']:<26} since {r['first_kernel']:<7} {r['adds']}")
    for problem in offer.problems:
        print(f"this host serves no version: {problem}")
    return 0


def _check(args: argparse.Namespace) -> int:
    version = ver.parse(args.version)
    offer, host = mf.host_offer(args.manifest or None)
    lack = ver.missing(version, offer)
    if args.json:
        _print_json(
            {
                "host": host,
                "version": version.label,
                "spec": version.spec(),
                "supported": not lack,
                "missing": lack,
            }
        )
    elif lack:
        print(f"{host} cannot serve {version.label}: {'; '.join(lack)}")
    else:
        print(f"{host} can serve {version.label}")
    return 1 if lack else 0


def _compat(args: argparse.Namespace) -> int:
    result = mf.compat([mf.read(p) for p in args.manifests])
    if args.json:
        _print_json(result.to_json())
    elif result.version is None:
        print("no common interface version: " + "; ".join(result.reasons), file=sys.stderr)
    else:
        print(result.version.label)
        for reason in result.reasons:
            print(f"  note: {reason}")
    return 0 if result.version else 1


def _qemu_args(args: argparse.Namespace) -> int:
    version = ver.parse(args.version)
    props = qemu_args.device_properties(version, qemu_args.available_properties(args.qemu))
    if args.json:
        _print_json(props)
    else:
        print(",".join(props))
    return 0


#: the oneshot unit the udev rule pulls in under systemd (and install-host enables for boot)
MANIFEST_UNIT = "kvhost-manifest.service"
DEFAULT_UNIT_DIR = Path("/etc/systemd/system")
#: udev's test for "systemd is the init system" (sd_booted(3) checks the same directory)
SYSTEMD_RUNNING = "/run/systemd/system"


def _manifest_command(
    command: list[str] | tuple[str, ...],
    manifest: str,
    nfd_path: str | None,
    nfd_prefix: str,
    *,
    kmsg: bool,
    where: str,
) -> str:
    """``command manifest --output MANIFEST [--kmsg] [--nfd ...]`` as one line that udev's
    RUN and systemd's ExecStart both split on blanks. Raises UsageError for a word either
    would mangle, or a program that is not an absolute path."""
    words = [*command, "manifest", "--output", manifest]
    if kmsg:
        words.append("--kmsg")
    if nfd_path is not None:
        words += ["--nfd", nfd_path]
        if nfd_prefix != nfd.DEFAULT_PREFIX:
            words += ["--nfd-prefix", nfd.check_prefix(nfd_prefix)]
    for w in words:
        if not w or any(c.isspace() or c in "'\"\\%$" for c in w):
            raise UsageError(
                f"{where} cannot carry {w!r}: use a path without blanks, quotes, '%' or '$'"
            )
    if not command or not command[0].startswith("/"):
        raise UsageError(f"udev and systemd run programs by absolute path, got {command[0]!r}")
    return " ".join(words)


def render_rule(
    command: list[str] | tuple[str, ...],
    manifest: str,
    *,
    nfd_path: str | None = None,
    nfd_prefix: str = nfd.DEFAULT_PREFIX,
) -> str:
    """The udev rules file: when the vhost-net or tun misc device appears, pull in
    :data:`MANIFEST_UNIT` where systemd is the init system, else run ``command manifest
    --output MANIFEST --kmsg`` (plus ``--nfd PATH``, and ``--nfd-prefix NS`` when not the
    default, when ``nfd_path`` is given) from udev itself.

    Raises UsageError when a word would need quoting (udev's RUN splits on blanks) or the
    program is not an absolute path (udev runs RUN programs without a PATH search).
    """
    run = _manifest_command(
        command, manifest, nfd_path, nfd_prefix, kmsg=True, where="udev RUN"
    )
    match = 'SUBSYSTEM=="misc", KERNEL=="vhost-net|tun"'
    return (
        "# kvhost: write the vhost-net interface-version manifest when the vhost-net or tun\n"
        "# misc device appears. Installed by 'kvhost install-udev' or 'kvhost install-host';\n"
        "# see docs/operator.md. A failed probe leaves the previous manifest and says why.\n"
        "# With systemd as init the probe runs in kvhost-manifest.service: udev's RUN is for\n"
        "# very short tasks, inside systemd-udevd's sandbox. The tag stays on every event but\n"
        "# 'remove', so a 'change' does not make systemd see the device go.\n"
        f'ACTION!="remove", {match}, TEST=="{SYSTEMD_RUNNING}", TAG+="systemd", '
        f'ENV{{SYSTEMD_WANTS}}+="{MANIFEST_UNIT}"\n'
        "# Without systemd there is no unit to start and no sandbox around udevd: udev runs\n"
        "# the probe itself (a few ioctls and a throw-away tap) and logs to the kernel log.\n"
        f'ACTION=="add", {match}, TEST!="{SYSTEMD_RUNNING}", RUN+="{run}"\n'
    )


def render_manifest_unit(
    command: list[str] | tuple[str, ...],
    manifest: str,
    *,
    nfd_path: str | None = None,
    nfd_prefix: str = nfd.DEFAULT_PREFIX,
) -> str:
    """The oneshot ``kvhost-manifest.service`` running ``command manifest --output MANIFEST``
    (``--nfd`` as in :func:`render_rule`): started by udev when vhost-net or tun appears and
    at boot (/run, where the manifest lives, starts empty). Raises UsageError."""
    run = _manifest_command(
        command, manifest, nfd_path, nfd_prefix, kmsg=False, where="systemd's ExecStart"
    )
    return (
        "# kvhost-manifest.service: write this host's vhost-net interface-version manifest.\n"
        "# Installed by 'kvhost install-host' (or install-udev); see docs/operator.md.\n"
        "# Started at boot and by udev whenever /dev/vhost-net or /dev/net/tun appears\n"
        "# (90-kvhost.rules). A failed probe leaves the previous manifest and says why in the\n"
        "# journal (journalctl -u kvhost-manifest).\n"
        "\n"
        "[Unit]\n"
        "Description=kvhost: write the vhost-net interface-version manifest\n"
        "# the libvirt hook and schedulers read it; the hook probes by itself when it is missing\n"
        "Before=libvirtd.service virtqemud.service\n"
        "\n"
        "[Service]\n"
        "Type=oneshot\n"
        f"ExecStart={run}\n"
        "NoNewPrivileges=yes\n"
        "PrivateTmp=yes\n"
        "ProtectHome=read-only\n"
        "\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
    )


def _rule_args(args: argparse.Namespace) -> tuple[list[str], str, str | None]:
    # -I: no PYTHON* variables, user site or working directory on the path of a root program
    command = (
        shlex.split(args.command) if args.command else [sys.executable, "-I", "-m", "kvhost.cli"]
    )
    nfd_path = str(nfd.check_path(Path(args.nfd)).absolute()) if args.nfd else None
    return command, str(Path(args.manifest).absolute()), nfd_path


def rule_for(args: argparse.Namespace) -> str:
    """The udev rule text for ``install-udev`` / ``install-host`` arguments (``--command``,
    ``--manifest``, ``--nfd``, ``--nfd-prefix``). Raises UsageError."""
    command, manifest, nfd_path = _rule_args(args)
    return render_rule(command, manifest, nfd_path=nfd_path, nfd_prefix=args.nfd_prefix)


def manifest_unit_for(args: argparse.Namespace) -> str:
    """:func:`render_manifest_unit` for the same arguments as :func:`rule_for`."""
    command, manifest, nfd_path = _rule_args(args)
    return render_manifest_unit(command, manifest, nfd_path=nfd_path, nfd_prefix=args.nfd_prefix)


def install_file(target: Path, data: bytes, mode: int = 0o644) -> None:
    """Atomically install ``data`` at ``target``. Raises UsageError naming the file."""
    try:
        mf.write_atomic(target, data, mode=mode, action="install")
    except mf.ManifestError as err:
        raise UsageError(str(err)) from err


def _install_udev(args: argparse.Namespace) -> int:
    rule, unit = rule_for(args), manifest_unit_for(args)  # both rendered before writing
    for target, text in (
        (Path(args.rules_dir) / RULES_NAME, rule),
        (Path(args.unit_dir) / MANIFEST_UNIT, unit),
    ):
        install_file(target, text.encode())
        print(f"installed {target}")
    if args.reload:
        steps = [["udevadm", "control", "--reload"]]
        if Path(SYSTEMD_RUNNING).is_dir():
            steps.append(["systemctl", "daemon-reload"])
        for argv in steps:
            done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=60)
            if done.returncode:
                raise UsageError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    else:
        print("run 'udevadm control --reload' and, under systemd, 'systemctl daemon-reload' "
              "(or pass --reload) to activate them")
    return 0
