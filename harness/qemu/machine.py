"""Build, launch and tear down a real QEMU whose virtio-net device a test drives over qtest.

No guest OS runs: the BIOS is 64 KiB of ``HLT`` (0xF4), so the CPU halts at its reset vector
with interrupts off and never touches memory, and the test plays the guest driver through the
qtest socket (:mod:`harness.qemu.virtio_pci`). What QEMU needs for that, measured with Debian's
QEMU 7.2 (reference ``vhost-user-and-qemu.md`` §4):

* ``-accel tcg`` (Debian ships no qtest accelerator module; qtest still works over a socket);
* guest RAM as a *shared memfd* (``memory-backend-memfd,share=on`` bound with ``-numa``):
  without shared memory vhost cannot map guest RAM and QEMU falls back to userspace virtio;
* ``virtio-net-pci,disable-legacy=on,addr=0x3,romfile=``; the driver never enables MSI-X,
  because QEMU 7.2 under TCG segfaults in ``vhost_net_start`` with MSI-X vectors unmasked.

Both control sockets are listened on *by us* and QEMU connects as a client at start-up, so a
QEMU that dies early is noticed while we wait for it to connect, and its stderr is reported.

Backends: :class:`TapBackend` (QEMU's own ``-netdev tap``, ``vhost=on`` for native kernel
vhost-net) or :class:`VhostUserBackend` (``-chardev socket`` + ``-netdev vhost-user``; the
backend must already listen, QEMU connects synchronously at start).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from harness.qemu.errors import QemuError, QemuExited
from harness.qemu.qmp import QmpClient
from harness.qemu.qtest import QtestClient
from kvhost.errors import UsageError

QEMU_BINARY = "/usr/bin/qemu-system-x86_64"
BIOS_SIZE = 64 * 1024
HLT = b"\xf4"
NETDEV_ID = "n0"
DEVICE_ID = "net0"
#: PCI slot of the virtio-net device on bus 0 (``addr=0x3``).
DEVICE_SLOT = 3


def _check_option(what: str, text: str) -> None:
    if not text or "," in text or ("=" in text and what.endswith("name")):
        raise UsageError(
            f"{what} {text!r} cannot be put on a QEMU command line: it is empty or contains "
            "',' (or '=' in a name); choose another"
        )


@dataclass(frozen=True, slots=True)
class TapBackend:
    """QEMU opens tap ``ifname`` itself (``script=no``); ``vhost=True`` = kernel vhost-net."""

    ifname: str
    vhost: bool = True

    def args(self) -> list[str]:
        _check_option("tap interface name", self.ifname)
        if len(self.ifname) > 15:
            raise UsageError(f"tap name {self.ifname!r} is longer than 15 characters (IFNAMSIZ)")
        vhost = "on" if self.vhost else "off"
        return [
            "-netdev",
            f"tap,id={NETDEV_ID},ifname={self.ifname},script=no,downscript=no,vhost={vhost}",
        ]


@dataclass(frozen=True, slots=True)
class VhostUserBackend:
    """A vhost-user backend listening on ``socket_path`` (QEMU is the client).

    ``reconnect``: QEMU reconnects every that many seconds after the backend went away
    (``-chardev socket,...,reconnect=N``), which is what survives a backend restart.
    """

    socket_path: str
    reconnect: int | None = None

    def __post_init__(self) -> None:
        if self.reconnect is not None and self.reconnect < 1:
            raise UsageError(f"reconnect interval {self.reconnect} s must be at least 1")

    def args(self) -> list[str]:
        _check_option("vhost-user socket path", self.socket_path)
        chardev = f"socket,id=vhu0,path={self.socket_path}"
        if self.reconnect is not None:
            chardev += f",reconnect={self.reconnect}"
        return [
            "-chardev",
            chardev,
            "-netdev",
            f"vhost-user,id={NETDEV_ID},chardev=vhu0",
        ]


Backend = TapBackend | VhostUserBackend


@dataclass(frozen=True, slots=True)
class MachineConfig:
    """Everything that decides QEMU's command line.

    ``device_properties`` are appended to ``-device virtio-net-pci,...`` (e.g. the output of
    ``kvhost qemu-args V``, or ``{"mac": "52:54:00:00:00:01"}``); ``incoming`` is a migration
    URI (``unix:PATH``, ``exec:cat FILE``, ``defer``); ``extra_args`` go last, verbatim.
    """

    backend: Backend
    device_properties: Mapping[str, str] = field(default_factory=dict)
    memory_mib: int = 64
    incoming: str | None = None
    machine: str = "pc"
    binary: str = QEMU_BINARY
    extra_args: tuple[str, ...] = ()
    #: a legacy-only (virtio 0.9.5) device instead of a modern one: needed for backends
    #: without VERSION_1, which QEMU refuses to put behind a modern-only device
    legacy: bool = False


def device_arg(properties: Mapping[str, str], *, legacy: bool = False) -> str:
    """The ``-device`` value: fixed base plus ``properties`` in the given order; ``legacy``
    makes it a legacy-only device (``disable-legacy=off,disable-modern=on``)."""
    parts = [
        "virtio-net-pci",
        f"id={DEVICE_ID}",
        f"netdev={NETDEV_ID}",
        *(["disable-legacy=off", "disable-modern=on"] if legacy else ["disable-legacy=on"]),
        f"addr={DEVICE_SLOT:#x}",
        "romfile=",
    ]
    fixed = {"id", "netdev", "disable-legacy", "disable-modern", "addr", "romfile"}
    for key, value in properties.items():
        _check_option("device property name", key)
        if key in fixed:
            raise UsageError(f"device property {key!r} is fixed by the test machine; drop it")
        if "," in str(value) or not str(value):
            raise UsageError(f"device property {key}={value!r}: empty or contains ','")
        parts.append(f"{key}={value}")
    return ",".join(parts)


def build_command(config: MachineConfig, *, bios: str, qtest: str, qmp: str) -> list[str]:
    """QEMU's argv for ``config``, with the BIOS file and the two control socket paths."""
    if config.memory_mib <= 0:
        raise UsageError(f"memory size {config.memory_mib} MiB must be positive")
    size = f"{config.memory_mib}M"
    argv = [
        config.binary,
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-machine", config.machine,
        "-accel", "tcg",
        "-smp", "1",
        "-m", size,
        "-bios", bios,
        "-object", f"memory-backend-memfd,id=mem,size={size},share=on",
        "-numa", "node,memdev=mem",
        *config.backend.args(),
        "-device", device_arg(config.device_properties, legacy=config.legacy),
        "-qtest", f"unix:{qtest}",
        "-qtest-log", "/dev/null",  # QEMU logs every qtest line to stderr otherwise
        "-qmp", f"unix:{qmp}",
    ]
    if config.incoming is not None:
        if not config.incoming:
            raise UsageError("incoming migration URI is empty; use e.g. 'unix:PATH' or 'defer'")
        argv += ["-incoming", config.incoming]
    argv += list(config.extra_args)
    return argv


