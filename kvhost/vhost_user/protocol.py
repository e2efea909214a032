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
    SingleMemRegion 0 u64 padding | 8 MemRegion                              (40 bytes)
    LogBase         0 u64 mmap_size | 8 u64 mmap_offset, one fd              (16 bytes)
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
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag
from typing import ClassVar, NoReturn, Self

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
    "REQUEST_LAYOUTS",
    "U64",
    "VHOST_USER_F_PROTOCOL_FEATURES",
    "VHOST_USER_VERSION",
    "BackendCodec",
    "Empty",
    "FrontendCodec",
    "HeaderFlag",
    "LogBase",
    "MemRegion",
    "MemTable",
    "Message",
    "Payload",
    "ProtocolFeature",
    "RarpMac",
    "Raw",
    "Request",
    "SingleMemRegion",
    "VersionList",
    "VersionStatus",
    "VersionString",
    "VringAddr",
    "VringFile",
    "VringState",
    "close_fds",
    "raw_message",
    "request_layout",
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
# Each payload is a frozen slotted dataclass. ``pack()`` validates the values and raises
# LocalProtocolError (we are about to send something bad); ``unpack()`` validates the bytes
# and raises RemoteProtocolError (the peer sent something bad). Both share ``_problem()``.


def _u64(v: int) -> bool:
    return 0 <= v < 1 << 64


def _u32(v: int) -> bool:
    return 0 <= v < 1 << 32


def _need_size(name: str, data: bytes, size: int) -> None:
    if len(data) != size:
        raise RemoteProtocolError(f"{name} payload must be {size} bytes, got {len(data)}")


@dataclass(frozen=True, slots=True)
class Empty:
    """No payload (size 0)."""

    SIZE: ClassVar[int] = 0

    def pack(self) -> bytes:
        return b""

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        _need_size("an empty", data, 0)
        return cls()


EMPTY = Empty()


@dataclass(frozen=True, slots=True)
class U64:
    """A single u64: feature masks, queue counts, MTU, ack status."""

    value: int
    SIZE: ClassVar[int] = 8
    _S: ClassVar[struct.Struct] = struct.Struct("=Q")
    #: unpack() is exactly ``cls(*_S.unpack(data))`` after the size check (see _Layout)
    _PLAIN: ClassVar[bool] = True

    def pack(self) -> bytes:
        try:  # struct refuses anything outside u64 (and non-integers): the range check
            return self._S.pack(self.value)
        except struct.error:
            raise LocalProtocolError(
                f"u64 payload value {self.value} does not fit in 64 bits"
            ) from None

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        _need_size("a u64", data, cls.SIZE)
        return cls(cls._S.unpack(data)[0])


@dataclass(frozen=True, slots=True)
class VringState:
    """``struct vhost_vring_state``: a vring index and a number (size, base, enable)."""

    index: int
    num: int
    SIZE: ClassVar[int] = 8
    _S: ClassVar[struct.Struct] = struct.Struct("=II")
    _PLAIN: ClassVar[bool] = True

    def pack(self) -> bytes:
        try:  # struct refuses anything outside u32 (and non-integers): the range check
            return self._S.pack(self.index, self.num)
        except struct.error:
            raise LocalProtocolError(f"vring state {self} has a field outside u32") from None

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        _need_size("a vring state", data, cls.SIZE)
        return cls(*cls._S.unpack(data))


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
    SIZE: ClassVar[int] = 40
    _S: ClassVar[struct.Struct] = struct.Struct("=IIQQQQ")
    _PLAIN: ClassVar[bool] = True

    @property
    def log(self) -> bool:
        """True when VHOST_VRING_F_LOG is set."""
        return bool(self.flags & 1)

    def pack(self) -> bytes:
        addrs = (self.desc_user_addr, self.used_user_addr, self.avail_user_addr,
                 self.log_guest_addr)
        if not (_u32(self.index) and _u32(self.flags) and all(_u64(a) for a in addrs)):
            raise LocalProtocolError(f"vring address {self} has a field out of range")
        return self._S.pack(self.index, self.flags, *addrs)

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        _need_size("a vring address", data, cls.SIZE)
        return cls(*cls._S.unpack(data))


