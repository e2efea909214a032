"""Host tier: the host side of a tap (:mod:`harness.netns`) against this host's real
``/dev/net/tun``, in the test's own network namespace. No ``/dev/vhost-net`` is needed: the
test holds the tap's queue fd itself and writes frames into it as a guest's TX would."""

from __future__ import annotations

import errno
import os

import pytest

from harness import netns as testns
from kvhost import abi
from kvhost.errors import KernelError
from kvhost.tap import Tap

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (taps, namespaces)")

FRAME = bytes.fromhex("02000000beef525400aa000188b5") + b"kvhost netns test".ljust(46, b".")


def test_create_tap_multi_queue_takes_multi_queue_attaches(netns_quiet: str) -> None:
    testns.create_tap("kvmq1", multi_queue=True)
    with Tap.open("kvmq1", multi_queue=True) as tap:
        assert tap.flags & abi.IFF_MULTI_QUEUE
    testns.create_tap("kvsq1")
    with pytest.raises(KernelError) as err:
        Tap.open("kvsq1", multi_queue=True).close()
    assert err.value.errno == errno.EINVAL


def test_tap_port_receives_what_the_guest_side_sends_not_what_it_sent(netns_quiet: str) -> None:
    testns.create_tap("kvp0")
    with Tap.open("kvp0") as tap, testns.TapPort("kvp0") as sender, \
            testns.TapPort("kvp0") as port:
        sender.send(FRAME)  # out of the interface: PACKET_OUTGOING for the other socket
        assert port.receive(0.3) is None
        assert os.read(tap.fileno(), 2048)[-len(FRAME):] == FRAME
        into = FRAME[:-1] + b"!"
        os.write(tap.fileno(), bytes(tap.get_vnet_hdr_size()) + into)
        got = port.receive(5.0)
        assert got is not None and got[0] == into
        os.write(tap.fileno(), bytes(tap.get_vnet_hdr_size()) + FRAME)
        data, arrived = port.expect(0x88B5)
        assert data == FRAME and arrived >= got[1]
        with pytest.raises(testns.FrameNotSeen, match="kvp0: the expected frame not seen"):
            port.expect(FRAME, timeout=0.2)
