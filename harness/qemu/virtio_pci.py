"""A modern (virtio 1.x) virtio-net PCI driver played over qtest, interrupt-free.

The test is the guest: it programs PCI config space through ports 0xcf8/0xcfc, maps BAR4
(where QEMU puts the modern capabilities), runs the virtio initialisation sequence, and
moves frames by writing and reading guest memory; it never enables MSI-X and never waits for
an interrupt: completion is seen by polling ``used.idx`` in guest memory.

Guest-physical layout (inside the 64 MiB memfd; everything above 1 MiB, clear of the BIOS
shadow at 0xe0000-0xfffff)::

    0x0100000 + 0x10000*q   ring of queue q (q=0 RX, 1 TX): desc table (16*N bytes),
                            avail ring right after it, used ring 4-byte aligned after that
    0x0200000               RX buffers, 2 KiB each, descriptor i <-> buffer i  (up to 1024)
    0x0600000               TX buffers, 2 KiB each, descriptor i <-> buffer i
    0xe0000000              BAR4 (MMIO, in the PCI hole below 4 GiB)

Initialisation (virtio 1.2 §3.1.1): reset (status 0, read back 0) -> ACKNOWLEDGE|DRIVER ->
read device features (select 0 and 1) -> write driver features -> FEATURES_OK (read back:
the device may refuse) -> per queue size/desc/driver/device addresses, enable -> DRIVER_OK.
QEMU starts its vhost backend inside the DRIVER_OK write; :meth:`VirtioNetDriver.driver_ok`
returns that write's round trip.

A frame in either ring is a 12-byte ``virtio_net_hdr_v1`` followed by the Ethernet frame
(VERSION_1 is required, so the header is always 12 bytes).

Driver state (:class:`DriverState`, JSON) holds everything the driver knows that is not in
the device or guest memory: BAR address, capability offsets, features, ring addresses,
shadow indexes and free descriptors. After a live migration the destination's device and
memory already hold the rest, so :meth:`VirtioNetDriver.attach` continues from a saved
state without resetting the device (also across two test-VM boots, issue 7).
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from harness.qemu.errors import QemuError
from harness.qemu.machine import DEVICE_SLOT
from harness.qemu.qtest import QtestClient
from kvhost import features as feat
from kvhost.errors import UsageError

# --- PCI ---------------------------------------------------------------------------------
PCI_CONFIG_ADDRESS = 0xCF8
PCI_CONFIG_DATA = 0xCFC
PCI_VENDOR_ID = 0x00
PCI_DEVICE_ID = 0x02
PCI_COMMAND = 0x04
PCI_STATUS = 0x06
PCI_BAR0 = 0x10
PCI_CAPABILITY_LIST = 0x34
PCI_COMMAND_MEMORY = 0x2
PCI_COMMAND_MASTER = 0x4
PCI_STATUS_CAP_LIST = 0x10
PCI_CAP_ID_VNDR = 0x09
VIRTIO_VENDOR = 0x1AF4
VIRTIO_NET_MODERN_DEVICE = 0x1041  # 0x1040 + device type 1 (net)

# virtio_pci_cap.cfg_type (virtio 1.2 §4.1.4)
CAP_COMMON, CAP_NOTIFY, CAP_ISR, CAP_DEVICE = 1, 2, 3, 4

# virtio_pci_common_cfg offsets
COMMON_DFSELECT = 0
COMMON_DF = 4
COMMON_GFSELECT = 8
COMMON_GF = 12
COMMON_NUMQ = 18
COMMON_STATUS = 20
COMMON_Q_SELECT = 22
COMMON_Q_SIZE = 24
COMMON_Q_ENABLE = 28
COMMON_Q_NOFF = 30
COMMON_Q_DESC = 32
COMMON_Q_AVAIL = 40
COMMON_Q_USED = 48

# device status bits
ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK = 1, 2, 4, 8
NEEDS_RESET, FAILED = 0x40, 0x80

VRING_DESC_F_WRITE = 2
VRING_AVAIL_F_NO_INTERRUPT = 1

# --- layout --------------------------------------------------------------------------------
RX, TX = 0, 1
RING_BASE = 0x100000
RING_STRIDE = 0x10000
RX_BUFFERS = 0x200000
TX_BUFFERS = 0x600000
BUFFER_SIZE = 2048
MAX_QUEUE_SIZE = 1024
BAR4_GPA = 0xE000_0000
NET_HDR_SIZE = 12

#: Bits this driver never accepts: it runs no control queue (so nothing that needs one),
#: lays out split rings only, and writes plain 16-bit notifications.
UNSUPPORTED = feat.mask(
    [
        "CTRL_VQ", "CTRL_RX", "CTRL_VLAN", "CTRL_RX_EXTRA", "GUEST_ANNOUNCE", "MQ",
        "CTRL_MAC_ADDR", "CTRL_GUEST_OFFLOADS", "RING_PACKED", "NOTIFICATION_DATA",
    ]
)
VERSION_1 = feat.mask(["VERSION_1"])

_DESC = struct.Struct("<QIHH")


def ring_layout(queue: int, size: int) -> tuple[int, int, int]:
    """(desc, avail, used) guest-physical addresses of ``queue``'s split ring."""
    desc = RING_BASE + RING_STRIDE * queue
    avail = desc + 16 * size
    used = (avail + 6 + 2 * size + 3) & ~3
    return desc, avail, used


