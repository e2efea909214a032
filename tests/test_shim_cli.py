"""``kvhost-shim``'s program conventions: ``--print-capabilities`` whatever else is on the
command line (QEMU's vhost-user.rst), ``--version``, journald priority prefixes when stderr
is the journal."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvhost import __version__
from shim import eventlog
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


# --- journald priority prefixes -------------------------------------------------------------


def journal_env(path: Path) -> dict[str, str]:
    """JOURNAL_STREAM as systemd sets it for a service whose stderr is ``path``."""
    st = os.stat(path)
    return {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}


def run_shim(argv: list[str], stderr: Path, env: dict[str, str]) -> int:
    with open(stderr, "w") as err:
        done = subprocess.run(
            [sys.executable, "-m", "shim.cli", *argv],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=env,
            timeout=60, check=False,
        )  # fmt: skip
    return done.returncode


def test_error_lines_carry_priority_3_when_stderr_is_the_journal(tmp_path: Path) -> None:
    log = tmp_path / "stderr"
    log.touch()
    # a usage error: logged through the event log before anything touches the kernel
    assert run_shim(["--log-format", "json", "--queues", "1"], log, journal_env(log)) == 2
    (line,) = log.read_text().splitlines()
    assert line.startswith("<3>{"), line
    obj = json.loads(line.removeprefix("<3>"))
    assert obj["level"] == "error" and "give --socket-path PATH or --fd N" in obj["message"]
    assert run_shim(["--queues", "1"], log, journal_env(log)) == 2  # text lines too
    assert log.read_text().startswith("<3>kvhost-shim: give --socket-path PATH or --fd N")


@pytest.mark.parametrize("value", ["other", "12:", ":34", "x:y", "1:2:3"])
def test_no_prefix_unless_journal_stream_names_stderr_itself(tmp_path: Path, value: str) -> None:
    log, elsewhere = tmp_path / "stderr", tmp_path / "journal"
    log.touch()
    elsewhere.touch()
    # inherited from a service, but this stderr was redirected: another inode
    env = journal_env(elsewhere) if value == "other" else {**os.environ, "JOURNAL_STREAM": value}
    assert run_shim(["--log-format", "json"], log, env) == 2
    (line,) = log.read_text().splitlines()
    assert json.loads(line)["level"] == "error"


def test_every_level_gets_its_syslog_priority(tmp_path: Path) -> None:
    path = tmp_path / "stderr"
    with open(path, "w") as stream:
        st = os.fstat(stream.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert eventlog.is_journal(stream, env)
        assert not eventlog.is_journal(io.StringIO(), env)  # no fd at all
        formatter = eventlog.EventFormatter("json", journal=True)
        for level, prio in [
            (logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4),
            (logging.INFO, 6), (logging.DEBUG, 7),
        ]:  # fmt: skip
            record = logging.LogRecord("kvhost.shim", level, __file__, 1, "m", None, None)
            line = formatter.format(record)
            assert line.startswith(f"<{prio}>{{") and json.loads(line[3:])["message"] == "m"
        plain = eventlog.EventFormatter("json").format(record)
        assert plain.startswith("{")
