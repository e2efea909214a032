"""Named feature bits: names, parsing, 128-bit words, tap offload mapping."""

from __future__ import annotations

import pytest

from kvhost import abi, features


def test_names_of_debian_kernels_vhost_features() -> None:
    # VHOST_GET_FEATURES measured on Debian's 6.1 and 6.12 kernels (reference §8).
    six_one = features.names(0x33D008000)
    assert six_one == ["MRG_RXBUF", "NOTIFY_ON_EMPTY", "LOG_ALL", "ANY_LAYOUT", "INDIRECT_DESC",
                       "EVENT_IDX", "VERSION_1", "ACCESS_PLATFORM"]
    assert features.names(0x1033D008000) == [*six_one, "RING_RESET"]


def test_bit_accepts_kernel_and_qemu_spellings() -> None:
    assert features.bit("VIRTIO_NET_F_MRG_RXBUF") == 1 << 15
    assert features.bit("virtio_ring_f_event_idx") == 1 << 29
    assert features.bit("IOMMU_PLATFORM") == features.bit("ACCESS_PLATFORM") == 1 << 33
    assert features.bit("HOST_UDP_TUNNEL_GSO") == 1 << 67


def test_unknown_bit_name_is_a_key_error_naming_it() -> None:
    with pytest.raises(KeyError, match="NOT_A_BIT"):
        features.bit("NOT_A_BIT")


def test_unnamed_bits_are_spelled_by_number() -> None:
    assert features.names((1 << 4) | (1 << 70)) == ["BIT_4", "BIT_70"]


def test_words_round_trip_above_bit_63() -> None:
    value = 0x10B3D008000 | (0xA << 64)
    words = features.to_words(value)
    assert words == [0x10B3D008000, 0xA]
    assert features.from_words(words) == value


def test_words_refuse_sets_that_do_not_fit() -> None:
    with pytest.raises(ValueError, match="more than 2"):
        features.to_words(1 << 128)


def test_tap_offload_features_follow_the_accepted_offloads() -> None:
    six_one = features.tap_offload_features(["CSUM", "TSO4", "TSO6", "TSO_ECN", "UFO"])
    assert features.names(six_one) == ["CSUM", "GUEST_CSUM", "GUEST_TSO4", "GUEST_TSO6",
                                       "GUEST_ECN", "GUEST_UFO", "HOST_TSO4", "HOST_TSO6",
                                       "HOST_ECN", "HOST_UFO"]
    with_uso = features.tap_offload_features(["CSUM", "USO"])
    assert with_uso & features.mask(["GUEST_USO4", "GUEST_USO6", "HOST_USO"])


def test_tun_flags_need_guest_csum_like_the_kernel() -> None:
    # Every TSO/USO flag needs TUN_F_CSUM (reference §4, set_offload); without GUEST_CSUM
    # the guest can take no offload at all.
    assert features.tun_flags_for(features.mask(["GUEST_TSO4", "GUEST_UFO"])) == 0
    negotiated = features.mask(["GUEST_CSUM", "GUEST_TSO4", "GUEST_TSO6", "GUEST_ECN"])
    assert features.tun_flags_for(negotiated) == (
        abi.TUN_F_CSUM | abi.TUN_F_TSO4 | abi.TUN_F_TSO6 | abi.TUN_F_TSO_ECN)


def test_uso_is_applied_only_with_both_families() -> None:
    only4 = features.mask(["GUEST_CSUM", "GUEST_USO4"])
    both = only4 | features.bit("GUEST_USO6")
    assert features.tun_flags_for(only4) == abi.TUN_F_CSUM
    assert features.tun_flags_for(both) == abi.TUN_F_CSUM | abi.TUN_F_USO4 | abi.TUN_F_USO6
