"""The shim's translation of vhost-user verbs into kernel vhost-net and tap calls.

One :class:`KernelBackend` serves one connection::

    vhost-user (QEMU's view)              kernel (the shim's view)
    ------------------------              --------------------------------------------------
    vring i                               /dev/vhost-net fd i // 2, ring i % 2 (0 RX, 1 TX)
    SET_OWNER                             open tap (no offloads, 12-byte vnet header) + one
                                          vhost-net per pair, VHOST_SET_OWNER
    SET_FEATURES f                        VHOST_SET_FEATURES f & kernel's bits, bit 27 clear;
                                          TUNSETOFFLOAD tun_flags_for(f), TUNSETVNETHDRSZ,
                                          each only when the tap has another value
    SET_MEM_TABLE (fds, QEMU's VAs)       mmap each fd; VHOST_SET_MEM_TABLE gpa -> shim VA
    SET_VRING_ADDR (QEMU's VAs)           translated to shim VAs, checked inside the regions
    SET_LOG_BASE (fd)                     mmap; VHOST_SET_LOG_BASE shim VA
    ring start / enable / disable         VHOST_NET_SET_BACKEND tap queue fd i // 2, or -1
    GET_VRING_BASE                        VHOST_NET_SET_BACKEND -1, VHOST_GET_VRING_BASE
    SEND_RARP mac                         a RARP frame written into tap queue 0
    NET_SET_MTU                           the tap's MTU (SIOCSIFMTU) only with
                                          allow_mtu_change; else only the MTU it has

Feature translation follows DPDK virtio-user's vhost-kernel backend: the tap offload bits
are not vhost-net's business (the kernel would refuse them) and are applied to the tap with
TUNSETOFFLOAD instead; VHOST_NET_F_VIRTIO_NET_HDR (bit 27) is never set, so vhost-net passes
the guest's virtio-net header through and the tap, opened with IFF_VNET_HDR, parses it -- the
tap's header length is set to the guest's (12 with MRG_RXBUF or VERSION_1, else 10). The
tap gets 12 at SET_OWNER, when QEMU connects: every modern driver negotiates it, so the
SET_FEATURES that QEMU sends inside the guest's DRIVER_OK write has one ioctl less to wait for.

Safety: the kernel writes the dirty log and the used rings through *this* process's
addresses, so every address handed to it is checked first. The session has checked what the
protocol decides (ring index, size, flags, alignment, order, the log covering guest memory);
this object checks what only its mappings can tell: each ring part inside one mapped region
for its full size, a logged used ring inside guest memory, the log file long enough, and
no LOG_ALL before it mapped a log. Bad values are :class:`~kvhost.errors.RemoteProtocolError`:
the frontend sent them. What it maps is bounded by a :class:`~kvhost.memory.MappingBudget`
(per connection and per shim), reserved before anything is mapped.

Replacing the memory table while rings are configured (:meth:`KernelBackend.set_mem_table`)::

    map the new table (budget reserved first)      failure: unmap it; nothing else changed
    translate + check every configured ring in it  failure: unmap it; nothing else changed
    ---- from here the kernel may point into the new table ----
    VHOST_SET_MEM_TABLE on each device, then       failure: detach every ring of every
    VHOST_SET_VRING_ADDR for each moved ring       device (the kernel stops using both
                                                   tables), then unmap both; the backend
                                                   keeps no table and attaches nothing more
                                                   (a detach refused too: both stay mapped
                                                   until the teardown closed the devices)
    unmap the old table

Each table is closed exactly once: by this sequence, by :meth:`KernelBackend.close`'s
teardown, or by :meth:`KernelBackend.reset_owner`.

Ownership: every fd passed to a method is this object's from the call on (closed once the
kernel holds its own reference, and on every error path). :meth:`KernelBackend.close`
(called once the session has detached the rings) hands the tap, the vhost-net devices,
guest memory and the log to the process's :data:`shim.closer.CLOSER`, which owns them from
then on and closes them on its own thread in that order (memory last: the kernel may touch
it until its device is gone) -- closing a vhost-net fd takes 30-40 ms under TCG, too long
to stall the event loop that serves every other connection.

State: kernel handles only -- the tap, the devices, the mapped memory table and log --
plus two shadows of what the kernel already has, kept because QEMU repeats its whole start
sequence at every DRIVER_OK on the same connection and tests/test_kernel_shim.py counts the
ioctls such a restart issues: the tap's offloads and header length (TUNSETOFFLOAD /
TUNSETVNETHDRSZ skipped when unchanged) and each ring's translated addresses
(VHOST_SET_VRING_ADDR skipped when they translate to what the kernel has). A SET_MEM_TABLE
describing the same regions of the same files (compared by device and inode) keeps the
mapping and issues nothing. Repeated features and ring sizes are filtered by the session.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import mmap
import os
import stat
import struct
import threading
from collections.abc import Callable, Sequence

from kvhost import abi, features
from kvhost.errors import KernelError, RemoteProtocolError, UsageError
from kvhost.ioctl import kernel_error, read_max_mem_regions
from kvhost.memory import FrontendRegion, MappedTable, MappingBudget, address_of
from kvhost.tap import Tap, vnet_hdr_len
from kvhost.vhost import LogRegion, VhostNet, VringConfig
from kvhost.vhost_user.protocol import MEMORY_BASELINE_NREGIONS, close_fds
from shim.closer import CLOSER, Closer
from shim.eventlog import event

log = logging.getLogger("kvhost.shim")

#: bit 27: with it vhost-net would strip the virtio-net header itself; the tap does that
VHOST_NET_F_VIRTIO_NET_HDR = 1 << abi.VHOST_NET_F_VIRTIO_NET_HDR
#: TUNSETSNDBUF value QEMU and DPDK use: never drop in the tap on the way in
SNDBUF_UNLIMITED = 0x7FFF_FFFF


def rarp_frame(mac: bytes) -> bytes:
    """The RARP "request reverse" announcement QEMU broadcasts for ``mac`` after migration
    (so switches learn the VM's new port), padded to the Ethernet minimum."""
    if len(mac) != 6:
        raise ValueError(f"a MAC address is 6 bytes, got {len(mac)}")
    frame = (
        b"\xff" * 6
        + mac
        + struct.pack(
            "!HHHBBH", abi.ETH_P_RARP, abi.ARPHRD_ETHER, abi.ETH_P_IP, 6, 4, abi.ARPOP_RREQUEST
        )
        + mac
        + bytes(4)
        + mac
        + bytes(4)
    )
    return frame + bytes(abi.ETH_ZLEN - len(frame))


_default_budget: MappingBudget | None = None
_default_budget_lock = threading.Lock()


def default_budget() -> MappingBudget:
    """The process's :class:`MappingBudget` when none is given: the host's defaults
    (:meth:`MappingBudget.for_host`), one for every backend of the process."""
    global _default_budget
    with _default_budget_lock:
        if _default_budget is None:
            _default_budget = MappingBudget.for_host()
        return _default_budget


class _LogMap:
    """The mapped dirty log and its share of the budget, given back once at close."""

    __slots__ = ("budget", "map", "size")

    def __init__(self, mapping: mmap.mmap, size: int, budget: MappingBudget) -> None:
        self.map = mapping
        self.size = size
        self.budget: MappingBudget | None = budget

    def close(self) -> None:
        try:
            self.map.close()
        finally:
            budget, self.budget = self.budget, None
            if budget is not None:
                budget.release(self.size)


def ring_lengths(num: int) -> tuple[int, int, int]:
    """Bytes of a split ring's descriptor table, avail ring and used ring for ``num`` entries
    (each including the event-index word)."""
    return 16 * num, 6 + 2 * num, 6 + 8 * num


class KernelBackend:
    """Implements :class:`shim.session.Backend` with kernel vhost-net and a tap.

    ``open_tap`` is called at :meth:`set_owner` (a :meth:`shim.tap_setup.TapSpec.open`, a
    :meth:`shim.tap_setup.PreparedTap.open`, or a test's own). ``vhost_path`` is the
    vhost-net device node, opened with ``open_device`` (a test's recording device stands
    in for :class:`VhostNet`). ``closer`` takes over the kernel objects at :meth:`close`
    (see the module docstring). ``budget`` bounds what is mapped (default: the process's,
    :func:`default_budget`). ``allow_mtu_change``: NET_SET_MTU may change the tap's MTU
    (else only the MTU it has is accepted: a bridge takes the smallest MTU of its ports, so
    a frontend lowering its tap's would lower the MTU of every VM on the bridge).

    It trusts its caller, the session, for everything the protocol decides (ring index,
    size bounds, address flags and alignment, ordering, the log covering memory) and keeps
    only kernel handles: the tap, the devices, the mapped table and log, plus the two
    shadows of kernel state listed in the module docstring.
    """

    def __init__(
        self,
        open_tap: Callable[[], Tap],
        queue_pairs: int,
        *,
        vhost_path: str = "/dev/vhost-net",
        name: str = "vhost-user",
        closer: Closer = CLOSER,
        open_device: Callable[[str], VhostNet] = VhostNet,
        budget: MappingBudget | None = None,
        allow_mtu_change: bool = False,
    ) -> None:
        if queue_pairs < 1:
            raise ValueError(f"queue pairs must be at least 1, not {queue_pairs}")
        self._open_tap = open_tap
        self._pairs = queue_pairs
        self._path = vhost_path
        self._open_device = open_device
        self._budget = budget if budget is not None else default_budget()
        self._allow_mtu_change = allow_mtu_change
        self.name = name
        self._max_regions = min(read_max_mem_regions(), MEMORY_BASELINE_NREGIONS)
        self.tap: Tap | None = None
        self.devices: list[VhostNet] = []
        #: the kernel's vhost-net feature bits (read at set_owner)
        self.kernel_features = 0
        self.table: MappedTable | None = None
        self._log: _LogMap | None = None
        self._closer = closer
        #: (TUNSETOFFLOAD flags, vnet header length) the tap has; None: unknown
        self._tap_state: tuple[int, int] | None = None
        #: ring -> the translated addresses the kernel has
        self._kernel_addrs: dict[int, VringConfig] = {}
        #: tables and logs the kernel may still use after a failed detach: unmapped only
        #: after the devices are closed (see _stop_then_unmap)
        self._retired: list[MappedTable | _LogMap] = []

    # -- the Backend protocol ---------------------------------------------------------

    @property
    def queue_pairs(self) -> int:
        return self._pairs

    @property
    def max_mem_regions(self) -> int:
        return self._max_regions

    def get_features(self) -> int:
        """The kernel's vhost-net feature bits (0 before :meth:`set_owner`)."""
        return self.kernel_features

    def set_owner(self) -> None:
        """Open the tap and one vhost-net per queue pair; VHOST_SET_OWNER each.

        VHOST_SET_OWNER creates the vhost worker (~20 ms under TCG), which is why QEMU's
        connect-time SET_OWNER is where it happens. Idempotent.
        """
        if self.devices:
            return
        try:
            tap = self._open_tap()
        except (KernelError, UsageError):
            # A frontend reconnecting to the same tap: the last connection's tap fd may still
            # wait in the closer (EBUSY from TUNSETIFF, or PreparedTap's one-connection
            # refusal). Let the closer finish -- at connect time -- and try once more; any
            # other failure simply repeats.
            if not self._closer.pending:
                raise
            self._closer.drain()
            tap = self._open_tap()
        devices: list[VhostNet] = []
        try:
            if len(tap.fds) < self._pairs:
                raise kernel_error(
                    "TUNSETIFF",
                    f"tap {tap.name}",
                    errno.EINVAL,
                    f"the tap has {len(tap.fds)} queue(s) for {self._pairs} queue pair(s)",
                )
            tap.set_sndbuf(SNDBUF_UNLIMITED)
            # No offloads until the driver acks them. The 12-byte header is what every
            # VERSION_1 or MRG_RXBUF driver negotiates: set now, at connect, SET_FEATURES
            # inside DRIVER_OK usually finds it in place and skips the ioctl.
            tap.set_offload(0)
            tap.set_vnet_hdr_size(abi.VNET_HDR_MRG_LEN)
            for _ in range(self._pairs):
                dev = self._open_device(self._path)
                devices.append(dev)
                dev.set_owner()
            self.kernel_features = devices[0].get_features()
        except BaseException:
            for dev in devices:
                dev.close()
            tap.close()
            raise
        self.tap, self.devices = tap, devices
        self._tap_state = (0, abi.VNET_HDR_MRG_LEN)
        event(
            "devices",
            f"{self.name}: tap {tap.name}, {len(devices)} vhost-net device(s), kernel "
            f"features 0x{self.kernel_features:x}",
            connection=self.name,
            tap=tap.name,
            devices=len(devices),
            features=self.kernel_features,
        )

    def reset_owner(self) -> None:
        """VHOST_RESET_OWNER then VHOST_SET_OWNER on each device; drops memory and log.
        The session has detached every ring first."""
        for dev in self.devices:
            dev.reset_owner()
            dev.set_owner()
        self._drop_memory()
        self._kernel_addrs.clear()

    def set_features(self, virtio_features: int) -> None:
        """The devices get the kernel's share of the bits (never bit 27), the tap the
        offloads and header length they imply -- each tap ioctl only when the tap has
        another value."""
        if virtio_features & features.LOG_ALL and self._log is None:
            # kept here, not in the session: a guard of this backend's own handles (the
            # kernel must never log without the log this object mapped for it)
            raise RemoteProtocolError(
                "SET_FEATURES with LOG_ALL before SET_LOG_BASE: the kernel has no dirty log "
                "to write to"
            )
        kernel = virtio_features & self.kernel_features & ~VHOST_NET_F_VIRTIO_NET_HDR
        for dev in self.devices:
            dev.set_features(kernel)
        tap = self._tap()
        offload, hdr_len = _tap_settings(virtio_features)
        known, self._tap_state = self._tap_state, None  # unknown until both calls succeed
        if known is None or known[0] != offload:
            tap.set_offload(offload)
        if known is None or known[1] != hdr_len:
            tap.set_vnet_hdr_size(hdr_len)
        self._tap_state = (offload, hdr_len)

    def set_mem_table(
        self, regions: Sequence[FrontendRegion], rings: Sequence[tuple[int, VringConfig]] = ()
    ) -> None:
        """Map the regions, check that every ring in ``rings`` (the ones with addresses, in
        the frontend's terms) translates into them, install them in every device, re-point
        the rings, then unmap the old table -- in that order, so a running ring never points
        at unmapped memory (see the module docstring for each failure).

        The same regions of the same files as the current table (QEMU resends its table at
        every DRIVER_OK) change nothing: their fds are closed and the mapping kept.
        """
        if self.table is not None and self.table.same_as(regions):
            close_fds(r.fd for r in regions)
            return
        new = MappedTable(
            regions,
            max_regions=self._max_regions,
            error=RemoteProtocolError,
            budget=self._budget,
            held=0 if self._log is None else self._log.size,
        )
        try:
            moved = [(index, self._translate(index, config, new)) for index, config in rings]
            vhost_regions = new.vhost_regions()
        except BaseException:
            new.close()
            raise
        old = self.table
        try:
            for dev in self.devices:
                dev.set_mem_table(vhost_regions)
            self.table = new
            for index, translated in moved:
                self._give_addr(index, translated)
        except BaseException:
            # Some device may use the new table, some the old, a ring either: stop every
            # ring before either table goes, so the kernel never touches unmapped memory.
            self.table = None
            self._kernel_addrs.clear()
            self._stop_then_unmap([new] if old is None else [new, old])
            raise
        if old is not None:
            old.close()

    def set_log_base(self, base: int, region: LogRegion | None = None) -> None:
        """Map ``region`` (the frontend's log file; ``base`` unused, as in rust-vmm's
        vhost-user) and hand its address in this process to the kernel."""
        if region is None:
            raise UsageError("the shim's log comes as a file region (LOG_SHMFD)")
        length = region.offset + region.size
        try:
            st = os.fstat(region.fd)
            if not stat.S_ISREG(st.st_mode):
                raise RemoteProtocolError(
                    "SET_LOG_BASE: the log fd is not a regular file; the dirty log must be "
                    "shared memory the frontend reads too (a memfd)"
                )
            if st.st_size < length:
                raise RemoteProtocolError(
                    f"SET_LOG_BASE: the log fd has 0x{st.st_size:x} bytes, the log needs "
                    f"0x{region.offset + region.size:x} (offset + size)"
                )
            self._budget.reserve(
                length,
                held=0 if self.table is None else self.table.mapped_bytes,
                what="SET_LOG_BASE: the dirty log",
                error=RemoteProtocolError,
            )
            try:
                mm = mmap.mmap(
                    region.fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
                )
            except (OSError, ValueError, OverflowError) as err:
                self._budget.release(length)
                raise RemoteProtocolError(f"SET_LOG_BASE: cannot map the log: {err}") from err
        finally:
            os.close(region.fd)
        log_map = _LogMap(mm, length, self._budget)
        addr = address_of(mm) + region.offset
        old = self._log
        try:
            for dev in self.devices:
                dev.set_log_base(addr)
        except BaseException:
            # a device may already log into the new map: stop the rings before it goes
            self._log = None
            self._stop_then_unmap([log_map] if old is None else [log_map, old])
            raise
        self._log = log_map
        if old is not None:
            old.close()

    def set_vring_num(self, index: int, num: int) -> None:
        self.devices[index >> 1].set_vring_num(index & 1, num)

    def set_vring_base(self, index: int, base: int) -> None:
        self.devices[index >> 1].set_vring_base(index & 1, base)

    def get_vring_base(self, index: int) -> int:
        return self.devices[index >> 1].get_vring_base(index & 1)

    def set_vring_addr(self, index: int, config: VringConfig) -> None:
        """Translate the frontend's addresses into this process's (each part inside one
        region for the ring's full size, the logged used ring inside guest memory) and give
        them to the kernel unless it has exactly these."""
        if self.table is None:
            raise RemoteProtocolError(f"vring {index} addresses need a memory table first")
        self._give_addr(index, self._translate(index, config, self.table))

    def set_vring_kick(self, index: int, fd: int) -> None:
        try:
            self.devices[index >> 1].set_vring_kick(index & 1, fd)
        finally:
            os.close(fd)

    def set_vring_call(self, index: int, fd: int) -> None:
        try:
            self.devices[index >> 1].set_vring_call(index & 1, fd)
        finally:
            if fd >= 0:
                os.close(fd)

    def set_vring_err(self, index: int, fd: int) -> None:
        try:
            self.devices[index >> 1].set_vring_err(index & 1, fd)
        finally:
            if fd >= 0:
                os.close(fd)

    # -- vhost-net's extras -----------------------------------------------------------

    def set_backend(self, index: int, attach: bool) -> None:
        """VHOST_NET_SET_BACKEND: the ring's tap queue (queue pair ``index // 2``), or -1.
        Attaching needs a memory table (none is left after a failed replacement)."""
        if attach and self.table is None:
            raise RemoteProtocolError(f"vring {index} cannot run without a memory table")
        fd = self._tap().fds[index >> 1] if attach else abi.VHOST_FILE_UNBIND
        self.devices[index >> 1].set_backend(index & 1, fd)

    def send_rarp(self, mac: bytes) -> None:
        """Write the RARP frame into tap queue 0 behind a zeroed virtio-net header.

        Written to the tap fd, a frame enters the host stack as if the guest had sent it:
        it is received on the tap interface, and a bridge forwards it.
        """
        tap = self._tap()
        header = bytes(tap.get_vnet_hdr_size())
        try:
            os.write(tap.fds[0], header + rarp_frame(mac))
        except OSError as err:
            raise kernel_error("write", f"tap {tap.name}", err, "RARP not sent") from err

    def set_mtu(self, mtu: int) -> None:
        """Set the tap's MTU; without ``allow_mtu_change`` only the MTU it has is accepted
        (UsageError, which the session answers as a refusal)."""
        tap = self._tap()
        if not self._allow_mtu_change:
            current = tap.get_mtu()
            if current == mtu:
                return
            raise UsageError(
                f"tap {tap.name} has MTU {current} and this shim lets no frontend change it "
                f"(a bridge takes the smallest MTU of its ports), so it cannot change it to "
                f"{mtu}; start the shim with --mtu {mtu}, or (without --user) with "
                "--allow-mtu-change"
            )
        tap.set_mtu(mtu)

    def close(self) -> None:
        """Hand the tap, devices, memory and log to the closer; idempotent.

        The session has detached every ring. Returns without waiting for the kernel to tear
        the devices down: from this call on the closer owns those objects (see the module
        docstring), and this backend holds nothing.
        """
        tap, self.tap = self.tap, None
        devices, self.devices = self.devices, []
        table, self.table = self.table, None
        log_map, self._log = self._log, None
        retired, self._retired = self._retired, []
        self._tap_state = None
        self._kernel_addrs.clear()
        if tap is None and not devices and table is None and log_map is None and not retired:
            return
        self._closer.submit(
            f"{self.name}'s tap and vhost-net devices",
            functools.partial(_teardown, tap, devices, table, log_map, retired),
        )

    # -- helpers ----------------------------------------------------------------------

    def _tap(self) -> Tap:
        if self.tap is None:
            raise RemoteProtocolError("no tap yet: SET_OWNER must come first")
        return self.tap

    def _translate(self, index: int, a: VringConfig, table: MappedTable) -> VringConfig:
        desc_len, avail_len, used_len = ring_lengths(a.size)
        try:
            desc = table.translate_frontend_va(a.desc, desc_len)
            avail = table.translate_frontend_va(a.avail, avail_len)
            used = table.translate_frontend_va(a.used, used_len)
            if a.log:
                table.translate_gpa(a.log_addr, used_len)
        except RemoteProtocolError as err:
            raise RemoteProtocolError(f"vring {index} (size {a.size}): {err}") from None
        return VringConfig(a.size, a.flags, desc, used, avail, a.log_addr)

    def _give_addr(self, index: int, translated: VringConfig) -> None:
        """VHOST_SET_VRING_ADDR unless the kernel has exactly these addresses."""
        if self._kernel_addrs.get(index) != translated:
            self._kernel_addrs.pop(index, None)
            self.devices[index >> 1].set_vring_addr(index & 1, translated)
            self._kernel_addrs[index] = translated

    def _stop_then_unmap(self, maps: list[MappedTable] | list[_LogMap]) -> None:
        """After a failure with the kernel perhaps using ``maps``: detach every ring, then
        unmap them. When a detach fails too, the kernel may still use them: they are kept
        until :meth:`close`, whose teardown unmaps them after the devices are closed (a
        range unmapped early could be reused by the next mapping -- another VM's)."""
        try:
            self._detach_all()
        except (KernelError, OSError, ValueError) as err:
            log.error(
                "%s: rings could not be detached (%s); memory kept until close", self.name, err
            )
            self._retired.extend(maps)
            return
        for m in maps:
            m.close()

    def _detach_all(self) -> None:
        """VHOST_NET_SET_BACKEND -1 on every ring of every device (a detached ring is a
        no-op); once it returns the kernel's workers touch no guest memory or log. Tries
        every ring, raises the first failure."""
        first: BaseException | None = None
        for dev in self.devices:
            for ring in (0, 1):
                try:
                    dev.set_backend(ring, abi.VHOST_FILE_UNBIND)
                except (KernelError, OSError, ValueError) as err:
                    first = first or err
        if first is not None:
            raise first

    def _drop_memory(self) -> None:
        if self.table is not None:
            self.table.close()
            self.table = None
        if self._log is not None:
            self._log.close()
            self._log = None


@functools.lru_cache(maxsize=64)
def _tap_settings(virtio_features: int) -> tuple[int, int]:
    """(TUNSETOFFLOAD flags, vnet header length) for negotiated features; cached because
    QEMU repeats SET_FEATURES per queue pair and these derive bits from names."""
    return features.tun_flags_for(virtio_features), vnet_hdr_len(virtio_features)


def _teardown(
    tap: Tap | None,
    devices: list[VhostNet],
    table: MappedTable | None,
    log_map: _LogMap | None,
    retired: Sequence[MappedTable | _LogMap] = (),
) -> None:
    """A closed connection's kernel objects, closed on the closer's thread: the tap first
    (its rings are detached, and a reconnecting frontend may want it back), then the vhost
    devices (each waits for its worker), then guest memory and the log the kernel used
    until its device was gone. Every object is closed even if an earlier one fails."""
    try:
        if tap is not None:
            tap.close()
    finally:
        try:
            for dev in devices:
                with contextlib.suppress(OSError):
                    dev.close()
        finally:
            try:
                if table is not None:
                    table.close()
            finally:
                try:
                    if log_map is not None:
                        log_map.close()
                finally:
                    for m in retired:
                        m.close()