def net_header(**fields: int) -> bytes:
    """A ``virtio_net_hdr_v1`` (flags, gso_type, hdr_len, gso_size, csum_start,
    csum_offset, num_buffers); all zero unless given."""
    order = ("flags", "gso_type", "hdr_len", "gso_size", "csum_start", "csum_offset",
             "num_buffers")
    unknown = set(fields) - set(order)
    if unknown:
        raise UsageError(f"unknown virtio_net_hdr fields {sorted(unknown)}; known: {order}")
    return struct.pack("<BBHHHHH", *(fields.get(name, 0) for name in order))


@dataclass
class QueueState:
    """One virtqueue as the driver sees it; indexes are free-running u16 counters."""

    index: int
    size: int
    desc: int
    avail: int
    used: int
    buffers: int
    avail_idx: int = 0
    last_used: int = 0
    free: list[int] = field(default_factory=list)
    #: Descriptor ids handed to the device, in posting order (their buffers' owners).
    in_flight: list[int] = field(default_factory=list)


@dataclass
class DriverState:
    """Everything :meth:`VirtioNetDriver.attach` needs to continue on a migrated device."""

    slot: int
    bar4: int
    common: int
    notify: int
    notify_multiplier: int
    device_cfg: int
    device_features: int = 0
    driver_features: int = 0
    queues: dict[int, QueueState] = field(default_factory=dict)

    def to_json(self) -> str:
        data = asdict(self)
        data["queues"] = [asdict(q) for q in self.queues.values()]
        return json.dumps(data, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DriverState:
        """Parse :meth:`to_json` output; UsageError names what is wrong with the text."""
        try:
            data: dict[str, Any] = json.loads(text)
            queues = {int(q["index"]): QueueState(**q) for q in data.pop("queues")}
            state = cls(**data, queues=queues)
        except (ValueError, TypeError, KeyError) as err:
            raise UsageError(f"not a saved virtio driver state ({err}); use the file that "
                             "VirtioNetDriver.save_state() wrote") from None
        for q in state.queues.values():
            if sorted(q.free + q.in_flight) != list(range(q.size)):
                raise UsageError(f"saved driver state of queue {q.index} is inconsistent: "
                                 "free and in-flight descriptors do not cover the ring")
        return state


class VirtioNetDriver:
    """The guest driver of the virtio-net device at PCI slot ``slot``, over ``qtest``.

    Methods raise :class:`QemuError` when the device disagrees (wrong device, refused
    features, NEEDS_RESET, timeouts) and :class:`~harness.qemu.errors.QemuExited` when QEMU
    is gone; :class:`UsageError` for calls out of order or impossible arguments.
    """

    def __init__(self, qtest: QtestClient, state: DriverState) -> None:
        self.qt = qtest
        self.state = state

    # -- discovery ------------------------------------------------------------------------
    @classmethod
    def probe(cls, qtest: QtestClient, *, slot: int = DEVICE_SLOT,
              bar4: int = BAR4_GPA) -> VirtioNetDriver:
        """Find the device, map BAR4 at ``bar4``, enable memory + bus mastering, and locate
        the common/notify/device configuration structures. Does not touch device status."""
        pci = _Pci(qtest, slot)
        vendor, device = pci.read16(PCI_VENDOR_ID), pci.read16(PCI_DEVICE_ID)
        if (vendor, device) != (VIRTIO_VENDOR, VIRTIO_NET_MODERN_DEVICE):
            raise QemuError(
                f"PCI slot {slot} holds {vendor:04x}:{device:04x}, not a modern virtio-net "
                f"device ({VIRTIO_VENDOR:04x}:{VIRTIO_NET_MODERN_DEVICE:04x}); start QEMU with "
                "virtio-net-pci,disable-legacy=on at that address"
            )
        if not pci.read16(PCI_STATUS) & PCI_STATUS_CAP_LIST:
            raise QemuError(f"virtio-net at slot {slot} has no PCI capability list")
        caps: dict[int, tuple[int, int, int]] = {}  # cfg_type -> (bar, offset, cap position)
        pos = pci.read8(PCI_CAPABILITY_LIST) & 0xFC
        seen = 0
        while pos and seen < 48:
            seen += 1
            if pci.read8(pos) == PCI_CAP_ID_VNDR:
                cfg_type, bar = pci.read8(pos + 3), pci.read8(pos + 4)
                caps.setdefault(cfg_type, (bar, pci.read32(pos + 8), pos))
            pos = pci.read8(pos + 1) & 0xFC
        missing = [n for t, n in ((CAP_COMMON, "common"), (CAP_NOTIFY, "notify"),
                                  (CAP_DEVICE, "device")) if t not in caps]
        if missing:
            raise QemuError(f"virtio-net at slot {slot} lacks virtio capabilities {missing}")
        bars = {caps[t][0] for t in (CAP_COMMON, CAP_NOTIFY, CAP_DEVICE)}
        if bars != {4}:
            raise QemuError(f"virtio structures live in BARs {sorted(bars)}; driver maps only "
                            "BAR4 (QEMU's layout)")
        pci.map_bar64(4, bar4)
        pci.write16(PCI_COMMAND, pci.read16(PCI_COMMAND) | PCI_COMMAND_MEMORY |
                    PCI_COMMAND_MASTER)
        state = DriverState(
            slot=slot, bar4=bar4, common=bar4 + caps[CAP_COMMON][1],
            notify=bar4 + caps[CAP_NOTIFY][1],
            notify_multiplier=pci.read32(caps[CAP_NOTIFY][2] + 16),
            device_cfg=bar4 + caps[CAP_DEVICE][1],
        )
        return cls(qtest, state)

    @classmethod
    def attach(cls, qtest: QtestClient, state: DriverState) -> VirtioNetDriver:
        """Continue a saved driver on a migrated device: checks that BAR4, status and every
        queue's addresses survived migration as saved; raises QemuError if not."""
        pci = _Pci(qtest, state.slot)
        bar = pci.read32(PCI_BAR0 + 16) & ~0xF | pci.read32(PCI_BAR0 + 20) << 32
        if bar != state.bar4:
            raise QemuError(f"migrated device has BAR4 at {bar:#x}, saved state says "
                            f"{state.bar4:#x}: not the device the state was saved from")
        drv = cls(qtest, state)
        status = drv.status()
        if not status & DRIVER_OK or status & (NEEDS_RESET | FAILED):
            raise QemuError(f"migrated device status {status:#x} is not a running driver")
        for q in state.queues.values():
            qtest.writew(state.common + COMMON_Q_SELECT, q.index)
            got = (qtest.readq(state.common + COMMON_Q_DESC),
                   qtest.readq(state.common + COMMON_Q_AVAIL),
                   qtest.readq(state.common + COMMON_Q_USED))
            if got != (q.desc, q.avail, q.used):
                raise QemuError(f"migrated queue {q.index} addresses {got} differ from the "
                                f"saved {(q.desc, q.avail, q.used)}")
        return drv

    def save_state(self) -> str:
        """The driver state as JSON (see :meth:`DriverState.from_json`)."""
        return self.state.to_json()

    # -- status and features -------------------------------------------------------------
    def status(self) -> int:
        return self.qt.readb(self.state.common + COMMON_STATUS)

    def set_status(self, value: int) -> None:
        self.qt.writeb(self.state.common + COMMON_STATUS, value)

    def reset(self, timeout: float = 5.0) -> None:
        """Write status 0 and wait until the device reads back 0 (spec requirement)."""
        self.set_status(0)
        deadline = time.monotonic() + timeout
        while self.status() != 0:
            if time.monotonic() > deadline:
                raise QemuError("device did not complete reset (status never read 0)")
            time.sleep(0.001)
        self.state.queues.clear()
        self.state.driver_features = 0

    def read_device_features(self) -> int:
        """All device feature bits (select 0 and 1 of device_feature)."""
        common = self.state.common
        value = 0
        for select in (0, 1):
            self.qt.writel(common + COMMON_DFSELECT, select)
            value |= self.qt.readl(common + COMMON_DF) << (32 * select)
        self.state.device_features = value
        return value

    def negotiate(self, wanted: int | None = None) -> int:
        """ACKNOWLEDGE|DRIVER, write driver features, FEATURES_OK; returns what was written.

        ``wanted`` None means every offered bit this driver can honour (not
        :data:`UNSUPPORTED`). An explicit ``wanted`` must be a subset of the offer and
        contain VERSION_1 (UsageError otherwise). QemuError if the device refuses.
        """
        self.set_status(ACKNOWLEDGE)
        self.set_status(ACKNOWLEDGE | DRIVER)
        offered = self.read_device_features()
        if not offered & VERSION_1:
            raise QemuError(f"device offers {offered:#x} without VERSION_1; this driver is "
                            "modern-only")
        if wanted is None:
            wanted = offered & ~UNSUPPORTED
        extra = wanted & ~offered
        if extra:
            raise UsageError(f"driver features {wanted:#x} include {feat.names(extra)} which "
                             f"the device does not offer ({offered:#x})")
        if not wanted & VERSION_1:
            raise UsageError("driver features must include VERSION_1 (modern-only driver)")
        common = self.state.common
        for select in (0, 1):
            self.qt.writel(common + COMMON_GFSELECT, select)
            self.qt.writel(common + COMMON_GF, (wanted >> (32 * select)) & 0xFFFFFFFF)
        self.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK)
        if not self.status() & FEATURES_OK:
            raise QemuError(f"device refused driver features {wanted:#x} "
                            f"({', '.join(feat.names(wanted))})")
        self.state.driver_features = wanted
        return wanted

    # -- queues ---------------------------------------------------------------------------
    def num_queues(self) -> int:
        return self.qt.readw(self.state.common + COMMON_NUMQ)

    def setup_queue(self, index: int, size: int | None = None) -> QueueState:
        """Lay out queue ``index`` (0 RX, 1 TX) in guest memory, tell the device, enable it.
        ``size`` None keeps the device's maximum (must be <= 1024)."""
        if index not in (RX, TX):
            raise UsageError(f"queue {index}: this driver runs only RX (0) and TX (1)")
        common, qt = self.state.common, self.qt
        qt.writew(common + COMMON_Q_SELECT, index)
        maximum = qt.readw(common + COMMON_Q_SIZE)
        if maximum == 0:
            raise QemuError(f"device has no queue {index}")
        size = maximum if size is None else size
        if size < 1 or size > min(maximum, MAX_QUEUE_SIZE) or size & (size - 1):
            raise UsageError(f"queue size {size} must be a power of two <= "
                             f"{min(maximum, MAX_QUEUE_SIZE)}")
        desc, avail, used = ring_layout(index, size)
        qt.memwrite(desc, bytes(used + 6 + 8 * size - desc))
        qt.writew(avail, VRING_AVAIL_F_NO_INTERRUPT)
        qt.writew(common + COMMON_Q_SIZE, size)
        qt.writeq(common + COMMON_Q_DESC, desc)
        qt.writeq(common + COMMON_Q_AVAIL, avail)
        qt.writeq(common + COMMON_Q_USED, used)
        qt.writew(common + COMMON_Q_ENABLE, 1)
        q = QueueState(index=index, size=size, desc=desc, avail=avail, used=used,
                       buffers=RX_BUFFERS if index == RX else TX_BUFFERS,
                       free=list(range(size)))
        self.state.queues[index] = q
        return q

    def driver_ok(self) -> float:
        """Set DRIVER_OK; returns the write's round trip in seconds (QEMU starts vhost
        inside it). QemuError if the device then reports NEEDS_RESET or FAILED."""
        status = self.status()
        start = time.perf_counter()
        self.set_status(status | DRIVER_OK)
        elapsed = time.perf_counter() - start
        after = self.status()
        if after & (NEEDS_RESET | FAILED) or not after & DRIVER_OK:
            raise QemuError(f"device status {after:#x} after DRIVER_OK: the backend failed "
                            "to start (see QEMU's stderr)")
        return elapsed

    def prepare(self, wanted: int | None = None, queue_size: int | None = None,
                rx_buffers: int = 16) -> None:
        """Everything :meth:`start` does before DRIVER_OK: reset, negotiate, RX+TX queues,
        ``rx_buffers`` RX buffers posted (not kicked: the device is not live yet)."""
        self.reset()
        self.negotiate(wanted)
        self.setup_queue(RX, queue_size)
        self.setup_queue(TX, queue_size)
        self.post_rx(rx_buffers, kick=False)

    def start(self, wanted: int | None = None, queue_size: int | None = None,
              rx_buffers: int = 16) -> float:
        """:meth:`prepare`, then DRIVER_OK; returns the DRIVER_OK round trip."""
        self.prepare(wanted, queue_size, rx_buffers)
        return self.driver_ok()

    def _queue(self, index: int) -> QueueState:
        try:
            return self.state.queues[index]
        except KeyError:
            raise UsageError(f"queue {index} is not set up; call setup_queue() or start()") \
                from None

    def notify(self, index: int) -> None:
        """Kick queue ``index`` (16-bit write of its index to its notify address)."""
        self._queue(index)
        qt, st = self.qt, self.state
        qt.writew(st.common + COMMON_Q_SELECT, index)
        off = qt.readw(st.common + COMMON_Q_NOFF)
        qt.writew(st.notify + off * st.notify_multiplier, index)

    def _post(self, q: QueueState, length: int, flags: int, data: bytes = b"") -> int:
        if not q.free:
            raise UsageError(f"queue {q.index} is full ({q.size} buffers in flight); "
                             "collect used buffers first")
        head = q.free.pop(0)
        buf = q.buffers + BUFFER_SIZE * head
        self.qt.memwrite(buf, data)
        self.qt.memwrite(q.desc + 16 * head, _DESC.pack(buf, length, flags, 0))
        self.qt.writew(q.avail + 4 + 2 * (q.avail_idx % q.size), head)
        q.avail_idx = (q.avail_idx + 1) & 0xFFFF
        self.qt.writew(q.avail + 2, q.avail_idx)
        q.in_flight.append(head)
        return head

    def send(self, frame: bytes, *, header: bytes | None = None, kick: bool = True) -> int:
        """Put ``header`` (default: all-zero v1 header) + ``frame`` in the TX ring and
        (``kick``) notify; returns the descriptor id."""
        q = self._queue(TX)
        hdr = net_header() if header is None else header
        if len(hdr) != NET_HDR_SIZE:
            raise UsageError(f"virtio_net_hdr_v1 is {NET_HDR_SIZE} bytes, got {len(hdr)}")
        data = hdr + frame
        if len(data) > BUFFER_SIZE:
            raise UsageError(f"frame of {len(frame)} bytes exceeds the {BUFFER_SIZE}-byte "
                             "TX buffer including the header")
        head = self._post(q, len(data), 0, data)
        if kick:
            self.notify(TX)
        return head

    def post_rx(self, count: int, *, kick: bool = True) -> list[int]:
        """Give ``count`` empty 2 KiB buffers to the device's RX ring."""
        q = self._queue(RX)
        heads = [self._post(q, BUFFER_SIZE, VRING_DESC_F_WRITE) for _ in range(count)]
        if kick and self.status() & DRIVER_OK:
            self.notify(RX)
        return heads

    def used_idx(self, index: int) -> int:
        """The device's ``used.idx`` of queue ``index``, read from guest memory."""
        return self.qt.readw(self._queue(index).used + 2)

    def wait_used(self, index: int, count: int = 1, timeout: float = 5.0) -> int:
        """Poll until ``count`` new used entries exist past the driver's ``last_used``;
        returns used.idx. QemuError on timeout (with the indexes seen)."""
        q = self._queue(index)
        deadline = time.monotonic() + timeout
        while True:
            idx = self.used_idx(index)
            if (idx - q.last_used) & 0xFFFF >= count:
                return idx
            if time.monotonic() > deadline:
                raise QemuError(
                    f"queue {index}: used.idx stayed {idx} (driver saw {q.last_used}, "
                    f"avail {q.avail_idx}) for {timeout} s: the backend moved nothing",
                )
            time.sleep(0.001)

    def pop_used(self, index: int) -> list[tuple[int, bytes]]:
        """Collect new used entries of ``index``: (descriptor id, bytes the device wrote,
        header included, for RX; empty for TX). Frees their descriptors."""
        q = self._queue(index)
        out: list[tuple[int, bytes]] = []
        idx = self.used_idx(index)
        while q.last_used != idx:
            elem = self.qt.memread(q.used + 4 + 8 * (q.last_used % q.size), 8)
            head, length = struct.unpack("<II", elem)
            if head not in q.in_flight:
                raise QemuError(f"queue {index}: device returned descriptor {head} that the "
                                "driver did not post")
            q.in_flight.remove(head)
            q.free.append(head)
            data = b""
            if index == RX and length:
                data = self.qt.memread(q.buffers + BUFFER_SIZE * head, min(length, BUFFER_SIZE))
            out.append((head, data))
            q.last_used = (q.last_used + 1) & 0xFFFF
        return out

    def receive(self, timeout: float = 5.0, *, repost: bool = True) -> list[bytes]:
        """Wait for at least one RX frame; returns frames without the 12-byte header and
        (``repost``) gives the buffers back."""
        self.wait_used(RX, 1, timeout)
        frames = [data[NET_HDR_SIZE:] for _, data in self.pop_used(RX)]
        if repost:
            self.post_rx(len(frames))
        return frames

    def mac(self) -> bytes:
        """The device's MAC address (virtio_net_config.mac)."""
        return self.qt.memread(self.state.device_cfg, 6)


