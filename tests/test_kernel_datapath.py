"""Kernel tier: a real datapath through kernel vhost-net and a tap.

Python plays the guest driver: memfd guest memory, the memory table, both split rings with
kick and call eventfds, and a tap as the backend, in a fresh network namespace.

* TX: a frame placed in the TX ring and kicked is transmitted by vhost into the tap, so it
  is *received* by the tap interface; an AF_PACKET socket bound to the interface sees it
  (reading the tap fd would not: the fd belongs to vhost now).
* RX: a frame sent out of the tap interface (AF_PACKET send) is queued on the tap, vhost
  copies it into a posted RX buffer, advances the used index and signals the call eventfd.

Negotiated: VERSION_1 and MRG_RXBUF without VHOST_NET_F_VIRTIO_NET_HDR (bit 27), so vhost
passes the 12-byte virtio_net_hdr_v1 through and the tap must carry it (TUNSETVNETHDRSZ 12):
TX buffers start with that header, RX buffers receive it in front of the frame.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass

import pytest

from kvhost import abi, features
from kvhost.memory import GuestMemory
from kvhost.tap import Tap, vnet_hdr_len
from kvhost.vhost import RX, TX, VhostNet, VringConfig
from kvhost.virtqueue import SplitRing

pytestmark = pytest.mark.kernel

RING = 256
RX_BUFS = 8
RX_BUF_SIZE = 2048
BUF_GPA = 0x100000  # buffers live in the second region
TAP_NAME = "kvdp0"
TAP_MAC = "02:00:00:00:00:01"  # locally administered
PEER_MAC = bytes.fromhex("020000000002")
ETHERTYPE = 0x88B5  # IEEE 802 local experimental


@dataclass
class Datapath:
    mem: GuestMemory
    dev: VhostNet
    tap: Tap
    rings: list[SplitRing]
    kick: list[int]
    call: list[int]
    hdr_len: int


def _frame(tag: bytes, length: int = 96) -> bytes:
    head = PEER_MAC + bytes.fromhex(TAP_MAC.replace(":", "")) + struct.pack("!H", ETHERTYPE)
    body = tag + bytes((i * 7 + 3) & 0xFF for i in range(length - len(head) - len(tag)))
    return head + body


def _wait_readable(fd: int, timeout: float) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


@pytest.fixture
def datapath(netns_quiet: str) -> Iterator[Datapath]:
    # no IPv6: a tap coming up would send router solicitations and MLD reports, which land
    # in the RX ring before the test's frame
    with ExitStack() as stack:
        mem = stack.enter_context(GuestMemory.create([(0, 1 << 20), (BUF_GPA, 1 << 20)]))
        tap = stack.enter_context(Tap.create(TAP_NAME, vnet_hdr=True))
        dev = stack.enter_context(VhostNet())
        dev.set_owner()
        negotiated = dev.get_features() & features.mask(["MRG_RXBUF", "VERSION_1"])
        assert not negotiated & (1 << abi.VHOST_NET_F_VIRTIO_NET_HDR)
        dev.set_features(negotiated)
        hdr_len = vnet_hdr_len(negotiated)
        assert hdr_len == 12
        tap.set_vnet_hdr_size(hdr_len)
        tap.set_mac(TAP_MAC)
        tap.set_up()
        dev.set_mem_table(mem.regions)
        rings, kick, call = [], [], []
        for i in (RX, TX):
            ring = SplitRing(mem, i, RING, 0x10000 * i)
            k = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            stack.callback(os.close, k)
            c = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            stack.callback(os.close, c)
            dev.set_vring_num(i, RING)
            dev.set_vring_base(i, 0)
            dev.set_vring_addr(
                i,
                VringConfig(
                    RING, 0, mem.hva(ring.desc_gpa), mem.hva(ring.used_gpa), mem.hva(ring.avail_gpa)
                ),
            )
            dev.set_vring_kick(i, k)
            dev.set_vring_call(i, c)
            rings.append(ring)
            kick.append(k)
            call.append(c)
        for i in (RX, TX):
            dev.set_backend(i, tap.fileno())
        yield Datapath(mem, dev, tap, rings, kick, call, hdr_len)
        for i in (RX, TX):
            dev.set_backend(i, -1)


def _packet_socket(stack: ExitStack) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(abi.ETH_P_ALL))
    stack.enter_context(sock)
    sock.bind((TAP_NAME, abi.ETH_P_ALL))
    return sock


def test_tx_frame_leaves_through_the_tap(datapath: Datapath, fd_leak_check: None) -> None:
    d = datapath
    frame = _frame(b"kvhost-tx")
    with ExitStack() as stack:
        sniffer = _packet_socket(stack)
        hdr = bytes(d.hdr_len)  # flags 0, GSO_NONE: a plain frame
        d.mem.write(BUF_GPA, hdr + frame)
        head = d.rings[TX].add_buffer(BUF_GPA, len(hdr) + len(frame), write=False)
        d.rings[TX].publish()
        os.eventfd_write(d.kick[TX], 1)
        seen: list[bytes] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if not _wait_readable(sniffer.fileno(), deadline - time.monotonic()):
                break
            data, addr = sniffer.recvfrom(65536)
            if addr[2] != abi.PACKET_OUTGOING:
                seen.append(data)
                if data == frame:
                    break
        assert frame in seen, f"frame not received by {TAP_NAME}; saw {[s.hex() for s in seen]}"
        # the device returned the buffer and signalled the call eventfd
        assert _wait_readable(d.call[TX], 5)
        assert os.eventfd_read(d.call[TX]) >= 1
        assert d.rings[TX].pop_used() == [(head, 0)]
    assert d.dev.get_vring_base(TX) == 1


def test_rx_frame_lands_in_an_rx_buffer(datapath: Datapath, fd_leak_check: None) -> None:
    d = datapath
    rx = d.rings[RX]
    heads = {}
    for n in range(RX_BUFS):
        gpa = BUF_GPA + 0x10000 + n * RX_BUF_SIZE
        heads[rx.add_buffer(gpa, RX_BUF_SIZE, write=True)] = gpa
    rx.publish()
    os.eventfd_write(d.kick[RX], 1)
    assert rx.used_idx() == 0
    frame = _frame(b"kvhost-rx", 120)
    with ExitStack() as stack:
        sender = _packet_socket(stack)
        sender.send(frame)
        assert _wait_readable(d.call[RX], 10), "call eventfd of the RX ring never signalled"
        assert os.eventfd_read(d.call[RX]) >= 1
    assert rx.used_idx() >= 1
    used = rx.pop_used()
    received: dict[bytes, tuple[bytes, int]] = {}  # frame -> (vnet header, used length)
    for head, length in used:
        data = d.mem.read(heads[head], length)
        received[data[d.hdr_len :]] = (data[: d.hdr_len], length)
    assert frame in received, f"frame not in RX buffers: {[f.hex() for f in received]}"
    hdr, length = received[frame]
    assert length == d.hdr_len + len(frame)
    flags, gso_type, _, _, _, _, num_buffers = struct.unpack("<BBHHHHH", hdr)
    assert (gso_type, num_buffers) == (abi.VIRTIO_NET_HDR_GSO_NONE, 1)
    assert flags & ~0x2 == 0  # at most VIRTIO_NET_HDR_F_DATA_VALID: nothing to offload
    # every consumed avail entry is accounted for by the device's ring position
    assert d.dev.get_vring_base(RX) == len(used)
