"""libvirt domain XML: record a VM's interface version and pin its native vhost-net NICs.

Management records the version once, at creation, in the domain's ``<metadata>``; the XML
then carries it wherever libvirt sends the VM (define, save images, migration streams), and
the hook (:mod:`kvhost.libvirt_hook`) reads it back on every host::

    <domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
      <metadata>
        <kvhost:net xmlns:kvhost='https://kvhost.io/xmlns/domain/1'
                    interface-version='org.kernel.vhost-net.v5'/>
      </metadata>
      <devices>
        <interface type='vhostuser'>              served by kvhost-shim: the hook starts
          <source type='unix' path='/run/kvhost/vm1.sock' mode='client'/>   it at that version
        </interface>
        <interface type='bridge'>                 QEMU's own vhost-net: pinned here, once
          <driver name='vhost' event_idx='on' rx_queue_size='1024'>
            <host csum='on' tso4='on' .../>       libvirt's names for the host_* properties
            <guest csum='on' tso4='on' .../>      and for the guest_* ones
          </driver>
          <alias name='ua-kvhost-net1'/>          the override below needs a user alias
        </interface>
      </devices>
      <qemu:override>                             everything libvirt has no attribute for
        <qemu:device alias='ua-kvhost-net1'>
          <qemu:frontend>
            <qemu:property name='queue_reset' type='bool' value='false'/>
            ...

The properties are exactly those of ``kvhost qemu-args VERSION`` (:mod:`kvhost.qemu_args`);
this module only says where each one goes in libvirt's terms. ``<qemu:override>`` needs
libvirt 8.2 or newer.

Stamping is a pure function of the XML text, the version and the QEMU property set: it never
probes or writes anything. The document is re-serialised in libvirt's own style (single
quotes, ``<x/>``, namespace declarations where the input had them), so ``virsh dumpxml``
output comes back byte for byte apart from what kvhost changes.
"""

from __future__ import annotations

import io
import re
import xml.etree.ElementTree as ET
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kvhost import features as fb
from kvhost import qemu_args
from kvhost import versions as ver
from kvhost.errors import UsageError, VersionError

KVHOST_NS = "https://kvhost.io/xmlns/domain/1"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
#: the prefixes kvhost writes (and registers, so ElementTree's own output stays readable)
PREFIXES = {KVHOST_NS: "kvhost", QEMU_NS: "qemu"}
for _uri, _prefix in PREFIXES.items():
    ET.register_namespace(_prefix, _uri)

#: where kvhost-shim sockets live; a vhost-user interface elsewhere is someone else's backend
SOCKET_DIR = Path("/run/kvhost")
#: interface types whose ``<driver name='vhost'>`` means QEMU opens /dev/vhost-net itself
NATIVE_TYPES = ("ethernet", "network", "bridge")
#: libvirt keeps only aliases with this prefix in a defined (inactive) domain
USER_ALIAS_PREFIX = "ua-"
#: models libvirt runs as virtio-net-pci-transitional / -non-transitional: those QEMU devices
#: fix the legacy/modern choice themselves and have no property for it (QEMU refuses to
#: start: "Property 'virtio-net-pci-non-transitional.disable-modern' not found")
FIXED_INTERFACE_MODELS = ("virtio-transitional", "virtio-non-transitional")
MODERN_PROPERTIES = ("disable-modern", "disable-legacy")

#: QEMU property -> (element under <driver>, or "driver" itself; libvirt attribute)
LIBVIRT_ATTRS: dict[str, tuple[str, str]] = {
    "csum": ("host", "csum"),
    "host_tso4": ("host", "tso4"),
    "host_tso6": ("host", "tso6"),
    "host_ecn": ("host", "ecn"),
    "host_ufo": ("host", "ufo"),
    "mrg_rxbuf": ("host", "mrg_rxbuf"),
    "guest_csum": ("guest", "csum"),
    "guest_tso4": ("guest", "tso4"),
    "guest_tso6": ("guest", "tso6"),
    "guest_ecn": ("guest", "ecn"),
    "guest_ufo": ("guest", "ufo"),
    "event_idx": ("driver", "event_idx"),
    "iommu_platform": ("driver", "iommu"),
    # libvirt takes tx_queue_size only for vhost-user, so that one goes through the override
    "rx_queue_size": ("driver", "rx_queue_size"),
}


