"""libvirt's qemu hook for kvhost: start each VM's shim at its recorded version.

libvirt runs ``/etc/libvirt/hooks/qemu.d/kvhost DOMAIN OP SUBOP EXTRA`` with the domain XML
on stdin (``kvhost install-host`` writes that file; it execs this module). What each call
does::

    prepare begin    a recorded version must be servable here, for every kvhost interface
                     (native vhost-net ones too, which have no shim: QEMU would otherwise
                     start with a device this kernel cannot back); then for every
                     vhost-user interface whose socket is in /run/kvhost/: start
                     kvhost-shim at the domain's recorded version (this host's latest, with
                     a warning, when none is recorded) and return once the socket listens
    migrate begin    the recorded version must be servable here, for every kvhost interface
    restore begin    (vhost-user and native vhost-net alike); else exit 1 and nothing starts
    started begin    QEMU runs (and has connected): move each shim and its vhost workers
                     into QEMU's cgroups (``--cgroup vm``, the default; docs/cgroups.md)
    stopped end      QEMU is gone: stop the domain's shims, before libvirt removes the
    release end      cgroups they were moved into; remove pid file, socket and environment file
    anything else    exit 0 at once

A refusal is one line on stderr and exit 1: libvirt aborts the operation and virsh shows
the line. The hook never calls back into libvirt (libvirt's hooks documentation: that
deadlocks the daemon).

Two ways to run the shim, chosen by ``--init`` (default ``auto``: systemd when it is PID 1):

* **systemd**: write ``/run/kvhost/shim/NAME.env`` (``KVHOST_INTERFACE_VERSION=...``, read
  by ``kvhost-shim@.service`` after the operator's ``/etc/kvhost/shim/NAME.env``, so the
  domain's version wins) and ``systemctl start kvhost-shim@ESCAPED.service``, ESCAPED being
  ``systemd-escape NAME``; the service requires ``kvhost-shim@ESCAPED.socket``, which
  listens on ``/run/kvhost/NAME.sock``, so NAME is the socket's file name without
  ``.sock``; ``systemctl start`` returns once the shim reports ready (``Type=notify``) and
  fails when it cannot start. ``release end`` stops the service and the socket.
* **direct** (no systemd, e.g. the test VM): kvhost-shim in its own session, detached from
  libvirt's pipes, ``/run/kvhost/shim/NAME.pid`` and ``NAME.log`` (JSON lines) next to it;
  ``--tap`` comes from ``KVHOST_TAP`` in ``/etc/kvhost/shim/NAME.env`` when that exists,
  else the shim makes its own tap. A shim that exits before it listens (a missing tap)
  fails the start at once with its last log line (a JSON record's message) and leaves no
  file.

Most domains have no kvhost interface, and libvirt runs the hook for every one of them on
every start and stop; so this module imports only ``os`` and ``sys`` until a byte search
of the XML says kvhost has something to do. ``install-host`` runs it with ``python -S``
(site-packages, and the editable-install finders in them, cost more than everything else on
that path) and the slow path adds site-packages itself.
"""

from __future__ import annotations

import os
import sys

#: typing costs milliseconds to import; mypy treats this name as True all the same
TYPE_CHECKING = False
if TYPE_CHECKING:  # the fast path imports nothing from kvhost
    from collections.abc import Callable
    from pathlib import Path
    from typing import NoReturn

    from kvhost import libvirt as lv
    from kvhost import versions as ver

HANDLED = {
    ("prepare", "begin"),
    ("migrate", "begin"),
    ("restore", "begin"),
    ("started", "begin"),
    ("stopped", "end"),
    ("release", "end"),
}
KVHOST_NS = b"https://kvhost.io/xmlns/domain/1"  # kvhost.libvirt.KVHOST_NS, not imported

