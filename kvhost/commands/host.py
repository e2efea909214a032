"""``kvhost install-host``: fit kvhost into a host's tooling with one command.

Installs, under ``--root`` (default ``/``)::

    etc/udev/rules.d/90-kvhost.rules               manifest (+ NFD file) on vhost-net/tun add:
    etc/systemd/system/kvhost-manifest.service     in this unit under systemd (also at boot),
                                                   from udev's RUN without systemd
    etc/systemd/system/kvhost-shim@.service        one kvhost-shim per VM ...
    etc/systemd/system/kvhost-shim@.socket         ... serving the socket systemd made (fd 3)
    etc/qemu/vhost-user/50-kvhost-net.json         QEMU's backend descriptor (for tools that
                                                   look vhost-user backends up by type;
                                                   libvirt starts no net backend from it)
    etc/sysusers.d/kvhost.conf                     the user the shim drops to (--user kvhost)
    etc/kvhost/shim/                               the per-VM EnvironmentFiles (VM.env)
    etc/libvirt/hooks/qemu.d/kvhost                libvirt's hook: the shim at the recorded
                                                   version (kvhost.libvirt_hook)

Program paths are rewritten to this installation: the rule and kvhost-manifest.service run
this interpreter with ``-m kvhost.cli`` (as ``install-udev``), the shim's unit and the
descriptor run the ``kvhost-shim`` entry point next to this interpreter (``--shim``
overrides). kvhost-manifest.service is enabled (``systemctl --root=ROOT enable``), so a
reboot, which empties /run, writes the manifest again even when no device event comes.
Without ``--root`` it writes the manifest at once when this host has /dev/vhost-net (and
says what happens instead when it has not), and without ``--no-reload`` it makes the
running host pick the files up: ``udevadm control --reload`` when udevd runs,
``systemd-sysusers`` when present, ``systemctl daemon-reload`` when systemd is the init
system. Every file is replaced atomically; running it again is safe.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from kvhost import manifest as mf
from kvhost import nfd
from kvhost.commands import versions as vcmd
from kvhost.errors import KvhostError, UsageError
from kvhost.vhost import DEFAULT_PATH as VHOST_NET

UNIT_NAME = "kvhost-shim@.service"
SOCKET_NAME = "kvhost-shim@.socket"
DESCRIPTOR_NAME = "50-kvhost-net.json"
#: where ``pip install`` as root puts the shim; the unit and descriptor in the repository
#: (systemd/, kvhost/data/) name it, ``install-host`` writes the real entry point instead
SHIPPED_SHIM = "/usr/local/bin/kvhost-shim"
SHIM_USER = "kvhost"
#: what ProtectHome=yes makes inaccessible (systemd.exec(5))
HOME_DIRS = ("/home", "/root", "/run/user")

RULES_DIR = Path("etc/udev/rules.d")
UNIT_DIR = Path("etc/systemd/system")
#: vhost-user.rst: /usr/share/qemu/vhost-user is the distribution's, /etc/qemu/vhost-user
#: the local administrator's (later directories override earlier ones by file name)
DESCRIPTOR_DIR = Path("etc/qemu/vhost-user")
SYSUSERS_FILE = Path("etc/sysusers.d/kvhost.conf")
ENV_DIR = Path("etc/kvhost/shim")
HOOK_FILE = Path("etc/libvirt/hooks/qemu.d/kvhost")

SYSUSERS = (
    "# kvhost-shim@.service starts kvhost-shim as root for its set-up, then it runs as this\n"
    "# user (--user); installed by 'kvhost install-host'.\n"
    f'u {SHIM_USER} - "kvhost-shim vhost-user backend" / /usr/sbin/nologin\n'
)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "install-host",
        help="install the udev rule, the kvhost-shim@ systemd units and QEMU's vhost-user "
        "descriptor, then reload udev and systemd",
        description=__doc__.split("\n\n", 1)[0] if __doc__ else None,
    )
    p.add_argument(
        "--root",
        metavar="DIR",
        help="install under DIR instead of / (staging an image); nothing is reloaded",
    )
    p.add_argument(
        "--no-reload", action="store_true", help="do not reload udev or systemd afterwards"
    )
    p.add_argument(
        "--shim",
        metavar="PATH",
        help="kvhost-shim program for the unit and the descriptor "
        "(default: the entry point next to this interpreter)",
    )
    p.add_argument("--manifest", default=str(mf.DEFAULT_PATH), help="manifest path the rule writes")
    p.add_argument(
        "--command",
        help="kvhost command for the udev rule (default: this interpreter with -m kvhost.cli)",
    )
    vcmd.add_nfd_options(p, for_rule=True)
    p.set_defaults(func=_install_host)


# --- rendering (pure) -------------------------------------------------------------------------


def _check_program(path: str, what: str) -> str:
    # systemd expands '%' and '$' in ExecStart and splits on blanks; JSON does not care, but
    # one path serves both
    if not path.startswith("/"):
        raise UsageError(f"{what} must be an absolute path, got {path!r}")
    if any(c.isspace() or c in "'\"\\%$;" for c in path):
        raise UsageError(f"{what} {path!r}: use a path without blanks, quotes, '%', '$' or ';'")
    return path


def _trust_problem(path: str) -> str | None:
    """Why a program or code path that root will run cannot be trusted, or None: it and
    every directory above it (the path as given, and where its links lead) must belong to
    root and be writable by no one else (a directory may be, when sticky, like /tmp)."""
    seen: set[str] = set()
    for candidate in (os.path.abspath(path), os.path.realpath(path)):
        parts = Path(candidate).parts
        for depth in range(len(parts), 0, -1):
            here = str(Path(*parts[:depth]))
            if here in seen:
                continue
            seen.add(here)
            try:
                st = os.lstat(here)
            except OSError as err:
                return f"{here}: {err.strerror}"
            if stat.S_ISLNK(st.st_mode):
                continue  # a link's own mode means nothing; its target is checked too
            if st.st_uid != 0:
                return f"{here} belongs to uid {st.st_uid}, not root"
            writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
            if writable and not (stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX):
                return f"{here} is writable by others ({stat.filemode(st.st_mode)})"
    return None


def check_trusted(path: str, what: str) -> None:
    """UsageError unless :func:`_trust_problem` finds nothing: whoever can change ``path``
    would run code as root through the unit or the udev rule."""
    problem = _trust_problem(path)
    if problem is not None:
        raise UsageError(
            f"{what} {path} runs as root, but {problem}: whoever can change it could run "
            "code as root; install kvhost where only root can write (e.g. pip install as "
            "root into /usr/local or /opt), or fix the owner and mode"
        )


def shipped_unit() -> str:
    """The unit as shipped in the package (ExecStart names :data:`SHIPPED_SHIM`)."""
    return resources.files("kvhost").joinpath(f"data/{UNIT_NAME}").read_text()


def shipped_socket() -> str:
    """The socket unit as shipped (it names no program: installed as it is)."""
    return resources.files("kvhost").joinpath(f"data/{SOCKET_NAME}").read_text()


def shipped_descriptor() -> str:
    return resources.files("kvhost").joinpath(f"data/{DESCRIPTOR_NAME}").read_text()


def _interpreter(program: str) -> str | None:
    # a pip entry point is a script whose '#!' line names the Python that runs it
    try:
        with open(program, "rb") as f:
            first = f.readline(4096)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    words = first[2:].decode(errors="replace").split()
    return words[0] if words else None


def _under_home(path: str) -> bool:
    real = os.path.realpath(path)
    return any(real == h or real.startswith(h + "/") for h in HOME_DIRS)


def _package_dirs() -> tuple[str, ...]:
    """Where the running kvhost and shim packages are (an editable install points there)."""
    dirs = [str(Path(__file__).resolve().parents[1])]
    spec = importlib.util.find_spec("shim")  # located, not imported: kvhost does not use it
    if spec is not None and spec.origin is not None:
        dirs.append(str(Path(spec.origin).resolve().parent))
    return tuple(dirs)


def render_unit(
    shim: str, interpreter: str | None = None, code_dirs: Sequence[str] | None = None
) -> str:
    """The ``kvhost-shim@.service`` text with ExecStart running ``shim``.

    ProtectHome=yes hides /home, /root and /run/user from the service; when ``shim`` or the
    Python it runs (``interpreter``, default: read from its '#!' line) lives there (a
    virtualenv in a home directory), or so does its code (``code_dirs``, default: where
    kvhost and shim are imported from -- a ``pip install -e`` of a clone in /root), the unit
    gets ProtectHome=read-only instead, so it can start at all. Raises UsageError for a
    path systemd cannot run.
    """
    text = shipped_unit()
    old = f"ExecStart={SHIPPED_SHIM} "
    if text.count(old) != 1 or text.count("\nProtectHome=yes\n") != 1:
        raise KvhostError(f"packaged {UNIT_NAME} lacks 'ExecStart={SHIPPED_SHIM}' or ProtectHome")
    text = text.replace(old, f"ExecStart={_check_program(shim, '--shim')} ")
    python = interpreter if interpreter is not None else _interpreter(shim)
    code = _package_dirs() if code_dirs is None else tuple(code_dirs)
    if any(_under_home(p) for p in (shim, python, *code) if p):
        text = text.replace(
            "\nProtectHome=yes\n",
            "\n# kvhost-shim (or its Python) is installed under a home directory on this host\n"
            "ProtectHome=read-only\n",
        )
    return text


def render_descriptor(shim: str) -> str:
    """QEMU's vhost-user backend descriptor naming ``shim``. Raises UsageError."""
    desc = json.loads(shipped_descriptor())
    desc["binary"] = _check_program(shim, "--shim")
    return json.dumps(desc, indent=4) + "\n"


