"""Cross-kernel tier (issues 7 and 16): a VM started on Linux 6.12 migrates to Linux 6.1.

The ``crosskernel`` tests run on the host: one scenario (``harness.crosskernel.run_scenario``)
boots the 6.12 test VM for every case's source side, then the 6.1 test VM for every
destination side, and the tests below assert each case on the collected results. Cases 1-5
use Debian's QEMU 7.2 (issue 7); cases 6 and 7 run QEMU 10.0's own vhost-net on both kernels
(issue 16): unpinned the guest takes USO and RING_RESET and 6.1 refuses the stream as
reported upstream, pinned with ``kvhost qemu-args --qemu`` it moves. Every case also checks
that the source's dirty log was on while RAM was copied, and every loaded case that 6.1's
vhost backend got SET_FEATURES with exactly the negotiated bits. Run with
``python -m pytest -m crosskernel`` (``./run-tests`` does). The unmarked tests at the end are
host-tier checks of the pure helpers.

Set ``KVHOST_CROSSKERNEL_STATE`` to a finished run's state directory to re-check its results
without booting (e.g. after changing only the assertions).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from harness import crosskernel as ck
from harness import crosskernel_libvirt as ckl
from harness.qemu import virtio_status as vs
from kvhost import features as fb
from kvhost import manifest as mf
from kvhost import versions as ver
from kvhost.errors import UsageError

RING_RESET = fb.bit("RING_RESET")
USO_AND_RING_RESET = fb.mask(["RING_RESET", "GUEST_USO4", "GUEST_USO6", "HOST_USO"])
#: each feature bit's virtio-net-pci property (kvhost/data/features.json's qemu column)
QEMU_PROPERTY = {b.name: b.qemu for b in fb.TABLE if b.qemu}
#: pytest-timeout's limit for a cross-kernel test: the whole two-boot scenario runs in the
#: module fixture, i.e. inside the first test's set-up, far beyond pyproject's 900 s net
CROSSKERNEL_TIMEOUT = 3600
TestFunction = TypeVar("TestFunction", bound=Callable[..., None])


def crosskernel(test: TestFunction) -> TestFunction:
    """Mark a cross-kernel tier test, with its timeout (however pytest is started)."""
    marked: TestFunction = pytest.mark.crosskernel(pytest.mark.timeout(CROSSKERNEL_TIMEOUT)(test))
    return marked


@pytest.fixture(scope="module")
def report() -> Iterator[dict[str, Any]]:
    reuse = os.environ.get("KVHOST_CROSSKERNEL_STATE")
    if reuse:
        yield ck.collect(Path(reuse))
        return
    state = Path(tempfile.mkdtemp(prefix="kvhost-crosskernel-", dir="/var/tmp"))
    result = ck.run_scenario(state)
    print(ck.format_report(result))
    yield result


def _sides(report: dict[str, Any], name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    if name not in report["cases"]:
        # only when re-checking a run started with --case (KVHOST_CROSSKERNEL_STATE)
        pytest.skip(f"{name} was not in that run's plan: {report['plan'].get('cases')}")
    src = report["cases"][name]["source"]
    dst = report["cases"][name]["destination"]
    boots = report.get("boots")
    assert src is not None, f"{name}: the 6.12 source phase wrote no result (boots: {boots})"
    assert dst is not None, f"{name}: the 6.1 destination phase wrote no result (boots: {boots})"
    assert src["error"] is None, f"{name}: source side failed: {src['error']}\n" + (
        src.get("traceback") or "") + f"\nQEMU stderr:\n{src.get('qemu_stderr')}"
    assert dst["error"] is None, f"{name}: destination side failed: {dst['error']}\n" + (
        dst.get("traceback") or "") + f"\nQEMU stderr:\n{dst.get('qemu_stderr')}"
    assert src["kernel"].startswith("6.12."), f"{name}: source ran on {src['kernel']}"
    assert dst["kernel"].startswith("6.1."), f"{name}: destination ran on {dst['kernel']}"
    mig = src["migration"]
    assert mig["status"] == "completed", f"{name}: source migration to the file: {mig}"
    assert src["frames_before"] == {"tx": True, "rx": True}
    assert src["stream_bytes"], f"{name}: empty migration stream"
    return src, dst


def _compat(report: dict[str, Any]) -> dict[str, Any]:
    compat = report["destination"]["compat"]
    assert compat is not None, "the destination phase did not run kvhost compat"
    assert compat["exit"] == 0, f"kvhost compat found no common version: {compat}"
    result: dict[str, Any] = compat["result"]
    return result


def _assert_dirty_log(src: dict[str, Any], name: str) -> None:
    """The source's vhost backend logged dirty pages while RAM went into the file: QEMU's
    own ``log-enabled``, read once during the copy."""
    assert src["log_during_copy"] == [True], (
        f"{name}: the source's dirty log while RAM was copied: {src['log_during_copy']}"
    )


def _assert_refused(report: dict[str, Any], name: str) -> None:
    """Cases 1, 3 and 6: QEMU on 6.1 refuses the stream, exactly as kvhost compat predicted,
    and the refusal names at least the case's bits (RING_RESET; QEMU 10.0 also USO)."""
    src, dst = _sides(report, name)
    _assert_dirty_log(src, name)
    must = ck.case_by_name(name).refused
    negotiated = int(src["driver_features"], 16)
    assert negotiated & fb.mask(must) == fb.mask(must), (
        f"{name}: the unpinned guest on 6.12 did not negotiate "
        f"{fb.names(fb.mask(must) & ~negotiated)} ({fb.names(negotiated)}); nothing to refuse"
    )
    stderr = dst.get("qemu_stderr") or ""
    assert dst["loaded"] is False, f"{name}: 6.1 loaded the unpinned stream\n{stderr}"
    assert dst["qemu_exit"] not in (None, 0), (
        f"{name}: destination QEMU exit status {dst['qemu_exit']!r}\n{stderr}"
    )
    parsed = ck.parse_features_error(stderr)
    assert parsed is not None, f"{name}: no 'Features 0x... unsupported' in:\n{stderr}"
    carried, allowed = parsed
    refused = fb.names(carried & ~allowed)
    assert set(must) <= set(refused), f"{name}: QEMU refused {refused}, not all of {must}"
    assert carried == negotiated, (
        f"{name}: the stream carried {carried:#x}, the guest negotiated {negotiated:#x}"
    )
    # The prediction, made before the load: compat's reasons name the very bits QEMU refused.
    compat = _compat(report)
    reasons = " ".join(compat["reasons"])
    assert "RING_RESET" in reasons, f"kvhost compat did not name RING_RESET: {compat}"
    for bit in refused:
        assert bit in reasons, f"{name}: QEMU refused {bit}, kvhost compat did not predict it"


