"""kvhost's ABI against the kernel's own headers, and against the reference for newer items.

A C program is generated from ``kvhost.abi`` and compiled against the installed uapi headers
(Debian's linux-libc-dev). It prints every ioctl number, constant, ``sizeof`` and ``offsetof``
the headers define; each must equal ours. Items the installed headers are too old to have
(FEATURES_ARRAY, FORK_FROM_OWNER on 6.1 headers) are checked against the values recorded in
``shared/reference/kernel-vhost-uapi.md``, which were computed from 7.1.5 headers.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path
from typing import NamedTuple

import pytest

from kvhost import abi, features

HEADERS = (
    "sys/socket.h",
    "linux/vhost.h",
    "linux/vhost_types.h",
    "linux/if_tun.h",
    "linux/if.h",
    "linux/sockios.h",
    "linux/virtio_net.h",
    "linux/virtio_config.h",
    "linux/virtio_ring.h",
    "linux/netlink.h",
    "linux/rtnetlink.h",
    "linux/if_link.h",
    "linux/sched.h",
    "linux/if_ether.h",
    "linux/if_packet.h",
    "linux/if_arp.h",
    "linux/prctl.h",
    "linux/capability.h",
    "asm/socket.h",
)
REFERENCE = Path(__file__).resolve().parents[2] / "shared/reference/kernel-vhost-uapi.md"

# C spellings of the cffi field names where the kernel hides members behind macros/unions.
C_FIELD = {("ifreq", "ifr_ifru"): "ifr_ifru"}

_CONST_PREFIXES = ("IFF_", "TUN_F_", "VHOST_F_", "VHOST_NET_F_", "VHOST_VRING_F_",
                   "VHOST_BACKEND_F_", "VHOST_PAGE_SIZE", "VHOST_FILE_UNBIND",
                   "VHOST_FORK_OWNER_", "VRING_DESC_F_", "VRING_USED_F_", "VRING_AVAIL_F_",
                   "VIRTIO_NET_HDR_F_NEEDS_CSUM", "VIRTIO_NET_HDR_GSO_NONE", "IFNAMSIZ",
                   "VHOST_VIRTIO", "NLMSG_ERROR", "NLM_F_REQUEST", "RTM_NEWLINK",
                   "RTM_GETLINK", "IFLA_", "NETLINK_ROUTE", "NLA_", "CLONE_NEWNET",
                   "ETH_P_", "ETH_ZLEN", "PACKET_OUTGOING", "PACKET_STATISTICS", "SOL_PACKET",
                   "SO_RCVBUFFORCE", "ARPHRD_", "ARPOP_", "PR_", "_LINUX_CAPABILITY_VERSION_3",
                   "SO_PEERGROUPS", "SO_PEERSEC")
#: constants the headers define as enum members, not macros: printed without #ifdef
_ENUM_PREFIXES = ("IFLA_",)


def _constants() -> dict[str, int]:
    return {
        name: value
        for name, value in vars(abi).items()
        if isinstance(value, int) and name.startswith(_CONST_PREFIXES)
    }


def _feature_macros() -> dict[str, int]:
    out: dict[str, int] = {}
    for b in features.BITS.values():
        if b.kind is features.Kind.NET:
            out[f"VIRTIO_NET_F_{b.name}"] = b.number
        elif b.kind is features.Kind.TRANSPORT:
            out[f"VIRTIO_F_{b.name}"] = b.number
            out[f"VIRTIO_RING_F_{b.name}"] = b.number
    return out


def _c_program() -> str:
    lines = ["#include <stdio.h>", "#include <stddef.h>"]
    lines += [f"#include <{h}>" for h in HEADERS]
    lines.append("int main(void) {")
    for req in abi.ALL_IOCTLS:
        lines.append(f"#ifdef {req.name}\n printf(\"ioctl {req.name} %lu\\n\", "
                     f"(unsigned long){req.name});\n#endif")
    for name in list(_constants()) + list(_feature_macros()):
        show = f' printf("const {name} %ld\\n", (long)({name}));'
        if name.startswith(_ENUM_PREFIXES):
            lines.append(show)
        else:
            lines.append(f"#ifdef {name}\n{show}\n#endif")
    for cstruct, fields in abi.STRUCT_FIELDS.items():
        guard = "VHOST_GET_FEATURES_ARRAY" if cstruct == "vhost_features_array" else None
        if guard:
            lines.append(f"#ifdef {guard}")
        lines.append(f' printf("sizeof {cstruct} %zu\\n", sizeof(struct {cstruct}));')
        for field in fields:
            cname = C_FIELD.get((cstruct, field), field)
            lines.append(f' printf("offsetof {cstruct}.{field} %zu\\n", '
                         f"offsetof(struct {cstruct}, {cname}));")
        if guard:
            lines.append("#endif")
    lines.append(" return 0;\n}")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def header_values(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    cc = shutil.which("gcc") or shutil.which("cc")
    assert cc, "a C compiler is needed for the ABI check: apt-get install gcc"
    assert Path("/usr/include/linux/vhost.h").exists(), (
        "kernel uapi headers missing: apt-get install linux-libc-dev")
    d = tmp_path_factory.mktemp("abi")
    (d / "abi.c").write_text(_c_program())
    subprocess.run([cc, "-o", str(d / "abi"), str(d / "abi.c")], check=True,
                   capture_output=True, text=True)
    out = subprocess.run([str(d / "abi")], check=True, capture_output=True, text=True).stdout
    values: dict[str, int] = {}
    for line in out.splitlines():
        kind, name, value = line.split()
        values[f"{kind} {name}"] = int(value)
    return values


def test_every_ioctl_matches_headers_or_reference(header_values: dict[str, int]) -> None:
    reference = _reference_ioctls()
    unchecked = []
    for req in abi.ALL_IOCTLS:
        key = f"ioctl {req.name}"
        if key in header_values:
            assert header_values[key] == req.number, f"{req.name}: header says " \
                f"0x{header_values[key]:x}, kvhost 0x{req.number:x}"
        if req.name in reference:
            assert reference[req.name] == req.number, f"{req.name}: reference says " \
                f"0x{reference[req.name]:x}, kvhost 0x{req.number:x}"
        if key not in header_values and req.name not in reference:
            unchecked.append(req.name)
    assert not unchecked, f"ioctl numbers checked against nothing: {unchecked}"


def test_newer_ioctls_come_from_reference(header_values: dict[str, int]) -> None:
    # The 6.1 headers lack these; they must still be checked (against the 7.1.5 values).
    newer = [r.name for r in abi.ALL_IOCTLS if f"ioctl {r.name}" not in header_values]
    reference = _reference_ioctls()
    assert all(name in reference for name in newer), newer


def test_constants_match_headers(header_values: dict[str, int]) -> None:
    checked = 0
    for name, value in _constants().items():
        key = f"const {name}"
        if key in header_values:
            assert header_values[key] == value, f"{name}: header {header_values[key]}, ours {value}"
            checked += 1
    assert checked >= 30, f"only {checked} constants found in the headers"


def test_feature_bits_match_headers(header_values: dict[str, int]) -> None:
    checked = 0
    for name, value in _feature_macros().items():
        key = f"const {name}"
        if key in header_values:
            assert header_values[key] == value, f"{name}: header {header_values[key]}, ours {value}"
            checked += 1
    assert checked >= 40, f"only {checked} feature bits found in the headers"


def test_struct_layouts_match_headers(header_values: dict[str, int]) -> None:
    for cstruct, fields in abi.STRUCT_FIELDS.items():
        key = f"sizeof {cstruct}"
        if key not in header_values:
            assert cstruct == "vhost_features_array"
            continue
        assert header_values[key] == abi.sizeof(cstruct), cstruct
        for field in fields:
            assert header_values[f"offsetof {cstruct}.{field}"] == abi.offsetof(cstruct, field), (
                f"{cstruct}.{field}")


def test_features_array_layout_matches_reference() -> None:
    # 7.1.5 (reference §1b): count at 0, features[] at 8, sizeof 8.
    assert abi.sizeof("vhost_features_array") == 8
    assert abi.offsetof("vhost_features_array", "features") == 8


# --- the struct formats against the cffi declarations ---------------------------------------


class Field(NamedTuple):
    offset: int
    size: int
    #: True/False for an integer, None for bytes, padding or anything without a sign
    signed: bool | None


_SIGNED, _UNSIGNED = "bhilqn", "BHILQN"
_TOKEN = re.compile(r"\s*(\d*)([xcbB?hHiIlLqQnNefdspP])\s*")


def format_fields(fmt: str) -> list[Field]:
    """The fields a struct format lays out, as C would see them: ``4s`` is one 4-byte field,
    ``2Q`` two 8-byte ones, a run of ``x`` one padding member of that many bytes. Offsets
    come from ``struct.calcsize`` of the format so far with a zero-count item of the next
    code, so native alignment (``@``) is honoured as well as ``=``."""
    order = fmt[0] if fmt[:1] in ("@", "=", "<", ">", "!") else "@"
    body = fmt[1:] if fmt[:1] == order else fmt
    out: list[Field] = []
    prefix, pos = "", 0
    while pos < len(body):
        token = _TOKEN.match(body, pos)
        assert token is not None, f"struct format {fmt!r}: cannot parse {body[pos:]!r}"
        pos = token.end()
        count_text, code = token.groups()
        count = int(count_text) if count_text else 1
        runs: list[tuple[int, bool | None]]
        if code in "sxp":
            runs = [(count, None)] if count else []
        else:
            size = struct.calcsize(order + code)
            sign = True if code in _SIGNED else False if code in _UNSIGNED else None
            runs = [(size, sign)] * count
        for size, sign in runs:
            offset = struct.calcsize(f"{order}{prefix}0{code}")
            out.append(Field(offset, size, sign))
            prefix += f"{size}{code}" if code in "sxp" else code
    return out


def cffi_fields(name: str) -> list[Field]:
    """``struct NAME``'s members as cffi lays them out, without a trailing flexible array."""
    out: list[Field] = []
    for _member, field in abi.ffi.typeof(f"struct {name}").fields:
        if field.type.kind == "array" and field.type.length is None:
            continue
        sign: bool | None = None
        if field.type.kind == "primitive" and field.type.cname != "char":
            sign = int(abi.ffi.cast(field.type, -1)) < 0
        out.append(Field(field.offset, abi.ffi.sizeof(field.type), sign))
    return out