def default_shim() -> str:
    """The ``kvhost-shim`` entry point of this interpreter's installation. Raises UsageError
    when there is none (kvhost was not installed with pip into this interpreter)."""
    path = Path(sysconfig.get_path("scripts")) / "kvhost-shim"
    if not os.access(path, os.X_OK):
        raise UsageError(
            f"no kvhost-shim entry point at {path}: install kvhost into this interpreter "
            "(pip install .) or name the program with --shim PATH"
        )
    return str(path)


def render_hook(python: str, code_dir: str, manifest: str | None = None) -> str:
    """The libvirt hook script: ``python -m kvhost.libvirt_hook`` with kvhost imported from
    ``code_dir`` (this installation's, whatever PYTHONPATH libvirt's clean environment
    lacks). ``manifest`` is passed on when it is not the default path. Raises UsageError."""
    # -S: most domains need nothing from kvhost; the hook adds site-packages when one does
    words = [_check_program(python, "the interpreter"), "-S", "-m", "kvhost.libvirt_hook"]
    if manifest is not None:
        words += ["--manifest", manifest]
    return (
        "#!/bin/sh\n"
        "# kvhost: start each VM's kvhost-shim at the interface version recorded in its domain\n"
        "# XML, refuse a migration or restore this host cannot serve. Installed by\n"
        "# 'kvhost install-host'; libvirtd reads hooks when it starts. See kvhost.libvirt_hook.\n"
        f"PYTHONPATH={shlex.quote(code_dir)} exec {shlex.join(words)} \"$@\"\n"
    )


