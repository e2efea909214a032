"""Kernel tier, issue 6 "Faults": a killed frontend, a killed shim, and connection churn.

All real: ``kvhost-shim`` runs as its own process (``python -m shim.cli``) in the test's
network namespace, frontends are Debian's QEMU (driven over qtest, no guest OS) or kvhost's
Python frontend, the rings run in the kernel's vhost-net. What the shim holds is read from
/proc (:class:`harness.procfs.Footprint`): its vhost-net and tun fds, sockets, memfd
mappings (guest memory), RSS.

* QEMU SIGKILLed mid-traffic: the shim gives back exactly that connection's vhost-net fd,
  tun fd, socket and guest-memory mappings (the tap it created for it vanishes), the other
  QEMU keeps passing frames, and a new QEMU on the same socket negotiates and passes frames.
* The shim SIGKILLed mid-traffic and started again on the same socket: QEMU
  (``reconnect=1``) reconnects by itself, negotiates the same version and features, and
  the rings restart at the indexes QEMU restored from guest memory: the TX descriptors the
  killed shim's device had not consumed come out after the restart, in order, exactly once.
* Connect / set-up (SET_OWNER opens a vhost-net device; rings started) / disconnect,
  thousands of times: fds, sockets and memfd mappings return exactly to the idle values
  after every round, RSS and the mapping count stay flat after a warm-up.

Each test prints its measurements (run with ``-s``) for the issue's closing note.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from harness import netns
from harness.device import driver_for
from harness.frames import GUEST_MAC, PEER_MAC, frame
from harness.load import LOAD_BASE_GPA, LOAD_MEMORY
from harness.procfs import Footprint, tap_names, wait_footprint
from harness.qemu.machine import MachineConfig, VhostUserBackend
from harness.qemu.virtio_pci import RX, TX
from harness.rig import Rig, exchange
from harness.shim_process import first_per_ring
from kvhost import versions
from kvhost.memory import GuestMemory
from kvhost.probe import probe
from kvhost.vhost_user.frontend import FRONTEND_PROTOCOL_FEATURES, VhostUserFrontend

pytestmark = pytest.mark.kernel

#: connect/setup/disconnect cycles in the normal kernel tier and in the slow tier
CYCLES_SHORT = 200
CYCLES_FULL = 10_000
#: frontend threads driving the cycles: measured in the VM, 4 threads made a cycle slower
#: (380 ms) than 1 (273 ms): the shim's own CPU (335 ms/cycle) is the bottleneck, and
#: more frontend threads only take the second vCPU away from it
CYCLE_WORKERS = 1
#: cycles before the baseline is taken (first-use allocations and caches in the shim)
WARMUP_CYCLES = 50
#: RSS is not a counter: measured in the VM, the shim's RSS climbed ~3.8 MiB over the first
#: ~550 cycles in steps (malloc arenas of its closer thread, pymalloc arenas) and then stayed
#: flat to the byte for 450 more. So: growth over the second half of the cycles must stay
#: under SECOND_HALF_SLACK (a leak of 200 bytes per cycle breaks it over 10,000 cycles),
#: and growth after the warm-up under TOTAL_SLACK (a leaked 64 KiB receive buffer per
#: connection breaks it within 200 cycles).
SECOND_HALF_SLACK = 1 << 20
TOTAL_SLACK = 8 << 20
#: mapping-count growth allowed after the warm-up (arenas again)
MAPPING_SLACK = 8
#: a shim's start (Python + pyroute2 imports) under TCG on a busy host
SHIM_START = 300.0
TX_BURST = 16


def _new_tap(pid: int, known: set[str], timeout: float = 30.0) -> str:
    """The one tap process ``pid`` holds that is not in ``known``."""
    deadline = time.monotonic() + timeout
    while True:
        new = set(tap_names(pid)) - known
        if len(new) == 1:
            return new.pop()
        if time.monotonic() > deadline:
            raise AssertionError(f"shim holds taps {tap_names(pid)}; expected one beyond {known}")
        time.sleep(0.02)


# --- a frontend killed -----------------------------------------------------------------------


@pytest.mark.qemu
def test_qemu_killed_mid_traffic_releases_its_devices_only(netns_quiet: str) -> None:
    with Rig() as rig:
        shim = rig.shim("shim", None, None, timeout=SHIM_START)  # a created tap per connection
        pid = shim.pid
        idle = Footprint.of(pid)

        survivor = rig.qemu("qemu-b", shim, legacy=False)
        drv_b = driver_for(survivor, legacy=False)
        drv_b.start()
        wait_footprint(pid, lambda f: f.vhost_fds == 1 and f.memfd_mappings > 0,
                       what="one running connection")
        port_b = netns.TapPort(_new_tap(pid, set()))
        try:
            exchange(drv_b, port_b, 2, "b-before")
            shim.wait_quiet()  # QEMU's last ring messages may still be in flight
            one = Footprint.of(pid)
            started = time.perf_counter()

            victim = rig.qemu("qemu-a", shim, legacy=False)
            drv_a = driver_for(victim, legacy=False)
            drv_a.start()
            wait_footprint(
                pid, lambda f: f.vhost_fds == 2 and f.memfd_mappings == 2 * one.memfd_mappings,
                what="two running connections")
            tap_a = _new_tap(pid, {port_b.ifname})
            with netns.TapPort(tap_a) as port_a:
                exchange(drv_a, port_a, 2, "a-before")
                shim.wait_quiet()
                two = Footprint.of(pid)
                qemu_start = time.perf_counter() - started
                # mid-traffic: TX frames kicked and RX frames queued on its tap, then SIGKILL
                for i in range(TX_BURST):
                    drv_a.send(frame(GUEST_MAC, PEER_MAC, f"a-burst{i}"))
                    port_a.send(frame(PEER_MAC, GUEST_MAC, f"a-in{i}"))
                killed = time.perf_counter()
                victim.kill()
                assert victim.exit_status == -9
                after = wait_footprint(pid, lambda f: f.counts() == one.counts(),
                                       what="the killed connection's devices released")
                released = time.perf_counter() - killed
            assert tap_names(pid) == [port_b.ifname]
            assert not Path(f"/sys/class/net/{tap_a}").exists(), f"tap {tap_a} outlived it"
            assert shim.events("closed", connection="connection 2",
                               result="frontend hung up"), shim.log_text()

            # the other connection never noticed
            sent, received = exchange(drv_b, port_b, 4, "b-after")
            assert (sent, received) == (4, 4)
            assert drv_b.used_idx(TX) == 6 and drv_b.used_idx(RX) == 6

            # a new QEMU on the same socket
            fresh = rig.qemu("qemu-c", shim, legacy=False)
            drv_c = driver_for(fresh, legacy=False)
            drv_c.start()
            wait_footprint(pid, lambda f: f.vhost_fds == 2
                           and f.memfd_mappings == two.memfd_mappings,
                           what="the new connection running")
            with netns.TapPort(_new_tap(pid, {port_b.ifname})) as port_c:
                assert exchange(drv_c, port_c, 4, "c") == (4, 4)
            shim.wait_quiet()
            again = Footprint.of(pid)
            assert again.counts() == two.counts(), (again.describe(), two.describe())
            assert drv_c.state.driver_features == drv_b.state.driver_features

            assert fresh.stop() == 0 and survivor.stop() == 0
        finally:
            port_b.close()
        final = wait_footprint(pid, lambda f: f.counts() == idle.counts(),
                               what="idle after both QEMUs quit")
        assert shim.stop() == 0, shim.log_text()
    print(f"\n[faults] QEMU SIGKILL: shim released 1 vhost-net fd, 1 tun fd, "
          f"{two.memfd_mappings - one.memfd_mappings} memfd mappings, "
          f"{two.fds - one.fds} fds in {released * 1e3:.0f} ms (a QEMU start + DRIVER_OK "
          f"+ 2 frames each way took {qemu_start:.1f} s); idle {idle.describe()}; "
          f"two connections {two.describe()}; after the kill {after.describe()}; "
          f"at the end {final.describe()}")


# --- the shim killed -------------------------------------------------------------------------


class Sniffer:
    """Every frame tap ``ifname`` receives from the guest side, with its arrival time
    (perf_counter), recorded from a :class:`harness.netns.TapPort` by a thread until
    :meth:`close`."""

    def __init__(self, ifname: str) -> None:
        self.port = netns.TapPort(ifname)
        self.frames: list[tuple[float, bytes]] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"sniff-{ifname}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.is_set():
            got = self.port.receive(0.1)
            if got is not None:
                data, arrived = got
                self.frames.append((arrived, data))

    def times(self, wanted: bytes) -> list[float]:
        return [t for t, data in list(self.frames) if data == wanted]

    def close(self) -> None:
        """Stop the thread, then take what is still queued on the socket."""
        self._done.set()
        self._thread.join(5)
        while (got := self.port.receive(0.05)) is not None:
            data, arrived = got
            self.frames.append((arrived, data))
        self.port.close()


def _wait_for(what: str, check: Callable[[], bool], rig: Rig, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s\n{rig.diagnostics()}")
        time.sleep(0.01)


@pytest.mark.qemu
def test_shim_killed_mid_traffic_qemu_reconnects_and_resumes(netns_quiet: str) -> None:
    version = versions.latest(versions.host_offer(probe())).label
    with Rig() as rig:
        port = rig.port("kvr0")  # persistent: it outlives the shim, as an operator's tap does
        path = str(rig.workdir / "vm.sock")
        first = rig.shim("shim-1", "kvr0", version, socket_path=path, timeout=SHIM_START)
        qemu = rig.machine("qemu", MachineConfig(backend=VhostUserBackend(path, reconnect=1),
                                                 device_properties={"mac": GUEST_MAC.hex(":")}))
        drv = driver_for(qemu, legacy=False)
        drv.start()
        sniffer = Sniffer("kvr0")
        try:
            sent, received = exchange(drv, port, 4, "before")
            _wait_for("SET_FEATURES logged", lambda: bool(first.acked_features()), rig)
            # mid-traffic: half of the burst kicked (the kernel sends it at once), half
            # only made available, as a guest whose kick has not landed yet
            burst = [frame(GUEST_MAC, PEER_MAC, f"burst{i}") for i in range(TX_BURST)]
            for i, f in enumerate(burst):
                drv.send(f, kick=i < TX_BURST // 2)
            killed = time.perf_counter()
            first.kill()
            assert first.exit_status == -9

            spawned = time.perf_counter()
            second = rig.shim("shim-2", "kvr0", version, socket_path=path, timeout=SHIM_START)
            listening = time.perf_counter()

            def rings_running() -> bool:
                running = {e["vring"] for e in second.events("vring", result="running")}
                return {0, 1} <= running

            _wait_for("QEMU reconnected and restarted both rings", rings_running, rig)
            running = time.perf_counter()
            bases = first_per_ring(second.ring_bases("SET_VRING_BASE"))
            probe_frame = frame(GUEST_MAC, PEER_MAC, "after-restart")
            drv.send(probe_frame)
            port.expect(probe_frame)
            total_tx = sent + TX_BURST + 1
            _wait_for("every TX descriptor consumed", lambda: drv.used_idx(TX) == total_tx,
                      rig, timeout=10)
            drv.pop_used(TX)
            assert exchange(drv, port, 4, "after") == (4, 4)
        finally:
            sniffer.close()

        # QEMU restored the ring positions from the used indexes in guest memory, and the
        # restarted kernel device took over exactly there
        assert bases[RX] == received, (bases, received)
        resumed_at = bases[TX] - sent
        assert 0 <= resumed_at <= TX_BURST, bases
        seen = {f: sniffer.times(f) for f in [*burst, probe_frame]}
        assert all(len(t) <= 1 for t in seen.values()), "a TX frame came out of the tap twice"
        before = [f for f in burst if seen[f] and seen[f][0] < killed]
        after = [f for f in burst if seen[f] and seen[f][0] > listening]
        assert before == burst[: len(before)], "frames before the kill out of order"
        assert after == burst[resumed_at:], (
            f"after the restart the tap got burst frames "
            f"{[burst.index(f) for f in after]}, expected {resumed_at}..{TX_BURST - 1}")
        dropped = resumed_at - len(before)  # consumed by QEMU while the backend was gone
        assert drv.used_idx(TX) == total_tx + 4
        assert drv.used_idx(RX) == received + 4

        # the same interface again: version, features, and QEMU's own connection
        assert second.served_version() == first.served_version() == version
        acked_first, acked_second = first.acked_features(), second.acked_features()
        assert acked_first and acked_second and acked_second[0] == acked_first[0], (
            acked_first, acked_second)
        assert second.events("accepted", peer_pid=qemu.pid), second.log_text()
        assert qemu.qmp.query_status() == "running"
        first_through = min(t for f in [*after, probe_frame] for t in seen[f])
        assert qemu.stop() == 0, qemu.stderr_text()
        assert second.stop() == 0, second.log_text()
    print(f"\n[faults] shim SIGKILL -> restart: shim start to listening "
          f"{listening - spawned:.1f} s; listening -> rings running {running - listening:.2f} s; "
          f"listening -> first frame through {(first_through - listening) * 1e3:.0f} ms "
          f"(kill -> first frame {first_through - killed:.1f} s); features 0x{acked_second[0]:x} "
          f"both times, version {version}; TX resumed at base {bases[TX]} (RX {bases[RX]}): "
          f"{len(before)} burst frames out before the kill, {len(after)} after the restart, "
          f"{dropped} dropped by QEMU while the backend was gone, none twice")


# --- connection churn ------------------------------------------------------------------------


def _cycle(path: str, memory: GuestMemory, stop_rings: bool) -> None:
    """What a frontend does up to rings started, then hang up (half of the time after
    stopping the rings with GET_VRING_BASE, as QEMU's quit does)."""
    with VhostUserFrontend(path, timeout=120) as fe:
        fe.handshake()
        dev = fe.start_net(memory, base_gpa=LOAD_BASE_GPA, ring_size=64)
        if stop_rings:
            assert fe.stop(dev) == [0, 0]


def _negotiation_only(path: str, memory: GuestMemory, stop_rings: bool) -> None:
    with VhostUserFrontend(path, timeout=120) as fe:
        fe.get_features()
        fe.set_protocol_features(fe.get_protocol_features() & FRONTEND_PROTOCOL_FEATURES)
        fe.get_queue_num()


Cycle = Callable[[str, GuestMemory, bool], None]


def _run_cycles(path: str, count: int, memories: list[GuestMemory],
                cycle: Cycle = _cycle) -> float:
    """``count`` cycles spread over one thread per memory; returns the wall time."""
    numbers = itertools.count()
    lock = threading.Lock()
    errors: list[str] = []

    def work(memory: GuestMemory) -> None:
        while not errors:
            with lock:
                n = next(numbers)
            if n >= count:
                return
            try:
                cycle(path, memory, n % 2 == 0)
            except Exception as err:  # reported below with the cycle number
                errors.append(f"cycle {n}: {err!r}")

    threads = [threading.Thread(target=work, args=(m,)) for m in memories]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    assert not errors, errors[:5]
    return elapsed


def _churn(total: int, rounds: int) -> None:
    netns.create_tap("kvc0", multi_queue=True)
    with Rig() as rig:
        shim = rig.shim("churn", "kvc0", None, verbose=False, timeout=SHIM_START)
        pid, path = shim.pid, shim.socket_path
        fresh = Footprint.of(pid)
        memories = [GuestMemory.create(LOAD_MEMORY, name=f"churn-{i}")
                    for i in range(CYCLE_WORKERS)]
        try:
            _run_cycles(path, WARMUP_CYCLES, memories)
            idle = wait_footprint(pid, lambda f: f.vhost_fds == 0 and f.tun_fds == 0
                                  and f.memfd_mappings == 0 and f.sockets == fresh.sockets,
                                  what="idle after the warm-up")
            samples = [idle]
            per_round = (total - WARMUP_CYCLES) // rounds
            elapsed = 0.0
            cpu = shim.usage()
            for r in range(rounds):
                elapsed += _run_cycles(path, per_round, memories)
                samples.append(wait_footprint(
                    pid, lambda f: f.counts() == idle.counts(),
                    what=f"idle footprint after round {r + 1}"))
            done = WARMUP_CYCLES + rounds * per_round
            shim_cpu = (shim.usage() - cpu).cpu_seconds / (done - WARMUP_CYCLES)
            single = _run_cycles(path, 10, memories[:1]) / 10
            bare = _run_cycles(path, 20, memories[:1], _negotiation_only) / 20
        finally:
            for m in memories:
                m.close()
        wait_footprint(pid, lambda f: f.counts() == idle.counts(), what="idle at the end")
        opened = len(shim.events("devices"))
        assert shim.stop() == 0, shim.log_text()[-3000:]
    # every cycle but the negotiation-only ones opened its own vhost-net device
    assert opened == done + 10, f"{opened} vhost-net devices opened for {done + 10} cycles"
    rss = [s.rss for s in samples]
    maps = [s.mappings for s in samples]
    grew = rss[-1] - rss[0]
    grew_late = rss[-1] - rss[len(rss) // 2]
    print(f"\n[faults] churn: {done} connect/setup/disconnect cycles, {CYCLE_WORKERS} frontend "
          f"threads: {elapsed / (done - WARMUP_CYCLES) * 1e3:.1f} ms/cycle "
          f"({(done - WARMUP_CYCLES) / elapsed:.1f} cycles/s; shim CPU {shim_cpu * 1e3:.1f} "
          f"ms/cycle; one thread alone {single * 1e3:.1f} ms/cycle; without SET_OWNER/rings "
          f"{bare * 1e3:.1f} ms/cycle); "
          f"before any connection {fresh.describe()}; after the warm-up {idle.describe()}; "
          f"at the end {samples[-1].describe()}; VmRSS per round (KiB) "
          f"{[r // 1024 for r in rss]}; mappings per round {maps}")
    assert grew <= TOTAL_SLACK, f"RSS grew {grew / 1024:.0f} KiB after the warm-up: {rss}"
    assert grew_late <= SECOND_HALF_SLACK, (
        f"RSS grew {grew_late / 1024:.0f} KiB over the second half of the cycles: {rss}")
    assert max(maps) - maps[0] <= MAPPING_SLACK, f"mappings grew: {maps}"


def test_connect_setup_disconnect_cycles_leak_nothing(netns_quiet: str) -> None:
    _churn(CYCLES_SHORT, rounds=4)


@pytest.mark.soak
@pytest.mark.timeout(7200)
def test_ten_thousand_cycles_leak_nothing(netns_quiet: str) -> None:
    _churn(CYCLES_FULL, rounds=20)
