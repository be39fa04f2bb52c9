"""Domain XML rendering: golden files, escaping, user templates, and libvirt's test driver."""

from __future__ import annotations

import os
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest

from orchestrator.guests.domains import (
    METADATA_NS,
    PASST_MIN_LIBVIRT_VERSION,
    DiskBoot,
    DomainSpec,
    KernelBoot,
    NamedNet,
    NoNet,
    UserNet,
    mac_for_uuid,
    parse_metadata,
    render_domain_xml,
    user_net_backend,
)
from orchestrator.errors import ProvisionError

GOLDEN = Path(__file__).parent / "data" / "domains"
NASTY = "a&b<c>'d\""

libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


def kvm_direct_kernel_user_net() -> DomainSpec:
    return DomainSpec(
        name="ksmlab-idle-0",
        uuid="6b1c1f3e-2a7f-4c55-9e55-0d0c2f6c4a01",
        study="idle",
        domain_type="kvm",
        arch="x86_64",
        machine="q35",
        emulator=Path("/usr/bin/qemu-system-x86_64"),
        memory_mib=1024,
        vcpus=1,
        overlay_path=Path("/var/lib/ksm-lab/work/idle/idle-0-6b1c1f3e.qcow2"),
        console_log_path=Path("/var/lib/ksm-lab/work/idle/idle-0-6b1c1f3e.console.log"),
        boot=KernelBoot(
            kernel=Path("/var/lib/ksm-lab/images/debian-sysbench-0123456789ab/vmlinuz"),
            initrd=Path("/var/lib/ksm-lab/images/debian-sysbench-0123456789ab/initrd.img"),
            cmdline="root=/dev/vda rw console=ttyS0",
        ),
        network=UserNet(host_port=40022),
    )


def qemu_knobs() -> DomainSpec:
    return DomainSpec(
        name="ksmlab-knobs-1",
        uuid="0f0e0d0c-0b0a-4908-8706-050403020100",
        study="knobs",
        domain_type="qemu",
        arch="x86_64",
        memory_mib=2048,
        vcpus=2,
        overlay_path=Path("/work/knobs/knobs-1.qcow2"),
        console_log_path=Path("/work/knobs/knobs-1.console.log"),
        boot=DiskBoot(),
        network=UserNet(host_port=40023, backend="passt"),
        nosharepages=True,
        hugepages=True,
        vcpu_pins=("0", "1-2"),
        numa_node=0,
    )


def named_network() -> DomainSpec:
    guest_uuid = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"
    return DomainSpec(
        name="ksmlab-lab-2",
        uuid=guest_uuid,
        study="lab",
        domain_type="kvm",
        arch="x86_64",
        memory_mib=512,
        vcpus=1,
        overlay_path=Path("/work/lab/lab-2.qcow2"),
        console_log_path=Path("/work/lab/lab-2.console.log"),
        boot=KernelBoot(kernel=Path("/img/vmlinuz"), initrd=None, cmdline="root=/dev/vda rw"),
        network=NamedNet(network="ksmlab-net", mac=mac_for_uuid(guest_uuid)),
    )


@pytest.mark.parametrize(
    ("spec_factory", "golden"),
    [
        (kvm_direct_kernel_user_net, "kvm-direct-kernel-user-net.xml"),
        (qemu_knobs, "qemu-nosharepages-hugepages-pins-numa-passt.xml"),
        (named_network, "kvm-named-network.xml"),
    ],
)
def test_rendered_xml_matches_expected_file(spec_factory, golden: str) -> None:
    rendered = render_domain_xml(spec_factory())
    if os.environ.get("KSM_LAB_REGENERATE_GOLDEN"):
        (GOLDEN / golden).write_text(rendered)
    assert rendered == (GOLDEN / golden).read_text()


def test_user_net_forwards_loopback_port_to_guest_ssh_through_qemu_commandline() -> None:
    root = ET.fromstring(render_domain_xml(kvm_direct_kernel_user_net()))
    qemu_ns = "{http://libvirt.org/schemas/domain/qemu/1.0}"
    args = [a.get("value") for a in root.iter(f"{qemu_ns}arg")]
    assert args == [
        "-netdev",
        "user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:40022-:22",
        "-device",
        "virtio-net-pci,netdev=n0,bus=pcie.0,addr=0x10",
    ]
    assert root.find("devices/interface") is None


def test_passt_port_forward_maps_host_port_to_guest_22() -> None:
    root = ET.fromstring(render_domain_xml(qemu_knobs()))
    forward = root.find("devices/interface[@type='user']/portForward")
    assert forward is not None and forward.get("address") == "127.0.0.1"
    assert forward.find("range").attrib == {"start": "40023", "to": "22"}
    assert root.find("{http://libvirt.org/schemas/domain/qemu/1.0}commandline") is None