class _Pci:
    """Type 1 configuration access to bus 0 ``slot`` function 0 through 0xcf8/0xcfc."""

    def __init__(self, qtest: QtestClient, slot: int) -> None:
        if not 0 <= slot < 32:
            raise UsageError(f"PCI slot {slot} is out of range 0-31")
        self.qt = qtest
        self.slot = slot

    def _select(self, offset: int) -> int:
        self.qt.outl(PCI_CONFIG_ADDRESS, 0x8000_0000 | self.slot << 11 | offset & 0xFC)
        return PCI_CONFIG_DATA + (offset & 3)

    def read8(self, offset: int) -> int:
        return self.qt.inb(self._select(offset))

    def read16(self, offset: int) -> int:
        return self.qt.inw(self._select(offset))

    def read32(self, offset: int) -> int:
        return self.qt.inl(self._select(offset))

    def write16(self, offset: int, value: int) -> None:
        self.qt.outw(self._select(offset), value)

    def write32(self, offset: int, value: int) -> None:
        self.qt.outl(self._select(offset), value)

    def map_bar64(self, bar: int, address: int) -> None:
        reg = PCI_BAR0 + 4 * bar
        low = self.read32(reg)
        if low & 0x7 != 0x4:
            raise QemuError(f"BAR{bar} is not a 64-bit memory BAR (reads {low:#x})")
        self.write32(reg, 0xFFFF_FFFF)
        size = (~(self.read32(reg) & ~0xF) & 0xFFFF_FFFF) + 1
        if address % size:
            raise UsageError(f"BAR{bar} address {address:#x} is not aligned to its size "
                             f"{size:#x}")
        self.write32(reg, address & 0xFFFF_FFFF)
        self.write32(reg + 4, address >> 32)