def format_mismatches(name: str, fmt: struct.Struct) -> list[str]:
    """What differs between ``fmt`` and ``struct NAME``; empty when they agree."""
    ours, theirs = format_fields(fmt.format), cffi_fields(name)
    # a byte run (signed None) may stand for any member of its size: kvhost never reads it
    problems = [
        f"member {i}: format has {a}, struct {name} has {b}"
        for i, (a, b) in enumerate(zip(ours, theirs, strict=False))
        if a[:2] != b[:2] or (a.signed is not None and a.signed != b.signed)
    ]
    if len(ours) != len(theirs):
        problems.append(f"format has {len(ours)} members, struct {name} has {len(theirs)}")
    if fmt.size != abi.sizeof(name):
        problems.append(f"format packs {fmt.size} bytes, sizeof(struct {name}) is "
                        f"{abi.sizeof(name)}")
    return problems


@pytest.mark.parametrize("name", sorted(abi.STRUCT_FORMATS))
def test_struct_format_matches_the_declaration(name: str) -> None:
    fmt = abi.STRUCT_FORMATS[name]
    assert format_mismatches(name, fmt) == [], fmt.format


def test_every_struct_format_in_abi_is_checked() -> None:
    listed = {id(f) for f in abi.STRUCT_FORMATS.values()}
    formats = {n: v for n, v in vars(abi).items() if isinstance(v, struct.Struct)}
    assert formats, "kvhost.abi declares no struct formats any more: drop this test"
    assert [n for n, v in formats.items() if id(v) not in listed] == []