#: option -> (default, help); hand-parsed, argparse is not worth its import on the fast path
OPTIONS: dict[str, tuple[str, str]] = {
    "--socket-dir": ("/run/kvhost", "kvhost-shim sockets live here"),
    "--state-dir": ("/run/kvhost/shim", "pid, log and environment files"),
    "--config-dir": ("/etc/kvhost/shim", "the operator's NAME.env files (KVHOST_TAP)"),
    "--manifest": ("", "this host's manifest (default /run/kvhost/vhost-net.json, else probe)"),
    "--shim": ("", "kvhost-shim command (default: this Python with -m shim.cli)"),
    "--init": ("auto", "systemd, direct or auto"),
    "--timeout": ("60", "seconds to wait for a shim's socket to listen"),
    "--cgroup": ("vm", "vm: move each shim and its vhost workers into QEMU's cgroups; "
                 "shim: leave them in the shim's own"),
    "--qemu-pid-dir": ("/run/libvirt/qemu", "where libvirt writes DOMAIN.pid (QEMU's pid)"),
}
USAGE = (
    "usage: python -m kvhost.libvirt_hook [--option VALUE ...] DOMAIN OP SUBOP EXTRA "
    f"(options: {', '.join(OPTIONS)})"
)


class HookError(Exception):
    """The operation must not go ahead; the message is libvirt's error text."""


