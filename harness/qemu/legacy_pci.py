"""A legacy (virtio 0.9.5) virtio-net PCI driver over qtest, for versions without VERSION_1.

Interface versions older than VERSION_1 (kvhost's v1-v4) cannot sit behind a modern-only
device: QEMU refuses to start ("Device doesn't support modern mode, and legacy mode is
disabled"). A VM pinned to one of them has a legacy device (``MachineConfig(legacy=True)``),
and this driver plays its guest. It is :class:`~harness.qemu.virtio_pci.VirtioNetDriver` with
the legacy transport swapped in; rings, buffers, used-ring polling and the saved
:class:`~harness.qemu.virtio_pci.DriverState` are shared (the state's ``bar4``/``common`` hold
the I/O base, ``notify`` the notify register, ``device_cfg`` the config block).

Legacy register block (I/O BAR0; MSI-X stays disabled, so no vector registers are inserted
and the device config starts at 0x14)::

    0x00 u32 device features    0x04 u32 driver features    0x08 u32 queue PFN
    0x0c u16 queue size         0x0e u16 queue select       0x10 u16 queue notify
    0x12 u8  device status      0x13 u8  ISR                0x14 device config (MAC...)

No FEATURES_OK step; the queue size is the device's; ring layout (0.9.5 §2.3, 4096-byte
alignment): descriptors at PFN*4096, avail ring right after them, used ring at the next
4096-byte boundary. The virtio-net header is 12 bytes with MRG_RXBUF, else 10.
"""

from __future__ import annotations

import time

from harness.qemu.errors import QemuError
from harness.qemu.machine import DEVICE_SLOT
from harness.qemu.qtest import QtestClient
from harness.qemu.virtio_pci import (
    BUFFER_SIZE,
    RING_BASE,
    RING_STRIDE,
    RX,
    RX_BUFFERS,
    TX,
    TX_BUFFERS,
    UNSUPPORTED,
    DriverState,
    QueueState,
    VirtioNetDriver,
)
from kvhost import features as feat
from kvhost.errors import UsageError

PCI_CONFIG_ADDRESS = 0xCF8
PCI_CONFIG_DATA = 0xCFC
PCI_BAR0 = 0x10
PCI_COMMAND_IO = 0x1
PCI_COMMAND_MASTER = 0x4
VIRTIO_VENDOR = 0x1AF4
LEGACY_NET_DEVICE = 0x1000
#: where BAR0 is put in I/O space (the HLT BIOS assigns nothing)
IO_BASE = 0xC000

REG_DEVICE_FEATURES = 0x00
REG_DRIVER_FEATURES = 0x04
REG_QUEUE_PFN = 0x08
REG_QUEUE_SIZE = 0x0C
REG_QUEUE_SELECT = 0x0E
REG_QUEUE_NOTIFY = 0x10
REG_STATUS = 0x12
REG_CONFIG = 0x14

ACKNOWLEDGE, DRIVER, DRIVER_OK = 1, 2, 4
FAILED = 0x80
PAGE = 4096
#: bit 30 is BAD_FEATURE to a legacy device: a driver writing it gets QEMU's fallback feature
#: set instead of its own. QEMU's vhost-user netdev does show bit 30 in the legacy offer
#: (its PROTOCOL_FEATURES bit leaks through), so a driver must never echo the offer blindly.
BAD_FEATURE = 1 << 30
MRG_RXBUF = feat.mask(["MRG_RXBUF"])


def legacy_ring_layout(queue: int, size: int) -> tuple[int, int, int]:
    """(desc, avail, used) guest-physical addresses of legacy queue ``queue``."""
    desc = RING_BASE + RING_STRIDE * queue
    avail = desc + 16 * size
    used = (avail + 6 + 2 * size + PAGE - 1) & ~(PAGE - 1)
    return desc, avail, used