def _assert_migrated(report: dict[str, Any], name: str) -> dict[str, Any]:
    """Cases 2, 4 and 7: pinned to the compat version, the stream loads and 6.1 carries on,
    its vhost backend set to exactly the bits the guest negotiated on 6.12."""
    src, dst = _sides(report, name)
    _assert_dirty_log(src, name)
    pin = report["plan"]["pin"]
    compat = _compat(report)
    assert compat["version"] == pin, (
        f"the VM was pinned to {pin} before it started, but kvhost compat on the two "
        f"manifests says {compat['version']}"
    )
    pinned = ver.parse(pin)
    negotiated = int(src["driver_features"], 16)
    assert not negotiated & RING_RESET, f"{name}: pinned guest negotiated RING_RESET"
    interface = negotiated & ver.INTERFACE_BITS
    assert interface & ~pinned.features == 0, (
        f"{name}: the guest negotiated {fb.names(interface & ~pinned.features)} beyond {pin}"
    )
    stderr = dst.get("qemu_stderr") or ""
    assert dst["loaded"] is True, f"{name}: 6.1 refused the pinned stream:\n{stderr}"
    assert dst["run_state"] == "running", f"{name}: run state {dst['run_state']}"
    assert dst["device_features"] == src["device_features"], (
        f"{name}: the device changed its features across the move: "
        f"{src['device_features']} -> {dst['device_features']}"
    )
    saved, resumed = src["saved_used"], dst["resumed_used"]
    assert saved["tx"] >= 1 and resumed == saved, (
        f"{name}: rings resumed at used indexes {resumed}, the source saved {saved}"
    )
    assert dst["used_after_tx"] == saved["tx"] + 1, (
        f"{name}: TX used.idx {dst['used_after_tx']} after one more frame, saved {saved['tx']}"
    )
    assert dst["frames_after"] == {"tx": True, "rx": True}
    assert dst["rarp_mac"] == ck.GUEST_MAC.hex(":"), f"{name}: RARP from {dst['rarp_mac']}"
    vhost = dst["vhost"]
    assert vhost["vhost_net_fds"] >= 1 and vhost["worker_tid"] is not None, (
        f"{name}: the frames after migration did not go through 6.1's vhost-net: {vhost}"
    )
    status = dst["vhost_status"]
    held, acked = int(status["guest_features"], 16), int(status["acked_features"], 16)
    assert held == negotiated, (
        f"{name}: 6.1's QEMU holds guest features {held:#x}, negotiated {negotiated:#x}"
    )
    wrong = vs.acked_mismatch(held, acked, int(status["backend_features"], 16))
    assert not wrong, (
        f"{name}: 6.1's vhost backend got SET_FEATURES {acked:#x}, differing from the "
        f"negotiated bits in {fb.names(wrong)}"
    )
    assert dst["qemu_exit"] == 0, f"{name}: destination QEMU exit {dst['qemu_exit']}\n{stderr}"
    return dst