@dataclass(frozen=True, slots=True)
class VringFile:
    """SET_VRING_KICK/CALL/ERR's u64: vring index in bits 0-7, bit 8 = no fd follows."""

    index: int
    no_fd: bool = False
    SIZE: ClassVar[int] = 8
    INDEX_MASK: ClassVar[int] = 0xFF
    NOFD_MASK: ClassVar[int] = 0x100
    _S: ClassVar[struct.Struct] = struct.Struct("=Q")

    def pack(self) -> bytes:
        if not 0 <= self.index <= self.INDEX_MASK:
            raise LocalProtocolError(
                f"vring index {self.index} does not fit the 8 bits of a vring file message"
            )
        return self._S.pack(self.index | (self.NOFD_MASK if self.no_fd else 0))

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        _need_size("a vring file", data, cls.SIZE)
        (value,) = cls._S.unpack(data)
        if value & ~(cls.INDEX_MASK | cls.NOFD_MASK):
            raise RemoteProtocolError(
                f"vring file payload 0x{value:x} sets reserved bits 9-63 "
                "(only bits 0-7 index and bit 8 no-fd are defined)"
            )
        return cls(value & cls.INDEX_MASK, bool(value & cls.NOFD_MASK))

    @property
    def fd_count(self) -> int:
        """How many fds must accompany this payload."""
        return 0 if self.no_fd else 1


@dataclass(frozen=True, slots=True)
class MemRegion:
    """One memory region: guest-physical range, the frontend's address of it, fd offset."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int
    SIZE: ClassVar[int] = 32
    _S: ClassVar[struct.Struct] = struct.Struct("=QQQQ")

    def _problem(self) -> str | None:
        fields = (self.guest_phys_addr, self.memory_size, self.userspace_addr, self.mmap_offset)
        if not all(_u64(v) for v in fields):
            return f"memory region {self} has a field outside u64"
        return None

    def pack(self) -> bytes:
        if (problem := self._problem()) is not None:
            raise LocalProtocolError(problem)
        return self._S.pack(
            self.guest_phys_addr, self.memory_size, self.userspace_addr, self.mmap_offset
        )

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        _need_size("a memory region", data, cls.SIZE)
        return cls(*cls._S.unpack(data))


@dataclass(frozen=True, slots=True)
class MemTable:
    """SET_MEM_TABLE: 1..8 regions; exactly one fd per region, in the same order."""

    regions: tuple[MemRegion, ...]
    _HEAD: ClassVar[struct.Struct] = struct.Struct("=II")

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
        return self._HEAD.pack(len(self.regions), 0) + b"".join(r.pack() for r in self.regions)

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        if len(data) < cls._HEAD.size:
            raise RemoteProtocolError(
                f"memory table payload of {len(data)} bytes is shorter than its 8-byte head"
            )
        count, _padding = cls._HEAD.unpack_from(data)
        if not 1 <= count <= MEMORY_BASELINE_NREGIONS:
            raise RemoteProtocolError(
                f"memory table announces {count} regions; 1..{MEMORY_BASELINE_NREGIONS} "
                "are allowed in SET_MEM_TABLE"
            )
        want = cls._HEAD.size + count * MemRegion.SIZE
        if len(data) != want:
            raise RemoteProtocolError(
                f"memory table with {count} regions must be {want} bytes, got {len(data)}"
            )
        regions = tuple(
            MemRegion(*fields) for fields in MemRegion._S.iter_unpack(data[cls._HEAD.size :])
        )
        return cls(regions)


@dataclass(frozen=True, slots=True)
class SingleMemRegion:
    """ADD_MEM_REG / REM_MEM_REG: u64 padding then one region."""

    region: MemRegion
    SIZE: ClassVar[int] = 8 + MemRegion.SIZE

    def pack(self) -> bytes:
        return bytes(8) + self.region.pack()

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        _need_size("a single memory region", data, cls.SIZE)
        return cls(MemRegion.unpack(data[8:]))


@dataclass(frozen=True, slots=True)
class LogBase:
    """SET_LOG_BASE with LOG_SHMFD: the log's size and offset inside the one fd."""

    mmap_size: int
    mmap_offset: int
    SIZE: ClassVar[int] = 16
    _S: ClassVar[struct.Struct] = struct.Struct("=QQ")
    _PLAIN: ClassVar[bool] = True

    def pack(self) -> bytes:
        if not (_u64(self.mmap_size) and _u64(self.mmap_offset)):
            raise LocalProtocolError(f"log description {self} has a field outside u64")
        return self._S.pack(self.mmap_size, self.mmap_offset)

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        _need_size("a log description", data, cls.SIZE)
        return cls(*cls._S.unpack(data))