class LegacyVirtioNet(VirtioNetDriver):
    """The legacy virtio-net device at ``slot``. Errors as for VirtioNetDriver."""

    @classmethod
    def probe(cls, qtest: QtestClient, *, slot: int = DEVICE_SLOT,
              bar4: int = IO_BASE) -> LegacyVirtioNet:
        """Find the legacy device and map its I/O BAR0 at ``bar4`` (an I/O port base; the
        name is the shared signature's)."""
        pci = _Cfg(qtest, slot)
        vendor_device = pci.read32(0)
        vendor, device = vendor_device & 0xFFFF, vendor_device >> 16
        if (vendor, device) != (VIRTIO_VENDOR, LEGACY_NET_DEVICE):
            raise QemuError(
                f"PCI slot {slot} holds {vendor:04x}:{device:04x}, not a legacy virtio-net "
                f"device ({VIRTIO_VENDOR:04x}:{LEGACY_NET_DEVICE:04x}); start QEMU with "
                "MachineConfig(legacy=True)"
            )
        if not pci.read32(PCI_BAR0) & 1:
            raise QemuError("BAR0 of the legacy device is not an I/O BAR")
        pci.write32(PCI_BAR0, bar4)
        pci.write32(0x04, pci.read32(0x04) & 0xFFFF | PCI_COMMAND_IO | PCI_COMMAND_MASTER)
        state = DriverState(slot=slot, bar4=bar4, common=bar4, notify=bar4 + REG_QUEUE_NOTIFY,
                            notify_multiplier=0, device_cfg=bar4 + REG_CONFIG)
        return cls(qtest, state)

    @classmethod
    def attach(cls, qtest: QtestClient, state: DriverState) -> LegacyVirtioNet:
        """Continue a saved driver on a migrated legacy device (BAR0, status and each
        queue's PFN must be as saved; QemuError otherwise)."""
        bar = _Cfg(qtest, state.slot).read32(PCI_BAR0) & ~0x3
        if bar != state.bar4:
            raise QemuError(f"migrated device has BAR0 at {bar:#x}, saved state says "
                            f"{state.bar4:#x}: not the device the state was saved from")
        drv = cls(qtest, state)
        status = drv.status()
        if not status & DRIVER_OK or status & FAILED:
            raise QemuError(f"migrated legacy device status {status:#x} is not a running driver")
        for q in state.queues.values():
            qtest.outw(state.common + REG_QUEUE_SELECT, q.index)
            pfn = qtest.inl(state.common + REG_QUEUE_PFN)
            if pfn * PAGE != q.desc:
                raise QemuError(f"migrated queue {q.index} is at {pfn * PAGE:#x}, saved "
                                f"state says {q.desc:#x}")
        return drv

    @property
    def header_size(self) -> int:
        return 12 if self.state.driver_features & MRG_RXBUF else 10

    def status(self) -> int:
        return self.qt.inb(self.state.common + REG_STATUS)

    def set_status(self, value: int) -> None:
        self.qt.outb(self.state.common + REG_STATUS, value)

    def reset(self, timeout: float = 5.0) -> None:
        self.set_status(0)
        if self.status() != 0:
            raise QemuError("legacy device did not reset (status did not read 0)")
        self.state.queues.clear()
        self.state.driver_features = 0

    def read_device_features(self) -> int:
        """The 32 device feature bits of the legacy interface."""
        value = self.qt.inl(self.state.common + REG_DEVICE_FEATURES)
        self.state.device_features = value
        return value

    def negotiate(self, wanted: int | None = None) -> int:
        """ACKNOWLEDGE|DRIVER and write driver features (legacy has no FEATURES_OK).
        ``wanted`` None: every offered bit this driver honours; never bit 30."""
        self.set_status(ACKNOWLEDGE)
        self.set_status(ACKNOWLEDGE | DRIVER)
        offered = self.read_device_features()
        if wanted is None:
            wanted = offered & ~UNSUPPORTED & ~BAD_FEATURE
        if wanted & ~offered:
            raise UsageError(f"driver features {wanted:#x} include {feat.names(wanted & ~offered)}"
                             f" which the device does not offer ({offered:#x})")
        if wanted & BAD_FEATURE:
            raise UsageError("driver features must not contain bit 30 (BAD_FEATURE to a legacy "
                             "device: QEMU would substitute its fallback features)")
        self.qt.outl(self.state.common + REG_DRIVER_FEATURES, wanted)
        self.state.driver_features = wanted
        return wanted

    def num_queues(self) -> int:
        return 2

    def setup_queue(self, index: int, size: int | None = None) -> QueueState:
        """Lay out queue ``index`` at the device's size (legacy cannot change it) and give
        the device its page frame number."""
        if index not in (RX, TX):
            raise UsageError(f"queue {index}: this driver runs only RX (0) and TX (1)")
        io, qt = self.state.common, self.qt
        qt.outw(io + REG_QUEUE_SELECT, index)
        device_size = qt.inw(io + REG_QUEUE_SIZE)
        if device_size == 0:
            raise QemuError(f"legacy device has no queue {index}")
        if size is not None and size != device_size:
            raise UsageError(f"a legacy queue's size is the device's ({device_size}), not {size}")
        desc, avail, used = legacy_ring_layout(index, device_size)
        if used + 6 + 8 * device_size > desc + RING_STRIDE:
            raise QemuError(f"legacy queue {index} of {device_size} entries does not fit")
        qt.memwrite(desc, bytes(used + 6 + 8 * device_size - desc))
        qt.outl(io + REG_QUEUE_PFN, desc // PAGE)
        q = QueueState(index=index, size=device_size, desc=desc, avail=avail, used=used,
                       buffers=RX_BUFFERS if index == RX else TX_BUFFERS,
                       free=list(range(device_size)))
        self.state.queues[index] = q
        return q

    def driver_ok(self) -> float:
        status = self.status()
        start = time.perf_counter()
        self.set_status(status | DRIVER_OK)
        elapsed = time.perf_counter() - start
        after = self.status()
        if after & FAILED or not after & DRIVER_OK:
            raise QemuError(f"legacy device status {after:#x} after DRIVER_OK: the backend "
                            "failed to start (see QEMU's stderr)")
        return elapsed

    def notify(self, index: int) -> None:
        self._queue(index)
        self.qt.outw(self.state.notify, index)

    def send(self, frame: bytes, *, header: bytes | None = None, kick: bool = True) -> int:
        """``header`` (default all zero, :attr:`header_size` bytes) + ``frame`` into TX."""
        hdr = bytes(self.header_size) if header is None else header
        if len(hdr) != self.header_size:
            raise UsageError(f"the negotiated virtio-net header is {self.header_size} bytes, "
                             f"got {len(hdr)}")
        data = hdr + frame
        if len(data) > BUFFER_SIZE:
            raise UsageError(f"frame of {len(frame)} bytes exceeds the TX buffer")
        head = self._post(self._queue(TX), len(data), 0, data)
        if kick:
            self.notify(TX)
        return head

    def receive(self, timeout: float = 5.0, *, repost: bool = True) -> list[bytes]:
        self.wait_used(RX, 1, timeout)
        frames = [data[self.header_size:] for _, data in self.pop_used(RX)]
        if repost:
            self.post_rx(len(frames))
        return frames

    def mac(self) -> bytes:
        return bytes(self.qt.inb(self.state.device_cfg + i) for i in range(6))


class _Cfg:
    """PCI configuration dwords of bus 0 ``slot`` function 0 through 0xcf8/0xcfc."""

    def __init__(self, qtest: QtestClient, slot: int) -> None:
        if not 0 <= slot < 32:
            raise UsageError(f"PCI slot {slot} is out of range 0-31")
        self.qt = qtest
        self.slot = slot

    def _select(self, offset: int) -> None:
        self.qt.outl(PCI_CONFIG_ADDRESS, 0x8000_0000 | self.slot << 11 | offset & 0xFC)

    def read32(self, offset: int) -> int:
        self._select(offset)
        return self.qt.inl(PCI_CONFIG_DATA)

    def write32(self, offset: int, value: int) -> None:
        self._select(offset)
        self.qt.outl(PCI_CONFIG_DATA, value)
