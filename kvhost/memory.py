"""Guest memory: memfd-backed regions, and regions mapped from a vhost-user frontend.

Two views of the same idea, a list of guest-physical ranges each backed by a shared mapping
in this process::

    guest physical        this process                   (vhost's VHOST_SET_MEM_TABLE wants
    [gpa, gpa+size)  -->  [userspace_addr, +size)         gpa -> userspace_addr of *this*
                                                          process, the owner of the device)

* :class:`GuestMemory` creates the RAM itself (one memfd per region, ``MAP_SHARED``), for
  tests and for a frontend that must hand fds to a backend.
* :class:`MappedTable` maps regions a frontend sent (fd, size, mmap offset, the frontend's
  own virtual address, gpa), so the shim can translate the frontend's ring addresses into
  addresses of its own and give the kernel a memory table valid in the shim's process.

Ownership: ``GuestMemory`` owns its memfds and mappings until :meth:`GuestMemory.close`.
``MappedTable`` takes ownership of every fd handed to it: it closes the fd once mapped (the
mapping keeps the memory alive) and closes it on every error path too.
"""

from __future__ import annotations

import itertools
import mmap
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType

from kvhost import abi

#: the kernel's default ``max_mem_regions`` (vhost module parameter, since 4.2)
DEFAULT_MAX_REGIONS = abi.VHOST_DEFAULT_MAX_MEM_REGIONS

_PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE


@dataclass(frozen=True, slots=True)
class MemoryRegion:
    """One guest-physical range and where it is mapped in this process.

    ``fd`` and ``mmap_offset`` describe the backing file when there is one (GuestMemory's
    memfds, for a vhost-user frontend to send); the kernel only needs the first three fields.
    """

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    fd: int | None = None
    mmap_offset: int = 0

    @property
    def gpa_end(self) -> int:
        """One past the last guest-physical address of the region."""
        return self.guest_phys_addr + self.memory_size

    def contains_gpa(self, gpa: int, length: int = 1) -> bool:
        """True when ``[gpa, gpa+length)`` lies inside the region."""
        return self.guest_phys_addr <= gpa and gpa + length <= self.gpa_end


def address_of(mm: mmap.mmap) -> int:
    """The address of a mapping in this process, without keeping a buffer export alive."""
    ptr = abi.ffi.from_buffer(mm)
    try:
        return int(abi.ffi.cast("uintptr_t", ptr))
    finally:
        # a live export would make mmap.close() raise BufferError
        abi.ffi.release(ptr)


def _check_disjoint(ranges: Iterable[tuple[int, int]], what: str, error: type[Exception]) -> None:
    ordered = sorted(ranges)
    for (a_start, a_size), (b_start, _) in itertools.pairwise(ordered):
        if a_start + a_size > b_start:
            raise error(
                f"{what} overlap: [0x{a_start:x}, 0x{a_start + a_size:x}) and a region "
                f"starting at 0x{b_start:x}; regions must not overlap"
            )


_ADDRESS_SPACE = 1 << 64


def _check_range(start: int, size: int, what: str, error: type[Exception]) -> None:
    if start < 0 or size <= 0:
        raise error(f"{what} 0x{start:x}+0x{size:x} is empty or negative; sizes must be > 0")
    if start + size > _ADDRESS_SPACE:
        raise error(f"{what} 0x{start:x}+0x{size:x} wraps past the 64-bit address space")


