"""The installed udev rule, evaluated by udev itself (``udevadm test``) on this host's tun
device, both ways: with ``/run/systemd/system`` present (systemd is init) the device is
tagged for systemd and wants kvhost-manifest.service, and nothing is RUN; without it, udev
RUNs the manifest command.

``udevadm test`` reads rules only from the system directories and may touch /dev and
/run, so each run happens in a private mount namespace (``unshare --mount``) with the rule
bound over /etc/udev/rules.d and fresh tmpfs on /run and /dev: nothing of the host changes.
No program is run (``udevadm test`` only lists RUN entries).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvhost import manifest as mf
from kvhost.commands import versions as cmd

TUN = Path("/sys/class/misc/tun")

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root (a private mount namespace for udevadm test)"
)


def udevadm_test(rules_dir: Path, *, systemd: bool) -> str:
    """Properties and RUN lines udev computes for an add event on tun with ``rules_dir``
    as /etc/udev/rules.d (and no other local rules)."""
    assert TUN.exists(), "this host has no tun misc device (modprobe tun)"
    assert shutil.which("udevadm") and shutil.which("unshare")
    script = (
        "set -e; mount --make-rprivate /; "
        f"mount --bind {rules_dir} /etc/udev/rules.d; "
        "mount -t tmpfs tmpfs /run; mount -t tmpfs tmpfs /dev; "
        + ("mkdir -p /run/systemd/system; " if systemd else "")
        + f"udevadm test --action=add {TUN}"
    )
    done = subprocess.run(["unshare", "--mount", "sh", "-c", script], capture_output=True,
                          text=True, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    d = tmp_path / "rules.d"
    d.mkdir()
    rule = cmd.render_rule([sys.executable, "-m", "kvhost.cli"], str(mf.DEFAULT_PATH))
    (d / cmd.RULES_NAME).write_text(rule)
    return d


def test_under_systemd_udev_pulls_in_the_unit_and_runs_nothing(rules_dir: Path) -> None:
    out = udevadm_test(rules_dir, systemd=True)
    lines = out.splitlines()
    assert f"SYSTEMD_WANTS={cmd.MANIFEST_UNIT}" in lines
    assert any(line.startswith("TAGS=") and ":systemd:" in line for line in lines), out
    assert not [line for line in lines if line.startswith("run:") and "kvhost" in line]


def test_without_systemd_udev_runs_the_manifest_command(rules_dir: Path) -> None:
    out = udevadm_test(rules_dir, systemd=False)
    lines = out.splitlines()
    want = f"run: '{sys.executable} -m kvhost.cli manifest --output {mf.DEFAULT_PATH} --kmsg'"
    assert want in lines, out
    assert not [line for line in lines if line.startswith("SYSTEMD_WANTS=")]
