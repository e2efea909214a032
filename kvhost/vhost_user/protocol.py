"""The vhost-user wire format: requests, payloads and a sans-IO codec for both ends.

Nothing here touches a socket. The codecs take bytes (plus the file descriptors that came as
SCM_RIGHTS ancillary data) and return :class:`Message` objects, or take payload objects and
return bytes. Decoding checks *syntax* only: header version and flags, payload size against
the request, counts inside the payload, the number of fds. What a message *means* (is it
allowed now? is that address inside guest memory?) is the shim's state machine's business.

Wire layout (QEMU ``docs/interop/vhost-user.rst``; all integers in host byte order)::

    0          4          8          12                      12 + size
    +----------+----------+----------+-------------------------+
    | request  |  flags   |   size   |  payload (size bytes)   |   + SCM_RIGHTS fds
    |   u32    |   u32    |   u32    |                         |     (0..8, with the
    +----------+----------+----------+-------------------------+      message's first byte)

    flags:  bit 0-1  version, always 0x1
            bit 2    REPLY       set on every reply from the backend, never on a request
            bit 3    NEED_REPLY  frontend asks for an ack (only with REPLY_ACK negotiated)

Payloads (offsets in bytes)::

    U64             0 u64 value                      GET_*/SET_FEATURES, MTU, acks, ...
    VringState      0 u32 index | 4 u32 num          SET_VRING_NUM/BASE/ENABLE, GET_VRING_BASE
    VringAddr       0 u32 index | 4 u32 flags (bit 0: VHOST_VRING_F_LOG)
                    8 u64 desc_user_addr | 16 u64 used_user_addr
                   24 u64 avail_user_addr | 32 u64 log_guest_addr           (40 bytes)
    VringFile       0 u64: bits 0-7 vring index, bit 8 "no fd" (then 0 fds, else 1 fd)
    MemRegion       0 u64 guest_phys_addr | 8 u64 memory_size
                   16 u64 userspace_addr  | 24 u64 mmap_offset               (32 bytes)
    MemTable        0 u32 num regions (1..8) | 4 u32 padding | 8 MemRegion[num]
                    size = 8 + 32*num, one fd per region, same order
    LogBase         0 u64 mmap_size | 8 u64 mmap_offset, one fd              (16 bytes)
    LogFd           no bytes, one fd                                          (0 bytes)
    RarpMac         0 6-byte MAC | 6 2 bytes ignored                         (8 bytes)
    VersionString   UTF-8 text, NUL-terminated, then NUL padding             (2..1032 bytes)
    VersionList     0 u32 count | 4 u32 reserved (0) | 8 default NUL
                    then `count` supported versions, oldest first, each NUL-terminated

The two kvhost requests (``GET_INTERFACE_VERSIONS``, ``SET_INTERFACE_VERSION``) and the
protocol feature bit 63 are specified in ``docs/vhost-user-versions.md``.

File descriptors and stream boundaries: a vhost-user socket is a SOCK_STREAM socket, so a
``recvmsg`` may return the tail of one message and the head of the next. The kernel returns a
message's fds with the chunk that contains that message's first byte and ends the chunk there
(``unix_stream_read_generic`` stops after a buffer that carried fds). Every frontend sends one
message per ``sendmsg``, so the fds of a chunk belong to the **last message that starts in the
chunk**; fds arriving with a chunk in which no message starts are a protocol error.

Fd ownership: fds handed to ``receive`` belong to the codec until it returns them inside a
:class:`Message`; from then on they belong to the caller (use :func:`close_fds`). Whenever
``receive`` raises, every fd it was given and every fd it still held is closed, and the
codec refuses further input. Requests kvhost does not interpret arrive as :class:`Raw`
payloads with their fds already closed.

Decoding has one path, whatever the chunking: the stream (the held head of an incomplete
message, then the new chunk) is walked message by message; each header is checked as soon
as it is complete (its flags, and its size against the ``SIZES`` of the request's payload
type, so a wrong or hostile size fails before its payload is buffered), and each complete
message's payload type checks its own bytes and its own fd count in ``unpack(body, fds)``.
Only the incomplete message at the end is kept for the next chunk. Every request that a
peer may send kvhost is listed in :data:`REQUEST_PAYLOADS`; every other id (among them
ADD_MEM_REG and REM_MEM_REG, which need CONFIGURE_MEM_SLOTS, never offered) is ``Raw``, and
the shim answers it with a "not supported" failure.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag
from typing import ClassVar, Self

from kvhost import abi
from kvhost.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "EMPTY",
    "HEADER",
    "HEADER_SIZE",
    "INHERENT_REPLIES",
    "MAX_FDS",
    "MAX_PAYLOAD",
    "MAX_VERSION_BYTES",
    "MAX_VERSION_COUNT",
    "MAX_VERSION_LIST_PAYLOAD",
    "MEMORY_BASELINE_NREGIONS",
    "REQUEST_PAYLOADS",
    "U64",
    "VHOST_USER_F_PROTOCOL_FEATURES",
    "VHOST_USER_VERSION",
    "BackendCodec",
    "Empty",
    "FrontendCodec",
    "HeaderFlag",
    "LogBase",
    "LogFd",
    "MemRegion",
    "MemTable",
    "Message",
    "Payload",
    "ProtocolFeature",
    "RarpMac",
    "Raw",
    "Request",
    "VersionList",
    "VersionStatus",
    "VersionString",
    "VringAddr",
    "VringFile",
    "VringState",
    "close_fds",
    "raw_message",
]

HEADER = struct.Struct("=III")
HEADER_SIZE = HEADER.size
#: The only vhost-user protocol version that exists (header flags bits 0-1).
VHOST_USER_VERSION = 0x1
_VERSION_MASK = 0x3
#: Virtio feature bit 30 as a mask: the backend speaks GET/SET_PROTOCOL_FEATURES.
VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30
#: QEMU's VHOST_MEMORY_BASELINE_NREGIONS: most regions in one SET_MEM_TABLE.
MEMORY_BASELINE_NREGIONS = 8
#: Most fds kvhost accepts with one message (QEMU sends at most 8).
MAX_FDS = MEMORY_BASELINE_NREGIONS
#: Largest payload of any request (and of any reply but GET_INTERFACE_VERSIONS).
MAX_PAYLOAD = 4096
#: Largest GET_INTERFACE_VERSIONS reply payload.
MAX_VERSION_LIST_PAYLOAD = 65536
#: Longest interface version string in bytes (UTF-8, without its NUL).
MAX_VERSION_BYTES = 1024
#: Most versions one GET_INTERFACE_VERSIONS reply may list.
MAX_VERSION_COUNT = 1024


class HeaderFlag(IntFlag):
    """Bits of the header's ``flags`` word."""

    VERSION = 0x1  #: protocol version 1 in bits 0-1 (the only version)
    REPLY = 0x4  #: the message is the backend's reply to a request
    NEED_REPLY = 0x8  #: the frontend asks for a u64 ack (REPLY_ACK negotiated)