@dataclass(frozen=True, slots=True)
class RarpMac:
    """SEND_RARP: the guest's MAC in the first 6 bytes of a u64-sized payload."""

    mac: bytes
    SIZE: ClassVar[int] = 8

    def pack(self) -> bytes:
        if len(self.mac) != 6:
            raise LocalProtocolError(f"a MAC address is 6 bytes, got {len(self.mac)}")
        return bytes(self.mac) + b"\0\0"

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        _need_size("a RARP MAC", data, cls.SIZE)
        return cls(bytes(data[:6]))

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
    (receivers accept any amount of NUL padding within the size limit).
    """

    version: str
    MAX_SIZE: ClassVar[int] = (MAX_VERSION_BYTES + 1 + 7) // 8 * 8

    def pack(self) -> bytes:
        if (problem := _version_problem(self.version)) is not None:
            raise LocalProtocolError(problem)
        raw = self.version.encode("utf-8") + b"\0"
        return raw + bytes(-len(raw) % 8)

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        end = data.find(b"\0")
        if end < 0:
            raise RemoteProtocolError("interface version string has no NUL terminator")
        if data[end:].strip(b"\0"):
            raise RemoteProtocolError(
                "interface version payload has bytes other than NUL after its terminator"
            )
        return cls(_decode_version(bytes(data[:end])))


@dataclass(frozen=True, slots=True)
class VersionList:
    """GET_INTERFACE_VERSIONS reply: the default version and all supported, oldest first.

    ``default`` is what the backend serves if the frontend selects nothing (its latest,
    unless an operator pinned another); it must be one of ``supported``.
    """

    default: str
    supported: tuple[str, ...]
    _HEAD: ClassVar[struct.Struct] = struct.Struct("=II")
    MAX_SIZE: ClassVar[int] = MAX_VERSION_LIST_PAYLOAD

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
        data = self._HEAD.pack(len(self.supported), 0) + body
        if len(data) > self.MAX_SIZE:
            raise LocalProtocolError(
                f"version list is {len(data)} bytes; at most {self.MAX_SIZE} fit a reply"
            )
        return data

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        if len(data) < cls._HEAD.size:
            raise RemoteProtocolError(
                f"version list of {len(data)} bytes is shorter than its 8-byte head"
            )
        count, reserved = cls._HEAD.unpack_from(data)
        if reserved != 0:
            raise RemoteProtocolError(f"version list reserved word is 0x{reserved:x}, not 0")
        if not 1 <= count <= MAX_VERSION_COUNT:
            raise RemoteProtocolError(
                f"version list announces {count} versions; 1..{MAX_VERSION_COUNT} are allowed"
            )
        body = bytes(data[cls._HEAD.size :])
        if not body.endswith(b"\0"):
            raise RemoteProtocolError("version list does not end with a NUL terminator")
        parts = body[:-1].split(b"\0")
        if len(parts) != count + 1:
            raise RemoteProtocolError(
                f"version list announces {count} versions plus a default but holds "
                f"{len(parts)} strings"
            )
        texts = [_decode_version(p) for p in parts]
        result = cls(texts[0], tuple(texts[1:]))
        if (problem := result._problem()) is not None:
            raise RemoteProtocolError(problem)
        return result


@dataclass(frozen=True, slots=True)
class Raw:
    """The undecoded payload of a request kvhost does not interpret (or an unknown id)."""

    data: bytes
    MAX_SIZE: ClassVar[int] = MAX_PAYLOAD

    def pack(self) -> bytes:
        if len(self.data) > self.MAX_SIZE:
            raise LocalProtocolError(f"raw payload of {len(self.data)} bytes is too large")
        return bytes(self.data)

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        return cls(bytes(data))


Payload = (
    Empty | U64 | VringState | VringAddr | VringFile | MemTable | SingleMemRegion | LogBase
    | RarpMac | VersionString | VersionList | Raw
)
_PayloadType = type[
    Empty | U64 | VringState | VringAddr | VringFile | MemTable | SingleMemRegion | LogBase
    | RarpMac | VersionString | VersionList | Raw
]


# --- per-request layouts -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Layout:
    """What a message must look like: payload type(s) and the allowed fd counts.

    ``fds`` is a fixed count, or ``None`` when the payload decides (``fd_count``).
    ``close_fds`` means fds are tolerated but the codec closes them (REM_MEM_REG, Raw).

    The size rules are derived once at construction (``_by_size``: payload size -> the
    type decoding it; ``_variable``/``_limit``: the first variable-size type and its
    bound), so checking and decoding a message are dict lookups on the hot path.
    """

    types: tuple[_PayloadType, ...]
    fds: tuple[int, ...] | None = (0,)
    close_fds: bool = False
    _by_size: dict[int, _PayloadType] = field(init=False, repr=False, compare=False)
    _variable: _PayloadType | None = field(init=False, repr=False, compare=False)
    _limit: int = field(init=False, repr=False, compare=False)
    #: size -> (constructor, struct) for payloads that are one struct's fields as they are
    _plain: dict[int, tuple[Callable[..., Payload], struct.Struct]] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        by_size: dict[int, _PayloadType] = {}
        variable: _PayloadType | None = None
        for t in self.types:
            fixed = getattr(t, "SIZE", None)
            if fixed is None:
                variable = t
                break  # every later type is shadowed: decode takes the first match
            by_size.setdefault(fixed, t)
        limit = -1 if variable is None else getattr(variable, "MAX_SIZE", MAX_PAYLOAD)
        plain = {
            size: (t, t._S)  # type: ignore[union-attr]
            for size, t in by_size.items()
            if getattr(t, "_PLAIN", False)
        }
        object.__setattr__(self, "_by_size", by_size)
        object.__setattr__(self, "_variable", variable)
        object.__setattr__(self, "_limit", limit)
        object.__setattr__(self, "_plain", plain)

    def size_ok(self, size: int) -> bool:
        return size in self._by_size or size <= self._limit

    def describe_size(self) -> str:
        parts = []
        for t in self.types:
            fixed = getattr(t, "SIZE", None)
            if fixed is not None:
                parts.append(f"{fixed} bytes")
            else:
                parts.append(f"at most {getattr(t, 'MAX_SIZE', MAX_PAYLOAD)} bytes")
        return " or ".join(parts)

    def decode(self, data: bytes) -> Payload:
        t = self._by_size.get(len(data), self._variable)
        if t is None:
            raise RemoteProtocolError(
                f"payload of {len(data)} bytes; expected {self.describe_size()}"
            )
        return t.unpack(data)


_E = _Layout((Empty,))
_Q = _Layout((U64,))
_STATE = _Layout((VringState,))
_FILE = _Layout((VringFile,), fds=None)
_RAW = _Layout((Raw,), fds=tuple(range(MAX_FDS + 1)), close_fds=True)

#: Request layouts, frontend -> backend.
REQUEST_LAYOUTS: dict[Request, _Layout] = {
    Request.GET_FEATURES: _E,
    Request.SET_FEATURES: _Q,
    Request.SET_OWNER: _E,
    Request.RESET_OWNER: _E,
    Request.SET_MEM_TABLE: _Layout((MemTable,), fds=None),
    Request.SET_LOG_BASE: _Layout((LogBase,), fds=(1,)),
    Request.SET_LOG_FD: _Layout((Empty,), fds=(1,)),
    Request.SET_VRING_NUM: _STATE,
    Request.SET_VRING_ADDR: _Layout((VringAddr,)),
    Request.SET_VRING_BASE: _STATE,
    Request.GET_VRING_BASE: _STATE,
    Request.SET_VRING_KICK: _FILE,
    Request.SET_VRING_CALL: _FILE,
    Request.SET_VRING_ERR: _FILE,
    Request.GET_PROTOCOL_FEATURES: _E,
    Request.SET_PROTOCOL_FEATURES: _Q,
    Request.GET_QUEUE_NUM: _E,
    Request.SET_VRING_ENABLE: _STATE,
    Request.SEND_RARP: _Layout((RarpMac,)),
    Request.NET_SET_MTU: _Q,
    Request.RESET_DEVICE: _E,
    Request.GET_MAX_MEM_SLOTS: _E,
    Request.ADD_MEM_REG: _Layout((SingleMemRegion,), fds=(1,)),
    # vhost-user.rst: "the back-end MAY accept messages with one file descriptor ... MUST
    # close it without using it".
    Request.REM_MEM_REG: _Layout((SingleMemRegion,), fds=(0, 1), close_fds=True),
    Request.SET_STATUS: _Q,
    Request.GET_STATUS: _E,
    Request.GET_INTERFACE_VERSIONS: _E,
    Request.SET_INTERFACE_VERSION: _Layout((VersionString,)),
}

#: Requests the backend always answers, with their reply payload layout.
INHERENT_REPLIES: dict[Request, _Layout] = {
    Request.GET_FEATURES: _Q,
    Request.GET_PROTOCOL_FEATURES: _Q,
    Request.GET_QUEUE_NUM: _Q,
    Request.GET_VRING_BASE: _STATE,
    Request.GET_MAX_MEM_SLOTS: _Q,
    Request.GET_STATUS: _Q,
    Request.GET_INTERFACE_VERSIONS: _Layout((VersionList,)),
    Request.SET_INTERFACE_VERSION: _Q,
}
#: SET_LOG_BASE is answered when LOG_SHMFD is negotiated; QEMU reads any payload and
#: backends send either none (DPDK) or a u64 (libvhost-user).
_LOG_BASE_REPLY = _Layout((Empty, U64))
_ACK = _Q


def _payload_fds(payload: Payload) -> int:
    """The fd count a payload announces itself (memory tables, vring files)."""
    if isinstance(payload, MemTable | VringFile):
        return payload.fd_count
    return 0


# Hot-path tables. Every message goes through these lookups, and under TCG an enum
# conversion (a Python-level call) costs tens of microseconds: plain dicts keyed by the wire
# integer replace ``Request(n)``, ``HeaderFlag(n)`` and ``.name`` on the decode path.
_REQUEST_BY_ID: dict[int, Request] = {int(r): r for r in Request}
_LAYOUT_BY_ID: dict[int, _Layout] = {int(r): layout for r, layout in REQUEST_LAYOUTS.items()}
_FLAGS_BY_VALUE: dict[int, HeaderFlag] = {v: HeaderFlag(v) for v in range(16)}
_REPLY_FLAGS = int(HeaderFlag.VERSION | HeaderFlag.REPLY)
_NEED_REPLY_BIT = int(HeaderFlag.NEED_REPLY)
_REPLY_BIT = int(HeaderFlag.REPLY)
_SET_LOG_BASE = int(Request.SET_LOG_BASE)
_INHERENT_IDS: dict[int, _Layout] = {int(r): layout for r, layout in INHERENT_REPLIES.items()}


#: request id -> (request, plain payloads by size, allowed fd counts): the requests
#: BackendCodec.receive decodes without the general path
_FAST_REQUESTS: dict[int, tuple[Request, dict[int, tuple[Callable[..., Payload], struct.Struct]],
                                tuple[int, ...]]] = {
    int(r): (r, layout._plain, layout.fds)
    for r, layout in REQUEST_LAYOUTS.items()
    if layout._plain and layout.fds is not None and not layout.close_fds
}
#: request id -> (request, payload type) for the one-type layouts whose payload says how
#: many fds come with it (memory tables, vring files)
_PAYLOAD_COUNTS_FDS: dict[int, tuple[Request, _PayloadType]] = {
    int(r): (r, layout.types[0])
    for r, layout in REQUEST_LAYOUTS.items()
    if layout.fds is None and len(layout.types) == 1
}


def request_layout(request: int) -> _Layout:
    """The layout a request must have (``Raw`` for uninterpreted and unknown ids)."""
    return _LAYOUT_BY_ID.get(request, _RAW)


def _request_name(request: int) -> str:
    known = _REQUEST_BY_ID.get(request)
    if known is not None:
        return known.name
    return f"unknown request {request} (0x{request:x})"


def _as_request(request: int) -> Request | int:
    return _REQUEST_BY_ID.get(request, request)


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

    Not frozen, unlike the payloads: a frozen dataclass is built field by field through
    object.__setattr__, which tripled the cost of the object the codec builds for every
    message. Treat it as read-only all the same.
    """

    request: Request | int
    flags: HeaderFlag
    payload: Payload = EMPTY
    fds: tuple[int, ...] = field(default=())

    @property
    def need_reply(self) -> bool:
        """The frontend set NEED_REPLY: it waits for a u64 ack (or the inherent reply)."""
        # int(): IntFlag's own ``&`` builds a new flag object in Python code
        return bool(int(self.flags) & _NEED_REPLY_BIT)

    @property
    def is_reply(self) -> bool:
        """The message is a backend's reply."""
        return bool(int(self.flags) & _REPLY_BIT)

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
        return self.need_reply or self.request in _INHERENT_IDS


