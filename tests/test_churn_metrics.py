"""Averaged savings of a refilling workload do not depend on where the ticks fall in the cycle.

A synthetic sawtooth (pages_sharing drops to 0 at every refill and climbs back within 0.6 s)
sampled on two jittered grids that meet the cycle at different phases. The real-KSM version of
this is tests/test_churn.py; this one knows the true average, so it checks the estimator itself.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from orchestrator.analysis import samplemetrics
from orchestrator.analysis.stats import time_mean

PAGE = 4096
PAGES = 10_000
WALL0 = 1_800_000_000.0  # wall clock of t_s = 0
PERIOD_S = 1.07  # a refill every 1 s plus the time to write the pages
RAMP_S = 0.6
MEASURE_S = (2.0, 18.0)


def sawtooth(t: np.ndarray, offset_s: float) -> np.ndarray:
    """pages_sharing: 0 at each refill start, linear back to PAGES over RAMP_S, then flat."""
    since = np.mod(t - offset_s, PERIOD_S)
    return PAGES * np.minimum(since / RAMP_S, 1.0)


def true_cycle_mean() -> float:
    # integral over one cycle: the ramp's triangle plus the flat part
    return PAGES * (RAMP_S / 2 + (PERIOD_S - RAMP_S)) / PERIOD_S * PAGE / 2**20


def sampled(interval_s: float, start_s: float, offset_s: float, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    ticks = [start_s]
    while ticks[-1] < MEASURE_S[1] + 0.5:
        ticks.append(ticks[-1] + interval_s * (1 + rng.uniform(-0.2, 0.2)))
    t = np.asarray(ticks)
    phase = np.where(t < MEASURE_S[0], "baseline", np.where(t <= MEASURE_S[1], "measure", "cooldown"))
    return pd.DataFrame(
        {"t_s": t, "t_wall": WALL0 + t, "phase": phase, "pages_sharing": sawtooth(t, offset_s), "pages_shared": 1.0}
    )


def fills(offset_s: float) -> pd.DataFrame:
    starts = offset_s + PERIOD_S * np.arange(1, 30)
    return pd.DataFrame(
        {"label": "w0", "fill": np.arange(2, 31), "start_wall": WALL0 + starts, "end_wall": WALL0 + starts + 0.005}
    )


@pytest.mark.parametrize("offset_s", [0.0, 0.31, 0.77])
def test_two_sampling_grids_agree_over_whole_cycles(offset_s: float) -> None:
    a = samplemetrics.ksm_metrics(sampled(0.1, 0.0, offset_s, 1), {}, PAGE, fills(offset_s))
    b = samplemetrics.ksm_metrics(sampled(0.13, 0.05, offset_s, 2), {}, PAGE, fills(offset_s))
    truth = true_cycle_mean()
    for out in (a, b):
        assert out["steady_cycles"] >= 13
        assert out["saved_mib_steady"] == pytest.approx(truth, rel=0.02)
    assert abs(a["saved_mib_steady"] - b["saved_mib_steady"]) <= 0.02 * truth


def test_a_window_that_ends_mid_cycle_is_phase_lucky() -> None:
    """Why the window is cut to whole cycles: without the refill times, the steady average runs
    to the end of measure, and where measure ends in the cycle moves it. Across offsets the
    spread is larger than whole-cycle averaging allows."""
    uncut = [
        samplemetrics.ksm_metrics(sampled(0.05, 0.0, off, 3), {}, PAGE)["saved_mib_steady"]
        for off in np.linspace(0, PERIOD_S, 8, endpoint=False)
    ]
    cut = [
        samplemetrics.ksm_metrics(sampled(0.05, 0.0, off, 3), {}, PAGE, fills(off))["saved_mib_steady"]
        for off in np.linspace(0, PERIOD_S, 8, endpoint=False)
    ]
    assert np.ptp(cut) < 0.5 * np.ptp(uncut)
    assert np.ptp(cut) <= 0.01 * true_cycle_mean()


def test_without_refills_the_window_runs_to_the_end() -> None:
    flat = pd.DataFrame({"t_s": np.arange(0, 10, 0.5), "phase": "measure", "pages_sharing": np.full(20, 1000.0)})
    out = samplemetrics.ksm_metrics(flat, {}, PAGE, pd.DataFrame())
    assert "steady_cycles" not in out
    assert out["steady_s"] == pytest.approx(9.5)
    assert out["saved_mib_steady"] == pytest.approx(1000 * PAGE / 2**20)


def test_time_mean_over_a_window_weighs_only_the_window() -> None:
    t = np.array([0.0, 1.0, 2.0, 3.0])
    v = np.array([0.0, 10.0, 10.0, 0.0])
    # inside [0.5, 2.5]: 5..10 over 0.5 s, 10 over 1 s, 10..5 over 0.5 s
    assert time_mean(t, v, 0.5, 2.5) == pytest.approx((3.75 + 10 + 3.75) / 2)
    assert time_mean(t, v, -5, 99) == pytest.approx(time_mean(t, v))
    assert time_mean(t, v, 1.5, 1.5) == pytest.approx(10.0)
    assert math.isnan(time_mean(np.array([]), np.array([]), 0, 1))
