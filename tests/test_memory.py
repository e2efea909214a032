"""Host tier: memfd guest memory and frontend region mapping (memfds are plain memory,
no vhost device is involved)."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import pytest

from kvhost.errors import RemoteProtocolError
from kvhost.memory import FrontendRegion, GuestMemory, MappedTable, MemoryRegion

MiB = 1 << 20


def test_create_read_write_and_hva(fd_leak_check: None) -> None:
    with GuestMemory.create([(0, MiB), (0x100000000, 2 * MiB)]) as mem:
        regions = mem.regions
        assert [(r.guest_phys_addr, r.memory_size) for r in regions] == [
            (0, MiB),
            (0x100000000, 2 * MiB),
        ]
        assert len(mem.fds) == 2 and all(r.fd in mem.fds for r in regions)
        mem.write(0x100000010, b"hello")
        assert mem.read(0x100000010, 5) == b"hello"
        # the hva really is where the bytes live in this process
        assert ctypes.string_at(mem.hva(0x100000010), 5) == b"hello"
        assert mem.hva(0x100000010) == regions[1].userspace_addr + 0x10
        # and the memfd is the same memory (what a vhost-user peer would map)
        assert os.pread(regions[1].fd or -1, 5, 0x10) == b"hello"


def test_access_outside_regions_is_refused() -> None:
    with GuestMemory.create([(0x1000, 0x1000)]) as mem:
        with pytest.raises(ValueError, match="not inside one region"):
            mem.read(0, 4)
        with pytest.raises(ValueError, match="not inside one region"):
            mem.write(0x1FFE, b"abcd")  # runs off the end
        mem.write(0x1FFC, b"abcd")
        assert mem.read(0x1FFC, 4) == b"abcd"


@pytest.mark.parametrize(
    ("regions", "match"),
    [
        ([], "at least one"),
        ([(0, 0)], "empty"),
        ([(0, 0x2000), (0x1000, 0x1000)], "overlap"),
    ],
)
def test_create_rejects_bad_layouts(regions: list[tuple[int, int]], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GuestMemory.create(regions)


def test_close_is_idempotent_and_blocks_access(fd_leak_check: None) -> None:
    mem = GuestMemory.create([(0, 0x1000)])
    mem.close()
    mem.close()
    with pytest.raises(ValueError, match="closed"):
        mem.read(0, 1)


def _frontend_region(mem: GuestMemory, i: int, frontend_va: int, offset: int = 0) -> FrontendRegion:
    r = mem.regions[i]
    # the table takes ownership of the fd it gets: hand it a duplicate
    return FrontendRegion(
        r.guest_phys_addr + offset, r.memory_size - offset, frontend_va, offset, os.dup(r.fd or -1)
    )


def test_mapped_table_translates_to_the_same_memory(fd_leak_check: None) -> None:
    with GuestMemory.create([(0, MiB), (0x200000, MiB)]) as mem:
        regions = [
            _frontend_region(mem, 0, 0x7F0000000000),
            # a region starting 0x1000 into its file, like a frontend's mmap_offset
            _frontend_region(mem, 1, 0x7F1000000000, offset=0x1000),
        ]
        with MappedTable(regions) as table:
            assert len(table) == 2
            mem.write(0x201010, b"ring")
            local = table.translate_frontend_va(0x7F1000000010, 4)
            assert ctypes.string_at(local, 4) == b"ring"
            assert table.translate_gpa(0x201010, 4) == local
            vr = table.vhost_regions()
            assert vr[1] == MemoryRegion(0x201000, MiB - 0x1000, vr[1].userspace_addr)
            assert vr[1].userspace_addr + 0x10 == local
            with pytest.raises(ValueError, match="outside every memory region"):
                table.translate_frontend_va(0x7F1000000000 + MiB - 0x1000 - 2, 4)
            with pytest.raises(ValueError, match="outside"):
                table.translate_gpa(0x201000 + MiB - 0x1000 - 2, 4)


def test_mapped_table_rejects_and_closes_fds(fd_leak_check: None) -> None:
    with GuestMemory.create([(0, MiB)]) as mem:
        a = _frontend_region(mem, 0, 0x10000000)
        b = FrontendRegion(0x80000, 0x1000, 0x20000000, 0, os.dup(mem.fds[0]))  # gpa overlap
        with pytest.raises(RemoteProtocolError, match="overlap"):
            MappedTable([a, b], error=RemoteProtocolError)
        many = [
            FrontendRegion(i * 0x1000, 0x1000, 0x10000000 + i * 0x1000, 0, os.dup(mem.fds[0]))
            for i in range(3)
        ]
        with pytest.raises(ValueError, match="exceed the limit of 2"):
            MappedTable(many, max_regions=2)
        # a file too small for the region would SIGBUS on access: refused up front
        small = FrontendRegion(0, 2 * MiB, 0x10000000, 0, os.dup(mem.fds[0]))
        with pytest.raises(ValueError, match="the region needs"):
            MappedTable([small])


def _mapped_ranges() -> set[int]:
    starts = set()
    for line in Path("/proc/self/maps").read_text().splitlines():
        starts.add(int(line.split("-", 1)[0], 16))
    return starts


def test_mapped_table_same_as_compares_values_and_files(fd_leak_check: None) -> None:
    with (
        GuestMemory.create([(0, MiB)]) as mem,
        GuestMemory.create([(0, MiB)]) as other,
        MappedTable([_frontend_region(mem, 0, 0x7F0000000000)]) as table,
    ):
        same = [_frontend_region(mem, 0, 0x7F0000000000)]
        moved = [_frontend_region(mem, 0, 0x7F2000000000)]
        # same values, but another memfd: QEMU restarted with new RAM
        other_file = [_frontend_region(other, 0, 0x7F0000000000)]
        assert table.same_as(same)
        assert not table.same_as(moved)
        assert not table.same_as(other_file)
        assert not table.same_as(same + moved)
        # same_as never takes the fds: the caller still owns (and closes) them
        for r in same + moved + other_file:
            os.close(r.fd)


def test_mapped_table_close_unmaps(fd_leak_check: None) -> None:
    with GuestMemory.create([(0, MiB), (0x200000, MiB)]) as mem:
        table = MappedTable(
            [_frontend_region(mem, 0, 0x10000000), _frontend_region(mem, 1, 0x20000000)]
        )
        bases = {r.userspace_addr for r in table.vhost_regions()}
        assert bases <= _mapped_ranges()
        table.close()
        table.close()  # idempotent
        assert not bases & _mapped_ranges()
