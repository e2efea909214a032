"""Host tier: shim.closer, the thread that closes dropped connections' kernel objects off the
shim's event loop (the kernel side is exercised by tests/test_kernel_shim.py)."""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest

from shim.closer import Closer


def test_jobs_run_in_order_off_the_calling_thread_and_drain_waits_for_them(
    fd_leak_check: None,
) -> None:
    closer = Closer()
    gate = threading.Event()
    ran: list[tuple[str, str]] = []
    fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(3)]

    def job(name: str, fd: int, wait: bool = False) -> None:
        if wait:
            assert gate.wait(10)
        os.close(fd)
        ran.append((name, threading.current_thread().name))

    t0 = time.perf_counter()
    closer.submit("a", lambda: job("a", fds[0], wait=True))
    closer.submit("b", lambda: job("b", fds[1]))
    closer.submit("c", lambda: job("c", fds[2]))
    # submit never waits for a job: "a" is blocked and the caller got control back
    assert time.perf_counter() - t0 < 5
    assert closer.pending == 3
    assert not closer.drain(timeout=0.05)
    gate.set()
    assert closer.drain(timeout=10)
    assert [name for name, _ in ran] == ["a", "b", "c"]
    assert {thread for _, thread in ran} == {"kvhost-closer"}
    assert closer.pending == 0
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)  # every fd handed over is closed once drain returned


def test_a_failing_job_is_logged_and_later_jobs_still_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    closer = Closer()
    done = []

    def broken() -> None:
        raise OSError(9, "Bad file descriptor")

    with caplog.at_level(logging.ERROR, "kvhost.shim"):
        closer.submit("connection 7's devices", broken)
        closer.submit("connection 8's devices", lambda: done.append(8))
        assert closer.drain(timeout=10)
    assert done == [8]
    assert "closing connection 7's devices failed" in caplog.text


def test_the_worker_exists_only_while_jobs_are_queued() -> None:
    closer = Closer(name="kvhost-closer-test")
    closer.submit("x", lambda: None)
    assert closer.drain(timeout=10)
    deadline = time.monotonic() + 10
    while any(t.name == "kvhost-closer-test" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the idle worker did not exit"
        time.sleep(0.01)
    # and a new job starts a new one
    closer.submit("y", lambda: None)
    assert closer.drain(timeout=10)
