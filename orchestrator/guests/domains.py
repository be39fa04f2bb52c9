"""libvirt domain XML from a Jinja template.

The XML is never built with string formatting: every value goes through a Jinja template with
autoescape on (names may hold `&<>'"`) and StrictUndefined (a user template that asks for a
variable we do not provide fails loudly, naming the template and the variable). The rendered
text must parse as XML before anyone hands it to libvirt.

The default template is orchestrator/guests/domain_templates/guest.xml.j2 (shipped in the package);
a plan may point at its own file.
Partials (`{% include %}`) are looked up next to the chosen template first, then in the
default folder, so a user template can reuse `_network.xml.j2` and `_metadata.xml.j2`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import jinja2

from orchestrator.errors import ProvisionError
from orchestrator.guests.kvm import DomainType
from orchestrator.resources import package_file

DEFAULT_TEMPLATE = package_file("guests", "domain_templates", "guest.xml.j2")

# The namespace of our <metadata> element; cleanup recognises our domains by it.
METADATA_NS = "https://ksm-lab.invalid/xmlns/guest/1"
METADATA_PREFIX = "ksmlab"

# libvirt 9.0 rejects <backend type='passt'/> (libvirt issue 462); port forwarding on
# type='user' interfaces needs a newer libvirt and the passt binary.
PASST_MIN_LIBVIRT_VERSION = 9_002_000

UserNetBackend = Literal["qemu-commandline", "passt"]


@dataclass(frozen=True)
class KernelBoot:
    """Direct kernel boot: the guest's kernel and initrd are files on the host."""

    kernel: Path
    initrd: Path | None
    cmdline: str
    kind: Literal["kernel"] = "kernel"


@dataclass(frozen=True)
class DiskBoot:
    """Boot from the overlay's own bootloader."""

    kind: Literal["disk"] = "disk"


@dataclass(frozen=True)
class UserNet:
    """QEMU user networking with one TCP forward host_addr:host_port -> guest:guest_port."""

    host_port: int
    host_addr: str = "127.0.0.1"
    guest_port: int = 22
    backend: UserNetBackend = "qemu-commandline"
    kind: Literal["user"] = "user"


@dataclass(frozen=True)
class NamedNet:
    """A libvirt network by name; the guest's address comes from that network's DHCP lease."""

    network: str
    mac: str
    kind: Literal["network"] = "network"


@dataclass(frozen=True)
class NoNet:
    kind: Literal["none"] = "none"


@dataclass(frozen=True)
class DomainSpec:
    name: str
    uuid: str
    study: str
    domain_type: DomainType
    arch: str
    memory_mib: int
    vcpus: int
    overlay_path: Path
    console_log_path: Path
    boot: KernelBoot | DiskBoot
    network: UserNet | NamedNet | NoNet
    machine: str | None = None
    emulator: Path | None = None
    nosharepages: bool = False
    hugepages: bool = False
    # One host CPU set per vCPU ("0", "0-1", "2,3"); empty = no pinning.
    vcpu_pins: tuple[str, ...] = ()
    numa_node: int | None = None

    def __post_init__(self) -> None:
        if self.vcpu_pins and len(self.vcpu_pins) != self.vcpus:
            raise ProvisionError(f"domain {self.name!r}: {len(self.vcpu_pins)} vCPU pins for {self.vcpus} vCPUs")
        if self.memory_mib <= 0 or self.vcpus <= 0:
            raise ProvisionError(f"domain {self.name!r}: memory_mib={self.memory_mib} vcpus={self.vcpus} must be > 0")


def mac_for_uuid(uuid: str) -> str:
    """A stable locally administered MAC in QEMU's 52:54:00 range, so a lease can be found."""
    digest = hashlib.sha256(uuid.encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


def user_net_backend(libvirt_version: int, want_passt: bool) -> UserNetBackend:
    """passt when the plan asks for it and libvirt can do it; QEMU's own user net otherwise."""
    if want_passt and libvirt_version >= PASST_MIN_LIBVIRT_VERSION:
        return "passt"
    return "qemu-commandline"


def template_context(spec: DomainSpec) -> dict[str, Any]:
    """The variables a template sees (documented at the top of guest.xml.j2)."""
    context = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
    context["boot"] = dataclasses.asdict(spec.boot)
    context["network"] = dataclasses.asdict(spec.network)
    context["vcpu_pins"] = list(spec.vcpu_pins)
    context["metadata_ns"] = METADATA_NS
    context["metadata_prefix"] = METADATA_PREFIX
    return context


def _environment(template_path: Path) -> jinja2.Environment:
    search_path = [str(template_path.parent)]
    if template_path.parent != DEFAULT_TEMPLATE.parent:
        search_path.append(str(DEFAULT_TEMPLATE.parent))
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(search_path),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )


def render_domain_xml(spec: DomainSpec, template_path: Path | None = None) -> str:
    """Render and validate the domain XML for `spec`; ProvisionError names the template."""
    template_path = Path(template_path or DEFAULT_TEMPLATE).resolve()
    if not template_path.is_file():
        raise ProvisionError(f"domain template {template_path} does not exist")
    env = _environment(template_path)
    try:
        xml = env.get_template(template_path.name).render(template_context(spec))
    except jinja2.UndefinedError as exc:
        raise ProvisionError(
            f"domain template {template_path}: {exc.message} (variable not provided by ksm-lab; "
            f"see the variable list at the top of {DEFAULT_TEMPLATE})"
        ) from exc
    except jinja2.TemplateSyntaxError as exc:
        where = exc.filename or template_path
        raise ProvisionError(f"domain template {where}:{exc.lineno}: {exc.message}") from exc
    except jinja2.TemplateNotFound as exc:
        raise ProvisionError(f"domain template {template_path}: include {exc.name} not found") from exc
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        line, column = exc.position
        raise ProvisionError(
            f"domain template {template_path} rendered invalid XML for {spec.name!r} "
            f"at line {line}, column {column}: {exc}"
        ) from exc
    if root.tag != "domain":
        raise ProvisionError(f"domain template {template_path} rendered <{root.tag}>, expected <domain>")
    return xml


