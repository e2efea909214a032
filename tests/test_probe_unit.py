"""Host tier: the probe's JSON shape, its rendering, and its error sentences.

The CLI error path runs for real here: this host tier runs on machines without
/dev/vhost-net (the kernel tier covers the happy path inside the test VM).
"""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvhost.errors import DeviceUnavailable
from kvhost.probe import (
    DeviceInfo,
    Probe,
    TunInfo,
    VhostNetInfo,
    format_text,
    probe_vhost_net,
    unavailable_sentence,
)

# 6.17+: word0 0x10b3d008000, word1 0xa (GUEST/HOST_UDP_TUNNEL_GSO, bits 65 and 67)
WIDE = 0x10B3D008000 | (0xA << 64)

SAMPLE = Probe(
    kernel_release="6.17.0-test",
    vhost_net=VhostNetInfo(
        features=WIDE, features_array=True, backend_features=0x2, fork_owner=True
    ),
    vhost_net_error=None,
    tun=TunInfo(
        features=0x7173,
        offloads=("CSUM", "TSO4", "TSO6", "TSO_ECN", "UFO", "USO"),
        multi_queue=True,
        vnet_hdr=True,
    ),
    tun_error=None,
    max_mem_regions=64,
    devices={
        "/dev/vhost-net": DeviceInfo(True, True, None),
        "/dev/vhost-vsock": DeviceInfo(False, False, "missing: run 'modprobe vhost_vsock'"),
    },
)

GOLDEN = {
    "schema": 1,
    "kernel_release": "6.17.0-test",
    "vhost_net": {
        "features": "0xa0000010b3d008000",
        "feature_names": [
            "MRG_RXBUF",
            "NOTIFY_ON_EMPTY",
            "LOG_ALL",
            "ANY_LAYOUT",
            "INDIRECT_DESC",
            "EVENT_IDX",
            "VERSION_1",
            "ACCESS_PLATFORM",
            "IN_ORDER",
            "RING_RESET",
            "GUEST_UDP_TUNNEL_GSO",
            "HOST_UDP_TUNNEL_GSO",
        ],
        "features_array": True,
        "backend_features": "0x2",
        "backend_feature_names": ["IOTLB_MSG_V2"],
        "fork_owner": True,
    },
    "vhost_net_error": None,
    "tun": {
        "features": "0x7173",
        "feature_names": [
            "TUN",
            "TAP",
            "NAPI",
            "NAPI_FRAGS",
            "NO_CARRIER",
            "MULTI_QUEUE",
            "NO_PI",
            "ONE_QUEUE",
            "VNET_HDR",
        ],
        "offloads": ["CSUM", "TSO4", "TSO6", "TSO_ECN", "UFO", "USO"],
        "offload_features": "0x1c0000000007f83",
        "multi_queue": True,
        "vnet_hdr": True,
    },
    "tun_error": None,
    "max_mem_regions": 64,
    "devices": {
        "/dev/vhost-net": {"exists": True, "opens": True, "error": None},
        "/dev/vhost-vsock": {
            "exists": False,
            "opens": False,
            "error": "missing: run 'modprobe vhost_vsock'",
        },
    },
}


def test_json_matches_golden_shape() -> None:
    assert SAMPLE.to_json() == GOLDEN


def test_json_round_trip_through_text() -> None:
    assert Probe.from_json(json.loads(json.dumps(SAMPLE.to_json()))) == SAMPLE


def test_round_trip_of_an_unavailable_host() -> None:
    p = Probe("6.1.0", None, "no vhost-net", None, "no tun", 64, {})
    data = p.to_json()
    assert data["vhost_net"] is None and data["tun"] is None
    assert Probe.from_json(data) == p


def test_from_json_ignores_unknown_and_derived_fields() -> None:
    data = json.loads(json.dumps(GOLDEN))
    data["added_in_a_later_schema"] = {"x": 1}
    data["vhost_net"]["feature_names"] = ["nonsense"]
    assert Probe.from_json(data) == SAMPLE


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("kernel_release",), None, r"probe\.kernel_release: missing"),
        (("vhost_net", "features"), 12, r"probe\.vhost_net\.features: expected a hex string"),
        (("vhost_net", "features"), "0xzz", r"probe\.vhost_net\.features: expected a hex"),
        (("vhost_net", "fork_owner"), "yes", r"probe\.vhost_net\.fork_owner: expected true"),
        (("tun", "offloads"), ["CSUM", "TURBO"], r"probe\.tun\.offloads: expected a list"),
        (("max_mem_regions",), True, r"probe\.max_mem_regions: expected an integer"),
        (("schema",), 0, r"schema 0 is not"),
    ],
)
def test_from_json_names_the_bad_field(path: tuple[str, ...], value: object, message: str) -> None:
    data = json.loads(json.dumps(GOLDEN))
    target = data
    for key in path[:-1]:
        target = target[key]
    if value is None:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    with pytest.raises(ValueError, match=message):
        Probe.from_json(data)


