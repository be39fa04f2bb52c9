"""Per-trial metrics from the sampled series (ksm.csv, processes.csv, fills.csv), computed only
from what the store wrote (never the live host).

Memory saved is reported four ways, side by side, because they disagree and each answers a
different question (on the reference host three idle guests gave 374 / 362 / 745 / 717 MiB):

``saved_mib``
    KSM's own count: ``pages_sharing`` x page size at the end of measure, plus ``ksm_zero_pages``
    x page size when the trial ran with ``use_zero_pages=1`` (empty pages merged with the kernel's
    zero page are not counted in pages_sharing). This is the raw saving, before KSM's costs.
``general_profit_mib``
    The kernel's ``general_profit`` at the end of measure: the raw saving minus KSM's rmap
    items (64 B per scanned page; stable-tree nodes are not subtracted, see costs.py). Below ``saved_mib``; negative when
    ksmd scans much and merges little.
``pss_drop_mib``
    What the tracked processes stopped paying: their summed PSS at baseline minus at the end of
    measure. It can exceed ``saved_mib`` when ksmd splits transparent huge pages to merge parts of
    them and the kernel then frees the zero-filled tails of those THPs, which KSM never counts; it
    falls short when tracked processes share pages with untracked ones.
``mem_available_rise_mib``
    Host MemAvailable at the end of measure minus baseline: what the host really got back,
    including THP splits, KSM's slab metadata as a cost, and every other process's noise.

Each view is kept three ways: ``<view>_end`` (the last sample of measure), ``<view>_mean`` (the
time average over the whole of measure) and ``<view>_steady`` (the time average from the moment
the saving first reached 90% of its 95th percentile over measure to the end; for a workload that
refills on a cycle, cut to whole cycles, from the first refill start in that span to the last,
so the average does not depend on the phase at which measure ends). ``<view>`` itself,
the headline, is the steady average for workloads that write during measure (processes with
rounds other than 1, sysbench) and the end value otherwise; ``saving_basis`` says which. A
workload that refills its pages breaks merges by copy-on-write at every refill: pages_sharing is
a sawtooth, and a single sample of it says more about where the tick fell than about KSM. The
KSM counters are sampled fast enough to resolve such a cycle (see sampler.py); the PSS and
MemAvailable views are averages over their slower, jittered ticks (``pss_samples``).

All other metrics are documented where computed. Every function here is pure over DataFrames
and trial.json dicts (studydata.py reads them; trialmetrics.py puts one trial's together).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from orchestrator.analysis.stats import time_mean
from orchestrator.plan import CONVERGE_TOLERANCE_PCT, pages_sharing_converged
from orchestrator.units import MIB

CONVERGENCE_THRESHOLDS = (50, 90, 99)
# "Converged" = plan.pages_sharing_converged with the plan's converge_tolerance_pct, over the
# window made of the last CONVERGENCE_WINDOW_FRACTION of measure samples (at least
# CONVERGENCE_MIN_SAMPLES): every trial is judged, also those that ran a fixed measure_s.
# Fewer measure samples than that: cannot tell (None).
CONVERGENCE_WINDOW_FRACTION = 0.10
CONVERGENCE_MIN_SAMPLES = 5


def _as_int(value: Any) -> int | None:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return None


def zero_pages_counted(ksm_settings: dict[str, Any]) -> bool:
    return _as_int(ksm_settings.get("use_zero_pages")) == 1


def _col(frame: pd.DataFrame, name: str) -> np.ndarray | None:
    if name not in frame.columns:
        return None
    return pd.to_numeric(frame[name], errors="coerce").to_numpy(dtype=float)


def _last(arr: np.ndarray | None) -> float:
    return float(arr[-1]) if arr is not None and arr.size else math.nan


def _delta(arr: np.ndarray | None) -> float:
    if arr is None or arr.size == 0:
        return math.nan
    finite = arr[np.isfinite(arr)]
    return float(finite[-1] - finite[0]) if finite.size else math.nan


def phase_mask(frame: pd.DataFrame, phase: str) -> np.ndarray:
    if "phase" not in frame.columns:
        return np.zeros(len(frame), dtype=bool)
    return (frame["phase"] == phase).to_numpy(dtype=bool, na_value=False)


def _baseline_index(in_baseline: np.ndarray, usable: np.ndarray) -> int | None:
    """Last usable row of phase baseline, else the first usable row; None if none is usable."""
    idx = np.flatnonzero(usable & in_baseline)
    if idx.size:
        return int(idx[-1])
    idx = np.flatnonzero(usable)
    return int(idx[0]) if idx.size else None


STEADY_FRACTION = 0.90  # "steady" starts when the saving first reaches this share of its p95
STEADY_REFERENCE_PCT = 95  # a percentile, not the max: one outlying tick must not move it


def steady_start_index(saved: np.ndarray) -> int:
    """First sample at which `saved` reaches 90% of its 95th percentile (0 when it never rises)."""
    finite = saved[np.isfinite(saved)]
    if finite.size == 0:
        return 0
    reference = float(np.percentile(finite, STEADY_REFERENCE_PCT))
    if not reference > 0:
        return 0
    reached = np.flatnonzero(np.nan_to_num(saved, nan=-np.inf) >= STEADY_FRACTION * reference)
    return int(reached[0]) if reached.size else 0


def view_summary(
    name: str,
    t_s: np.ndarray,
    values: np.ndarray,
    steady_from_s: float,
    steady_to_s: float = math.inf,
    steps_s: np.ndarray | None = None,
) -> dict[str, float]:
    """<name>_end, _mean (whole measure) and _steady (the steady window) of one saving view.
    ``steps_s``: refill starts, where the signal drops (stats.time_mean)."""
    finite = np.isfinite(values)
    out = {
        f"{name}_end": float(values[finite][-1]) if finite.any() else math.nan,
        f"{name}_mean": time_mean(t_s, values, steps_s=steps_s),
    }
    steady = (t_s >= steady_from_s) & (t_s <= steady_to_s)
    if steady.any() and math.isfinite(steady_to_s):
        out[f"{name}_steady"] = time_mean(t_s, values, steady_from_s, steady_to_s, steps_s)
    elif steady.any():
        out[f"{name}_steady"] = time_mean(t_s[steady], values[steady], steps_s=steps_s)
    else:
        out[f"{name}_steady"] = out[f"{name}_end"]
    return out


def steady_window(
    t_measure: np.ndarray, saved_measure: np.ndarray, cycle_starts_s: np.ndarray | None
) -> tuple[float, float, int]:
    """(from, to, whole cycles) of the steady window on the t_s clock.

    From the first tick at 90% of the saving's p95 to the end of measure. When the workload
    refills on a cycle, the window is cut to whole cycles instead: from the first refill start
    in it to the last. A window that ends part-way through a sawtooth weighs that part's phase
    (up to one cycle in N, 6% for 16 one-second cycles), so two samplers meeting the cycle at
    different phases would disagree by that much; over whole cycles they do not.
    """
    steady_from = float(t_measure[steady_start_index(saved_measure)])
    steady_to = math.inf
    cycles = 0
    if cycle_starts_s is not None:
        starts = np.sort(cycle_starts_s[(cycle_starts_s >= steady_from) & (cycle_starts_s <= t_measure[-1])])
        if starts.size >= 2:
            steady_from, steady_to, cycles = float(starts[0]), float(starts[-1]), int(starts.size - 1)
    return steady_from, steady_to, cycles


def refill_starts_wall(fills: pd.DataFrame | None) -> tuple[np.ndarray, np.ndarray] | None:
    """(every refill's start, one worker's refill starts) on the wall clock, from fills.csv.

    The first are where the saving drops (steps for the time average); the second, from the
    worker with the most refills, are the cycle the steady window is cut to. Workers refill on
    their own clocks; one worker's cycle bounds the window, the others' partial cycles weigh
    1/N of a cycle at most."""
    if fills is None or fills.empty or not {"label", "fill", "start_wall"} <= set(fills.columns):
        return None
    refills = fills[pd.to_numeric(fills["fill"], errors="coerce") >= 2]
    if refills.empty:
        return None
    label = refills["label"].value_counts().index[0]
    return (
        np.sort(refills["start_wall"].to_numpy(dtype=float)),
        np.sort(refills.loc[refills["label"] == label, "start_wall"].to_numpy(dtype=float)),
    )


def saved_pages_series(ksm: pd.DataFrame, ksm_settings: dict[str, Any]) -> np.ndarray:
    """pages_sharing (+ ksm_zero_pages when use_zero_pages=1) per row, as float."""
    pages = _col(ksm, "pages_sharing")
    if pages is None:
        return np.full(len(ksm), np.nan)
    zero = _col(ksm, "ksm_zero_pages") if zero_pages_counted(ksm_settings) else None
    return pages + np.nan_to_num(zero) if zero is not None else pages


def ksm_metrics(
    ksm: pd.DataFrame,
    ksm_settings: dict[str, Any],
    page_size_bytes: int,
    fills: pd.DataFrame | None = None,
    converge_tolerance_pct: float = CONVERGE_TOLERANCE_PCT,
) -> dict[str, Any]:
    """Metrics from ksm.csv: saving, convergence, ksmd cost, page-state shares, vmstat deltas.

    ``fills``: the processes workload's fills.csv, when it refills; its refill times cut the
    steady averages to whole cycles and mark where the saving drops. ``converge_tolerance_pct``:
    the plan's ([phases]), for the "converged" column."""
    out: dict[str, Any] = {}
    in_measure = phase_mask(ksm, "measure")
    in_baseline = phase_mask(ksm, "baseline")
    measure = ksm.loc[in_measure]
    out["measure_samples"] = int(in_measure.sum())
    if measure.empty:
        return out

    # --- memory saved: end, whole-measure and steady averages (see the module docstring)
    saved_pages = saved_pages_series(ksm, ksm_settings)
    t_all = _col(ksm, "t_s")
    t_measure = t_all[in_measure] if t_all is not None else np.arange(int(in_measure.sum()), dtype=float)
    saved_measure = saved_pages[in_measure] * page_size_bytes / MIB
    t_wall = _col(ksm, "t_wall")
    refills = refill_starts_wall(fills)
    refill_starts_s = cycle_starts_s = None
    if refills is not None and t_wall is not None and t_all is not None and np.isfinite(t_wall).all():
        # refills are stamped on the wall clock, ticks on both: map the starts onto t_s
        refill_starts_s, cycle_starts_s = (np.interp(w, t_wall, t_all, left=-math.inf, right=math.inf) for w in refills)
    steady_from_s, steady_to_s, cycles = steady_window(t_measure, saved_measure, cycle_starts_s)
    out["steady_from_s"] = steady_from_s - float(t_measure[0])
    out["steady_s"] = min(steady_to_s, float(t_measure[-1])) - steady_from_s
    if cycles:
        out["steady_cycles"] = cycles
    out["_steady_window_t_s"] = (steady_from_s, steady_to_s)  # on the trial's t_s clock, for the PSS view
    out.update(view_summary("saved_mib", t_measure, saved_measure, steady_from_s, steady_to_s, refill_starts_s))
    out["pages_sharing"] = _last(_col(measure, "pages_sharing"))
    profit = _col(ksm, "general_profit")
    if profit is not None:
        out.update(
            view_summary(
                "general_profit_mib", t_measure, profit[in_measure] / MIB, steady_from_s, steady_to_s, refill_starts_s
            )
        )
    avail = _col(ksm, "mem_available_kib")
    if avail is not None:
        base = _baseline_index(in_baseline, np.isfinite(avail))
        if base is not None:
            rise = (avail[in_measure] - avail[base]) / 1024
            out.update(
                view_summary("mem_available_rise_mib", t_measure, rise, steady_from_s, steady_to_s, refill_starts_s)
            )
    shared = _col(ksm, "pages_shared")
    sharing_all = _col(ksm, "pages_sharing")
    if shared is not None and sharing_all is not None:
        # Pages in the merged state (the one kept copy + those mapping it), for "merged share".
        merged = (shared + sharing_all)[in_measure]
        out["merged_pages_mean"] = time_mean(t_measure, merged)
        out["merged_pages_end"] = float(merged[-1])
    outside = _col(measure, "outside_cpu_pct")
    if outside is not None and np.isfinite(outside).any():
        out["outside_cpu_pct"] = time_mean(t_measure, outside)
        out["outside_cpu_pct_max"] = float(np.nanmax(outside))

    # --- convergence, from measure start, on pages_sharing (not zero pages)
    t_s = _col(measure, "t_s")
    sharing = _col(measure, "pages_sharing")
    scans = _col(measure, "full_scans")
    t_rel = t_s - t_s[0] if t_s is not None else None
    out["measure_s"] = float(t_rel[-1]) if t_rel is not None else math.nan
    if sharing is not None:
        out.update(_convergence(sharing, t_rel, scans, converge_tolerance_pct))
    out["full_scans"] = _delta(scans)
    scanned = _col(measure, "pages_scanned")
    if scanned is not None and out["measure_s"] > 0:
        out["pages_scanned_per_s"] = _delta(scanned) / out["measure_s"]

    # --- ksmd cost over measure: CPU seconds over wall seconds (ticks are jittered, so a mean
    # of per-tick percentages would weigh short intervals as much as long ones)
    cpu_pct = _col(measure, "ksmd_cpu_pct")
    cpu_s = _col(measure, "ksmd_cpu_s")
    out["ksmd_cpu_s"] = _delta(cpu_s)
    if out.get("measure_s", 0) > 0 and math.isfinite(out["ksmd_cpu_s"]):
        out["ksmd_cpu_pct"] = 100.0 * out["ksmd_cpu_s"] / out["measure_s"]
    elif cpu_pct is not None and np.isfinite(cpu_pct).any():
        out["ksmd_cpu_pct"] = float(np.nanmean(cpu_pct))
    if cpu_pct is not None and np.isfinite(cpu_pct).any():
        out["ksmd_cpu_pct_max"] = float(np.nanmax(cpu_pct))

    # --- page states at the end: volatile pages change too fast to merge, unshared found no twin
    states = {
        name: _last(_col(measure, name))
        for name in ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile")
    }
    total = sum(v for v in states.values() if math.isfinite(v))
    if total > 0:
        out["pages_volatile_share"] = states["pages_volatile"] / total
        out["pages_unshared_share"] = states["pages_unshared"] / total

    # --- kernel side effects over the whole trial (all phases)
    for counter in ("cow_ksm", "thp_split_page", "thp_split_pmd", "ksm_swpin_copy"):
        arr = _col(ksm, f"vmstat_{counter}")
        if arr is not None:
            out[f"{counter}_delta"] = _delta(arr)
    return out