def unmergeable_backing(xml: str) -> list[str]:
    """What in a domain's <memoryBacking> keeps KSM from ever merging its RAM (KSM merges only
    private anonymous pages): hugepages (hugetlbfs), a memfd or file source, shared access.
    Each as the element that says it, e.g. "<hugepages/>", "<source type='memfd'/>"."""
    backing = ET.fromstring(xml).find("memoryBacking")
    if backing is None:
        return []
    found = []
    if backing.find("hugepages") is not None:
        found.append("<hugepages/>")
    source = backing.find("source")
    if source is not None and source.get("type") in ("memfd", "file"):
        found.append(f"<source type='{source.get('type')}'/>")
    access = backing.find("access")
    if access is not None and access.get("mode") == "shared":
        found.append("<access mode='shared'/>")
    return found


def template_digest(template_path: Path | None = None) -> str:
    """sha256 over a template and every partial it may include (its folder's and the default
    folder's *.j2): what a saved guest state must be rebuilt for when it changes."""
    chosen = Path(template_path or DEFAULT_TEMPLATE).resolve()
    folders = dict.fromkeys([chosen.parent, DEFAULT_TEMPLATE.parent])
    digest = hashlib.sha256(chosen.read_bytes())
    for folder in folders:
        for partial in sorted(folder.glob("_*.j2")):
            digest.update(partial.name.encode() + partial.read_bytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class DomainMetadata:
    study: str
    overlay_path: Path | None
    console_log_path: Path | None


def parse_metadata(xml: str) -> DomainMetadata:
    """Read our metadata element back (as virDomainGetMetadata returns it)."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise ProvisionError(f"unreadable ksm-lab metadata: {exc}") from exc

    # libvirt hands the element back without its namespace; accept it with or without.
    values = {child.tag.rpartition("}")[2]: child.text for child in root}

    def text(tag: str) -> str | None:
        return values.get(tag) or None

    overlay, console = text("overlay"), text("console")
    return DomainMetadata(
        study=text("study") or "",
        overlay_path=Path(overlay) if overlay else None,
        console_log_path=Path(console) if console else None,
    )


QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
_HOSTFWD = "hostfwd=tcp:"


def restore_xml(
    saved_xml: str, *, study: str, overlay_path: Path, console_log_path: Path, host_port: int | None
) -> str:
    """The domain XML to restore a saved guest with: the XML stored in its save image (libvirt
    checks the ABI against it, so it must keep every default libvirt filled in, and the name and
    uuid), changed only where a trial differs: the disk overlay, the console log, the loopback
    port of the SSH forward and our metadata (the study it now belongs to)."""
    ET.register_namespace("qemu", QEMU_NS)
    ET.register_namespace(METADATA_PREFIX, METADATA_NS)
    try:
        root = ET.fromstring(saved_xml)
    except ET.ParseError as exc:
        raise ProvisionError(f"unreadable domain XML in a saved guest state: {exc}") from exc
    disks = [d for d in root.iter("disk") if d.get("device") == "disk"]
    if len(disks) != 1 or disks[0].find("source") is None:
        raise ProvisionError(
            f"saved guest {root.findtext('name')}: expected one disk with a source, found {len(disks)}"
        )
    source = disks[0].find("source")
    assert source is not None
    source.set("file", str(overlay_path))
    # libvirt records the chain it saw at save time; the new overlay's chain is read afresh.
    for backing in disks[0].findall("backingStore"):
        disks[0].remove(backing)
    for device in ("serial", "console"):
        for element in root.iter(device):
            if element.get("type") == "file" and element.find("source") is not None:
                element.find("source").set("path", str(console_log_path))  # type: ignore[union-attr]
            if element.find("log") is not None:  # the capped log virtlogd writes (guest.xml.j2)
                element.find("log").set("file", str(console_log_path))  # type: ignore[union-attr]
    if host_port is not None:
        args = [a for a in root.iter(f"{{{QEMU_NS}}}arg") if _HOSTFWD in (a.get("value") or "")]
        if len(args) != 1:
            raise ProvisionError(f"saved guest {root.findtext('name')}: no SSH port forward to move")
        value = args[0].get("value") or ""
        head, _, rest = value.partition(_HOSTFWD)
        address, _, tail = rest.partition("-")  # "127.0.0.1:PORT" "-" ":22,..."
        host_addr = address.rsplit(":", 1)[0]
        args[0].set("value", f"{head}{_HOSTFWD}{host_addr}:{host_port}-{tail}")
    metadata = root.find("metadata")
    if metadata is None:
        metadata = ET.SubElement(root, "metadata")
    for old in list(metadata):
        if old.tag.startswith(f"{{{METADATA_NS}}}"):
            metadata.remove(old)
    guest = ET.SubElement(metadata, f"{{{METADATA_NS}}}guest")
    for tag, text in (("study", study), ("overlay", str(overlay_path)), ("console", str(console_log_path))):
        ET.SubElement(guest, f"{{{METADATA_NS}}}{tag}").text = text
    return ET.tostring(root, encoding="unicode")
