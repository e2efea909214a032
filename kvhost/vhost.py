"""One open ``/dev/vhost-net``: every vhost and vhost-net ioctl as a method.

Each method issues exactly one ioctl (two for :meth:`VhostNet.get_features` on kernels
without ``FEATURES_ARRAY``) through :func:`kvhost.ioctl.ioctl`, so every failure is a
:class:`~kvhost.errors.KernelError` naming the ioctl, the device and the likely cause.

Order QEMU uses (``hw/virtio/vhost.c``, ``hw/net/vhost_net.c``)::

    open -> [SET_FORK_FROM_OWNER] -> SET_OWNER -> GET_FEATURES -> [GET/SET_BACKEND_FEATURES]
      -> SET_FEATURES -> SET_MEM_TABLE
      -> per ring: SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR, SET_VRING_KICK, SET_VRING_CALL
      -> per ring: NET_SET_BACKEND(tap fd)              (datapath runs)
      -> per ring: NET_SET_BACKEND(-1), GET_VRING_BASE  (stopped) -> close

Ring index 0 is RX, 1 is TX (one device per queue pair).

Lifecycle: the object owns its fd from construction (``path`` opened, or ``fd`` adopted)
until :meth:`VhostNet.close`; calls after ``close`` raise ``ValueError``.

The verb set: names and argument order follow rust-vmm's ``VhostBackend`` (get/set_features,
set_owner, reset_owner, set_mem_table, set_log_base(base, region), set_vring_num /
addr(index, :class:`VringConfig`) / base, get_vring_base, set_vring_kick / call / err), and
the shim's :class:`shim.session.Backend` speaks the same verbs, so the kernel device and the
vhost-user transport read alike. vhost-net's own extra is :meth:`VhostNet.set_backend`.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from kvhost import abi, features
from kvhost.errors import KernelError
from kvhost.ioctl import ioctl, open_device
from kvhost.memory import MemoryRegion

RX = 0
TX = 1
DEFAULT_PATH = "/dev/vhost-net"

_U64 = struct.Struct("=Q")
_INT = struct.Struct("=i")
_VRING_F_LOG = 1 << abi.VHOST_VRING_F_LOG

# What an ioctl this kernel does not know returns on vhost-net. Unknown numbers fall
# through vhost_dev_ioctl -- which first demands ownership (EPERM without SET_OWNER) -- into
# vhost_vring_ioctl, which reads the first u32 of the argument as a ring index (ENOBUFS when
# it is >= 2, e.g. FEATURES_ARRAY's count 2) before giving up with ENOTTY. The ioctls probed
# this way never fail with these errnos on kernels that have them (they need no owner and
# take no ring index), so all three mean "absent".
ABSENT_ERRNOS = frozenset({errno.ENOTTY, errno.EPERM, errno.ENOBUFS})


@dataclass(frozen=True, slots=True)
class VringConfig:
    """One split ring's size and addresses, as ``set_vring_addr`` takes them (rust-vmm's
    ``VringConfigData``): ``desc``/``used``/``avail`` in the address space of whoever the
    receiver is told to expect (this process for the kernel, the frontend's for the shim),
    ``log_addr`` the used ring's guest-physical address, logged when ``flags`` has
    ``1 << VHOST_VRING_F_LOG``. ``size`` is the ring's entry count (the kernel does not take
    it with the addresses; translators check the ring's extent with it)."""

    size: int
    flags: int
    desc: int
    used: int
    avail: int
    log_addr: int = 0

    @property
    def log(self) -> bool:
        """Whether the kernel logs used-ring writes (VHOST_VRING_F_LOG)."""
        return bool(self.flags & _VRING_F_LOG)


@dataclass(frozen=True, slots=True)
class LogRegion:
    """A dirty log shared as a file (vhost-user's SET_LOG_BASE with LOG_SHMFD): ``size``
    bytes at ``offset`` of ``fd`` (rust-vmm's ``VhostUserDirtyLogRegion``)."""

    size: int
    offset: int
    fd: int


class VhostNet:
    """An open vhost-net device. See the module docstring for the call order."""

    def __init__(self, path: str = DEFAULT_PATH, *, fd: int | None = None) -> None:
        """Open ``path`` (raises :class:`~kvhost.errors.DeviceUnavailable`), or adopt ``fd``."""
        self.path = path
        self._fd = open_device(path) if fd is None else fd
        self.device = path if fd is None else f"{path} (fd {fd})"
        #: whether GET_FEATURES_ARRAY worked; None until get_features() ran
        self.features_array: bool | None = None

    # -- lifecycle -----------------------------------------------------------------------
    def fileno(self) -> int:
        """The device fd; valid until :meth:`close`."""
        if self._fd < 0:
            raise ValueError(f"{self.device} is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        """Close the device (the kernel stops the rings and frees the worker); idempotent."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> VhostNet:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _ioctl(self, req: abi.Ioctl, arg: Any = 0) -> int:
        return ioctl(self.fileno(), req, arg, device=self.device)

    def _get_u64(self, req: abi.Ioctl) -> int:
        buf = bytearray(_U64.size)
        self._ioctl(req, buf)
        return int(_U64.unpack(buf)[0])

    def _state(self, req: abi.Ioctl, index: int, num: int = 0) -> int:
        buf = bytearray(abi.VRING_STATE.pack(index, num))
        self._ioctl(req, buf)
        return int(abi.VRING_STATE.unpack(buf)[1])

    def _file(self, req: abi.Ioctl, index: int, fd: int) -> None:
        self._ioctl(req, abi.VRING_FILE.pack(index, fd))

    # -- features ------------------------------------------------------------------------
    def get_features_array(self) -> int | None:
        """All feature bits via GET_FEATURES_ARRAY (6.17+), or None if the kernel lacks it.

        Always passes count 2 (128 bits): 6.17 .. 7.1.5 zero the returned words when count
        is larger (clear_user from the wrong address, reference section 1e.3).
        """
        words = abi.VHOST_FEATURES_ARRAY_WORDS
        arr = abi.ffi.new(
            "struct vhost_features_array *", {"count": words, "features": [0] * words}
        )
        try:
            self._ioctl(abi.VHOST_GET_FEATURES_ARRAY, abi.buffer(arr))
        except KernelError as err:
            if err.errno in ABSENT_ERRNOS:
                return None
            raise
        return features.from_words(int(arr.features[i]) for i in range(words))

    def get_features(self) -> int:
        """The device's feature bits (bits above 63 included when the kernel can say)."""
        wide = self.get_features_array()
        self.features_array = wide is not None
        if wide is not None:
            return wide
        return self._get_u64(abi.VHOST_GET_FEATURES)

    def set_features(self, virtio_features: int) -> None:
        """Acknowledge ``virtio_features`` (SET_FEATURES_ARRAY only for bits above 63).

        Raises ``ValueError`` for bits beyond 127 and KernelError (EOPNOTSUPP for bits the
        device does not offer; EFAULT for LOG_ALL without an accessible log).
        """
        if virtio_features < 0 or virtio_features >> (64 * abi.VHOST_FEATURES_ARRAY_WORDS):
            raise ValueError(f"feature set 0x{virtio_features:x} does not fit 128 bits")
        if virtio_features >> 64:
            words = features.to_words(virtio_features)
            arr = abi.ffi.new(
                "struct vhost_features_array *", {"count": len(words), "features": words}
            )
            self._ioctl(abi.VHOST_SET_FEATURES_ARRAY, abi.buffer(arr))
        else:
            self._ioctl(abi.VHOST_SET_FEATURES, _U64.pack(virtio_features))

    def get_backend_features(self) -> int:
        """VHOST_GET_BACKEND_FEATURES (4.19+): a mask of ``1 << VHOST_BACKEND_F_*``."""
        return self._get_u64(abi.VHOST_GET_BACKEND_FEATURES)

    def set_backend_features(self, value: int) -> None:
        self._ioctl(abi.VHOST_SET_BACKEND_FEATURES, _U64.pack(value))

    # -- ownership -----------------------------------------------------------------------
    def set_owner(self) -> None:
        """Make this process the owner (creates the vhost worker; the slowest call)."""
        self._ioctl(abi.VHOST_SET_OWNER)

    def reset_owner(self) -> None:
        self._ioctl(abi.VHOST_RESET_OWNER)

    def get_fork_from_owner(self) -> int | None:
        """VHOST_GET_FORK_FROM_OWNER (0 kthread, 1 task), or None when the kernel lacks it.

        Stable kernels exist with other numbers for this ioctl (reference 1e.2), so
        presence is probed, never inferred from the release.
        """
        # 8 zeroed bytes although the kernel writes one: a kernel without the ioctl reads
        # a u32 ring index from the argument, which must be 0 to get the clean ENOTTY.
        buf = bytearray(8)
        try:
            self._ioctl(abi.VHOST_GET_FORK_FROM_OWNER, buf)
        except KernelError as err:
            if err.errno in ABSENT_ERRNOS:
                return None
            raise
        return buf[0]

    def set_fork_from_owner(self, value: int) -> None:
        """Before :meth:`set_owner` only (EBUSY after); ``value`` 0 or 1."""
        self._ioctl(abi.VHOST_SET_FORK_FROM_OWNER, bytes([value]))

    # -- memory and log ------------------------------------------------------------------
    def set_mem_table(self, regions: Sequence[MemoryRegion]) -> None:
        """Install the guest memory map (gpa -> address in this process).

        E2BIG above the vhost module's ``max_mem_regions``; EPERM before :meth:`set_owner`.
        """
        region = abi.MEMORY_REGION.pack
        # a bytearray, not bytes: fcntl copies immutable arguments into a 1 KiB buffer and
        # refuses longer ones, and a table of more than 31 regions is longer
        table = bytearray(abi.MEMORY_HEADER.pack(len(regions), 0))
        for r in regions:
            table += region(r.guest_phys_addr, r.memory_size, r.userspace_addr, 0)
        self._ioctl(abi.VHOST_SET_MEM_TABLE, table)

    def set_log_base(self, base: int, region: LogRegion | None = None) -> None:
        """The dirty bitmap's address in this process (one bit per 4 KiB guest page).

        The kernel takes an address, never a file: a ``region`` is a ``ValueError``.
        """
        if region is not None:
            raise ValueError("kernel vhost takes the log's address, not a file region")
        self._ioctl(abi.VHOST_SET_LOG_BASE, _U64.pack(base))

    def set_log_fd(self, fd: int) -> None:
        """An eventfd the kernel signals after logging; -1 for none."""
        self._ioctl(abi.VHOST_SET_LOG_FD, _INT.pack(fd))

    # -- rings ---------------------------------------------------------------------------
    def set_vring_num(self, index: int, num: int) -> None:
        """Ring size: a power of two from 1 to 32768 (EINVAL otherwise)."""
        self._state(abi.VHOST_SET_VRING_NUM, index, num)

    def set_vring_addr(self, index: int, config: VringConfig) -> None:
        """Ring addresses in this process (``config.size`` is not passed: see
        :meth:`set_vring_num`)."""
        self._ioctl(
            abi.VHOST_SET_VRING_ADDR,
            abi.VRING_ADDR.pack(
                index, config.flags, config.desc, config.used, config.avail, config.log_addr
            ),
        )

    def set_vring_base(self, index: int, base: int) -> None:
        """The next avail index the device will read (the migrated ring position)."""
        self._state(abi.VHOST_SET_VRING_BASE, index, base)

    def get_vring_base(self, index: int) -> int:
        """The device's next avail index; also stops the ring (QEMU calls it on stop)."""
        return self._state(abi.VHOST_GET_VRING_BASE, index)

    def set_vring_kick(self, index: int, fd: int) -> None:
        """The eventfd the driver kicks; -1 unbinds."""
        self._file(abi.VHOST_SET_VRING_KICK, index, fd)

    def set_vring_call(self, index: int, fd: int) -> None:
        """The eventfd the device signals on used-ring updates; -1 unbinds."""
        self._file(abi.VHOST_SET_VRING_CALL, index, fd)

    def set_vring_err(self, index: int, fd: int) -> None:
        """The eventfd the device signals on ring errors; -1 unbinds."""
        self._file(abi.VHOST_SET_VRING_ERR, index, fd)

    def set_busyloop_timeout(self, index: int, us: int) -> None:
        """Busy-poll the ring for up to ``us`` microseconds (4.6+)."""
        self._state(abi.VHOST_SET_VRING_BUSYLOOP_TIMEOUT, index, us)

    def get_busyloop_timeout(self, index: int) -> int:
        return self._state(abi.VHOST_GET_VRING_BUSYLOOP_TIMEOUT, index)

    # -- vhost-net -----------------------------------------------------------------------
    def set_backend(self, index: int, fd: int) -> None:
        """Attach a tap/macvtap/AF_PACKET fd to ring ``index`` (-1 detaches).

        The device does not take ownership of ``fd`` (the kernel holds its own reference).
        ENOTSOCK for any other kind of fd.
        """
        self._file(abi.VHOST_NET_SET_BACKEND, index, fd)
