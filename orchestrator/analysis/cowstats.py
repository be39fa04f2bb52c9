"""Copy-on-write break latency: statistics over the probe worker's per-write samples (cow.csv).

cow.csv has one row per timed write: ``region`` (``merged``: a page KSM had merged, so the
write faults and the kernel copies the page; ``unmerged``: a page of the control mapping,
present and writable, so the write is a plain store; ``overhead``: the same timing loop around
a store to one hot page, what the timer and the interpreter cost), ``order`` (write number in
the region) and ``latency_ns`` (raw, overhead not subtracted).

The worker times each write with time.perf_counter_ns (CLOCK_MONOTONIC through the vDSO: a
resolution of 1 ns, an overhead of some tens of ns per call here, plus the interpreter's
bytecode for the store; on the 2-core development host, Python 3.11: median 160 ns, p99 380 ns
for the timed loop around a store to a present page, against about 5 us for a first-touch page
fault). That overhead is the same for every region, so it is measured in the
``overhead`` rows and its median subtracted: what is left is the kernel's work. A merged-page
write costs a page fault plus a page copy (microseconds), far above the overhead; a write to
an unmerged page sits near zero after subtraction, at the 1 ns floor: a ratio over it is noise
(4843 became 2200 on a 2 ns change of the unmerged median). The headline is therefore the
difference of the medians, merged p50 - unmerged p50 in ns (the overhead cancels in it), which
the study averages across trials with an interval; the ratio of the raw medians (timer included,
so its denominator is far from the floor) is kept per trial as description, never averaged.

This latency gap is the timing signal KSM side channels read: an attacker who writes to a
page and sees the slow path learns that some other process held the same content.

What merging exposes (the probe's exposure mode; exposure_metrics): exposure.csv has one row per
timed write of the observer (workloads/_exposer.py): ``kind`` (calibration: its own
known-unmerged pages, which set the threshold; candidate: its page holding secret ``secret``;
decoy: content no one else holds), ``latency_ns``, ``called_merged`` (latency above the
threshold: the observer's call), ``truth_merged`` (the kernel's: KSM page or zero page per
pagemap + kpageflags, read just before the write; empty when the kernel hid it), and for a
candidate ``since_write_s``, the time since the victim wrote that secret (negative before).

Two questions, each with its counts:

accuracy of the calls against the kernel's truth (candidate and decoy tests; calibration tests
    set the threshold and are left out): true-positive rate TP / tested pages that were merged,
    false-positive rate FP / tested pages that were not, each with its 95% Wilson interval
    (stats.wilson_ci95), and the balanced accuracy (TPR + 1 - FPR) / 2 (chance = 50%; plain
    accuracy would be carried by the many unmerged pages). These are rates over tests of one
    trial: the tests share the trial's host state, so the interval describes this trial's
    tests, not the setting's spread across trials.
time to observe, per secret: from the victim's write to the first test of its candidate that
    was called merged and was merged (first true detection); ``exposure_first_detect_s`` is the
    earliest over the secrets, ``exposure_median_detect_s`` the median over all of them, a
    secret never detected counting as later than any (no median when half or more were never
    detected). ``exposure_median_merged_s`` is the same from the truth alone (the first test
    that found the page merged, called or not): KSM's own latency, the floor of the observer's.

KSM off merges nothing: no test is a true positive, every "merged" call is a false positive,
and the calls do not depend on whether the victim holds the secret (``exposure_holds_*``:
candidates after their write; ``exposure_not_holds_*``: decoys and candidates before it).

Without per-page truth (truth_source "ksm_stat": PFNs hidden, the fallback), decoys and
candidates before their write are unmerged by construction (no other copy exists) and
candidates after it have no truth: the true-positive rate is not computed and a detection is a
call alone.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import pandas as pd

from orchestrator.analysis.stats import wilson_ci95
from orchestrator.units import has_value, number

PERCENTILES = (50, 90, 99)
REGIONS = ("merged", "unmerged")
# The subtracted latency never goes below this: a ratio needs a positive denominator, and
# below the timer's resolution the difference is noise anyway.
FLOOR_NS = 1.0


def overhead_ns(samples: pd.DataFrame) -> float:
    """Median of the empty-write loop (NaN without overhead rows)."""
    rows = samples.loc[samples["region"] == "overhead", "latency_ns"]
    values = pd.to_numeric(rows, errors="coerce").dropna().to_numpy(float)
    return float(np.median(values)) if values.size else math.nan


def net_latency_ns(samples: pd.DataFrame, region: str, overhead: float) -> np.ndarray:
    """One region's latencies minus the loop overhead, floored at FLOOR_NS."""
    rows = samples.loc[samples["region"] == region, "latency_ns"]
    values = pd.to_numeric(rows, errors="coerce").dropna().to_numpy(float)
    if math.isfinite(overhead):
        values = values - overhead
    return np.maximum(values, FLOOR_NS)