class DomainXMLError(UsageError):
    """The domain XML given to kvhost is malformed or is not a domain."""


# --- parsing and libvirt-style serialisation -----------------------------------------------

_PROLOG = re.compile(rb"(?:\s*(?:<\?.*?\?>|<!--.*?-->|<!DOCTYPE[^>]*>))*\s*", re.S)


@dataclass
class Document:
    """A parsed domain XML plus what ElementTree forgets: the text before the root element,
    the trailing whitespace, and which element declared which namespace prefix."""

    root: ET.Element
    prolog: bytes = b""
    epilogue: bytes = b""
    #: id(element) -> [(prefix, uri)] declared on it
    declared: dict[int, list[tuple[str, str]]] = field(default_factory=dict)


def parse(data: bytes, source: str = "<stdin>") -> Document:
    """Parse a libvirt domain XML. Raises DomainXMLError naming ``source``."""
    try:
        decls: list[list[tuple[str, str]]] = []
        pending: list[tuple[str, str]] = []
        for event, item in ET.iterparse(io.BytesIO(data), events=("start-ns", "start")):
            if event == "start-ns":
                assert isinstance(item, tuple)
                pending.append((item[0], item[1]))
            else:
                decls.append(pending)
                pending = []
        builder = ET.TreeBuilder(insert_comments=True, insert_pis=True)
        parser = ET.XMLParser(target=builder)
        parser.feed(data)
        root = parser.close()
    except ET.ParseError as err:
        raise DomainXMLError(f"{source} is not well-formed XML: {err}") from None
    if root.tag != "domain":
        raise DomainXMLError(f"{source} is not a libvirt domain: its root element is <{root.tag}>")
    doc = Document(root, _PROLOG.match(data).group(0))  # type: ignore[union-attr]
    doc.epilogue = data[len(data.rstrip()) :]
    elements = [e for e in root.iter() if isinstance(e.tag, str)]
    for element, ns in zip(elements, decls, strict=True):
        if ns:
            doc.declared[id(element)] = ns
    return doc


def _escape(text: str) -> str:
    # what libvirt's virBufferEscapeString does, so its own output comes back unchanged
    return (
        text.replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace("'", "&apos;")
        .replace('"', "&quot;")
    )


def _escape_attr(text: str, quote: str = "'") -> str:
    if quote == '"':  # libxml2's attribute escaping
        text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        text = text.replace('"', "&quot;")
    else:
        text = _escape(text)
    return text.replace("\n", "&#10;").replace("\t", "&#9;")


