"""Closing kernel objects off the shim's event loop.

Closing a vhost-net fd makes the kernel stop and reap its worker (30-40 ms under TCG, and
never instant), and unmapping guest memory or deleting a created tap can take milliseconds
too. The shim serves every connection from one thread, so doing that inline when a
connection drops would stall every other VM's vhost-user messages for that long. Instead a
dropped connection's backend hands its kernel objects to a :class:`Closer`:

* **Ownership.** :meth:`Closer.submit` takes a job (a callable that closes what it holds)
  and with it the ownership of every object the job references: from that call on nothing
  else may use or close them. Jobs run one at a time, in submission order, on one worker
  thread, so a job's own ordering rules (devices before the memory they use) hold.
* **Completion.** :meth:`Closer.drain` waits until every job submitted so far has run. The
  server calls it in ``ShimServer.close``, so all fds are closed when that returns. The
  worker is a non-daemon thread that exists only while jobs are queued: the interpreter
  waits for it at exit, and an idle shim has no extra thread.
* **Failure.** A job that raises is logged and the next one runs: a close that failed
  cannot be retried meaningfully, and it must not keep other connections' objects open.

The process has one closer, :data:`CLOSER`, shared by every connection.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

log = logging.getLogger("kvhost.shim")


class Closer:
    """A FIFO of close jobs run on a worker thread started on demand; see the module
    docstring for the ownership contract."""

    def __init__(self, name: str = "kvhost-closer") -> None:
        self._name = name
        self._cond = threading.Condition(threading.Lock())
        self._jobs: deque[tuple[str, Callable[[], None]]] = deque()
        self._worker: threading.Thread | None = None
        self._running = False

    @property
    def pending(self) -> int:
        """Jobs submitted and not finished yet (the running one included)."""
        with self._cond:
            return len(self._jobs) + (1 if self._running else 0)

    def submit(self, what: str, job: Callable[[], None]) -> None:
        """Queue ``job`` (which now owns what it closes); ``what`` names it in logs.

        Never raises for the job's own errors. If no thread can be started (the process
        is out of threads or shutting down), the job runs here instead, so nothing handed
        over is ever left open.
        """
        with self._cond:
            self._jobs.append((what, job))
            if self._worker is not None:
                return
            worker = threading.Thread(target=self._run, name=self._name)
            self._worker = worker
        try:
            worker.start()
        except RuntimeError:
            with self._cond:
                self._worker = None
            self._run_inline()

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every job submitted so far has finished; False on timeout."""
        with self._cond:
            return self._cond.wait_for(
                lambda: not self._jobs and not self._running, timeout=timeout
            )

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._jobs:
                    self._worker = None
                    self._cond.notify_all()
                    return
                what, job = self._jobs.popleft()
                self._running = True
            self._call(what, job)
            with self._cond:
                self._running = False

    def _run_inline(self) -> None:
        while True:
            with self._cond:
                if not self._jobs:
                    self._cond.notify_all()
                    return
                what, job = self._jobs.popleft()
            self._call(what, job)

    @staticmethod
    def _call(what: str, job: Callable[[], None]) -> None:
        try:
            job()
        except Exception:  # one failed close must not keep later jobs' fds open
            log.exception("closing %s failed", what)


#: the process's closer (see the module docstring)
CLOSER = Closer()
