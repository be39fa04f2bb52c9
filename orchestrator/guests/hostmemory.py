"""Will the guests fit: the host memory check made before any guest starts, so that the
KSM-off baseline never pushes the host into swap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from orchestrator.host import probes
from orchestrator.errors import HostError


@dataclass(frozen=True)
class MemoryMargin:
    """Guests need their RAM plus QEMU's own overhead; keep this much free besides."""

    fraction: float = 0.10
    fixed_mib: int = 512


def check_memory_fits(
    guest_count: int,
    memory_mib: int,
    margin: MemoryMargin = MemoryMargin(),
    *,
    root: Path = Path("/"),
    hugepages: bool = False,
    numa_node: int | None = None,
) -> int:
    """Refuse before anything starts when the guests cannot fit.

    KSM might make them fit, but the KSM-off baseline must not push the host into swap. Guests
    backed by hugepages need free hugepages (KSM never merges those, and MemAvailable does not
    count them); guests pinned to a NUMA node need that node's free memory.
    Returns the MiB left over after the guests and the margin.
    """
    meminfo = probes.read_meminfo(root)
    if "MemAvailable" not in meminfo:
        raise HostError(f"{root / 'proc/meminfo'} has no MemAvailable")
    guests_mib = guest_count * memory_mib
    if hugepages:
        free_mib = meminfo.get("HugePages_Free", 0) * meminfo.get("Hugepagesize", 0) // 1024
        if guests_mib > free_mib:
            raise HostError(
                f"{guest_count} guests x {memory_mib} MiB on hugepages need {guests_mib} MiB of "
                f"free hugepages, but only {free_mib} MiB are free (HugePages_Free x Hugepagesize)"
            )
    required_mib = math.ceil(guests_mib * (1 + margin.fraction)) + margin.fixed_mib
    available_mib = meminfo["MemAvailable"] // 1024
    where = "MemAvailable"
    if numa_node is not None:
        node = probes.read_node_meminfo(numa_node, root)
        if node is None:
            raise HostError(f"guests are pinned to NUMA node {numa_node}, which this host does not have")
        available_mib, where = min(available_mib, node.get("MemFree", 0) // 1024), f"node {numa_node} MemFree"
    if not hugepages and required_mib > available_mib:
        raise HostError(
            f"{guest_count} guests x {memory_mib} MiB = {guests_mib} MiB need {required_mib} MiB "
            f"with the safety margin ({margin.fraction:.0%} + {margin.fixed_mib} MiB), "
            f"but {where} is {available_mib} MiB"
        )
    return available_mib - (0 if hugepages else required_mib)
