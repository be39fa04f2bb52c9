"""Derived metrics per trial, computed only from what the store wrote (never the live host).

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
and trial.json dicts except the ``load_*`` readers, which read one study folder.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

from orchestrator.policy_metrics import policy_metrics
from orchestrator import costs, cowstats
from orchestrator.errors import StoreError
from orchestrator.plan import writes_during_measure
from orchestrator.stats import time_mean
from orchestrator.stats import (
    NO_INTERVAL,
    Comparison,
    compare_pct,
    mean_ci95,
    minimum_detectable_effect,
    pct_difference,
    repetitions_needed,
)

MIB = 1024 * 1024
DEFAULT_PAGE_SIZE_BYTES = 4096
CONVERGENCE_THRESHOLDS = (50, 90, 99)
# "Converged" = pages_sharing moved less than this fraction of its final value over the window
# made of the last CONVERGENCE_WINDOW_FRACTION of measure samples (at least
# CONVERGENCE_MIN_SAMPLES). Fewer measure samples than that: cannot tell (None).
CONVERGENCE_TOLERANCE = 0.01
CONVERGENCE_WINDOW_FRACTION = 0.10
CONVERGENCE_MIN_SAMPLES = 5
WORKLOAD_METRICS = ("tps", "qps", "latency_p95_ms")

@dataclass
class TrialData:
    """One trial folder as the store wrote it; frames are None when the file is absent."""

    trial_dir: Path
    trial: dict[str, Any]
    ksm: pd.DataFrame | None = None
    ksm_table: pa.Table | None = None  # the same ksm.csv as Arrow, for samples.parquet
    processes: pd.DataFrame | None = None
    workload: pd.DataFrame | None = None
    fills: pd.DataFrame | None = None  # processes workload: every fill's start/end (fills.csv)
    cow: pd.DataFrame | None = None  # probe workload: one row per timed write (cow.csv)
    workload_summary: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def trial_id(self) -> str:
        return str(self.trial.get("trial_id") or self.trial_dir.name)


@dataclass
class StudyData:
    study_dir: Path
    study: dict[str, Any]
    host: dict[str, Any]
    plan_text: str
    trials: list[TrialData]

    @property
    def page_size_bytes(self) -> int:
        return page_size_from_host(self.host)


def page_size_from_host(host: dict[str, Any]) -> int:
    """host.json's page size if it records one, else 4 KiB (the x86-64 base page)."""
    for key in ("page_size_bytes", "page_size"):
        value = host.get(key)
        if isinstance(value, (int, float)) and value > 0:
            return int(value)
    return DEFAULT_PAGE_SIZE_BYTES


# processes.csv columns the metrics use; the rest (t_wall, pid, uss, swap) is not converted,
# which is a quarter of the read time on a large study
PROCESS_COLUMNS = ("t_s", "phase", "label", "rss_kib", "pss_kib", "ksm_merging_pages", "ksm_rmap_items",
                   "ksm_zero_pages", "ksm_process_profit")


def _read_table(path: Path, problems: list[str], columns: tuple[str, ...] | None = None) -> pa.Table | None:
    """pyarrow's multithreaded CSV reader; low-cardinality text (phase, label, guest) is
    dictionary-encoded (pandas categoricals), which keeps filtering and grouping fast."""
    if not path.exists():
        return None
    try:
        options = pacsv.ConvertOptions(auto_dict_encode=True)
        if columns is not None:
            with path.open(newline="") as handle:
                header = next(csv.reader(handle), [])
            options.include_columns = [c for c in columns if c in header]
        return pacsv.read_csv(path, convert_options=options)
    except (pa.ArrowInvalid, OSError) as exc:  # a truncated file must not sink the whole report
        problems.append(f"{path.name} unreadable: {exc}")
        return None


def _to_frame(table: pa.Table | None) -> pd.DataFrame | None:
    # split_blocks: numeric columns are shared with the Arrow table instead of copied
    return None if table is None else table.to_pandas(split_blocks=True)


def _read_csv(path: Path, problems: list[str]) -> pd.DataFrame | None:
    return _to_frame(_read_table(path, problems))


def _read_json(path: Path, problems: list[str]) -> Any:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        problems.append(f"{path.name} unreadable: {exc}")
        return None


def load_trial(trial_dir: Path) -> TrialData:
    """Read one trial folder. A folder without trial.json is reported as status "not_run"."""
    trial_dir = Path(trial_dir)
    problems: list[str] = []
    trial = _read_json(trial_dir / "trial.json", problems)
    if not isinstance(trial, dict):
        trial = {
            "trial_id": trial_dir.name,
            "status": "not_run",
            "reason": problems[0] if problems else "no trial.json (not run, or crashed before storing)",
            "settings": {},
            "ksm": {},
        }
    summary = _read_json(trial_dir / "workload_summary.json", problems)
    ksm_table = _read_table(trial_dir / "ksm.csv", problems)
    return TrialData(
        trial_dir=trial_dir,
        trial=trial,
        ksm=_to_frame(ksm_table),
        ksm_table=ksm_table,
        processes=_to_frame(_read_table(trial_dir / "processes.csv", problems, PROCESS_COLUMNS)),
        workload=_read_csv(trial_dir / "workload.csv", problems),
        fills=_read_csv(trial_dir / "fills.csv", problems),
        cow=_read_csv(trial_dir / "cow.csv", problems),
        workload_summary=summary if isinstance(summary, dict) else None,
        problems=problems,
    )


