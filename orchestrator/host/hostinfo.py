"""What the host was when a study ran: written to host.json so results can be compared.

Besides kernel, CPU, memory and versions, the environment a KSM number depends on, as mmtests
records it: sysctl vm.*, THP and khugepaged settings, CPU topology, vulnerabilities and their
mitigations, the cpufreq governor, the KSM/THP options of the kernel config, the KSM files
before the study and (study_end_info) after it, with a sanity judgement of KSM's counters.
Every read is bounded (file count, bytes) and tolerant of absent or unreadable files: each
reader takes root=Path("/") and returns what it could read.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
import time
from pathlib import Path
from collections.abc import Mapping
from typing import Any

from orchestrator import __version__
from orchestrator.errors import OrchestratorError
from orchestrator.host import probes
from orchestrator.host.ksm import THP_REL, chosen_value, read_host_knobs, read_ksm_knobs
from orchestrator.units import MIB

# Bounds on what a snapshot reads: a file's first bytes, a folder's first entries.
MAX_FILE_BYTES = 4096
MAX_ENTRIES = 256
MAX_CONFIG_BYTES = 8 * MIB  # a decompressed kernel config is ~0.3 MiB
CPU_REL = Path("sys/devices/system/cpu")
# Counters (not settings) in the THP folders: they differ on every run and say nothing.
THP_COUNTERS = frozenset({"full_scans", "pages_collapsed"})
# The kernel config options a KSM number depends on (CONFIG_KSM itself, THP and its default,
# hugetlbfs, NUMA, the memory controller, the scheduler tick and preemption, the page size).
KERNEL_CONFIG_OPTIONS = (
    "CONFIG_KSM",
    "CONFIG_TRANSPARENT_HUGEPAGE",
    "CONFIG_TRANSPARENT_HUGEPAGE_ALWAYS",
    "CONFIG_TRANSPARENT_HUGEPAGE_MADVISE",
    "CONFIG_TRANSPARENT_HUGEPAGE_NEVER",
    "CONFIG_HUGETLBFS",
    "CONFIG_NUMA",
    "CONFIG_MEMCG",
    "CONFIG_HZ",
    "CONFIG_PREEMPT",
    "CONFIG_PREEMPT_VOLUNTARY",
    "CONFIG_PREEMPT_NONE",
    "CONFIG_PREEMPT_DYNAMIC",
    "CONFIG_PAGE_SIZE_4KB",
    "CONFIG_ARM64_4K_PAGES",
    "CONFIG_ARM64_64K_PAGES",
    "CONFIG_ZSWAP",
    "CONFIG_USERFAULTFD",
)


def read_small(path: Path, limit: int = MAX_FILE_BYTES) -> str | None:
    """A small file's text, stripped, at most `limit` bytes; None when absent or unreadable
    (sysfs and procfs files can be write-only, e.g. vm.drop_caches)."""
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("utf-8", errors="replace").strip()
    except OSError:
        return None


def _files(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_file())[:MAX_ENTRIES]
    except OSError:
        return []


def sysctl_vm(root: Path = Path("/")) -> dict[str, str]:
    """Every readable /proc/sys/vm/* (as `sysctl vm` prints them), whitespace collapsed."""
    values = {}
    for path in _files(root / "proc/sys/vm"):
        text = read_small(path)
        if text is not None:
            values[path.name] = " ".join(text.split())
    return values


def thp_settings(root: Path = Path("/")) -> dict[str, str]:
    """THP's settings: the folder's files, khugepaged/*, and each size's hugepages-*/enabled
    (multi-size THP, 6.8+), the chosen value of choice files; counters left out."""
    base = root / THP_REL
    paths = _files(base) + _files(base / "khugepaged")
    with contextlib.suppress(OSError):
        paths += sorted(base.glob("hugepages-*kB/enabled"))[:MAX_ENTRIES]
    values = {}
    for path in paths:
        text = read_small(path)
        if text is not None and path.name not in THP_COUNTERS:
            values[str(path.relative_to(base))] = chosen_value(text)
    return values


def cpu_topology(root: Path = Path("/")) -> dict[str, Any]:
    """lscpu's summary from sysfs: online CPUs, packages, cores, threads per core, SMT, the
    caches of cpu0. Absent files leave their key out."""
    cpu = root / CPU_REL
    out: dict[str, Any] = {}
    for name in ("online", "present", "possible", "isolated"):
        if (text := read_small(cpu / name)) is not None:
            out[name] = text
    if (smt := read_small(cpu / "smt/control")) is not None:
        out["smt_control"] = smt
    cores: set[tuple[str, str, str]] = set()
    packages: set[str] = set()
    threads = 0
    for topology in sorted(cpu.glob("cpu[0-9]*/topology"))[:4096]:
        package = read_small(topology / "physical_package_id")
        if package is None:
            continue
        threads += 1
        packages.add(package)
        cores.add((package, read_small(topology / "die_id") or "0", read_small(topology / "core_id") or "?"))
    if threads:
        out.update(
            cpus=threads, packages=len(packages), cores=len(cores), threads_per_core=round(threads / len(cores), 2)
        )
    caches = {}
    for index in sorted((cpu / "cpu0/cache").glob("index[0-9]*"))[:16]:
        level, kind = read_small(index / "level"), read_small(index / "type")
        if level and kind:
            caches[f"L{level}{'' if kind == 'Unified' else kind[0].lower()}"] = {
                "size": read_small(index / "size"),
                "shared_cpu_list": read_small(index / "shared_cpu_list"),
            }
    if caches:
        out["caches"] = caches
    return out


def cpu_vulnerabilities(root: Path = Path("/")) -> dict[str, str]:
    """/sys/devices/system/cpu/vulnerabilities/*: each issue and its mitigation state."""
    return {p.name: text for p in _files(root / CPU_REL / "vulnerabilities") if (text := read_small(p)) is not None}


def cpufreq(root: Path = Path("/")) -> dict[str, Any] | None:
    """The scaling governors and drivers in use ({value: CPUs}); None without cpufreq (VMs)."""
    governors: dict[str, int] = {}
    drivers: dict[str, int] = {}
    for folder in sorted((root / CPU_REL).glob("cpu[0-9]*/cpufreq"))[:4096]:
        for name, counts in (("scaling_governor", governors), ("scaling_driver", drivers)):
            if (text := read_small(folder / name)) is not None:
                counts[text] = counts.get(text, 0) + 1
    if not governors and not drivers:
        return None
    return {"governors": governors, "drivers": drivers}


