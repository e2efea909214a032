"""Host tier, real binaries: ``kvhost qemu-args`` against Debian's QEMU 7.2 and QEMU 10.0 from
bookworm-backports (unpacked beside it by scripts/install-deps).

``-device virtio-net-pci,help`` and a stopped (``-S``) machine need no KVM and no vhost-net,
so these run on the host: the property sets each release really has, the pinning each
version gets from each, the refusals naming the property, and each QEMU accepting the line
and holding the pinned values on a tap peer. A missing QEMU 10.0 fails the test, saying how
to install it.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from harness.qemu.binaries import COMMON_MACHINE, QEMU_10, QEMU_72, label, release, require
from kvhost import features as fb
from kvhost import qemu_args
from kvhost import versions as ver
from kvhost.errors import VersionError

pytestmark = [pytest.mark.qemu]

BINARIES = [QEMU_72, QEMU_10]
IDS = ["qemu7.2", "qemu10.0"]
USO_AND_RESET = ("host_uso", "guest_uso4", "guest_uso6", "queue_reset")


def _props(binary: str) -> frozenset[str]:
    return qemu_args.available_properties(require(binary))


@pytest.mark.parametrize("binary", BINARIES, ids=IDS)
def test_each_binary_is_the_release_it_claims(binary: str) -> None:
    assert label(binary) == ("7.2" if binary == QEMU_72 else "10.0"), release(binary)


def test_properties_each_release_has() -> None:
    old, new = _props(QEMU_72), _props(QEMU_10)
    assert "queue_reset" in old and "queue_reset" in new  # added in 7.2
    assert not {"host_uso", "guest_uso4", "guest_uso6"} & old  # added in 8.1
    assert {"host_uso", "guest_uso4", "guest_uso6", "in_order"} <= new
    # the UDP-tunnel offloads came with 10.1's feature words beyond 64 bits
    assert not {"guest_tunnel", "host_tunnel"} & new
    assert old <= new, sorted(old - new)


@pytest.mark.parametrize("binary", BINARIES, ids=IDS)
@pytest.mark.parametrize("version", ver.registry(), ids=lambda v: v.label.rsplit(".", 1)[-1])
def test_every_version_is_pinned_or_refused_naming_the_property(
    binary: str, version: ver.InterfaceVersion
) -> None:
    available = _props(binary)
    lacking = [prop for prop, name in qemu_args.PROPERTY_BITS
               if version.features & fb.bit(name) and prop not in available]
    if lacking:
        with pytest.raises(VersionError) as err:
            qemu_args.device_properties(version, available)
        for prop in lacking:
            assert f"no {prop} property" in str(err.value), err.value
        return
    pinned = dict(p.split("=") for p in qemu_args.device_properties(version, available))
    for prop, name in qemu_args.PROPERTY_BITS:
        if prop in available:  # every bit this QEMU can express is pinned, on or off
            assert pinned[prop] == ("on" if version.features & fb.bit(name) else "off"), prop
        else:
            assert prop not in pinned
    assert pinned["tx_queue_size"] == "256"


def test_uso_and_ring_reset_are_pinned_off_on_10_for_v5() -> None:
    v5 = ver.parse("org.kernel.vhost-net.v5")
    new = qemu_args.device_properties(v5, _props(QEMU_10))
    assert {f"{p}=off" for p in USO_AND_RESET} <= set(new)
    old = qemu_args.device_properties(v5, _props(QEMU_72))
    assert "queue_reset=off" in old and not any(p.startswith("host_uso") for p in old)


def test_7_2_refuses_uso_versions_naming_host_uso() -> None:
    with pytest.raises(VersionError, match=r"HOST_USO \(no host_uso property\).*newest "
                       r"version it can pin is org\.kernel\.vhost-net\.v5"):
        qemu_args.device_properties(ver.parse("org.kernel.vhost-net.v7"), _props(QEMU_72))


def _qom(binary: str, device: str, names: list[str],
         machine: str = COMMON_MACHINE) -> dict[str, object]:
    """Start ``binary`` stopped (``-S``) on a tap peer in a private network namespace with
    ``-device device`` and read ``names`` back over QMP; AssertionError with QEMU's stderr
    when it refuses the line."""
    cmds: list[dict[str, object]] = [{"execute": "qmp_capabilities"}]
    cmds += [{"execute": "qom-get", "arguments": {"path": "/machine/peripheral/net0",
                                                  "property": n}} for n in names]
    cmds.append({"execute": "quit"})
    proc = subprocess.run(
        ["unshare", "--net", binary, "-nodefaults", "-display", "none", "-accel", "tcg",
         "-machine", machine, "-S", "-qmp", "stdio",
         "-netdev", "tap,id=n0,ifname=kvp0,script=no,downscript=no",
         "-device", f"virtio-net-pci,id=net0,netdev=n0,{device}"],
        input="".join(json.dumps(c) + "\n" for c in cmds), capture_output=True, text=True,
        timeout=120, check=False,
    )
    replies = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    answers = [r["return"] for r in replies if "return" in r][1:1 + len(names)]
    assert len(answers) == len(names), f"{binary} refused {device}: {proc.stderr.strip()}"
    return dict(zip(names, answers, strict=True))


@pytest.mark.parametrize("binary", BINARIES, ids=IDS)
def test_each_qemu_takes_its_pinned_line_on_a_tap(binary: str) -> None:
    v5 = ver.parse("org.kernel.vhost-net.v5")
    line = qemu_args.device_properties(v5, _props(binary))
    pinned = dict(p.split("=") for p in line)
    names = [n for n in pinned if n not in ("disable-modern",)]
    got = _qom(binary, ",".join(line), names)
    for name in names:
        want = pinned[name]
        value = got[name]
        shown = ("on" if value else "off") if isinstance(value, bool) else str(value)
        assert shown == want, f"{label(binary)}: {name} is {value!r}, pinned {want}"


def test_machine_type_pins_defaults_not_what_the_host_offers() -> None:
    # docs/qemu-releases.md: pc-q35-7.2 on 10.0 turns USO and the newer PCIe config bits
    # back to 7.2's defaults but leaves queue_reset on, so RING_RESET still follows the kernel
    names = ["host_uso", "guest_uso4", "queue_reset", "x-pcie-ext-tag", "x-pcie-err-unc-mask",
             "x-pcie-ari-nextfn-1"]
    old = _qom(QEMU_10, "mac=52:54:00:00:00:01", names, COMMON_MACHINE)
    new = _qom(QEMU_10, "mac=52:54:00:00:00:01", names, "pc-q35-10.0")
    assert old == {"host_uso": False, "guest_uso4": False, "queue_reset": True,
                   "x-pcie-ext-tag": False, "x-pcie-err-unc-mask": False,
                   "x-pcie-ari-nextfn-1": True}, old
    assert new == {"host_uso": True, "guest_uso4": True, "queue_reset": True,
                   "x-pcie-ext-tag": True, "x-pcie-err-unc-mask": True,
                   "x-pcie-ari-nextfn-1": False}, new


@pytest.mark.parametrize("binary", BINARIES, ids=IDS)
def test_each_qemu_lists_every_type_as_libvirts_probe_does(binary: str) -> None:
    # qom-list-types loads every module the build knows of. 10.0's packages here lack some
    # that 7.2's have, and 10.0 aborted on 7.2's until install-deps' wrapper hid them (as
    # root, which is how libvirt runs its probe in the tests)
    if os.geteuid() != 0:
        pytest.skip("install-deps' QEMU 10.0 wrapper hides 7.2's modules only as root")
    cmds = [{"execute": "qmp_capabilities"}, {"execute": "qom-list-types"}, {"execute": "quit"}]
    proc = subprocess.run(
        [require(binary), "-machine", "none", "-nodefaults", "-display", "none", "-qmp", "stdio"],
        input="".join(json.dumps(c) + "\n" for c in cmds), capture_output=True, text=True,
        timeout=120, check=False,
    )
    assert proc.returncode == 0, f"{binary} exited {proc.returncode}: {proc.stderr[-600:]}"
    replies = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    types = next(r["return"] for r in replies if isinstance(r.get("return"), list))
    assert "virtio-net-pci" in {t["name"] for t in types}
    assert "same build" not in proc.stderr, proc.stderr[-600:]