def test_from_json_rejects_non_objects() -> None:
    with pytest.raises(ValueError, match="expected a JSON object"):
        Probe.from_json([])  # type: ignore[arg-type]


def test_text_rendering() -> None:
    text = format_text(SAMPLE)
    lines = text.splitlines()
    assert lines[0].split() == ["kernel", "6.17.0-test"]
    assert "0xa0000010b3d008000 (GET_FEATURES_ARRAY, 128 bits)" in text
    # names of bits above 63 are shown, not just the hex
    assert "GUEST_UDP_TUNNEL_GSO" in text and "HOST_UDP_TUNNEL_GSO" in text
    assert "0x2 IOTLB_MSG_V2" in text
    assert "fork owner        supported" in text
    assert "tap offloads      CSUM TSO4 TSO6 TSO_ECN UFO USO" in text
    assert "max mem regions   64" in text
    assert "/dev/vhost-vsock  missing" in text
    assert all(len(line) <= 100 for line in lines)


def test_text_rendering_of_old_kernel() -> None:
    old = Probe(
        "4.14",
        VhostNetInfo(0x33D008000, False, None, False),
        None,
        TunInfo(0x7173, (), True, True),
        "cannot probe tap offloads, which needs a temporary tap: EPERM",
        64,
        {},
    )
    text = format_text(old)
    assert "0x33d008000 (GET_FEATURES, 64 bits)" in text
    assert "none (VHOST_GET_BACKEND_FEATURES absent)" in text
    assert "not supported" in text
    assert "cannot probe tap offloads" in text


@pytest.mark.parametrize(
    ("err", "expected"),
    [
        (errno.EACCES, "no permission to open /dev/vhost-net: run as root"),
        (errno.EPERM, "no permission to open /dev/vhost-net"),
        (errno.EIO, "/dev/vhost-net is not usable: open on /dev/vhost-net failed: EIO"),
    ],
)
def test_unavailable_sentences(err: int, expected: str) -> None:
    sentence = unavailable_sentence(
        "/dev/vhost-net", DeviceUnavailable("open", "/dev/vhost-net", err)
    )
    assert sentence.startswith(expected)
    assert "\n" not in sentence


def test_missing_device_names_the_module(tmp_path: Path) -> None:
    with pytest.raises(DeviceUnavailable) as info:
        probe_vhost_net(str(tmp_path / "vhost-net"))
    assert info.value.errno == errno.ENOENT
    sentence = unavailable_sentence("/dev/vhost-net", info.value)
    if not Path("/sys/module/vhost_net").exists():
        assert "module is not loaded: run 'modprobe vhost_net' as root" in sentence
    else:
        assert "does not exist although the vhost_net module is loaded" in sentence


@pytest.mark.skipif(
    Path("/dev/vhost-net").exists(), reason="the error path needs a host without /dev/vhost-net"
)
@pytest.mark.parametrize("as_json", [False, True])
def test_cli_without_vhost_net_says_one_sentence(netns: str, as_json: bool) -> None:
    # inside the fresh namespace, the probe's temporary tap never touches the host's links
    cmd = [sys.executable, "-m", "kvhost.cli", "probe", *(["--json"] if as_json else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    err_lines = proc.stderr.strip().splitlines()
    assert len(err_lines) == 1
    assert err_lines[0].startswith("kvhost probe: /dev/vhost-net ")
    assert "modprobe vhost_net" in err_lines[0] or "udevadm" in err_lines[0]
    if as_json:
        data = json.loads(proc.stdout)
        assert data["vhost_net"] is None
        assert err_lines[0] == f"kvhost probe: {data['vhost_net_error']}"
        assert data["devices"]["/dev/vhost-net"] == {
            "exists": False,
            "opens": False,
            "error": data["vhost_net_error"],
        }
        assert Probe.from_json(data).vhost_net is None
    else:
        assert proc.stdout == ""
