"""Tap devices through ``/dev/net/tun``, as a vhost-net backend needs them.

A :class:`Tap` is created (or attached to, by name) with
``IFF_TAP | IFF_NO_PI [| IFF_VNET_HDR] [| IFF_MULTI_QUEUE]``: with more than one queue, each
queue is its own fd (one per vhost-net device / queue pair). tun ioctls and link settings
(index, up, MTU, MAC, bridge: the classic SIOC* ioctls on a socket of the tap's namespace)
go through :func:`kvhost.ioctl.ioctl`; one method's ioctls share one socket, made in the
tap's namespace with one :func:`kvhost.netns.inside` round trip. This is kvhost's one way
of configuring a link: one ioctl per change, no library -- pyroute2, whose import alone costs
over a minute inside a TCG test VM, would be paid at every shim start. The one thing no SIOC
ioctl reports, a tap's owner and group, is read with a single hand-written RTM_GETLINK
(structs in :mod:`kvhost.abi`); it changes nothing.

The vnet header the tap carries must match what vhost-net expects (reference section 3):
without ``VHOST_NET_F_VIRTIO_NET_HDR`` vhost-net passes its header through, so the tap must
use the same length -- 12 with MRG_RXBUF or VERSION_1, 10 otherwise, 24 with UDP-tunnel GSO.

Ownership: the Tap owns its fds until :meth:`Tap.close`; a non-persistent tap disappears
when its last fd closes. Using a closed Tap raises UsageError.

Errors: KernelError when the kernel refuses (an ioctl, a socket, an rtnetlink query),
UsageError when the caller names something that is not there or asks for something
impossible (a missing interface or namespace, a bad queue count, a closed Tap).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from kvhost import abi, features
from kvhost import netns as kvnetns
from kvhost.errors import KernelError, UsageError
from kvhost.ioctl import ioctl, kernel_error, open_device

TUN_PATH = "/dev/net/tun"
MAX_QUEUES = 256  # MAX_TAP_QUEUES in drivers/net/tun.c

_INT = struct.Struct("=i")
_UINT = struct.Struct("=I")


def _setiff(fd: int, name: str, flags: int) -> str:
    ifr = abi.new("ifreq")
    ifr.ifr_name = name.encode()
    ifr.ifr_ifru.ifr_flags = flags
    ioctl(fd, abi.TUNSETIFF, abi.buffer(ifr), device=f"{TUN_PATH} ({name or 'new tap'})")
    return bytes(abi.ffi.string(ifr.ifr_name)).decode()


class Tap:
    """An attached tap: ``.name``, one fd per queue in ``.fds``. Use :meth:`create`/:meth:`open`."""

    def __init__(self, name: str, fds: list[int], flags: int, netns: str | None) -> None:
        self.name = name
        self.fds = fds
        self.flags = flags
        self.netns = netns

    @classmethod
    def _attach(
        cls,
        name: str,
        queues: int,
        vnet_hdr: bool,
        netns: str | None,
        multi_queue: bool | None,
        *,
        existing: bool = False,
    ) -> Tap:
        if not 1 <= queues <= MAX_QUEUES:
            raise UsageError(f"tap queue count {queues} must be from 1 to {MAX_QUEUES}")
        if len(name.encode()) >= abi.IFNAMSIZ:
            raise UsageError(f"interface name {name!r} is longer than {abi.IFNAMSIZ - 1} bytes")
        mq = queues > 1 if multi_queue is None else multi_queue
        if queues > 1 and not mq:
            raise UsageError("more than one tap queue needs a multi-queue tap")
        flags = abi.IFF_TAP | abi.IFF_NO_PI
        if vnet_hdr:
            flags |= abi.IFF_VNET_HDR
        if mq:
            flags |= abi.IFF_MULTI_QUEUE
        fds: list[int] = []
        try:
            with kvnetns.inside(netns):
                if existing:
                    # TUNSETIFF would create a missing tap instead of failing
                    with _socket(socket.AF_UNIX, socket.SOCK_DGRAM, 0, f"tap {name}") as sock:
                        _index_on(sock, name, netns)
                for _ in range(queues):
                    fd = open_device(TUN_PATH)
                    fds.append(fd)
                    # the first TUNSETIFF creates the tap (or names the kernel's choice);
                    # the others attach further queues to that same name
                    name = _setiff(fd, name, flags)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return cls(name, fds, flags, netns)

    @classmethod
    def create(
        cls,
        name: str | None = None,
        *,
        queues: int = 1,
        vnet_hdr: bool = True,
        netns: str | None = None,
        multi_queue: bool | None = None,
    ) -> Tap:
        """Create a tap (``name`` None: the kernel picks ``tapN``) with ``queues`` fds.

        ``multi_queue`` defaults to ``queues > 1``. ``netns`` names a namespace to create it
        in. Needs CAP_NET_ADMIN. Raises KernelError (EPERM, EBUSY...) or
        DeviceUnavailable when ``/dev/net/tun`` cannot be opened.
        """
        return cls._attach(name or "", queues, vnet_hdr, netns, multi_queue)

    @classmethod
    def open(
        cls,
        name: str,
        *,
        queues: int = 1,
        vnet_hdr: bool = True,
        netns: str | None = None,
        multi_queue: bool | None = None,
    ) -> Tap:
        """Attach to the existing tap ``name`` (flags must match how it was created).

        Raises UsageError when no such interface exists.
        """
        return cls._attach(name, queues, vnet_hdr, netns, multi_queue, existing=True)

    # -- lifecycle -----------------------------------------------------------------------
    def fileno(self) -> int:
        """Queue 0's fd; UsageError once closed."""
        if not self.fds:
            raise self._closed()
        return self.fds[0]

    def _closed(self) -> UsageError:
        return UsageError(f"tap {self.name} is closed: a Tap is usable only until its close()")

    @property
    def queues(self) -> int:
        return len(self.fds)

    def close(self) -> None:
        """Close every queue fd; idempotent."""
        while self.fds:
            os.close(self.fds.pop())

    def __enter__(self) -> Tap:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _ioctl(self, req: abi.Ioctl, arg: object = 0, queue: int = 0) -> int:
        if not self.fds:
            raise self._closed()
        return ioctl(self.fds[queue], req, arg, device=f"tap {self.name}")

    # -- tun ioctls (settings are per device; queue 0's fd is as good as any) -------------
    def features(self) -> int:
        """TUNGETFEATURES: the IFF_* flags this kernel's tun supports."""
        buf = bytearray(_UINT.size)
        self._ioctl(abi.TUNGETFEATURES, buf)
        return int(_UINT.unpack(buf)[0])

    def get_iff(self, queue: int = 0) -> tuple[str, int]:
        """TUNGETIFF on one queue's fd: the interface name and its IFF_* flags.

        (``/sys/class/net`` shows only the namespace sysfs was mounted in; this works
        from any.) EBADFD when that queue is detached.
        """
        ifr = abi.new("ifreq")
        self._ioctl(abi.TUNGETIFF, abi.buffer(ifr), queue=queue)
        return bytes(abi.ffi.string(ifr.ifr_name)).decode(), int(ifr.ifr_ifru.ifr_flags) & 0xFFFF

    def set_offload(self, flags: int) -> None:
        """TUNSETOFFLOAD: the TUN_F_* offloads the stack may hand up (EINVAL if refused)."""
        self._ioctl(abi.TUNSETOFFLOAD, flags)

    def set_vnet_hdr_size(self, n: int) -> None:
        """TUNSETVNETHDRSZ: at least 10 (EINVAL below)."""
        self._ioctl(abi.TUNSETVNETHDRSZ, _INT.pack(n))

    def get_vnet_hdr_size(self) -> int:
        buf = bytearray(_INT.size)
        self._ioctl(abi.TUNGETVNETHDRSZ, buf)
        return int(_INT.unpack(buf)[0])

    def set_sndbuf(self, n: int) -> None:
        """TUNSETSNDBUF for every queue (QEMU and DPDK use INT_MAX: no local drops)."""
        for q in range(len(self.fds)):
            self._ioctl(abi.TUNSETSNDBUF, _INT.pack(n), queue=q)

    def set_owner(self, uid: int) -> None:
        """TUNSETOWNER: let ``uid`` attach to this (persistent) tap."""
        self._ioctl(abi.TUNSETOWNER, uid)

    def set_group(self, gid: int) -> None:
        """TUNSETGROUP: let group ``gid`` attach to this (persistent) tap."""
        self._ioctl(abi.TUNSETGROUP, gid)

    def owner_and_group(self) -> tuple[int | None, int | None]:
        """The uid and gid TUNSETOWNER/TUNSETGROUP gave the tap (None: not set), as
        rtnetlink reports them in the tap's namespace (``/sys/class/net`` would show the
        namespace sysfs was mounted in). Raises KernelError when the query fails, UsageError
        when the kernel does not report them (before Linux 4.15) and the tap is in another
        namespace."""
        return _owner_and_group(self.name, self.netns)

    def set_persist(self, on: bool) -> None:
        """TUNSETPERSIST: keep the tap when its last fd closes (``on``), or let it go then.

        No capability is checked: being attached (root, or the tap's owner) is enough.
        """
        self._ioctl(abi.TUNSETPERSIST, int(on))

    # -- link settings: SIOC* ioctls on a socket in the tap's namespace ---------------------
    @property
    def index(self) -> int:
        """The interface index (in the tap's network namespace)."""
        with self._link_socket() as sock:
            return _index_on(sock, self.name, self.netns)

    def set_up(self) -> None:
        """Bring the link up (needs CAP_NET_ADMIN)."""
        ifr = _ifreq(self.name)
        with self._link_socket() as sock:
            self._link_ioctl(sock, abi.SIOCGIFFLAGS, ifr)
            ifr.ifr_ifru.ifr_flags |= abi.IFF_UP
            self._link_ioctl(sock, abi.SIOCSIFFLAGS, ifr)

    def get_mtu(self) -> int:
        ifr = _ifreq(self.name)
        with self._link_socket() as sock:
            self._link_ioctl(sock, abi.SIOCGIFMTU, ifr)
        return int(ifr.ifr_ifru.ifr_mtu)

    def set_mtu(self, n: int) -> None:
        """Set the MTU (needs CAP_NET_ADMIN; EINVAL outside 68 .. the device maximum)."""
        if n <= 0:
            raise UsageError(f"MTU {n} must be a positive number of bytes")
        ifr = _ifreq(self.name)
        ifr.ifr_ifru.ifr_mtu = n
        with self._link_socket() as sock:
            self._link_ioctl(sock, abi.SIOCSIFMTU, ifr)

    def set_mac(self, mac: str) -> None:
        """Set the MAC address (``aa:bb:cc:dd:ee:ff``; needs CAP_NET_ADMIN)."""
        try:
            raw = bytes.fromhex(mac.replace(":", ""))
        except ValueError:
            raw = b""
        if len(raw) != 6:
            raise UsageError(f"MAC address {mac!r} is not six hex bytes (aa:bb:cc:dd:ee:ff)")
        ifr = _ifreq(self.name)
        ifr.ifr_ifru.ifr_hwaddr.sa_family = abi.ARPHRD_ETHER
        ifr.ifr_ifru.ifr_hwaddr.sa_data = raw
        with self._link_socket() as sock:
            self._link_ioctl(sock, abi.SIOCSIFHWADDR, ifr)

    def attach_bridge(self, bridge: str) -> None:
        """Enslave the tap to the existing bridge ``bridge`` (UsageError if it is missing)."""
        with self._link_socket() as sock:
            index = _index_on(sock, self.name, self.netns)
            _index_on(sock, bridge, self.netns)
            ifr = _ifreq(bridge)
            ifr.ifr_ifru.ifr_ifindex = index
            ioctl(sock.fileno(), abi.SIOCBRADDIF, abi.buffer(ifr), device=f"bridge {bridge}")

    def _link_socket(self) -> contextlib.AbstractContextManager[socket.socket]:
        return _link_socket(self.netns, f"tap {self.name}")

    def _link_ioctl(self, sock: socket.socket, req: abi.Ioctl, ifr: Any) -> None:
        ioctl(sock.fileno(), req, abi.buffer(ifr), device=f"tap {self.name}")


