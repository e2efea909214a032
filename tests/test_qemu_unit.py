"""Host tier: the pure parts of the QEMU driving layer (harness.qemu): command lines, qtest
and QMP wire parsing, the client's behaviour against a scripted peer socket, and the
driver-state JSON round trip. The real QEMU runs in tests/test_kernel_qemu_native.py."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness.qemu import machine, qmp, qtest, virtio_pci
from harness.qemu import virtio_status as vs
from harness.qemu.errors import QemuError, QemuExited, QmpError, QtestError
from harness.qemu.machine import MachineConfig, TapBackend, VhostUserBackend
from harness.qemu.virtio_pci import DriverState, QueueState
from kvhost import features as fb
from kvhost.errors import UsageError

PATHS = {"bios": "/w/bios.bin", "qtest": "/w/qtest.sock", "qmp": "/w/qmp.sock"}


def _opt(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


# -- command line ---------------------------------------------------------------------------
def test_native_tap_command_line() -> None:
    argv = machine.build_command(MachineConfig(backend=TapBackend("kvq0")), **PATHS)
    assert argv[0] == "/usr/bin/qemu-system-x86_64"
    assert _opt(argv, "-accel") == ["tcg"]
    assert _opt(argv, "-bios") == ["/w/bios.bin"]
    assert _opt(argv, "-m") == ["64M"]
    assert _opt(argv, "-object") == ["memory-backend-memfd,id=mem,size=64M,share=on"]
    assert _opt(argv, "-numa") == ["node,memdev=mem"]
    assert _opt(argv, "-netdev") == [
        "tap,id=n0,ifname=kvq0,script=no,downscript=no,vhost=on"
    ]
    assert _opt(argv, "-device") == [
        "virtio-net-pci,id=net0,netdev=n0,disable-legacy=on,addr=0x3,romfile="
    ]
    assert _opt(argv, "-qtest") == ["unix:/w/qtest.sock"]
    assert _opt(argv, "-qmp") == ["unix:/w/qmp.sock"]
    assert "-incoming" not in argv
    assert "msix" not in " ".join(argv) and "vectors" not in " ".join(argv)


def test_vhost_user_incoming_and_properties() -> None:
    config = MachineConfig(
        backend=VhostUserBackend("/run/shim.sock"),
        device_properties={"mac": "52:54:00:aa:00:01", "host_uso": "off"},
        incoming="exec:cat /run/res/state",
        memory_mib=128,
        extra_args=("-S",),
    )
    argv = machine.build_command(config, **PATHS)
    assert _opt(argv, "-chardev") == ["socket,id=vhu0,path=/run/shim.sock"]
    assert _opt(argv, "-netdev") == ["vhost-user,id=n0,chardev=vhu0"]
    assert _opt(argv, "-device")[0].endswith(",mac=52:54:00:aa:00:01,host_uso=off")
    assert _opt(argv, "-incoming") == ["exec:cat /run/res/state"]
    assert _opt(argv, "-object") == ["memory-backend-memfd,id=mem,size=128M,share=on"]
    assert argv[-1] == "-S"


def test_vhost_user_reconnect() -> None:
    argv = machine.build_command(
        MachineConfig(backend=VhostUserBackend("/run/shim.sock", reconnect=1)), **PATHS
    )
    assert _opt(argv, "-chardev") == ["socket,id=vhu0,path=/run/shim.sock,reconnect=1"]
    with pytest.raises(UsageError, match="at least 1"):
        machine.build_command(
            MachineConfig(backend=VhostUserBackend("/run/shim.sock", reconnect=0)), **PATHS
        )


def test_native_tap_without_vhost() -> None:
    argv = machine.build_command(MachineConfig(backend=TapBackend("t", vhost=False)), **PATHS)
    assert _opt(argv, "-netdev")[0].endswith("vhost=off")


@pytest.mark.parametrize(
    "config",
    [
        MachineConfig(backend=TapBackend("a,b")),
        MachineConfig(backend=TapBackend("a" * 16)),
        MachineConfig(backend=TapBackend("")),
        MachineConfig(backend=VhostUserBackend("/run/x,server=on")),
        MachineConfig(backend=TapBackend("t"), device_properties={"addr": "0x4"}),
        MachineConfig(backend=TapBackend("t"), device_properties={"mac": "a,b"}),
        MachineConfig(backend=TapBackend("t"), device_properties={"a=b": "1"}),
        MachineConfig(backend=TapBackend("t"), incoming=""),
        MachineConfig(backend=TapBackend("t"), memory_mib=0),
    ],
)
def test_bad_configs_are_usage_errors(config: MachineConfig) -> None:
    with pytest.raises(UsageError):
        machine.build_command(config, **PATHS)


def test_bios_is_64k_of_hlt(tmp_path: Path) -> None:
    path = tmp_path / "bios"
    machine.write_bios(path)
    data = path.read_bytes()
    assert len(data) == 65536 and set(data) == {0xF4}


def test_missing_binary_is_a_usage_error() -> None:
    m = machine.Machine(MachineConfig(backend=TapBackend("t"), binary="/nonexistent/qemu"))
    with pytest.raises(UsageError, match="apt-get install qemu-system-x86"):
        m.start()
    assert m.exit_status is None


# -- qtest parsing ----------------------------------------------------------------------------
def test_qtest_reply_parsing() -> None:
    assert qtest.parse_reply("outl 0xcf8 0x1", "OK\n") == []
    assert qtest.parse_int("inl 0xcfc", qtest.parse_reply("inl", "OK 0x10411af4")) == 0x10411AF4
    assert qtest.parse_data("read", ["0x0102ff"], 3) == b"\x01\x02\xff"
    with pytest.raises(QtestError, match="FAIL Unknown command"):
        qtest.parse_reply("bogus", "FAIL Unknown command 'bogus'")
    with pytest.raises(QtestError, match="ERR"):
        qtest.parse_reply("write", "ERR invalid argument size")
    with pytest.raises(QtestError, match="unexpected reply"):
        qtest.parse_reply("inl", "hello")
    with pytest.raises(QtestError, match="empty"):
        qtest.parse_reply("inl", "\n")
    with pytest.raises(QtestError, match="not a number"):
        qtest.parse_int("inl", ["0xzz"])
    with pytest.raises(QtestError, match="asked for 4 bytes"):
        qtest.parse_data("read", ["0x0102"], 4)
    with pytest.raises(QtestError, match="0x<hex>"):
        qtest.parse_data("read", ["0102"], 2)


def test_qtest_write_format() -> None:
    assert qtest.format_write(0x100000, b"\x01\xab") == "write 0x100000 2 0x01ab"
    with pytest.raises(ValueError, match="zero bytes"):
        qtest.format_write(0, b"")


Peer = Callable[[socket.socket], None]


@pytest.fixture
def scripted() -> Iterator[Callable[[Peer], socket.socket]]:
    """A socketpair whose far end runs ``peer`` in a thread (a scripted QEMU)."""
    threads: list[threading.Thread] = []
    socks: list[socket.socket] = []

    def make(peer: Peer) -> socket.socket:
        ours, theirs = socket.socketpair()
        socks.extend([ours, theirs])
        t = threading.Thread(target=peer, args=(theirs,), daemon=True)
        t.start()
        threads.append(t)
        return ours

    yield make
    for t in threads:
        t.join(5)
    for s in socks:
        s.close()


def _lines(sock: socket.socket, n: int) -> list[str]:
    buf = b""
    while buf.count(b"\n") < n:
        chunk = sock.recv(4096)
        if not chunk:
            break
        buf += chunk
    return buf.decode().splitlines()


def test_qtest_client_conversation(scripted: Callable[[Peer], socket.socket]) -> None:
    seen: list[str] = []

    def peer(s: socket.socket) -> None:
        replies = ["OK", "IRQ raise 11\nOK 0x1af4", "OK 0x00ff", "OK", "FAIL nope"]
        for reply in replies:
            seen.extend(_lines(s, 1))
            s.sendall(reply.encode() + b"\n")
        s.shutdown(socket.SHUT_RDWR)

    client = qtest.QtestClient(scripted(peer), describe=lambda: (1, "qemu: boom\n"))
    client.outl(0xCF8, 0x80001800)
    assert client.inw(0xCFC) == 0x1AF4  # the IRQ notice is skipped
    assert client.memread(0x100000, 2) == b"\x00\xff"
    client.memwrite(0x100000, b"\x12\x34")
    with pytest.raises(QtestError, match="nope"):
        client.readq(0)
    with pytest.raises(QemuExited) as info:
        client.readl(4)
    assert info.value.exit_status == 1 and "qemu: boom" in str(info.value)
    assert seen == ["outl 0xcf8 0x80001800", "inw 0xcfc", "read 0x100000 2",
                    "write 0x100000 2 0x1234", "readq 0x0"]


def test_qtest_rejects_values_that_do_not_fit(
    scripted: Callable[[Peer], socket.socket]
) -> None:
    client = qtest.QtestClient(scripted(lambda s: None))
    with pytest.raises(ValueError, match="does not fit in 2 bytes"):
        client.writew(0, 0x10000)
    with pytest.raises(ValueError, match="must be positive"):
        client.memread(0, 0)


# -- QMP ------------------------------------------------------------------------------------------
def test_qmp_encoding() -> None:
    assert json.loads(qmp.encode_command("migrate", {"uri": "unix:/x"}, 7)) == {
        "execute": "migrate", "arguments": {"uri": "unix:/x"}, "id": 7}
    assert json.loads(qmp.encode_command("quit", None, 1)) == {"execute": "quit", "id": 1}
    with pytest.raises(Exception, match="invalid JSON"):
        qmp.decode_message(b"{nope")
    with pytest.raises(Exception, match="non-object"):
        qmp.decode_message(b"[1]")


def test_qmp_conversation(scripted: Callable[[Peer], socket.socket]) -> None:
    def peer(s: socket.socket) -> None:
        s.sendall(b'{"QMP": {"version": {}, "capabilities": []}}\n')
        assert json.loads(_lines(s, 1)[0])["execute"] == "qmp_capabilities"
        s.sendall(b'{"return": {}, "id": 1}\n')
        cmd = json.loads(_lines(s, 1)[0])
        assert cmd["arguments"] == {"capabilities": [
            {"capability": "return-path", "state": True}]}
        s.sendall(b'{"event": "MIGRATION", "data": {"status": "setup"}}\n'
                  b'{"return": {}, "id": 2}\n')
        _lines(s, 1)
        s.sendall(b'{"error": {"class": "GenericError", "desc": "no way"}, "id": 3}\n')
        for ident, status in ((4, "active"), (5, "completed")):
            _lines(s, 1)
            reply = {"return": {"status": status, "downtime": 9}, "id": ident}
            s.sendall(json.dumps(reply).encode() + b"\n")
        s.close()

    client = qmp.QmpClient(scripted(peer), describe=lambda: (None, ""))
    with pytest.raises(UsageError, match="negotiate"):
        client.query_status()
    client.negotiate()
    client.set_migration_capabilities({"return-path": True})
    assert client.wait_event("MIGRATION")["data"] == {"status": "setup"}
    with pytest.raises(QmpError, match="GenericError: no way") as info:
        client.migrate("unix:/x")
    assert info.value.desc == "no way"
    assert client.wait_migration(poll=0)["downtime"] == 9
    with pytest.raises(QemuExited, match="QMP"):  # peer gone: send or receive breaks
        client.query_status()
    assert client.state is qmp.QmpState.CLOSED


# -- driver state and layout ---------------------------------------------------------------------
def _state() -> DriverState:
    st = DriverState(slot=3, bar4=0xE0000000, common=0xE0000000, notify=0xE0003000,
                     notify_multiplier=4, device_cfg=0xE0002000,
                     device_features=0x10130BFFFA7, driver_features=0x10130001FA3)
    for index in (virtio_pci.RX, virtio_pci.TX):
        desc, avail, used = virtio_pci.ring_layout(index, 256)
        st.queues[index] = QueueState(index=index, size=256, desc=desc, avail=avail, used=used,
                                      buffers=0x200000, avail_idx=0xFFFF, last_used=0xFFF0,
                                      free=list(range(3, 256)), in_flight=[2, 0, 1])
    return st


def test_driver_state_json_round_trip() -> None:
    st = _state()
    text = st.to_json()
    back = DriverState.from_json(text)
    assert back == st
    assert back.queues[virtio_pci.TX].in_flight == [2, 0, 1]
    assert back.driver_features == 0x10130001FA3  # bits above 32 survive JSON


def test_driver_state_rejects_damage() -> None:
    data = json.loads(_state().to_json())
    data["queues"][0]["free"].remove(7)  # descriptor 7 neither free nor in flight
    with pytest.raises(UsageError, match="queue 0 is inconsistent"):
        DriverState.from_json(json.dumps(data))
    with pytest.raises(UsageError, match="not a saved virtio driver state"):
        DriverState.from_json('{"slot": 3}')
    with pytest.raises(UsageError, match="not a saved virtio driver state"):
        DriverState.from_json("garbage")


def test_ring_layout_fits_its_slot() -> None:
    assert virtio_pci.ring_layout(0, 256) == (0x100000, 0x101000, 0x101208)
    for q in (virtio_pci.RX, virtio_pci.TX):
        desc, _, used = virtio_pci.ring_layout(q, virtio_pci.MAX_QUEUE_SIZE)
        assert used + 6 + 8 * virtio_pci.MAX_QUEUE_SIZE <= desc + virtio_pci.RING_STRIDE
        assert used % 4 == 0
    top = virtio_pci.TX_BUFFERS + virtio_pci.BUFFER_SIZE * virtio_pci.MAX_QUEUE_SIZE
    assert virtio_pci.RX_BUFFERS + virtio_pci.BUFFER_SIZE * 1024 <= virtio_pci.TX_BUFFERS
    assert top <= 64 << 20


def test_net_header() -> None:
    assert virtio_pci.net_header() == bytes(12)
    assert virtio_pci.net_header(num_buffers=1)[10:] == b"\x01\x00"
    with pytest.raises(UsageError, match="unknown virtio_net_hdr fields"):
        virtio_pci.net_header(bogus=1)


def test_unsupported_features_exclude_control_queue_and_packed() -> None:
    from kvhost import features

    names = set(features.names(virtio_pci.UNSUPPORTED))
    assert {"CTRL_VQ", "MQ", "RING_PACKED", "GUEST_ANNOUNCE"} <= names
    assert "VERSION_1" not in names and "RING_RESET" not in names


def test_exec_migration_has_no_return_path() -> None:
    idle = machine.Machine(MachineConfig(backend=TapBackend("t")))
    with pytest.raises(UsageError, match="return_path=False"):
        machine.migrate(idle, "exec:cat > /run/x")


class _FakeQmp:
    """The two QMP queries _settled_stats makes, answering run states from a script."""

    def __init__(self, states: list[str]) -> None:
        self.states = states
        self.migrate_queries = 0

    def query_status(self) -> str:
        return self.states.pop(0) if len(self.states) > 1 else self.states[0]

    def query_migrate(self) -> dict[str, object]:
        self.migrate_queries += 1
        return {"status": "completed", "total-time": 812, "downtime": 37}


class _FakeSource:
    """What _settled_stats uses of a Machine: its name, QMP client and stderr."""

    name = "qemu-src"

    def __init__(self, states: list[str]) -> None:
        self.qmp = _FakeQmp(states)

    def stderr_text(self) -> str:
        return "qemu: the last thing it said\n"


def test_completed_migration_stats_wait_for_postmigrate() -> None:
    """QEMU answers ``completed`` with total-time/downtime 0 until its migration thread has
    computed them (it then sets the run state to postmigrate): the stats are re-read then."""
    source = _FakeSource(["finish-migrate", "finish-migrate", "postmigrate"])
    settled = machine._settled_stats(source, timeout=5)  # type: ignore[arg-type]
    assert settled["total-time"] == 812 and settled["downtime"] == 37
    assert source.qmp.states == ["postmigrate"] and source.qmp.migrate_queries == 1


def test_migration_stats_that_never_settle_are_an_error_not_zeros() -> None:
    source = _FakeSource(["finish-migrate"])
    start = time.monotonic()
    with pytest.raises(QemuError) as err:
        machine._settled_stats(source, timeout=0.2)  # type: ignore[arg-type]
    assert time.monotonic() - start >= 0.2
    text = str(err.value)
    assert "qemu-src: migration completed, but the run state is still 'finish-migrate'" in text
    assert "not 'postmigrate', after 0.2 s" in text
    assert err.value.stderr == "qemu: the last thing it said\n"
    assert source.qmp.migrate_queries == 0


# -- x-query-virtio-status ------------------------------------------------------------------
def test_acked_mismatch_ignores_plumbing_and_bits_the_backend_never_offered() -> None:
    negotiated = fb.mask(["VERSION_1", "MRG_RXBUF", "CTRL_VQ"])
    offered = fb.mask(["VERSION_1", "MRG_RXBUF"]) | fb.LOG_ALL
    # CTRL_VQ is QEMU's own (not the backend's); LOG_ALL is QEMU's plumbing
    acked = fb.mask(["VERSION_1", "MRG_RXBUF"]) | fb.LOG_ALL
    assert vs.acked_mismatch(negotiated, acked, offered) == 0
    # a backend left without MRG_RXBUF reads a 10-byte header where the guest writes 12
    assert vs.acked_mismatch(negotiated, fb.mask(["VERSION_1"]), offered) == fb.bit("MRG_RXBUF")
