"""``kvhost libvirt stamp``: the version recorded in a domain's metadata, native vhost-net
interfaces pinned in libvirt's terms, byte stability of ``virsh dumpxml`` output, and every
bad input refused with one line and exit 2, nothing written."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from test_versions import V, probe_61, probe_612

from kvhost import features as fb
from kvhost import libvirt as lv
from kvhost import manifest as mf
from kvhost import qemu_args
from kvhost import versions as ver
from kvhost.errors import VersionError
from kvhost.probe import Probe

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data" / "libvirt"
#: every property a QEMU 10.1 has, so the tests do not depend on the installed QEMU
ALL_PROPS = frozenset(p for p, _ in qemu_args.PROPERTY_BITS) | {
    "disable-modern", "disable-legacy", "rx_queue_size", "tx_queue_size", "host_mtu"
}
Q = "{" + lv.QEMU_NS + "}"


def manifest(tmp: Path, name: str, probe: Probe) -> Path:
    path = tmp / name
    mf.write_atomic(path, mf.encode(mf.build(probe)))
    return path


def fake_qemu(tmp: Path, props: frozenset[str] = ALL_PROPS) -> Path:
    """A 'QEMU' that lists ``props`` the way '-device virtio-net-pci,help' does."""
    path = tmp / "qemu"
    lines = "".join(f"  {p}=<bool>\n" for p in sorted(props))
    path.write_text(f"#!/bin/sh\ncat <<'X'\nvirtio-net-pci options:\n{lines}X\n")
    path.chmod(0o755)
    return path


def stamp_cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "kvhost.cli", "libvirt", "stamp", *args],
        input=stdin, capture_output=True, env=env, timeout=60, check=False,
    )


def stamped(data: bytes, version: str, force: bool = False) -> bytes:
    doc = lv.parse(data)
    lv.stamp(doc, ver.parse(version), ALL_PROPS, force=force)
    return lv.serialize(doc)


@pytest.mark.parametrize("name", ["dumpxml-running.xml", "libvirt9-dumpxml.xml"])
def test_dumpxml_output_round_trips_byte_for_byte(name: str) -> None:
    data = (DATA / name).read_bytes()
    assert lv.serialize(lv.parse(data)) == data


def test_real_libvirt_output_of_a_stamped_domain_stamps_to_itself() -> None:
    # libvirt9-dumpxml.xml: 'virsh dumpxml' of a running domain stamped by kvhost, from
    # libvirtd 9.0 in the test VM (tests/test_kernel_libvirt.py writes it each run)
    data = (DATA / "libvirt9-dumpxml.xml").read_bytes()
    assert lv.recorded(lv.parse(data).root) == V[5]
    assert stamped(data, V[5]) == data


def test_vhostuser_domain_gets_only_the_metadata_element() -> None:
    before = (DATA / "vhostuser.xml").read_bytes()
    after = stamped(before, V[5])
    assert lv.recorded(lv.parse(after).root) == V[5]
    added = set(after.decode().splitlines()) - set(before.decode().splitlines())
    assert added == {
        "  <metadata>",
        # libvirt writes <metadata>'s content through libxml2: double quotes
        '    <kvhost:net xmlns:kvhost="https://kvhost.io/xmlns/domain/1" '
        f'interface-version="{V[5]}"/>',
        "  </metadata>",
    }
    assert b"qemu:" not in after


def test_native_interface_is_pinned_like_qemu_args() -> None:
    after = lv.parse(stamped((DATA / "native.xml").read_bytes(), V[5]))
    version = ver.parse(V[5])
    want = dict(p.split("=") for p in qemu_args.device_properties(version, ALL_PROPS))
    bridge, e1000 = lv.interfaces(after.root)
    driver = bridge.element.find("driver")
    assert driver is not None and driver.get("queues") == "4"
    got: dict[str, str] = {}
    for prop, (where, attr) in lv.LIBVIRT_ATTRS.items():
        el = driver if where == "driver" else driver.find(where)
        assert el is not None
        got[prop] = el.get(attr, "")
    alias = bridge.alias
    assert alias is not None and alias.startswith("ua-")
    dev = after.root.find(f"{Q}override/{Q}device[@alias='{alias}']/{Q}frontend")
    assert dev is not None
    for p in dev:
        value = p.get("value", "")
        got[p.get("name", "")] = {"true": "on", "false": "off"}.get(value, value)
    assert got == want
    assert e1000.element.find("driver") is None and e1000.alias is None  # not vhost: untouched


def test_dumpxml_interface_keeps_everything_else() -> None:
    before = (DATA / "dumpxml-running.xml").read_bytes()
    after = stamped(before, V[5]).decode()
    for line in ("<seclabel type='dynamic' model='dac' relabel='yes'>", "<alias name='net0'/>",
                 '<app:info xmlns:app="http://example.org/app/1">',
                 "<domain type='kvm' id='7' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>",
                 "<target dev='tap7' managed='no'/>"):
        assert line in after
    # the running domain's 'net1' would not survive 'virsh define': a user alias replaces it
    assert "<alias name='net1'/>" not in after and "<alias name='ua-kvhost-net1'/>" in after
    assert "<qemu:device alias='ua-kvhost-net1'>" in after
    removed = set(before.decode().splitlines()) - set(after.splitlines())
    assert removed == {
        "<domain type='kvm' id='7'>",
        "      <driver name='vhost' rx_queue_size='512'>",
        "        <host csum='off'/>",
        "      <alias name='net1'/>",
    }


@pytest.mark.parametrize("name", ["vhostuser.xml", "native.xml", "dumpxml-running.xml"])
def test_stamping_twice_changes_nothing(name: str) -> None:
    once = stamped((DATA / name).read_bytes(), V[5])
    assert stamped(once, V[5]) == once
    assert stamped(once, ver.parse(V[5]).spec()) == once  # the same interface, spelled out


def test_another_recorded_version_needs_force() -> None:
    once = stamped((DATA / "native.xml").read_bytes(), V[5])
    with pytest.raises(VersionError, match=f"already records {V[5]}.*--force"):
        stamped(once, V[4])
    forced = stamped(once, V[4], force=True)
    root = lv.parse(forced).root
    assert lv.recorded(root) == V[4]
    mq = root.find(f"{Q}override/{Q}device/{Q}frontend/{Q}property[@name='queue_reset']")
    assert mq is not None and mq.get("value") == "false"
    assert forced.count(b"<qemu:override>") == 1 and forced.count(b"<alias ") == 1


def test_queues_beyond_the_version_are_refused() -> None:
    with pytest.raises(VersionError, match=r"asks for 4 queues but .*v3 allows 1"):
        stamped((DATA / "native.xml").read_bytes(), V[3])


# --- the command -------------------------------------------------------------------------


def test_cli_default_is_this_hosts_latest(tmp_path: Path) -> None:
    host = manifest(tmp_path, "612.json", probe_612())
    out = tmp_path / "out.xml"
    done = stamp_cli(str(DATA / "vhostuser.xml"), "-o", str(out), "--host-manifest", str(host))
    assert done.returncode == 0, done.stderr
    assert lv.recorded(lv.parse(out.read_bytes()).root) == V[7]
    assert done.stderr.decode().strip().endswith(f"recorded {V[7]}")


def test_cli_manifests_give_compats_answer(tmp_path: Path) -> None:
    hosts = [str(manifest(tmp_path, "612.json", probe_612())),
             str(manifest(tmp_path, "61.json", probe_61()))]
    want = mf.compat([mf.read(h) for h in hosts]).version
    done = stamp_cli("-", "--manifest", *hosts, stdin=(DATA / "vhostuser.xml").read_bytes())
    assert done.returncode == 0, done.stderr
    assert want is not None and lv.recorded(lv.parse(done.stdout).root) == want.label == V[5]


def test_cli_native_domain_asks_the_named_qemu(tmp_path: Path) -> None:
    host = manifest(tmp_path, "61.json", probe_61())
    qemu = fake_qemu(tmp_path)
    done = stamp_cli(str(DATA / "native.xml"), "--host-manifest", str(host), "--qemu", str(qemu))
    assert done.returncode == 0, done.stderr
    assert b"<qemu:property name='queue_reset' type='bool' value='false'/>" in done.stdout


def test_cli_refuses_a_version_the_host_lacks_naming_bits(tmp_path: Path) -> None:
    host = manifest(tmp_path, "61.json", probe_61())
    out = tmp_path / "out.xml"
    done = stamp_cli(str(DATA / "vhostuser.xml"), "-o", str(out), "--host-manifest", str(host),
                     "--version", V[7])
    err = done.stderr.decode()
    assert done.returncode == 2 and len(err.splitlines()) == 1
    assert f"cannot serve {V[7]}" in err and "RING_RESET" in err and "61.json" in err
    assert not out.exists()


def test_cli_without_vhost_net_says_so(tmp_path: Path) -> None:
    if Path("/dev/vhost-net").exists() or mf.DEFAULT_PATH.exists():
        pytest.skip("this host has vhost-net or a manifest: the probe path is not the error one")
    done = stamp_cli(str(DATA / "vhostuser.xml"))
    assert done.returncode == 2
    assert b"serves no interface version" in done.stderr and b"vhost" in done.stderr


@pytest.mark.parametrize(
    ("data", "extra", "message"),
    [
        (b"<domain><name>x</name>", [], "is not well-formed XML"),
        (b"<network><name>x</name></network>", [], "is not a libvirt domain: its root"),
        (None, ["--version", "org.kernel.vhost-net.v99"], "unknown interface version"),
        (None, ["--version", "vhost-net:features=0x1"], "lacks queue-size"),
        (b"<domain><metadata><kvhost:net xmlns:kvhost='https://kvhost.io/xmlns/domain/1' "
         b"interface-version='bogus'/></metadata></domain>", [], "records interface-version"),
        ("<domain><metadata><kvhost:net xmlns:kvhost='https://kvhost.io/xmlns/domain/1' "
         f"interface-version='{V[4]}'/></metadata></domain>".encode(), ["--version", V[5]],
         f"already records {V[4]}"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2_nothing_written(
    tmp_path: Path, data: bytes | None, extra: list[str], message: str
) -> None:
    host = manifest(tmp_path, "612.json", probe_612())
    src = tmp_path / "in.xml"
    src.write_bytes(data if data is not None else (DATA / "vhostuser.xml").read_bytes())
    out = tmp_path / "out.xml"
    done = stamp_cli(str(src), "-o", str(out), "--host-manifest", str(host), *extra)
    err = done.stderr.decode()
    assert done.returncode == 2, err
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not out.exists() and done.stdout == b""


def test_metadata_lands_after_the_name_block() -> None:
    root = lv.parse(stamped((DATA / "native.xml").read_bytes(), V[5])).root
    assert [e.tag for e in root][:3] == ["name", "description", "metadata"]
    assert isinstance(ET.tostring(root), bytes)  # ElementTree itself still serialises it


def test_cli_native_domain_asks_its_own_emulator(tmp_path: Path) -> None:
    # without --qemu the domain's <emulator> is asked: a 7.2 there cannot offer USO, and the
    # refusal names the property that QEMU lacks
    host = manifest(tmp_path, "612.json", probe_612())
    qemu = fake_qemu(tmp_path, ALL_PROPS - {"host_uso", "guest_uso4", "guest_uso6"})
    xml = (DATA / "native.xml").read_bytes().replace(
        b"<devices>", f"<devices>\n    <emulator>{qemu}</emulator>".encode(), 1)
    done = stamp_cli("-", "--host-manifest", str(host), "--version", V[6], stdin=xml)
    assert done.returncode == 2, done.stdout
    assert "no host_uso property" in done.stderr.decode(), done.stderr
    done = stamp_cli("-", "--host-manifest", str(host), "--version", V[5], stdin=xml)
    assert done.returncode == 0, done.stderr
    assert b"<qemu:property name='queue_reset' type='bool' value='false'/>" in done.stdout


def _as_model(data: bytes, model: str) -> bytes:
    return data.replace(b"<model type='virtio'/>", f"<model type='{model}'/>".encode(), 1)


@pytest.mark.parametrize("model", lv.FIXED_INTERFACE_MODELS)
def test_fixed_models_get_no_modern_legacy_properties(model: str) -> None:
    # libvirt runs these as virtio-net-pci-(non-)transitional, which lack disable-modern:
    # QEMU 7.2 then refused to start a stamped domain ("Property ... not found")
    data = _as_model((DATA / "native.xml").read_bytes(), model)
    assert f"<model type='{model}'/>".encode() in data
    root = lv.parse(stamped(data, V[5])).root
    names = {p.get("name") for p in root.iter(f"{Q}property")}
    assert "queue_reset" in names and not names & set(lv.MODERN_PROPERTIES), names
    # and a domain an earlier kvhost stamped with them loses them on a restamp
    generic = stamped((DATA / "native.xml").read_bytes(), V[5])
    assert b"name='disable-modern'" in generic
    again = stamped(_as_model(generic, model), V[5])
    assert b"disable-modern" not in again and again.count(b"<qemu:property ") == len(names)
    assert stamped(again, V[5]) == again


def test_fixed_models_refuse_a_legacy_only_version() -> None:
    data = _as_model((DATA / "native.xml").read_bytes(), "virtio-non-transitional")
    version = ver.parse(V[4])  # MQ for the domain's 4 queues, but no virtio 1.0 yet
    assert not version.features & fb.bit("VERSION_1")
    doc = lv.parse(data)
    untouched = lv.serialize(lv.parse(data))
    with pytest.raises(VersionError, match=r"always offers virtio 1\.0.*use model 'virtio'"):
        lv.stamp(doc, version, ALL_PROPS)
    assert lv.serialize(doc) == untouched  # refused before anything was written