def _ifreq(name: str) -> Any:
    if len(name.encode()) >= abi.IFNAMSIZ:
        raise UsageError(f"interface name {name!r} is longer than {abi.IFNAMSIZ - 1} bytes")
    ifr = abi.new("ifreq")
    ifr.ifr_name = name.encode()
    return ifr


def _socket(family: int, kind: int, proto: int, device: str) -> socket.socket:
    """A close-on-exec socket in the calling thread's namespace; KernelError if refused."""
    try:
        return socket.socket(family, kind | socket.SOCK_CLOEXEC, proto)
    except OSError as err:
        raise kernel_error("socket", device, err, "needed to configure the link") from err


@contextlib.contextmanager
def _link_socket(netns: str | None, device: str) -> Iterator[socket.socket]:
    """A socket for SIOC* ioctls on links of ``netns``. Any socket will do: the ioctls act on
    the namespace the socket was made in, whatever the thread's, so one socket serves a whole
    call sequence after a single setns round trip."""
    with kvnetns.inside(netns):
        sock = _socket(socket.AF_UNIX, socket.SOCK_DGRAM, 0, device)
    with sock:
        yield sock


def _index_on(sock: socket.socket, name: str, netns: str | None) -> int:
    """The ifindex of ``name`` in ``sock``'s namespace; UsageError if there is none."""
    ifr = _ifreq(name)
    try:
        ioctl(sock.fileno(), abi.SIOCGIFINDEX, abi.buffer(ifr), device=name)
    except KernelError as err:
        if err.errno != errno.ENODEV:
            raise
        where = f" in network namespace {netns!r}" if netns else ""
        raise UsageError(f"no network interface named {name!r}{where}") from err
    return int(ifr.ifr_ifru.ifr_ifindex)