def parse_kernel_config(text: str, options: tuple[str, ...] = KERNEL_CONFIG_OPTIONS) -> dict[str, str]:
    """The wanted options of a kernel .config: "y", "m", a value, or "not set"."""
    wanted = set(options)
    found: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# CONFIG_") and line.endswith(" is not set"):
            name = line[2 : -len(" is not set")]
            if name in wanted:
                found[name] = "not set"
        elif line.startswith("CONFIG_"):
            name, _, value = line.partition("=")
            if name in wanted:
                found[name] = value.strip('"')
    return {name: found[name] for name in options if name in found}


def kernel_config(release: str, root: Path = Path("/")) -> dict[str, Any] | None:
    """The KSM/THP-related options of the running kernel's config, from /proc/config.gz (the
    kernel's own) or /boot/config-RELEASE; None when neither is readable."""
    for source in (root / "proc/config.gz", root / "boot" / f"config-{release}"):
        try:
            if source.suffix == ".gz":
                with gzip.open(source, "rb") as f:
                    raw = f.read(MAX_CONFIG_BYTES)
            else:
                with open(source, "rb") as f:
                    raw = f.read(MAX_CONFIG_BYTES)
        except (OSError, EOFError, gzip.BadGzipFile):
            continue
        return {
            "source": "/" + str(source.relative_to(root)),
            "options": parse_kernel_config(raw.decode("utf-8", errors="replace")),
        }
    return None


def kernel_version(release: str) -> tuple[int, int] | None:
    """(major, minor) of a kernel release string ("6.18.44-fc" -> (6, 18))."""
    match = re.match(r"(\d+)\.(\d+)", release)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _int(value: Any) -> int | None:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


def judge_ksm_counters(before: Mapping[str, Any], after: Mapping[str, Any], release: str) -> dict[str, Any]:
    """Are KSM's counters sane between two snapshots of /sys/kernel/mm/ksm (values as text or
    int)? ksm_zero_pages must never be negative, and when full_scans advanced pages_scanned must
    have too. Before Linux 6.10 ksm_zero_pages could read -1 (its accounting raced with
    unmapping: fixed in 6.10) and pages_scanned could stall; a failure makes the counts built on
    them (zero-page split, scan speed) suspect. {"ok", "checked", "problems", "kernel", ...}."""
    problems: list[str] = []
    checked: list[str] = []
    for when, snapshot in (("before", before), ("after", after)):
        zero = _int(snapshot.get("ksm_zero_pages"))
        if zero is not None:
            checked.append(f"ksm_zero_pages {when}")
            if zero < 0:
                problems.append(f"ksm_zero_pages read {zero} {when} the study (a count cannot be negative)")
    scans = [_int(s.get("full_scans")) for s in (before, after)]
    scanned = [_int(s.get("pages_scanned")) for s in (before, after)]
    if None not in scans and None not in scanned:
        full_scans, pages_scanned = scans[1] - scans[0], scanned[1] - scanned[0]  # type: ignore[operator]
        checked.append("pages_scanned with full_scans")
        if full_scans < 0 or pages_scanned < 0:
            problems.append(
                f"counters went backwards (full_scans {full_scans:+d}, pages_scanned {pages_scanned:+d}): "
                "a reboot or a counter wrap between the snapshots"
            )
        elif full_scans > 0 and pages_scanned == 0:
            problems.append(f"full_scans advanced by {full_scans} but pages_scanned did not move: the counter stalled")
    version = kernel_version(release)
    return {
        "ok": not problems,
        "checked": checked,
        "problems": problems,
        "kernel": release,
        "known_counter_bugs": version is not None and version < (6, 10),
    }


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
    return text if is_machine_id(text) else None


def is_machine_id(value: object) -> bool:
    """32 lower-case hex digits, as machine-id(5) writes it (not "uninitialized", not empty)."""
    return isinstance(value, str) and re.fullmatch(r"[0-9a-f]{32}", value) is not None


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
        "thp_settings": thp_settings(root),
        "sysctl_vm": sysctl_vm(root),
        "cpu_topology": cpu_topology(root),
        "cpu_vulnerabilities": cpu_vulnerabilities(root),
        "cpufreq": cpufreq(root),
        "kernel_config": kernel_config(uname.release, root),
        "ksm_before": read_ksm_knobs(root),
        "versions": versions,
    }


def study_end_info(host: Mapping[str, Any], root: Path = Path("/")) -> dict[str, Any]:
    """host.json at the end of a study: the KSM files after it (knobs restored, counters moved)
    and the judgement of the counters between the two snapshots."""
    try:
        after: dict[str, str] = read_ksm_knobs(root)
    except OrchestratorError:
        return dict(host)
    sanity = judge_ksm_counters(host.get("ksm_before") or {}, after, str(host.get("kernel") or os.uname().release))
    return {**host, "ksm_after": after, "ksm_counter_sanity": sanity, "ended_wall": time.time()}
