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
    NET_SET_MTU                           the tap's MTU (SIOCSIFMTU)

Feature translation follows DPDK virtio-user's vhost-kernel backend: the tap offload bits
are not vhost-net's business (the kernel would refuse them) and are applied to the tap with
TUNSETOFFLOAD instead; VHOST_NET_F_VIRTIO_NET_HDR (bit 27) is never set, so vhost-net passes
the guest's virtio-net header through and the tap, opened with IFF_VNET_HDR, parses it -- the
tap's header length is set to the guest's (12 with MRG_RXBUF or VERSION_1, else 10). The
tap gets 12 at SET_OWNER, when QEMU connects: every modern driver negotiates it, so the
SET_FEATURES that QEMU sends inside the guest's DRIVER_OK write has one ioctl less to wait for.

Safety: the kernel writes the dirty log and the used rings through *this* process's
addresses, so every address handed to it is checked first -- rings inside a mapped region
(for their full size), the log large enough for the highest guest-physical address (a short
log would let the kernel set bits in whatever the shim has mapped next to it). Bad values are
:class:`~kvhost.errors.RemoteProtocolError`: the frontend sent them.

Ownership: every fd passed to a method is this object's from the call on (closed once the
kernel holds its own reference, and on every error path). :meth:`KernelBackend.close`
detaches the rings at once, then hands the tap, the vhost-net devices, guest memory and the
log to the process's :data:`shim.closer.CLOSER`, which owns them from then on and closes
them on its own thread in that order (memory last: the kernel may touch it until its device
is gone) -- closing a vhost-net fd takes 30-40 ms under TCG, too long to stall the event
loop that serves every other connection.

Redundant kernel calls are skipped, because QEMU repeats its whole start sequence at every
DRIVER_OK on the same connection: a SET_FEATURES with the features already applied, a
SET_MEM_TABLE describing the same regions of the same files (compared by device and inode),
a SET_VRING_NUM with the current size and a SET_VRING_ADDR translating to the addresses the
kernel already has issue no ioctl (the checks still run). The kernel keeps all of these
across a ring stop, so what it ends up with is exactly what a replay would have set.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import mmap
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvhost import abi, features
from kvhost.errors import KernelError, KvhostError, RemoteProtocolError, UsageError
from kvhost.ioctl import read_max_mem_regions
from kvhost.memory import FrontendRegion, MappedTable, address_of
from kvhost.tap import Tap, vnet_hdr_len
from kvhost.vhost import VhostNet
from kvhost.vhost_user.protocol import MEMORY_BASELINE_NREGIONS, close_fds
from shim.closer import CLOSER, Closer

log = logging.getLogger("kvhost.shim")

#: bit 27: with it vhost-net would strip the virtio-net header itself; the tap does that
VHOST_NET_F_VIRTIO_NET_HDR = 1 << abi.VHOST_NET_F_VIRTIO_NET_HDR
#: TUNSETSNDBUF value QEMU and DPDK use: never drop in the tap on the way in
SNDBUF_UNLIMITED = 0x7FFF_FFFF
#: one bit of dirty log per guest page of this size
LOG_PAGE = abi.VHOST_PAGE_SIZE
ETH_P_RARP = 0x8035
ETH_P_IP = 0x0800
ARPHRD_ETHER = 1
RARP_REQUEST_REVERSE = 3
ETH_ZLEN = 60


def rarp_frame(mac: bytes) -> bytes:
    """The RARP "request reverse" announcement QEMU broadcasts for ``mac`` after migration
    (so switches learn the VM's new port), padded to the Ethernet minimum."""
    if len(mac) != 6:
        raise ValueError(f"a MAC address is 6 bytes, got {len(mac)}")
    frame = (
        b"\xff" * 6
        + mac
        + struct.pack("!HHHBBH", ETH_P_RARP, ARPHRD_ETHER, ETH_P_IP, 6, 4, RARP_REQUEST_REVERSE)
        + mac
        + bytes(4)
        + mac
        + bytes(4)
    )
    return frame + bytes(ETH_ZLEN - len(frame))


@dataclass(frozen=True, slots=True)
class RingAddr:
    """A ring's addresses as the frontend sent them (its virtual addresses)."""

    flags: int
    desc: int
    used: int
    avail: int
    log_guest_addr: int

    @property
    def log(self) -> bool:
        return bool(self.flags & (1 << abi.VHOST_VRING_F_LOG))


