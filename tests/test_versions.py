"""Interface versions: registry, both spellings, masking against real kernels' offers.

The probe fixtures are the values measured in the test VM (reference section 8) and, for
older releases, the VHOST_GET_FEATURES history of reference section 2; they go through
``Probe.from_json`` exactly as a manifest's embedded probe does.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from kvhost import features as fb
from kvhost import versions as ver
from kvhost.errors import VersionError
from kvhost.probe import Probe

V = {n: f"org.kernel.vhost-net.v{n}" for n in range(1, 9)}
BASIC_OFFLOADS = ["CSUM", "TSO4", "TSO6", "TSO_ECN", "UFO"]
#: TUNGETFEATURES on both Debian kernels (reference section 8)
TUN_FEATURES_61 = 0x7173


def probe_json(
    release: str,
    vhost: int | None,
    offloads: list[str],
    *,
    tun_features: int = TUN_FEATURES_61,
    vhost_error: str | None = None,
    tun_error: str | None = None,
    tun: bool = True,
) -> dict[str, Any]:
    return {
        "schema": 1,
        "kernel_release": release,
        "vhost_net": None
        if vhost is None
        else {
            "features": hex(vhost),
            "features_array": vhost >> 64 != 0,
            "backend_features": "0x2",
            "fork_owner": False,
        },
        "vhost_net_error": vhost_error,
        "tun": {
            "features": hex(tun_features),
            "offloads": offloads,
            "multi_queue": bool(tun_features & 0x100),
            "vnet_hdr": bool(tun_features & 0x4000),
        }
        if tun
        else None,
        "tun_error": tun_error,
        "max_mem_regions": 64,
        "devices": {},
    }


def probe_61() -> Probe:
    return Probe.from_json(probe_json("6.1.0-56-amd64", 0x33D008000, BASIC_OFFLOADS))


def probe_612() -> Probe:
    return Probe.from_json(
        probe_json("6.12.117+deb12-amd64", 0x1033D008000, [*BASIC_OFFLOADS, "USO"])
    )


def probe_617() -> Probe:
    return Probe.from_json(
        probe_json(
            "6.17.0",
            0x10B3D008000 | (0xA << 64),
            [*BASIC_OFFLOADS, "USO", "UDP_TUNNEL_GSO", "UDP_TUNNEL_GSO_CSUM"],
        )
    )


# --- registry -------------------------------------------------------------------------------


def test_registry_is_the_ladder_oldest_first() -> None:
    reg = ver.registry()
    assert [v.name for v in reg] == [V[n] for n in range(1, 9)]
    for older, newer in itertools.pairwise(reg):
        assert older.features & ~newer.features == 0, f"{newer.name} drops bits of {older.name}"
        assert newer.features != older.features or newer.values() != older.values()
        assert newer.max_queue_pairs >= older.max_queue_pairs
        assert newer.max_queue_size >= older.max_queue_size
    assert all(v.first_kernel and v.adds for v in reg)


def test_no_registry_version_contains_plumbing_or_unservable_bits() -> None:
    plumbing = fb.mask(["LOG_ALL", "PROTOCOL_FEATURES", "ACCESS_PLATFORM", "MTU"])
    for v in ver.registry():
        assert v.features & plumbing == 0, v.name


@pytest.mark.parametrize("n", range(1, 9))
def test_both_spellings_give_the_same_version(n: int) -> None:
    v = ver.parse(V[n])
    assert v.name == V[n]
    again = ver.parse(v.spec())
    assert again == v and again.name == V[n]
    by_names = ver.parse(
        f"vhost-net:features={'+'.join(v.feature_names())},queue-size={v.max_queue_size},"
        f"queue-pairs={v.max_queue_pairs},mtu={'on' if v.mtu else 'off'}"
    )
    assert by_names == v


# --- kernels and their newest version ------------------------------------------------------

#: (release, VHOST_GET_FEATURES, tap offloads, multiqueue tap, newest version), reference §2/§4
KERNEL_HISTORY = [
    ("2.6.34", 0x1D000000, BASIC_OFFLOADS, False, 1),
    ("2.6.36", 0x1D008000, BASIC_OFFLOADS, False, 2),
    ("3.0", 0x3D008000, BASIC_OFFLOADS, False, 3),
    ("3.9", 0x3D008000, BASIC_OFFLOADS, True, 4),
    ("3.19", 0x13D008000, BASIC_OFFLOADS, True, 5),
    ("4.8", 0x33D008000, BASIC_OFFLOADS, True, 5),
    ("6.1", 0x33D008000, BASIC_OFFLOADS, True, 5),
    ("6.2", 0x33D008000, [*BASIC_OFFLOADS, "USO"], True, 6),
    ("6.3", 0x1033D008000, [*BASIC_OFFLOADS, "USO"], True, 7),
    ("6.12", 0x1033D008000, [*BASIC_OFFLOADS, "USO"], True, 7),
    (
        "6.17",
        0x10B3D008000 | (0xA << 64),
        [*BASIC_OFFLOADS, "USO", "UDP_TUNNEL_GSO", "UDP_TUNNEL_GSO_CSUM"],
        True,
        8,
    ),
]


@pytest.mark.parametrize(("release", "vhost", "offloads", "mq", "newest"), KERNEL_HISTORY)
def test_each_kernel_has_a_well_defined_newest_version(
    release: str, vhost: int, offloads: list[str], mq: bool, newest: int
) -> None:
    tunf = TUN_FEATURES_61 if mq else TUN_FEATURES_61 & ~0x100
    offer = ver.host_offer(Probe.from_json(probe_json(release, vhost, offloads, tun_features=tunf)))
    assert ver.latest(offer).name == V[newest]
    assert [v.name for v in ver.supported(offer)] == [V[n] for n in range(1, newest + 1)]


def test_61_and_612_differ_and_the_list_only_grows() -> None:
    o61, o612 = ver.host_offer(probe_61()), ver.host_offer(probe_612())
    assert ver.latest(o61).name == V[5]
    assert ver.latest(o612).name == V[7]
    assert set(ver.supported(o61)) < set(ver.supported(o612))
    assert ver.missing(ver.parse(V[7]), o61) == [
        "missing feature bits RING_RESET, GUEST_USO4, GUEST_USO6, HOST_USO"
    ]


def test_offer_masks_plumbing_and_unservable_bits() -> None:
    offer = ver.host_offer(probe_61())
    assert offer.features & fb.mask(["LOG_ALL", "ACCESS_PLATFORM"]) == 0
    assert offer.unservable == fb.bit("ACCESS_PLATFORM")
    assert offer.features & fb.mask(["MRG_RXBUF", "VERSION_1", "CSUM", "HOST_UFO", "MQ"]) == (
        fb.mask(["MRG_RXBUF", "VERSION_1", "CSUM", "HOST_UFO", "MQ"])
    )
    assert offer.max_queue_pairs == ver.MULTIQUEUE_TAP_PAIRS
    assert offer.max_queue_size == 32768
    # a version that wants ACCESS_PLATFORM names why it cannot be served
    wanted = ver.parse(
        f"vhost-net:features=0x{ver.parse(V[5]).features:x}+ACCESS_PLATFORM,"
        "queue-size=1024,queue-pairs=8,mtu=on"
    )
    (reason,) = ver.missing(wanted, offer)
    assert "ACCESS_PLATFORM (the kernel offers it but kvhost's shim does no IOTLB" in reason


def test_tunnel_bits_need_both_vhost_net_and_the_tap() -> None:
    assert ver.latest(ver.host_offer(probe_617())).name == V[8]
    # the tap accepts tunnel GSO but this vhost-net cannot size the tunnel header
    p = Probe.from_json(probe_json("x", 0x10B3D008000, [*BASIC_OFFLOADS, "USO", "UDP_TUNNEL_GSO"]))
    offer = ver.host_offer(p)
    assert offer.features & ver.TUNNEL_BITS == 0
    assert ver.latest(offer).name == V[7]
    (reason,) = ver.missing(ver.parse(V[8]), offer)
    assert "GUEST_UDP_TUNNEL_GSO" in reason and "HOST_UDP_TUNNEL_GSO" in reason
    # GSO_CSUM tunnel bits: the tap has them but vhost-net never advertised them
    assert ver.host_offer(probe_617()).features & fb.bit("GUEST_UDP_TUNNEL_GSO_CSUM") == 0


def test_host_without_devices_serves_nothing_and_says_why() -> None:
    sentence = "/dev/vhost-net is not available because the vhost_net kernel module is not loaded"
    p = Probe.from_json(probe_json("6.1", None, [], vhost_error=sentence))
    offer = ver.host_offer(p)
    assert ver.supported(offer) == []
    with pytest.raises(VersionError, match=r"serves no interface version.*vhost_net kernel module"):
        ver.latest(offer)
    assert ver.missing(ver.parse(V[1]), offer) == [sentence]
    no_offload_probe = Probe.from_json(
        probe_json("6.1", 0x33D008000, [], tun_error="cannot probe tap offloads: EPERM")
    )
    assert ver.missing(ver.parse(V[1]), ver.host_offer(no_offload_probe)) == [
        "cannot probe tap offloads: EPERM"
    ]


def test_limits_fall_short_by_name() -> None:
    single = Probe.from_json(
        probe_json("3.0", 0x3D008000, BASIC_OFFLOADS, tun_features=TUN_FEATURES_61 & ~0x100)
    )
    reasons = ver.missing(ver.parse(V[4]), ver.host_offer(single))
    assert reasons == [
        "missing feature bits MQ",
        "8 queue pairs exceed this host's 1 (its tap has no IFF_MULTI_QUEUE)",
    ]
    big = ver.parse(V[5]).spec().replace("queue-pairs=8", "queue-pairs=16")
    assert ver.missing(ver.parse(big), ver.host_offer(probe_61())) == [
        "16 queue pairs exceed this host's 8"
    ]


def test_serve_features_is_exactly_the_version_plus_mtu() -> None:
    v5 = ver.parse(V[5])
    served = ver.serve_features(v5)
    assert served == v5.features | fb.bit("MTU")
    assert served & (fb.LOG_ALL | fb.PROTOCOL_FEATURES) == 0
    no_mtu = ver.parse(v5.spec().replace("mtu=on", "mtu=off"))
    assert ver.serve_features(no_mtu) == v5.features
    assert no_mtu.name is None  # not a registry entry


# --- the value-list grammar -----------------------------------------------------------------


def test_value_list_spellings() -> None:
    v = ver.parse(
        " vhost-net: mtu=off , queue-pairs=1,queue-size=256,"
        "features=virtio_net_f_mrg_rxbuf+0x10000000+EVENT_IDX "
    )
    assert v.features == fb.mask(["MRG_RXBUF", "INDIRECT_DESC", "EVENT_IDX"])
    assert (v.max_queue_size, v.max_queue_pairs, v.mtu) == (256, 1, False)
    assert v.spec() == "vhost-net:features=0x30008000,queue-size=256,queue-pairs=1,mtu=off"


def test_bits_above_63_are_expressible_both_ways() -> None:
    hexed = ver.parse(
        f"vhost-net:features=0x{(1 << 65) | (1 << 67) | fb.bit('CSUM'):x},queue-size=1024,"
        "queue-pairs=1,mtu=on"
    )
    named = ver.parse(
        "vhost-net:features=CSUM+GUEST_UDP_TUNNEL_GSO+HOST_UDP_TUNNEL_GSO,queue-size=1024,"
        "queue-pairs=1,mtu=on"
    )
    assert hexed == named
    assert hexed.features >> 64 == 0xA
    assert "0xa0000000000000001" in hexed.spec()


BAD = [
    ("org.kernel.vhost-net.v99", "unknown interface version 'org.kernel.vhost-net.v99'"),
    ("", "empty interface version"),
    ("dpdk:features=0x1,queue-size=1,queue-pairs=1,mtu=on", "for backend 'dpdk'"),
    ("vhost-net:features", "is not key=value"),
    ("vhost-net:features=0x1,queue-size=1024,queue-pairs=1,mtu=on,speed=10", "unknown key 'speed'"),
    ("vhost-net:features=0x1,features=0x1,queue-size=1024,queue-pairs=1,mtu=on", "appears twice"),
    ("vhost-net:features=0x1,queue-size=1024", "lacks queue-pairs, mtu"),
    (
        "vhost-net:features=CSUM+WARP_DRIVE,queue-size=1024,queue-pairs=1,mtu=on",
        "unknown feature bit name 'WARP_DRIVE'",
    ),
    ("vhost-net:features=0xzz,queue-size=1024,queue-pairs=1,mtu=on", "'0xzz'"),
    ("vhost-net:features=CSUM++MQ,queue-size=1024,queue-pairs=1,mtu=on", "empty term"),
    (
        "vhost-net:features=CSUM,queue-size=1000,queue-pairs=1,mtu=on",
        "queue-size=1000 must be a power of two from 1 to 32768",
    ),
    ("vhost-net:features=CSUM,queue-size=65536,queue-pairs=1,mtu=on", "queue-size=65536"),
    ("vhost-net:features=CSUM,queue-size=0,queue-pairs=1,mtu=on", "queue-size=0"),
    ("vhost-net:features=CSUM,queue-size=1k,queue-pairs=1,mtu=on", "not a decimal number"),
    ("vhost-net:features=MQ,queue-size=1024,queue-pairs=0,mtu=on", "queue-pairs=0 must be"),
    ("vhost-net:features=MQ,queue-size=1024,queue-pairs=40000,mtu=on", "queue-pairs=40000"),
    ("vhost-net:features=CSUM,queue-size=1024,queue-pairs=2,mtu=on", "needs the MQ bit"),
    (
        "vhost-net:features=CSUM+LOG_ALL,queue-size=1024,queue-pairs=1,mtu=on",
        "LOG_ALL cannot be part of a version",
    ),
    (
        "vhost-net:features=0x40000000,queue-size=1024,queue-pairs=1,mtu=on",
        "PROTOCOL_FEATURES cannot be part of a version",
    ),
    ("vhost-net:features=MTU,queue-size=1024,queue-pairs=1,mtu=on", "written mtu=on"),
    (
        "vhost-net:features=CSUM+CTRL_VQ+MAC,queue-size=1024,queue-pairs=1,mtu=on",
        "MAC, CTRL_VQ are not bits a vhost-net backend provides",
    ),
    (f"vhost-net:features=0x{1 << 130:x},queue-size=1024,queue-pairs=1,mtu=on", "above 127"),
    ("vhost-net:features=CSUM,queue-size=1024,queue-pairs=1,mtu=maybe", "must be on or off"),
]


@pytest.mark.parametrize(("text", "fragment"), BAD)
def test_bad_versions_say_what_is_wrong_and_list_the_known_ones(text: str, fragment: str) -> None:
    with pytest.raises(VersionError) as info:
        ver.parse(text)
    msg = str(info.value)
    assert fragment in msg
    assert "\n" not in msg
    assert f"known versions are {', '.join(V[n] for n in range(1, 9))}" in msg
