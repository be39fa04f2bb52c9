"""Per-trial metrics of the KSM policy: what it chose, next to what ksmd did.

nominal_pages_per_s: the scan rate the knobs ask for, pages_to_scan / sleep_millisecs * 1000,
time-averaged over the measure ticks on which KSM ran (run = 1) and the two knobs were read
(cheap ticks; the fast tier reads only counters). ksmd's measured rate is samplemetrics'
pages_scanned_per_s; the nominal one is an upper bound (ksmd's scan of a batch takes time too,
and the advisor changes pages_to_scan between ticks).
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from orchestrator.analysis.stats import time_mean
from orchestrator.runners.record import PolicyRecord, TrialRecord


def nominal_scan_rate(ksm: pd.DataFrame) -> dict[str, float]:
    out = {"nominal_pages_per_s": math.nan, "ksm_running_share": math.nan}
    needed = {"phase", "t_s", "pages_to_scan", "sleep_millisecs"}
    if ksm is None or ksm.empty or not needed <= set(ksm.columns):
        return out
    measure = ksm[ksm["phase"] == "measure"]
    pts = pd.to_numeric(measure["pages_to_scan"], errors="coerce")
    sleep = pd.to_numeric(measure["sleep_millisecs"], errors="coerce")
    read = pts.notna() & sleep.notna()
    if "run" in measure:
        run = pd.to_numeric(measure["run"], errors="coerce")
        on = read & (run == 1)
        if (read & run.notna()).any():
            out["ksm_running_share"] = float((run[read & run.notna()] == 1).mean())
    else:
        on = read
    on &= sleep > 0
    if on.any():
        rate = (pts[on] / sleep[on] * 1000.0).to_numpy(float)
        out["nominal_pages_per_s"] = time_mean(measure.loc[on, "t_s"].to_numpy(float), rate)
    return out


def policy_metrics(ksm: pd.DataFrame | None, trial: TrialRecord) -> dict[str, Any]:
    """trials.csv columns: policy, whether it ever turned KSM on, the nominal scan rate."""
    policy = trial.policy or PolicyRecord()
    out: dict[str, Any] = {"policy": policy.name, "policy_ksm_turned_on": policy.ksm_turned_on}
    if ksm is not None:
        out.update(nominal_scan_rate(ksm))
    return out
