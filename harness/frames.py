"""Test frames: the addresses and ethertype every harness frame uses, and a maker of
unique 60-byte frames."""

from __future__ import annotations

import os

#: IEEE 802 local experimental ethertype: nothing else in the namespace sends it
TEST_ETHERTYPE = 0x88B5
GUEST_MAC = bytes.fromhex("525400aa0001")
PEER_MAC = bytes.fromhex("02000000beef")


def frame(src: bytes, dst: bytes, tag: str) -> bytes:
    """A 60-byte test frame (ethertype 0x88b5) whose payload names ``tag`` uniquely."""
    payload = f"kvhost {tag} {os.urandom(4).hex()}".encode().ljust(46, b".")
    return dst + src + TEST_ETHERTYPE.to_bytes(2, "big") + payload
