"""Savings of churning workloads on the real KSM: averaged over time, never a phase-lucky snapshot.

The original study's workload refills 10,000 pages every second; pages_sharing is then a sawtooth
(0 at every refill, back near 10,000 within about 0.6 s). A saving read from the last tick
depends on where that tick fell in the cycle. These trials check that the averaged saving does
not: two sampling grids that meet the cycle at different phases must agree.

Marker `ksm`: the tests change the host's one KSM and run one at a time.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import pytest

from orchestrator.analysis import samplemetrics
from orchestrator.host.ksm import HostSettings
from orchestrator.plan import SamplingSection, fast_interval_s, parse_plan
from orchestrator.host.sampler import Sampler
from orchestrator.sweep import run_sweep
from orchestrator.workloads.processes import ProcessesParams, ProcessesWorkload

PAGE = 4096

pytestmark = pytest.mark.ksm


def churn_plan(
    name: str, fast_interval_s: float, fill: str = "fixed_random", rounds: int = 0, measure_s: float = 16
) -> str:
    return f"""
[study]
name = "{name}"
[ksm]
pages_to_scan = 1000
sleep_millisecs = 10
[workload]
type = "processes"
processes = 1
pages_per_process = 10000
fill = "{fill}"
rounds = {rounds}
round_wait_s = 1.0
[phases]
baseline_s = 1
measure_s = {measure_s}
[sampling]
interval_s = 1.0
fast_interval_s = {fast_interval_s}
pss_interval_s = 2.0
"""


def run_one(text: str, results: Path) -> pd.Series:
    outcome = run_sweep(parse_plan(text), text, results)
    table = pd.read_csv(outcome.study.path / "trials.csv")
    assert (table["status"] == "ok").all(), table[["trial_id", "reason"]]
    return table.iloc[0]


def test_refilled_saving_is_the_same_at_two_sampling_phases(tmp_path, ksm_guard):
    """One trial, two samplers at the tick the sweep would choose ("auto"), the second started
    0.53 s later (half a refill cycle plus half a tick): they meet the ~1 s refill cycle at
    different phases all along. Their averaged savings must agree within 5% (the same trial, so
    KSM's own trial-to-trial variation is not in the comparison)."""
    settings = HostSettings(tmp_path / "settings-record.json")
    params = ProcessesParams(processes=1, pages_per_process=10_000, fill="fixed_random", rounds=0, round_wait_s=1.0)
    tick_s = fast_interval_s(SamplingSection(interval_s=1.0), params)
    try:
        settings.reset(timeout_s=60)
        settings.apply({"pages_to_scan": 1000, "sleep_millisecs": 10}, {})
        with ProcessesWorkload(params) as workload:
            workload.start()
            workload.wait_filled(timeout_s=60)
            a = Sampler(1.0, 5, workload.pids, fast_interval_s=tick_s, jitter_fraction=0.2, phase="measure")
            b = Sampler(1.0, 5, workload.pids, fast_interval_s=tick_s, jitter_fraction=0.2, phase="measure")
            settings.start()
            with a:
                time.sleep(0.5 + tick_s / 2)
                with b:
                    time.sleep(16)
            fills = pd.DataFrame(workload.fills())
    finally:
        settings.reset(timeout_s=60)
        settings.restore()
    views = []
    for sampler in (a, b):
        ksm = sampler.ksm_frame()
        out = samplemetrics.ksm_metrics(ksm, {}, PAGE, fills)
        out.update(samplemetrics.refill_metrics(ksm, fills, {}, 10_000))
        views.append(out)
    first, second = (v["saved_mib_steady"] for v in views)
    assert first > 5  # it merges between refills (10,000 pages = 39 MiB at most)
    assert abs(first - second) <= 0.05 * max(first, second), (first, second)
    for out in views:
        assert out["steady_cycles"] >= 10  # whole refill cycles
        assert out["refills_in_measure"] >= 10
        # What KSM reaches just before a refill and what copy-on-write leaves just after bracket
        # the average over time.
        assert (
            out["saved_share_after_refill_pct"] <= out["saved_share_mean_pct"] <= out["saved_share_before_refill_pct"]
        )
        assert out["remerge_s_median"] > 0


def test_refilling_trial_reports_averages_and_refills(results_dir, ksm_guard):
    row = run_one(churn_plan("churn", 0.1), results_dir)
    assert row["saving_basis"].startswith("steady mean")
    assert row["refills_in_measure"] >= 10
    assert row["saved_mib"] == row["saved_mib_steady"]
    assert row["saved_share_after_refill_pct"] <= row["saved_share_mean_pct"] <= row["saved_share_before_refill_pct"]
    assert row["cow_ksm_per_refill"] > 0
    assert 0 < row["merged_share_mean_pct"] <= 100


def test_settled_same_fill_average_equals_end(results_dir, ksm_guard):
    row = run_one(churn_plan("settled", 0.1, fill="same", rounds=1, measure_s=10), results_dir)
    assert row["saving_basis"] == "end of measure"
    assert row["converged"]
    assert row["saved_mib_steady"] == pytest.approx(row["saved_mib_end"], rel=0.02)
