"""One trial's metrics, from what the store wrote: the sampled series' (samplemetrics.py), the
policy's (analysis/policymetrics.py), the costs (costs.py, cowstats.py) and the workload's own results.

Failed and not-run trials get their status and reason only: partial data is never mixed into means.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from orchestrator.analysis import costs, cowstats
from orchestrator.plan import CONVERGE_TOLERANCE_PCT, writes_during_measure
from orchestrator.analysis.policymetrics import policy_metrics
from orchestrator.analysis.samplemetrics import (
    choose_headline,
    ksm_metrics,
    phase_mask,
    process_metrics,
    refill_metrics,
)
from orchestrator.runners.record import ProvisionRecord, TrialRecord
from orchestrator.store.studydata import DEFAULT_PAGE_SIZE_BYTES, TrialData, load_trial

WORKLOAD_METRICS = ("tps", "qps", "latency_p95_ms")


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


def trial_wall_s(info: TrialRecord) -> float:
    """Seconds the sweep spent on the trial, reset to reset (trial.json started_wall..ended_wall):
    what one more trial of this plan costs, for sizing a study (design.py, confirm.py)."""
    start, end = info.started_wall, info.ended_wall
    if start is not None and end is not None and end > start:
        return float(end - start)
    return math.nan


def trial_metrics(
    trial: Path | TrialData,
    page_size_bytes: int = DEFAULT_PAGE_SIZE_BYTES,
    converge_tolerance_pct: float = CONVERGE_TOLERANCE_PCT,
) -> dict[str, Any]:
    """All scalar metrics of one trial plus "per_process" and "workload_per_guest" (DataFrames).
    ``converge_tolerance_pct``: the study's plan's (plan.stored_converge_tolerance_pct).

    Failed and not-run trials get their status and reason and no metrics (NaN in study tables):
    partial data from a failed trial is not mixed into means.
    """
    data = trial if isinstance(trial, TrialData) else load_trial(Path(trial))
    info = data.trial
    out: dict[str, Any] = {
        "trial_id": data.trial_id,
        "status": info.status,
        "reason": info.reason,
        "ksm_off": info.ksm_off,
        "kind": info.kind,
        "repetition": info.repetition,
        "index": info.index,
        "data_problems": "; ".join(data.problems) or None,
        "per_process": pd.DataFrame(),
        "workload_per_guest": pd.DataFrame(columns=["guest", *WORKLOAD_METRICS]),
    }
    provision = info.provision or ProvisionRecord()
    out["guest_start"] = provision.start
    # Seconds from "start the guests" to "every guest answers": restore + SSH + clock + identity
    # for restored trials, define + boot to SSH for booted ones (not kept: they did not start).
    out["guest_start_s"] = (
        provision.start_s if provision.start_s is not None else provision.boot_wall_s if not provision.reused else None
    )
    out["trial_wall_s"] = trial_wall_s(info)
    if out["status"] != "ok":
        return out
    ksm_settings = info.ksm
    if data.ksm is not None and not data.ksm.empty:
        out.update(ksm_metrics(data.ksm, ksm_settings, page_size_bytes, data.fills, converge_tolerance_pct))
    steady_window_t_s = out.pop("_steady_window_t_s", (-math.inf, math.inf))
    if data.processes is not None and not data.processes.empty:
        proc_out, per_proc = process_metrics(data.processes, steady_window_t_s)
        out.update(proc_out)
        out["per_process"] = per_proc
    # The policy's name, whether it ever ran KSM, and the scan rate its knobs asked for.
    out.update(policy_metrics(data.ksm, info))
    workload = info.workload
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


def cost_metrics(
    data: TrialData, out: dict[str, Any], ksm_settings: dict[str, Any], page_size_bytes: int
) -> dict[str, Any]:
    """Scan speed, the zero-page split and KSM's own memory (KSM-on trials), the probe
    workload's merge/unmerge record and its copy-on-write latencies (costs.py, cowstats.py)."""
    extra: dict[str, Any] = {}
    info = data.trial
    if data.ksm is not None and not data.ksm.empty and not out["ksm_off"]:
        measure = data.ksm.loc[phase_mask(data.ksm, "measure")]
        # The nominal rate the policy's sampled knobs asked for (policy_metrics), when it has one.
        extra.update(
            costs.scan_speed(
                measure, ksm_settings, float(out.get("measure_s", math.nan)), nominal=out.get("nominal_pages_per_s")
            )
        )
        extra.update(costs.zero_page_split(measure, ksm_settings, page_size_bytes))
        extra.update(costs.metadata_memory(measure, page_size_bytes, float(out.get("ksm_rmap_items", math.nan))))
    # a KSM-off probe trial merges nothing by design: only its COW timing (the floor) counts
    probe = info.probe
    if probe is not None and getattr(probe, "mode", None) == "exposure":  # its own columns, KSM off included (chance)
        extra.update(cowstats.exposure_metrics(data.exposure, probe.model_dump()))
        return extra
    probe = probe if not out["ksm_off"] else None
    if probe is not None:
        extra.update(costs.probe_record_metrics(probe, page_size_bytes))
    extra.update(cowstats.cow_summary(data.cow, merged_pages=probe.merged_pages if probe is not None else None))
    if info.density is not None:
        from orchestrator.workloads.density import density_summary

        extra.update(density_summary(info.density))
    return extra


def workload_pages(workload: dict[str, Any]) -> float:
    """Pages the processes workload maps in all (NaN for guests: their RAM is not all data)."""
    if workload.get("type") == "probe":
        return float(workload.get("pages", math.nan)) if workload.get("mode", "cost") == "cost" else math.nan
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
    return {
        "merged_share_mean_pct": 100.0 * out["merged_pages_mean"] / pages,
        "merged_share_end_pct": 100.0 * out["merged_pages_end"] / pages,
    }