class GuestMemory:
    """Guest RAM made of memfd-backed shared mappings, one memfd per region.

    Use :meth:`create`; close with :meth:`close` or as a context manager. Every access
    must fall inside one region (``ValueError`` otherwise).
    """

    def __init__(self, regions: list[MemoryRegion], maps: list[mmap.mmap]) -> None:
        self._regions = regions
        self._maps = maps
        self._closed = False

    @classmethod
    def create(
        cls, regions: Sequence[tuple[int, int]], *, name: str = "kvhost-guest"
    ) -> GuestMemory:
        """Allocate guest RAM: ``regions`` is a sequence of ``(gpa, size)``.

        Raises ``ValueError`` for empty, negative or overlapping ranges and ``OSError`` when
        the kernel refuses the memfd or the mapping (all partial work is undone).
        """
        if not regions:
            raise ValueError("guest memory needs at least one (gpa, size) region")
        for gpa, size in regions:
            _check_range(gpa, size, "guest memory region", ValueError)
        _check_disjoint(regions, "guest memory regions", ValueError)
        out: list[MemoryRegion] = []
        maps: list[mmap.mmap] = []
        fds: list[int] = []
        try:
            for i, (gpa, size) in enumerate(regions):
                fd = os.memfd_create(f"{name}-{i}", os.MFD_CLOEXEC)
                fds.append(fd)
                os.ftruncate(fd, size)
                mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                maps.append(mm)
                out.append(MemoryRegion(gpa, size, address_of(mm), fd, 0))
        except BaseException:
            for mm in maps:
                mm.close()
            for fd in fds:
                os.close(fd)
            raise
        return cls(out, maps)

    @property
    def regions(self) -> list[MemoryRegion]:
        """The regions, in creation order (a copy)."""
        return list(self._regions)

    @property
    def fds(self) -> list[int]:
        """The memfds, one per region; owned by this object (do not close them)."""
        return [r.fd for r in self._regions if r.fd is not None]

    def _locate(self, gpa: int, length: int) -> tuple[int, int]:
        if self._closed:
            raise ValueError("guest memory is closed")
        if length < 0:
            raise ValueError(f"negative length {length}")
        for i, r in enumerate(self._regions):
            if r.contains_gpa(gpa, max(length, 1)):
                return i, gpa - r.guest_phys_addr
        raise ValueError(
            f"guest address range 0x{gpa:x}+0x{length:x} is not inside one region "
            f"({', '.join(f'0x{r.guest_phys_addr:x}+0x{r.memory_size:x}' for r in self._regions)})"
        )

    def read(self, gpa: int, n: int) -> bytes:
        """``n`` bytes at guest-physical ``gpa``."""
        i, off = self._locate(gpa, n)
        return self._maps[i][off : off + n]

    def write(self, gpa: int, data: bytes) -> None:
        """Store ``data`` at guest-physical ``gpa``."""
        i, off = self._locate(gpa, len(data))
        self._maps[i][off : off + len(data)] = data

    def hva(self, gpa: int) -> int:
        """The address in this process that backs guest-physical ``gpa``."""
        i, off = self._locate(gpa, 1)
        return self._regions[i].userspace_addr + off

    def close(self) -> None:
        """Unmap and close the memfds; idempotent."""
        if self._closed:
            return
        self._closed = True
        for mm in self._maps:
            mm.close()
        for r in self._regions:
            if r.fd is not None:
                os.close(r.fd)

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@dataclass(frozen=True, slots=True)
class FrontendRegion:
    """A region as a vhost-user frontend describes it (``VhostUserMemoryRegion`` + its fd)."""

    guest_phys_addr: int
    memory_size: int
    #: the address of the region in the *frontend's* process
    userspace_addr: int
    mmap_offset: int
    fd: int


class _Mapped:
    """One frontend region mapped shared into this process; :meth:`close` unmaps it.

    The mapping is a Python ``mmap`` object, which owns it: closing twice is harmless and no
    raw address is ever unmapped. (CPython keeps a dup of the fd for the mapping's life, so
    each mapped region holds one fd until it is closed.)
    """

    __slots__ = ("front", "ident", "local_addr", "map")

    def __init__(self, front: FrontendRegion, ident: tuple[int, int], mapping: mmap.mmap):
        self.front = front
        #: (st_dev, st_ino) of the file behind the region
        self.ident = ident
        self.map = mapping
        #: address of gpa == front.guest_phys_addr in this process
        self.local_addr = address_of(mapping) + front.mmap_offset

    def close(self) -> None:
        self.map.close()


