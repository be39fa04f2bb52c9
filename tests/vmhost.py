"""What the real-guest tests need of the host: QEMU, a libvirtd answering, the cached image."""

from __future__ import annotations

import shutil
from pathlib import Path

import psutil

import libvirt
import pytest

from orchestrator.guests import images
from orchestrator.guests.domains import METADATA_NS

URI = "qemu:///system"


def need_vm_host() -> images.ImageRef:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("this host cannot run QEMU (no qemu-system-x86_64; run `make host`)")
    try:
        libvirt.open(URI).close()
    except libvirt.libvirtError as exc:
        pytest.fail(f"libvirtd does not answer at {URI}: {exc} (run `make host`)")
    image = images.find_cached(images.DEFAULT_RECIPE)
    if image is None:
        pytest.fail("no guest image: run `python -m orchestrator image build`")
    return image


def study_leftovers(study: str) -> dict[str, list]:
    """Everything of this study's guests that could leak: domains, QEMU processes."""
    with libvirt.open(URI) as conn:
        domains = [d.name() for d in conn.listAllDomains(0) if d.name().startswith(f"ksmlab-{study}")]
    qemus = [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if p.info["cmdline"] and any(f"guest=ksmlab-{study}" in a for a in p.info["cmdline"])
    ]
    return {"domains": domains, "qemu": qemus}


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def studies_guests(*studies: str, workdir: Path | None = None) -> dict[str, list]:
    """Domains whose ksm-lab metadata names one of `studies` (or its -prep builder: restored
    guests keep their saved names), and the QEMU processes running them or, given `workdir`,
    any disk under it."""
    names = []
    with libvirt.open(URI) as conn:
        for dom in conn.listAllDomains(0):
            try:
                meta = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS)
            except libvirt.libvirtError:
                continue
            if any(f">{s}<" in meta or f">{s}-prep<" in meta for s in studies):
                names.append(dom.name())

    def ours(cmdline: list[str]) -> bool:
        if workdir is not None and str(workdir) in " ".join(cmdline):
            return True
        return any(a.startswith("guest=") and a.split(",")[0][6:] in names for a in cmdline)

    qemus = [p.pid for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] and ours(p.info["cmdline"])]
    return {"domains": names, "qemu": qemus}


def restore_plan(
    study: str,
    workdir: Path,
    pts: list[int],
    *,
    count: int = 2,
    memory_mib: int = 640,
    measure_s: float = 3,
    cache: bool = False,
    workload: str = 'type = "idle"',
    guests_extra: str = "",
) -> str:
    """A plan of `count` guests restored from a saved state each trial, swept over pages_to_scan:
    the real-guest tests' common study (1 s sampling, 1 s baseline)."""
    return f"""
[study]
name = "{study}"
[workload]
{workload}
[guests]
count = {count}
memory_mib = {memory_mib}
start = "restore"
cache_states = {str(cache).lower()}
workdir = "{workdir}"
{guests_extra}
[phases]
baseline_s = 1
measure_s = {measure_s}
[sampling]
interval_s = 1.0
pss_interval_s = 1.0
[sweep.ksm]
pages_to_scan = {pts}
"""