# Plain ints: ~ on an IntFlag complements only within its defined bits.
_KNOWN_FLAGS = _VERSION_MASK | int(HeaderFlag.REPLY) | int(HeaderFlag.NEED_REPLY)


class Request(IntEnum):
    """Frontend request ids (QEMU ``VhostUserRequest``) and kvhost's extension."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43
    # kvhost's interface-version extension ("KV" = 0x4B56), docs/vhost-user-versions.md
    GET_INTERFACE_VERSIONS = 0x4B560001
    SET_INTERFACE_VERSION = 0x4B560002


class ProtocolFeature(IntFlag):
    """Protocol feature bits (GET/SET_PROTOCOL_FEATURES), as masks."""

    MQ = 1 << 0  #: GET_QUEUE_NUM and more than one queue pair
    LOG_SHMFD = 1 << 1  #: SET_LOG_BASE carries the dirty log as a shared-memory fd
    RARP = 1 << 2  #: SEND_RARP after migration
    REPLY_ACK = 1 << 3  #: NEED_REPLY may be set on any request; the backend acks with a u64
    MTU = 1 << 4  #: NET_SET_MTU
    BACKEND_REQ = 1 << 5  #: backend-initiated requests over SET_BACKEND_REQ_FD's socket
    CROSS_ENDIAN = 1 << 6  #: SET_VRING_ENDIAN for legacy cross-endian guests
    CRYPTO_SESSION = 1 << 7  #: CREATE/CLOSE_CRYPTO_SESSION
    PAGEFAULT = 1 << 8  #: postcopy migration with userfaultfd
    CONFIG = 1 << 9  #: GET/SET_CONFIG of the device config space
    BACKEND_SEND_FD = 1 << 10  #: backend requests may carry fds
    HOST_NOTIFIER = 1 << 11  #: backend maps host notifiers for queues
    INFLIGHT_SHMFD = 1 << 12  #: GET/SET_INFLIGHT_FD inflight I/O tracking
    RESET_DEVICE = 1 << 13  #: RESET_DEVICE
    INBAND_NOTIFICATIONS = 1 << 14  #: VRING_KICK and backend VRING_CALL as messages
    CONFIGURE_MEM_SLOTS = 1 << 15  #: GET_MAX_MEM_SLOTS, ADD_MEM_REG, REM_MEM_REG
    STATUS = 1 << 16  #: SET/GET_STATUS of the virtio device status byte
    XEN_MMAP = 1 << 17  #: Xen memory regions with mmap flags and domid
    SHARED_OBJECT = 1 << 18  #: virtio-dmabuf shared objects (GET_SHARED_OBJECT)
    DEVICE_STATE = 1 << 19  #: SET_DEVICE_STATE_FD / CHECK_DEVICE_STATE migration
    GET_VRING_BASE_INFLIGHT = 1 << 20  #: GET_VRING_BASE may stop with requests in flight
    KVHOST_INTERFACE_VERSION = 1 << 63  #: kvhost: GET/SET_INTERFACE_VERSION(S)


class VersionStatus(IntEnum):
    """The u64 in the SET_INTERFACE_VERSION reply (docs/vhost-user-versions.md §4)."""

    OK = 0  #: the version is selected; GET_FEATURES now reports its bits
    UNKNOWN = 1  #: the string is malformed or names no version the backend knows
    UNSUPPORTED = 2  #: a known version this host cannot serve (missing bits or limits)
    BAD_STATE = 3  #: sent too late (after SET_FEATURES) or without bit 63 negotiated
    PINNED = 4  #: the operator pinned the backend to another version and forbids changes


# --- payloads ------------------------------------------------------------------------------
#
# Each payload is a frozen slotted dataclass that declares its wire form itself:
#
# * ``SIZES``: the payload sizes a header may announce for it (exact for fixed layouts, a
#   bound for variable ones), checked before the payload is buffered;
# * ``unpack(body, fds)`` checks the bytes *and* the number of fds that came with them and
#   raises RemoteProtocolError (the peer sent something bad); it never keeps or closes fds;
# * ``pack()`` validates the values and raises LocalProtocolError (we are about to send
#   something bad); ``fd_count`` says how many fds go with the payload.
#
# Struct layouts: the two that are kernel structs (QEMU sends ``struct vhost_vring_state``
# and ``struct vhost_vring_addr`` as they are) come from kvhost.abi, where they are checked
# against the kernel headers; the rest exist only in vhost-user.rst and are declared here.

#: a vhost-user u64 (features, masks, acks, the vring file word)
_U64 = struct.Struct("=Q")
#: VhostUserMemoryRegion { guest_phys_addr; memory_size; userspace_addr; mmap_offset; }
_MEM_REGION = struct.Struct("=QQQQ")
#: VhostUserMemory's head { nregions; padding; } -- the regions follow it
_MEM_TABLE_HEAD = struct.Struct("=II")
#: VhostUserLog { mmap_size; mmap_offset; }
_LOG = struct.Struct("=QQ")
#: kvhost's version list head { count; reserved; } (docs/vhost-user-versions.md)
_VERSION_LIST_HEAD = struct.Struct("=II")


def _u64(v: int) -> bool:
    return 0 <= v < 1 << 64


def _u32(v: int) -> bool:
    return 0 <= v < 1 << 32


def _exactly(size: int) -> range:
    return range(size, size + 1)


def _up_to(size: int) -> range:
    return range(size + 1)


def _describe(sizes: range) -> str:
    if len(sizes) == 1:
        return f"{sizes.start} bytes"
    if sizes.start == 0:
        return f"at most {sizes.stop - 1} bytes"
    return f"{sizes.start}..{sizes.stop - 1} bytes"


def _need_size(what: str, body: bytes, size: int) -> None:
    if len(body) != size:
        raise RemoteProtocolError(f"{what} payload must be {size} bytes, got {len(body)}")


class _WrongFdCount(RemoteProtocolError):
    """A payload came with the wrong number of fds; the codec puts the request's name in
    front ("SET_VRING_CALL came with 2 fds; it needs 1")."""

    def __init__(self, got: int, need: int) -> None:
        super().__init__(f"came with {got} fds; it needs {need}")
        self.got = got
        self.need = need


def _need_fds(fds: Sequence[int], count: int) -> None:
    if len(fds) != count:
        raise _WrongFdCount(len(fds), count)


@dataclass(frozen=True, slots=True)
class Empty:
    """No payload (size 0) and no fds."""

    SIZES: ClassVar[range] = _exactly(0)
    fd_count: ClassVar[int] = 0

    def pack(self) -> bytes:
        return b""

    @classmethod
    def unpack(cls, body: bytes, fds: Sequence[int]) -> Self:
        _need_size("an empty", body, 0)
        _need_fds(fds, 0)
        return cls()


EMPTY = Empty()


@dataclass(frozen=True, slots=True)
class U64:
    """A single u64: feature masks, queue counts, MTU, ack status. No fds."""

    value: int
    SIZES: ClassVar[range] = _exactly(_U64.size)
    fd_count: ClassVar[int] = 0

    def pack(self) -> bytes:
        if not _u64(self.value):
            raise LocalProtocolError(f"u64 payload value {self.value} does not fit in 64 bits")
        return _U64.pack(self.value)

    @classmethod
    def unpack(cls, body: bytes, fds: Sequence[int]) -> Self:
        _need_size("a u64", body, _U64.size)
        _need_fds(fds, 0)
        (value,) = _U64.unpack(body)
        return cls(value)


@dataclass(frozen=True, slots=True)
class VringState:
    """``struct vhost_vring_state``: a vring index and a number (size, base, enable)."""

    index: int
    num: int
    SIZES: ClassVar[range] = _exactly(abi.VRING_STATE.size)
    fd_count: ClassVar[int] = 0

    def pack(self) -> bytes:
        if not (_u32(self.index) and _u32(self.num)):
            raise LocalProtocolError(f"vring state {self} has a field outside u32")
        return abi.VRING_STATE.pack(self.index, self.num)

    @classmethod
    def unpack(cls, body: bytes, fds: Sequence[int]) -> Self:
        _need_size("a vring state", body, abi.VRING_STATE.size)
        _need_fds(fds, 0)
        index, num = abi.VRING_STATE.unpack(body)
        return cls(index, num)


@dataclass(frozen=True, slots=True)
class VringAddr:
    """``struct vhost_vring_addr``: ring addresses in the *frontend's* virtual address space.

    ``flags`` bit 0 (VHOST_VRING_F_LOG) asks for used-ring writes to be logged at
    ``log_guest_addr`` (a guest-physical address).
    """

    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int
    SIZES: ClassVar[range] = _exactly(abi.VRING_ADDR.size)
    fd_count: ClassVar[int] = 0

    @property
    def log(self) -> bool:
        """True when VHOST_VRING_F_LOG is set."""
        return bool(self.flags & 1)

    def pack(self) -> bytes:
        addrs = (self.desc_user_addr, self.used_user_addr, self.avail_user_addr,
                 self.log_guest_addr)
        if not (_u32(self.index) and _u32(self.flags) and all(_u64(a) for a in addrs)):
            raise LocalProtocolError(f"vring address {self} has a field out of range")
        return abi.VRING_ADDR.pack(self.index, self.flags, *addrs)

    @classmethod
    def unpack(cls, body: bytes, fds: Sequence[int]) -> Self:
        _need_size("a vring address", body, abi.VRING_ADDR.size)
        _need_fds(fds, 0)
        index, flags, desc, used, avail, log = abi.VRING_ADDR.unpack(body)
        return cls(index, flags, desc, used, avail, log)


@dataclass(frozen=True, slots=True)
class VringFile:
    """SET_VRING_KICK/CALL/ERR's u64: vring index in bits 0-7, bit 8 = no fd follows;
    otherwise exactly one fd comes with it."""

    index: int
    no_fd: bool = False
    SIZES: ClassVar[range] = _exactly(_U64.size)
    INDEX_MASK: ClassVar[int] = 0xFF
    NOFD_MASK: ClassVar[int] = 0x100

    @property
    def fd_count(self) -> int:
        """How many fds must accompany this payload."""
        return 0 if self.no_fd else 1

    def pack(self) -> bytes:
        if not 0 <= self.index <= self.INDEX_MASK:
            raise LocalProtocolError(
                f"vring index {self.index} does not fit the 8 bits of a vring file message"
            )
        return _U64.pack(self.index | (self.NOFD_MASK if self.no_fd else 0))

    @classmethod
    def unpack(cls, body: bytes, fds: Sequence[int]) -> Self:
        _need_size("a vring file", body, _U64.size)
        (value,) = _U64.unpack(body)
        if value & ~(cls.INDEX_MASK | cls.NOFD_MASK):
            raise RemoteProtocolError(
                f"vring file payload 0x{value:x} sets reserved bits 9-63 "
                "(only bits 0-7 index and bit 8 no-fd are defined)"
            )
        payload = cls(value & cls.INDEX_MASK, bool(value & cls.NOFD_MASK))
        _need_fds(fds, payload.fd_count)
        return payload


@dataclass(frozen=True, slots=True)
class MemRegion:
    """One memory region: guest-physical range, the frontend's address of it, fd offset.

    Not a payload of its own: :class:`MemTable` carries 1..8 of them.
    """

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int

    def pack(self) -> bytes:
        fields = (self.guest_phys_addr, self.memory_size, self.userspace_addr, self.mmap_offset)
        if not all(_u64(v) for v in fields):
            raise LocalProtocolError(f"memory region {self} has a field outside u64")
        return _MEM_REGION.pack(*fields)


@dataclass(frozen=True, slots=True)
class MemTable:
    """SET_MEM_TABLE: 1..8 regions; exactly one fd per region, in the same order."""

    regions: tuple[MemRegion, ...]
    #: a bound: the region count in the head decides the exact size
    SIZES: ClassVar[range] = _up_to(MAX_PAYLOAD)

    @property
    def fd_count(self) -> int:
        """How many fds must accompany this payload."""
        return len(self.regions)

    def pack(self) -> bytes:
        if not 1 <= len(self.regions) <= MEMORY_BASELINE_NREGIONS:
            raise LocalProtocolError(
                f"a memory table holds 1..{MEMORY_BASELINE_NREGIONS} regions, "
                f"not {len(self.regions)}"
            )
        head = _MEM_TABLE_HEAD.pack(len(self.regions), 0)
        return head + b"".join(r.pack() for r in self.regions)

    @classmethod
    def unpack(cls, body: bytes, fds: Sequence[int]) -> Self:
        if len(body) < _MEM_TABLE_HEAD.size:
            raise RemoteProtocolError(
                f"memory table payload of {len(body)} bytes is shorter than its 8-byte head"
            )
        count, _padding = _MEM_TABLE_HEAD.unpack_from(body)
        if not 1 <= count <= MEMORY_BASELINE_NREGIONS:
            raise RemoteProtocolError(
                f"memory table announces {count} regions; 1..{MEMORY_BASELINE_NREGIONS} "
                "are allowed in SET_MEM_TABLE"
            )
        want = _MEM_TABLE_HEAD.size + count * _MEM_REGION.size
        if len(body) != want:
            raise RemoteProtocolError(
                f"memory table with {count} regions must be {want} bytes, got {len(body)}"
            )
        _need_fds(fds, count)
        regions = _MEM_REGION.iter_unpack(body[_MEM_TABLE_HEAD.size :])
        return cls(tuple(MemRegion(*fields) for fields in regions))


@dataclass(frozen=True, slots=True)
class LogBase:
    """SET_LOG_BASE with LOG_SHMFD: the log's size and offset inside the one fd."""

    mmap_size: int
    mmap_offset: int
    SIZES: ClassVar[range] = _exactly(_LOG.size)
    fd_count: ClassVar[int] = 1

    def pack(self) -> bytes:
        if not (_u64(self.mmap_size) and _u64(self.mmap_offset)):
            raise LocalProtocolError(f"log description {self} has a field outside u64")
        return _LOG.pack(self.mmap_size, self.mmap_offset)

    @classmethod
    def unpack(cls, body: bytes, fds: Sequence[int]) -> Self:
        _need_size("a log description", body, _LOG.size)
        _need_fds(fds, 1)
        mmap_size, mmap_offset = _LOG.unpack(body)
        return cls(mmap_size, mmap_offset)


