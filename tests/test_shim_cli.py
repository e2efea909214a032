"""``kvhost-shim``'s program conventions: ``--print-capabilities`` whatever else is on the
command line (QEMU's vhost-user.rst), ``--version``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvhost import __version__
from shim.cli import main


@pytest.mark.parametrize(
    "argv",
    [
        ["--print-capabilities"],
        # libvirt and QEMU's tools may pass it with the options they use to start a backend
        ["--socket-path", "/run/x.sock", "--print-capabilities", "--queues", "0"],
        ["--print-capabilities", "--no-such-option", "--fd", "not-a-number"],
        ["--fd", "3", "--socket-path", "/run/x.sock", "--print-capabilities"],  # exclusive pair
    ],
)
def test_print_capabilities_ignores_every_other_option(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == {"type": "net"} and err == ""


def test_without_print_capabilities_the_same_options_are_still_checked(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--no-such-option"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err


def test_version_as_a_program() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "shim.cli", "--version", "--socket-path", "/run/x.sock"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"kvhost-shim {__version__}\n"
