"""Is this host ready to run guests, and make it so (the shipped host-setup.sh does the work).

check_host() only reads; setup_host() installs packages and starts libvirtd as root.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from orchestrator.guests import images
from orchestrator.errors import HostError, OrchestratorError
from orchestrator.guests.kvm import kvm_status
from orchestrator.resources import package_file
from orchestrator.host.subproc import run_bounded

LIBVIRT_URI = "qemu:///system"  # the default, where a plan or option names none
LIBVIRT_URI_ENV = "LIBVIRT_DEFAULT_URI"
SETUP_SCRIPT = package_file("guests", "host-setup.sh")
# An image build holds the rootfs (~0.8 GiB), the raw ext4 and the qcow2 at once.
MIN_IMAGE_CACHE_FREE_GIB = 4.0
_TOOLS = ("qemu-system-x86_64", "qemu-img", "debootstrap", "mkfs.ext4", "ssh-keygen")


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str
    # False for facts that change how guests run but do not stop them (no KVM -> TCG).
    blocking: bool = True


def libvirt_uri(option: str | None = None, plan_uri: str | None = None) -> str:
    """The libvirt to talk to, decided as virsh does: -c/--connect, else $LIBVIRT_DEFAULT_URI,
    else the plan's [guests] uri, else qemu:///system."""
    return option or os.environ.get(LIBVIRT_URI_ENV) or plan_uri or LIBVIRT_URI


LIBVIRT_CHECK_TIMEOUT_S = 10.0


def check_host(plan_needs_vms: bool, image_cache_dir: Path | None = None, uri: str = LIBVIRT_URI) -> list[CheckResult]:
    """The checks a plan needs (libvirt probed at `uri`); no VMs means nothing to check here."""
    if not plan_needs_vms:
        return []
    results = [_check_libvirt(uri)]
    kvm_ok, kvm_detail = kvm_status()
    results.append(CheckResult("kvm", kvm_ok, kvm_detail, blocking=False))
    missing = [tool for tool in _TOOLS if shutil.which(tool) is None]
    results.append(
        CheckResult(
            "tools",
            not missing,
            f"missing {', '.join(missing)}: run `ksm-lab host setup`" if missing else "present: " + ", ".join(_TOOLS),
        )
    )
    results.append(_check_image(image_cache_dir))
    results.append(_check_cache_room(image_cache_dir or images.default_cache_dir()))
    return results


def _check_libvirt(uri: str, timeout_s: float = LIBVIRT_CHECK_TIMEOUT_S) -> CheckResult:
    try:
        import libvirt

        from orchestrator.guests.libvirtconn import connect
    except ImportError as exc:
        return CheckResult("libvirt", False, f"libvirt-python missing: {exc}")
    # libvirt prints every error to stderr by default; we report it ourselves.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    try:
        conn = connect(uri, timeout_s)  # bounded: a stopped libvirtd's socket accepts and never answers
    except OrchestratorError as exc:
        return CheckResult("libvirt", False, f"{uri} unreachable ({exc}): run `ksm-lab host setup`")
    try:
        caps = conn.getCapabilities()
        version = conn.getLibVersion()
    finally:
        conn.close()
    # The guest section for x86_64 lists the domain types QEMU offers ('qemu' = TCG).
    has_qemu = re.search(r"<arch name='x86_64'>.*?<domain type='qemu'", caps, re.S) is not None
    lib = f"{version // 1_000_000}.{version // 1000 % 1000}.{version % 1000}"
    if not has_qemu:
        return CheckResult(
            "libvirt", False, f"libvirt {lib} at {uri} has no QEMU x86_64 driver: install libvirt-daemon-driver-qemu"
        )
    return CheckResult("libvirt", True, f"libvirt {lib} at {uri}, QEMU x86_64 driver present")


def _check_image(cache_dir: Path | None) -> CheckResult:
    try:
        image = images.find_cached(images.DEFAULT_RECIPE, cache_dir)
    except Exception as exc:  # a broken manifest is reported, not raised, by a check
        return CheckResult("image", False, f"default image unusable: {exc}")
    if image is None:
        return CheckResult(
            "image",
            False,
            f"default image {images.image_key(images.DEFAULT_RECIPE)} not built: run `ksm-lab image build`",
        )
    return CheckResult("image", True, f"{image.key} at {image.disk_path.parent}")


def _check_cache_room(cache_dir: Path) -> CheckResult:
    existing = cache_dir
    while not existing.exists():
        existing = existing.parent
    free_gib = shutil.disk_usage(existing).free / 2**30
    return CheckResult(
        "image cache room",
        free_gib >= MIN_IMAGE_CACHE_FREE_GIB,
        f"{free_gib:.1f} GiB free at {existing} (need {MIN_IMAGE_CACHE_FREE_GIB:g})",
    )


def setup_host(stop: bool = False, timeout_s: float = 900) -> str:
    """Run host-setup.sh (or --stop) as root; returns what it printed."""
    if os.geteuid() != 0:
        raise HostError("host setup needs root (apt-get, libvirtd)")
    # Through bash: an installed wheel does not promise to keep the executable bit.
    argv = ["bash", str(SETUP_SCRIPT)] + (["--stop"] if stop else [])
    try:
        proc = run_bounded(argv, timeout_s, text=True)  # apt-get's children too
    except subprocess.TimeoutExpired as exc:
        raise HostError(f"{SETUP_SCRIPT.name} did not finish within {timeout_s:g} s") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise HostError(f"{SETUP_SCRIPT.name} failed (exit {proc.returncode}):\n{tail}")
    return proc.stdout