# --- the codecs ----------------------------------------------------------------------------


class _Decoder:
    """Stream reassembly and fd attribution shared by both codecs (see module docstring)."""

    _side: ClassVar[str] = "peer"

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pending_fds: list[int] = []  # fds of the (partial) message at _buf[0]
        self._failed: str | None = None

    @property
    def failed(self) -> str | None:
        """Why the codec stopped accepting input, or None while it is healthy."""
        return self._failed

    @property
    def partial(self) -> bool:
        """Bytes of an incomplete message are buffered (an EOF now is mid-message)."""
        return bool(self._buf)

    def close(self) -> None:
        """Drop buffered input and close the fds held for an incomplete message."""
        self._buf.clear()
        fds, self._pending_fds = self._pending_fds, []
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
            if not self._buf and len(data) >= HEADER_SIZE and len(new_fds) <= MAX_FDS:
                # The common case: nothing buffered and the chunk is exactly one message
                # (every frontend sends one message per sendmsg); its fds are all its own.
                # On an error new_fds still lists them, and _fail closes them.
                request, flags, size = HEADER.unpack_from(data)
                if HEADER_SIZE + size == len(data):
                    return [self._decode_single(request, flags, size, bytes(data), new_fds)]
            self._feed(bytes(data), new_fds, out)
        except RemoteProtocolError as err:
            self._fail(str(err), new_fds, out)
            raise
        except Exception as err:  # a decoder bug must still not leak fds or escape typed
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
        if len(new_fds) > MAX_FDS:
            raise RemoteProtocolError(
                f"{self._side} sent {len(new_fds)} fds at once; at most {MAX_FDS} are allowed"
            )
        if not data:
            if new_fds:
                raise RemoteProtocolError(f"{self._side} sent fds without any message bytes")
            return
        if not self._buf and len(data) >= HEADER_SIZE and self._whole_messages(data, new_fds, out):
            return
        old_len = len(self._buf)
        self._buf += data
        # Walk the headers to find where messages start; a header is validated as soon as
        # it is complete so a bogus size fails now instead of after buffering the payload.
        starts: list[int] = []
        off = 0
        while off < len(self._buf):
            starts.append(off)
            if off + HEADER_SIZE > len(self._buf):
                break
            request, flags, size = HEADER.unpack_from(self._buf, off)
            self._check_header(request, flags, size)
            off += HEADER_SIZE + size
        in_chunk = [s for s in starts if s >= old_len]
        owner: int | None = None
        if new_fds:
            if not in_chunk:
                raise RemoteProtocolError(
                    f"{self._side} sent {len(new_fds)} fds with bytes that continue a message; "
                    "fds must come with the first byte of their message"
                )
            owner = in_chunk[-1]
        consumed = 0
        for start in starts:
            if start + HEADER_SIZE > len(self._buf):
                break
            request, flags, size = HEADER.unpack_from(self._buf, start)
            end = start + HEADER_SIZE + size
            if end > len(self._buf):
                break
            fds: list[int] = []
            if start == 0:
                fds, self._pending_fds = self._pending_fds, []
            if start == owner:
                fds, new_fds[:] = fds + new_fds, []
            try:
                msg = self._decode(
                    request, flags, bytes(self._buf[start + HEADER_SIZE : end]), fds
                )
            except BaseException:
                close_fds(fds)
                raise
            out.append(msg)
            consumed = end
        del self._buf[:consumed]
        if new_fds:
            # The owner is the trailing incomplete message: hold its fds until it completes.
            self._pending_fds, new_fds[:] = list(new_fds), []

    def _whole_messages(self, data: bytes, new_fds: list[int], out: list[Message]) -> bool:
        """The next most common case: several whole messages in one chunk (QEMU sends
        without waiting, so a busy reader gets them together) and nothing buffered.

        Decodes them one by one as single messages and returns True; returns False, having
        taken nothing, when the chunk ends inside a message (the general path handles
        that, validating each header before buffering its payload). The fds belong to the
        last message: the kernel ends a read after the first part of the stream that
        carried fds, so they came with the last message's sendmsg.
        """
        headers: list[tuple[int, int, int, int]] = []  # (start, request, flags, size)
        off, end = 0, len(data)
        unpack = HEADER.unpack_from
        while off + HEADER_SIZE <= end:
            request, flags, size = unpack(data, off)
            headers.append((off, request, flags, size))
            off += HEADER_SIZE + size
        if off != end:
            return False
        own, new_fds[:] = list(new_fds), []
        last = headers[-1][0]
        try:
            for start, request, flags, size in headers:
                fds = own if start == last else []
                one = data[start : start + HEADER_SIZE + size]
                out.append(self._decode_single(request, flags, size, one, fds))
        except BaseException:
            close_fds(own)  # only the last message takes them, and it was not decoded
            raise
        return True

    def _check_header(self, request: int, flags: int, size: int) -> None:
        raise NotImplementedError

    def _decode(self, request: int, flags: int, payload: bytes, fds: list[int]) -> Message:
        raise NotImplementedError

    def _decode_single(
        self, request: int, flags: int, size: int, data: bytes, fds: list[int]
    ) -> Message:
        """A chunk that is exactly one message (header included in ``data``)."""
        self._check_header(request, flags, size)
        return self._decode(request, flags, data[HEADER_SIZE:], fds)

    @staticmethod
    def _check_common_flags(side: str, request: int, flags: int) -> None:
        version = flags & _VERSION_MASK
        if version != VHOST_USER_VERSION:
            raise RemoteProtocolError(
                f"{side} sent {_request_name(request)} with protocol version {version} in its "
                f"header flags 0x{flags:x}; only version 1 exists"
            )
        unknown = flags & ~_KNOWN_FLAGS
        if unknown:
            raise RemoteProtocolError(
                f"{side} sent {_request_name(request)} with unknown header flag bits "
                f"0x{unknown:x} (flags 0x{flags:x})"
            )

    @staticmethod
    def _check_fds(name: str, layout: _Layout, payload: Payload, fds: list[int]) -> list[int]:
        """Check the fd count; return the fds the message keeps (others are closed)."""
        if layout.fds is None:
            want: tuple[int, ...] = (_payload_fds(payload),)
        else:
            want = layout.fds
        if len(fds) not in want:
            expected = " or ".join(str(n) for n in want)
            raise RemoteProtocolError(f"{name} came with {len(fds)} fds; it needs {expected}")
        if layout.close_fds:
            close_fds(fds)
            return []
        return fds