def _qemu_args_switch_off(src: dict[str, Any], bits: tuple[str, ...]) -> None:
    """``kvhost qemu-args`` turned each of ``bits`` off by its property, and QEMU got that."""
    printed, props = src["qemu_args"], src["device_properties"]
    for bit in bits:
        prop = QEMU_PROPERTY[bit]
        assert f"{prop}=off" in printed, f"kvhost qemu-args left {bit} on: {printed}"
        assert props.get(prop) == "off", f"QEMU did not get {prop}=off: {props}"


@crosskernel
def test_case1_native_unpinned_fails_as_compat_predicted(report: dict[str, Any]) -> None:
    _assert_refused(report, "native-unpinned")


@crosskernel
def test_case2_native_pinned_with_qemu_args_migrates(report: dict[str, Any]) -> None:
    src, _ = _sides(report, "native-pinned")
    _qemu_args_switch_off(src, ("RING_RESET",))
    _assert_migrated(report, "native-pinned")


@crosskernel
def test_case3_shim_unpinned_fails_as_compat_predicted(report: dict[str, Any]) -> None:
    src, dst = _sides(report, "shim-unpinned")
    assert src["shim_version"] == report["source"]["manifest"]["latest"], src["shim_version"]
    assert dst["shim_version"] == report["destination"]["manifest"]["latest"], dst["shim_version"]
    _assert_refused(report, "shim-unpinned")


@crosskernel
def test_case4_shim_pinned_migrates(report: dict[str, Any]) -> None:
    pin = report["plan"]["pin"]
    src, dst = _sides(report, "shim-pinned")
    assert src["shim_version"] == pin and dst["shim_version"] == pin, (
        f"shims served {src['shim_version']} and {dst['shim_version']}, not {pin}"
    )
    _assert_migrated(report, "shim-pinned")


@crosskernel
def test_case6_qemu10_native_unpinned_shows_uso_and_ring_reset_and_fails(
    report: dict[str, Any]
) -> None:
    src, dst = _sides(report, "native10-unpinned")
    for side in (src, dst):
        assert side["qemu_version"].startswith("10.0."), side["qemu_version"]
    offered = int(src["device_features"], 16)
    assert offered & USO_AND_RING_RESET == USO_AND_RING_RESET, (
        f"QEMU 10.0 on 6.12 offered {offered:#x}, without "
        f"{fb.names(USO_AND_RING_RESET & ~offered)}"
    )
    _assert_refused(report, "native10-unpinned")
    assert "Failed to load virtio-net:virtio" in dst["qemu_stderr"], dst["qemu_stderr"]


