"""The rig: the shims, taps, QEMUs and packet sockets of one test or scenario, torn down
together, and frames exchanged through a guest driver and a tap, checked byte for byte."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType

from harness import netns
from harness.errors import ScenarioError
from harness.frames import GUEST_MAC, PEER_MAC, frame
from harness.qemu.machine import QEMU_BINARY, Machine, MachineConfig, VhostUserBackend
from harness.qemu.virtio_pci import TX, VirtioNetDriver
from harness.shim_process import SHIM_PROGRAM, ShimProcess


class Rig:
    """Shims, taps, QEMUs and packet sockets of one scenario; everything is torn down on
    exit (QEMUs killed, shims stopped, sockets closed), whatever happened.

    The caller must already be in a network namespace of its own (:func:`harness.netns.fresh`,
    or the tests' ``netns`` fixture).
    """

    def __init__(self, workdir: Path | None = None) -> None:
        self._stack = ExitStack()
        if workdir is None:
            workdir = Path(self._stack.enter_context(
                tempfile.TemporaryDirectory(prefix="kvscen-", dir=_scratch_dir())))
        self.workdir = workdir
        self.shims: list[ShimProcess] = []
        self.machines: list[Machine] = []

    def __enter__(self) -> Rig:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()

    def port(self, tap: str) -> netns.TapPort:
        """Create tap ``tap`` (up) and bind a packet socket to it."""
        netns.create_tap(tap)
        port = netns.TapPort(tap)
        self._stack.callback(port.close)
        return port

    def shim(self, name: str, tap: str | None, version: str | None, *,
             socket_path: str | None = None, verbose: bool = True,
             timeout: float = 120.0, program: Sequence[str] = SHIM_PROGRAM) -> ShimProcess:
        """Start a shim (``program``, see :class:`ShimProcess`) on the existing ``tap``
        (None: the shim creates a tap per connection) serving ``version`` (None: the
        host's latest, unpinned), listening on ``socket_path`` (default: ``<name>.sock`` in
        the work directory); ShimStartError if it does not listen within ``timeout`` s."""
        path = socket_path or str(self.workdir / f"{name}.sock")
        shim = ShimProcess(path, self.workdir / f"{name}.log", version=version, tap=tap,
                           name=name, verbose=verbose, program=program)
        self._stack.callback(shim.kill)
        self._stack.callback(shim.stop)
        self.shims.append(shim)
        return shim.start(timeout)

    def qemu(self, name: str, shim: ShimProcess, *, legacy: bool,
             properties: dict[str, str] | None = None, incoming: str | None = None,
             binary: str = QEMU_BINARY, machine: str = "pc") -> Machine:
        """Start QEMU (``binary``, machine type ``machine``) with its vhost-user netdev on
        ``shim``'s socket."""
        config = MachineConfig(
            backend=VhostUserBackend(shim.socket_path),
            device_properties=properties or {"mac": GUEST_MAC.hex(":")},
            incoming=incoming, legacy=legacy, binary=binary, machine=machine,
        )
        return self.machine(name, config)

    def machine(self, name: str, config: MachineConfig, timeout: float = 180.0) -> Machine:
        """Start QEMU; ``timeout`` is generous because a loaded TCG machine is slow."""
        machine = Machine(config, name=name)
        self._stack.callback(machine.kill)
        self.machines.append(machine)
        return machine.start(timeout=timeout)

    def diagnostics(self) -> str:
        """Every shim log and QEMU stderr so far, for error messages."""
        parts = []
        for shim in self.shims:
            parts.append(f"--- {shim.name} log ---\n{shim.log_text().rstrip()}")
        for machine in self.machines:
            parts.append(f"--- {machine.name} stderr (exit {machine.exit_status}) ---\n"
                         f"{machine.stderr_text().rstrip()}")
        return "\n".join(parts)

    def migration_uri(self) -> str:
        return f"unix:{self.workdir / 'migrate.sock'}"


def _scratch_dir() -> str | None:
    # the test VM's /tmp is a small overlay; /run is tmpfs there and on most hosts
    return "/run" if os.access("/run", os.W_OK) else None


def exchange(drv: VirtioNetDriver, port: netns.TapPort, count: int, tag: str) -> tuple[int, int]:
    """``count`` frames guest -> tap and ``count`` tap -> guest; each is checked byte for
    byte. Returns (sent, received). ScenarioError when one is lost."""
    for i in range(count):
        out = frame(GUEST_MAC, PEER_MAC, f"{tag}-tx{i}")
        drv.send(out)
        port.expect(out)
        drv.wait_used(TX, 1)
        drv.pop_used(TX)
    received = 0
    for i in range(count):
        into = frame(PEER_MAC, GUEST_MAC, f"{tag}-rx{i}")
        port.send(into)
        receive_exact(drv, into)
        received += 1
    return count, received


def receive_exact(drv: VirtioNetDriver, wanted: bytes, timeout: float = 10.0) -> None:
    """Wait until ``wanted`` lands in the RX ring (other frames are skipped)."""
    deadline = time.monotonic() + timeout
    got: list[bytes] = []
    while time.monotonic() < deadline:
        got += drv.receive(timeout=max(0.1, deadline - time.monotonic()))
        if wanted in got:
            return
    raise ScenarioError(f"frame not in the RX ring; got ethertypes "
                        f"{[g[12:14].hex() for g in got]}")