def load_study(study_dir: Path) -> StudyData:
    """Read a study folder: study.json, host.json, plan.toml and every trial folder."""
    study_dir = Path(study_dir)
    if not study_dir.is_dir():
        raise StoreError(f"{study_dir}: no such study folder")
    problems: list[str] = []
    study = _read_json(study_dir / "study.json", problems)
    if not isinstance(study, dict):
        raise StoreError(f"{study_dir}: study.json missing or unreadable; is this a study folder?")
    host = _read_json(study_dir / "host.json", problems)
    plan_path = study_dir / "plan.toml"
    plan_text = plan_path.read_text(errors="replace") if plan_path.exists() else ""
    trials_root = study_dir / "trials"
    ids = [str(t) for t in study.get("trial_ids", [])]
    on_disk = sorted(p.name for p in trials_root.iterdir() if p.is_dir()) if trials_root.is_dir() else []
    ids += [t for t in on_disk if t not in ids]
    trials = [load_trial(trials_root / t) for t in ids]
    return StudyData(study_dir, study, host if isinstance(host, dict) else {}, plan_text, trials)


# ----------------------------------------------------------------------------- per trial


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


def view_summary(name: str, t_s: np.ndarray, values: np.ndarray, steady_from_s: float,
                 steady_to_s: float = math.inf, steps_s: np.ndarray | None = None) -> dict[str, float]:
    """<name>_end, _mean (whole measure) and _steady (the steady window) of one saving view.
    ``steps_s``: refill starts, where the signal drops (stats.time_mean)."""
    finite = np.isfinite(values)
    out = {f"{name}_end": float(values[finite][-1]) if finite.any() else math.nan,
           f"{name}_mean": time_mean(t_s, values, steps_s=steps_s)}
    steady = (t_s >= steady_from_s) & (t_s <= steady_to_s)
    if steady.any() and math.isfinite(steady_to_s):
        out[f"{name}_steady"] = time_mean(t_s, values, steady_from_s, steady_to_s, steps_s)
    elif steady.any():
        out[f"{name}_steady"] = time_mean(t_s[steady], values[steady], steps_s=steps_s)
    else:
        out[f"{name}_steady"] = out[f"{name}_end"]
    return out


def steady_window(t_measure: np.ndarray, saved_measure: np.ndarray,
                  cycle_starts_s: np.ndarray | None) -> tuple[float, float, int]:
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
    return (np.sort(refills["start_wall"].to_numpy(dtype=float)),
            np.sort(refills.loc[refills["label"] == label, "start_wall"].to_numpy(dtype=float)))


def saved_pages_series(ksm: pd.DataFrame, ksm_settings: dict[str, Any]) -> np.ndarray:
    """pages_sharing (+ ksm_zero_pages when use_zero_pages=1) per row, as float."""
    pages = _col(ksm, "pages_sharing")
    if pages is None:
        return np.full(len(ksm), np.nan)
    zero = _col(ksm, "ksm_zero_pages") if zero_pages_counted(ksm_settings) else None
    return pages + np.nan_to_num(zero) if zero is not None else pages


