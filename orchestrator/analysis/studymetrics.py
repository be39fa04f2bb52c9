"""Study-level metrics: the trials table, one row per setting with intervals across trials,
comparisons with KSM off, savings net of drift, the noise floor, and samples.parquet's table.

The unit of replication is the trial. A trial's workload value is its guests' mean; guests of
one trial share the host, ksmd's timing and each other, so their spread is described
(``{m}_guest_sd``) but never used for an interval or a verdict. With repetitions > 1 the sweep
runs trials in blocks (block = trial.json "repetition"): every setting once per block, plus a
KSM-off trial per non-KSM setting, so comparisons with KSM off are paired within blocks. Only
then: a study whose plan ran in sequential or shuffled order (study.json "order") has
repetitions that are labels, not blocks run side by side, so it is compared by Welch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from orchestrator.analysis.stats import (
    NO_INTERVAL,
    Comparison,
    compare_pct,
    comparison_dof,
    comparison_p_value,
    holm_reject,
    blocks_needed,
    mean_ci95,
    minimum_detectable_effect,
    paired_minimum_detectable_effect,
    paired_pct_differences,
    pct_difference,
    pooled_sd,
    repetitions_needed,
    sd_range95,
    shared_block_dof,
)
from orchestrator.plan import CONVERGE_TOLERANCE_PCT, axis_value_text, stored_converge_tolerance_pct
from orchestrator.store.studydata import StudyData, TrialData, load_study
from orchestrator.analysis import costs as diversity
from orchestrator.analysis.trialmetrics import WORKLOAD_METRICS, trial_metrics


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
    run-to-run noise floor, paired by block where the study is blocked (see ``noise_floor``).
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
    order: str = "blocked"  # study.json "order" (see study_order)
    converge_tolerance_pct: float = CONVERGE_TOLERANCE_PCT  # the plan's, behind the "converged" column

    @property
    def paired_by_block(self) -> bool:
        return self.order == BLOCKED

    @property
    def blocks(self) -> int:
        """Distinct repetitions (blocks) among the trials used in statistics."""
        return study_blocks(self.trials)


SUMMARY_METRICS = (
    "saved_mib",
    "general_profit_mib",
    "pss_drop_mib",
    "mem_available_rise_mib",
    "ksmd_cpu_pct",
    "ksmd_cpu_pct_max",
    "ksmd_cpu_s",
    "mib_saved_per_ksmd_cpu_s",
    "time_to_90pct_s",
    "full_scans",
    "saved_mib_end",
    "saved_mib_mean",
    "merged_share_mean_pct",
    "outside_cpu_pct",
    # scan speed, zero pages, KSM's own memory (costs.py)
    "pages_scanned_per_s",
    "nominal_pages_per_s",
    "scan_rate_achieved_pct",
    "seconds_per_full_scan",
    "zero_pages_mib",
    "content_merged_mib",
    "rmap_items_mib",
    "stable_nodes_mib",
    "ksm_metadata_mib",
    "profit_after_stable_nodes_mib",
    # probe workload (costs.py, cowstats.py)
    "merge_mib_per_s",
    "merge_mib_per_ksmd_cpu_s",
    "unmerge_s_per_gib",
    "cow_merged_p50_ns",
    "cow_merged_p90_ns",
    "cow_merged_p99_ns",
    "cow_unmerged_p50_ns",
    "cow_unmerged_p90_ns",
    "cow_unmerged_p99_ns",
    "cow_p50_diff_ns",
)
# Per trial only, never averaged with an interval: a ratio whose denominator sits near the
# timer's floor is not a quantity a t interval describes (cowstats.py).
DESCRIPTION_ONLY = ("cow_median_ratio",)
# Present in the per-trial table even when no trial produced them (e.g. all failed).
ALWAYS_COLUMNS = (
    *SUMMARY_METRICS,
    *DESCRIPTION_ONLY,
    *WORKLOAD_METRICS,
    "converged",
    "time_to_50pct_s",
    "trial_wall_s",
    "time_to_99pct_s",
    "thp_split_page_delta",
    "cow_ksm_delta",
    "pss_age_max_s",
)
# The statistics read these whether or not the sweep / sampler recorded them.
STATS_INPUT_COLUMNS = ("outside_cpu_pct",)
# Savings net of drift: a delta-based saving minus the same delta in the matched KSM-off trials
# (guests keep allocating during a trial: in one KSM-off trial PSS rose 95 MiB and MemAvailable
# fell 94 MiB with no KSM at all, and every KSM-on delta includes that growth too).
NET_OF_DRIFT = {"pss_drop_mib": "pss_drop_net_mib", "mem_available_rise_mib": "mem_available_rise_net_mib"}
NET_METRICS = tuple(NET_OF_DRIFT.values())
# Baselines of a KSM-on trial, best first (the trials table's "baseline" column).
SAME_BLOCK = "same block"  # the matched KSM-off trial(s) of the trial's own block
MATCHED = "matched"  # mean of the matched KSM-off trials of all blocks
STUDY_OFF_MEAN = "study KSM-off mean"  # no matched KSM-off trial: every KSM-off trial


BLOCKED = "blocked"


def study_order(study_json: dict[str, Any]) -> str:
    """The run order study.json records. Studies written before the field existed ran blocked
    whenever they had repetitions (the plan's default then), so they are read as blocked."""
    order = study_json.get("order")
    return str(order) if order else BLOCKED


def _trial_row(
    data: TrialData, page_size_bytes: int, converge_tolerance_pct: float
) -> tuple[dict[str, Any], pd.DataFrame, pd.DataFrame]:
    """One trials-table row (with internal _columns) and the trial's per-process / per-guest frames."""
    m = trial_metrics(data, page_size_bytes, converge_tolerance_pct)
    per_proc, per_guest = m.pop("per_process"), m.pop("workload_per_guest")
    info = data.trial
    m["_settings"] = {str(k): _settings_value(v) for k, v in info.settings.items()}
    m["_ksm"] = info.ksm
    # disturbance is judged by the sweep during measure; trial.json's value wins over a ksm.csv mean
    m["disturbed"] = info.disturbed
    if info.outside_cpu_pct is not None:
        m["outside_cpu_pct"] = float(info.outside_cpu_pct)
    m["rerun_of"] = info.rerun_of or None
    m["rerun_in_block"] = info.rerun_in_block
    return m, per_proc, per_guest


def compute_study(study: StudyData) -> StudyMetrics:
    page = study.page_size_bytes
    tolerance_pct = stored_converge_tolerance_pct(study.plan_text)
    rows, procs, guests = [], [], []
    for data in study.trials:
        m, per_proc, per_guest = _trial_row(data, page, tolerance_pct)
        rows.append(m)
        if not per_proc.empty:
            procs.append(per_proc.assign(trial_id=m["trial_id"]))
        if not per_guest.empty:
            guests.append(per_guest.assign(trial_id=m["trial_id"]))

    axes = sorted({a for r in rows for a in r["_settings"]})
    swept = [
        a
        for a in axes
        if len({json.dumps(r["_settings"].get(a), default=str) for r in rows if r["_settings"].get(a) is not None}) > 1
    ]
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
    identity = [
        "trial_id",
        "status",
        "reason",
        "ksm_off",
        "kind",
        "repetition",
        "index",
        "setting",
        "data_problems",
        "disturbed",
        "rerun_of",
        "rerun_in_block",
        "_settings",
        "_ksm",
        "_group",
        "_offkey",
    ]
    trials = pd.DataFrame(rows, columns=None if rows else identity)
    trials["ksm_off"] = trials["ksm_off"].astype(bool)
    trials["disturbed"] = trials["disturbed"].astype(bool)
    for name in (*ALWAYS_COLUMNS, *STATS_INPUT_COLUMNS):
        if name not in trials.columns:
            trials[name] = math.nan
    guests_df = (
        pd.concat(guests, ignore_index=True)
        if guests
        else pd.DataFrame(columns=["guest", *WORKLOAD_METRICS, "trial_id"])
    )
    _add_guest_spread(trials, guests_df)
    _mark_used_in_stats(trials)
    _add_ksm_off_deltas(trials)
    per_process = pd.concat(procs, ignore_index=True) if procs else pd.DataFrame()
    if not per_process.empty:
        per_process = per_process[["trial_id", *[c for c in per_process.columns if c != "trial_id"]]]
    diversity.add_columns(trials, study, per_process, page)
    order = study_order(study.study)
    settings_df = _settings_table(trials, axes, paired_by_block=order == BLOCKED)
    return StudyMetrics(
        trials,
        settings_df,
        per_process,
        guests_df,
        axes,
        swept,
        ksm_axes,
        page,
        noise=noise_floor(trials, paired_by_block=order == BLOCKED),
        order=order,
        converge_tolerance_pct=tolerance_pct,
    )


def setting_label(settings: dict[str, Any], axes: list[str], ksm_off: bool) -> str:
    parts = [f"{a}={_label_value(a, settings.get(a))}" for a in axes if settings.get(a) is not None]
    if ksm_off:
        parts.insert(0, "KSM off")
    return ", ".join(parts) or "all trials"


def _label_value(axis: str, value: Any) -> str:
    """A setting's value in its label; guests.groups (stored as JSON) as "2xdebian-sysbench+2xdebian-web"."""
    if axis == "guests.groups" and isinstance(value, str):
        try:
            return axis_value_text(axis, json.loads(value))
        except ValueError:
            return value
    return f"{value}"


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


def _pairable_blocks(frame: pd.DataFrame) -> pd.Index:
    """Blocks of a side that can pair: a block whose used trial is a rerun run after the study
    is left out, because it ran far from the block's other trials; drift between them is
    exactly what pairing must not absorb (the rerun still counts in the setting's mean). A
    rerun the sweep ran at once, right after the trial it replaces (rerun_in_block), pairs."""
    reruns = frame["rerun_of"].notna() if "rerun_of" in frame.columns else pd.Series(False, index=frame.index)
    if "rerun_in_block" in frame.columns:
        reruns &= ~frame["rerun_in_block"].fillna(False).astype(bool)
    blocks = frame["repetition"]
    return pd.Index(blocks[~blocks.isin(blocks[reruns])].dropna().unique())


def _vs_off_columns(on: pd.DataFrame, off: pd.DataFrame, offkey: str, paired_by_block: bool = True) -> dict[str, Any]:
    """``{m}_vs_off_pct``, ``_ci95_pct``, ``_n``, ``_method``, ``_p`` of one KSM-on setting.

    Paired by block when the study ran blocked and >= 2 blocks hold both the setting and its
    matched KSM-off trial, else Welch on trial values, else no interval (stats.compare_pct). A
    study run in sequential or shuffled order gets Welch: its "blocks" did not run side by
    side, so a pair's difference holds the drift between them. Against unmatched KSM-off
    trials only the difference of means is given: their spread includes other settings'
    effects, so it is not noise and no interval is drawn from it."""
    base, how = _off_baseline(off, offkey)
    out: dict[str, Any] = {"baseline": how}
    pairable = _pairable_blocks(on).intersection(_pairable_blocks(base)) if paired_by_block else pd.Index([])
    for name in WORKLOAD_METRICS:
        if not on[name].notna().any():  # not measured (a processes study): nothing to compare
            comparison = Comparison(math.nan, math.nan, 0, NO_INTERVAL)
        elif how == MATCHED:
            paired = pd.concat([_by_block(on, name), _by_block(base, name)], axis=1, join="inner")
            paired = paired[paired.index.isin(pairable)]
            comparison = compare_pct(paired.iloc[:, 0], paired.iloc[:, 1], on[name], base[name])
        else:
            comparison = Comparison(
                pct_difference(on[name], base[name]), math.nan, int(on[name].notna().sum()), NO_INTERVAL
            )
        out[f"{name}_vs_off_pct"] = comparison.pct
        out[f"{name}_vs_off_ci95_pct"] = comparison.half_pct
        out[f"{name}_vs_off_n"] = comparison.n
        out[f"{name}_vs_off_method"] = comparison.method
        out[f"{name}_vs_off_p"] = comparison_p_value(comparison, comparison_dof(comparison, on[name], base[name]))
    return out


def _add_holm(settings: pd.DataFrame) -> None:
    """``{m}_vs_off_holm``: the setting's change vs KSM off survives Holm across the study's
    KSM-on settings with that metric. A headline that names the worst of k settings has picked
    its comparison after seeing k of them: at 95% each, with no effect anywhere, 5 settings made
    it say "differs" in 7.3% of studies. A setting without a p-value stays in the family."""
    for name in WORKLOAD_METRICS:
        column = f"{name}_vs_off_holm"
        settings[column] = False
        p_column = f"{name}_vs_off_p"
        if p_column not in settings.columns:
            continue
        family = settings.index[~settings["ksm_off"] & settings[f"{name}_vs_off_pct"].notna()]
        if len(family):
            settings.loc[family, column] = holm_reject(settings.loc[family, p_column].to_numpy(float))


@dataclass(frozen=True)
class WorstChange:
    """The worst KSM-on setting's change vs KSM off for one metric, judged in its family."""

    row: pd.Series
    comparison: Comparison
    survives_holm: bool
    family_size: int  # KSM-on settings with a change for this metric (Holm's m)


def worst_change(settings: pd.DataFrame, metric: str, worst_is: str) -> WorstChange | None:
    """The setting with the lowest (worst_is="min") or highest ("max") change vs KSM off."""
    column = f"{metric}_vs_off_pct"
    if settings.empty or column not in settings.columns:
        return None
    on = settings[~settings["ksm_off"] & settings[column].notna()]
    if on.empty:
        return None
    row = on.loc[on[column].idxmin() if worst_is == "min" else on[column].idxmax()]
    return WorstChange(row, settings_comparison(row, metric), bool(row.get(f"{metric}_vs_off_holm", False)), len(on))


def settings_comparison(row: Any, metric: str) -> Comparison:
    """A settings-table row's comparison with KSM off for one workload metric, as stored by
    ``_vs_off_columns`` (for stats.comparison_verdict in report, compare and recommend)."""

    def get(suffix: str, default: Any = math.nan) -> Any:
        value = row.get(f"{metric}_vs_off{suffix}", default)
        return default if value is None or (isinstance(value, float) and math.isnan(value)) else value

    return Comparison(float(get("_pct")), float(get("_ci95_pct")), int(get("_n", 0)), str(get("_method", NO_INTERVAL)))


def _settings_table(trials: pd.DataFrame, axes: list[str], paired_by_block: bool = True) -> pd.DataFrame:
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
        row: dict[str, Any] = {
            "setting": first["setting"],
            "ksm_off": bool(first["ksm_off"]),
            "trials": len(members),
            "ok": int((members["status"] == "ok").sum()),
            "n": len(in_stats),
        }
        row.update({a: first[a] for a in axes})
        for name in (*SUMMARY_METRICS, *NET_METRICS, *WORKLOAD_METRICS):
            row[name], row[f"{name}_ci95"], row[f"{name}_n"] = mean_ci95(in_stats[name])
        for name in WORKLOAD_METRICS:
            row[f"{name}_guest_sd"] = float(in_stats[f"{name}_guest_sd"].mean()) if len(in_stats) else math.nan
        if not first["ksm_off"] and not off.empty:
            row.update(_vs_off_columns(in_stats, off, first["_offkey"], paired_by_block))
        row["_group"] = group
        row["_offkey"] = first["_offkey"]
        rows.append(row)
    table = pd.DataFrame(rows)
    _add_holm(table)
    return table


# ---- noise floor
# Two designs, each with the figure for the comparison the study really makes. Paired by block:
# the study compares a setting with its block's KSM-off trial, so the noise that matters is the
# spread of those per-block differences (whatever drifts between blocks cancels in them), and
# the test has blocks - 1 dof. Unpaired: where no setting shares blocks with its KSM-off trials,
# the spread of single KSM-off trials and the two-sample test (2n - 2 dof).

NOISE_METRICS = ("tps", "latency_p95_ms", "mem_available_rise_mib")
# compared as a percent of KSM off, as the study's paired comparison does (_vs_off_columns);
# the others as a difference in their own unit (MemAvailable's rise is drift near 0 in KSM off)
PERCENT_METRICS = WORKLOAD_METRICS
REPETITIONS_TARGET_PCT = 5.0  # "how many repetitions would a 5% tps change need"
REPETITIONS_TARGET_METRICS = ("tps",)  # a % of mean drift (MemAvailable) is not a useful target
PAIRED_DESIGN = "paired by block"
UNPAIRED_DESIGN = "unpaired"
NOISE_COLUMNS = (
    "metric",
    "group",
    "design",
    "n_trials",
    "n_blocks",
    "sd_dof",
    "mean",
    "sd",
    "sd_low",
    "sd_high",
    "sd_unit",
    "cv_pct",
    "mde",
    "mde_pct_of_mean",
    "repetitions_for_5pct",
    "repetitions_for_5pct_low",
    "repetitions_for_5pct_high",
    "_offkey",
)
METRIC_UNITS = {"tps": "tps", "qps": "qps", "latency_p95_ms": "ms", "mem_available_rise_mib": "MiB"}


def paired_differences(
    trials: pd.DataFrame, metric: str, paired_by_block: bool = True
) -> list[tuple[str, str, pd.Series]]:
    """(offkey, setting, differences by block) of every KSM-on setting against its own block's
    matched KSM-off trial: percent of KSM off for PERCENT_METRICS, else on - off in the metric's
    unit. Replicated trials of a block (a trial and its rerun, two KSM-off trials) are averaged
    within the block first, as the study's paired comparison does, so each block gives one
    difference and blocks stay the unit of replication. Only blocks the comparison pairs
    (_pairable_blocks: none holding a rerun), and none at all when the study did not run blocked:
    the noise floor sizes the test the study makes, one rule for both."""
    if trials.empty or "used_in_stats" not in trials.columns or not paired_by_block:
        return []
    used = trials[trials["used_in_stats"]]
    off = used[used["ksm_off"]]
    out = []
    for _, on in used[~used["ksm_off"]].groupby("_group", sort=False):
        base, how = _off_baseline(off, on["_offkey"].iloc[0])
        if how != MATCHED:
            continue  # unmatched KSM-off trials carry other settings' effects: not noise
        paired = pd.concat([_by_block(on, metric), _by_block(base, metric)], axis=1, join="inner")
        paired = paired[paired.index.isin(_pairable_blocks(on).intersection(_pairable_blocks(base)))]
        on_values, off_values = paired.iloc[:, 0].to_numpy(float), paired.iloc[:, 1].to_numpy(float)
        if metric in PERCENT_METRICS:
            differences = paired_pct_differences(on_values, off_values)
        else:
            differences = on_values - off_values
        out.append(
            (
                str(on["_offkey"].iloc[0]),
                str(on["setting"].iloc[0]),
                pd.Series(differences, index=paired.index).dropna(),
            )
        )
    return out


@dataclass(frozen=True)
class PairedSpread:
    """The pooled sd of per-block paired differences (each setting keeps its own mean)."""

    sd: float
    dof: float  # shared_block_dof when every setting has every block, else sum(n_s - 1)
    independent_dof: int  # sum(n_s - 1): the pooled sum of squares' divisor
    blocks: int  # the most blocks a setting was compared over


def paired_spread(differences: list[pd.Series]) -> PairedSpread:
    """Pool the settings' differences. The settings of a block share its KSM-off trial, so their
    differences move together; with complete blocks stats.shared_block_dof says how much the
    pool really knows. With blocks missing (a failed trial) the dof is sum(n_s - 1), which
    overstates it as far as the settings share their noise."""
    sd, independent = pooled_sd([d.to_numpy(float) for d in differences])
    usable = [d for d in differences if d.size >= 2]
    blocks = max((d.size for d in differences), default=0)
    matrix = pd.concat(usable, axis=1) if usable else pd.DataFrame()
    complete = not matrix.empty and not matrix.isna().to_numpy().any()
    dof = shared_block_dof(matrix.to_numpy(float).T) if complete else float(independent)
    return PairedSpread(sd, dof, independent, blocks)


def noise_floor(trials: pd.DataFrame, paired_by_block: bool = True) -> pd.DataFrame:
    """Run-to-run noise, one row per metric x non-KSM setting group, for the design the study
    ran (``design``):

    paired by block (a KSM-on setting and its matched KSM-off trial share >= 2 blocks): sd is
    the pooled sd of the per-block differences (``paired_differences``; each setting keeps its
    own mean; sd_dof from ``paired_spread``), with its 95% chi-square range sd_low..sd_high;
    mde: stats.paired_minimum_detectable_effect at n_blocks (the most blocks a setting was
    compared over); repetitions_for_5pct (tps): blocks a 5% change needs, with the range from
    sd's range. sd, mde in sd_unit: "%" (of KSM off) or the metric's unit.

    unpaired (no pairs): mean, sd (ddof=1) and cv_pct of the group's KSM-off trials; mde:
    stats.minimum_detectable_effect(sd, n_trials), between two settings of n_trials trials each;
    repetitions_for_5pct: trials per setting for a 5% change. NaN below 2 trials.

    Every mde is the smallest difference a two-sided 95% test finds with 80% power (exact,
    noncentral t)."""
    if trials.empty or "used_in_stats" not in trials.columns:
        return pd.DataFrame(columns=list(NOISE_COLUMNS))
    off = trials[trials["ksm_off"] & trials["used_in_stats"]]
    pairs = {metric: paired_differences(trials, metric, paired_by_block) for metric in NOISE_METRICS}
    rows = []
    for offkey, members in off.groupby("_offkey", sort=False):
        for metric in NOISE_METRICS:
            values = pd.to_numeric(members[metric], errors="coerce").dropna().to_numpy(float)
            if not values.size:
                continue
            mine = [d for key, _, d in pairs[metric] if key == offkey]
            row = _paired_noise_row(metric, mine, values) or _unpaired_noise_row(metric, values)
            rows.append({"metric": metric, "group": members["setting"].iloc[0], "_offkey": offkey, **row})
    return pd.DataFrame(rows, columns=list(NOISE_COLUMNS))


def _needed(sd: float, sd_low: float, sd_high: float, target: float, needed_at: Any) -> dict[str, float]:
    return {
        "repetitions_for_5pct": needed_at(sd, target),
        "repetitions_for_5pct_low": needed_at(sd_low, target),
        "repetitions_for_5pct_high": needed_at(sd_high, target),
    }


def _paired_noise_row(metric: str, differences: list[pd.Series], off_values: np.ndarray) -> dict[str, Any] | None:
    spread = paired_spread(differences)
    if spread.independent_dof < 1:
        return None
    sd, blocks = spread.sd, spread.blocks
    low, high = sd_range95(sd, spread.dof)
    mean = float(off_values.mean())
    percent = metric in PERCENT_METRICS
    mde = float(paired_minimum_detectable_effect(sd, blocks))
    row = {
        "design": PAIRED_DESIGN,
        "n_trials": int(off_values.size),
        "n_blocks": int(blocks),
        "sd_dof": spread.dof,
        "mean": mean,
        "sd": sd,
        "sd_low": low,
        "sd_high": high,
        "sd_unit": "%" if percent else METRIC_UNITS[metric],
        "cv_pct": math.nan,
        "mde": mde,
        "mde_pct_of_mean": mde if percent else math.nan,
    }
    wanted = percent and metric in REPETITIONS_TARGET_METRICS
    row.update(
        _needed(sd, low, high, REPETITIONS_TARGET_PCT, blocks_needed)
        if wanted
        else _needed(math.nan, math.nan, math.nan, math.nan, blocks_needed)
    )
    return row


def _unpaired_noise_row(metric: str, values: np.ndarray) -> dict[str, Any]:
    n = int(values.size)
    mean = float(values.mean())
    sd = float(values.std(ddof=1)) if n >= 2 else math.nan
    low, high = sd_range95(sd, n - 1)
    scale = abs(mean) if mean else math.nan  # no percentages of a zero mean
    mde = float(minimum_detectable_effect(sd, n))
    target = REPETITIONS_TARGET_PCT / 100 * scale if metric in REPETITIONS_TARGET_METRICS else math.nan
    return {
        "design": UNPAIRED_DESIGN,
        "n_trials": n,
        "n_blocks": math.nan,
        "sd_dof": n - 1,
        "mean": mean,
        "sd": sd,
        "sd_low": low,
        "sd_high": high,
        "sd_unit": METRIC_UNITS[metric],
        "cv_pct": 100 * sd / scale,
        "mde": mde,
        "mde_pct_of_mean": 100 * mde / scale,
        **_needed(sd, low, high, target, repetitions_needed),
    }


def study_metrics(study_dir: Path) -> pd.DataFrame:
    """One row per trial (failed ones included, with status/reason and NaN metrics)."""
    return public_trials_table(compute_study(load_study(Path(study_dir))))


@dataclass(frozen=True)
class StudyAnalysis:
    """A study folder read (store/studydata.py) and analysed (compute_study), once: the sweep
    computes it for trials.csv and hands it to the report, which would otherwise read and
    compute the same study again."""

    study: StudyData
    metrics: StudyMetrics

    @classmethod
    def of(cls, study_dir: Path) -> "StudyAnalysis":
        study = load_study(Path(study_dir))
        return cls(study, compute_study(study))


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
