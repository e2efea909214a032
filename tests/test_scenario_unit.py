"""Host tier: the pure parts of the end-to-end scenario (harness.single_host and its pieces),
the legacy driver's layout, the demo report, and the shim events the harness reads."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
from test_versions import V, probe_61

from harness.demo import render
from harness.device import LEGACY_ONLY, expected_device_bits, is_legacy
from harness.frames import frame
from harness.manifests import capped_manifest, kvhost_compat
from harness.procfs import ProcUsage
from harness.qemu.legacy_pci import PAGE, legacy_ring_layout
from harness.qemu.machine import MachineConfig, VhostUserBackend, build_command
from harness.rig import Rig
from harness.shim_process import ShimProcess, ShimStartError
from kvhost import features, manifest, versions

EVENT_IDX = features.mask(["EVENT_IDX"])


def _v(n: int) -> versions.InterfaceVersion:
    return versions.parse(V[n])


def test_versions_without_version_1_need_a_legacy_device() -> None:
    assert [is_legacy(_v(n)) for n in range(1, 6)] == [True, True, True, True, False]


def test_modern_devices_hide_legacy_only_bits() -> None:
    v5 = _v(5)
    assert expected_device_bits(v5) == versions.serve_features(v5) & ~LEGACY_ONLY
    # a legacy device shows them, and MTU (served because the version has mtu=on)
    v2 = _v(2)
    assert expected_device_bits(v2) == versions.serve_features(v2)
    assert expected_device_bits(v2) & features.mask(["MTU", "NOTIFY_ON_EMPTY"])


def test_legacy_ring_layout_is_page_aligned() -> None:
    desc, avail, used = legacy_ring_layout(1, 256)
    assert desc % PAGE == 0 and avail == desc + 16 * 256
    assert used % PAGE == 0 and used >= avail + 6 + 2 * 256 and used - avail < PAGE + 6 + 512


def test_legacy_device_command_line() -> None:
    config = MachineConfig(backend=VhostUserBackend("/w/s.sock"), legacy=True)
    argv = build_command(config, bios="/w/b", qtest="/w/q", qmp="/w/m")
    device = argv[argv.index("-device") + 1]
    assert "disable-legacy=off,disable-modern=on" in device
    assert "disable-legacy=on" not in device


def test_capped_manifest_lowers_latest_and_compat_predicts(tmp_path: Path) -> None:
    host = manifest.build(probe_61())
    v5 = _v(5)
    cap = versions.InterfaceVersion(None, v5.features & ~EVENT_IDX, v5.max_queue_size,
                                    v5.max_queue_pairs, v5.mtu)
    capped = capped_manifest(host, cap)
    assert capped["cap"] == cap.spec()
    assert capped["latest"] == V[2]  # v3 introduced EVENT_IDX
    assert capped["supported"] == [V[1], V[2]]
    src, dst = tmp_path / "src.json", tmp_path / "dst.json"
    manifest.write_atomic(src, manifest.encode(host))
    manifest.write_atomic(dst, manifest.encode(capped))
    status, result = kvhost_compat(src, dst)
    assert status == 0 and result["version"] == V[2]
    assert any("EVENT_IDX" in r for r in result["reasons"]), result


def test_a_cap_leaving_nothing_is_an_error() -> None:
    host = manifest.build(probe_61())
    cap = versions.InterfaceVersion(None, features.mask(["VERSION_1"]), 256, 1, False)
    with pytest.raises(manifest.ManifestError, match="serves no registry version"):
        capped_manifest(host, cap)


def test_frames_are_unique_and_minimum_size() -> None:
    a, b = frame(b"\x02" * 6, b"\x04" * 6, "x"), frame(b"\x02" * 6, b"\x04" * 6, "x")
    assert len(a) == 60 and a != b and a[12:14] == b"\x88\xb5"


def test_proc_usage_of_this_process() -> None:
    import os

    u = ProcUsage.of(os.getpid())
    assert u.cpu_seconds > 0 and u.voluntary >= 0
    assert (u - u).switches == 0


def test_shim_events_the_harness_reads(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                          ) -> None:
    """Drive the real Session (recording backend) through a migration-like sequence, write
    its log as the shim's JSON events, and read it the way the harness does."""
    from test_session import RecordingBackend

    from kvhost.vhost_user import protocol as p
    from shim import eventlog
    from shim.session import Session

    v5 = _v(5)
    backend = RecordingBackend()
    backend.bases = {0: 7, 1: 9}
    session = Session(backend, v5, pinned=True, name="connection 1")
    fe = p.FrontendCodec()
    acked = versions.serve_features(v5) & ~LEGACY_ONLY | features.PROTOCOL_FEATURES
    with caplog.at_level(logging.DEBUG, logger="kvhost.shim"):
        for request, payload in (
            (p.Request.SET_OWNER, p.Empty()),
            (p.Request.SET_FEATURES, p.U64(acked)),
            (p.Request.SET_VRING_BASE, p.VringState(1, 5)),
            (p.Request.GET_VRING_BASE, p.VringState(1, 0)),
        ):
            data, fds = fe.request(request, payload)
            session.receive(data, fds)
            session.log_events()
    log = tmp_path / "shim.log"
    formatter = eventlog.EventFormatter("json")
    log.write_text("".join(f"{formatter.format(r)}\n" for r in caplog.records)
                   + "Traceback (most recent call last):\n{\"cut short\n")
    shim = ShimProcess("/nonexistent", log)
    assert shim.acked_features() == [acked]
    assert shim.ring_bases("SET_VRING_BASE") == [(1, 5)]
    assert shim.ring_bases("GET_VRING_BASE") == [(1, 9)]