class BackendCodec(_Decoder):
    """The backend's side: decodes requests, encodes replies."""

    _side = "frontend"

    # Names are only looked up on the error paths: a well-formed request costs a few dict
    # lookups and one payload unpack (see the hot-path tables above).
    _GOOD_FLAGS: ClassVar[frozenset[int]] = frozenset(
        {VHOST_USER_VERSION, VHOST_USER_VERSION | _NEED_REPLY_BIT}
    )

    def _check_header(self, request: int, flags: int, size: int) -> None:
        if flags not in self._GOOD_FLAGS:
            self._check_common_flags("frontend", request, flags)
            raise RemoteProtocolError(
                f"frontend sent {_request_name(request)} with the REPLY flag; only the "
                "backend sends replies"
            )
        layout = _LAYOUT_BY_ID.get(request, _RAW)
        if not layout.size_ok(size):
            raise RemoteProtocolError(
                f"{_request_name(request)} announces a {size}-byte payload; it must be "
                f"{layout.describe_size()}"
            )

    def _decode_single(
        self, request: int, flags: int, size: int, data: bytes, fds: list[int]
    ) -> Message:
        """Well-formed requests of the kinds QEMU sends at every ring start and stop -- one
        struct, a vring file, a memory table -- with the right fd count are decoded here;
        anything else goes the general way, which also words every error. The payload
        types do their own checks. The Message holds the fds."""
        if flags in self._GOOD_FLAGS:
            fast = _FAST_REQUESTS.get(request)
            if fast is not None:
                req, plain, want = fast
                entry = plain.get(size)
                if entry is not None and len(fds) in want:
                    make, st = entry
                    payload = make(*st.unpack_from(data, HEADER_SIZE))
                    return Message(req, _FLAGS_BY_VALUE[flags], payload, tuple(fds))
            else:
                counted = _PAYLOAD_COUNTS_FDS.get(request)
                if counted is not None:
                    req, kind = counted
                    try:
                        payload = kind.unpack(data[HEADER_SIZE:])
                    except RemoteProtocolError:
                        payload = None
                    if payload is not None and len(fds) == _payload_fds(payload):
                        return Message(req, _FLAGS_BY_VALUE[flags], payload, tuple(fds))
        return super()._decode_single(request, flags, size, data, fds)

    def _decode(self, request: int, flags: int, payload: bytes, fds: list[int]) -> Message:
        layout = _LAYOUT_BY_ID.get(request, _RAW)
        try:
            body = layout.decode(payload)
        except RemoteProtocolError as err:
            raise RemoteProtocolError(f"{_request_name(request)}: {err}") from None
        want = layout.fds
        if want is not None and len(fds) in want and not layout.close_fds:
            kept = fds  # the usual case, checked without building the name
        else:
            kept = self._check_fds(_request_name(request), layout, body, fds)
        return Message(
            _REQUEST_BY_ID.get(request, request), _FLAGS_BY_VALUE[flags], body, tuple(kept)
        )

    @staticmethod
    def reply(msg: Message, payload: Payload) -> bytes:
        """Encode the reply to ``msg``.

        Raises LocalProtocolError if ``msg`` does not solicit a reply or ``payload`` is not
        the reply type of that request (a u64 ack for everything but the inherent replies).
        """
        request = int(msg.request)
        layout = _INHERENT_IDS.get(request)
        if layout is None:
            if request == _SET_LOG_BASE:
                layout = _LOG_BASE_REPLY
            elif msg.need_reply:
                layout = _ACK
            else:
                raise LocalProtocolError(
                    f"{msg.name} without NEED_REPLY gets no reply; the frontend is not waiting"
                )
        if not isinstance(payload, layout.types):
            raise LocalProtocolError(
                f"the reply to {msg.name} carries {'/'.join(t.__name__ for t in layout.types)}, "
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
        self._awaiting: deque[tuple[Request, _Layout]] = deque()

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
        layout = REQUEST_LAYOUTS.get(request)
        if layout is None:
            layout = _RAW
        if not isinstance(payload, layout.types):
            raise LocalProtocolError(
                f"{request.name} carries {'/'.join(t.__name__ for t in layout.types)}, "
                f"not {type(payload).__name__}"
            )
        body = payload.pack()
        want = (_payload_fds(payload),) if layout.fds is None else layout.fds
        if len(fds) not in want:
            raise LocalProtocolError(
                f"{request.name} must be sent with {' or '.join(map(str, want))} fds, "
                f"not {len(fds)}"
            )
        reply: _Layout | None = INHERENT_REPLIES.get(request)
        if reply is None and request == Request.SET_LOG_BASE and (
            self.protocol_features & ProtocolFeature.LOG_SHMFD
        ):
            reply = _LOG_BASE_REPLY
        flags = HeaderFlag.VERSION
        if need_reply:
            if reply is None and not self.protocol_features & ProtocolFeature.REPLY_ACK:
                raise LocalProtocolError(
                    f"NEED_REPLY on {request.name} needs the REPLY_ACK protocol feature, "
                    "which is not negotiated"
                )
            flags |= HeaderFlag.NEED_REPLY
            if reply is None:
                reply = _ACK
        if len(body) > MAX_PAYLOAD:
            raise LocalProtocolError(f"{request.name} payload of {len(body)} bytes is too big")
        if reply is not None:
            self._awaiting.append((request, reply))
        return HEADER.pack(int(request), flags, len(body)) + body, list(fds)

    def _check_header(self, request: int, flags: int, size: int) -> None:
        if flags != _REPLY_FLAGS:
            self._check_common_flags("backend", request, flags)
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

    def _expect(self, request: int) -> _Layout:
        # Header walking may look at several buffered replies before decoding them, so
        # the match against the queue happens in _decode, in order.
        if not self._awaiting:
            raise RemoteProtocolError(
                f"backend sent a reply to {_request_name(request)} but no request awaits one"
            )
        want, layout = self._awaiting[0]
        if request != want:
            raise RemoteProtocolError(
                f"backend replied to {_request_name(request)} while the reply to "
                f"{want.name} was due"
            )
        return layout

    def _decode(self, request: int, flags: int, payload: bytes, fds: list[int]) -> Message:
        layout = self._expect(request)
        if fds or not layout.size_ok(len(payload)):
            self._reply_problem(request, layout, payload, fds)
        try:
            body = layout.decode(payload)
        except RemoteProtocolError as err:
            raise RemoteProtocolError(
                f"backend's reply to {_request_name(request)}: {err}"
            ) from None
        self._awaiting.popleft()
        return Message(_REQUEST_BY_ID.get(request, request), _FLAGS_BY_VALUE[flags], body, ())

    @staticmethod
    def _reply_problem(
        request: int, layout: _Layout, payload: bytes, fds: list[int]
    ) -> NoReturn:
        name = _request_name(request)
        if fds:
            raise RemoteProtocolError(
                f"backend's reply to {name} came with {len(fds)} fds; kvhost expects none"
            )
        raise RemoteProtocolError(
            f"backend's reply to {name} has {len(payload)} payload bytes; it must be "
            f"{layout.describe_size()}"
        )