def test_passt_only_when_asked_and_libvirt_is_new_enough() -> None:
    assert user_net_backend(9_000_000, want_passt=True) == "qemu-commandline"
    assert user_net_backend(PASST_MIN_LIBVIRT_VERSION, want_passt=True) == "passt"
    assert user_net_backend(10_000_000, want_passt=False) == "qemu-commandline"


def test_names_and_paths_with_xml_special_characters_round_trip() -> None:
    spec = DomainSpec(
        name=f"ksmlab-{NASTY}-0",
        uuid=str(uuid.uuid4()),
        study=NASTY,
        domain_type="test",
        arch="i686",
        memory_mib=128,
        vcpus=1,
        overlay_path=Path(f"/tmp/{NASTY}.qcow2"),
        console_log_path=Path(f"/tmp/{NASTY}.log"),
        boot=KernelBoot(Path("/k"), None, "console=ttyS0 x='1' y=\"2\" a&b"),
        network=NoNet(),
    )
    root = ET.fromstring(render_domain_xml(spec))
    assert root.findtext("name") == f"ksmlab-{NASTY}-0"
    assert root.findtext("os/cmdline") == "console=ttyS0 x='1' y=\"2\" a&b"
    assert root.find("devices/disk/source").get("file") == f"/tmp/{NASTY}.qcow2"
    meta = root.find(f"metadata/{{{METADATA_NS}}}guest")
    assert meta.findtext(f"{{{METADATA_NS}}}study") == NASTY


def test_missing_variable_in_user_template_names_template_and_variable(tmp_path: Path) -> None:
    template = tmp_path / "mine.xml.j2"
    template.write_text("<domain type='{{ domain_type }}'><name>{{ guest_colour }}</name></domain>\n")
    with pytest.raises(ProvisionError) as caught:
        render_domain_xml(kvm_direct_kernel_user_net(), template)
    assert str(template) in str(caught.value)
    assert "guest_colour" in str(caught.value)


def test_user_template_rendering_broken_xml_is_refused(tmp_path: Path) -> None:
    template = tmp_path / "broken.xml.j2"
    template.write_text("<domain><name>{{ name }}</domain>\n")
    with pytest.raises(ProvisionError, match=r"broken\.xml\.j2 rendered invalid XML"):
        render_domain_xml(kvm_direct_kernel_user_net(), template)


def test_user_template_can_include_default_partials(tmp_path: Path) -> None:
    template = tmp_path / "tiny.xml.j2"
    template.write_text(
        "<domain type='{{ domain_type }}'><name>{{ name }}</name>{% include '_metadata.xml.j2' %}</domain>\n"
    )
    root = ET.fromstring(render_domain_xml(kvm_direct_kernel_user_net(), template))
    assert root.find(f"metadata/{{{METADATA_NS}}}guest") is not None


def test_missing_template_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ProvisionError, match="does not exist"):
        render_domain_xml(kvm_direct_kernel_user_net(), tmp_path / "nope.xml.j2")


def test_pin_count_must_match_vcpus() -> None:
    with pytest.raises(ProvisionError, match="1 vCPU pins for 2 vCPUs"):
        DomainSpec(**{**qemu_knobs().__dict__, "vcpu_pins": ("0",)})


def test_mac_for_uuid_is_stable_and_locally_administered() -> None:
    mac = mac_for_uuid("9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d")
    assert mac == mac_for_uuid("9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d")
    assert mac.startswith("52:54:00:") and len(mac) == 17
    assert mac != mac_for_uuid(str(uuid.uuid4()))


def test_test_driver_accepts_rendered_xml_and_keeps_our_metadata() -> None:
    spec = DomainSpec(
        **{
            **kvm_direct_kernel_user_net().__dict__,
            "name": f"ksmlab-{NASTY}-0",
            "study": NASTY,
            "uuid": str(uuid.uuid4()),
            "domain_type": "test",
            "arch": "i686",
            "machine": None,
            "emulator": None,
        }
    )
    with libvirt.open("test:///default") as conn:
        dom = conn.defineXML(render_domain_xml(spec))
        try:
            assert dom.name() == f"ksmlab-{NASTY}-0"
            meta = parse_metadata(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS))
            assert meta.study == NASTY
            assert meta.overlay_path == spec.overlay_path
            assert meta.console_log_path == spec.console_log_path
        finally:
            dom.undefine()