def write_bios(path: Path) -> None:
    """A 64 KiB BIOS image of HLT instructions: the CPU halts at the reset vector."""
    path.write_bytes(HLT * BIOS_SIZE)


class Machine:
    """One QEMU process. Use as a context manager; cleanup (kill, reap, remove the temp
    directory, close sockets) always happens.

    After :meth:`start`: :attr:`qtest` and :attr:`qmp` are connected (QMP negotiated).
    :meth:`start` raises :class:`QemuExited` (with stderr) if QEMU exits or does not connect.
    """

    def __init__(self, config: MachineConfig, *, name: str = "qemu") -> None:
        self.config = config
        self.name = name
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr_path: Path | None = None
        self._stderr_kept = ""
        self._qtest: QtestClient | None = None
        self._qmp: QmpClient | None = None
        self.argv: list[str] = []

    # -- state ------------------------------------------------------------------------------
    @property
    def qtest(self) -> QtestClient:
        if self._qtest is None:
            raise UsageError(f"{self.name}: not started; call start() first")
        return self._qtest

    @property
    def qmp(self) -> QmpClient:
        if self._qmp is None:
            raise UsageError(f"{self.name}: not started; call start() first")
        return self._qmp

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise UsageError(f"{self.name}: not started")
        return self._proc.pid

    @property
    def workdir(self) -> Path:
        if self._dir is None:
            raise UsageError(f"{self.name}: not started")
        return self._dir

    @property
    def exit_status(self) -> int | None:
        """None while running (or never started), else the exit status (negative = signal)."""
        return None if self._proc is None else self._proc.poll()

    def stderr_text(self) -> str:
        if self._stderr_path is None:
            return self._stderr_kept
        try:
            return self._stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def describe(self) -> tuple[int | None, str]:
        """(exit status or None, stderr so far); given to the clients for their errors."""
        status = self.exit_status
        if status is None and self._proc is not None:
            # A dying QEMU closes its sockets a moment before it can be reaped.
            with contextlib.suppress(subprocess.TimeoutExpired):
                status = self._proc.wait(timeout=1.0)
        return status, self.stderr_text()

    # -- lifecycle --------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> Machine:
        if self._proc is not None:
            raise UsageError(f"{self.name}: already started")
        try:
            self._start(timeout)
        except BaseException:
            self.kill()
            raise
        return self

    def _start(self, timeout: float) -> None:
        binary = self.config.binary
        if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
            raise UsageError(
                f"QEMU binary {binary} is missing: install it with "
                "'apt-get install qemu-system-x86'"
            )
        self._dir = Path(tempfile.mkdtemp(prefix=f"kvhost-{self.name}-"))
        bios = self._dir / "hlt-bios.bin"
        write_bios(bios)
        qtest_path, qmp_path = self._dir / "qtest.sock", self._dir / "qmp.sock"
        listeners = []
        for path in (qtest_path, qmp_path):
            lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listeners.append(lsock)
            lsock.bind(str(path))
            lsock.listen(1)
        try:
            self.argv = build_command(
                self.config, bios=str(bios), qtest=str(qtest_path), qmp=str(qmp_path)
            )
            self._stderr_path = self._dir / "stderr.log"
            with open(self._stderr_path, "wb") as err:
                self._proc = subprocess.Popen(
                    self.argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                    close_fds=True,
                )
            deadline = time.monotonic() + timeout
            qtest_sock = self._accept(listeners[0], deadline, "qtest")
            self._qtest = QtestClient(qtest_sock, describe=self.describe)
            qmp_sock = self._accept(listeners[1], deadline, "QMP")
            self._qmp = QmpClient(qmp_sock, describe=self.describe)
        finally:
            for lsock in listeners:
                lsock.close()
        self._qmp.negotiate(timeout=max(1.0, deadline - time.monotonic()))

    def _accept(self, lsock: socket.socket, deadline: float, what: str) -> socket.socket:
        lsock.settimeout(0.05)
        while True:
            try:
                conn, _ = lsock.accept()
                conn.settimeout(None)
                return conn
            except TimeoutError:
                pass
            status = self.exit_status
            if status is not None:
                raise QemuExited(
                    f"{self.name}: QEMU exited before connecting its {what} socket; "
                    f"command line: {' '.join(self.argv)}",
                    exit_status=status, stderr=self.stderr_text(),
                )
            if time.monotonic() > deadline:
                raise QemuError(
                    f"{self.name}: QEMU did not connect its {what} socket in time",
                    stderr=self.stderr_text(),
                )

    def wait_incoming(self, timeout: float = 60.0, poll: float = 0.02) -> str:
        """For an ``incoming`` machine: wait until the migration stream is loaded and the VM
        runs; returns the run state. Raises :class:`QemuExited` (with stderr, e.g. QEMU's
        "Features 0x... unsupported") if QEMU exits instead, QemuError on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.qmp.query_status()
            if status != "inmigrate":
                return status
            if time.monotonic() > deadline:
                raise QemuError(f"{self.name}: still 'inmigrate' after {timeout} s",
                                stderr=self.stderr_text())
            time.sleep(poll)

    def wait(self, timeout: float) -> int:
        """Wait for QEMU to exit by itself; returns its status, QemuError on timeout."""
        if self._proc is None:
            raise UsageError(f"{self.name}: not started")
        try:
            return self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise QemuError(f"{self.name}: QEMU still running after {timeout} s",
                            stderr=self.stderr_text()) from None

    def stop(self, timeout: float = 10.0) -> int:
        """Graceful stop (QMP ``quit``), then SIGKILL if needed; returns the exit status."""
        if self._proc is None:
            return 0
        if self._proc.poll() is None and self._qmp is not None:
            with contextlib.suppress(QemuError):
                self._qmp.quit()
        try:
            status = self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._proc.send_signal(signal.SIGKILL)
            status = self._proc.wait()
        self._cleanup()
        return status

    def kill(self) -> None:
        """SIGKILL and reap (no-op when not running), then clean up."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait()
        self._cleanup()

    def _cleanup(self) -> None:
        for client in (self._qtest, self._qmp):
            if client is not None:
                client.close()
        self._qtest = self._qmp = None
        if self._dir is not None:
            self._stderr_kept = self.stderr_text()  # outlives the directory, for assertions
            self._stderr_path = None
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> Machine:
        if self._proc is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.stop()
        else:
            self.kill()


