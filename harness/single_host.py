"""The single-host end-to-end scenario: real QEMU, kvhost-shim, kernel vhost-net, migration.

Used by the kernel-tier tests (``tests/test_kernel_qemu_shim.py``), the demo
(:mod:`harness.demo`) and the benchmark (``bench/bench_qemu.py``). Everything is real: Debian's
unmodified QEMU is the vhost-user frontend, ``kvhost-shim`` runs as its own process (the
program operators run), the rings run in the kernel's vhost-net, the guest driver is the
qtest driver of :mod:`harness.qemu` (modern, or :mod:`harness.qemu.legacy_pci` for versions
without VERSION_1, which QEMU only puts behind a legacy device).

:func:`run` is the whole story, in a fresh network namespace it creates and removes::

    probe -> manifest -> tap kvs0 + shim A (version V) -> QEMU A (vhost-user)
          -> guest driver to DRIVER_OK -> frames TX (seen on kvs0) and RX (sent on kvs0)
          -> tap kvs1 + shim B (pinned) -> QEMU B (-incoming) -> migrate, return-path on
          -> RARP on kvs1, driver continues on B, frames both ways through B's vhost-net
          -> ScenarioResult (with what each shim logged) -> teardown, always

The pieces are public so tests can build the variants (failing migrations, native
baselines): :mod:`harness.rig`, :mod:`harness.shim_process` (what each shim did, from its
log), :mod:`harness.device` (what QEMU's device shows for a version, which driver drives it)
and :mod:`harness.manifests` (capped hosts).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from harness import netns
from harness.device import (
    PLUMBING,
    attach_driver,
    device_properties_for,
    driver_for,
    is_legacy,
)
from harness.errors import ScenarioError
from harness.frames import GUEST_MAC
from harness.procfs import ProcUsage
from harness.qemu.machine import MigrationResult, migrate
from harness.qemu.virtio_pci import TX, DriverState
from harness.rig import Rig, exchange
from kvhost import abi, features, manifest, versions
from kvhost.errors import KvhostError, UsageError
from kvhost.probe import probe


@dataclass
class ScenarioResult:
    """Everything the demo's report and the tests need from one :func:`run`."""

    kernel: str
    supported: list[str]
    latest: str
    served: str
    destination_served: str
    legacy: bool
    device_features: int
    negotiated: int
    driver_ok_ms: float
    frames_sent: int
    frames_received: int
    traffic_shim_usage: ProcUsage
    migration: MigrationResult
    destination_state: str
    rarp_seen: bool
    frames_after_migration: int
    source_get_bases: list[tuple[int, int]]
    destination_set_bases: list[tuple[int, int]]
    source_acked: list[int]
    log_mapped: bool
    source_exit: int
    destination_exit: int
    shim_exits: list[int]
    driver_tx_used: int
    manifest_json: str
    logs: dict[str, str] = field(default_factory=dict)

    @property
    def negotiated_names(self) -> list[str]:
        return features.names(self.negotiated & ~PLUMBING)

    @property
    def log_all(self) -> bool:
        return any(f & features.LOG_ALL for f in self.source_acked)


Progress = Callable[[str], None]


def run(*, version: str | None = None, destination_version: str | None = None,
        frames: int = 8, workdir: Path | None = None,
        progress: Progress | None = None) -> ScenarioResult:
    """The whole single-host story (module docstring) in a fresh network namespace.

    ``version``: what shim A serves (None: the host's latest); ``destination_version``:
    shim B's pin (None: the same as A's). Raises ScenarioError (or QemuError) naming the
    step that failed; everything started is torn down in every case.
    """
    say = progress or (lambda text: None)
    with netns.fresh("kvscen"), Rig(workdir) as rig:
        try:
            return _run(rig, say, version, destination_version, frames)
        except (KvhostError, OSError) as err:
            raise ScenarioError(f"{err}\n{rig.diagnostics()}") from err