def ring_lengths(num: int) -> tuple[int, int, int]:
    """Bytes of a split ring's descriptor table, avail ring and used ring for ``num`` entries
    (each including the event-index word)."""
    return 16 * num, 6 + 2 * num, 6 + 8 * num


class KernelBackend:
    """Implements :class:`shim.session.Backend` with kernel vhost-net and a tap.

    ``open_tap`` is called at :meth:`set_owner` (a :meth:`shim.tap_setup.TapSpec.open`, a
    :meth:`shim.tap_setup.PreparedTap.open`, or a test's own).
    ``vhost_path`` is the vhost-net device node. ``closer`` takes over the kernel objects at
    :meth:`close` (see the module docstring).
    """

    def __init__(
        self,
        open_tap: Callable[[], Tap],
        queue_pairs: int,
        *,
        vhost_path: str = "/dev/vhost-net",
        name: str = "vhost-user",
        closer: Closer = CLOSER,
    ) -> None:
        if queue_pairs < 1:
            raise ValueError(f"queue pairs must be at least 1, not {queue_pairs}")
        self._open_tap = open_tap
        self._pairs = queue_pairs
        self._path = vhost_path
        self.name = name
        self._max_regions = min(read_max_mem_regions(), MEMORY_BASELINE_NREGIONS)
        self.tap: Tap | None = None
        self.devices: list[VhostNet] = []
        #: the kernel's vhost-net feature bits (read at set_owner)
        self.kernel_features = 0
        self.table: MappedTable | None = None
        self._log: mmap.mmap | None = None
        self._log_addr = 0
        self._log_size = 0
        self._acked = 0
        self._nums: dict[int, int] = {}
        self._addrs: dict[int, RingAddr] = {}
        #: ring -> the size its addresses were checked against
        self._checked: dict[int, int] = {}
        self._attached: set[int] = set()
        self._closer = closer
        #: (TUNSETOFFLOAD flags, vnet header length) the tap has; None: unknown
        self._tap_state: tuple[int, int] | None = None
        #: features applied to the devices and the tap, None until the first SET_FEATURES
        self._applied_features: int | None = None
        #: ring -> (desc, used, avail, log_guest_addr, log) the kernel has
        self._kernel_addrs: dict[int, tuple[int, int, int, int, bool]] = {}

    # -- the Backend protocol ---------------------------------------------------------

    @property
    def queue_pairs(self) -> int:
        return self._pairs

    @property
    def max_mem_regions(self) -> int:
        return self._max_regions

    def set_owner(self) -> None:
        """Open the tap and one vhost-net per queue pair; VHOST_SET_OWNER each.

        VHOST_SET_OWNER creates the vhost worker (~20 ms under TCG), which is why QEMU's
        connect-time SET_OWNER is where it happens.
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
                raise KernelError(
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
                dev = VhostNet(self._path)
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
        log.info(
            "%s: tap %s, %d vhost-net device(s), kernel features 0x%x",
            self.name,
            tap.name,
            len(devices),
            self.kernel_features,
        )

    def reset_owner(self) -> None:
        """VHOST_RESET_OWNER then VHOST_SET_OWNER on each device; drops memory and log."""
        self._detach_all()
        for dev in self._devs():
            dev.reset_owner()
            dev.set_owner()
        self._drop_memory()
        self._nums.clear()
        self._addrs.clear()
        self._checked.clear()
        self._kernel_addrs.clear()
        self._acked = 0
        self._applied_features = None

    def set_features(self, virtio_features: int) -> None:
        if virtio_features & features.LOG_ALL and self._log is None:
            raise RemoteProtocolError(
                "SET_FEATURES with LOG_ALL before SET_LOG_BASE: the kernel has no dirty log "
                "to write to"
            )
        devices, tap = self._devs(), self._tap()
        if virtio_features == self._applied_features:
            self._acked = virtio_features
            return  # QEMU repeats SET_FEATURES at every DRIVER_OK and per queue pair
        self._applied_features = None  # unknown until every call below succeeded
        kernel = virtio_features & self.kernel_features & ~VHOST_NET_F_VIRTIO_NET_HDR
        for dev in devices:
            dev.set_features(kernel)
        offload, hdr_len = _tap_settings(virtio_features)
        known, self._tap_state = self._tap_state, None  # unknown until both calls succeed
        if known is None or known[0] != offload:
            tap.set_offload(offload)
        if known is None or known[1] != hdr_len:
            tap.set_vnet_hdr_size(hdr_len)
        self._tap_state = (offload, hdr_len)
        self._acked = self._applied_features = virtio_features

    def set_mem_table(self, regions: Sequence[FrontendRegion]) -> None:
        """Map the regions, install them in every device, re-point configured rings at the
        new mappings, then unmap the old table.

        The same regions of the same files as the current table (QEMU resends its table at
        every DRIVER_OK) change nothing: their fds are closed and the mapping kept.
        """
        if self.table is not None and self.table.same_as(regions):
            close_fds(r.fd for r in regions)
            return
        new = MappedTable(regions, max_regions=self._max_regions, error=RemoteProtocolError)
        try:
            if self._log is not None:
                self._check_log_covers(new, self._log_size)
            vhost_regions = new.vhost_regions()
            for dev in self._devs():
                dev.set_mem_table(vhost_regions)
            old, self.table = self.table, new
            for ring in sorted(self._addrs):
                self._apply_addr(ring)
        except BaseException:
            if self.table is new:
                self.table = None
            new.close()
            raise
        if old is not None:
            old.close()

    def set_log_base(self, fd: int, mmap_size: int, mmap_offset: int) -> None:
        try:
            if mmap_size <= 0:
                raise RemoteProtocolError(f"SET_LOG_BASE with an empty log ({mmap_size} bytes)")
            st = os.fstat(fd)
            if st.st_size < mmap_offset + mmap_size:
                raise RemoteProtocolError(
                    f"SET_LOG_BASE: the log fd has 0x{st.st_size:x} bytes, the log needs "
                    f"0x{mmap_offset + mmap_size:x} (offset + size)"
                )
            if self.table is not None:
                self._check_log_covers(self.table, mmap_size)
            try:
                mm = mmap.mmap(
                    fd, mmap_offset + mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
                )
            except (OSError, ValueError) as err:
                raise RemoteProtocolError(f"SET_LOG_BASE: cannot map the log: {err}") from err
        finally:
            os.close(fd)
        addr = address_of(mm) + mmap_offset
        try:
            for dev in self._devs():
                dev.set_log_base(addr)
        except BaseException:
            mm.close()
            raise
        old, self._log, self._log_addr, self._log_size = self._log, mm, addr, mmap_size
        if old is not None:
            old.close()

    def set_vring_num(self, ring: int, num: int) -> None:
        dev, i = self._ring(ring)
        if self._nums.get(ring) == num:
            return  # the kernel keeps the size across a stop
        self._nums.pop(ring, None)
        dev.set_vring_num(i, num)
        self._nums[ring] = num

    def set_vring_base(self, ring: int, base: int) -> None:
        dev, i = self._ring(ring)
        dev.set_vring_base(i, base)

    def set_vring_addr(
        self, ring: int, flags: int, desc: int, used: int, avail: int, log_addr: int
    ) -> None:
        known = 1 << abi.VHOST_VRING_F_LOG
        if flags & ~known:
            raise RemoteProtocolError(
                f"SET_VRING_ADDR for vring {ring} has unknown flags 0x{flags:x} (only bit 0, "
                "log, is defined)"
            )
        previous = self._addrs.get(ring)
        self._addrs[ring] = RingAddr(flags, desc, used, avail, log_addr)
        try:
            self._apply_addr(ring)
        except BaseException:
            if previous is None:
                del self._addrs[ring]
            else:
                self._addrs[ring] = previous
            raise

    def set_vring_kick(self, ring: int, fd: int) -> None:
        try:
            dev, i = self._ring(ring)
            dev.set_vring_kick(i, fd)
        finally:
            os.close(fd)

    def set_vring_call(self, ring: int, fd: int) -> None:
        try:
            dev, i = self._ring(ring)
            dev.set_vring_call(i, fd)
        finally:
            if fd >= 0:
                os.close(fd)

    def set_vring_err(self, ring: int, fd: int) -> None:
        try:
            dev, i = self._ring(ring)
            dev.set_vring_err(i, fd)
        finally:
            if fd >= 0:
                os.close(fd)

    def start_vring(self, ring: int) -> None:
        dev, i = self._ring(ring)
        if self._checked.get(ring) != self._nums.get(ring, 1):
            # the size changed after the addresses were checked
            self._translate(ring, self._addrs[ring])
        dev.net_set_backend(i, self._tap().fds[ring // 2])
        self._attached.add(ring)

    def stop_vring(self, ring: int) -> None:
        dev, i = self._ring(ring)
        dev.net_set_backend(i, abi.VHOST_FILE_UNBIND)
        self._attached.discard(ring)

    def get_vring_base(self, ring: int) -> int:
        dev, i = self._ring(ring)
        return dev.get_vring_base(i)

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
            raise KernelError("write", f"tap {tap.name}", err.errno or 0, "RARP not sent") from err

    def set_mtu(self, mtu: int) -> None:
        self._tap().set_mtu(mtu)

    def close(self) -> None:
        """Detach every ring now; hand the tap, devices, memory and log to the closer.

        Returns without waiting for the kernel to tear the devices down: from this call on
        the closer owns those objects (see the module docstring), and this backend holds
        nothing. Idempotent.
        """
        with contextlib.suppress(KvhostError, OSError, ValueError):
            self._detach_all()
        tap, self.tap = self.tap, None
        devices, self.devices = self.devices, []
        table, self.table = self.table, None
        log_map, self._log = self._log, None
        self._tap_state = None
        self._kernel_addrs.clear()
        self._applied_features = None
        if tap is None and not devices and table is None and log_map is None:
            return
        self._closer.submit(
            f"{self.name}'s tap and vhost-net devices",
            functools.partial(_teardown, tap, devices, table, log_map),
        )

    # -- helpers ----------------------------------------------------------------------

    def _devs(self) -> list[VhostNet]:
        if not self.devices:
            raise RemoteProtocolError("no vhost-net device yet: SET_OWNER must come first")
        return self.devices

    def _tap(self) -> Tap:
        if self.tap is None:
            raise RemoteProtocolError("no tap yet: SET_OWNER must come first")
        return self.tap

    def _ring(self, ring: int) -> tuple[VhostNet, int]:
        devs = self.devices
        if 0 <= ring < 2 * len(devs):
            return devs[ring >> 1], ring & 1
        devs = self._devs()  # raises before SET_OWNER
        if not 0 <= ring < 2 * len(devs):
            raise RemoteProtocolError(
                f"vring {ring} does not exist: this backend serves vrings 0-{2 * len(devs) - 1}"
            )
        return devs[ring // 2], ring % 2

    def _translate(self, ring: int, a: RingAddr) -> tuple[int, int, int]:
        if self.table is None:
            raise RemoteProtocolError(f"vring {ring} addresses need a memory table first")
        num = self._nums.get(ring, 1)
        desc_len, avail_len, used_len = ring_lengths(num)
        if a.desc % 16 or a.avail % 2 or a.used % 4:
            for name, addr, align in (
                ("descriptor table", a.desc, 16),
                ("avail ring", a.avail, 2),
                ("used ring", a.used, 4),
            ):
                if addr % align:
                    raise RemoteProtocolError(
                        f"vring {ring} (size {num}) {name} at 0x{addr:x} is not {align}-byte "
                        "aligned"
                    )
        try:
            desc = self.table.translate_frontend_va(a.desc, desc_len)
            avail = self.table.translate_frontend_va(a.avail, avail_len)
            used = self.table.translate_frontend_va(a.used, used_len)
            if a.log:
                if self._log is None:
                    raise RemoteProtocolError("used-ring logging requested before SET_LOG_BASE")
                self.table.translate_gpa(a.log_guest_addr, used_len)
        except RemoteProtocolError as err:
            raise RemoteProtocolError(f"vring {ring} (size {num}): {err}") from None
        return desc, used, avail

    def _apply_addr(self, ring: int) -> None:
        a = self._addrs[ring]
        desc, used, avail = self._translate(ring, a)
        dev, i = self._ring(ring)
        values = (desc, used, avail, a.log_guest_addr, a.log)
        if self._kernel_addrs.get(ring) != values:
            self._kernel_addrs.pop(ring, None)
            dev.set_vring_addr(i, desc, used, avail, a.log_guest_addr, a.log)
            self._kernel_addrs[ring] = values
        self._checked[ring] = self._nums.get(ring, 1)

    def _check_log_covers(self, table: MappedTable, log_size: int) -> None:
        top = max((r.guest_phys_addr + r.memory_size for r in table.vhost_regions()), default=0)
        need = -(-top // (LOG_PAGE * 8))
        if log_size < need:
            raise RemoteProtocolError(
                f"dirty log of {log_size} bytes covers guest memory up to "
                f"0x{log_size * 8 * LOG_PAGE:x}, but memory reaches 0x{top:x} (needs {need} "
                "bytes)"
            )

    def _detach_all(self) -> None:
        for ring in sorted(self._attached):
            self.stop_vring(ring)

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
    tap: Tap | None, devices: list[VhostNet], table: MappedTable | None, log_map: mmap.mmap | None
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
                if log_map is not None:
                    log_map.close()
