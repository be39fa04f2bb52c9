"""Can guests use KVM here? The one decision, shared by `check` and by provisioning.

KVM needs hardware virtualisation (vmx/svm in the CPU flags) and a /dev/kvm this user may
read and write. A /dev/kvm without vmx/svm is a nested or software KVM, which cannot run a
stock guest kernel: guests then run under TCG (domain type "qemu"), slower but correct.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Literal

from orchestrator.errors import ProvisionError

DomainType = Literal["kvm", "qemu", "test"]


def _virt_flag(root: Path) -> str | None:
    flags: set[str] = set()
    with contextlib.suppress(OSError):  # no cpuinfo (a bare test root): no flags
        for line in (root / "proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("flags"):
                flags.update(line.partition(":")[2].split())
    return "vmx" if "vmx" in flags else "svm" if "svm" in flags else None


def kvm_status(root: Path = Path("/")) -> tuple[bool, str]:
    """Whether guests can use KVM, and why (or why not) in words."""
    virt_flag = _virt_flag(root)
    dev_kvm = root / "dev/kvm"
    present = dev_kvm.exists()
    usable = present and os.access(dev_kvm, os.R_OK | os.W_OK)
    if virt_flag and usable:
        return True, f"yes: CPU has {virt_flag} and /dev/kvm is usable -> domain type kvm"
    if virt_flag and present:
        return False, "no: /dev/kvm is not readable+writable by this user -> use TCG"
    if virt_flag:
        return False, f"no: CPU has {virt_flag} but /dev/kvm is missing (kvm module?) -> use TCG"
    if present:
        return False, "no: /dev/kvm present but CPU has no vmx/svm (nested/software KVM) -> use TCG"
    return False, "no: no /dev/kvm and CPU has no vmx/svm -> use TCG"


def choose_domain_type(requested: str, root: Path = Path("/")) -> DomainType:
    """A plan's domain_type: kvm, qemu or test as given; "auto" decided by kvm_status()."""
    if requested in ("kvm", "qemu", "test"):
        return requested  # type: ignore[return-value]
    if requested != "auto":
        raise ProvisionError(f"unknown domain type {requested!r} (kvm, qemu, test or auto)")
    return "kvm" if kvm_status(root)[0] else "qemu"