@dataclass(frozen=True, slots=True)
class MigrationResult:
    """The source's final ``query-migrate`` answer, in milliseconds, plus our wall time."""

    status: str
    total_ms: int | None
    downtime_ms: int | None
    setup_ms: int | None
    wall_ms: float
    error: str | None
    raw: Mapping[str, object]


def _settled_stats(source: Machine, timeout: float) -> dict[str, Any]:
    """The final ``query-migrate`` answer once QEMU has filled in its times.

    QEMU's migration thread sets the status to ``completed`` first and computes
    ``total-time`` and ``downtime`` afterwards, once it gets the big QEMU lock, in the step
    that also sets the run state to ``postmigrate``. A query in between answers
    ``completed`` with both times 0. So: wait for ``postmigrate``, then ask again.

    Raises QemuError naming the machine, the run state it stayed in and ``timeout`` when
    ``postmigrate`` does not come in time: the zeros QEMU reports until then are not
    measurements, and a result carrying them would pass for a zero-downtime migration.
    """
    deadline = time.monotonic() + timeout
    while (state := source.qmp.query_status()) != "postmigrate":
        if time.monotonic() > deadline:
            raise QemuError(
                f"{source.name}: migration completed, but the run state is still {state!r}, "
                f"not 'postmigrate', after {timeout} s: QEMU has not filled in its total-time "
                "and downtime",
                stderr=source.stderr_text(),
            )
        time.sleep(0.005)
    return source.qmp.query_migrate()