@dataclass(frozen=True, slots=True)
class LogFd:
    """SET_LOG_FD: no bytes; one fd, the eventfd the backend signals after logging."""

    SIZES: ClassVar[range] = _exactly(0)
    fd_count: ClassVar[int] = 1

    def pack(self) -> bytes:
        return b""

    @classmethod
    def unpack(cls, body: bytes, fds: Sequence[int]) -> Self:
        _need_size("a log fd", body, 0)
        _need_fds(fds, 1)
        return cls()


@dataclass(frozen=True, slots=True)
class RarpMac:
    """SEND_RARP: the guest's MAC in the first 6 bytes of a u64-sized payload."""

    mac: bytes
    SIZES: ClassVar[range] = _exactly(8)
    fd_count: ClassVar[int] = 0

    def pack(self) -> bytes:
        if len(self.mac) != 6:
            raise LocalProtocolError(f"a MAC address is 6 bytes, got {len(self.mac)}")
        return bytes(self.mac) + b"\0\0"

    @classmethod
    def unpack(cls, body: bytes, fds: Sequence[int]) -> Self:
        _need_size("a RARP MAC", body, 8)
        _need_fds(fds, 0)
        return cls(bytes(body[:6]))

    @property
    def text(self) -> str:
        """The MAC as ``aa:bb:cc:dd:ee:ff``."""
        return ":".join(f"{b:02x}" for b in self.mac)


