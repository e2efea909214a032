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

Bounds: a frontend chooses how much of this process's address space its regions take (a
sparse memfd costs nothing to create and 128 TiB of it maps fine), so a
:class:`MappingBudget` bounds the bytes mapped per connection and in all; a ``MappedTable``
given one reserves its bytes before mapping anything and gives them back when closed.
"""

from __future__ import annotations

import itertools
import mmap
import os
import stat
import threading
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


GiB = 1 << 30


def host_memory_bytes(meminfo: str = "/proc/meminfo") -> int:
    """MemTotal + SwapTotal of this host: the most guest memory that can be backed at all
    (a vhost-user region is shared memory, which lives in RAM, hugepages or swap)."""
    total = 0
    try:
        with open(meminfo) as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("MemTotal", "SwapTotal"):
                    total += int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return 0
    return total


def format_size(n: int) -> str:
    """``n`` bytes for a message: exact bytes in hex, and GiB for a human."""
    return f"0x{n:x} bytes ({n / GiB:.1f} GiB)"


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str, option: str) -> int:
    """A size option's value: bytes, or a number with K, M, G or T (binary units, an
    optional trailing 'iB' or 'B'). Raises UsageError saying what is accepted."""
    from kvhost.errors import UsageError

    body = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = body[-1:] if body[-1:] in _SIZE_UNITS else ""
    number = body[: len(body) - len(unit)]
    if not (number.isascii() and number.isdigit()) or int(number) == 0:
        raise UsageError(
            f"{option} {text!r}: give a positive size in bytes or with K, M, G or T "
            "(binary units), e.g. 64G"
        )
    return int(number) * _SIZE_UNITS[unit]


class MappingBudget:
    """How many bytes of frontend memory this process maps: at most ``per_connection`` for
    one connection's memory table and dirty log, at most ``total`` for all connections
    together (a table being replaced counts until it is unmapped). Thread-safe: tables are
    unmapped on the shim's closer thread.

    ``per_connection_option`` and ``total_option`` name the settings that raise the limits,
    for the refusal message.
    """

    def __init__(
        self,
        per_connection: int,
        total: int,
        *,
        per_connection_option: str = "--max-guest-memory",
        total_option: str = "--max-mapped-memory",
    ) -> None:
        if per_connection <= 0 or total <= 0:
            raise ValueError(f"mapping limits must be positive, not {per_connection}, {total}")
        self.per_connection = per_connection
        self.total = total
        self._options = (per_connection_option, total_option)
        self._lock = threading.Lock()
        self._used = 0

    @classmethod
    def for_host(cls, meminfo: str = "/proc/meminfo") -> MappingBudget:
        """The defaults: one connection may map what the host can back (RAM + swap, at
        least 1 GiB), all connections twice that (a VM reconnecting or migrating within the
        host briefly has two tables)."""
        one = max(host_memory_bytes(meminfo), GiB)
        return cls(one, 2 * one)

    @property
    def used(self) -> int:
        """Bytes reserved now, by every connection."""
        return self._used

    def reserve(
        self, size: int, *, held: int = 0, what: str = "memory", error: type[Exception] = ValueError
    ) -> None:
        """Take ``size`` bytes for a connection that keeps ``held`` bytes besides them;
        raises ``error`` naming the limit and its option when either bound would be passed."""
        per_option, total_option = self._options
        if held + size > self.per_connection:
            raise error(
                f"{what} needs {format_size(size)} of mappings, and with the "
                f"{format_size(held)} this connection keeps besides it that is more than the "
                f"limit per connection, {format_size(self.per_connection)}; if the VM "
                f"really has that much memory, start the shim with a larger {per_option}"
            )
        with self._lock:
            if self._used + size > self.total:
                raise error(
                    f"{what} needs {format_size(size)} of mappings, and this shim already "
                    f"maps {format_size(self._used)} for all its connections: more than its "
                    f"limit, {format_size(self.total)}; raise {total_option} if that much "
                    "guest memory is expected"
                )
            self._used += size

    def release(self, size: int) -> None:
        """Give back what :meth:`reserve` took."""
        with self._lock:
            self._used -= size


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
    space. ``OSError`` from ``mmap`` is raised as ``error`` too, naming the region, and so
    is a file that is not a regular file (a memfd, a file on tmpfs or hugetlbfs): a pipe
    cannot be mapped and ``/dev/zero`` would give private memory nobody else sees.

    With a ``budget``, the bytes to map (``mmap_offset + size`` per region: each is mapped
    from offset 0) are reserved before any mapping, ``held`` being what the connection
    keeps besides (its dirty log), and given back by :meth:`close`.
    """

    def __init__(
        self,
        regions: Sequence[FrontendRegion] = (),
        *,
        max_regions: int = DEFAULT_MAX_REGIONS,
        error: type[Exception] = ValueError,
        budget: MappingBudget | None = None,
        held: int = 0,
    ) -> None:
        self._error = error
        self._max = max_regions
        self._mapped: list[_Mapped] = []
        self._budget: MappingBudget | None = None
        #: bytes of this process's address space the table reserved (and maps)
        self.mapped_bytes = sum(r.mmap_offset + r.memory_size for r in regions)
        try:
            self._validate(list(regions))
            if budget is not None:
                budget.reserve(
                    self.mapped_bytes,
                    held=held,
                    what=f"a memory table of {len(regions)} region(s)",
                    error=error,
                )
                self._budget = budget
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
            regular = stat.S_ISREG(st.st_mode)
            too_small = regular and st.st_size < length
            if regular and not too_small:
                mapping = mmap.mmap(r.fd, length, mmap.MAP_SHARED, _PROT_RW)
        except (OSError, OverflowError, ValueError) as exc:
            raise self._error(
                f"cannot map memory region gpa 0x{r.guest_phys_addr:x} size "
                f"0x{r.memory_size:x} offset 0x{r.mmap_offset:x}: {exc}"
            ) from exc
        finally:
            _close_quietly(r.fd)
        if not regular:
            raise self._error(
                f"memory region gpa 0x{r.guest_phys_addr:x}: its fd is a "
                f"{_file_kind(st.st_mode)}, not a regular file; guest memory must be shared "
                "memory the frontend maps too (a memfd, or a file on tmpfs or hugetlbfs)"
            )
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
        """Unmap everything and give its bytes back to the budget; idempotent."""
        try:
            while self._mapped:
                self._mapped.pop().close()
        finally:
            budget, self._budget = self._budget, None
            if budget is not None:
                budget.release(self.mapped_bytes)

    def __enter__(self) -> MappedTable:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISFIFO, "pipe"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISDIR, "directory"),
    ):
        if test(mode):
            return name
    return f"file of type 0o{stat.S_IFMT(mode):o}"


def _close_quietly(fd: int) -> None:
    # not contextlib.suppress: this runs per region inside QEMU's DRIVER_OK wait
    try:  # noqa: SIM105
        os.close(fd)
    except OSError:
        pass
