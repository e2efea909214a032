"""The kernel ABI kvhost speaks: every struct, ioctl number and constant, in one place.

Sources, per item, are the uapi headers named in the comments. Numbers are computed with
``_IOC`` exactly as ``include/uapi/asm-generic/ioctl.h`` does (x86, arm64, riscv, s390); the
test ``tests/test_abi_headers.py`` compiles a C program against the installed kernel headers
and compares every number, ``sizeof`` and ``offsetof`` here with the C side. Constants newer
than the installed headers are checked against the values recorded in the project's reference.

Structs are declared for cffi in ABI mode (no compiler needed at run time); ``new()`` and
``buffer()`` give a writable buffer that ``fcntl.ioctl`` fills in place.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import cffi

# --- asm-generic/ioctl.h -------------------------------------------------------------------
_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2


def _IOC(direction: int, typ: int, nr: int, size: int) -> int:
    if size >= 1 << _IOC_SIZEBITS:
        raise ValueError(f"ioctl argument size {size} does not fit _IOC_SIZEBITS")
    return (
        (direction << _IOC_DIRSHIFT)
        | (typ << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _IO(typ: int, nr: int) -> int:
    return _IOC(_IOC_NONE, typ, nr, 0)


def _IOR(typ: int, nr: int, size: int) -> int:
    return _IOC(_IOC_READ, typ, nr, size)


def _IOW(typ: int, nr: int, size: int) -> int:
    return _IOC(_IOC_WRITE, typ, nr, size)


def _IOWR(typ: int, nr: int, size: int) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, typ, nr, size)


# --- struct declarations -------------------------------------------------------------------
CDEF = """
/* linux/vhost_types.h */
struct vhost_vring_state { unsigned int index; unsigned int num; };
struct vhost_vring_file { unsigned int index; int fd; };
struct vhost_vring_addr {
    uint32_t index;
    uint32_t flags;
    uint64_t desc_user_addr;
    uint64_t used_user_addr;
    uint64_t avail_user_addr;
    uint64_t log_guest_addr;
};
struct vhost_memory_region {
    uint64_t guest_phys_addr;
    uint64_t memory_size;
    uint64_t userspace_addr;
    uint64_t flags_padding;
};
struct vhost_memory {
    uint32_t nregions;
    uint32_t padding;
    struct vhost_memory_region regions[];
};
/* linux/vhost_types.h, 6.17+ */
struct vhost_features_array {
    uint64_t count;
    uint64_t features[];
};
/* sys/socket.h (linux/if.h includes it): struct sockaddr, as ifreq carries a MAC */
struct sockaddr {
    unsigned short sa_family;
    char sa_data[14];
};
/* linux/if.h: struct ifreq as TUNSETIFF, TUNGETIFF, TUNSETQUEUE and the SIOC ioctls use it */
struct ifreq {
    char ifr_name[16];
    union {
        struct sockaddr ifr_hwaddr;
        short ifr_flags;
        int ifr_ifindex;
        int ifr_mtu;
        char ifr_pad[24];
    } ifr_ifru;
};
/* linux/virtio_net.h */
struct virtio_net_hdr {
    uint8_t flags;
    uint8_t gso_type;
    uint16_t hdr_len;
    uint16_t gso_size;
    uint16_t csum_start;
    uint16_t csum_offset;
};
struct virtio_net_hdr_v1 {
    uint8_t flags;
    uint8_t gso_type;
    uint16_t hdr_len;
    uint16_t gso_size;
    uint16_t csum_start;
    uint16_t csum_offset;
    uint16_t num_buffers;
};
/* linux/virtio_ring.h */
struct vring_desc { uint64_t addr; uint32_t len; uint16_t flags; uint16_t next; };
struct vring_used_elem { uint32_t id; uint32_t len; };
/* linux/netlink.h */
struct nlmsghdr {
    uint32_t nlmsg_len;
    uint16_t nlmsg_type;
    uint16_t nlmsg_flags;
    uint32_t nlmsg_seq;
    uint32_t nlmsg_pid;
};
struct nlmsgerr { int error; struct nlmsghdr msg; };
struct nlattr { uint16_t nla_len; uint16_t nla_type; };
/* linux/rtnetlink.h */
struct ifinfomsg {
    unsigned char ifi_family;
    unsigned char __ifi_pad;
    unsigned short ifi_type;
    int ifi_index;
    unsigned int ifi_flags;
    unsigned int ifi_change;
};
/* linux/if_packet.h: what getsockopt(PACKET_STATISTICS) fills in */
struct tpacket_stats { unsigned int tp_packets; unsigned int tp_drops; };
"""

ffi = cffi.FFI()
ffi.cdef(CDEF)

#: struct name -> field names whose offsets the header test checks
STRUCT_FIELDS: dict[str, tuple[str, ...]] = {
    "vhost_vring_state": ("index", "num"),
    "vhost_vring_file": ("index", "fd"),
    "vhost_vring_addr": (
        "index",
        "flags",
        "desc_user_addr",
        "used_user_addr",
        "avail_user_addr",
        "log_guest_addr",
    ),
    "vhost_memory_region": ("guest_phys_addr", "memory_size", "userspace_addr", "flags_padding"),
    "vhost_memory": ("nregions", "padding", "regions"),
    "vhost_features_array": ("count", "features"),
    "ifreq": ("ifr_name", "ifr_ifru"),
    "sockaddr": ("sa_family", "sa_data"),
    "virtio_net_hdr": ("flags", "gso_type", "hdr_len", "gso_size", "csum_start", "csum_offset"),
    "virtio_net_hdr_v1": (
        "flags",
        "gso_type",
        "hdr_len",
        "gso_size",
        "csum_start",
        "csum_offset",
        "num_buffers",
    ),
    "vring_desc": ("addr", "len", "flags", "next"),
    "vring_used_elem": ("id", "len"),
    "nlmsghdr": ("nlmsg_len", "nlmsg_type", "nlmsg_flags", "nlmsg_seq", "nlmsg_pid"),
    "nlmsgerr": ("error", "msg"),
    "nlattr": ("nla_len", "nla_type"),
    "ifinfomsg": ("ifi_family", "__ifi_pad", "ifi_type", "ifi_index", "ifi_flags", "ifi_change"),
    "tpacket_stats": ("tp_packets", "tp_drops"),
}


def sizeof(struct: str) -> int:
    """``sizeof(struct NAME)`` of a declared struct."""
    return int(ffi.sizeof(f"struct {struct}"))


def offsetof(struct: str, field: str) -> int:
    """``offsetof(struct NAME, field)`` of a declared struct."""
    return int(ffi.offsetof(f"struct {struct}", field))


def new(struct: str, **fields: Any) -> Any:
    """A zeroed ``struct NAME`` owned by Python, with ``fields`` set."""
    obj = ffi.new(f"struct {struct} *")
    for name, value in fields.items():
        setattr(obj, name, value)
    return obj


def new_var(struct: str, array_field: str, length: int, **fields: Any) -> Any:
    """A zeroed ``struct NAME`` whose trailing flexible array ``array_field`` has ``length``
    elements (``vhost_memory.regions``, ``vhost_features_array.features``)."""
    obj = ffi.new(f"struct {struct} *", {array_field: length})
    for name, value in fields.items():
        setattr(obj, name, value)
    return obj


def buffer(obj: Any, size: int | None = None) -> Any:
    """A writable buffer over a cffi object, suitable for ``fcntl.ioctl(..., mutate=True)``."""
    return ffi.buffer(obj) if size is None else ffi.buffer(obj, size)


# --- the structs of QEMU's start and stop sequence, as struct formats ------------------------
# GET_VRING_BASE / SET_BACKEND / SET_VRING_ADDR / SET_MEM_TABLE run inside QEMU's stop and
# start; under TCG building a cffi object per call costs more than the ioctl itself. Same
# layouts: tests/test_abi_headers.py checks each format, field by field, against the cffi
# declaration named in STRUCT_FORMATS (which it checks against the kernel headers).
VRING_STATE = struct.Struct("=II")  # struct vhost_vring_state { index; num; }
VRING_FILE = struct.Struct("=Ii")  # struct vhost_vring_file { index; fd; }
#: struct vhost_vring_addr { index; flags; desc, used, avail user addrs; log_guest_addr; }
VRING_ADDR = struct.Struct("=IIQQQQ")
#: struct vhost_memory's header { nregions; padding; } -- the regions follow it
MEMORY_HEADER = struct.Struct("=II")
#: struct vhost_memory_region { guest_phys_addr; memory_size; userspace_addr; flags_padding; }
MEMORY_REGION = struct.Struct("=QQQQ")

# rtnetlink, just enough for kvhost.tap to read a tap's owner and group without pyroute2
NLMSGHDR = struct.Struct("=IHHII")  # struct nlmsghdr { len; type; flags; seq; pid; }
#: struct nlmsgerr { error; struct nlmsghdr msg; } -- the echoed request header is skipped
NLMSGERR = struct.Struct("=i16x")
NLATTR = struct.Struct("=HH")  # struct nlattr { nla_len; nla_type; }
#: struct ifinfomsg { family; pad; type; index; flags; change; }
IFINFOMSG = struct.Struct("=BxHiII")
#: struct tpacket_stats { tp_packets; tp_drops; } (the harness's capture sockets)
TPACKET_STATS = struct.Struct("=II")

#: C struct name -> the struct format that packs it: every member in declaration order (a
#: byte run ``x`` stands for a member kvhost never reads, such as padding), a trailing
#: flexible array left out
STRUCT_FORMATS: dict[str, struct.Struct] = {
    "vhost_vring_state": VRING_STATE,
    "vhost_vring_file": VRING_FILE,
    "vhost_vring_addr": VRING_ADDR,
    "vhost_memory": MEMORY_HEADER,
    "vhost_memory_region": MEMORY_REGION,
    "nlmsghdr": NLMSGHDR,
    "nlmsgerr": NLMSGERR,
    "nlattr": NLATTR,
    "ifinfomsg": IFINFOMSG,
    "tpacket_stats": TPACKET_STATS,
}


# --- linux/vhost.h: type VHOST_VIRTIO ------------------------------------------------------
VHOST_VIRTIO = 0xAF
_U64 = 8
_INT = 4
_U8 = 1
_STATE = sizeof("vhost_vring_state")
_FILE = sizeof("vhost_vring_file")
_ADDR = sizeof("vhost_vring_addr")
_MEM = sizeof("vhost_memory")
_FARRAY = sizeof("vhost_features_array")


@dataclass(frozen=True, slots=True)
class Ioctl:
    """One ioctl: its kernel name, request number and the header that defines it."""

    name: str
    number: int
    header: str
    #: first mainline release that has it (kernel-vhost-uapi reference)
    since: str = ""


def _v(name: str, number: int, since: str = "2.6.33") -> Ioctl:
    return Ioctl(name, number, "linux/vhost.h", since)


VHOST_GET_FEATURES = _v("VHOST_GET_FEATURES", _IOR(VHOST_VIRTIO, 0x00, _U64))
VHOST_SET_FEATURES = _v("VHOST_SET_FEATURES", _IOW(VHOST_VIRTIO, 0x00, _U64))
VHOST_SET_OWNER = _v("VHOST_SET_OWNER", _IO(VHOST_VIRTIO, 0x01))
VHOST_RESET_OWNER = _v("VHOST_RESET_OWNER", _IO(VHOST_VIRTIO, 0x02))
VHOST_SET_MEM_TABLE = _v("VHOST_SET_MEM_TABLE", _IOW(VHOST_VIRTIO, 0x03, _MEM))
VHOST_SET_LOG_BASE = _v("VHOST_SET_LOG_BASE", _IOW(VHOST_VIRTIO, 0x04, _U64))
VHOST_SET_LOG_FD = _v("VHOST_SET_LOG_FD", _IOW(VHOST_VIRTIO, 0x07, _INT))
VHOST_SET_VRING_NUM = _v("VHOST_SET_VRING_NUM", _IOW(VHOST_VIRTIO, 0x10, _STATE))
VHOST_SET_VRING_ADDR = _v("VHOST_SET_VRING_ADDR", _IOW(VHOST_VIRTIO, 0x11, _ADDR))
VHOST_SET_VRING_BASE = _v("VHOST_SET_VRING_BASE", _IOW(VHOST_VIRTIO, 0x12, _STATE))
VHOST_GET_VRING_BASE = _v("VHOST_GET_VRING_BASE", _IOWR(VHOST_VIRTIO, 0x12, _STATE))
VHOST_SET_VRING_KICK = _v("VHOST_SET_VRING_KICK", _IOW(VHOST_VIRTIO, 0x20, _FILE))
VHOST_SET_VRING_CALL = _v("VHOST_SET_VRING_CALL", _IOW(VHOST_VIRTIO, 0x21, _FILE))
VHOST_SET_VRING_ERR = _v("VHOST_SET_VRING_ERR", _IOW(VHOST_VIRTIO, 0x22, _FILE))
VHOST_SET_VRING_BUSYLOOP_TIMEOUT = _v(
    "VHOST_SET_VRING_BUSYLOOP_TIMEOUT", _IOW(VHOST_VIRTIO, 0x23, _STATE), "4.6"
)
# Encoded _IOW in the header although it reads: use the header's number, not the "right" one.
VHOST_GET_VRING_BUSYLOOP_TIMEOUT = _v(
    "VHOST_GET_VRING_BUSYLOOP_TIMEOUT", _IOW(VHOST_VIRTIO, 0x24, _STATE), "4.6"
)
VHOST_SET_BACKEND_FEATURES = _v(
    "VHOST_SET_BACKEND_FEATURES", _IOW(VHOST_VIRTIO, 0x25, _U64), "4.19"
)
VHOST_GET_BACKEND_FEATURES = _v(
    "VHOST_GET_BACKEND_FEATURES", _IOR(VHOST_VIRTIO, 0x26, _U64), "4.19"
)
VHOST_NET_SET_BACKEND = _v("VHOST_NET_SET_BACKEND", _IOW(VHOST_VIRTIO, 0x30, _FILE))
VHOST_GET_FEATURES_ARRAY = _v(
    "VHOST_GET_FEATURES_ARRAY", _IOR(VHOST_VIRTIO, 0x83, _FARRAY), "6.17"
)
VHOST_SET_FEATURES_ARRAY = _v(
    "VHOST_SET_FEATURES_ARRAY", _IOW(VHOST_VIRTIO, 0x83, _FARRAY), "6.17"
)
# 6.17-rc1..rc3 and some 6.12.y/6.16.y stables used 0x83/0x84; kvhost speaks only the fixed
# numbers and treats ENOTTY as "not supported" (reference §1e.2).
VHOST_SET_FORK_FROM_OWNER = _v(
    "VHOST_SET_FORK_FROM_OWNER", _IOW(VHOST_VIRTIO, 0x84, _U8), "6.17"
)
VHOST_GET_FORK_FROM_OWNER = _v(
    "VHOST_GET_FORK_FROM_OWNER", _IOR(VHOST_VIRTIO, 0x85, _U8), "6.17"
)

# linux/vhost.h and vhost_types.h constants
VHOST_F_LOG_ALL = 26
VHOST_NET_F_VIRTIO_NET_HDR = 27
VHOST_VRING_F_LOG = 0
VHOST_PAGE_SIZE = 0x1000
VHOST_FILE_UNBIND = -1
VHOST_BACKEND_F_IOTLB_MSG_V2 = 0x1
VHOST_BACKEND_F_IOTLB_BATCH = 0x2
VHOST_BACKEND_F_IOTLB_ASID = 0x3
VHOST_BACKEND_F_SUSPEND = 0x4
VHOST_BACKEND_F_RESUME = 0x5
VHOST_BACKEND_F_ENABLE_AFTER_DRIVER_OK = 0x6
VHOST_BACKEND_F_DESC_ASID = 0x7
VHOST_BACKEND_F_IOTLB_PERSIST = 0x8
VHOST_FORK_OWNER_KTHREAD = 0
VHOST_FORK_OWNER_TASK = 1
#: VIRTIO_FEATURES_U64S: the word count kvhost always passes to FEATURES_ARRAY; larger counts
#: hit the clear_user bug of 6.17..7.1.5 (reference §1e.3) and zero the returned features.
VHOST_FEATURES_ARRAY_WORDS = 2
#: VHOST_MEMORY_MAX_NREGIONS before 4.2, and the default of max_mem_regions since
VHOST_DEFAULT_MAX_MEM_REGIONS = 64
VHOST_MAX_RING_SIZE = 32768

# --- linux/if_tun.h: type 'T' --------------------------------------------------------------
TUN_TYPE = ord("T")


def _t(name: str, number: int, since: str = "2.6.33") -> Ioctl:
    return Ioctl(name, number, "linux/if_tun.h", since)


TUNSETNOCSUM = _t("TUNSETNOCSUM", _IOW(TUN_TYPE, 200, _INT))
TUNSETIFF = _t("TUNSETIFF", _IOW(TUN_TYPE, 202, _INT))
TUNSETPERSIST = _t("TUNSETPERSIST", _IOW(TUN_TYPE, 203, _INT))
TUNSETOWNER = _t("TUNSETOWNER", _IOW(TUN_TYPE, 204, _INT))
TUNSETLINK = _t("TUNSETLINK", _IOW(TUN_TYPE, 205, _INT))
TUNSETGROUP = _t("TUNSETGROUP", _IOW(TUN_TYPE, 206, _INT))
TUNGETFEATURES = _t("TUNGETFEATURES", _IOR(TUN_TYPE, 207, _INT))
TUNSETOFFLOAD = _t("TUNSETOFFLOAD", _IOW(TUN_TYPE, 208, _INT))
TUNGETIFF = _t("TUNGETIFF", _IOR(TUN_TYPE, 210, _INT))
TUNGETSNDBUF = _t("TUNGETSNDBUF", _IOR(TUN_TYPE, 211, _INT))
TUNSETSNDBUF = _t("TUNSETSNDBUF", _IOW(TUN_TYPE, 212, _INT))
TUNGETVNETHDRSZ = _t("TUNGETVNETHDRSZ", _IOR(TUN_TYPE, 215, _INT), "2.6.35")
TUNSETVNETHDRSZ = _t("TUNSETVNETHDRSZ", _IOW(TUN_TYPE, 216, _INT), "2.6.35")
TUNSETQUEUE = _t("TUNSETQUEUE", _IOW(TUN_TYPE, 217, _INT), "3.8")
TUNSETVNETLE = _t("TUNSETVNETLE", _IOW(TUN_TYPE, 220, _INT), "3.19")
TUNGETVNETLE = _t("TUNGETVNETLE", _IOR(TUN_TYPE, 221, _INT), "3.19")
TUNSETCARRIER = _t("TUNSETCARRIER", _IOW(TUN_TYPE, 226, _INT), "5.0")

# --- linux/sockios.h: link settings, issued on any socket of the interface's namespace ----
# (what ``ip link set`` needs rtnetlink for, without pyroute2: its import alone costs over a
# minute inside a TCG test VM, and the shim would pay it at every start)


def _s(name: str, number: int) -> Ioctl:
    return Ioctl(name, number, "linux/sockios.h", "2.6.33")


SIOCGIFFLAGS = _s("SIOCGIFFLAGS", 0x8913)
SIOCSIFFLAGS = _s("SIOCSIFFLAGS", 0x8914)
SIOCGIFMTU = _s("SIOCGIFMTU", 0x8921)
SIOCSIFMTU = _s("SIOCSIFMTU", 0x8922)
SIOCSIFHWADDR = _s("SIOCSIFHWADDR", 0x8924)
SIOCGIFINDEX = _s("SIOCGIFINDEX", 0x8933)
SIOCBRADDIF = _s("SIOCBRADDIF", 0x89A2)
#: enum net_device_flags in linux/if.h
IFF_UP = 0x1

# --- rtnetlink, just enough to read a tap's owner and group (kvhost.tap) -------------------
# linux/netlink.h, linux/rtnetlink.h; the IFLA_* are enum members of linux/if_link.h
NETLINK_ROUTE = 0
NLMSG_ERROR = 2
NLM_F_REQUEST = 1
#: attribute lengths are padded to this many bytes (NLA_ALIGN)
NLA_ALIGNTO = 4
NLA_F_NESTED = 1 << 15
NLA_F_NET_BYTEORDER = 1 << 14
#: an attribute's type without the flag bits; negative as in C (an int), which masks a u16
#: type exactly as 0x3FFF would
NLA_TYPE_MASK = ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER)
RTM_NEWLINK = 16
RTM_GETLINK = 18
IFLA_LINKINFO = 18
IFLA_INFO_DATA = 2
IFLA_TUN_OWNER = 1
IFLA_TUN_GROUP = 2

IFNAMSIZ = 16
IFF_TUN = 0x0001
IFF_TAP = 0x0002
IFF_NAPI = 0x0010
IFF_NAPI_FRAGS = 0x0020
IFF_NO_CARRIER = 0x0040
IFF_MULTI_QUEUE = 0x0100
IFF_ATTACH_QUEUE = 0x0200
IFF_DETACH_QUEUE = 0x0400
IFF_PERSIST = 0x0800
IFF_NO_PI = 0x1000
IFF_ONE_QUEUE = 0x2000
IFF_VNET_HDR = 0x4000
IFF_TUN_EXCL = 0x8000

TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40
TUN_F_UDP_TUNNEL_GSO = 0x80
TUN_F_UDP_TUNNEL_GSO_CSUM = 0x100

# --- linux/virtio_net.h --------------------------------------------------------------------
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_GSO_NONE = 0
#: vnet header lengths vhost-net chooses (reference §3)
VNET_HDR_LEN = sizeof("virtio_net_hdr")  # 10
VNET_HDR_MRG_LEN = sizeof("virtio_net_hdr_v1")  # 12
VNET_HDR_TUNNEL_LEN = 24  # virtio_net_hdr_v1_hash_tunnel, 6.17+

# --- linux/if_ether.h, linux/if_arp.h: the RARP announcement after migration (shim) --------
ETH_P_IP = 0x0800
ETH_P_RARP = 0x8035
#: the shortest Ethernet frame without its FCS
ETH_ZLEN = 60
ARPHRD_ETHER = 1
#: RARP "request reverse", what QEMU's announce sends
ARPOP_RREQUEST = 3

# --- linux/prctl.h, linux/capability.h, linux/sched.h, asm/socket.h (shim.privileges, netns)
PR_SET_KEEPCAPS = 8
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
CLONE_NEWNET = 0x40000000
#: Linux 4.13; Python's socket module names it only on newer builds
SO_PEERGROUPS = 59
#: asm-generic/socket.h: the peer's security label (SELinux context, AppArmor profile)
SO_PEERSEC = 31

# --- linux/virtio_ring.h -------------------------------------------------------------------
VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_USED_F_NO_NOTIFY = 1
VRING_AVAIL_F_NO_INTERRUPT = 1

# --- packet sockets ------------------------------------------------------------------------
# The harness watches taps through AF_PACKET sockets. Python's
# socket module lacks these names, so they are typed here, where the header test checks them.
# (CLONE_NEWNET and ETH_P_RARP are above, with the shim's numbers.)
ETH_P_ALL = 0x0003  # linux/if_ether.h: every protocol (a packet socket's catch-all)
#: linux/if_packet.h: sockaddr_ll.sll_pkttype of a frame sent from this host
PACKET_OUTGOING = 4
PACKET_STATISTICS = 6  # linux/if_packet.h: getsockopt -> struct tpacket_stats
SOL_PACKET = 263  # linux/socket.h (in userspace through the libc's <sys/socket.h>)
SO_RCVBUFFORCE = 33  # asm-generic/socket.h: SO_RCVBUF past net.core.rmem_max (CAP_NET_ADMIN)

ALL_IOCTLS: tuple[Ioctl, ...] = tuple(v for v in list(globals().values()) if isinstance(v, Ioctl))