#: bytes/s while ``during_copy`` looks: slow enough that the RAM copy of a 64 MiB test guest
#: (mostly zero pages, a few bytes each) lasts seconds, not milliseconds
SLOW_BANDWIDTH = 64 * 1024
FULL_BANDWIDTH = 1 << 40


def _during_copy(source: Machine, call: Callable[[], None], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    try:
        while (status := source.qmp.query_migrate().get("status")) != "active":
            if status in ("completed", "failed", "cancelled"):
                return  # nothing to look at: the caller reads the final status
            if time.monotonic() > deadline:
                raise QemuError(f"{source.name}: migration never became active in "
                                f"{timeout} s (status {status!r})", stderr=source.stderr_text())
            time.sleep(0.005)
        call()
    finally:
        source.qmp.execute("migrate-set-parameters", {"max-bandwidth": FULL_BANDWIDTH})


def migrate(
    source: Machine,
    uri: str,
    *,
    destination: Machine | None = None,
    return_path: bool = True,
    timeout: float = 120.0,
    during_copy: Callable[[], None] | None = None,
) -> MigrationResult:
    """Live-migrate ``source`` to ``uri`` and wait for a final status (not raising on a
    ``failed`` migration: the result says so, with QEMU's ``error-desc``).

    ``return_path`` enables the capability on the source and, when given, on
    ``destination`` (must be started with ``incoming``): then a destination that refuses
    the stream makes the source report ``failed`` instead of ``completed``. For ``exec:``
    URIs there is no destination machine and no return path.

    ``during_copy``: called once while RAM is being copied (status ``active``: the dirty
    log is on and the VM still runs, so its vhost backend is live), with the bandwidth held
    low so that moment lasts; the moment to look at the source's logging. (Holding it at
    ``pre-switchover`` would be too late: the VM and its vhost are stopped by then.)

    Raises QemuError when the migration reaches no final status in ``timeout`` seconds, or
    completes but its times are not settled within another ``timeout`` (see
    ``_settled_stats``).
    """
    if return_path and uri.startswith("exec:"):
        raise UsageError("the return-path capability needs a socket URI, not exec:; pass "
                         "return_path=False for file migrations")
    caps = {"return-path": return_path}
    if destination is not None:
        destination.qmp.set_migration_capabilities(caps)
    source.qmp.set_migration_capabilities(caps)
    if during_copy is not None:
        source.qmp.execute("migrate-set-parameters", {"max-bandwidth": SLOW_BANDWIDTH})
    start = time.perf_counter()
    source.qmp.migrate(uri)
    if during_copy is not None:
        _during_copy(source, during_copy, timeout)
    info = source.qmp.wait_migration(timeout=timeout)
    wall = (time.perf_counter() - start) * 1e3
    if info.get("status") == "completed":
        info = _settled_stats(source, timeout)

    def ms(key: str) -> int | None:
        value = info.get(key)
        return int(value) if isinstance(value, int | float) else None

    error = info.get("error-desc")
    return MigrationResult(
        status=str(info.get("status")), total_ms=ms("total-time"), downtime_ms=ms("downtime"),
        setup_ms=ms("setup-time"), wall_ms=wall, error=None if error is None else str(error),
        raw=info,
    )
