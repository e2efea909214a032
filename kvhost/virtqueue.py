"""A driver-side split virtqueue (virtio 1.x, section 2.7) laid out in guest memory.

Enough of a virtio driver to push frames through a vhost device from Python: the device
(kernel vhost) reads the descriptor table and the avail ring and writes the used ring.
Layout, starting at ``base_gpa`` (all little-endian)::

    desc_gpa  = base_gpa                 struct vring_desc[size]      16 bytes each, align 16
                                           u64 addr, u32 len, u16 flags, u16 next
    avail_gpa = desc_gpa + 16*size       u16 flags, u16 idx, u16 ring[size], u16 used_event
                                                                        align 2
    used_gpa  = align4(avail end)        u16 flags, u16 idx, {u32 id, u32 len}[size],
                                           u16 avail_event              align 4

Driver protocol: write descriptors, put each chain's head into ``avail.ring[idx % size]``,
then bump ``avail.idx`` (:meth:`SplitRing.publish`) and kick. The device returns chains
through ``used.ring`` and bumps ``used.idx``; :meth:`SplitRing.pop_used` collects them and
frees their descriptors. Indices are free-running 16-bit counters.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from kvhost import abi
from kvhost.memory import GuestMemory

DESC_SIZE = abi.sizeof("vring_desc")  # 16
USED_ELEM_SIZE = abi.sizeof("vring_used_elem")  # 8
DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4
MAX_SIZE = abi.VHOST_MAX_RING_SIZE

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")


def _align(n: int, a: int) -> int:
    return (n + a - 1) & ~(a - 1)


class SplitRing:
    """One split virtqueue of ``size`` entries at ``base_gpa`` in ``memory``.

    The constructor zeroes the ring area. Raises ``ValueError`` when ``size`` is not a power
    of two from 1 to 32768, ``base_gpa`` is not 16-byte aligned, or the ring does not fit
    inside one region of ``memory``.
    """

    def __init__(self, memory: GuestMemory, index: int, size: int, base_gpa: int) -> None:
        if size < 1 or size > MAX_SIZE or size & (size - 1):
            raise ValueError(f"ring size {size} must be a power of two from 1 to {MAX_SIZE}")
        if base_gpa % DESC_ALIGN:
            raise ValueError(f"ring base 0x{base_gpa:x} must be {DESC_ALIGN}-byte aligned")
        self.memory = memory
        self.index = index
        self.size = size
        self.desc_gpa = base_gpa
        self.avail_gpa = base_gpa + DESC_SIZE * size
        self.used_gpa = _align(self.avail_gpa + 6 + 2 * size, USED_ALIGN)
        # raises ValueError if the ring is not inside one region
        memory.write(base_gpa, bytes(self.bytes_needed(size)))
        self._free: list[int] = list(range(size - 1, -1, -1))  # a stack; head 0 first
        self._chains: dict[int, list[int]] = {}  # head -> descriptor ids in flight
        self._avail_idx = 0  # driver's shadow, published by publish()
        self._last_used = 0

    @staticmethod
    def bytes_needed(size: int) -> int:
        """Bytes from the descriptor table to the end of the used ring."""
        avail_end = DESC_SIZE * size + 6 + 2 * size
        return _align(avail_end, USED_ALIGN) + 6 + USED_ELEM_SIZE * size

    @property
    def num_free(self) -> int:
        """Descriptors not owned by the device or an unpublished chain."""
        return len(self._free)

    @property
    def avail_idx(self) -> int:
        """The driver's next avail index (published or not), modulo 2**16."""
        return self._avail_idx

    @property
    def last_used(self) -> int:
        """The used index up to which :meth:`pop_used` has consumed entries."""
        return self._last_used

    def add_chain(self, buffers: Sequence[tuple[int, int, bool]]) -> int:
        """Queue one descriptor chain of ``(buf_gpa, length, device_writes)`` entries.

        Device-readable entries must precede device-writable ones (virtio 2.7.4.2). The chain
        becomes visible to the device at the next :meth:`publish`. Returns its head id.
        Raises ``ValueError`` when the chain is empty, misordered, a buffer lies outside
        guest memory, or the ring has fewer than ``len(buffers)`` free descriptors.
        """
        if not buffers:
            raise ValueError("a descriptor chain needs at least one buffer")
        if len(buffers) > len(self._free):
            raise ValueError(
                f"ring {self.index} has {len(self._free)} free descriptors, "
                f"{len(buffers)} needed: call pop_used() to reclaim completed ones"
            )
        seen_write = False
        for gpa, length, write in buffers:
            if length <= 0 or length > 0xFFFF_FFFF:
                raise ValueError(f"buffer length {length} must be from 1 to 2**32-1")
            self.memory.hva(gpa)  # raises ValueError outside guest memory
            self.memory.hva(gpa + length - 1)
            if seen_write and not write:
                raise ValueError("device-readable buffers must precede device-writable ones")
            seen_write = seen_write or write
        ids = [self._free.pop() for _ in buffers]
        for pos, (gpa, length, write) in enumerate(buffers):
            flags = abi.VRING_DESC_F_WRITE if write else 0
            nxt = 0
            if pos + 1 < len(ids):
                flags |= abi.VRING_DESC_F_NEXT
                nxt = ids[pos + 1]
            self.memory.write(
                self.desc_gpa + DESC_SIZE * ids[pos], _DESC.pack(gpa, length, flags, nxt)
            )
        head = ids[0]
        self._chains[head] = ids
        slot = self._avail_idx % self.size
        self.memory.write(self.avail_gpa + 4 + 2 * slot, _U16.pack(head))
        self._avail_idx = (self._avail_idx + 1) & 0xFFFF
        return head

    def add_buffer(self, buf_gpa: int, length: int, write: bool) -> int:
        """Queue a one-descriptor buffer (``write``: the device writes into it, e.g. RX)."""
        return self.add_chain([(buf_gpa, length, write)])

    def publish(self) -> None:
        """Make every queued chain visible to the device by storing ``avail.idx``.

        Descriptors and ring slots were written before, in program order; x86's store
        ordering keeps the device from seeing the index before them.
        """
        self.memory.write(self.avail_gpa + 2, _U16.pack(self._avail_idx))

    def used_idx(self) -> int:
        """The device's ``used.idx``."""
        return int(_U16.unpack(self.memory.read(self.used_gpa + 2, 2))[0])

    def pop_used(self) -> list[tuple[int, int]]:
        """Collect ``(head id, bytes written)`` of every chain the device returned since
        the last call, oldest first, and free their descriptors.

        Raises ``ValueError`` if the device returns an id that was not outstanding.
        """
        out: list[tuple[int, int]] = []
        end = self.used_idx()
        while self._last_used != end:
            slot = self._last_used % self.size
            off = self.used_gpa + 4 + USED_ELEM_SIZE * slot
            head, length = _USED_ELEM.unpack(self.memory.read(off, USED_ELEM_SIZE))
            ids = self._chains.pop(head, None)
            if ids is None:
                raise ValueError(f"ring {self.index}: device returned id {head}, not in flight")
            # the driver's own record of the chain, not the (device-writable) table
            self._free.extend(reversed(ids))
            out.append((head, length))
            self._last_used = (self._last_used + 1) & 0xFFFF
        return out
