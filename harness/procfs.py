"""What a process uses and holds, read from /proc: CPU time and context switches
(:class:`ProcUsage`), open fds, mappings and resident memory (:class:`Footprint`), the taps
of its tun fds; used by the fault and load tests and the benchmarks."""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from harness.errors import ScenarioError


@dataclass(frozen=True, slots=True)
class ProcUsage:
    """CPU time and context switches of one process (from /proc)."""

    cpu_seconds: float
    voluntary: int
    involuntary: int

    @classmethod
    def of(cls, pid: int) -> ProcUsage:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        cpu = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
        status = Path(f"/proc/{pid}/status").read_text()

        def count(key: str) -> int:
            match = re.search(rf"^{key}:\s+(\d+)", status, re.MULTILINE)
            return int(match.group(1)) if match else 0

        return cls(cpu, count("voluntary_ctxt_switches"), count("nonvoluntary_ctxt_switches"))

    def __sub__(self, other: ProcUsage) -> ProcUsage:
        return ProcUsage(self.cpu_seconds - other.cpu_seconds, self.voluntary - other.voluntary,
                         self.involuntary - other.involuntary)

    @property
    def switches(self) -> int:
        return self.voluntary + self.involuntary



@dataclass(frozen=True, slots=True)
class Footprint:
    """What process ``pid`` holds, read from /proc: open fds (all, ``/dev/vhost-net``,
    ``/dev/net/tun``, sockets), mappings (all, memfd-backed: guest memory and dirty logs),
    ``VmRSS`` and the resident bytes of every mapping that is not memfd-backed (smaps)."""

    fds: int
    vhost_fds: int
    tun_fds: int
    sockets: int
    mappings: int
    memfd_mappings: int
    rss: int
    rss_without_memfd: int

    @classmethod
    def of(cls, pid: int) -> Footprint:
        links = _fd_links(pid)
        maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
        rss_kib = 0
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss_kib = int(line.split()[1])
        return cls(
            fds=len(links),
            vhost_fds=sum(t == "/dev/vhost-net" for t in links.values()),
            tun_fds=sum(t == "/dev/net/tun" for t in links.values()),
            sockets=sum(t.startswith("socket:") for t in links.values()),
            mappings=len(maps),
            memfd_mappings=sum("/memfd:" in line for line in maps),
            rss=rss_kib * 1024,
            rss_without_memfd=smaps_rss(Path(f"/proc/{pid}/smaps").read_text()),
        )

    def counts(self) -> tuple[int, int, int, int, int]:
        """(fds, vhost fds, tun fds, sockets, memfd mappings): what must return exactly."""
        return self.fds, self.vhost_fds, self.tun_fds, self.sockets, self.memfd_mappings

    def describe(self) -> str:
        return (f"{self.fds} fds ({self.vhost_fds} vhost-net, {self.tun_fds} tun, "
                f"{self.sockets} sockets), {self.mappings} mappings ({self.memfd_mappings} "
                f"memfd), VmRSS {self.rss / 2**20:.2f} MiB, without memfd "
                f"{self.rss_without_memfd / 2**20:.2f} MiB")


def smaps_rss(text: str) -> int:
    """Resident bytes of every mapping in ``/proc/<pid>/smaps`` text that is not backed
    by a memfd (guest memory is the frontend's, mapped by the shim, touched by vhost)."""
    total = 0
    memfd = False
    for line in text.splitlines():
        head = line.split(maxsplit=1)[0] if line.strip() else ""
        if head.endswith(":"):
            if head == "Rss:" and not memfd:
                total += int(line.split()[1]) * 1024
        elif "-" in head:
            memfd = "/memfd:" in line
    return total


def _fd_links(pid: int) -> dict[int, str]:
    out: dict[int, str] = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed while listing
            out[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
    return out


def tap_names(pid: int) -> list[str]:
    """The tap interface of every ``/dev/net/tun`` fd process ``pid`` holds (fdinfo's
    ``iff:`` line), in fd order; a tun fd not attached to an interface is left out."""
    names: list[str] = []
    for fd, target in sorted(_fd_links(pid).items()):
        if target != "/dev/net/tun":
            continue
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
                if line.startswith("iff:"):
                    names.append(line.split()[1])
    return names


def wait_footprint(pid: int, check: Callable[[Footprint], bool], timeout: float = 30.0,
                   what: str = "footprint") -> Footprint:
    """Poll :meth:`Footprint.of` until ``check`` holds; ScenarioError (with the last
    footprint) after ``timeout`` s. Closing a vhost-net fd takes 30-40 ms under TCG, so a
    connection's devices disappear a while after its socket."""
    deadline = time.monotonic() + timeout
    while True:
        now = Footprint.of(pid)
        if check(now):
            return now
        if time.monotonic() > deadline:
            fds = ", ".join(f"{fd}:{target}" for fd, target in sorted(_fd_links(pid).items()))
            raise ScenarioError(f"process {pid}: {what} not reached in {timeout} s; it holds "
                                f"{now.describe()}; fds {fds}")
        time.sleep(0.02)
