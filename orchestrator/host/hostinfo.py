"""What the host was when a study ran: written once to host.json so results can be compared."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from orchestrator import __version__
from orchestrator.host import probes
from orchestrator.host.ksm import read_host_knobs, read_ksm_knobs


def _dependencies() -> list[str]:
    """The runtime dependencies as the installed ksm-lab declares them (pyproject's list)."""
    try:
        requires = importlib.metadata.requires("ksm-lab") or []
    except importlib.metadata.PackageNotFoundError:  # run from a checkout never installed
        return []
    return [re.split(r"[\s<>=!~;\[(]", r, maxsplit=1)[0] for r in requires if "extra ==" not in r]


def _cpu_model(root: Path) -> str:
    with contextlib.suppress(OSError):
        for line in (root / "proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _tool_version(argv: list[str]) -> str | None:
    if not shutil.which(argv[0]):
        return None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    return None


def numa_nodes(root: Path = Path("/")) -> int:
    return len(list((root / "sys/devices/system/node").glob("node[0-9]*"))) or 1


def machine_id(root: Path = Path("/")) -> str | None:
    """/etc/machine-id (32 hex digits, systemd and dbus keep it), or None. The host's identity for
    prune and the nightly's groups: a hostname is not one (two lab hosts, a clone, a rename)."""
    try:
        text = (root / "etc" / "machine-id").read_text(errors="replace").strip().lower()
    except OSError:
        return None
    return text if re.fullmatch(r"[0-9a-f]{32}", text) else None


def collect_host_info(root: Path = Path("/"), with_vm_tools: bool = False) -> dict[str, Any]:
    uname = os.uname()
    versions = {"ksm-lab": __version__, "python": platform.python_version()}
    for name in _dependencies():
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    if with_vm_tools:
        versions["qemu"] = _tool_version(["qemu-system-x86_64", "--version"])
        versions["libvirtd"] = _tool_version(["libvirtd", "--version"])
    return {
        "collected_wall": time.time(),
        "hostname": uname.nodename,
        "machine_id": machine_id(root),
        "kernel": uname.release,
        "kernel_version": uname.version,
        "arch": uname.machine,
        "cpu_model": _cpu_model(root),
        "cpu_count": os.cpu_count(),
        "numa_nodes": numa_nodes(root),
        "mem_total_kib": probes.read_meminfo(root).get("MemTotal"),
        "page_size_bytes": os.sysconf("SC_PAGE_SIZE"),
        "thp": read_host_knobs(root),
        "ksm_before": read_ksm_knobs(root),
        "versions": versions,
    }
