"""The registry is append-only: every published entry stays, unchanged, in its place.

A VM records a version name at creation and may be started from it years later; if a name's
meaning changed, that VM would silently get a different interface. To publish a new version,
append it to kvhost/data/versions.json and then append it here; never edit a line below.
"""

from __future__ import annotations

from kvhost import versions as ver

#: name -> the exact interface, as published (append only)
PUBLISHED: tuple[tuple[str, str], ...] = (
    (
        "org.kernel.vhost-net.v1",
        "vhost-net:features=0x19007f83,queue-size=1024,queue-pairs=1,mtu=on",
    ),
    (
        "org.kernel.vhost-net.v2",
        "vhost-net:features=0x1900ff83,queue-size=1024,queue-pairs=1,mtu=on",
    ),
    (
        "org.kernel.vhost-net.v3",
        "vhost-net:features=0x3900ff83,queue-size=1024,queue-pairs=1,mtu=on",
    ),
    (
        "org.kernel.vhost-net.v4",
        "vhost-net:features=0x3940ff83,queue-size=1024,queue-pairs=8,mtu=on",
    ),
    (
        "org.kernel.vhost-net.v5",
        "vhost-net:features=0x13940ff83,queue-size=1024,queue-pairs=8,mtu=on",
    ),
    (
        "org.kernel.vhost-net.v6",
        "vhost-net:features=0x1c000013940ff83,queue-size=1024,queue-pairs=8,mtu=on",
    ),
    (
        "org.kernel.vhost-net.v7",
        "vhost-net:features=0x1c001013940ff83,queue-size=1024,queue-pairs=8,mtu=on",
    ),
    (
        "org.kernel.vhost-net.v8",
        "vhost-net:features=0xa01c001093940ff83,queue-size=1024,queue-pairs=8,mtu=on",
    ),
)


def test_every_published_entry_is_unchanged_and_in_place() -> None:
    reg = ver.registry()
    assert len(reg) >= len(PUBLISHED), "a published version disappeared from the registry"
    for i, (name, spec) in enumerate(PUBLISHED):
        assert reg[i].name == name, f"position {i} should hold {name}, holds {reg[i].name}"
        assert reg[i].spec() == spec, f"{name} changed: was {spec}, is {reg[i].spec()}"


def test_new_entries_only_append_and_names_stay_unique() -> None:
    names = [v.name for v in ver.registry()]
    assert len(set(names)) == len(names)
    specs = [v.spec() for v in ver.registry()]
    assert len(set(specs)) == len(specs), "two names for one interface"
    assert all(n and n.startswith(ver.NAME_PREFIX) for n in names)
