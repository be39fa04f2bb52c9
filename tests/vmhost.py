"""What the real-guest tests need of the host: QEMU, a libvirtd answering, the cached image."""

from __future__ import annotations

import shutil

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
