"""``kvhost-shim`` as a child process of a test, benchmark or the demo.

What the shim did is read from its JSON events (``--log-format json``, :mod:`shim.eventlog`),
never from its human text: the version it serves (``listening``), every SET_FEATURES
(``features``), GET/SET_VRING_BASE (``vring_base``, with ``-v``), the dirty log mapping
(``dirty_log``) and the RARP announcements (``rarp``); see :meth:`ShimProcess.events`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness.errors import ScenarioError
from harness.procfs import ProcUsage
from kvhost.errors import UsageError


class ShimStartError(ScenarioError):
    """``kvhost-shim`` exited instead of listening; ``exit_status`` and its ``log``."""

    def __init__(self, message: str, *, exit_status: int | None, log: str) -> None:
        self.exit_status = exit_status
        self.log = log
        super().__init__(f"{message}\nshim log:\n{log.rstrip()}")



#: how :class:`ShimProcess` runs kvhost-shim: the installed package, with this interpreter
SHIM_PROGRAM = (sys.executable, "-m", "shim.cli")


class ShimProcess:
    """``kvhost-shim`` as a child process, logging JSON events (``--log-format json``, with
    ``-v`` unless ``verbose`` is False) to ``log_path``.

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
        self.argv = [*program, "--socket-path", socket_path, "--log-format", "json"]
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

    def events(self, name: str | None = None, **fields: object) -> list[dict[str, Any]]:
        """The shim's JSON events so far, in order (:mod:`shim.eventlog`): all of them, or
        those named ``name`` whose ``fields`` have the given values. Lines that are not JSON
        (a traceback, a wrapper's own output) are not events and are skipped."""
        out: list[dict[str, Any]] = []
        for line in self.log_text().splitlines():
            if not line.startswith("{"):
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short: the shim is still writing it, or was killed
            if not isinstance(record, dict):
                continue
            if name is not None and record.get("event") != name:
                continue
            if all(record.get(k) == v for k, v in fields.items()):
                out.append(record)
        return out

    def acked_features(self) -> list[int]:
        """Every SET_FEATURES value the shim logged, repeats of the one before left out (the
        first is always logged; with ``-v`` all of them)."""
        seen: list[int] = []
        for e in self.events("features"):
            if not seen or seen[-1] != e["features"]:
                seen.append(int(e["features"]))
        return seen

    def ring_bases(self, request: str) -> list[tuple[int, int]]:
        """(ring, base) of every ``GET_VRING_BASE`` or ``SET_VRING_BASE`` logged (``-v``)."""
        return [(int(e["vring"]), int(e["base"]))
                for e in self.events("vring_base", request=request)]

    def served_version(self) -> str | None:
        """The interface version the shim said it serves once it listened; None before."""
        listening = self.events("listening")
        return str(listening[0]["version"]) if listening else None

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
