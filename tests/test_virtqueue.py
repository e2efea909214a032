"""Host tier: split ring layout and driver bookkeeping, checked byte by byte in guest memory.

The device side is played by the test writing the used ring as the virtio spec says a
device does; the real device (kernel vhost) drives these rings in test_kernel_datapath.py.
"""

from __future__ import annotations

import struct

import pytest

from kvhost import abi
from kvhost.memory import GuestMemory
from kvhost.virtqueue import SplitRing


@pytest.mark.parametrize(
    ("size", "avail_off", "used_off", "total"),
    [
        # desc 16*n; avail 6+2n; used aligned to 4, 6+8n (virtio 1.x 2.7)
        (1, 16, 24, 24 + 14),
        (2, 32, 44, 44 + 22),
        (256, 4096, 4616, 4616 + 6 + 2048),
        (1024, 16384, 18440, 18440 + 6 + 8192),
    ],
)
def test_layout(size: int, avail_off: int, used_off: int, total: int) -> None:
    with GuestMemory.create([(0, 1 << 20)]) as mem:
        ring = SplitRing(mem, 0, size, 0x1000)
        assert ring.desc_gpa == 0x1000
        assert ring.avail_gpa == 0x1000 + avail_off
        assert ring.used_gpa == 0x1000 + used_off
        assert ring.used_gpa % 4 == 0
        assert SplitRing.bytes_needed(size) == total


@pytest.mark.parametrize("size", [0, 3, 100, 65536])
def test_bad_size(size: int) -> None:
    with GuestMemory.create([(0, 1 << 20)]) as mem, pytest.raises(ValueError, match="power of two"):
        SplitRing(mem, 0, size, 0)


def test_bad_base_and_too_small_memory() -> None:
    with GuestMemory.create([(0, 0x2000)]) as mem:
        with pytest.raises(ValueError, match="aligned"):
            SplitRing(mem, 0, 8, 0x8)
        with pytest.raises(ValueError, match="inside one region"):
            SplitRing(mem, 0, 256, 0x1000)  # needs 0x1a0e bytes, 0x1000 are left
        SplitRing(mem, 0, 256, 0)  # fits from the start of the region


def _used_push(mem: GuestMemory, ring: SplitRing, entries: list[tuple[int, int]]) -> None:
    """Act as the device: append used elements and bump used.idx."""
    idx = ring.used_idx()
    for head, length in entries:
        mem.write(ring.used_gpa + 4 + 8 * (idx % ring.size), struct.pack("<II", head, length))
        idx = (idx + 1) & 0xFFFF
    mem.write(ring.used_gpa + 2, struct.pack("<H", idx))


def test_add_publish_and_pop() -> None:
    with GuestMemory.create([(0, 1 << 20)]) as mem:
        ring = SplitRing(mem, 1, 4, 0x1000)
        h0 = ring.add_buffer(0x10000, 60, write=False)
        h1 = ring.add_chain([(0x11000, 12, False), (0x12000, 1500, True)])
        # descriptors as the device will read them
        assert struct.unpack("<QIHH", mem.read(ring.desc_gpa + 16 * h0, 16)) == (0x10000, 60, 0, 0)
        first = struct.unpack("<QIHH", mem.read(ring.desc_gpa + 16 * h1, 16))
        assert first[:3] == (0x11000, 12, abi.VRING_DESC_F_NEXT)
        second = struct.unpack("<QIHH", mem.read(ring.desc_gpa + 16 * first[3], 16))
        assert second == (0x12000, 1500, abi.VRING_DESC_F_WRITE, 0)
        # nothing visible before publish
        assert mem.read(ring.avail_gpa + 2, 2) == b"\0\0"
        ring.publish()
        flags, idx, r0, r1 = struct.unpack("<HHHH", mem.read(ring.avail_gpa, 8))
        assert (flags, idx, r0, r1) == (0, 2, h0, h1)
        assert ring.num_free == 1
        _used_push(mem, ring, [(h1, 1512), (h0, 0)])
        assert ring.used_idx() == 2
        assert ring.pop_used() == [(h1, 1512), (h0, 0)]
        assert ring.pop_used() == []
        assert ring.num_free == 4


def test_wraps_indices_and_reuses_descriptors() -> None:
    with GuestMemory.create([(0, 1 << 20)]) as mem:
        ring = SplitRing(mem, 0, 2, 0)
        for n in range(1, 70000, 1):  # crosses the 16-bit wrap
            head = ring.add_buffer(0x8000, 64, write=True)
            ring.publish()
            _used_push(mem, ring, [(head, 64)])
            assert ring.pop_used() == [(head, 64)]
            if n in (65535, 65536, 65537):
                assert ring.avail_idx == n & 0xFFFF == ring.used_idx()
        assert ring.num_free == 2


def test_refusals() -> None:
    with GuestMemory.create([(0, 0x10000)]) as mem:
        ring = SplitRing(mem, 0, 2, 0)
        with pytest.raises(ValueError, match="not inside one region"):
            ring.add_buffer(0xFFF0, 0x20, write=False)
        with pytest.raises(ValueError, match="precede"):
            ring.add_chain([(0x8000, 4, True), (0x9000, 4, False)])
        with pytest.raises(ValueError, match="at least one"):
            ring.add_chain([])
        ring.add_buffer(0x8000, 4, write=False)
        ring.add_buffer(0x8000, 4, write=False)
        with pytest.raises(ValueError, match="free descriptors"):
            ring.add_buffer(0x8000, 4, write=False)
        ring.publish()
        _used_push(mem, ring, [(7, 0)])
        with pytest.raises(ValueError, match="not in flight"):
            ring.pop_used()