def _parse(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    opts = {k: v for k, (v, _) in OPTIONS.items()}
    pos: list[str] = []
    it = iter(argv)
    for word in it:
        if word in OPTIONS:
            value = next(it, None)
            if value is None:
                raise HookError(f"{word} needs a value; {USAGE}")
            opts[word] = value
        elif word.startswith("--") and not pos:
            raise HookError(f"unknown option {word}; {USAGE}")
        else:
            pos.append(word)
    if len(pos) < 3:
        raise HookError(USAGE)
    return opts, pos


def _relevant(op: str, data: bytes, opts: dict[str, str]) -> bool:
    """A cheap over-approximation of "kvhost has something to do for this domain"."""
    if op in ("migrate", "restore"):
        return KVHOST_NS in data
    if op == "prepare" and KVHOST_NS in data:
        return True  # a stamped native-only domain has no socket path, but is checked
    return (opts["--socket-dir"].rstrip("/") + "/").encode() in data


def main(argv: list[str] | None = None) -> int:
    try:
        opts, pos = _parse(sys.argv[1:] if argv is None else argv)
    except HookError as err:
        print(f"kvhost hook: {err}", file=sys.stderr)
        return 2
    domain, op, subop = pos[:3]
    # libvirt writes the whole XML to our stdin; read it even when ignoring it, so libvirt
    # never meets a closed pipe
    data = sys.stdin.buffer.read()
    if (op, subop) not in HANDLED or not _relevant(op, data, opts):
        return 0
    if sys.flags.no_site:
        # the hook file runs 'python -S' (no site-packages: faster for the many domains
        # that end above); kvhost's dependencies live there
        import site

        site.main()
    try:
        _Hook(domain, opts).run(op, data)
    except HookError as err:
        print(f"kvhost: {err}", file=sys.stderr)
        return 1
    return 0


def _fail(message: str) -> NoReturn:
    raise HookError(message)


class _Hook:
    """The slow path: a domain with kvhost interfaces."""

    def __init__(self, domain: str, opts: dict[str, str]) -> None:
        from pathlib import Path

        self.domain = domain
        self.opts = opts
        self.socket_dir = Path(opts["--socket-dir"])
        self.state_dir = Path(opts["--state-dir"])
        self.config_dir = Path(opts["--config-dir"])
        init = opts["--init"]
        if init == "auto":
            init = "systemd" if Path("/run/systemd/system").is_dir() else "direct"
        if init not in ("systemd", "direct"):
            _fail(f"--init must be systemd, direct or auto, not {init!r}")
        self.init = init
        if opts["--cgroup"] not in ("vm", "shim"):
            _fail(f"--cgroup must be vm or shim, not {opts['--cgroup']!r}")

    def run(self, op: str, data: bytes) -> None:
        from kvhost import libvirt as lv
        from kvhost.errors import KvhostError

        try:
            doc = lv.parse(data, f"the XML libvirt passed for {self.domain}")
            nics = list(lv.iter_kvhost_interfaces(doc.root, self.socket_dir))
            shims = [n for n in nics if n.kvhost_socket(self.socket_dir)]
            if op in ("stopped", "release"):
                # at 'stopped end' already: libvirt removes QEMU's cgroups between the two
                # calls, and cannot while a shim moved into them still runs
                for nic in shims:
                    self.stop(self._name(nic))
                return
            if op == "started":
                if self.opts["--cgroup"] == "vm":
                    for nic in shims:
                        self.join_vm(self._name(nic))
                return
            if not nics:
                return
            version = lv.recorded_version(doc.root, f"domain {self.domain}")
            if op in ("migrate", "restore"):
                if version is not None:
                    self.check(version, op)
                return
            if version is not None:
                # before 'not shims' returns: a native <driver name='vhost'> interface is
                # pinned to the version too, and this kernel's vhost-net must back it
                self.check(version, "start")
            if not shims:
                return
            if version is None:
                version = self.unstamped()
            for nic in shims:
                self.start(self._name(nic), nic, version)
        except KvhostError as err:
            _fail(f"VM {self.domain}: {err}")

    # --- versions ---------------------------------------------------------------------------

    def host(self) -> lv.Host:
        from pathlib import Path

        from kvhost import libvirt as lv

        manifest = self.opts["--manifest"]
        return lv.this_host(Path(manifest) if manifest else None)

    def check(self, version: ver.InterfaceVersion, action: str) -> None:
        from kvhost import libvirt as lv

        why = lv.refusal(version, self.host())
        if why:
            verb = {"migrate": "migrate here", "restore": "be restored here"}.get(action, action)
            _fail(f"VM {self.domain} cannot {verb}: {why}")

    def unstamped(self) -> ver.InterfaceVersion:
        import syslog

        from kvhost import versions as ver
        from kvhost.errors import VersionError

        host = self.host()
        try:
            version = ver.latest(host.offer)
        except VersionError as err:
            _fail(f"VM {self.domain} cannot start: {host.label}: {err}")
        line = (
            f"VM {self.domain} records no interface version; serving {host.label}'s latest, "
            f"{version.label}, which is not migration-safe: record one with "
            f"'virsh dumpxml --inactive {self.domain} | kvhost libvirt stamp - -o "
            f"{self.domain}.xml' and 'virsh define {self.domain}.xml'"
        )
        print(f"kvhost: {line}", file=sys.stderr)
        syslog.openlog("kvhost-hook", 0, syslog.LOG_DAEMON)
        syslog.syslog(syslog.LOG_WARNING, line)
        return version

    # --- shims ------------------------------------------------------------------------------

    def _name(self, nic: lv.Interface) -> str:
        from pathlib import Path

        assert nic.socket is not None
        return Path(nic.socket).name.removesuffix(".sock")

    def _files(self, name: str) -> tuple[Path, Path, Path]:
        return (
            self.state_dir / f"{name}.pid",
            self.state_dir / f"{name}.log",
            self.state_dir / f"{name}.env",
        )

    def start(self, name: str, nic: lv.Interface, version: ver.InterfaceVersion) -> None:
        assert nic.socket is not None
        self.stop(name)  # a shim left by a crashed libvirtd would hold the socket
        try:
            self.state_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        except OSError as err:
            _fail(f"cannot create {self.state_dir}: {err.strerror}")
        if self.init == "systemd":
            self._start_unit(name, nic.socket, version)
        else:
            self._start_direct(name, nic.socket, version)

    def _start_unit(self, name: str, socket: str, version: ver.InterfaceVersion) -> None:
        from kvhost.commands.versions import install_file

        env = self._files(name)[2]
        install_file(env, f"KVHOST_INTERFACE_VERSION={version.label}\n".encode())
        # the service requires its socket unit, so systemd listens first; and it is
        # Type=notify, so this returns once the shim is set up, or fails naming the unit
        unit = f"{self._unit(name)}.service"
        self._systemctl("start", unit)
        self._wait_listening(socket, unit, lambda: self._unit_failed(unit))

    def _start_direct(self, name: str, socket: str, version: ver.InterfaceVersion) -> None:
        import shlex
        import subprocess

        pid_file, log_file, _ = self._files(name)
        cmd = shlex.split(self.opts["--shim"]) or [sys.executable, "-m", "shim.cli"]
        cmd += ["--socket-path", socket, "--interface-version", version.label,
                "--log-format", "json"]
        tap = self._config(name).get("KVHOST_TAP")
        if tap:
            cmd += ["--tap", tap]
        try:
            with open(log_file, "wb") as log:
                proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,  # out of libvirt's process group and session
                    close_fds=True,  # and off libvirt's pipes: it waits for them to close
                )
        except OSError as err:
            _fail(f"cannot run {cmd[0]}: {err.strerror}")
        pid_file.write_text(f"{proc.pid}\n")

        def died() -> str | None:
            if proc.poll() is None:
                return None
            pid_file.unlink(missing_ok=True)
            tail = log_file.read_text(errors="replace").strip().splitlines()[-1:]
            # its reason goes into the refusal libvirt shows and logs: a shim that never
            # served leaves no file (a served one's log stays, for after the VM)
            log_file.unlink(missing_ok=True)
            return f"kvhost-shim exited {proc.returncode}: {_message(tail[0] if tail else '')}"

        self._wait_listening(socket, f"kvhost-shim (log {log_file})", died, proc.pid)

    def _wait_listening(
        self, socket: str, what: str, failed: Callable[[], str | None], pid: int | None = None
    ) -> None:
        import time

        deadline = time.monotonic() + float(self.opts["--timeout"])
        while not _listening(socket, pid):
            why = failed()
            if why:
                _fail(f"VM {self.domain}: {why}")
            if time.monotonic() > deadline:
                _fail(f"VM {self.domain}: {what} did not listen on {socket} within "
                      f"{self.opts['--timeout']} s")
            time.sleep(0.05)

    def stop(self, name: str) -> None:
        """Stop NAME's shim, however it was started, and remove its files; idempotent."""
        import contextlib
        import signal
        import time

        pid_file, _, env = self._files(name)
        if self.init == "systemd" and env.exists():
            # the socket too: a listening socket unit would start the shim again on a connect
            unit = self._unit(name)
            self._systemctl("stop", f"{unit}.service", f"{unit}.socket")
        pid = _read_pid(pid_file)
        socket = str(self.socket_dir / f"{name}.sock")
        if pid is not None and _is_shim(pid, socket):
            try:
                os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + 10
                while _alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.05)
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for path in (pid_file, env):
            path.unlink(missing_ok=True)
        # a shim that was killed (or the kernel that killed QEMU's peer) leaves its socket
        if not _listening(socket):
            with contextlib.suppress(OSError):
                os.unlink(socket)

    # --- cgroups ----------------------------------------------------------------------------

    def join_vm(self, name: str) -> None:
        """Move NAME's shim and its vhost workers into QEMU's cgroups, so the datapath's CPU
        is charged to the VM as with QEMU's own vhost-net (docs/cgroups.md)."""
        import syslog
        from pathlib import Path

        from kvhost import cgroup

        shim = self._shim_pid(name)
        qemu_file = Path(self.opts["--qemu-pid-dir"]) / f"{self.domain}.pid"
        qemu = _read_pid(qemu_file)
        if qemu is None:
            _fail(f"VM {self.domain}: cannot read QEMU's pid from {qemu_file}; give libvirt's "
                  "pid directory with --qemu-pid-dir")
        try:
            moved = cgroup.join(shim, qemu)
        except cgroup.CgroupError as err:
            _fail(f"VM {self.domain}: the datapath of {name} cannot join the VM's cgroups: "
                  f"{err} (to run it in the shim's own cgroup instead, give the hook "
                  "--cgroup shim)")
        syslog.openlog("kvhost-hook", 0, syslog.LOG_DAEMON)
        syslog.syslog(syslog.LOG_INFO, f"VM {self.domain}: {name}: {moved.describe()}")

    def _shim_pid(self, name: str) -> int:
        if self.init == "systemd":
            import subprocess

            unit = f"{self._unit(name)}.service"
            done = subprocess.run(["systemctl", "show", "--property", "MainPID", "--value",
                                   unit], capture_output=True, text=True, check=False,
                                  timeout=30)  # fmt: skip
            pid = int(done.stdout.strip()) if done.stdout.strip().isdigit() else 0
        else:
            socket = str(self.socket_dir / f"{name}.sock")
            pid = _read_pid(self._files(name)[0]) or 0
            if pid and not _is_shim(pid, socket):
                pid = 0
        if not pid:
            _fail(f"VM {self.domain}: the shim of {name} is not running; see "
                  f"{self._files(name)[1] if self.init == 'direct' else 'journalctl'}")
        return pid

    # --- helpers ----------------------------------------------------------------------------

    def _config(self, name: str) -> dict[str, str]:
        out: dict[str, str] = {}
        try:
            text = (self.config_dir / f"{name}.env").read_text()
        except OSError:
            return out
        for line in text.splitlines():
            key, sep, value = line.strip().partition("=")
            if sep and not key.startswith("#"):
                out[key.strip()] = value.strip()
        return out

    @staticmethod
    def _unit(name: str) -> str:
        """``kvhost-shim@NAME`` with NAME escaped as systemd-escape does (the units' %I
        gives NAME back: socket /run/kvhost/NAME.sock, env files NAME.env)."""
        import subprocess

        done = subprocess.run(["systemd-escape", "--", name], capture_output=True, text=True,
                              check=False, timeout=10)
        if done.returncode:
            _fail(f"systemd-escape {name!r} failed: {done.stderr.strip()}")
        return f"kvhost-shim@{done.stdout.strip()}"

    def _systemctl(self, verb: str, *units: str) -> None:
        import subprocess

        done = subprocess.run(["systemctl", verb, *units], capture_output=True, text=True,
                              check=False, timeout=90)
        if done.returncode:
            _fail(f"VM {self.domain}: 'systemctl {verb} {' '.join(units)}' failed "
                  f"(exit {done.returncode}): {done.stderr.strip() or done.stdout.strip()}; "
                  f"see 'journalctl -u {units[0]}'")

    @staticmethod
    def _unit_failed(unit: str) -> str | None:
        import subprocess

        done = subprocess.run(["systemctl", "is-failed", "--quiet", unit], check=False,
                              timeout=30)
        return f"{unit} failed; see 'journalctl -u {unit}'" if done.returncode == 0 else None


