"""What the real-guest tests need of the host: QEMU, a libvirtd answering, the cached image."""

from __future__ import annotations

import shutil
from pathlib import Path

import psutil

import libvirt
import pytest

from orchestrator.guests import images

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