def raw_median_ns(samples: pd.DataFrame, region: str) -> float:
    """Median of one region's raw latencies (timer overhead included, nothing floored)."""
    rows = samples.loc[samples["region"] == region, "latency_ns"]
    values = pd.to_numeric(rows, errors="coerce").dropna().to_numpy(float)
    return float(np.median(values)) if values.size else math.nan


def cow_summary(samples: pd.DataFrame | None, merged_pages: float | None = None) -> dict[str, Any]:
    """cow_<region>_p50/p90/p99_ns (net of overhead), cow_<region>_n, cow_overhead_ns,
    cow_p50_diff_ns (raw merged median - raw unmerged median: the headline, see the module
    docstring) and cow_median_ratio (raw merged median / raw unmerged median, description only).

    ``merged_pages`` = 0 (a KSM-on probe whose merge window merged nothing; seen: fill=zero
    under thp=always): the "merged" region's first writes were not KSM copy-on-write breaks,
    whatever they cost (THP faults there), so no difference or ratio is claimed and
    ``cow_note`` says why."""
    if samples is None or samples.empty or not {"region", "latency_ns"} <= set(samples.columns):
        return {}
    overhead = overhead_ns(samples)
    out: dict[str, Any] = {"cow_overhead_ns": overhead}
    for region in REGIONS:
        values = net_latency_ns(samples, region, overhead)
        out[f"cow_{region}_n"] = int(values.size)
        for pct in PERCENTILES:
            out[f"cow_{region}_p{pct}_ns"] = float(np.percentile(values, pct)) if values.size else math.nan
    merged, unmerged = raw_median_ns(samples, "merged"), raw_median_ns(samples, "unmerged")
    out["cow_p50_diff_ns"] = merged - unmerged
    out["cow_median_ratio"] = merged / unmerged if unmerged > 0 and math.isfinite(merged) else math.nan
    if merged_pages == 0:
        out["cow_p50_diff_ns"] = math.nan
        out["cow_median_ratio"] = math.nan
        out["cow_note"] = "nothing merged: the merged region's writes are not KSM copy-on-write breaks"
    return out


# ---- what merging exposes (exposure.csv)

TRUTH_KSM_STAT = "ksm_stat"


def _rate(k: int, n: int) -> tuple[float, float, float]:
    low, high = wilson_ci95(k, n)
    return (k / n if n else math.nan), low, high


def median_with_never(times_s: Any) -> float:
    """Median of per-secret times where inf means "never": NaN if the median is never."""
    values = np.asarray(times_s, dtype=float)
    if values.size == 0:
        return math.nan
    median = float(np.median(values))
    return median if math.isfinite(median) else math.nan


