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
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

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