def _convergence(
    sharing: np.ndarray, t_rel: np.ndarray | None, scans: np.ndarray | None, tolerance_pct: float
) -> dict[str, Any]:
    """Time and full scans (since measure start) to first reach 50/90/99% of the final value,
    and whether the last samples of measure had converged (plan.pages_sharing_converged).

    "Final" is the last pages_sharing of measure. Time resolution is the sampling interval: we
    report the first sample at or above the threshold, without interpolating between samples.
    """
    out: dict[str, Any] = {}
    final = float(sharing[-1])
    for pct in CONVERGENCE_THRESHOLDS:
        if not final > 0:
            out[f"time_to_{pct}pct_s"] = math.nan
            out[f"full_scans_to_{pct}pct"] = math.nan
            continue
        first = int(np.argmax(sharing >= final * pct / 100.0))  # the last sample always qualifies
        out[f"time_to_{pct}pct_s"] = float(t_rel[first]) if t_rel is not None else math.nan
        out[f"full_scans_to_{pct}pct"] = float(scans[first] - scans[0]) if scans is not None else math.nan
    n = sharing.size
    if n < CONVERGENCE_MIN_SAMPLES:
        out["converged"] = None
    else:
        window = sharing[-max(CONVERGENCE_MIN_SAMPLES, math.ceil(n * CONVERGENCE_WINDOW_FRACTION)) :]
        out["converged"] = pages_sharing_converged(window, tolerance_pct)
    return out