def _version_problem(text: str) -> str | None:
    raw = text.encode("utf-8", "surrogatepass")
    if not raw:
        return "an interface version string is empty"
    if len(raw) > MAX_VERSION_BYTES:
        return f"interface version string is {len(raw)} bytes; at most {MAX_VERSION_BYTES}"
    if any(c < " " or c == "\x7f" or 0xD800 <= ord(c) <= 0xDFFF for c in text):
        return f"interface version string {text!r} contains a control character"
    return None


def _decode_version(raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RemoteProtocolError(
            f"interface version string is not valid UTF-8 ({err.reason} at byte {err.start})"
        ) from err
    if (problem := _version_problem(text)) is not None:
        raise RemoteProtocolError(problem)
    return text


@dataclass(frozen=True, slots=True)
class VersionString:
    """SET_INTERFACE_VERSION: one version (a registry name or a value list), NUL-terminated.

    On the wire: the UTF-8 bytes, a NUL, then NUL padding up to a multiple of 8 bytes
    (receivers accept any amount of NUL padding within the size limit). No fds.
    """

    version: str
    MAX_SIZE: ClassVar[int] = (MAX_VERSION_BYTES + 1 + 7) // 8 * 8
    SIZES: ClassVar[range] = _up_to(MAX_SIZE)
    fd_count: ClassVar[int] = 0

    def pack(self) -> bytes:
        if (problem := _version_problem(self.version)) is not None:
            raise LocalProtocolError(problem)
        raw = self.version.encode("utf-8") + b"\0"
        return raw + bytes(-len(raw) % 8)

    @classmethod
    def unpack(cls, body: bytes, fds: Sequence[int]) -> Self:
        if len(body) > cls.MAX_SIZE:
            raise RemoteProtocolError(
                f"a {len(body)}-byte interface version payload; at most {cls.MAX_SIZE} bytes"
            )
        _need_fds(fds, 0)
        end = body.find(b"\0")
        if end < 0:
            raise RemoteProtocolError("interface version string has no NUL terminator")
        if body[end:].strip(b"\0"):
            raise RemoteProtocolError(
                "interface version payload has bytes other than NUL after its terminator"
            )
        return cls(_decode_version(bytes(body[:end])))


@dataclass(frozen=True, slots=True)
class VersionList:
    """GET_INTERFACE_VERSIONS reply: the default version and all supported, oldest first.

    ``default`` is what the backend serves if the frontend selects nothing (its latest,
    unless an operator pinned another); it must be one of ``supported``. No fds.
    """

    default: str
    supported: tuple[str, ...]
    MAX_SIZE: ClassVar[int] = MAX_VERSION_LIST_PAYLOAD
    SIZES: ClassVar[range] = _up_to(MAX_SIZE)
    fd_count: ClassVar[int] = 0

    @property
    def latest(self) -> str:
        """The newest supported version (the list's last entry)."""
        return self.supported[-1]

    def _problem(self) -> str | None:
        if not 1 <= len(self.supported) <= MAX_VERSION_COUNT:
            return (
                f"a version list holds 1..{MAX_VERSION_COUNT} versions, "
                f"not {len(self.supported)}"
            )
        for text in (self.default, *self.supported):
            if (problem := _version_problem(text)) is not None:
                return problem
        if len(set(self.supported)) != len(self.supported):
            return "the supported version list repeats a version"
        if self.default not in self.supported:
            return f"default version {self.default!r} is not in the supported list"
        return None

    def pack(self) -> bytes:
        if (problem := self._problem()) is not None:
            raise LocalProtocolError(problem)
        body = b"".join(t.encode("utf-8") + b"\0" for t in (self.default, *self.supported))
        data = _VERSION_LIST_HEAD.pack(len(self.supported), 0) + body
        if len(data) > self.MAX_SIZE:
            raise LocalProtocolError(
                f"version list is {len(data)} bytes; at most {self.MAX_SIZE} fit a reply"
            )
        return data

    @classmethod
    def unpack(cls, body: bytes, fds: Sequence[int]) -> Self:
        if len(body) > cls.MAX_SIZE:
            raise RemoteProtocolError(
                f"a {len(body)}-byte version list; at most {cls.MAX_SIZE} bytes"
            )
        if len(body) < _VERSION_LIST_HEAD.size:
            raise RemoteProtocolError(
                f"version list of {len(body)} bytes is shorter than its 8-byte head"
            )
        _need_fds(fds, 0)
        count, reserved = _VERSION_LIST_HEAD.unpack_from(body)
        if reserved != 0:
            raise RemoteProtocolError(f"version list reserved word is 0x{reserved:x}, not 0")
        if not 1 <= count <= MAX_VERSION_COUNT:
            raise RemoteProtocolError(
                f"version list announces {count} versions; 1..{MAX_VERSION_COUNT} are allowed"
            )
        strings = bytes(body[_VERSION_LIST_HEAD.size :])
        if not strings.endswith(b"\0"):
            raise RemoteProtocolError("version list does not end with a NUL terminator")
        parts = strings[:-1].split(b"\0")
        if len(parts) != count + 1:
            raise RemoteProtocolError(
                f"version list announces {count} versions plus a default but holds "
                f"{len(parts)} strings"
            )
        texts = [_decode_version(part) for part in parts]
        result = cls(texts[0], tuple(texts[1:]))
        if (problem := result._problem()) is not None:
            raise RemoteProtocolError(problem)
        return result


@dataclass(frozen=True, slots=True)
class Raw:
    """The undecoded payload of a request kvhost does not interpret (or an unknown id).

    Any number of fds may come with it (the codec closes them: kvhost cannot use what it
    does not interpret); a frontend sending one passes the fds it wants sent.
    """

    data: bytes
    MAX_SIZE: ClassVar[int] = MAX_PAYLOAD
    SIZES: ClassVar[range] = _up_to(MAX_SIZE)
    fd_count: ClassVar[int | None] = None

    def pack(self) -> bytes:
        if len(self.data) > self.MAX_SIZE:
            raise LocalProtocolError(f"raw payload of {len(self.data)} bytes is too large")
        return bytes(self.data)

    @classmethod
    def unpack(cls, body: bytes, fds: Sequence[int]) -> Self:
        return cls(bytes(body))


Payload = (
    Empty | U64 | VringState | VringAddr | VringFile | MemTable | LogBase | LogFd | RarpMac
    | VersionString | VersionList | Raw
)
_PayloadType = type[
    Empty | U64 | VringState | VringAddr | VringFile | MemTable | LogBase | LogFd | RarpMac
    | VersionString | VersionList | Raw
]


def _log_base_reply(body: bytes, fds: Sequence[int]) -> Payload:
    """SET_LOG_BASE's reply (LOG_SHMFD): QEMU reads any payload, and backends send either
    none (DPDK) or a u64 (libvhost-user)."""
    return Empty.unpack(body, fds) if not body else U64.unpack(body, fds)


# --- what each request carries ---------------------------------------------------------------

#: The payload type of each request kvhost interprets, frontend -> backend. Any other id
#: (uninterpreted or unknown) is decoded as Raw.
REQUEST_PAYLOADS: dict[Request, _PayloadType] = {
    Request.GET_FEATURES: Empty,
    Request.SET_FEATURES: U64,
    Request.SET_OWNER: Empty,
    Request.RESET_OWNER: Empty,
    Request.SET_MEM_TABLE: MemTable,
    Request.SET_LOG_BASE: LogBase,
    Request.SET_LOG_FD: LogFd,
    Request.SET_VRING_NUM: VringState,
    Request.SET_VRING_ADDR: VringAddr,
    Request.SET_VRING_BASE: VringState,
    Request.GET_VRING_BASE: VringState,
    Request.SET_VRING_KICK: VringFile,
    Request.SET_VRING_CALL: VringFile,
    Request.SET_VRING_ERR: VringFile,
    Request.GET_PROTOCOL_FEATURES: Empty,
    Request.SET_PROTOCOL_FEATURES: U64,
    Request.GET_QUEUE_NUM: Empty,
    Request.SET_VRING_ENABLE: VringState,
    Request.SEND_RARP: RarpMac,
    Request.NET_SET_MTU: U64,
    Request.RESET_DEVICE: Empty,
    Request.GET_MAX_MEM_SLOTS: Empty,
    Request.SET_STATUS: U64,
    Request.GET_STATUS: Empty,
    Request.GET_INTERFACE_VERSIONS: Empty,
    Request.SET_INTERFACE_VERSION: VersionString,
}

#: Requests the backend always answers, with their reply payload type.
INHERENT_REPLIES: dict[Request, _PayloadType] = {
    Request.GET_FEATURES: U64,
    Request.GET_PROTOCOL_FEATURES: U64,
    Request.GET_QUEUE_NUM: U64,
    Request.GET_VRING_BASE: VringState,
    Request.GET_MAX_MEM_SLOTS: U64,
    Request.GET_STATUS: U64,
    Request.GET_INTERFACE_VERSIONS: VersionList,
    Request.SET_INTERFACE_VERSION: U64,
}

_ReplyDecoder = Callable[[bytes, Sequence[int]], Payload]

# Keyed by the wire integer: the decoder looks requests up before it knows they are known.
_REQUEST_BY_ID: dict[int, Request] = {int(r): r for r in Request}
_PAYLOAD_BY_ID: dict[int, _PayloadType] = {int(r): t for r, t in REQUEST_PAYLOADS.items()}
_INHERENT_BY_ID: dict[int, _PayloadType] = {int(r): t for r, t in INHERENT_REPLIES.items()}
_REPLY_FLAGS = int(HeaderFlag.VERSION | HeaderFlag.REPLY)
#: the header flags a request may carry
_REQUEST_FLAGS = frozenset({VHOST_USER_VERSION, VHOST_USER_VERSION | int(HeaderFlag.NEED_REPLY)})
#: every header flags value the codecs accept, as the flag a Message carries (the lookup
#: costs a third of building the flag anew)
_FLAGS_BY_VALUE: dict[int, HeaderFlag] = {v: HeaderFlag(v) for v in {*_REQUEST_FLAGS, _REPLY_FLAGS}}


def _request_name(request: int) -> str:
    known = _REQUEST_BY_ID.get(request)
    if known is not None:
        return known.name
    return f"unknown request {request} (0x{request:x})"


def close_fds(fds: Iterable[int]) -> None:
    """Close every fd, ignoring ones already closed (used on every error path)."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def raw_message(request: int, flags: int, payload: bytes, *, size: int | None = None) -> bytes:
    """Build a message without any checks, for tests that must send malformed input.

    ``size`` overrides the header's size field (e.g. to claim more bytes than follow).
    """
    return HEADER.pack(request, flags, len(payload) if size is None else size) + payload


@dataclass(slots=True, eq=True)
class Message:
    """One decoded message. The receiver owns ``fds`` (close them, or hand them on).

    Treat it as read-only; it is not frozen only because the codec builds one per message
    and a frozen dataclass is built field by field through ``object.__setattr__``.
    """

    request: Request | int
    flags: HeaderFlag
    payload: Payload = EMPTY
    fds: tuple[int, ...] = field(default=())

    @property
    def need_reply(self) -> bool:
        """The frontend set NEED_REPLY: it waits for a u64 ack (or the inherent reply)."""
        return HeaderFlag.NEED_REPLY in self.flags

    @property
    def is_reply(self) -> bool:
        """The message is a backend's reply."""
        return HeaderFlag.REPLY in self.flags

    @property
    def known(self) -> bool:
        """The request id is one vhost-user or kvhost defines."""
        return isinstance(self.request, Request)

    @property
    def name(self) -> str:
        """The request's name for logs."""
        return _request_name(int(self.request))

    def expects_reply(self) -> bool:
        """Whether the backend must answer (inherently or because NEED_REPLY is set).

        SET_LOG_BASE's LOG_SHMFD reply is not counted: it depends on negotiation.
        """
        return self.need_reply or int(self.request) in _INHERENT_BY_ID


# --- the codecs ----------------------------------------------------------------------------


class _Decoder:
    """Stream reassembly and fd attribution shared by both codecs (see module docstring).

    Subclasses say what a valid header is (:meth:`_check_header`) and turn one complete
    message into a :class:`Message` (:meth:`_decode`); everything else is here, once.
    """

    _side: ClassVar[str] = "peer"

    def __init__(self) -> None:
        #: the head of the one incomplete message, kept until a later chunk completes it
        self._tail = b""
        #: fds of the incomplete message in _tail
        self._held: tuple[int, ...] = ()
        self._failed: str | None = None

    @property
    def failed(self) -> str | None:
        """Why the codec stopped accepting input, or None while it is healthy."""
        return self._failed

    @property
    def partial(self) -> bool:
        """Bytes of an incomplete message are buffered (an EOF now is mid-message)."""
        return bool(self._tail)

    def close(self) -> None:
        """Drop buffered input and close the fds held for an incomplete message."""
        self._tail = b""
        fds, self._held = self._held, ()
        close_fds(fds)

    def receive(self, data: bytes, fds: Sequence[int] = ()) -> list[Message]:
        """Feed bytes (and the fds that came with them); return every complete message.

        Raises RemoteProtocolError on any malformed input; then all fds given now and all
        fds still held are closed, and later calls raise again.
        """
        new_fds = list(fds)
        out: list[Message] = []
        if self._failed is not None:
            close_fds(new_fds)
            raise RemoteProtocolError(f"connection already failed: {self._failed}")
        try:
            self._feed(data, new_fds, out)
        except RemoteProtocolError as err:
            self._fail(str(err), new_fds, out)
            raise
        except Exception as err:  # a decoder bug must still not leak fds or escape untyped
            self._fail(f"internal decoder error: {err!r}", new_fds, out)
            raise RemoteProtocolError(
                f"could not decode the {self._side}'s message: {err!r}"
            ) from err
        return out

    def _fail(self, why: str, new_fds: list[int], out: list[Message]) -> None:
        self._failed = why
        close_fds(new_fds)
        for msg in out:
            close_fds(msg.fds)
        out.clear()
        self.close()

    def _feed(self, data: bytes, new_fds: list[int], out: list[Message]) -> None:
        """Decode every message that the held tail and this chunk complete into ``out``.

        One pass over the stream, message by message: each header is checked as soon as it
        is complete, so a bogus size fails now instead of after its payload is buffered;
        each complete message is decoded at once. The chunk's fds belong to the last
        message starting in the chunk: the complete message that ends the chunk, or the
        incomplete one after it. ``new_fds`` is emptied as its fds are handed to a message
        or held; on an exception whatever it still lists, ``_held`` and the fds of ``out``
        are the caller's to close.
        """
        if len(new_fds) > MAX_FDS:
            raise RemoteProtocolError(
                f"{self._side} sent {len(new_fds)} fds at once; at most {MAX_FDS} are allowed"
            )
        if new_fds and not data:
            raise RemoteProtocolError(f"{self._side} sent fds without any message bytes")
        tail = self._tail
        chunk_start = len(tail)
        # Usually nothing is held and the chunk is walked as it came, without a copy.
        stream = tail + data if tail else data
        end = len(stream)
        pos = 0  # where the next message starts
        while end - pos >= HEADER_SIZE:
            request, flags, size = HEADER.unpack_from(stream, pos)
            self._check_header(request, flags, size)
            after = pos + HEADER_SIZE + size
            if after > end:
                break
            fds: tuple[int, ...] = ()
            if pos == 0:
                fds, self._held = self._held, ()
            if after == end and new_fds:
                if pos < chunk_start:
                    close_fds(fds)
                    raise self._fds_continue(len(new_fds))
                fds += tuple(new_fds)
                new_fds.clear()
            try:
                out.append(self._decode(request, flags, stream[pos + HEADER_SIZE : after], fds))
            except BaseException:
                close_fds(fds)
                raise
            pos = after
        if new_fds:  # the owner is the incomplete message at pos
            if pos < chunk_start:
                raise self._fds_continue(len(new_fds))
            self._held = tuple(new_fds)
            new_fds.clear()
        self._tail = bytes(stream[pos:]) if pos < end else b""

    def _fds_continue(self, count: int) -> RemoteProtocolError:
        return RemoteProtocolError(
            f"{self._side} sent {count} fds with bytes that continue a message; fds must "
            "come with the first byte of their message"
        )

    def _check_header(self, request: int, flags: int, size: int) -> None:
        raise NotImplementedError

    def _decode(self, request: int, flags: int, body: bytes, fds: tuple[int, ...]) -> Message:
        """One complete message. Raises RemoteProtocolError; the caller closes ``fds``
        then."""
        raise NotImplementedError

    def _check_version_flags(self, request: int, flags: int) -> None:
        version = flags & _VERSION_MASK
        if version != VHOST_USER_VERSION:
            raise RemoteProtocolError(
                f"{self._side} sent {_request_name(request)} with protocol version {version} "
                f"in its header flags 0x{flags:x}; only version 1 exists"
            )
        unknown = flags & ~_KNOWN_FLAGS
        if unknown:
            raise RemoteProtocolError(
                f"{self._side} sent {_request_name(request)} with unknown header flag bits "
                f"0x{unknown:x} (flags 0x{flags:x})"
            )


class BackendCodec(_Decoder):
    """The backend's side: decodes requests, encodes replies."""

    _side = "frontend"

    def _check_header(self, request: int, flags: int, size: int) -> None:
        if flags not in _REQUEST_FLAGS:
            self._check_version_flags(request, flags)
            raise RemoteProtocolError(
                f"frontend sent {_request_name(request)} with the REPLY flag; only the "
                "backend sends replies"
            )
        sizes = _PAYLOAD_BY_ID.get(request, Raw).SIZES
        if size not in sizes:
            raise RemoteProtocolError(
                f"{_request_name(request)} announces a {size}-byte payload; it must be "
                f"{_describe(sizes)}"
            )

    def _decode(self, request: int, flags: int, body: bytes, fds: tuple[int, ...]) -> Message:
        kind = _PAYLOAD_BY_ID.get(request, Raw)
        try:
            payload = kind.unpack(body, fds)
        except _WrongFdCount as err:
            raise RemoteProtocolError(f"{_request_name(request)} {err}") from None
        except RemoteProtocolError as err:
            raise RemoteProtocolError(f"{_request_name(request)}: {err}") from None
        if kind is Raw:  # kvhost cannot use what it does not interpret
            msg = Message(_REQUEST_BY_ID.get(request, request), _FLAGS_BY_VALUE[flags], payload)
            close_fds(fds)  # last: nothing can raise after it, so they are closed once
            return msg
        return Message(_REQUEST_BY_ID.get(request, request), _FLAGS_BY_VALUE[flags], payload,
                       fds)

    @staticmethod
    def reply(msg: Message, payload: Payload) -> bytes:
        """Encode the reply to ``msg``.

        Raises LocalProtocolError if ``msg`` does not solicit a reply or ``payload`` is not
        the reply type of that request (a u64 ack for everything but the inherent replies).
        """
        request = int(msg.request)
        kinds: tuple[_PayloadType, ...]
        inherent = _INHERENT_BY_ID.get(request)
        if inherent is not None:
            kinds = (inherent,)
        elif request == Request.SET_LOG_BASE:
            kinds = (Empty, U64)
        elif msg.need_reply:
            kinds = (U64,)
        else:
            raise LocalProtocolError(
                f"{msg.name} without NEED_REPLY gets no reply; the frontend is not waiting"
            )
        if not isinstance(payload, kinds):
            raise LocalProtocolError(
                f"the reply to {msg.name} carries {'/'.join(t.__name__ for t in kinds)}, "
                f"not {type(payload).__name__}"
            )
        body = payload.pack()
        return HEADER.pack(request, _REPLY_FLAGS, len(body)) + body

    @classmethod
    def ack(cls, msg: Message, status: int = 0) -> bytes:
        """The REPLY_ACK answer to ``msg``: u64 0 for success, non-zero for failure."""
        return cls.reply(msg, U64(status))


class FrontendCodec(_Decoder):
    """The frontend's side: encodes requests, decodes the backend's replies.

    It remembers which requests await a reply and checks that replies arrive in order.
    Set ``protocol_features`` to the negotiated mask after SET_PROTOCOL_FEATURES: it
    decides whether NEED_REPLY may be used and whether SET_LOG_BASE is answered.
    """

    _side = "backend"

    def __init__(self) -> None:
        super().__init__()
        self.protocol_features = 0
        self._awaiting: deque[tuple[Request, _ReplyDecoder]] = deque()

    @property
    def awaiting(self) -> tuple[Request, ...]:
        """Requests sent whose replies have not arrived yet, oldest first."""
        return tuple(r for r, _ in self._awaiting)

    def request(
        self,
        request: Request,
        payload: Payload = EMPTY,
        fds: Sequence[int] = (),
        *,
        need_reply: bool = False,
    ) -> tuple[bytes, list[int]]:
        """Encode a request; returns the bytes and the fds to send with them (SCM_RIGHTS).

        The fds stay the caller's: the codec neither dups nor closes them. Raises
        LocalProtocolError for a payload of the wrong type, a wrong fd count, or NEED_REPLY
        without REPLY_ACK negotiated.
        """
        kind = REQUEST_PAYLOADS.get(request, Raw)
        if not isinstance(payload, kind):
            raise LocalProtocolError(
                f"{request.name} carries {kind.__name__}, not {type(payload).__name__}"
            )
        body = payload.pack()
        want = payload.fd_count
        if want is None:
            if len(fds) > MAX_FDS:
                raise LocalProtocolError(f"{request.name} may carry at most {MAX_FDS} fds")
        elif len(fds) != want:
            raise LocalProtocolError(
                f"{request.name} must be sent with {want} fds, not {len(fds)}"
            )
        reply: _ReplyDecoder | None = None
        inherent = INHERENT_REPLIES.get(request)
        if inherent is not None:
            reply = inherent.unpack
        elif request == Request.SET_LOG_BASE and (
            self.protocol_features & ProtocolFeature.LOG_SHMFD
        ):
            reply = _log_base_reply
        flags = HeaderFlag.VERSION
        if need_reply:
            if reply is None and not self.protocol_features & ProtocolFeature.REPLY_ACK:
                raise LocalProtocolError(
                    f"NEED_REPLY on {request.name} needs the REPLY_ACK protocol feature, "
                    "which is not negotiated"
                )
            flags |= HeaderFlag.NEED_REPLY
            if reply is None:
                reply = U64.unpack
        if len(body) > MAX_PAYLOAD:
            raise LocalProtocolError(f"{request.name} payload of {len(body)} bytes is too big")
        if reply is not None:
            self._awaiting.append((request, reply))
        return HEADER.pack(int(request), flags, len(body)) + body, list(fds)

    def _check_header(self, request: int, flags: int, size: int) -> None:
        if flags != _REPLY_FLAGS:
            self._check_version_flags(request, flags)
            raise RemoteProtocolError(
                f"backend sent {_request_name(request)} with header flags 0x{flags:x}; its "
                "messages on this socket are replies and carry exactly VERSION|REPLY (0x5)"
            )
        limit = (
            MAX_VERSION_LIST_PAYLOAD if request == Request.GET_INTERFACE_VERSIONS else MAX_PAYLOAD
        )
        if size > limit:
            raise RemoteProtocolError(
                f"backend's reply to {_request_name(request)} announces a {size}-byte "
                f"payload; at most {limit} bytes are allowed"
            )

    def _decode(self, request: int, flags: int, body: bytes, fds: tuple[int, ...]) -> Message:
        name = _request_name(request)
        if not self._awaiting:
            raise RemoteProtocolError(f"backend sent a reply to {name} but no request awaits one")
        want, unpack = self._awaiting[0]
        if request != want:
            raise RemoteProtocolError(
                f"backend replied to {name} while the reply to {want.name} was due"
            )
        if fds:
            raise RemoteProtocolError(
                f"backend's reply to {name} came with {len(fds)} fds; kvhost expects none"
            )
        try:
            payload = unpack(body, fds)
        except RemoteProtocolError as err:
            raise RemoteProtocolError(f"backend's reply to {name}: {err}") from None
        self._awaiting.popleft()
        return Message(want, _FLAGS_BY_VALUE[flags], payload)