# rtnetlink, just enough to read a tap's owner and group: RTM_GETLINK by index, then
# IFLA_LINKINFO > IFLA_INFO_DATA > IFLA_TUN_OWNER / IFLA_TUN_GROUP, each present only when
# set (drivers/net/tun.c)


def _attrs(data: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    off = 0
    while off + abi.NLATTR.size <= len(data):
        length, kind = abi.NLATTR.unpack_from(data, off)
        if length < abi.NLATTR.size:
            break
        out[kind & abi.NLA_TYPE_MASK] = data[off + abi.NLATTR.size : off + length]
        off += -(-length // abi.NLA_ALIGNTO) * abi.NLA_ALIGNTO
    return out


def _getlink(sock: socket.socket, index: int, device: str) -> bytes:
    """The attributes of link ``index`` (RTM_GETLINK on the rtnetlink socket ``sock``);
    KernelError when the kernel refuses or answers something else."""
    body = abi.IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, 0, 0)
    size = abi.NLMSGHDR.size + len(body)
    head = abi.NLMSGHDR.pack(size, abi.RTM_GETLINK, abi.NLM_F_REQUEST, 1, 0)
    try:
        sock.send(head + body)
        reply = sock.recv(65536)
    except OSError as err:
        raise kernel_error("RTM_GETLINK", device, err, "the rtnetlink query failed") from err
    if len(reply) < abi.NLMSGHDR.size:
        raise kernel_error("RTM_GETLINK", device, errno.EPROTO, f"a {len(reply)}-byte reply")
    length, kind, _, _, _ = abi.NLMSGHDR.unpack_from(reply)
    if kind == abi.NLMSG_ERROR and len(reply) >= abi.NLMSGHDR.size + abi.NLMSGERR.size:
        (error,) = abi.NLMSGERR.unpack_from(reply, abi.NLMSGHDR.size)
        # error 0 is an acknowledgement, which was not asked for: as wrong as any other type
        code = -error or errno.EPROTO
        raise kernel_error("RTM_GETLINK", device, code, "reading the tap's owner failed")
    if kind != abi.RTM_NEWLINK or length > len(reply):
        raise kernel_error("RTM_GETLINK", device, errno.EPROTO, f"reply type {kind}")
    return reply[abi.NLMSGHDR.size + abi.IFINFOMSG.size : length]


def _owner_and_group(name: str, netns: str | None) -> tuple[int | None, int | None]:
    device = f"tap {name}"
    with contextlib.ExitStack() as sockets:
        # both sockets made in one namespace entry; each keeps acting there afterwards
        with kvnetns.inside(netns):
            link = sockets.enter_context(_socket(socket.AF_UNIX, socket.SOCK_DGRAM, 0, device))
            rtnl = sockets.enter_context(
                _socket(socket.AF_NETLINK, socket.SOCK_RAW, abi.NETLINK_ROUTE, device)
            )
        attrs = _attrs(_getlink(rtnl, _index_on(link, name, netns), device))
    data = _attrs(attrs.get(abi.IFLA_LINKINFO, b"")).get(abi.IFLA_INFO_DATA)
    if data is None:  # before Linux 4.15 tun reports nothing; sysfs does, for its namespace
        if netns is not None:
            raise UsageError(
                f"this kernel does not report the owner of tap {name} in network namespace "
                f"{netns!r}; create the tap owned by the shim's user ('ip tuntap add {name} "
                "mode tap user USER') so the shim need not change it"
            )
        return _sysfs_owner_and_group(name)
    tun = _attrs(data)
    owner, group = tun.get(abi.IFLA_TUN_OWNER), tun.get(abi.IFLA_TUN_GROUP)
    return (
        None if owner is None else int(_UINT.unpack(owner[:4])[0]),
        None if group is None else int(_UINT.unpack(group[:4])[0]),
    )


def _sysfs_owner_and_group(name: str) -> tuple[int | None, int | None]:
    ids: list[int] = []
    for item in ("owner", "group"):
        path = Path(f"/sys/class/net/{name}/{item}")
        try:
            ids.append(int(path.read_text()))
        except OSError as err:
            raise kernel_error("read", str(path), err, "the tap's owner") from err
    return (ids[0] if ids[0] >= 0 else None), (ids[1] if ids[1] >= 0 else None)


def vnet_hdr_len(negotiated: int) -> int:
    """The vnet header length vhost-net uses for ``negotiated`` features (reference 3).

    The tap must be set to this length (TUNSETVNETHDRSZ) when VHOST_NET_F_VIRTIO_NET_HDR
    is not negotiated.
    """
    tunnel = features.mask(["GUEST_UDP_TUNNEL_GSO", "HOST_UDP_TUNNEL_GSO"])
    if negotiated & tunnel:
        return abi.VNET_HDR_TUNNEL_LEN
    if negotiated & features.mask(["MRG_RXBUF", "VERSION_1"]):
        return abi.VNET_HDR_MRG_LEN
    return abi.VNET_HDR_LEN


def _accepts(tap: Tap, flags: int) -> bool:
    try:
        tap.set_offload(flags)
    except KernelError as err:
        if err.errno == errno.EINVAL:  # unknown or unsupported flag: the probe's answer
            return False
        raise
    return True


def probe_offloads(tap: Tap | None = None) -> tuple[str, ...]:
    """Names of :data:`kvhost.features.TAP_OFFLOAD_BITS` this kernel's tap accepts.

    Tries each offload with TUNSETOFFLOAD as QEMU and DPDK do: every segmentation offload
    needs CSUM beside it, ECN needs TSO, USO4 and USO6 only count together, and the UDP
    tunnel offloads need a plain GSO offload and a vnet header of at least 24 bytes.
    Uses ``tap`` (restoring offloads 0 and its header size) or a temporary tap; the latter
    needs CAP_NET_ADMIN (KernelError EPERM otherwise).
    """
    if tap is None:
        with Tap.create(vnet_hdr=True) as temp:
            return probe_offloads(temp)
    csum = abi.TUN_F_CSUM
    tso = abi.TUN_F_TSO4 | abi.TUN_F_TSO6
    trials: list[tuple[str, int]] = [
        ("CSUM", csum),
        ("TSO4", csum | abi.TUN_F_TSO4),
        ("TSO6", csum | abi.TUN_F_TSO6),
        ("TSO_ECN", csum | tso | abi.TUN_F_TSO_ECN),
        ("UFO", csum | abi.TUN_F_UFO),
        ("USO", csum | abi.TUN_F_USO4 | abi.TUN_F_USO6),
    ]
    accepted: list[str] = []
    old_hdr = tap.get_vnet_hdr_size()
    try:
        for name, flags in trials:
            if _accepts(tap, flags):
                accepted.append(name)
        # a plain GSO offload for the tunnel offloads to ride on
        plain = next(
            (
                csum | f
                for n, f in (("TSO4", abi.TUN_F_TSO4), ("UFO", abi.TUN_F_UFO))
                if n in accepted
            ),
            None,
        )
        if plain is not None:
            tap.set_vnet_hdr_size(abi.VNET_HDR_TUNNEL_LEN)
            if _accepts(tap, plain | abi.TUN_F_UDP_TUNNEL_GSO):
                accepted.append("UDP_TUNNEL_GSO")
                if _accepts(tap, plain | abi.TUN_F_UDP_TUNNEL_GSO | abi.TUN_F_UDP_TUNNEL_GSO_CSUM):
                    accepted.append("UDP_TUNNEL_GSO_CSUM")
    finally:
        tap.set_offload(0)
        tap.set_vnet_hdr_size(old_hdr)
    order = list(features.TAP_OFFLOAD_BITS)
    return tuple(sorted(accepted, key=order.index))