def process_metrics(
    processes: pd.DataFrame,
    steady_window_t_s: tuple[float, float] = (-math.inf, math.inf),
) -> tuple[dict[str, Any], pd.DataFrame]:
    """PSS drop (summed over tracked processes) and KSM metadata overhead; plus a per-process table.

    The sampler reads PSS one target at a time under a CPU budget (host/sampler.py), so a
    tick's rows hold a fresh PSS for some targets and NaN for the rest. Each target's last PSS
    is carried forward with its age; the summed PSS is evaluated at every tick that read at
    least one PSS, once every target of that tick has been read (ticks are identified by t_s:
    the sampler writes one t_s per tick for all processes). Baseline = the last such tick of
    phase baseline (else the first); end = the last one of measure. ``pss_age_max_s`` is the
    oldest PSS inside those sums over measure and baseline, ``pss_age_end_s`` per process at
    the end. Merging pages, rmap items and profit are taken from each process's last measure
    row (those come from ksm_stat on every tick).
    """
    out: dict[str, Any] = {}
    if "label" not in processes.columns or "t_s" not in processes.columns:
        return out, pd.DataFrame()
    labels = processes["label"]
    if not isinstance(labels.dtype, pd.CategoricalDtype):
        labels = labels.astype(str).astype("category")
    codes = labels.cat.codes.to_numpy()
    names = np.asarray(labels.cat.categories, dtype=object)
    t_s = _col(processes, "t_s")
    in_measure = phase_mask(processes, "measure")
    in_baseline = phase_mask(processes, "baseline")
    per_proc = pd.DataFrame({"label": names})

    pss = _col(processes, "pss_kib")
    if pss is not None and np.isfinite(pss).any():
        fresh = np.isfinite(pss)
        order = np.argsort(t_s, kind="stable")  # rows in time order, within a label too
        by_label = pd.DataFrame(
            {"code": codes[order], "pss": pss[order], "read_t": np.where(fresh, t_s, np.nan)[order]}
        ).groupby("code")
        carried, read_t = np.empty(pss.size), np.empty(pss.size)
        carried[order] = by_label["pss"].ffill().to_numpy()
        read_t[order] = by_label["read_t"].ffill().to_numpy()
        age = t_s - read_t
        ticks, tick_of_row = np.unique(t_s, return_inverse=True)
        missing = np.bincount(tick_of_row, weights=~np.isfinite(carried), minlength=ticks.size)
        reads = np.bincount(tick_of_row, weights=fresh, minlength=ticks.size)
        tick_pss = np.bincount(tick_of_row, weights=np.nan_to_num(carried), minlength=ticks.size)
        tick_age = np.zeros(ticks.size)
        np.maximum.at(tick_age, tick_of_row, np.nan_to_num(age))
        first_row = np.full(ticks.size, pss.size)
        np.minimum.at(first_row, tick_of_row, np.arange(pss.size))
        usable = (reads > 0) & (missing == 0)
        base = _baseline_index(in_baseline[first_row], usable)
        measure_ticks = np.flatnonzero(usable & in_measure[first_row])
        if base is not None and measure_ticks.size:
            end = measure_ticks[-1]
            drop_mib = (tick_pss[base] - tick_pss[measure_ticks]) / 1024
            out.update(view_summary("pss_drop_mib", ticks[measure_ticks], drop_mib, *steady_window_t_s))
            out["pss_samples"] = int(measure_ticks.size)
            out["pss_age_max_s"] = float(max(tick_age[base], tick_age[measure_ticks].max()))
            for name, tick in (("pss_before_kib", base), ("pss_after_kib", end), ("pss_age_end_s", end)):
                rows = np.flatnonzero(tick_of_row == tick)
                values = age[rows] if name == "pss_age_end_s" else carried[rows]
                per_proc[name] = (
                    pd.Series(values, index=codes[rows]).groupby(level=0).sum().reindex(range(names.size)).to_numpy()
                )
            per_proc["pss_drop_kib"] = per_proc["pss_before_kib"] - per_proc["pss_after_kib"]

    measure_rows = np.flatnonzero(in_measure)[::-1]  # newest first, so unique() finds each last row
    found, first = np.unique(codes[measure_rows], return_index=True)
    last_rows = measure_rows[first]
    for name in ("rss_kib", "ksm_merging_pages", "ksm_rmap_items", "ksm_zero_pages", "ksm_process_profit"):
        values = _col(processes, name)
        if values is not None:
            column = np.full(names.size, np.nan)
            column[found] = values[last_rows]
            per_proc[name] = column
    if "ksm_process_profit" in per_proc.columns:
        per_proc["ksm_process_profit_mib"] = per_proc.pop("ksm_process_profit") / MIB
    if "ksm_merging_pages" in per_proc.columns:
        merging = per_proc["ksm_merging_pages"].sum(min_count=1)
        out["ksm_merging_pages"] = float(merging)
        if "ksm_rmap_items" in per_proc.columns:
            rmap = per_proc["ksm_rmap_items"].sum(min_count=1)
            out["ksm_rmap_items"] = float(rmap)
            if merging > 0:
                # ~64 B of metadata per rmap item: many items per merged page = scanning for little
                out["rmap_items_per_merging_page"] = float(rmap / merging)
    return out, per_proc.sort_values("label", ignore_index=True)


