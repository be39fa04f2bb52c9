"""What KSM costs and how fast it works, per trial: pure functions over stored frames; and
sharing across guest images (the section at the end).

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
import re
import json
from collections import Counter
from typing import Any, Mapping

import numpy as np
import pandas as pd

from orchestrator.analysis.stats import mean_ci95
from orchestrator.runners.record import ProbeRecord
from orchestrator.units import MIB, number

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


def scan_speed(
    measure: pd.DataFrame, ksm_settings: Mapping[str, Any], measure_s: float, nominal: float | None = None
) -> dict[str, float]:
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


def zero_page_split(measure: pd.DataFrame, ksm_settings: Mapping[str, Any], page_size_bytes: int) -> dict[str, float]:
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


def metadata_memory(
    measure: pd.DataFrame, page_size_bytes: int, rmap_items_from_processes: float = math.nan
) -> dict[str, float]:
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
    out = merge_throughput(
        get(probe.merged_pages), page_size_bytes, get(probe.merge_wall_s), get(probe.merge_ksmd_cpu_s)
    )
    out["merge_target_reached"] = bool(probe.merge_target_reached)
    out["unmerge_s"] = unmerge_s
    out["unmerged_pages"] = before
    out["unmerge_s_per_gib"] = unmerge_per_gib(unmerge_s, before, page_size_bytes)
    out["pages_sharing_after_unmerge"] = get(probe.pages_sharing_after_unmerge)
    return out


# --- sharing across images ---------------------------------------------------------------
# Sharing between guests of different images ([guests] groups): the saving split into zero
# pages, pages shared within an image group and pages shared across groups.
#
# Per KSM-on trial (use_zero_pages = 1, so empty pages are counted in ksm_zero_pages and kept out
# of pages_sharing): the content saving S (pages_sharing at the end of measure,
# ``content_merged_mib``), the zero pages Z (``zero_pages_mib``), and the layout (trial.json's
# [guests]: which image each guest booted). A trial is "one-image" when every guest booted the
# same image, "mixed" otherwise.
#
# The estimator, for each mixed trial and the one-image trials of the same block (same KSM
# settings), one value per block:
#
#     within = sum over the images g of the mix:  S_g * (k_g - 1) / (n_g - 1)
#     across = S_mix - within
#
# S_g is the content saving of the one-image trial of image g with n_g guests, k_g the guests of
# image g in the mix. Assumption: a group's saving grows by the same amount with every guest
# after the first, i.e. what KSM shares among guests of one image is in every one of them, so
# k of the n guests save (k - 1)/(n - 1) of what all n save. Pages duplicated inside one guest
# break it (they scale with k/n, not (k-1)/(n-1)): then `within` is too low and `across` too high
# by that self-sharing times (n - k)/(n (n - 1)) per group. The per-process ksm_stat checks the
# assumption: in a one-image trial, (sum of the guests' ksm_merging_pages) / pages_shared is the
# mean number of guests' pages mapping one KSM page, n when every shared page is in every guest
# (``mappings_per_ksm_page``). Across-group sharing is `across` as a share of S_mix; an interval
# is given only over 2 or more blocks (the block is the replicated unit).

SPLIT_COLUMNS = (
    "trial_id",
    "block",
    "setting",
    "guests",
    "guest_ram_mib",
    "content_mib",
    "zero_mib",
    "within_mib",
    "across_mib",
    "within_pct",
    "across_pct",
    "zero_pct",
    "content_pct_of_ram",
    "zero_by_image_mib",
)
SUMMARY_COLUMNS = (
    "setting",
    "blocks",
    "content_mib",
    "content_mib_ci95",
    "zero_mib",
    "zero_mib_ci95",
    "within_mib",
    "within_mib_ci95",
    "across_mib",
    "across_mib_ci95",
    "across_pct",
    "across_pct_ci95",
    "content_pct_of_ram",
    "content_pct_of_ram_ci95",
)
# trials-table columns this module adds (references and summary.csv read them)
TRIAL_COLUMNS = (
    "one_image_content_pct_of_ram",
    "mixed_content_pct_of_ram",
    "one_image_saved_pct_of_ram",
    "mixed_saved_pct_of_ram",
    "within_group_pct",
    "across_group_pct",
    "across_group_pct_of_ram",
    "mappings_per_ksm_page",
)


def image_id(table: Any) -> str:
    """One image's identity as a plan names it: a bare recipe name is {"recipe": name}."""
    if isinstance(table, str):
        table = {"recipe": table}
    return json.dumps(table or {}, sort_keys=True, default=str)