def exposure_metrics(frame: pd.DataFrame | None, record: Mapping[str, Any]) -> dict[str, Any]:
    """trials.csv columns of one exposure trial (see the module docstring)."""
    if frame is None or frame.empty or "kind" not in frame.columns:
        return {}
    source = str(record.get("truth_source") or "")
    tests = frame[frame["kind"].isin(("candidate", "decoy"))]
    called = pd.to_numeric(tests["called_merged"], errors="coerce").fillna(0).astype(bool)
    truth = pd.to_numeric(tests["truth_merged"], errors="coerce")
    since = pd.to_numeric(tests["since_write_s"], errors="coerce")
    candidate = tests["kind"] == "candidate"
    holds = candidate & (since >= 0)
    if source == TRUTH_KSM_STAT:  # unmerged by construction where no second copy exists yet
        truth = truth.where(holds, 0.0)
    pos, neg = truth == 1, truth == 0
    out: dict[str, Any] = {
        "exposure_truth_source": source or None,
        "exposure_threshold_ns": float(record.get("threshold_ns", math.nan)),
        "exposure_tests": int(len(tests)),
        "exposure_truth_unknown": int(truth.isna().sum()),
    }
    tp, n_pos = int((called & pos).sum()), int(pos.sum())
    fp, n_neg = int((called & neg).sum()), int(neg.sum())
    out.update(exposure_tp=tp, exposure_truth_pos=n_pos, exposure_fp=fp, exposure_truth_neg=n_neg)
    if source == TRUTH_KSM_STAT:
        out["exposure_tpr"], out["exposure_tpr_low"], out["exposure_tpr_high"] = math.nan, math.nan, math.nan
    else:
        out["exposure_tpr"], out["exposure_tpr_low"], out["exposure_tpr_high"] = _rate(tp, n_pos)
    out["exposure_fpr"], out["exposure_fpr_low"], out["exposure_fpr_high"] = _rate(fp, n_neg)
    out["exposure_balanced_accuracy"] = (out["exposure_tpr"] + 1 - out["exposure_fpr"]) / 2
    out["exposure_decoys_merged"] = int((pos & ~candidate).sum())  # a decoy merged: should never be
    for name, mask in (("holds", holds), ("not_holds", ~holds)):
        out[f"exposure_{name}_calls"], out[f"exposure_{name}_tests"] = int((called & mask).sum()), int(mask.sum())
    detected = called & (pos if source != TRUTH_KSM_STAT else holds)
    secrets = int(record.get("secrets") or 0)
    first_detect, first_merged = [], []
    for r in range(secrets):
        mine = holds & (pd.to_numeric(tests["secret"], errors="coerce") == r)
        first_detect.append(float(since[mine & detected].min()) if (mine & detected).any() else math.inf)
        first_merged.append(float(since[mine & pos].min()) if (mine & pos).any() else math.inf)
    seen = [t for t in first_detect if math.isfinite(t)]
    out.update(
        exposure_secrets=secrets,
        exposure_secrets_detected=len(seen),
        exposure_secrets_merged=sum(math.isfinite(t) for t in first_merged),
        exposure_first_detect_s=min(seen) if seen else math.nan,
        exposure_median_detect_s=median_with_never(first_detect),
        exposure_median_merged_s=median_with_never(first_merged),
        exposure_observe_s=float(record.get("observe_s", math.nan)),
    )
    out["exposure_summary"] = exposure_sentence(out)
    return out


def _pct(rate: float) -> str:
    return f"{number(100 * rate, integers=False)}%"


def exposure_sentence(m: Mapping[str, Any]) -> str:
    """One line: when the merge became observable and how accurate the calls were."""
    secrets = int(m.get("exposure_secrets") or 0)
    rates = f"FPR {_pct(m['exposure_fpr'])} ({m['exposure_fp']}/{m['exposure_truth_neg']})"
    if has_value(m.get("exposure_tpr")):
        rates = (
            f"{_pct(m['exposure_balanced_accuracy'])} balanced accuracy (TPR {_pct(m['exposure_tpr'])} "
            f"({m['exposure_tp']}/{m['exposure_truth_pos']}), {rates})"
        )
    if m.get("exposure_truth_pos", 0) == 0 and m.get("exposure_truth_source") != TRUTH_KSM_STAT:
        return (
            f"no tested page was merged (0 of {m['exposure_tests']}): nothing to observe, every 'merged' call "
            f"a false positive, {rates}"
        )
    if not m.get("exposure_secrets_detected"):
        return f"no secret observed within the trial (0 of {secrets}); {rates}"
    first = f"first after {number(m['exposure_first_detect_s'], integers=False)} s"
    seen = f"{m['exposure_secrets_detected']} of {secrets} secrets seen"
    if has_value(m.get("exposure_median_detect_s")):
        return (
            f"merge observable after {number(m['exposure_median_detect_s'], integers=False)} s (median; {first}; "
            f"{seen}) at {rates}"
        )
    return f"merge observable for {seen} ({first}; median not reached) at {rates}"
