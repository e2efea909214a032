"""Host tier: the tap side of kvhost-shim's start-up under ``--user`` (:func:`shim.cli.set_up`,
:meth:`TapSpec.prepare`, :func:`shim.cli.release_tap`) against this host's real
``/dev/net/tun``.

The taps live in network namespaces the tests create and do not enter, which is where the
shim stands with ``--netns`` until it enters the namespace just before dropping privileges.
No ``/dev/vhost-net`` is needed: nothing connects, the backends are the session tests'
recording ones. What the kernel says about a tap's owner and group is read independently
of kvhost, from sysfs inside the namespace (``ip netns exec`` mounts the namespace's own).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from peers import in_child
from test_session import V5, RecordingBackend

from harness import netns as testns
from kvhost import netns as kvnetns
from kvhost.errors import UsageError
from kvhost.tap import Tap
from shim.cli import build_parser, release_tap, set_up
from shim.privileges import Identity
from shim.server import ShimConfig
from shim.session import Backend

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (taps, namespaces)")

NOBODY = 65534
SHIM_USER = Identity(NOBODY, NOBODY, (NOBODY,))


def links(other_netns: str) -> list[str]:
    out = testns.run(["ip", "-n", other_netns, "-o", "link", "show"], "listing links").stdout
    return [line.split(": ")[1].split("@")[0] for line in out.splitlines()]


def owner_and_group(other_netns: str, tap: str) -> tuple[int | None, int | None]:
    """The tap's owner and group as the namespace's own sysfs shows them (-1: none)."""
    out = testns.run(
        ["ip", "netns", "exec", other_netns, "cat", f"/sys/class/net/{tap}/owner",
         f"/sys/class/net/{tap}/group"],
        "reading the tap's owner",
    ).stdout.split()  # fmt: skip
    owner, group = (int(v) for v in out)
    return (None if owner == -1 else owner), (None if group == -1 else group)


def attach_as_shim_user(other_netns: str, tap: str) -> dict[str, Any]:
    """Attach to ``tap`` from a child running as the shim's user inside ``other_netns``."""
    with kvnetns.inside(other_netns):
        result, _ = in_child(
            lambda w: Tap.open(tap).get_iff()[0], uid=NOBODY, gid=NOBODY, groups=(NOBODY,)
        )
    return result


def shim_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["--user", str(NOBODY), "--group", str(NOBODY), *argv])


def config(open_tap: Callable[[], Tap]) -> ShimConfig:
    def make_backend(name: str) -> Backend:
        return RecordingBackend()

    return ShimConfig(V5, make_backend, [V5])


def events(caplog: pytest.LogCaptureFixture, kind: str) -> list[dict[str, Any]]:
    out = []
    for record in caplog.records:
        fields = getattr(record, "kvhost_event", None)
        if isinstance(fields, dict) and fields["event"] == kind:
            out.append({**fields, "message": record.getMessage()})
    return out