def guest_layout(guests: Mapping[str, Any] | None) -> list[str]:
    """Each guest's image id by index, from a trial's stored [guests] table."""
    if not guests:
        return []
    groups = guests.get("groups")
    if isinstance(groups, list) and groups:
        return [
            image_id(g.get("image") if g.get("image") is not None else guests.get("image"))
            for g in groups
            for _ in range(int(g.get("count") or 0))
        ]
    return [image_id(guests.get("image"))] * int(guests.get("count") or 0)


def guest_index(label: Any) -> int | None:
    """A guest's index from its domain name (`ksmlab-<stem>-<index>`)."""
    found = re.search(r"-(\d+)$", str(label))
    return int(found.group(1)) if found else None


def _finite(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number if math.isfinite(number) else math.nan


def _pct(part: float, whole: float) -> float:
    return 100.0 * part / whole if whole > 0 and math.isfinite(part) else math.nan


def estimate_block(mixed: Mapping[str, Any], alone: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """The split of one mixed trial, from the one-image trials of its block.

    mixed: {"layout": [image id per guest], "content_mib", "zero_mib"}; alone: {image id:
    {"guests": n, "content_mib"}}. NaN within/across when an image of the mix has no usable
    one-image trial (or one of a single guest: nothing to scale)."""
    counts = Counter(mixed["layout"])
    content, zero = _finite(mixed.get("content_mib")), _finite(mixed.get("zero_mib"))
    within = 0.0
    for image, k in counts.items():
        ref = alone.get(image)
        n = int(ref["guests"]) if ref else 0
        saved = _finite(ref["content_mib"]) if ref else math.nan
        if k == 1:
            continue  # one guest shares nothing with its own group (self-sharing: see the docstring)
        if n < 2 or not math.isfinite(saved):
            within = math.nan
            break
        within += saved * (k - 1) / (n - 1)
    across = content - within
    return {
        "content_mib": content,
        "zero_mib": zero,
        "within_mib": within,
        "across_mib": across,
        "within_pct": _pct(within, content),
        "across_pct": _pct(across, content),
        "zero_pct": _pct(zero, content + zero) if math.isfinite(zero) else math.nan,
    }


def _trial_layouts(study: Any) -> dict[str, dict[str, Any]]:
    out = {}
    for data in study.trials:
        guests = data.trial.guests or {}
        layout = guest_layout(guests)
        memory = _finite(guests.get("memory_mib"))
        out[data.trial_id] = {
            "layout": layout,
            "ram_mib": memory * len(layout),
            "ksm": json.dumps(data.trial.ksm or {}, sort_keys=True, default=str),
        }
    return out


def _zero_by_image(
    per_process: pd.DataFrame, trial_id: str, layout: list[str], page_size_bytes: int
) -> dict[str, float]:
    """Zero pages of each image's guests (per-process ksm_stat ksm_zero_pages), MiB."""
    if per_process.empty or "ksm_zero_pages" not in per_process.columns:
        return {}
    rows = per_process[per_process["trial_id"] == trial_id]
    out: dict[str, float] = {}
    for label, zero in zip(rows["label"], pd.to_numeric(rows["ksm_zero_pages"], errors="coerce")):
        index = guest_index(label)
        if index is None or index >= len(layout) or not math.isfinite(zero):
            continue
        out[layout[index]] = out.get(layout[index], 0.0) + zero * page_size_bytes / MIB
    return out


def _mappings_per_ksm_page(per_process: pd.DataFrame, trial: Mapping[str, Any], page_size_bytes: int) -> float:
    """sum of the guests' ksm_merging_pages / pages_shared at the end of measure."""
    if per_process.empty or "ksm_merging_pages" not in per_process.columns:
        return math.nan
    merging = pd.to_numeric(
        per_process.loc[per_process["trial_id"] == trial["trial_id"], "ksm_merging_pages"], errors="coerce"
    ).sum()
    sharing = _finite(trial.get("content_merged_mib")) * MIB / page_size_bytes
    shared = _finite(trial.get("merged_pages_end")) - sharing
    return float(merging) / shared if shared > 0 and merging > 0 else math.nan


def split(study: Any, trials: pd.DataFrame, per_process: pd.DataFrame, page_size_bytes: int) -> pd.DataFrame:
    """One row per usable mixed KSM-on trial (SPLIT_COLUMNS); empty when the study has none."""
    layouts = _trial_layouts(study)
    usable = trials[trials["used_in_stats"] & ~trials["ksm_off"]] if not trials.empty else trials
    rows = []
    for _, trial in usable.iterrows():
        info = layouts.get(trial["trial_id"])
        if not info or len(set(info["layout"])) < 2:
            continue
        alone: dict[str, dict[str, Any]] = {}
        for _, other in usable[usable["repetition"] == trial["repetition"]].iterrows():
            other_info = layouts.get(other["trial_id"])
            if other_info and len(set(other_info["layout"])) == 1 and other_info["ksm"] == info["ksm"]:
                alone[other_info["layout"][0]] = {
                    "guests": len(other_info["layout"]),
                    "content_mib": other["content_merged_mib"],
                }
        est = estimate_block(
            {"layout": info["layout"], "content_mib": trial["content_merged_mib"], "zero_mib": trial["zero_pages_mib"]},
            alone,
        )
        zero_by_image = _zero_by_image(per_process, trial["trial_id"], info["layout"], page_size_bytes)
        rows.append(
            {
                "trial_id": trial["trial_id"],
                "block": trial["repetition"],
                "setting": trial["setting"],
                "guests": len(info["layout"]),
                "guest_ram_mib": info["ram_mib"],
                **est,
                "content_pct_of_ram": _pct(est["content_mib"], info["ram_mib"]),
                "zero_by_image_mib": "; ".join(
                    f"{_short(k)} {number(v, integers=False)}" for k, v in zero_by_image.items()
                ),
            }
        )
    return pd.DataFrame(rows, columns=list(SPLIT_COLUMNS))


def _short(image: str) -> str:
    table = json.loads(image)
    value = table.get("recipe") or table.get("manifest") or table.get("disk") or "image"
    return str(value).rsplit("/", 1)[-1].removesuffix(".toml")


def summarize(rows: pd.DataFrame) -> pd.DataFrame:
    """Per mixed setting: the mean over blocks and, from 2 blocks on, its 95% t half width."""
    out = []
    for setting, group in rows.groupby("setting", sort=False):
        record: dict[str, Any] = {"setting": setting}
        for column in ("content_mib", "zero_mib", "within_mib", "across_mib", "across_pct", "content_pct_of_ram"):
            mean, half, n = mean_ci95(pd.to_numeric(group[column], errors="coerce"))
            record[column], record[f"{column}_ci95"] = mean, half
            if column == "across_mib":
                record["blocks"] = n
        out.append(record)
    return pd.DataFrame(out, columns=list(SUMMARY_COLUMNS))


def add_columns(trials: pd.DataFrame, study: Any, per_process: pd.DataFrame, page_size_bytes: int) -> None:
    """TRIAL_COLUMNS into the trials table, in place: the content saving (zero pages excluded)
    and the whole saving (zero pages included) as % of the guests' RAM, for one-image and mixed
    trials apart (the report's references compare each with published figures), the
    within/across shares of mixed trials, and the mappings per KSM page of one-image trials
    (the estimator's assumption check)."""
    for column in TRIAL_COLUMNS:
        trials[column] = math.nan
    if trials.empty or "content_merged_mib" not in trials.columns:
        return
    layouts = _trial_layouts(study)
    for index, trial in trials.iterrows():
        info = layouts.get(trial["trial_id"])
        if not info or not info["layout"] or trial["ksm_off"]:
            continue
        content = _finite(trial["content_merged_mib"])
        kind = "one_image" if len(set(info["layout"])) == 1 else "mixed"
        trials.at[index, f"{kind}_content_pct_of_ram"] = _pct(content, info["ram_mib"])
        trials.at[index, f"{kind}_saved_pct_of_ram"] = _pct(content + _finite(trial["zero_pages_mib"]), info["ram_mib"])
        if kind == "one_image":
            trials.at[index, "mappings_per_ksm_page"] = _mappings_per_ksm_page(per_process, trial, page_size_bytes)
    if "used_in_stats" not in trials.columns:
        return
    rows = split(study, trials, per_process, page_size_bytes)
    for _, row in rows.iterrows():
        hit = trials["trial_id"] == row["trial_id"]
        trials.loc[hit, "within_group_pct"] = row["within_pct"]
        trials.loc[hit, "across_group_pct"] = row["across_pct"]
        trials.loc[hit, "across_group_pct_of_ram"] = _pct(row["across_mib"], row["guest_ram_mib"])


def mixes_images(study: Any) -> bool:
    """Does any trial of the study run guests of more than one image?"""
    return any(len(set(guest_layout(d.trial.guests))) > 1 for d in study.trials)