class MappedTable:
    """Regions received from a frontend, mapped into this process.

    The constructor takes ownership of every region's fd (see the module docstring) and
    raises ``error(message)`` -- ``ValueError`` unless the caller passes its own type, e.g.
    :class:`~kvhost.errors.RemoteProtocolError` -- for more than ``max_regions`` regions,
    empty or wrapping ranges, or regions overlapping in guest-physical or frontend address
    space. ``OSError`` from ``mmap`` is raised as ``error`` too, naming the region.
    """

    def __init__(
        self,
        regions: Sequence[FrontendRegion] = (),
        *,
        max_regions: int = DEFAULT_MAX_REGIONS,
        error: type[Exception] = ValueError,
    ) -> None:
        self._error = error
        self._max = max_regions
        self._mapped: list[_Mapped] = []
        try:
            self._validate(list(regions))
        except BaseException:
            for r in regions:
                _close_quietly(r.fd)
            raise
        pending = list(regions)
        try:
            while pending:
                # popped first: _map owns (and closes) the fd from here on
                self._mapped.append(self._map(pending.pop(0)))
        except BaseException:
            for r in pending:
                _close_quietly(r.fd)
            self.close()
            raise

    def _validate(self, new: list[FrontendRegion]) -> None:
        err = self._error
        total = len(self._mapped) + len(new)
        if total > self._max:
            raise err(
                f"{total} memory regions exceed the limit of {self._max} (vhost module "
                "parameter max_mem_regions)"
            )
        for r in new:
            size = r.memory_size
            if (
                size > 0
                and 0 <= r.guest_phys_addr <= _ADDRESS_SPACE - size
                and 0 <= r.userspace_addr <= _ADDRESS_SPACE - size
                and r.mmap_offset >= 0
                and r.fd >= 0
            ):
                continue  # the usual case; the checks below word what is wrong
            _check_range(r.guest_phys_addr, size, "memory region gpa", err)
            _check_range(r.userspace_addr, size, "memory region address", err)
            if r.mmap_offset < 0:
                raise err(f"memory region mmap_offset {r.mmap_offset} is negative")
            raise err(f"memory region at gpa 0x{r.guest_phys_addr:x} has no fd")
        everything = [m.front for m in self._mapped] + new
        _check_disjoint(
            ((r.guest_phys_addr, r.memory_size) for r in everything),
            "memory regions (guest-physical)",
            err,
        )
        _check_disjoint(
            ((r.userspace_addr, r.memory_size) for r in everything),
            "memory regions (frontend addresses)",
            err,
        )

    def _map(self, r: FrontendRegion) -> _Mapped:
        # Map from file offset 0 so an mmap_offset that is not page aligned still works.
        length = r.mmap_offset + r.memory_size
        try:
            st = os.fstat(r.fd)
            # Touching a page past the end of a file raises SIGBUS and kills the process:
            # refuse a region its file cannot back (mmap would refuse it too, less clearly).
            too_small = stat.S_ISREG(st.st_mode) and st.st_size < length
            if not too_small:
                mapping = mmap.mmap(r.fd, length, mmap.MAP_SHARED, _PROT_RW)
        except (OSError, OverflowError, ValueError) as exc:
            raise self._error(
                f"cannot map memory region gpa 0x{r.guest_phys_addr:x} size "
                f"0x{r.memory_size:x} offset 0x{r.mmap_offset:x}: {exc}"
            ) from exc
        finally:
            _close_quietly(r.fd)
        if too_small:
            raise self._error(
                f"memory region gpa 0x{r.guest_phys_addr:x}: its file has 0x{st.st_size:x} "
                f"bytes, the region needs 0x{length:x} (mmap_offset + size)"
            )
        return _Mapped(r, (st.st_dev, st.st_ino), mapping)

    def same_as(self, regions: Sequence[FrontendRegion]) -> bool:
        """True when ``regions`` describe exactly this table: the same values, in the same
        order, of the same files (device and inode; this table's mappings keep its files
        alive, so neither can be reused while it exists). Does not take the fds."""
        if len(regions) != len(self._mapped):
            return False
        for m, r in zip(self._mapped, regions, strict=True):
            f = m.front
            if (f.guest_phys_addr, f.memory_size, f.userspace_addr, f.mmap_offset) != (
                r.guest_phys_addr,
                r.memory_size,
                r.userspace_addr,
                r.mmap_offset,
            ):
                return False
        for m, r in zip(self._mapped, regions, strict=True):
            try:
                st = os.fstat(r.fd)
            except OSError:
                return False
            if (st.st_dev, st.st_ino) != m.ident:
                return False
        return True

    def __len__(self) -> int:
        return len(self._mapped)

    def translate_frontend_va(self, addr: int, length: int = 1) -> int:
        """The local address backing the frontend's ``[addr, addr+length)``.

        Raises ``error`` when the range is not inside one region.
        """
        for m in self._mapped:
            f = m.front
            if (
                f.userspace_addr <= addr
                and addr + max(length, 1) <= f.userspace_addr + f.memory_size
            ):
                return m.local_addr + (addr - f.userspace_addr)
        raise self._error(
            f"frontend address range 0x{addr:x}+0x{length:x} is outside every memory region"
        )

    def translate_gpa(self, gpa: int, length: int = 1) -> int:
        """The local address backing guest-physical ``[gpa, gpa+length)``."""
        for m in self._mapped:
            f = m.front
            if (
                f.guest_phys_addr <= gpa
                and gpa + max(length, 1) <= f.guest_phys_addr + f.memory_size
            ):
                return m.local_addr + (gpa - f.guest_phys_addr)
        raise self._error(f"guest address range 0x{gpa:x}+0x{length:x} is outside every region")

    @staticmethod
    def _vhost_region(m: _Mapped) -> MemoryRegion:
        return MemoryRegion(m.front.guest_phys_addr, m.front.memory_size, m.local_addr)

    def vhost_regions(self) -> list[MemoryRegion]:
        """gpa -> local address regions, ready for ``VhostNet.set_mem_table``."""
        return [self._vhost_region(m) for m in self._mapped]

    def close(self) -> None:
        """Unmap everything; idempotent."""
        while self._mapped:
            self._mapped.pop().close()

    def __enter__(self) -> MappedTable:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _close_quietly(fd: int) -> None:
    # not contextlib.suppress: this runs per region inside QEMU's DRIVER_OK wait
    try:  # noqa: SIM105
        os.close(fd)
    except OSError:
        pass