@crosskernel
def test_case7_qemu10_native_pinned_with_qemu_args_migrates(report: dict[str, Any]) -> None:
    src, dst = _sides(report, "native10-pinned")
    for side in (src, dst):
        assert side["qemu_version"].startswith("10.0."), side["qemu_version"]
    # 10.0's line for the compat version also switches off the USO bits 7.2 cannot offer
    _qemu_args_switch_off(src, ck.QEMU10_REFUSED)
    assert dst["qemu_args"] == src["qemu_args"], (src["qemu_args"], dst["qemu_args"])
    _assert_migrated(report, "native10-pinned")


@crosskernel
def test_case5_manifests_differ_and_the_list_only_grows(report: dict[str, Any]) -> None:
    src_raw = report["source"]["manifest"]
    dst_raw = report["destination"]["manifest"]
    assert src_raw and dst_raw, "a phase wrote no manifest"
    src, dst = mf.load(src_raw, "6.12 manifest"), mf.load(dst_raw, "6.1 manifest")
    assert src.kernel_release.startswith("6.12.") and dst.kernel_release.startswith("6.1.")
    assert src.latest.label != dst.latest.label, f"both latest {src.latest.label}"
    for v in dst.supported:
        assert any(v.same_interface(w) for w in src.supported), (
            f"6.12 does not support {v.label}, which 6.1 does"
        )
    assert len(src.supported) > len(dst.supported)
    assert int(src_raw["probe"]["vhost_net"]["features"], 16) & RING_RESET
    assert not int(dst_raw["probe"]["vhost_net"]["features"], 16) & RING_RESET


@crosskernel
def test_report_verdicts_agree_and_both_boots_succeeded(report: dict[str, Any]) -> None:
    assert ck.passed(report), ck.format_report(report)
    assert report["boots"], "no boots.json: the two boots were not run by run_scenario"
    for phase, boot in report["boots"].items():
        assert boot["exit"] == 0, f"{phase} VM exited {boot['exit']}"


# --- the same story through libvirt: virsh save on 6.12, virsh restore on 6.1 (issue 15) ----


