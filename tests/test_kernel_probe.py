"""Kernel tier: `kvhost probe` agrees with raw ioctls on the running kernel."""

from __future__ import annotations

import fcntl
import json
import os
import struct
from pathlib import Path

import pytest

from kvhost import abi
from kvhost.cli import main
from kvhost.probe import Probe, probe
from kvhost.tap import Tap, probe_offloads

pytestmark = pytest.mark.kernel


def _raw_u64(path: str, number: int) -> int:
    fd = os.open(path, os.O_RDWR)
    try:
        buf = bytearray(8)
        fcntl.ioctl(fd, number, buf, True)
        return int(struct.unpack("=Q", buf)[0])
    finally:
        os.close(fd)


def test_probe_matches_raw_ioctls(netns: str, fd_leak_check: None) -> None:
    p = probe()
    assert p.vhost_net is not None, p.vhost_net_error
    raw = _raw_u64("/dev/vhost-net", abi.VHOST_GET_FEATURES.number)
    assert p.vhost_net.features & 0xFFFF_FFFF_FFFF_FFFF == raw
    if not p.vhost_net.features_array:
        assert p.vhost_net.features == raw
    assert p.vhost_net.backend_features == _raw_u64(
        "/dev/vhost-net", abi.VHOST_GET_BACKEND_FEATURES.number
    )
    assert p.tun is not None and p.tun_error is None
    fd = os.open("/dev/net/tun", os.O_RDWR)
    try:
        buf = bytearray(4)
        fcntl.ioctl(fd, abi.TUNGETFEATURES.number, buf, True)
    finally:
        os.close(fd)
    assert p.tun.features == struct.unpack("=I", buf)[0]
    with Tap.create() as tap:
        assert p.tun.offloads == probe_offloads(tap)
    assert p.max_mem_regions == int(
        Path("/sys/module/vhost/parameters/max_mem_regions").read_text()
    )
    assert p.devices["/dev/vhost-net"].opens
    assert p.devices["/dev/net/tun"].opens
    assert p.kernel_release == os.uname().release
    if p.kernel_release.startswith("6.1."):
        # reference section 8: Debian 6.1 offers 0x33d008000, no FEATURES_ARRAY, no fork ioctl
        assert (p.vhost_net.features, p.vhost_net.features_array) == (0x33D008000, False)
        assert p.vhost_net.fork_owner is False
        assert p.vhost_net.backend_features == 0x2


def test_cli_probe_human_and_json(netns: str, capsys: pytest.CaptureFixture[str]) -> None:
    # in-process: a Python start under TCG costs ~25 s (the subprocess path is host-tested)
    assert main(["probe"]) == 0
    text = capsys.readouterr()
    assert text.err == ""
    raw = _raw_u64("/dev/vhost-net", abi.VHOST_GET_FEATURES.number)
    assert f"0x{raw:x}" in text.out
    assert "MRG_RXBUF" in text.out and "VERSION_1" in text.out
    assert main(["probe", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert int(data["vhost_net"]["features"], 16) & 0xFFFF_FFFF_FFFF_FFFF == raw
    assert Probe.from_json(data).to_json() == data
    assert Probe.from_json(data) == probe()