SAVING_VIEWS = ("saved_mib", "general_profit_mib", "pss_drop_mib", "mem_available_rise_mib")


def choose_headline(out: dict[str, Any], writes: bool) -> None:
    """Set each saving view's headline column from its steady average (a workload that writes
    during measure) or its end value (one that does not), and the ratios built on them."""
    suffix = "_steady" if writes else "_end"
    for view in SAVING_VIEWS:
        if f"{view}{suffix}" in out:
            out[view] = out[f"{view}{suffix}"]
    if "saved_mib" in out:
        out["saving_basis"] = "steady mean (the workload writes during measure)" if writes else "end of measure"
    saved = out.get("saved_mib", math.nan)
    if out.get("ksmd_cpu_s", 0) > 0 and math.isfinite(saved):
        out["mib_saved_per_ksmd_cpu_s"] = saved / out["ksmd_cpu_s"]
    profit = out.get("general_profit_mib", math.nan)
    if saved > 0 and math.isfinite(profit):
        out["profit_to_saving_ratio"] = profit / saved


REMERGE_FRACTION = 0.90  # re-merged = back to 90% of the saving just before the refill


def refill_metrics(
    ksm: pd.DataFrame, fills: pd.DataFrame, ksm_settings: dict[str, Any], pages_total: float
) -> dict[str, Any]:
    """What refills do to the saving, from fills.csv (one row per fill of each worker).

    For every refill (fill >= 2) that started during measure: the merged share of the workload's
    pages at the last KSM tick before it started (what KSM had reached) and at the first tick
    after it ended (what copy-on-write left), the time from its end until the saving is back to
    90% of the level before it (NaN when the next refill came first), and cow_ksm per refill
    (vmstat's count of copy-on-write breaks of merged pages over measure / refills in measure).
    Several workers refill independently: their events overlap, and the shares are host-wide.
    """
    out: dict[str, Any] = {}
    t_wall = _col(ksm, "t_wall")
    if t_wall is None or not {"fill", "start_wall", "end_wall"} <= set(fills.columns):
        return out
    in_measure = phase_mask(ksm, "measure")
    if not in_measure.any():
        return out
    saved = saved_pages_series(ksm, ksm_settings)
    t_measure = t_wall[in_measure]
    saved_measure = saved[in_measure]
    start, end = float(t_measure[0]), float(t_measure[-1])
    refills = fills[(pd.to_numeric(fills["fill"], errors="coerce") >= 2)]
    refills = refills[(refills["start_wall"] >= start) & (refills["end_wall"] <= end)]
    out["refills_in_measure"] = int(len(refills))
    if refills.empty:
        return out
    next_starts = np.sort(refills["start_wall"].to_numpy(dtype=float))
    before, after, remerge = [], [], []
    for begin, finish in zip(refills["start_wall"].to_numpy(dtype=float), refills["end_wall"].to_numpy(dtype=float)):
        i_before = np.searchsorted(t_measure, begin, side="right") - 1
        i_after = np.searchsorted(t_measure, finish, side="left")
        if i_before < 0 or i_after >= t_measure.size:
            continue
        level = float(saved_measure[i_before])
        before.append(level)
        after.append(float(saved_measure[i_after]))
        later = next_starts[next_starts > finish]
        horizon = float(later[0]) if later.size else end
        window = (t_measure >= finish) & (t_measure <= horizon)
        back = np.flatnonzero(window & (saved_measure >= REMERGE_FRACTION * level))
        remerge.append(float(t_measure[back[0]] - finish) if back.size and level > 0 else math.nan)
    if before and pages_total > 0:
        out["saved_share_before_refill_pct"] = 100.0 * float(np.mean(before)) / pages_total
        out["saved_share_after_refill_pct"] = 100.0 * float(np.mean(after)) / pages_total
        out["saved_share_mean_pct"] = 100.0 * time_mean(t_measure, saved_measure) / pages_total
    if remerge:
        finite = [r for r in remerge if math.isfinite(r)]
        out["remerge_s_median"] = float(np.median(finite)) if finite else math.nan
        out["refills_not_remerged"] = len(remerge) - len(finite)
    cow = _col(ksm.loc[in_measure], "vmstat_cow_ksm")
    if cow is not None and np.isfinite(cow).any():
        out["cow_ksm_per_refill"] = _delta(cow) / len(refills)
    return out
