"""``kvhost-shim`` as a child process of a test, benchmark or the demo.

What the shim did is read from its own log (``-v``): the SET_FEATURES values, every
GET/SET_VRING_BASE, the dirty log mapping and the RARP announcements (see
:meth:`ShimProcess.events`).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.errors import ScenarioError
from harness.procfs import ProcUsage
from kvhost.errors import UsageError


class ShimStartError(ScenarioError):
    """``kvhost-shim`` exited instead of listening; ``exit_status`` and its ``log``."""

    def __init__(self, message: str, *, exit_status: int | None, log: str) -> None:
        self.exit_status = exit_status
        self.log = log
        super().__init__(f"{message}\nshim log:\n{log.rstrip()}")



@dataclass(frozen=True, slots=True)
class ShimEvent:
    """One thing the shim logged: ``kind`` is SET_FEATURES (value), GET_VRING_BASE /
    SET_VRING_BASE (ring, value), LOG_MAPPED (value = bytes) or RARP (text = MAC)."""

    kind: str
    value: int = 0
    ring: int = -1
    text: str = ""


_FEATURES = re.compile(r"(?:SET_FEATURES|features acked under interface version \S+:) "
                       r"0x([0-9a-f]+)")
_VRING_BASE = re.compile(r"((?:GET|SET)_VRING_BASE) vring (\d+) base (\d+)")
_LOG_MAPPED = re.compile(r"dirty log mapped \((\d+) bytes\)")
_RARP = re.compile(r"RARP announced for (\S+)")
_LISTENING = re.compile(r"listening on \S+, interface version (\S+)")
#: how :class:`ShimProcess` runs kvhost-shim: the installed package, with this interpreter
SHIM_PROGRAM = (sys.executable, "-m", "shim.cli")


class ShimProcess:
    """``kvhost-shim`` as a child process, logging (``-v``) to ``log_path``.

    :meth:`start` returns once the socket listens and the shim logged so; ShimStartError
    (exit status and log) if the shim exits first. :meth:`stop` sends SIGTERM and returns
    the exit status.

    ``program`` is the command before the shim's options (default :data:`SHIM_PROGRAM`,
    ``python -m shim.cli``); a diagnostic wrapper around the same program (the benchmark's
    traced shim) takes its place there and gets the same options.
    """

    def __init__(self, socket_path: str, log_path: Path, *, version: str | None = None,
                 tap: str | None = None, verbose: bool = True, name: str = "shim",
                 program: Sequence[str] = SHIM_PROGRAM) -> None:
        self.socket_path = socket_path
        self.log_path = log_path
        self.version = version
        self.tap = tap
        self.name = name
        self.argv = [*program, "--socket-path", socket_path]
        if version is not None:
            self.argv += ["--interface-version", version]
        if tap is not None:
            self.argv += ["--tap", tap]
        if verbose:
            self.argv.append("-v")
        self._proc: subprocess.Popen[bytes] | None = None
        self.exit_status: int | None = None

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise UsageError(f"{self.name}: not started")
        return self._proc.pid

    def start(self, timeout: float = 120.0) -> ShimProcess:
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=log, close_fds=True)
        deadline = time.monotonic() + timeout
        while True:
            status = self._proc.poll()
            if status is not None:
                self.exit_status = status
                raise ShimStartError(f"{self.name}: kvhost-shim exited with status {status} "
                                     f"before listening ({' '.join(self.argv[1:])})",
                                     exit_status=status, log=self.log_text())
            # ready = the socket exists and the shim said so (its log line follows the bind)
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.stat(self.socket_path).st_mode) and self.served_version():
                    return self
            if time.monotonic() > deadline:
                self.kill()
                raise ShimStartError(f"{self.name}: not listening after {timeout} s",
                                     exit_status=None, log=self.log_text())
            time.sleep(0.02)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def usage(self) -> ProcUsage:
        return ProcUsage.of(self.pid)

    def events(self) -> list[ShimEvent]:
        """What the shim logged, in order (see :class:`ShimEvent`)."""
        out: list[ShimEvent] = []
        for line in self.log_text().splitlines():
            if m := _VRING_BASE.search(line):
                out.append(ShimEvent(m.group(1), int(m.group(3)), int(m.group(2))))
            elif m := _FEATURES.search(line):
                out.append(ShimEvent("SET_FEATURES", int(m.group(1), 16)))
            elif m := _LOG_MAPPED.search(line):
                out.append(ShimEvent("LOG_MAPPED", int(m.group(1))))
            elif m := _RARP.search(line):
                out.append(ShimEvent("RARP", text=m.group(1)))
        return out

    def acked_features(self) -> list[int]:
        """Every SET_FEATURES value the shim logged (the first one at least is always
        logged; with ``-v`` all of them)."""
        seen: list[int] = []
        for e in self.events():
            if e.kind == "SET_FEATURES" and (not seen or seen[-1] != e.value):
                seen.append(e.value)
        return seen

    def ring_bases(self, kind: str) -> list[tuple[int, int]]:
        """(ring, base) of every ``GET_VRING_BASE`` or ``SET_VRING_BASE`` logged."""
        return [(e.ring, e.value) for e in self.events() if e.kind == kind]

    def served_version(self) -> str | None:
        m = _LISTENING.search(self.log_text())
        return m.group(1) if m else None

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, wait (SIGKILL after ``timeout``); the exit status."""
        if self._proc is None:
            return 0
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self.exit_status = self._proc.returncode
        return self.exit_status

    def wait_quiet(self, interval: float = 0.5, timeout: float = 60.0) -> ProcUsage:
        """Wait until the shim sleeps (no context switch for ``interval`` s): QEMU sends the
        tail of a ring start without waiting for replies, so the shim may still be working
        on it when DRIVER_OK returns. Returns the usage at that point."""
        deadline = time.monotonic() + timeout
        last = self.usage()
        while True:
            time.sleep(interval)
            now = self.usage()
            if (now - last).switches == 0 or time.monotonic() > deadline:
                return now
            last = now

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        if self._proc is not None:
            self.exit_status = self._proc.returncode


def start_shim_expecting_failure(version: str, workdir: Path,
                                 timeout: float = 120.0) -> tuple[int, str]:
    """Run ``kvhost-shim --interface-version version`` and return (exit status, log) when it
    exits; ScenarioError if it starts listening instead."""
    shim = ShimProcess(str(workdir / "refused.sock"), workdir / "refused.log", version=version,
                       tap="kvnone", name="refused shim")
    try:
        shim.start(timeout)
    except ShimStartError as err:
        if err.exit_status is None:
            raise
        return err.exit_status, err.log
    shim.stop()
    raise ScenarioError(f"kvhost-shim accepted interface version {version} on this host")



def last_per_ring(bases: list[tuple[int, int]]) -> dict[int, int]:
    """The last base logged for each ring."""
    return {ring: base for ring, base in bases}


def first_per_ring(bases: list[tuple[int, int]]) -> dict[int, int]:
    """The first base logged for each ring."""
    out: dict[int, int] = {}
    for ring, base in bases:
        out.setdefault(ring, base)
    return out
