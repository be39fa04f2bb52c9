"""What KSM costs and how fast it works, per trial: pure functions over stored frames.

Four groups, each a set of trials.csv columns (see docs/ARCHITECTURE.md):

scan speed (every KSM-on trial)
    ``pages_scanned_per_s`` (samplemetrics.py) is what ksmd achieved over measure.
    ``nominal_pages_per_s`` = pages_to_scan * 1000 / sleep_millisecs is what the knobs ask for:
    ksmd scans pages_to_scan pages, then sleeps sleep_millisecs (mm/ksm.c ksm_scan_thread). It
    is an upper bound that ignores the scan's own time, so a slow scan of a big batch falls
    short of it. sleep_millisecs = 0 asks for no sleep at all: the nominal rate is unbounded
    (inf) and the achieved share is NaN (there is nothing finite to be a share of).
    ``scan_rate_achieved_pct`` = 100 * achieved / nominal. The original study's 1000 pages per
    1 ms asked for a million pages a second. ``seconds_per_full_scan`` = measure seconds /
    full scans completed in measure (NaN with none completed).

zero pages (use_zero_pages = 1)
    Empty pages merged with the kernel's zero page are counted in ``ksm_zero_pages``, not in
    pages_sharing. ``zero_pages_mib`` and ``content_merged_mib`` (pages_sharing) split the raw
    saving at the end of measure; ``zero_pages_share_pct`` is the zero pages' part of it.

KSM's own memory
    Host-wide counters do not include the number of rmap items, but general_profit does:
    Documentation/admin-guide/mm/ksm.rst ("Monitoring KSM profit") gives
        general_profit =~ ksm_saved_pages * sizeof(page) - (all_rmap_items) * sizeof(rmap_item)
    and mm/ksm.c computes it as
        (ksm_pages_sharing + ksm_zero_pages) * PAGE_SIZE - ksm_rmap_items * sizeof(struct ksm_rmap_item)
    (general_profit_show; ksm_general_profit() in the Sept 2025 "memcg: add per-memcg
    ksm_profit" series, same formula). ksm_zero_pages is added whatever use_zero_pages says now
    (it counts zero-page mappings still in place), so the derivation here adds it too:
        rmap_items = ((pages_sharing + ksm_zero_pages) * page - general_profit) / 64.
    Stable nodes are *not* subtracted in general_profit: one per KSM page (pages_shared) plus
    one per chain head (stable_node_chains). (A 2024 proposal to subtract them, and one to
    subtract mm slots, were not in that 2025 code; on a kernel that has them this derivation
    overcounts rmap items by their bytes / 64, which ``ksm_rmap_items_processes`` would show.) Sizes on 64-bit, from mm/ksm.c (6.x):
        struct ksm_rmap_item    64 B  (rmap_list, anon_vma|nid, mm, address, oldchecksum + age,
                                       union {rb_node 24 B | head + hlist_node})
        struct ksm_stable_node  64 B  (union {rb_node | head + hlist_dup + list} 40 B, hlist 8,
                                       kpfn|chain_prune_time 8, rmap_hlist_len 4, nid 4)
    Both come from their own slab caches (ksm_rmap_item, ksm_stable_node in /proc/slabinfo),
    so per-object slab overhead is not counted here. ``ksm_metadata_mib`` = rmap + stable
    node bytes; ``profit_after_stable_nodes_mib`` = general_profit - stable node bytes: what
    general_profit would say if it counted the stable tree too.

unmerge and merge throughput (probe workload)
    ``unmerge_s_per_gib`` = seconds run=2 took / GiB that was merged just before;
    ``merge_mib_per_s`` and ``merge_mib_per_ksmd_cpu_s`` = MiB merged over the wall seconds
    (and ksmd CPU seconds) from "KSM started" to "the target merged".
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import pandas as pd

from orchestrator.runners.record import ProbeRecord
from orchestrator.units import MIB

GIB = 1024 * MIB
RMAP_ITEM_BYTES = 64  # struct ksm_rmap_item, 64-bit (mm/ksm.c; "cache-friendly 64 bytes", commit 6514d511dbe5)
# struct ksm_stable_node, 64-bit (mm/ksm.c): 60 B without CONFIG_NUMA, padded to 64 by the
# 8-byte alignment its slab cache uses (KSM_KMEM_CACHE: __alignof__), 64 B with it
STABLE_NODE_BYTES = 64


def _num(frame: pd.DataFrame, name: str) -> np.ndarray | None:
    if name not in frame.columns:
        return None
    return pd.to_numeric(frame[name], errors="coerce").to_numpy(dtype=float)


def _last_finite(values: np.ndarray | None) -> float:
    if values is None:
        return math.nan
    finite = values[np.isfinite(values)]
    return float(finite[-1]) if finite.size else math.nan


def _knob(ksm_settings: Mapping[str, Any], name: str) -> float:
    try:
        return float(ksm_settings[name])
    except (KeyError, TypeError, ValueError):
        return math.nan


def nominal_pages_per_s(pages_to_scan: float, sleep_millisecs: float) -> float:
    """pages_to_scan per sleep: inf for sleep 0 (no sleep asked), NaN when a knob is unknown."""
    if not (math.isfinite(pages_to_scan) and math.isfinite(sleep_millisecs)):
        return math.nan
    if sleep_millisecs <= 0:
        return math.inf
    return pages_to_scan * 1000.0 / sleep_millisecs


def scan_speed(measure: pd.DataFrame, ksm_settings: Mapping[str, Any], measure_s: float,
               nominal: float | None = None) -> dict[str, float]:
    """Achieved vs nominal scan rate over one measure phase (rows of ksm.csv, phase measure).

    The knobs come from trial.json's ksm settings; a knob the plan left at the host's value is
    read from the ksm.csv column of the same name (the sampler records every KSM file)."""
    out: dict[str, float] = {}
    if measure.empty or not measure_s > 0:
        return out
    scanned = _num(measure, "pages_scanned")
    scans = _num(measure, "full_scans")
    achieved = math.nan
    if scanned is not None:
        finite = scanned[np.isfinite(scanned)]
        if finite.size:
            achieved = float(finite[-1] - finite[0]) / measure_s
    if nominal is None or not math.isfinite(nominal):
        # No sampled knobs (policy_metrics' time mean): the trial's settings, else the host's.
        knobs = {}
        for name in ("pages_to_scan", "sleep_millisecs"):
            value = _knob(ksm_settings, name)
            knobs[name] = value if math.isfinite(value) else _last_finite(_num(measure, name))
        nominal = nominal_pages_per_s(knobs["pages_to_scan"], knobs["sleep_millisecs"])
    out["nominal_pages_per_s"] = nominal
    if math.isfinite(nominal) and nominal > 0 and math.isfinite(achieved):
        out["scan_rate_achieved_pct"] = 100.0 * achieved / nominal
    else:
        out["scan_rate_achieved_pct"] = math.nan
    if scans is not None:
        finite = scans[np.isfinite(scans)]
        done = float(finite[-1] - finite[0]) if finite.size else 0.0
        out["seconds_per_full_scan"] = measure_s / done if done > 0 else math.nan
    return out


def zero_page_split(measure: pd.DataFrame, ksm_settings: Mapping[str, Any],
                    page_size_bytes: int) -> dict[str, float]:
    """The end-of-measure saving split into zero pages and content merges (use_zero_pages=1
    only: with it off, empty pages merge like any other content and ksm_zero_pages stays 0)."""
    if str(ksm_settings.get("use_zero_pages")) != "1" or measure.empty:
        return {}
    zero = _last_finite(_num(measure, "ksm_zero_pages"))
    sharing = _last_finite(_num(measure, "pages_sharing"))
    out = {"zero_pages_mib": zero * page_size_bytes / MIB, "content_merged_mib": sharing * page_size_bytes / MIB}
    total = zero + sharing
    out["zero_pages_share_pct"] = 100.0 * zero / total if total > 0 else math.nan
    return out


def metadata_memory(measure: pd.DataFrame, page_size_bytes: int,
                    rmap_items_from_processes: float = math.nan) -> dict[str, float]:
    """KSM's own memory at the end of measure, beside general_profit (see the module docstring).

    rmap items are derived from general_profit; where the tracked processes' ksm_stat summed
    them (processes workload: every mergeable page belongs to a tracked process) that count is
    kept too, as ``ksm_rmap_items_processes``, a check on the derivation."""
    if measure.empty:
        return {}
    sharing = _last_finite(_num(measure, "pages_sharing"))
    profit = _last_finite(_num(measure, "general_profit"))
    shared = _last_finite(_num(measure, "pages_shared"))
    chains = _last_finite(_num(measure, "stable_node_chains"))
    zero = _last_finite(_num(measure, "ksm_zero_pages"))  # added as the kernel adds it (docstring)
    out: dict[str, float] = {}
    saved_bytes = (sharing + (zero if math.isfinite(zero) else 0.0)) * page_size_bytes
    if math.isfinite(profit) and math.isfinite(saved_bytes):
        rmap_items = max(0.0, (saved_bytes - profit) / RMAP_ITEM_BYTES)
        out["ksm_rmap_items_est"] = rmap_items
        out["rmap_items_mib"] = rmap_items * RMAP_ITEM_BYTES / MIB
    if math.isfinite(rmap_items_from_processes):
        out["ksm_rmap_items_processes"] = rmap_items_from_processes
    if math.isfinite(shared):
        stable_nodes = shared + (chains if math.isfinite(chains) else 0.0)
        out["stable_nodes"] = stable_nodes
        out["stable_nodes_mib"] = stable_nodes * STABLE_NODE_BYTES / MIB
    if "rmap_items_mib" in out and "stable_nodes_mib" in out:
        out["ksm_metadata_mib"] = out["rmap_items_mib"] + out["stable_nodes_mib"]
        out["profit_after_stable_nodes_mib"] = profit / MIB - out["stable_nodes_mib"]
    return out


def merge_throughput(merged_pages: float, page_size_bytes: int, wall_s: float, ksmd_cpu_s: float) -> dict[str, float]:
    """MiB merged per wall second and per ksmd CPU second (NaN where a divisor is not > 0)."""
    mib = merged_pages * page_size_bytes / MIB if math.isfinite(merged_pages) else math.nan
    return {
        "merged_mib": mib,
        "merge_wall_s": wall_s,
        "merge_ksmd_cpu_s": ksmd_cpu_s,
        "merge_mib_per_s": mib / wall_s if wall_s > 0 and math.isfinite(mib) else math.nan,
        "merge_mib_per_ksmd_cpu_s": mib / ksmd_cpu_s if ksmd_cpu_s > 0 and math.isfinite(mib) else math.nan,
    }


def unmerge_per_gib(unmerge_s: float, merged_pages: float, page_size_bytes: int) -> float:
    """Seconds run=2 took per GiB that was merged when it started (NaN with nothing merged)."""
    gib = merged_pages * page_size_bytes / GIB if math.isfinite(merged_pages) else math.nan
    return unmerge_s / gib if gib > 0 and math.isfinite(unmerge_s) else math.nan


def probe_record_metrics(probe: ProbeRecord, page_size_bytes: int) -> dict[str, float]:
    """trials.csv columns from trial.json's "probe" record (written by runners/probe.py)."""
    def get(value: float | None) -> float:
        return math.nan if value is None else float(value)

    unmerge_s, before = get(probe.unmerge_s), get(probe.pages_before_unmerge)
    out = merge_throughput(get(probe.merged_pages), page_size_bytes, get(probe.merge_wall_s),
                           get(probe.merge_ksmd_cpu_s))
    out["merge_target_reached"] = bool(probe.merge_target_reached)
    out["unmerge_s"] = unmerge_s
    out["unmerged_pages"] = before
    out["unmerge_s_per_gib"] = unmerge_per_gib(unmerge_s, before, page_size_bytes)
    out["pages_sharing_after_unmerge"] = get(probe.pages_sharing_after_unmerge)
    return out