def code_dir() -> str:
    """The directory this kvhost package is imported from."""
    return str(Path(__file__).resolve().parents[2])


@dataclass(frozen=True)
class Plan:
    """What ``install-host`` writes: (path relative to the root, bytes, mode) each."""

    files: tuple[tuple[Path, bytes, int], ...]
    dirs: tuple[Path, ...]


def plan(args: argparse.Namespace) -> Plan:
    """Render everything first, so a bad argument leaves the host untouched. Raises
    UsageError."""
    shim = args.shim or default_shim()
    _check_program(shim, "--shim")
    # each runs as root: the unit's set-up, the udev rule, libvirt's hook
    check_trusted(shim, "the shim program")
    python = _interpreter(shim)
    if python is not None:
        check_trusted(python, "the shim's interpreter")
    rule_program = shlex.split(args.command)[0] if args.command else sys.executable
    check_trusted(rule_program, "the udev rule's program")
    check_trusted(sys.executable, "the libvirt hook's interpreter")
    for code in _package_dirs():
        check_trusted(code, "kvhost's code")
    path = str(Path(args.manifest).absolute())
    manifest = None if path == str(mf.DEFAULT_PATH) else path
    return Plan(
        files=(
            (RULES_DIR / vcmd.RULES_NAME, vcmd.rule_for(args).encode(), 0o644),
            (UNIT_DIR / vcmd.MANIFEST_UNIT, vcmd.manifest_unit_for(args).encode(), 0o644),
            (UNIT_DIR / UNIT_NAME, render_unit(shim).encode(), 0o644),
            (UNIT_DIR / SOCKET_NAME, shipped_socket().encode(), 0o644),
            (DESCRIPTOR_DIR / DESCRIPTOR_NAME, render_descriptor(shim).encode(), 0o644),
            (SYSUSERS_FILE, SYSUSERS.encode(), 0o644),
            (HOOK_FILE, render_hook(sys.executable, code_dir(), manifest).encode(), 0o755),
        ),
        dirs=(ENV_DIR,),
    )


# --- doing --------------------------------------------------------------------------------


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=60)
    if done.returncode:
        raise KvhostError(
            f"files installed, but '{' '.join(argv)}' failed (exit {done.returncode}): "
            f"{done.stderr.strip() or done.stdout.strip()}"
        )