#: Stands in for kvhost-shim as ShimProcess's ``program`` (the real one needs
#: /dev/vhost-net): takes the same options, listens, logs the shim's "listening" event, exits 0
#: on SIGTERM; ``--tap refuse`` makes it exit with status 1 and a message first.
STAND_IN_SHIM = r"""
import json, signal, socket, sys
args = sys.argv[1:]
def option(name, default=None):
    return args[args.index(name) + 1] if name in args else default
if option("--tap") == "refuse":
    sys.exit("kvhost-shim: tap refuse does not exist")
path = option("--socket-path")
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.bind(path)
sock.listen()
version = option("--interface-version", "org.kernel.vhost-net.v9")
print(json.dumps({"event": "listening", "socket": path, "version": version}),
      file=sys.stderr, flush=True)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
while True:
    signal.pause()
"""
STAND_IN = (sys.executable, "-c", STAND_IN_SHIM)


def test_shim_process_runs_its_program_with_the_shim_options(tmp_path: Path) -> None:
    shim = ShimProcess(str(tmp_path / "s.sock"), tmp_path / "s.log", version=V[5], tap="kvs0",
                       verbose=False, program=STAND_IN)
    assert shim.argv == [*STAND_IN, "--socket-path", str(tmp_path / "s.sock"),
                         "--log-format", "json", "--interface-version", V[5], "--tap", "kvs0"]
    assert shim.start(timeout=60) is shim
    assert shim.served_version() == V[5]
    assert shim.stop() == 0 == shim.exit_status


def test_shim_process_that_exits_first_says_how_and_why(tmp_path: Path) -> None:
    shim = ShimProcess(str(tmp_path / "s.sock"), tmp_path / "s.log", tap="refuse",
                       program=STAND_IN, name="shim-x")
    with pytest.raises(ShimStartError) as err:
        shim.start(timeout=60)
    assert err.value.exit_status == 1 == shim.exit_status
    assert "tap refuse does not exist" in err.value.log
    assert str(err.value).startswith("shim-x: kvhost-shim exited with status 1 before listening")


def test_rig_starts_a_shim_program_and_stops_it_on_exit(tmp_path: Path) -> None:
    with Rig(tmp_path) as rig:
        shim = rig.shim("shim-r", None, None, program=STAND_IN, timeout=60)
        assert shim.socket_path == str(tmp_path / "shim-r.sock")
        assert shim.served_version() == "org.kernel.vhost-net.v9"
        assert shim.exit_status is None
    assert shim.exit_status == 0


def test_demo_report_names_everything() -> None:
    text = render({
        "kernel": "6.1.0-56-amd64", "supported": [V[n] for n in range(1, 6)],
        "served": V[5], "destination_served": V[5], "negotiated": "0x1",
        "negotiated_names": ["CSUM", "VERSION_1"], "driver_ok_ms": 4.2, "frames_sent": 8,
        "frames_received": 8, "frames_after_migration": 2, "shim_cpu_ms_during_traffic": 0.0,
        "shim_wakeups_during_traffic": 0, "migration": "completed", "migration_total_ms": 900,
        "migration_downtime_ms": 30, "rings_resumed": True, "ring_bases": {"0": 8, "1": 8},
        "dirty_logging": True, "rarp_on_destination": True,
    })
    for needle in ("6.1.0-56-amd64", "v1, v2, v3, v4, v5", "CSUM, VERSION_1", "completed",
                   "downtime 30 ms", "8 out + 8 in", "RARP on destination tap seen"):
        assert needle in text, needle
