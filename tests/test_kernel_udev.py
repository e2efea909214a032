"""Kernel tier: the udev rule with the real systemd-udevd inside the test VM, and the
manifest ``kvhost install-host`` writes at once.

systemd is not init in the test VM, so udev takes the rule's other branch and RUNs the
manifest command itself (tests/test_udev_rule.py checks both branches with udevadm test).
The flow: install the rule (``kvhost install-udev``) into /run/udev/rules.d; an add event for
vhost-net writes the manifest before ``udevadm settle`` returns; then the probe breaks for
real -- vhost_net is unloaded, so /dev/vhost-net is gone -- and loading tun again (plus an
explicit add trigger on it) runs the rule again: the previous manifest must stay
byte-for-byte and the kernel log must say why; finally ``modprobe vhost_net`` (a genuine
add event) writes a fresh manifest.
"""

from __future__ import annotations

import errno
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvhost import manifest as mf
from kvhost import versions as ver
from kvhost.cli import main
from kvhost.commands.versions import RULES_NAME
from kvhost.probe import probe

pytestmark = pytest.mark.kernel

RULES_DIR = Path("/run/udev/rules.d")
UDEVD = "/lib/systemd/systemd-udevd"


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=180, check=False)
    if check and done.returncode:
        raise AssertionError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
    return done


def kmsg_lines() -> list[str]:
    """Every message in the kernel log buffer (one record per read of /dev/kmsg)."""
    out = []
    fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    try:
        while True:
            try:
                rec = os.read(fd, 8192)
            except OSError as err:
                if err.errno == errno.EAGAIN:
                    break
                if err.errno == errno.EPIPE:  # overwritten record: skip it
                    continue
                raise
            out.append(rec.decode(errors="replace").split(";", 1)[1].rstrip("\n"))
    finally:
        os.close(fd)
    return out


@pytest.fixture
def udevd() -> Iterator[None]:
    started = sh("udevadm", "control", "--ping", "--timeout=2", check=False).returncode != 0
    if started:
        sh(UDEVD, "--daemon")
        deadline = time.monotonic() + 30
        while sh("udevadm", "control", "--ping", "--timeout=2", check=False).returncode:
            assert time.monotonic() < deadline, "systemd-udevd did not start"
            time.sleep(0.2)
    yield
    if started:
        sh("udevadm", "control", "--exit", check=False)


@pytest.fixture
def manifest_path() -> Iterator[Path]:
    d = Path("/run") / f"kvtest-udev-{os.getpid()}"
    yield d / "vhost-net.json"
    if d.exists():
        for child in d.iterdir():
            child.unlink()
        d.rmdir()


def settle() -> None:
    # udevadm 252 sometimes loses its control connection to a busy udevd ("Failed to wait
    # for daemon to reply: Broken pipe") under TCG; only a 0 exit means the queue is empty.
    for _ in range(5):
        done = sh("udevadm", "settle", "--timeout=120", check=False)
        if done.returncode == 0:
            return
        assert "Broken pipe" in done.stderr, done.stderr
        time.sleep(0.5)
    raise AssertionError(f"udevadm settle kept failing: {done.stderr.strip()}")


def trigger(sysname: str) -> None:
    sh("udevadm", "trigger", "--action=add", f"--sysname-match={sysname}")
    settle()


def test_udev_writes_the_manifest_and_keeps_it_when_the_probe_breaks(
    udevd: None, manifest_path: Path, tmp_path: Path
) -> None:
    expected = ver.latest(ver.host_offer(probe())).name
    assert (
        main(
            [
                "install-udev",
                "--rules-dir",
                str(RULES_DIR),
                "--unit-dir",  # kvhost-manifest.service: unused here, systemd is not init
                str(tmp_path),
                "--manifest",
                str(manifest_path),
                "--reload",
            ]
        )
        == 0
    )
    try:
        # 1. an add event for vhost-net writes the manifest within settle
        trigger("vhost-net")
        first = mf.read(manifest_path)
        assert first.latest.name == expected
        before = manifest_path.read_bytes()
        assert any(
            f"kvhost: wrote {manifest_path}: kernel {os.uname().release}" in line
            for line in kmsg_lines()
        )

        # 2. a real broken probe: vhost-net gone, the tun add event runs the rule again
        sh("modprobe", "-r", "vhost_net")
        settle()
        assert not Path("/dev/vhost-net").exists()
        # unloading vhost_net also unloads tun (its dependency); loading tun back is a
        # real add event for the tun misc device, and the explicit trigger makes sure
        sh("modprobe", "tun")
        trigger("tun")
        assert Path("/dev/net/tun").exists()
        assert manifest_path.read_bytes() == before
        assert os.listdir(manifest_path.parent) == [manifest_path.name]
        why = [
            line for line in kmsg_lines() if f"kvhost: manifest {manifest_path} not updated" in line
        ]
        assert why, "the failed run logged nothing to the kernel log"
        assert "vhost_net kernel module is not loaded" in why[-1]

        # 3. loading the module is an add event: a fresh manifest appears
        sh("modprobe", "vhost_net")
        settle()
        again = mf.read(manifest_path)
        assert again.generated_at > first.generated_at
        assert again.latest.name == expected
    finally:
        sh("modprobe", "vhost_net", check=False)
        (RULES_DIR / RULES_NAME).unlink(missing_ok=True)
        sh("udevadm", "control", "--reload", check=False)


def test_install_host_writes_the_manifest_at_once(manifest_path: Path) -> None:
    """No reboot and no device event needed: /dev/vhost-net is there, so install-host
    probes and writes the manifest itself (into the VM's throw-away /etc and /run)."""
    assert Path("/dev/vhost-net").exists()
    expected = ver.latest(ver.host_offer(probe())).name
    assert not manifest_path.exists()
    assert main(["install-host", "--no-reload", "--manifest", str(manifest_path)]) == 0
    assert mf.read(manifest_path).latest.name == expected