def _libvirt(report: dict[str, Any], name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    part = report.get("libvirt") or {}
    sides = (part.get("domains") or {}).get(name) or {}
    src, dst = sides.get("source"), sides.get("destination")
    assert src is not None, f"{name}: the 6.12 libvirt part wrote no result: {part.get('source')}"
    assert dst is not None, (
        f"{name}: the 6.1 libvirt part wrote no result: {part.get('destination')}")
    for side, r in (("6.12", src), ("6.1", dst)):
        assert r["error"] is None, f"{name} on {side}: {r['error']}\n{r.get('traceback')}"
    assert src["kernel"].startswith("6.12.") and dst["kernel"].startswith("6.1.")
    assert src["frames_before"] == {"tx": True, "rx": True}
    assert src["image_bytes"], f"{name}: virsh save wrote an empty image"
    assert src["left_after_save"] == [], f"{name}: left after virsh save"
    return src, dst


def _assert_refused_by_the_hook(report: dict[str, Any], name: str) -> str:
    """virsh restore on 6.1 of a domain stamped with 6.12's latest: the hook refuses at
    restore begin with one line, virsh exits non-zero, nothing was started or left."""
    src, dst = _libvirt(report, name)
    latest = report["source"]["manifest"]["latest"]
    assert src["recorded"] == latest, f"{name}: stamped {src['recorded']}, not {latest}"
    assert int(src["driver_features"], 16) & RING_RESET, (
        f"{name}: the guest on 6.12 did not negotiate RING_RESET; nothing to refuse")
    line = str(dst["refusal"])
    assert dst["restored"] is False and dst["restore_exit"] not in (None, 0), dst
    assert "Hook script execution failed" in line and "restore begin" in line, line
    assert f"kvhost: VM {name} cannot be restored here: this host (kernel 6.1." in line, line
    assert f"cannot serve {latest}: missing feature bits" in line, line
    bits = ck.bits_named(line)
    assert "RING_RESET" in bits, f"{name}: the hook named {bits}: {line}"
    reasons = " ".join(_compat(report)["reasons"])
    for bit in bits:
        assert bit in reasons, f"{name}: the hook refused {bit}; kvhost compat did not say so"
    assert dst["left_after_refusal"] == [], f"{name}: left behind after the refusal"
    return line


def _assert_restored(report: dict[str, Any], name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """virsh restore on 6.1 of a domain stamped with the pin: the guest goes on where it
    stopped on 6.12, and virsh destroy leaves nothing."""
    src, dst = _libvirt(report, name)
    pin = report["plan"]["pin"]
    assert _compat(report)["version"] == pin
    assert src["recorded"] == pin, f"{name}: stamped {src['recorded']}, not {pin}"
    assert not int(src["driver_features"], 16) & RING_RESET, f"{name}: negotiated RING_RESET"
    assert dst["restored"] is True, f"{name}: virsh restore failed: {dst['restore_stderr']}"
    assert dst["domstate"] == "running"
    saved, resumed = src["saved_used"], dst["resumed_used"]
    assert saved["tx"] >= 1 and resumed == saved, f"{name}: resumed at {resumed}, saved {saved}"
    assert dst["used_after_tx"] == saved["tx"] + 1
    assert dst["frames_after"] == {"tx": True, "rx": True}
    assert dst["device_features"] == src["device_features"], (
        f"{name}: the device changed: {src['device_features']} -> {dst['device_features']}")
    assert dst["left_after_destroy"] == [], f"{name}: left after virsh destroy"
    return src, dst


@crosskernel
def test_libvirt_vhostuser_latest_is_refused_at_restore_begin(report: dict[str, Any]) -> None:
    _assert_refused_by_the_hook(report, "kvl-user-latest")


@crosskernel
def test_libvirt_vhostuser_pinned_restores_on_61s_vhost_net(report: dict[str, Any]) -> None:
    pin = report["plan"]["pin"]
    src, dst = _assert_restored(report, "kvl-user-pin")
    for side, r in (("6.12", src), ("6.1", dst)):
        assert r["shim_version"] == pin and r["shim_cmdline_version"] == pin, (side, r)
        assert r["shim_tap"] == "kvlu-pin", f"{side}: the shim did not use the phase's tap"
    vhost = dst["vhost"]
    assert vhost["vhost_net_fds"] >= 1 and vhost["worker_tid"] is not None, (
        f"the restored shim does not drive 6.1's vhost-net: {vhost}")


@crosskernel
def test_libvirt_native_latest_is_refused_at_restore_begin(report: dict[str, Any]) -> None:
    _assert_refused_by_the_hook(report, "kvl-native-latest")


@crosskernel
def test_libvirt_native_pinned_restores_with_its_pinned_device(report: dict[str, Any]) -> None:
    # TCG: libvirt gives a type='qemu' domain QEMU's userspace virtio-net over the tap, so
    # this is about the guest-visible device; native-pinned above proves the vhost-net path
    src, dst = _assert_restored(report, "kvl-native-pin")
    assert src["device_json"]["queue_reset"] is False, src["device_json"]
    assert dst["device_json"] == src["device_json"], "QEMU's -device changed across restore"
    assert src["qom_queue_reset"] is False and dst["qom_queue_reset"] is False


# --- host tier: the pure helpers ------------------------------------------------------------


def test_parse_features_error_reads_qemu_line() -> None:
    text = ("qemu-system-x86_64: Features 0x10130bfffa7 unsupported. Allowed features: "
            "0x1f9bfffa7\nqemu-system-x86_64: Failed to load virtio-net:virtio\n")
    carried, allowed = ck.parse_features_error(text) or (0, 0)
    assert fb.names(carried & ~allowed) == ["RING_RESET"]
    assert ck.parse_features_error("load of migration failed: Invalid argument") is None


def test_predicted_latest_follows_the_registry_first_kernels() -> None:
    assert ck.predicted_latest("6.1.0-56-amd64").label == "org.kernel.vhost-net.v5"
    assert ck.predicted_latest("6.12.117+deb12-amd64").label == "org.kernel.vhost-net.v7"
    assert ck.predicted_latest("3.0").label == "org.kernel.vhost-net.v3"
    with pytest.raises(UsageError, match="no version"):
        ck.predicted_latest("2.6.32")
    with pytest.raises(UsageError, match="version number"):
        ck.predicted_latest("amd64")


def test_release_tuple_pads_and_orders() -> None:
    assert ck.release_tuple("6.2") == (6, 2, 0)
    assert ck.release_tuple("6.12.117+deb12-amd64") > ck.release_tuple("6.3")
    assert ck.release_tuple("2.6.36") < ck.release_tuple("3.0")


def test_evaluate_flags_an_unpinned_stream_that_loaded() -> None:
    """The verdict logic itself: a destination that loaded the unpinned stream is a failure."""
    src = {"error": None, "migration": {"status": "completed"},
           "driver_features": hex(RING_RESET | fb.bit("VERSION_1")),
           "device_features": hex(RING_RESET | fb.bit("VERSION_1"))}
    report = {
        "plan": {"pin": "org.kernel.vhost-net.v5"},
        "source": {"manifest": None},
        "destination": {"manifest": None, "compat": {"result": {
            "version": "org.kernel.vhost-net.v5",
            "reasons": ["a VM created at a's latest org.kernel.vhost-net.v7 cannot move to b: "
                        "missing feature bits RING_RESET, GUEST_USO4"]}}},
        "cases": {c.name: {"source": src, "destination": {"error": None, "loaded": True}}
                  for c in ck.CASES},
    }
    verdicts = ck.evaluate(report)
    assert any("loaded" in p for p in verdicts["native-unpinned"])
    assert verdicts["manifests"] == ["a manifest is missing"]


def test_bits_named_reads_the_hook_line() -> None:
    line = ("error: Hook script execution failed: internal error: Child process (LC_ALL=C "
            "/etc/libvirt/hooks/qemu.d/kvhost vm1 restore begin -) unexpected exit status 1: "
            "kvhost: VM vm1 cannot be restored here: this host (kernel 6.1.0-57-amd64) cannot "
            "serve org.kernel.vhost-net.v7: missing feature bits RING_RESET, GUEST_USO4")
    assert ck.bits_named(line) == ["RING_RESET", "GUEST_USO4"]
    assert ck.bits_named("error: Failed to restore domain") == []


def test_evaluate_flags_a_libvirt_restore_the_hook_let_through() -> None:
    src: dict[str, Any] = {"error": None, "kernel": "6.12.1", "recorded": "org.kernel.vhost-net.v7",
           "frames_before": {"tx": True, "rx": True}, "left_after_save": [],
           "driver_features": hex(RING_RESET)}
    dst = {"error": None, "kernel": "6.1.1", "restored": True, "restore_exit": 0}
    report = {"plan": {"pin": "org.kernel.vhost-net.v5"},
              "source": {"manifest": {"latest": "org.kernel.vhost-net.v7"}},
              "destination": {"compat": None},
              "libvirt": {"domains": {"kvl-user-latest": {"source": src, "destination": dst}}}}
    problems = ckl.evaluate(report)["libvirt kvl-user-latest"]
    assert any("did not refuse" in p for p in problems), problems
    assert ckl.evaluate(report)["libvirt kvl-user-pin"] == [
        "the source part wrote no result (None)", "the destination part wrote no result (None)"]


def test_every_crosskernel_test_carries_the_long_timeout() -> None:
    tests = [f for name, f in globals().items() if name.startswith("test_") and callable(f)]
    marks = {f.__name__: {m.name: m.args for m in getattr(f, "pytestmark", [])} for f in tests}
    cross = {name: m for name, m in marks.items() if "crosskernel" in m}
    assert cross, "no crosskernel test found: the marker lookup is broken"
    for name, m in cross.items():
        assert m.get("timeout") == (CROSSKERNEL_TIMEOUT,), (name, m)


V5 = "org.kernel.vhost-net.v5"
COMPAT_V5 = {"exit": 0, "result": {"version": V5, "reasons": [
    "a VM created at a's latest org.kernel.vhost-net.v7 cannot move to b: missing feature "
    "bits RING_RESET, GUEST_USO4, GUEST_USO6, HOST_USO"]}}


def _one_case_report(name: str, src: dict[str, Any], dst: dict[str, Any]) -> dict[str, Any]:
    return {"plan": {"pin": V5, "cases": [name]}, "source": {"manifest": None},
            "destination": {"manifest": None, "compat": COMPAT_V5},
            "cases": {name: {"source": src, "destination": dst}}}


def test_evaluate_wants_every_bit_the_case_names_refused() -> None:
    """QEMU 10.0's unpinned case holds only when 6.1 refuses USO as well as RING_RESET."""
    negotiated = fb.mask(["VERSION_1", *ck.QEMU10_REFUSED])
    src = {"error": None, "migration": {"status": "completed"}, "log_during_copy": [True],
           "driver_features": hex(negotiated), "device_features": hex(negotiated)}
    allowed = fb.mask(["VERSION_1", "GUEST_USO4", "GUEST_USO6", "HOST_USO"])
    stderr = f"Features {negotiated:#x} unsupported. Allowed features: {allowed:#x}\n"
    dst = {"error": None, "loaded": False, "qemu_exit": 1, "qemu_stderr": stderr}
    verdict = ck.evaluate(_one_case_report("native10-unpinned", src, dst))["native10-unpinned"]
    assert verdict == [f"QEMU refused ['RING_RESET'], not all of {list(ck.QEMU10_REFUSED)}"]
    refused_all = stderr.replace(f"{allowed:#x}", f"{fb.bit('VERSION_1'):#x}")
    dst["qemu_stderr"] = refused_all
    assert ck.evaluate(_one_case_report("native10-unpinned", src, dst))[
        "native10-unpinned"] == []
    src["log_during_copy"] = [False]
    assert any("dirty log" in p for p in ck.evaluate(
        _one_case_report("native10-unpinned", src, dst))["native10-unpinned"])


def test_evaluate_wants_set_features_equal_to_the_negotiated_bits() -> None:
    negotiated = fb.mask(["VERSION_1", "MRG_RXBUF", "CSUM"])
    src = {"error": None, "migration": {"status": "completed"}, "log_during_copy": [True],
           "driver_features": hex(negotiated), "device_features": hex(negotiated),
           "saved_used": {"rx": 1, "tx": 1}}
    status = {"guest_features": hex(negotiated), "acked_features": hex(negotiated | fb.LOG_ALL),
              "backend_features": hex(negotiated | fb.LOG_ALL)}
    dst = {"error": None, "loaded": True, "qemu_exit": 0, "kernel": "6.1.0-56-amd64",
           "resumed_used": {"rx": 1, "tx": 1}, "used_after_tx": 2,
           "frames_after": {"tx": True, "rx": True}, "rarp_mac": ck.GUEST_MAC.hex(":"),
           "device_features": hex(negotiated), "vhost": {"vhost_net_fds": 1, "worker_tid": 7},
           "vhost_status": status}
    assert ck.evaluate(_one_case_report("native10-pinned", src, dst))["native10-pinned"] == []
    status["acked_features"] = hex(negotiated & ~fb.bit("MRG_RXBUF"))
    verdict = ck.evaluate(_one_case_report("native10-pinned", src, dst))["native10-pinned"]
    assert len(verdict) == 1 and "['MRG_RXBUF']" in verdict[0], verdict