def _escape_libxml2_text(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def serialize(doc: Document) -> bytes:
    """The document in libvirt's style: single-quoted attributes, ``<x/>``, declarations on
    the elements that had them (new kvhost/qemu elements get theirs where libvirt puts them).
    Inside ``<metadata>`` libvirt hands its elements to libxml2, which writes double quotes
    and escapes less; so does this."""
    out: list[str] = []

    def qname(tag: str, scope: dict[str, str], new: list[tuple[str, str]]) -> str:
        if not tag.startswith("{"):
            return tag
        uri, local = tag[1:].split("}", 1)
        if uri not in scope:
            prefix = PREFIXES.get(uri) or f"ns{len(scope)}"
            scope[uri] = prefix
            new.append((prefix, uri))
        return f"{scope[uri]}:{local}"

    def walk(e: ET.Element, scope: dict[str, str], q: str = "'") -> None:
        text_escape = _escape if q == "'" else _escape_libxml2_text
        tag: object = e.tag  # a str, or ET.Comment / ET.ProcessingInstruction for those nodes
        if tag is ET.Comment:
            out.append(f"<!--{e.text or ''}-->")
        elif tag is ET.ProcessingInstruction:
            out.append(f"<?{e.text or ''}?>")
        else:
            scope = dict(scope)
            new = list(doc.declared.get(id(e), []))
            for prefix, uri in new:
                scope[uri] = prefix
            name = qname(str(e.tag), scope, new)
            attrs = [(qname(k, scope, new), v) for k, v in e.attrib.items()]
            xmlns = [
                f" xmlns{':' if p else ''}{p}={q}{_escape_attr(uri, q)}{q}" for p, uri in new
            ]
            items = [f" {k}={q}{_escape_attr(v, q)}{q}" for k, v in attrs]
            # libvirt writes the root's declarations after its attributes, and metadata
            # elements (libxml2's dump) with the declaration first
            out.append(f"<{name}" + "".join(items + xmlns if e is doc.root else xmlns + items))
            if e.text is None and len(e) == 0:
                out.append("/>")
            else:
                out.append(">")
                out.append(text_escape(e.text or ""))
                inner = '"' if e.tag == "metadata" and e in doc.root else q
                for child in e:
                    walk(child, scope, inner)
                out.append(f"</{name}>")
        out.append(text_escape(e.tail or ""))

    walk(doc.root, {})
    return doc.prolog + "".join(out).encode() + doc.epilogue


# --- reading what a domain holds -----------------------------------------------------------


@dataclass(frozen=True)
class Interface:
    """One ``<interface>`` of a domain, as kvhost sees it."""

    index: int
    type: str
    element: ET.Element
    #: the vhost-user socket path, for type='vhostuser'
    socket: str | None

    @property
    def native(self) -> bool:
        """QEMU opens /dev/vhost-net for it (``<driver name='vhost'>`` on a tap-backed type)."""
        driver = self.element.find("driver")
        model = self.element.find("model")
        return (
            self.type in NATIVE_TYPES
            and driver is not None
            and driver.get("name") == "vhost"
            and (model is None or model.get("type", "").startswith("virtio"))
        )

    def kvhost_socket(self, socket_dir: Path = SOCKET_DIR) -> bool:
        """A vhost-user interface whose socket kvhost-shim serves."""
        return self.socket is not None and Path(self.socket).parent == socket_dir

    @property
    def alias(self) -> str | None:
        a = self.element.find("alias")
        return a.get("name") if a is not None else None


def domain_name(root: ET.Element) -> str:
    name = root.findtext("name")
    return name.strip() if name else "(unnamed domain)"


def interfaces(root: ET.Element) -> list[Interface]:
    out = []
    for i, e in enumerate(root.findall("devices/interface")):
        source = e.find("source")
        kind = e.get("type", "")
        socket = source.get("path") if kind == "vhostuser" and source is not None else None
        out.append(Interface(i, kind, e, socket))
    return out


def _net_element(root: ET.Element) -> ET.Element | None:
    return root.find(f"metadata/{{{KVHOST_NS}}}net")


def recorded(root: ET.Element) -> str | None:
    """The interface version text recorded in the domain, or None when there is none."""
    net = _net_element(root)
    return net.get("interface-version") if net is not None else None


def recorded_version(root: ET.Element, source: str = "the domain") -> ver.InterfaceVersion | None:
    """The recorded version, parsed. Raises VersionError when it is malformed or unknown."""
    text = recorded(root)
    if text is None:
        return None
    try:
        return ver.parse(text)
    except VersionError as err:
        raise VersionError(f"{source} records interface-version {text!r}: {err}") from None


# --- writing -------------------------------------------------------------------------------


def _indent_unit(root: ET.Element) -> str:
    text = root.text or "\n  "
    return text.rsplit("\n", 1)[-1] or "  "


def _child(parent: ET.Element, tag: str, depth: int, unit: str, index: int | None = None,
           attrib: dict[str, str] | None = None) -> ET.Element:
    """Insert a new child element, indented like its siblings (libvirt's layout); ``depth``
    is the parent's nesting depth (the root's is 0)."""
    inner = "\n" + unit * (depth + 1)
    outer = "\n" + unit * depth
    child = ET.Element(tag, attrib or {})
    kids = list(parent)
    if not kids:
        parent.text = inner
        child.tail = outer
        parent.append(child)
        return child
    if index is None or index >= len(kids):
        child.tail = kids[-1].tail
        kids[-1].tail = inner
        parent.append(child)
    else:
        child.tail = inner
        if index == 0:
            parent.text = inner
        parent.insert(index, child)
    return child


def _remove_child(parent: ET.Element, child: ET.Element) -> None:
    """Remove ``child`` and keep :func:`_child`'s layout: the last child's tail indents the
    parent's closing tag, so a removed last child hands it to the one before."""
    kids = list(parent)
    at = kids.index(child)
    if 0 < at == len(kids) - 1:
        kids[at - 1].tail = child.tail
    parent.remove(child)


def _find_or_add(parent: ET.Element, tag: str, depth: int, unit: str,
                 match: dict[str, str] | None = None, index: int | None = None) -> ET.Element:
    for e in parent.findall(tag):
        if all(e.get(k) == v for k, v in (match or {}).items()):
            return e
    return _child(parent, tag, depth, unit, index, dict(match or {}))


def _metadata_index(root: ET.Element) -> int:
    # libvirt writes <metadata> after these; the schema interleaves, but humans read it there
    head = ("name", "uuid", "genid", "title", "description")
    last = -1
    for i, e in enumerate(root):
        if e.tag in head:
            last = i
    return last + 1


def _bool(value: str) -> str:
    return {"on": "true", "off": "false"}.get(value, value)


def pinning(version: ver.InterfaceVersion, available: Collection[str]
            ) -> tuple[dict[tuple[str, str], str], list[tuple[str, str, str]]]:
    """Where each ``qemu-args`` property goes: ``{(element, attribute): 'on'|...}`` for the
    ones libvirt has attributes for, ``[(property, type, value)]`` for the override.
    Raises VersionError when this QEMU cannot offer the version."""
    attrs: dict[tuple[str, str], str] = {}
    override: list[tuple[str, str, str]] = []
    for item in qemu_args.device_properties(version, available):
        prop, _, value = item.partition("=")
        if prop in LIBVIRT_ATTRS:
            attrs[LIBVIRT_ATTRS[prop]] = value
        elif value in ("on", "off"):
            override.append((prop, "bool", _bool(value)))
        else:
            override.append((prop, "unsigned", value))
    return attrs, override


def _model_override(nic: Interface, version: ver.InterfaceVersion,
                    override: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """``override`` as ``nic``'s model can take it. Both fixed models offer the modern
    interface (VERSION_1) whatever the properties say, so a version without it cannot be
    pinned on them: VersionError."""
    model = nic.element.find("model")
    kind = model.get("type") if model is not None else None
    if kind not in FIXED_INTERFACE_MODELS:
        return override
    if not version.features & fb.bit("VERSION_1"):
        raise VersionError(
            f"interface {nic.index} has model {kind!r}, which always offers virtio 1.0 "
            f"(VERSION_1); {version.label} is legacy-only: use model 'virtio'"
        )
    return [o for o in override if o[0] not in MODERN_PROPERTIES]


def check_queues(doc: Document, version: ver.InterfaceVersion) -> None:
    """Raises VersionError when an interface asks for more queue pairs than the version."""
    for nic in interfaces(doc.root):
        driver = nic.element.find("driver")
        queues = driver.get("queues") if driver is not None else None
        if queues and queues.isdigit() and int(queues) > version.max_queue_pairs:
            raise VersionError(
                f"interface {nic.index} of {domain_name(doc.root)} asks for {queues} queues but "
                f"{version.label} allows {version.max_queue_pairs} queue pairs"
            )


def emulator(doc: Document) -> str | None:
    """The domain's ``<devices><emulator>`` path, if it names one: the QEMU that will run the
    VM, so the one whose properties pin it (a fleet may carry several QEMU releases)."""
    text = doc.root.findtext("devices/emulator")
    return text.strip() if text and text.strip() else None


def needs_qemu(doc: Document) -> bool:
    return any(nic.native for nic in interfaces(doc.root))


def stamp(
    doc: Document,
    version: ver.InterfaceVersion,
    available: Collection[str] | None = None,
    *,
    force: bool = False,
    source: str = "the domain",
) -> None:
    """Record ``version`` in ``doc`` and pin its native vhost-net interfaces, in place.

    ``available`` is the QEMU property set (:func:`kvhost.qemu_args.available_properties`);
    it is needed only when the domain has a native interface. Stamping an already stamped
    document with the same version changes nothing. Raises VersionError when the domain
    records another version (unless ``force``) or a malformed one, or when that QEMU cannot
    offer ``version``; UsageError when ``available`` is needed but missing.
    """
    root = doc.root
    unit = _indent_unit(root)
    old = recorded(root)
    if old is not None and not force:
        previous = recorded_version(root, source)
        assert previous is not None
        if not previous.same_interface(version):
            raise VersionError(
                f"{source} already records {previous.label}; refusing to record "
                f"{version.label} instead (--force does, and the VM then needs the new "
                "version's host set)"
            )
    check_queues(doc, version)
    natives = [nic for nic in interfaces(root) if nic.native]
    pins = None
    overrides: list[list[tuple[str, str, str]]] = []
    if natives:
        if available is None:
            raise UsageError("the domain has a native vhost-net interface: name the QEMU to pin")
        pins = pinning(version, available)
        # before anything is written: a refusal leaves the document as it was
        overrides = [_model_override(nic, version, pins[1]) for nic in natives]

    metadata = _find_or_add(root, "metadata", 0, unit, index=_metadata_index(root))
    net = _find_or_add(metadata, f"{{{KVHOST_NS}}}net", 1, unit)
    if old is None or force:  # an equivalent spelling already there is left as written
        net.set("interface-version", version.label)

    if pins is None:
        return
    attrs = pins[0]
    device_xml = _find_or_add(root, f"{{{QEMU_NS}}}override", 0, unit)
    declared = doc.declared.setdefault(id(root), [])
    if not any(uri == QEMU_NS for _, uri in declared):
        declared.append(("qemu", QEMU_NS))
    taken = {nic.alias for nic in interfaces(root)}
    for nic, override in zip(natives, overrides, strict=True):
        alias = _user_alias(nic, unit, taken)
        driver = nic.element.find("driver")
        assert driver is not None
        for (where, attr), value in attrs.items():
            target = driver if where == "driver" else _find_or_add(driver, where, 3, unit)
            target.set(attr, value)
        dev = _find_or_add(device_xml, f"{{{QEMU_NS}}}device", 1, unit, {"alias": alias})
        frontend = _find_or_add(dev, f"{{{QEMU_NS}}}frontend", 2, unit)
        # what the pin sets elsewhere but this model cannot take, an earlier stamp may have
        # written: it goes
        stale = {o[0] for o in pins[1]} - {o[0] for o in override}
        for p in frontend.findall(f"{{{QEMU_NS}}}property"):
            if p.get("name") in stale:
                _remove_child(frontend, p)
        for prop, kind, value in override:
            p = _find_or_add(frontend, f"{{{QEMU_NS}}}property", 3, unit, {"name": prop})
            p.set("type", kind)
            p.set("value", value)


def _user_alias(nic: Interface, unit: str, taken: set[str | None]) -> str:
    # A defined domain keeps only ua- aliases; a running domain's 'net0' would be dropped at
    # define and the override would then match nothing.
    current = nic.alias
    if current and current.startswith(USER_ALIAS_PREFIX):
        return current
    alias = f"{USER_ALIAS_PREFIX}kvhost-net{nic.index}"
    while alias in taken:
        alias += "x"
    taken.add(alias)
    element = nic.element.find("alias")
    if element is None:
        element = _child(nic.element, "alias", 2, unit)
    element.set("name", alias)
    return alias


def iter_kvhost_interfaces(root: ET.Element, socket_dir: Path = SOCKET_DIR
                           ) -> Iterator[Interface]:
    """The interfaces kvhost serves: shim-backed vhost-user ones and native vhost ones."""
    for nic in interfaces(root):
        if nic.kvhost_socket(socket_dir) or nic.native:
            yield nic


# --- what a host offers ----------------------------------------------------------------------


@dataclass(frozen=True)
class Host:
    """A host a VM must run on: its offer and a label for messages."""

    offer: ver.Offer
    label: str


def this_host(manifest: Path | None = None) -> Host:
    """This host's offer: from ``manifest`` when given, else from the manifest the udev rule
    keeps at /run/kvhost/vhost-net.json, else by probing the kernel. Raises UsageError for an
    unreadable manifest."""
    from kvhost import manifest as mf  # the hook's fast path must not pay for these imports

    path = manifest or (mf.DEFAULT_PATH if mf.DEFAULT_PATH.exists() else None)
    offer, label = mf.host_offer(path)
    return Host(offer, label)


def refusal(version: ver.InterfaceVersion, host: Host) -> str | None:
    """Why ``host`` cannot serve ``version`` (one line naming the missing bits), or None."""
    lack = ver.missing(version, host.offer)
    if not lack:
        return None
    return f"{host.label} cannot serve {version.label}: {'; '.join(lack)}"