def test_format_fields_counts_repeats_and_byte_runs() -> None:
    assert format_fields("=4s2Q") == [Field(0, 4, None), Field(4, 8, False), Field(12, 8, False)]
    assert format_fields("=BxHi") == [
        Field(0, 1, False), Field(1, 1, None), Field(2, 2, False), Field(4, 4, True),
    ]
    # native alignment: the int after one byte starts at 4
    assert format_fields("@b3xi")[-1] == Field(4, 4, True)
    assert format_fields("@bi")[-1] == Field(4, 4, True)


@pytest.mark.parametrize(
    ("name", "fmt", "problem"),
    [
        ("vhost_vring_addr", "=IIQQQ", "5 members"),  # a field lost
        ("vhost_vring_addr", "=2I3Q", "5 members"),  # the same, with repeat counts
        ("vhost_vring_addr", "=IQQQQI", "member 1"),  # reordered: sizes move
        ("vhost_vring_file", "=II", "member 1"),  # fd unsigned: -1 would not pack
        ("vhost_memory_region", "=QQQQQ", "5 members"),
        ("ifinfomsg", "=BxHIII", "member 3"),  # ifi_index is a signed int
        ("nlmsgerr", "=i15x", "packs 19 bytes"),  # the skipped header one byte short
    ],
)
def test_a_broken_format_is_reported(name: str, fmt: str, problem: str) -> None:
    found = format_mismatches(name, struct.Struct(fmt))
    assert any(problem in p for p in found), found


def test_repeat_counts_describe_the_same_layout() -> None:
    assert format_mismatches("vhost_vring_addr", struct.Struct("=2I4Q")) == []
    assert format_mismatches("vhost_memory_region", struct.Struct("=4Q")) == []


def _reference_ioctls() -> dict[str, int]:
    if not REFERENCE.exists():
        pytest.fail(f"reference {REFERENCE} missing: it ships beside the repo in shared/")
    out: dict[str, int] = {}
    for line in REFERENCE.read_text().splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) < 4 or not re.fullmatch(r"(VHOST|TUN)[A-Z_]+", cells[1]):
            continue
        hexes = [c for c in cells if re.fullmatch(r"0x[0-9a-f]{4,8}", c)]
        if hexes:
            out[cells[1]] = int(hexes[-1], 16)
    return out