def _message(line: str) -> str:
    """The text of a shim log line: a ``--log-format json`` record's message (virsh shows
    the hook's line to a person), any other line as it is."""
    import json

    if not line:
        return "no output"
    try:
        record = json.loads(line)
    except ValueError:
        return line
    message = record.get("message") if isinstance(record, dict) else None
    return message if isinstance(message, str) and message else line


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _is_shim(pid: int, socket: str) -> bool:
    # the pid file may be stale and the number reused: signal only the shim of this socket
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            words = f.read().split(b"\0")
    except OSError:
        return False
    return b"--socket-path" in words and socket.encode() in words


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


#: __SO_ACCEPTCON in /proc/net/unix's Flags column: the socket is listening
_ACCEPTCON = 0x10000


def _listening(path: str, pid: int | None = None) -> bool:
    """True when a unix socket bound to ``path`` listens (read from /proc/net/unix, so
    nothing connects to the shim and it logs no stray session); with ``pid``, only a socket
    that process holds. /proc/net/unix is per network namespace, not per mount namespace:
    another libvirtd in a mount namespace of its own (a second instance on one host, a
    container) may have a shim listening on the same path string, and QEMU here would
    then connect before our shim has bound its socket."""
    try:
        with open("/proc/net/unix", "rb") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return False
    held: set[bytes] | None = None
    if pid is not None:
        held = set()
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            return False  # gone (or going): not listening
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue  # closed meanwhile
            if target.startswith("socket:["):
                held.add(target[8:-1].encode())
    want = path.encode()
    for line in lines:
        fields = line.split(None, 7)
        if (len(fields) == 8 and fields[7] == want and int(fields[3], 16) & _ACCEPTCON
                and (held is None or fields[6] in held)):
            return True
    return False


if __name__ == "__main__":
    sys.exit(main())