def test_failed_listen_deletes_the_created_tap_in_its_namespace_and_says_why(
    other_netns: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The shim has not entered ``--netns`` yet when the socket fails: the tap it created
    there is deleted there, and the error raised is the socket's, not the clean-up's."""
    caplog.set_level(logging.INFO, "kvhost.shim")
    sock = f"/run/kvhost-no-such-dir-{os.getpid()}/vm.sock"
    with pytest.raises(UsageError) as err:
        set_up(shim_args("--socket-path", sock, "--netns", other_netns), config, SHIM_USER, None)
    assert str(err.value) == f"cannot listen on {sock}: No such file or directory"
    (made,) = events(caplog, "tap")[:1]
    tap = made["tap"]
    assert f"in network namespace {other_netns}" in made["message"]
    assert [e["message"] for e in events(caplog, "tap")[1:]] == [f"tap {tap} removed"]
    assert not events(caplog, "error")
    assert links(other_netns) == ["lo"]


def test_a_failed_release_is_logged_not_raised(
    other_netns: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "kvhost.shim")
    program = set_up(
        shim_args("--socket-path", str(tmp_path / "vm.sock"), "--netns", other_netns),
        config,
        SHIM_USER,
        None,
    )
    program.server.close()
    assert program.tap is not None
    testns.run(["ip", "-n", other_netns, "link", "del", program.tap.name], "deleting the tap")
    release_tap(program.tap)  # the tap is gone: says so, raises nothing
    (error,) = events(caplog, "error")
    assert error["message"].startswith(f"tap {program.tap.name} could not be released: ")
    assert f"no network interface named {program.tap.name!r}" in error["message"]


@pytest.mark.parametrize(
    ("made_with", "during", "after"),
    [
        # no owner: the shim's user gets it; the kernel cannot unset an owner, root gets it
        ([], (NOBODY, None), (0, None)),
        # someone else's: owner and group back as they were
        (["user", "1234", "group", "4321"], (NOBODY, NOBODY), (1234, 4321)),
        # another group's and no owner: only the group changes, and comes back exactly
        (["group", "4321"], (None, NOBODY), (None, 4321)),
        # already the shim user's, by owner or by group: left alone
        (["user", str(NOBODY)], (NOBODY, None), (NOBODY, None)),
        (["group", str(NOBODY)], (None, NOBODY), (None, NOBODY)),
    ],
)
def test_an_operators_tap_gets_its_owner_back_and_stays(
    other_netns: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    made_with: list[str],
    during: tuple[int | None, int | None],
    after: tuple[int | None, int | None],
) -> None:
    caplog.set_level(logging.INFO, "kvhost.shim")
    testns.run(
        ["ip", "-n", other_netns, "tuntap", "add", "dev", "kvop0", "mode", "tap", *made_with],
        "creating the operator's tap",
    )
    before = owner_and_group(other_netns, "kvop0")
    program = set_up(
        shim_args(
            "--socket-path", str(tmp_path / "vm.sock"), "--tap", "kvop0", "--netns", other_netns
        ),
        config,
        SHIM_USER,
        None,
    )
    try:
        assert owner_and_group(other_netns, "kvop0") == during
        assert attach_as_shim_user(other_netns, "kvop0") == {"ok": "kvop0"}
    finally:
        program.server.close()
        release_tap(program.tap)
    assert "kvop0" in links(other_netns)  # the operator's: never deleted
    assert owner_and_group(other_netns, "kvop0") == after
    (released,) = events(caplog, "tap")[1:]
    assert released["result"] == "released"
    if during == before:
        assert released["message"] == "tap kvop0 left as it was"
        return
    assert released["message"].startswith("tap kvop0 released: ")
    assert ("owner uid " in released["message"]) == (during[0] != before[0])
    assert ("group gid " in released["message"]) == (during[1] != before[1])
    refused = attach_as_shim_user(other_netns, "kvop0")
    assert "TUNSETIFF" in refused["error"] and errno.errorcode[errno.EPERM] in refused["error"]


def plain_args(*argv: str) -> argparse.Namespace:
    """Options of a shim that keeps its privileges (the libvirt hook's direct mode)."""
    return build_parser().parse_args(list(argv))


def test_without_user_a_missing_tap_fails_the_start_up_not_each_connection(
    other_netns: str, tmp_path: Path
) -> None:
    """The tap is opened per connection without --user; a frontend whose SET_OWNER fails
    reconnects at once (QEMU loops so before its monitor answers, and libvirt's 'virsh
    start' waits for ever): the shim must not listen at all."""
    sock = tmp_path / "vm.sock"
    with pytest.raises(UsageError, match="no network interface named 'kvnotap0'"):
        set_up(plain_args("--socket-path", str(sock), "--tap", "kvnotap0", "--netns",
                          other_netns), config, None, None)  # fmt: skip
    assert not sock.exists()
    assert links(other_netns) == ["lo"]  # and it made none


def test_without_user_an_existing_tap_is_checked_and_left_alone(
    other_netns: str, tmp_path: Path
) -> None:
    testns.run(["ip", "-n", other_netns, "tuntap", "add", "dev", "kvop1", "mode", "tap"],
               "creating the operator's tap")  # fmt: skip
    before = owner_and_group(other_netns, "kvop1")
    program = set_up(plain_args("--socket-path", str(tmp_path / "vm.sock"), "--tap", "kvop1",
                                "--netns", other_netns), config, None, None)  # fmt: skip
    try:
        assert program.tap is None and (tmp_path / "vm.sock").exists()
        # let go again: nothing holds it, and a frontend's connection attaches as before
        assert owner_and_group(other_netns, "kvop1") == before
        with kvnetns.inside(other_netns):
            Tap.open("kvop1").close()
    finally:
        program.server.close()
    assert "kvop1" in links(other_netns)