def ksm_metrics(ksm: pd.DataFrame, ksm_settings: dict[str, Any], page_size_bytes: int,
                fills: pd.DataFrame | None = None) -> dict[str, Any]:
    """Metrics from ksm.csv: saving, convergence, ksmd cost, page-state shares, vmstat deltas.

    ``fills``: the processes workload's fills.csv, when it refills; its refill times cut the
    steady averages to whole cycles and mark where the saving drops."""
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
        refill_starts_s, cycle_starts_s = (np.interp(w, t_wall, t_all, left=-math.inf, right=math.inf)
                                           for w in refills)
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
        out.update(view_summary("general_profit_mib", t_measure, profit[in_measure] / MIB, steady_from_s,
                                steady_to_s, refill_starts_s))
    avail = _col(ksm, "mem_available_kib")
    if avail is not None:
        base = _baseline_index(in_baseline, np.isfinite(avail))
        if base is not None:
            rise = (avail[in_measure] - avail[base]) / 1024
            out.update(view_summary("mem_available_rise_mib", t_measure, rise, steady_from_s, steady_to_s,
                                    refill_starts_s))
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
        out.update(_convergence(sharing, t_rel, scans))
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
    states = {name: _last(_col(measure, name)) for name in
              ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile")}
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


def _convergence(sharing: np.ndarray, t_rel: np.ndarray | None, scans: np.ndarray | None) -> dict[str, Any]:
    """Time and full scans (since measure start) to first reach 50/90/99% of the final value.

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
        window = sharing[-max(CONVERGENCE_MIN_SAMPLES, math.ceil(n * CONVERGENCE_WINDOW_FRACTION)):]
        spread = float(np.nanmax(window) - np.nanmin(window))
        out["converged"] = bool(spread <= CONVERGENCE_TOLERANCE * final) if final > 0 else spread == 0
    return out


def process_metrics(processes: pd.DataFrame, steady_window_t_s: tuple[float, float] = (-math.inf, math.inf),
                    ) -> tuple[dict[str, Any], pd.DataFrame]:
    """PSS drop (summed over tracked processes) and KSM metadata overhead; plus a per-process table.

    PSS is only read on PSS-tier ticks; the sampler writes one t_s per tick for all processes, so a
    tick is identified by t_s. Baseline = last PSS tick of phase baseline (else the first PSS
    tick); end = last PSS tick of measure. Merging pages, rmap items and profit are taken from
    each process's last measure row (those come from ksm_stat on every tick).
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
        tier = np.flatnonzero(np.isfinite(pss))
        ticks, first_row, tick_of_row = np.unique(t_s[tier], return_index=True, return_inverse=True)
        tick_pss = np.bincount(tick_of_row, weights=pss[tier])
        tick_rows = tier[first_row]
        base = _baseline_index(in_baseline[tick_rows], np.ones(ticks.size, dtype=bool))
        measure_ticks = np.flatnonzero(in_measure[tick_rows])
        if base is not None and measure_ticks.size:
            end = measure_ticks[-1]
            drop_mib = (tick_pss[base] - tick_pss[measure_ticks]) / 1024
            out.update(view_summary("pss_drop_mib", ticks[measure_ticks], drop_mib, *steady_window_t_s))
            out["pss_samples"] = int(measure_ticks.size)
            for name, tick in (("pss_before_kib", base), ("pss_after_kib", end)):
                rows = tier[tick_of_row == tick]
                per_proc[name] = (pd.Series(pss[rows], index=codes[rows]).groupby(level=0).sum()
                                  .reindex(range(names.size)).to_numpy())
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


def workload_per_guest(workload: pd.DataFrame | None, summary: dict[str, Any] | None) -> pd.DataFrame:
    """tps, qps, latency_p95_ms per guest: from workload_summary.json, else workload.csv.

    From the interval rows latency_p95_ms is the mean of per-interval p95s, an approximation of
    the run's p95; the summary's value is sysbench's own and is preferred.
    """
    rows = []
    if summary:
        for guest, values in summary.items():
            if isinstance(values, dict):
                rows.append({"guest": str(guest), **{m: _as_float(values.get(m)) for m in WORKLOAD_METRICS}})
    if rows:
        return pd.DataFrame(rows)
    if workload is None or workload.empty or "guest" not in workload.columns:
        return pd.DataFrame(columns=["guest", *WORKLOAD_METRICS])
    present = [m for m in WORKLOAD_METRICS if m in workload.columns]
    per_guest = workload.groupby("guest", sort=True)[present].mean().reset_index()
    per_guest["guest"] = per_guest["guest"].astype(str)
    return per_guest.reindex(columns=["guest", *WORKLOAD_METRICS])


def _as_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def trial_metrics(trial: Path | TrialData, page_size_bytes: int = DEFAULT_PAGE_SIZE_BYTES) -> dict[str, Any]:
    """All scalar metrics of one trial plus "per_process" and "workload_per_guest" (DataFrames).

    Failed and not-run trials get their status and reason and no metrics (NaN in study tables):
    partial data from a failed trial is not mixed into means.
    """
    data = trial if isinstance(trial, TrialData) else load_trial(Path(trial))
    info = data.trial
    out: dict[str, Any] = {
        "trial_id": data.trial_id,
        "status": str(info.get("status") or "unknown"),
        "reason": info.get("reason"),
        "ksm_off": bool(info.get("ksm_off", False)),
        "kind": info.get("kind"),
        "repetition": info.get("repetition"),
        "index": info.get("index"),
        "data_problems": "; ".join(data.problems) or None,
        "per_process": pd.DataFrame(),
        "workload_per_guest": pd.DataFrame(columns=["guest", *WORKLOAD_METRICS]),
    }
    provision = info.get("provision") or {}
    out["guest_start"] = provision.get("start")
    # Seconds from "start the guests" to "every guest answers": restore + SSH + clock + identity
    # for restored trials, define + boot to SSH for booted ones (not kept: they did not start).
    out["guest_start_s"] = provision.get("start_s", provision.get("boot_wall_s") if not provision.get("reused") else None)
    if out["status"] != "ok":
        return out
    ksm_settings = info.get("ksm") or {}
    if data.ksm is not None and not data.ksm.empty:
        out.update(ksm_metrics(data.ksm, ksm_settings, page_size_bytes, data.fills))
    steady_window_t_s = out.pop("_steady_window_t_s", (-math.inf, math.inf))
    if data.processes is not None and not data.processes.empty:
        proc_out, per_proc = process_metrics(data.processes, steady_window_t_s)
        out.update(proc_out)
        out["per_process"] = per_proc
    # The policy's name, whether it ever ran KSM, and the scan rate its knobs asked for.
    out.update(policy_metrics(data.ksm, info))
    workload = info.get("workload") or {}
    choose_headline(out, writes_during_measure(workload))
    out.update(merged_share(out, workload))
    if data.ksm is not None and data.fills is not None and not data.fills.empty:
        out.update(refill_metrics(data.ksm, data.fills, ksm_settings, workload_pages(workload)))
    out.update(cost_metrics(data, out, ksm_settings, page_size_bytes))
    guests = workload_per_guest(data.workload, data.workload_summary)
    out["workload_per_guest"] = guests
    for name in WORKLOAD_METRICS:
        out[name] = float(guests[name].mean()) if not guests.empty else math.nan
    return out


def cost_metrics(data: TrialData, out: dict[str, Any], ksm_settings: dict[str, Any],
                 page_size_bytes: int) -> dict[str, Any]:
    """Scan speed, the zero-page split and KSM's own memory (KSM-on trials), the probe
    workload's merge/unmerge record and its copy-on-write latencies (costs.py, cowstats.py)."""
    extra: dict[str, Any] = {}
    info = data.trial
    if data.ksm is not None and not data.ksm.empty and not out["ksm_off"]:
        measure = data.ksm.loc[phase_mask(data.ksm, "measure")]
        # The nominal rate the policy's sampled knobs asked for (policy_metrics), when it has one.
        extra.update(costs.scan_speed(measure, ksm_settings, float(out.get("measure_s", math.nan)),
                                      nominal=out.get("nominal_pages_per_s")))
        extra.update(costs.zero_page_split(measure, ksm_settings, page_size_bytes))
        extra.update(costs.metadata_memory(measure, page_size_bytes,
                                           float(out.get("ksm_rmap_items", math.nan))))
    if isinstance(info.get("probe"), dict) and not out["ksm_off"]:
        # a KSM-off probe trial merges nothing by design: only its COW timing (the floor) counts
        extra.update(costs.probe_record_metrics(info["probe"], page_size_bytes))
    extra.update(cowstats.cow_summary(data.cow))
    if isinstance(info.get("density"), dict):
        from orchestrator.density import density_summary

        extra.update(density_summary(info["density"]))
    return extra


SAVING_VIEWS = ("saved_mib", "general_profit_mib", "pss_drop_mib", "mem_available_rise_mib")


def choose_headline(out: dict[str, Any], writes: bool) -> None:
    """Set each saving view's headline column from its steady average (a workload that writes
    during measure) or its end value (one that does not), and the ratios built on them."""
    suffix = "_steady" if writes else "_end"
    for view in SAVING_VIEWS:
        if f"{view}{suffix}" in out:
            out[view] = out[f"{view}{suffix}"]
    if "saved_mib" in out:
        out["saving_basis"] = ("steady mean (the workload writes during measure)" if writes
                               else "end of measure")
    saved = out.get("saved_mib", math.nan)
    if out.get("ksmd_cpu_s", 0) > 0 and math.isfinite(saved):
        out["mib_saved_per_ksmd_cpu_s"] = saved / out["ksmd_cpu_s"]
    profit = out.get("general_profit_mib", math.nan)
    if saved > 0 and math.isfinite(profit):
        out["profit_to_saving_ratio"] = profit / saved


def workload_pages(workload: dict[str, Any]) -> float:
    """Pages the processes workload maps in all (NaN for guests: their RAM is not all data)."""
    if workload.get("type") == "probe":
        return float(workload.get("pages", math.nan))
    if workload.get("type") != "processes":
        return math.nan
    try:
        return float(int(workload["processes"]) * int(workload["pages_per_process"]))
    except (KeyError, TypeError, ValueError):
        return math.nan


def merged_share(out: dict[str, Any], workload: dict[str, Any]) -> dict[str, float]:
    """Share of the workload's pages in the merged state (pages_shared + pages_sharing), as a
    time mean over measure and at its end. The mean over samples is the definition the original
    study's "FIXED_RANDOM merged about 87-93% of its pages" used."""
    pages = workload_pages(workload)
    if not pages > 0 or "merged_pages_mean" not in out:
        return {}
    return {"merged_share_mean_pct": 100.0 * out["merged_pages_mean"] / pages,
            "merged_share_end_pct": 100.0 * out["merged_pages_end"] / pages}


REMERGE_FRACTION = 0.90  # re-merged = back to 90% of the saving just before the refill


def refill_metrics(ksm: pd.DataFrame, fills: pd.DataFrame, ksm_settings: dict[str, Any],
                   pages_total: float) -> dict[str, Any]:
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


# ----------------------------------------------------------------------------- study level
#
# The unit of replication is the trial. A trial's workload value is its guests' mean; guests of
# one trial share the host, ksmd's timing and each other, so their spread is described
# (``{m}_guest_sd``) but never used for an interval or a verdict. With repetitions > 1 the sweep
# runs trials in blocks (block = trial.json "repetition"): every setting once per block, plus a
# KSM-off trial per non-KSM setting, so comparisons with KSM off are paired within blocks.


def is_ksm_axis(axis: str, ksm_settings: dict[str, Any]) -> bool:
    """An axis that sets a KSM knob: named like one of the trial's KSM knobs, or prefixed "ksm"."""
    leaf = axis.rsplit(".", 1)[-1]
    return axis.lower().startswith("ksm") or leaf in ksm_settings


def _setting_key(settings: dict[str, Any], axes: list[str]) -> str:
    return json.dumps({a: settings.get(a) for a in axes}, sort_keys=True, default=str)


def _settings_value(value: Any) -> Any:
    return value if value is None or isinstance(value, (bool, int, float, str)) else json.dumps(value, sort_keys=True)


@dataclass
class StudyMetrics:
    """Everything the report needs, computed once.

    trials: one row per trial (failed and excluded ones too; ``used_in_stats`` says which feed
    the aggregates). settings: one row per setting (trials that differ only by repetition) with
    means and 95% CI half widths across trials. per_process / guests: long tables. noise: the
    run-to-run noise floor from repeated KSM-off trials (see ``noise_floor``).
    """

    trials: pd.DataFrame
    settings: pd.DataFrame
    per_process: pd.DataFrame
    guests: pd.DataFrame
    axes: list[str]
    swept_axes: list[str]
    ksm_axes: list[str]
    page_size_bytes: int
    noise: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def blocks(self) -> int:
        """Distinct repetitions (blocks) among the trials used in statistics."""
        return study_blocks(self.trials)


SUMMARY_METRICS = (
    "saved_mib", "general_profit_mib", "pss_drop_mib", "mem_available_rise_mib",
    "ksmd_cpu_pct", "ksmd_cpu_pct_max", "ksmd_cpu_s", "mib_saved_per_ksmd_cpu_s",
    "time_to_90pct_s", "full_scans",
    "saved_mib_end", "saved_mib_mean", "merged_share_mean_pct", "outside_cpu_pct",
    # scan speed, zero pages, KSM's own memory (costs.py)
    "pages_scanned_per_s", "nominal_pages_per_s", "scan_rate_achieved_pct", "seconds_per_full_scan",
    "zero_pages_mib", "content_merged_mib", "rmap_items_mib", "stable_nodes_mib", "ksm_metadata_mib",
    "profit_after_stable_nodes_mib",
    # probe workload (costs.py, cowstats.py)
    "merge_mib_per_s", "merge_mib_per_ksmd_cpu_s", "unmerge_s_per_gib",
    "cow_merged_p50_ns", "cow_merged_p90_ns", "cow_merged_p99_ns",
    "cow_unmerged_p50_ns", "cow_unmerged_p90_ns", "cow_unmerged_p99_ns", "cow_median_ratio",
)
# Present in the per-trial table even when no trial produced them (e.g. all failed).
ALWAYS_COLUMNS = (*SUMMARY_METRICS, *WORKLOAD_METRICS, "converged", "time_to_50pct_s",
                  "time_to_99pct_s", "thp_split_page_delta", "cow_ksm_delta")
# The statistics read these whether or not the sweep / sampler recorded them.
STATS_INPUT_COLUMNS = ("outside_cpu_pct",)
# Savings net of drift: a delta-based saving minus the same delta in the matched KSM-off trials
# (guests keep allocating during a trial: in one KSM-off trial PSS rose 95 MiB and MemAvailable
# fell 94 MiB with no KSM at all, and every KSM-on delta includes that growth too).
NET_OF_DRIFT = {"pss_drop_mib": "pss_drop_net_mib", "mem_available_rise_mib": "mem_available_rise_net_mib"}
NET_METRICS = tuple(NET_OF_DRIFT.values())
# Baselines of a KSM-on trial, best first (the trials table's "baseline" column).
SAME_BLOCK = "same block"            # the matched KSM-off trial(s) of the trial's own block
MATCHED = "matched"                  # mean of the matched KSM-off trials of all blocks
STUDY_OFF_MEAN = "study KSM-off mean"  # no matched KSM-off trial: every KSM-off trial


def _trial_row(data: TrialData, page_size_bytes: int) -> tuple[dict[str, Any], pd.DataFrame, pd.DataFrame]:
    """One trials-table row (with internal _columns) and the trial's per-process / per-guest frames."""
    m = trial_metrics(data, page_size_bytes)
    per_proc, per_guest = m.pop("per_process"), m.pop("workload_per_guest")
    info = data.trial
    settings = info.get("settings") or {}
    m["_settings"] = {str(k): _settings_value(v) for k, v in settings.items()}
    m["_ksm"] = info.get("ksm") or {}
    # disturbance is judged by the sweep during measure; trial.json's value wins over a ksm.csv mean
    m["disturbed"] = bool(info.get("disturbed", False))
    if isinstance(info.get("outside_cpu_pct"), (int, float)):
        m["outside_cpu_pct"] = float(info["outside_cpu_pct"])
    m["rerun_of"] = str(info["rerun_of"]) if info.get("rerun_of") else None
    return m, per_proc, per_guest


def compute_study(study: StudyData) -> StudyMetrics:
    page = study.page_size_bytes
    rows, procs, guests = [], [], []
    for data in study.trials:
        m, per_proc, per_guest = _trial_row(data, page)
        rows.append(m)
        if not per_proc.empty:
            procs.append(per_proc.assign(trial_id=m["trial_id"]))
        if not per_guest.empty:
            guests.append(per_guest.assign(trial_id=m["trial_id"]))

    axes = sorted({a for r in rows for a in r["_settings"]})
    swept = [a for a in axes if len({json.dumps(r["_settings"].get(a), default=str) for r in rows
                                      if r["_settings"].get(a) is not None}) > 1]
    ksm_axes = [a for a in axes if any(is_ksm_axis(a, r["_ksm"]) for r in rows)]
    label_axes = swept or []
    for r in rows:
        r["setting"] = setting_label(r["_settings"], label_axes, r["ksm_off"])
        r["_group"] = _setting_key(r["_settings"], axes) + ("|off" if r["ksm_off"] else "")
        for a in axes:
            r[a] = r["_settings"].get(a)

    other_axes = [a for a in axes if a not in ksm_axes]
    for r in rows:
        r["_offkey"] = _setting_key(r["_settings"], other_axes)
    identity = ["trial_id", "status", "reason", "ksm_off", "kind", "repetition", "index", "setting",
                "data_problems", "disturbed", "rerun_of", "_settings", "_ksm", "_group", "_offkey"]
    trials = pd.DataFrame(rows, columns=None if rows else identity)
    trials["ksm_off"] = trials["ksm_off"].astype(bool)
    trials["disturbed"] = trials["disturbed"].astype(bool)
    for name in (*ALWAYS_COLUMNS, *STATS_INPUT_COLUMNS):
        if name not in trials.columns:
            trials[name] = math.nan
    guests_df = pd.concat(guests, ignore_index=True) if guests else pd.DataFrame(columns=["guest", *WORKLOAD_METRICS, "trial_id"])
    _add_guest_spread(trials, guests_df)
    _mark_used_in_stats(trials)
    _add_ksm_off_deltas(trials)
    settings_df = _settings_table(trials, axes)
    per_process = pd.concat(procs, ignore_index=True) if procs else pd.DataFrame()
    if not per_process.empty:
        per_process = per_process[["trial_id", *[c for c in per_process.columns if c != "trial_id"]]]
    return StudyMetrics(trials, settings_df, per_process, guests_df, axes, swept, ksm_axes, page,
                        noise=noise_floor(trials))


def setting_label(settings: dict[str, Any], axes: list[str], ksm_off: bool) -> str:
    parts = [f"{a}={settings.get(a)}" for a in axes if settings.get(a) is not None]
    if ksm_off:
        parts.insert(0, "KSM off")
    return ", ".join(parts) or "all trials"


def study_blocks(trials: pd.DataFrame) -> int:
    """How many blocks (distinct repetition values) the trials used in statistics span."""
    if trials.empty or "used_in_stats" not in trials.columns:
        return 0
    return int(trials.loc[trials["used_in_stats"], "repetition"].dropna().nunique())


def _add_guest_spread(trials: pd.DataFrame, guests: pd.DataFrame) -> None:
    """``{m}_guest_sd``: sd across one trial's guests. Description only: the guests of a trial
    are not replicates, so this spread never enters an interval or a verdict."""
    for name in WORKLOAD_METRICS:
        column = f"{name}_guest_sd"
        if guests.empty or name not in guests.columns:
            trials[column] = math.nan
            continue
        values = pd.to_numeric(guests[name], errors="coerce")
        spread = values.groupby(guests["trial_id"]).std(ddof=1)
        trials[column] = trials["trial_id"].map(spread).astype(float)


def _mark_used_in_stats(trials: pd.DataFrame) -> None:
    """``used_in_stats`` / ``stats_note`` per trial. Rows are never dropped: a trial left out of
    the aggregates stays in the table with the reason.

    A disturbed trial (outside CPU load above the plan's threshold during measure) whose rerun
    is ok is replaced by that rerun; without an ok rerun it is used, and flagged."""
    ok = trials["status"] == "ok"
    ok_reruns: dict[str, list[str]] = {}
    reruns = trials.loc[ok & trials["rerun_of"].notna(), ["trial_id", "rerun_of"]]
    for rerun_id, original in reruns.itertuples(index=False):
        ok_reruns.setdefault(str(original), []).append(str(rerun_id))
    used, notes = [], []
    for row in trials.itertuples(index=False):
        if row.status != "ok":
            used.append(False)
            notes.append(f"{row.status}; not used")
        elif row.disturbed and row.trial_id in ok_reruns:
            used.append(False)
            notes.append(f"disturbed; rerun {_final_rerun(row.trial_id, ok_reruns, trials)} used")
        elif row.disturbed:
            used.append(True)
            notes.append("disturbed; used, no ok rerun")
        else:
            used.append(True)
            notes.append(f"rerun of {row.rerun_of}" if row.rerun_of else None)
    trials["used_in_stats"] = pd.Series(used, index=trials.index, dtype=bool)
    trials["stats_note"] = pd.Series(notes, index=trials.index, dtype=object)


def _final_rerun(trial_id: str, ok_reruns: dict[str, list[str]], trials: pd.DataFrame) -> str:
    """Follow reruns of reruns (a rerun can itself be disturbed and rerun) to the one used."""
    disturbed = dict(zip(trials["trial_id"], trials["disturbed"]))
    seen = {trial_id}
    current = ok_reruns[trial_id][-1]
    while disturbed.get(current) and current in ok_reruns and current not in seen:
        seen.add(current)
        current = ok_reruns[current][-1]
    return current


def _off_baseline(off: pd.DataFrame, offkey: str, block: Any = None) -> tuple[pd.DataFrame, str]:
    """The KSM-off trials to compare with, best first: the matched one(s) of the same block, else
    the matched ones of all blocks (same non-KSM settings), else every KSM-off trial."""
    matched = off[off["_offkey"] == offkey]
    if matched.empty:
        return off, STUDY_OFF_MEAN
    if block is not None and not _is_nan(block):
        same_block = matched[matched["repetition"] == block]
        if not same_block.empty:
            return same_block, SAME_BLOCK
    return matched, MATCHED


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _add_ksm_off_deltas(trials: pd.DataFrame) -> None:
    """Per KSM-on trial: change (%) of tps/qps/p95 vs its KSM-off baseline (``_off_baseline``;
    the "baseline" column says which), and the delta-based savings net of drift (matched
    KSM-off trials only: an unmatched trial's drift belongs to other settings)."""
    trials["baseline"] = None
    for name in WORKLOAD_METRICS:
        trials[f"{name}_vs_off_pct"] = math.nan
    for net in NET_METRICS:
        trials[net] = math.nan
    off = trials[trials["ksm_off"] & trials["used_in_stats"]]
    if off.empty:
        return
    for i, row in trials.iterrows():  # one pass per trial, not per sample
        if row["ksm_off"] or row["status"] != "ok":
            continue
        base, how = _off_baseline(off, row["_offkey"], row["repetition"])
        trials.at[i, "baseline"] = how
        for name in WORKLOAD_METRICS:
            ref = float(base[name].mean())
            if ref and math.isfinite(ref):
                trials.at[i, f"{name}_vs_off_pct"] = 100.0 * (row[name] - ref) / ref
        if how != STUDY_OFF_MEAN:
            for raw, net in NET_OF_DRIFT.items():
                trials.at[i, net] = row[raw] - float(base[raw].mean())


def _by_block(frame: pd.DataFrame, name: str) -> pd.Series:
    """Mean of a metric per block (a block can hold a trial and its rerun, or none)."""
    values = pd.to_numeric(frame[name], errors="coerce")
    return values.groupby(frame["repetition"]).mean()


def _vs_off_columns(on: pd.DataFrame, off: pd.DataFrame, offkey: str) -> dict[str, Any]:
    """``{m}_vs_off_pct``, ``_ci95_pct``, ``_n``, ``_method`` of one KSM-on setting.

    Paired by block when >= 2 blocks hold both the setting and its matched KSM-off trial, else
    Welch on trial values, else no interval (stats.compare_pct). Against unmatched KSM-off
    trials only the difference of means is given: their spread includes other settings' effects,
    so it is not noise and no interval is drawn from it."""
    base, how = _off_baseline(off, offkey)
    out: dict[str, Any] = {"baseline": how}
    for name in WORKLOAD_METRICS:
        if how == MATCHED:
            paired = pd.concat([_by_block(on, name), _by_block(base, name)], axis=1, join="inner")
            comparison = compare_pct(paired.iloc[:, 0], paired.iloc[:, 1], on[name], base[name])
        else:
            comparison = Comparison(pct_difference(on[name], base[name]), math.nan,
                                    int(on[name].notna().sum()), NO_INTERVAL)
        out[f"{name}_vs_off_pct"] = comparison.pct
        out[f"{name}_vs_off_ci95_pct"] = comparison.half_pct
        out[f"{name}_vs_off_n"] = comparison.n
        out[f"{name}_vs_off_method"] = comparison.method
    return out


def settings_comparison(row: Any, metric: str) -> Comparison:
    """A settings-table row's comparison with KSM off for one workload metric, as stored by
    ``_vs_off_columns`` (for stats.comparison_verdict in report, compare and recommend)."""
    def get(suffix: str, default: Any = math.nan) -> Any:
        value = row.get(f"{metric}_vs_off{suffix}", default)
        return default if value is None or (isinstance(value, float) and math.isnan(value)) else value

    return Comparison(float(get("_pct")), float(get("_ci95_pct")), int(get("_n", 0)), str(get("_method", NO_INTERVAL)))


def _settings_table(trials: pd.DataFrame, axes: list[str]) -> pd.DataFrame:
    """One row per setting: trials, ok and n (trials used in statistics), then for every metric
    the mean, the 95% t half width and the count of trials it is over. All intervals are across
    trials (one value per trial: a trial's workload value is its guests' mean); the guests'
    spread inside a trial is kept as ``{m}_guest_sd`` (mean over trials), description only."""
    if trials.empty:
        return pd.DataFrame()
    used = trials[trials["used_in_stats"]]
    off = used[used["ksm_off"]]
    rows = []
    for group, members in trials.groupby("_group", sort=False):
        first = members.iloc[0]
        in_stats = members[members["used_in_stats"]]
        row: dict[str, Any] = {"setting": first["setting"], "ksm_off": bool(first["ksm_off"]),
                               "trials": len(members), "ok": int((members["status"] == "ok").sum()),
                               "n": len(in_stats)}
        row.update({a: first[a] for a in axes})
        for name in (*SUMMARY_METRICS, *NET_METRICS, *WORKLOAD_METRICS):
            row[name], row[f"{name}_ci95"], row[f"{name}_n"] = mean_ci95(in_stats[name])
        for name in WORKLOAD_METRICS:
            row[f"{name}_guest_sd"] = float(in_stats[f"{name}_guest_sd"].mean()) if len(in_stats) else math.nan
        if not first["ksm_off"] and not off.empty:
            row.update(_vs_off_columns(in_stats, off, first["_offkey"]))
        row["_group"] = group
        row["_offkey"] = first["_offkey"]
        rows.append(row)
    return pd.DataFrame(rows)


# ---- noise floor

NOISE_METRICS = ("tps", "latency_p95_ms", "mem_available_rise_mib")
REPETITIONS_TARGET_PCT = 5.0  # "how many repetitions would a 5% tps change need"
REPETITIONS_TARGET_METRICS = ("tps",)  # a % of mean drift (MemAvailable) is not a useful target
NOISE_COLUMNS = ("metric", "group", "n_trials", "mean", "sd", "cv_pct", "mde", "mde_pct_of_mean",
                 "repetitions_for_5pct", "_offkey")


def noise_floor(trials: pd.DataFrame) -> pd.DataFrame:
    """Run-to-run noise from the KSM-off trials, which repeat once per block with the same
    non-KSM settings: one row per metric x non-KSM setting group.

    n_trials: KSM-off trials of the group with a value; mean, sd (ddof=1), cv_pct = 100 sd/|mean|;
    mde: stats.minimum_detectable_effect(sd, n_trials), the smallest difference between two
    settings of n_trials trials each detectable at 95% confidence with 80% power (metric units),
    and as % of the mean; repetitions_for_5pct (tps only): trials per setting needed for a 5%
    change (inf: more than stats.REPETITIONS_SEARCH_CAP). sd and what follows are NaN below 2 trials.
    """
    if trials.empty or "used_in_stats" not in trials.columns:
        return pd.DataFrame(columns=list(NOISE_COLUMNS))
    off = trials[trials["ksm_off"] & trials["used_in_stats"]]
    rows = []
    for offkey, members in off.groupby("_offkey", sort=False):
        for metric in NOISE_METRICS:
            values = pd.to_numeric(members[metric], errors="coerce").dropna().to_numpy(float)
            if values.size:
                rows.append({"metric": metric, "group": members["setting"].iloc[0], "_offkey": offkey,
                             **_noise_row(metric, values)})
    return pd.DataFrame(rows, columns=list(NOISE_COLUMNS))


def _noise_row(metric: str, values: np.ndarray) -> dict[str, Any]:
    n = int(values.size)
    mean = float(values.mean())
    sd = float(values.std(ddof=1)) if n >= 2 else math.nan
    scale = abs(mean) if mean else math.nan  # no percentages of a zero mean
    mde = float(minimum_detectable_effect(sd, n))
    reps = (repetitions_needed(sd, REPETITIONS_TARGET_PCT / 100 * scale)
            if metric in REPETITIONS_TARGET_METRICS else math.nan)
    return {"n_trials": n, "mean": mean, "sd": sd, "cv_pct": 100 * sd / scale, "mde": mde,
            "mde_pct_of_mean": 100 * mde / scale, "repetitions_for_5pct": reps}


def study_metrics(study_dir: Path) -> pd.DataFrame:
    """One row per trial (failed ones included, with status/reason and NaN metrics)."""
    return public_trials_table(compute_study(load_study(Path(study_dir))))


def public_trials_table(sm: StudyMetrics) -> pd.DataFrame:
    """The per-trial table without internal columns, settings right after the identity."""
    frame = sm.trials.drop(columns=[c for c in sm.trials.columns if c.startswith("_")])
    first = ["trial_id", "status", "reason", "setting", *sm.axes, "ksm_off", "repetition"]
    first = [c for c in first if c in frame.columns]
    return frame[first + [c for c in frame.columns if c not in first]]


def samples_arrow(study: StudyData, sm: StudyMetrics) -> pa.Table:
    """Tidy table: every trial's ksm.csv rows stacked, with trial_id, status, ksm_off and
    setting_<axis> columns for the swept settings (prefixed: an axis may share a sysfs name).

    Built in Arrow straight from the tables read, so 1M rows cost no pandas concat."""
    by_id = sm.trials.set_index("trial_id")
    kept = [d for d in study.trials if d.ksm_table is not None and d.ksm_table.num_rows]
    if not kept:
        return pa.table({"trial_id": pa.array([], pa.string()), "status": pa.array([], pa.string())})
    # a trial read a column as int, another as float (NaN), or lacked it: promote / fill nulls
    table = pa.concat_tables([d.ksm_table for d in kept], promote_options="permissive")
    ids = [d.trial_id for d in kept]
    position = pa.array(np.repeat(np.arange(len(kept), dtype=np.int32), [d.ksm_table.num_rows for d in kept]))

    def per_trial(values: list[Any]) -> pa.Array:
        return pa.array(values).take(position)  # one value per trial, expanded by index

    extra: list[tuple[str, pa.Array]] = [
        ("trial_id", pa.DictionaryArray.from_arrays(position, pa.array(ids, pa.string()))),
        ("status", per_trial([str(by_id.at[t, "status"]) for t in ids]).dictionary_encode()),
        ("ksm_off", per_trial([bool(by_id.at[t, "ksm_off"]) for t in ids])),
    ]
    for axis in sm.swept_axes:
        values = [by_id.at[t, "_settings"].get(axis) for t in ids]
        numeric = all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in values)
        if numeric:
            extra.append((f"setting_{axis}", per_trial([None if v is None else float(v) for v in values])))
        else:  # parquet needs one type per column
            extra.append((f"setting_{axis}", per_trial([None if v is None else str(v) for v in values])))
    for i, (name, column) in enumerate(extra):
        table = table.add_column(i, name, column)
    return table


def samples_from(study: StudyData, sm: StudyMetrics) -> pd.DataFrame:
    return samples_arrow(study, sm).to_pandas()


def samples_table(study_dir: Path) -> pd.DataFrame:
    study = load_study(Path(study_dir))
    return samples_from(study, compute_study(study))