def _run(rig: Rig, say: Progress, version: str | None, destination_version: str | None,
         frames: int) -> ScenarioResult:
    say("probing the kernel")
    host = probe()
    offer = versions.host_offer(host)
    supported = versions.supported(offer)
    latest = versions.latest(offer)
    chosen = versions.parse(version) if version else latest
    dest = versions.parse(destination_version) if destination_version else chosen
    legacy = is_legacy(chosen)
    if is_legacy(dest) != legacy:
        raise UsageError(f"{chosen.label} and {dest.label} need different device types "
                         "(one has VERSION_1, the other not): no migration possible")
    built = manifest.build(host)
    manifest_path = rig.workdir / "manifest.json"
    manifest.write_atomic(manifest_path, manifest.encode(built))
    say(f"manifest written: latest {built['latest']}")

    src_port = rig.port("kvs0")
    dst_port = rig.port("kvs1")
    say(f"starting kvhost-shim A at {chosen.label}")
    shim_a = rig.shim("shim-a", "kvs0", chosen.spec() if chosen.name is None
                      else chosen.label)
    props = device_properties_for(chosen)
    say("starting QEMU A (vhost-user -> shim A)")
    src = rig.qemu("qemu-a", shim_a, legacy=legacy, properties=props)
    drv = driver_for(src, legacy)
    device_features = drv.read_device_features()
    driver_ok = drv.start()
    say(f"guest driver at DRIVER_OK ({driver_ok * 1e3:.1f} ms round trip)")

    before = shim_a.wait_quiet()
    sent, received = exchange(drv, src_port, frames, "a")
    traffic_usage = shim_a.usage() - before
    say(f"{sent} frames out and {received} in through kernel vhost-net")

    say(f"starting kvhost-shim B pinned to {dest.label} and QEMU B (-incoming)")
    shim_b = rig.shim("shim-b", "kvs1", dest.spec() if dest.name is None else dest.label)
    dst = rig.qemu("qemu-b", shim_b, legacy=legacy, properties=props,
                   incoming=rig.migration_uri())
    say("live-migrating A -> B (return-path on)")
    result = migrate(src, rig.migration_uri(), destination=dst)
    if result.status != "completed":
        raise ScenarioError(f"migration {result.status}: {result.error}\n"
                            f"destination stderr: {dst.stderr_text()}")
    state = dst.wait_incoming(timeout=30)
    rarp, _ = dst_port.expect(abi.ETH_P_RARP)
    moved = attach_driver(dst, DriverState.from_json(drv.save_state()), legacy)
    after_sent, after_received = exchange(moved, dst_port, 1, "b")
    tx_used = moved.used_idx(TX)
    say(f"migration {result.status}: total {result.total_ms} ms, downtime "
        f"{result.downtime_ms} ms; traffic continues on B")

    dest_exit = dst.stop()
    src_exit = src.stop()
    shim_exits = [shim_a.stop(), shim_b.stop()]
    acked = shim_a.acked_features()
    return ScenarioResult(
        kernel=host.kernel_release,
        supported=[v.label for v in supported],
        latest=latest.label,
        served=shim_a.served_version() or chosen.label,
        destination_served=shim_b.served_version() or dest.label,
        legacy=legacy,
        device_features=device_features,
        negotiated=acked[0] if acked else 0,
        driver_ok_ms=driver_ok * 1e3,
        frames_sent=sent,
        frames_received=received,
        traffic_shim_usage=traffic_usage,
        migration=result,
        destination_state=state,
        rarp_seen=rarp[6:12] == GUEST_MAC,
        frames_after_migration=after_sent + after_received,
        source_get_bases=shim_a.ring_bases("GET_VRING_BASE"),
        destination_set_bases=shim_b.ring_bases("SET_VRING_BASE"),
        source_acked=acked,
        log_mapped=bool(shim_a.events("dirty_log")),
        source_exit=src_exit,
        destination_exit=dest_exit,
        shim_exits=shim_exits,
        driver_tx_used=tx_used,
        manifest_json=manifest_path.read_text(),
        logs={"shim-a": shim_a.log_text(), "shim-b": shim_b.log_text(),
              "qemu-a": src.stderr_text(), "qemu-b": dst.stderr_text()},
    )