def reload_host() -> list[str]:
    """Make the running host read the new files; returns one line per step (done/skipped).
    Raises KvhostError when a reload command fails."""
    notes = []
    if shutil.which("udevadm") is None:
        notes.append("udev: udevadm not found; the rule is read when udevd starts")
    elif subprocess.run(
        ["udevadm", "control", "--ping", "--timeout=2"], capture_output=True, check=False
    ).returncode:
        notes.append("udev: udevd is not running; the rule is read when it starts")
    else:
        _run(["udevadm", "control", "--reload"])
        notes.append("udev: rules reloaded")
    if shutil.which("systemd-sysusers") is None:
        notes.append(f"sysusers: systemd-sysusers not found; create the user {SHIM_USER!r}")
    else:
        _run(["systemd-sysusers", f"/{SYSUSERS_FILE}"])
        notes.append(f"sysusers: user {SHIM_USER!r} present")
    if not Path("/run/systemd/system").is_dir():
        notes.append("systemd: not the init system here; nothing to reload")
    else:
        _run(["systemctl", "daemon-reload"])
        notes.append("systemd: daemon reloaded")
    return notes


def enable_manifest_unit(root: Path) -> str:
    """``systemctl --root=ROOT enable kvhost-manifest.service`` (works offline, and on a
    host whose init is not systemd); returns the line to print. Raises KvhostError."""
    if shutil.which("systemctl") is None:
        return (
            f"systemd: systemctl not found; {vcmd.MANIFEST_UNIT} not enabled (without "
            "systemd, udev's RUN writes the manifest when vhost-net or tun appears)"
        )
    _run(["systemctl", f"--root={root}", "--quiet", "enable", vcmd.MANIFEST_UNIT])
    return f"systemd: {vcmd.MANIFEST_UNIT} enabled (writes the manifest at every boot)"


def write_manifest(args: argparse.Namespace, device: str = VHOST_NET) -> int:
    """Write this host's manifest now, as ``kvhost manifest`` would (with ``--nfd``), so it
    exists before the first reboot or device event; returns the exit status to use."""
    if not os.path.exists(device):
        print(
            f"manifest: not written: this host has no {device} (modprobe vhost_net loads "
            f"it); when it appears, udev writes {args.manifest}"
            + (f" and {args.nfd}" if args.nfd else "")
            + f" ({vcmd.MANIFEST_UNIT} under systemd)"
        )
        return 0
    run = argparse.Namespace(
        output=args.manifest, nfd=args.nfd, nfd_prefix=args.nfd_prefix, kmsg=False, json=False
    )
    try:
        return vcmd.manifest_command(run)
    except KvhostError as err:
        print(f"manifest: not written: {err}", file=sys.stderr)
        print(f"the files above are installed; fix that, then run 'kvhost manifest' or "
              f"'systemctl start {vcmd.MANIFEST_UNIT}'", file=sys.stderr)
        return 1


def _install_host(args: argparse.Namespace) -> int:
    if args.root is None and os.geteuid() != 0:
        raise UsageError(
            "install-host writes under /etc (and the manifest under /run): run it as root, "
            "or stage the "
            "files with --root DIR"
        )
    root = Path(args.root or "/")
    todo = plan(args)
    for d in todo.dirs:
        try:
            (root / d).mkdir(mode=0o755, parents=True, exist_ok=True)
        except OSError as err:
            raise UsageError(f"cannot create {root / d}: {err.strerror}") from err
    for rel, data, mode in todo.files:
        vcmd.install_file(root / rel, data, mode)
        print(f"installed {root / rel}")
    print(enable_manifest_unit(root))
    # before the reloads: a failing reload (an error) must not also cost the manifest
    status = 0
    if args.root is None:
        status = write_manifest(args)
    else:
        print(f"manifest: not written (--root given): {vcmd.MANIFEST_UNIT} writes it when "
              "that system boots")
    if args.root is not None or args.no_reload:
        why = "--root given" if args.root is not None else "--no-reload"
        print(f"not reloading udev or systemd ({why})")
    else:
        for note in reload_host():
            print(note)
    print(f"libvirt: restart libvirtd (or virtqemud) so it reads {root / HOOK_FILE}")
    print(
        f"next, per VM: write {root / ENV_DIR}/VM.env (KVHOST_INTERFACE_VERSION=..., "
        "KVHOST_TAP=...), then 'systemctl enable --now kvhost-shim@VM' "
        "(a VM name with '-' or other specials: kvhost-shim@$(systemd-escape VM))"
    )
    if args.nfd is None:
        print(f"Kubernetes nodes: add --nfd {nfd.DEFAULT_PATH} for node-feature-discovery labels")
    return status
