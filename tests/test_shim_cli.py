"""``kvhost-shim``'s program conventions: ``--print-capabilities`` whatever else is on the
command line (QEMU's vhost-user.rst), ``--version``, journald priority prefixes when stderr
is the journal, and socket activation (``LISTEN_FDS``, for real with
``systemd-socket-activate``)."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvhost import __version__
from kvhost.errors import UsageError
from kvhost.libvirt_hook import _listening
from shim import activation, eventlog
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


# --- socket activation (LISTEN_FDS) ---------------------------------------------------------


def test_listen_fds_meant_for_another_process_are_ignored_and_cleared() -> None:
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x", "OTHER": "kept"}
    assert activation.listen_fds(env, pid=4242) == range(0)
    assert env == {"OTHER": "kept"}  # nothing the shim runs inherits them
    assert activation.listen_fds({}, pid=4242) == range(0)


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"LISTEN_PID": "12x", "LISTEN_FDS": "1"}, "LISTEN_PID='12x' is not a process id"),
        ({"LISTEN_PID": "4242"}, "LISTEN_FDS=None is not a count of fds"),
        ({"LISTEN_PID": "4242", "LISTEN_FDS": "-1"}, "LISTEN_FDS='-1' is not a count of fds"),
        # far more fds than this process has open: one of them is not there
        ({"LISTEN_PID": "4242", "LISTEN_FDS": "60000"}, "is not open"),
    ],
)
def test_malformed_listen_variables_are_named(env: dict[str, str], fragment: str) -> None:
    with pytest.raises(UsageError, match=re.escape(fragment)):
        activation.listen_fds(env, pid=4242)
    assert "LISTEN_PID" not in env


def test_the_fd_option_must_be_the_passed_socket() -> None:
    activation.check_fd(5, range(0))  # inherited some other way: the server checks it
    activation.check_fd(3, range(3, 4))
    with pytest.raises(UsageError, match=r"--fd 4: systemd passed fd 3 \(LISTEN_FDS\); use --fd 3"):
        activation.check_fd(4, range(3, 4))
    with pytest.raises(UsageError, match="serve it with --fd 3 instead of --socket-path"):
        activation.check_fd(None, range(3, 4))
    with pytest.raises(UsageError, match=r"fds 3-4 .* a single ListenStream="):
        activation.check_fd(3, range(3, 5))


def socket_activated(
    tmp_path: Path, argv: list[str], name: str = "vm-1"
) -> tuple[int, str, str]:
    """``kvhost-shim ARGV`` under systemd-socket-activate, as a socket unit starts it:
    systemd-socket-activate listens on ``tmp_path/NAME.sock`` and execs the shim (fd 3)
    when the first client connects. Returns (exit status, stderr, socket path)."""
    path = tmp_path / f"{name}.sock"
    proc = subprocess.Popen(
        ["systemd-socket-activate", "--listen", str(path), "-E", "PYTHONPATH",
         "--", sys.executable, "-m", "shim.cli", *argv],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not _listening(str(path)):
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "systemd-socket-activate did not listen"
            time.sleep(0.02)
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(path))  # the shim is not even running yet
            _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err, str(path)


def test_under_socket_activation_socket_path_is_refused(tmp_path: Path) -> None:
    rc, err, _ = socket_activated(tmp_path, ["--socket-path", str(tmp_path / "vm-1.sock")])
    assert rc == 2
    assert err.splitlines()[-1] == (
        "kvhost-shim: systemd passed a listening socket (fd 3, LISTEN_FDS): serve it with "
        "--fd 3 instead of --socket-path, or the shim would replace it"
    )
    rc, err, _ = socket_activated(tmp_path, ["--fd", "4"], name="vm-2")
    assert rc == 2 and err.splitlines()[-1].endswith("--fd 4: systemd passed fd 3 (LISTEN_FDS); "
                                                     "use --fd 3")  # fmt: skip


def test_under_socket_activation_fd_3_is_taken_and_named_in_the_log(tmp_path: Path) -> None:
    """Past the LISTEN_FDS checks, to the first error that needs no kernel: the JSON line
    names the socket systemd made. (Serving a connection needs /dev/vhost-net: the kernel
    tier's test_kernel_socket_activation.)"""
    rc, err, path = socket_activated(
        tmp_path, ["--fd", "3", "--allow-uid", "no-such-user-kvtest", "--log-format", "json"]
    )
    assert rc == 2, err
    obj = json.loads(err.splitlines()[-1])
    assert obj["socket"] == path
    assert "--allow-uid no-such-user-kvtest: no such user" in obj["message"]


# --- readiness (sd_notify) ------------------------------------------------------------------


def test_ready_is_sent_to_the_notify_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(path)
        manager.settimeout(5)
        assert activation.notify_ready({"NOTIFY_SOCKET": path}) is None
        assert manager.recv(100) == b"READY=1"
        abstract = f"kvtest-notify-{os.getpid()}"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager2:
            manager2.bind("\0" + abstract)
            manager2.settimeout(5)
            assert activation.notify_ready({"NOTIFY_SOCKET": "@" + abstract}) is None
            assert manager2.recv(100) == b"READY=1"


def test_readiness_is_not_sent_unless_asked_and_failures_are_named(tmp_path: Path) -> None:
    assert activation.notify_ready({}) is None
    assert activation.notify_ready({"NOTIFY_SOCKET": ""}) is None
    why = activation.notify_ready({"NOTIFY_SOCKET": "vsock:2:1"})
    assert why == "NOTIFY_SOCKET='vsock:2:1' is not a unix socket path; readiness not sent"
    gone = str(tmp_path / "no-manager")
    why = activation.notify_ready({"NOTIFY_SOCKET": gone})
    assert why == f"cannot notify the service manager at {gone!r}: No such file or directory"
