"""orchestrator.stats with numbers worked out by hand (t quantiles from the tables in stats.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from orchestrator import stats
from tests.test_metrics import _t_pdf

T975 = {1: 12.7062, 2: 4.3027, 4: 2.7764}
T80 = {4: 0.9410, 28: 0.8546, 30: 0.8538}


# ----------------------------------------------------------------------------- t(0.80)


@pytest.mark.parametrize("dof", [1, 2, 3, 4, 7, 13, 30, 45, 90, 250])
def test_t_quantile_80_leaves_20_percent_above(dof: float) -> None:
    q = stats.t_quantile_80(dof)
    x = np.linspace(0.0, q, 200_001)
    below = 0.5 + np.trapezoid(_t_pdf(x, dof), x)
    assert below == pytest.approx(0.80, abs=2e-4)


def test_t_quantile_80_limits_and_arrays() -> None:
    assert stats.t_quantile_80(1e9) == pytest.approx(0.8416, abs=1e-6)
    assert math.isnan(stats.t_quantile_80(0.5))
    assert stats.t_quantile_80(np.array([4.0, 30.0])).tolist() == [T80[4], T80[30]]


# ----------------------------------------------------------------------------- comparisons


def test_paired_pct_by_hand() -> None:
    # per block: -10%, -20%, +10%; mean -20/3, sd^2 = (100/9 + 1600/9 + 2500/9) / 2 = 700/3
    pct, half, n = stats.paired_pct_ci95([90.0, 80.0, 110.0], [100.0, 100.0, 100.0])
    assert (pct, n) == (pytest.approx(-20 / 3), 3)
    assert half == pytest.approx(T975[2] * math.sqrt(700 / 3) / math.sqrt(3))


def test_paired_pct_skips_blocks_missing_a_side_or_with_zero_reference() -> None:
    pct, half, n = stats.paired_pct_ci95([90.0, math.nan, 5.0, 60.0], [100.0, 100.0, 0.0, 50.0])
    assert n == 2  # -10% and +20%
    assert pct == pytest.approx(5.0)
    assert half == pytest.approx(T975[1] * np.std([-10.0, 20.0], ddof=1) / math.sqrt(2))


def test_welch_pct_by_hand() -> None:
    # diff -1; var/n = 1 and 1, se^2 = 2, Welch df = 4 / (1 + 1) = 2; reference mean 10
    pct, half, n = stats.welch_pct_ci95([8.0, 10.0], [9.0, 11.0])
    assert (pct, n) == (pytest.approx(-10.0), 4)
    assert half == pytest.approx(100 * T975[2] * math.sqrt(2) / 10)


def test_compare_pct_prefers_pairs_then_welch_then_nothing() -> None:
    paired = stats.compare_pct([90.0, 80.0], [100.0, 100.0], [90.0, 80.0], [100.0, 100.0])
    assert (paired.method, paired.n) == (stats.PAIRED, 2)
    # one block with both sides, but two trials each: Welch on the trial values
    welch = stats.compare_pct([8.0, math.nan], [9.0, 11.0], [8.0, 10.0], [9.0, 11.0])
    assert (welch.method, welch.n, welch.pct) == (stats.WELCH, 4, pytest.approx(-10.0))
    single = stats.compare_pct([8.0], [10.0], [8.0], [10.0])
    assert (single.method, single.n, single.pct) == (stats.NO_INTERVAL, 1, pytest.approx(-20.0))
    assert single.differs is None and not single.has_interval


def test_differs_only_when_the_interval_excludes_zero() -> None:
    assert stats.Comparison(-30.0, 2.5, 3, stats.PAIRED).differs is True
    assert stats.Comparison(-3.3, 465.9, 2, stats.PAIRED).differs is False
    assert stats.Comparison(0.0, 0.0, 3, stats.PAIRED).differs is False  # identical blocks, no change


# ----------------------------------------------------------------------------- verdicts


def test_verdict_wording() -> None:
    verdict = stats.comparison_verdict
    assert verdict(stats.Comparison(-30.0, 2.5, 3, stats.PAIRED)) == \
        "differs from KSM off (95% interval excludes 0; n=3 blocks, paired)"
    assert verdict(stats.Comparison(-3.3, 465.9, 2, stats.PAIRED)) == \
        "no difference detectable at 95% (n=2 blocks, paired)"
    assert verdict(stats.Comparison(-10.0, 60.9, 4, stats.WELCH)) == \
        "no difference detectable at 95% (n=4 trials, Welch)"
    one = stats.Comparison(-2.0, math.nan, 1, stats.NO_INTERVAL)
    assert verdict(one, one_repetition=True) == "one repetition: this study cannot tell workload differences from noise"
    assert "cannot tell this difference from noise" in verdict(one)


@pytest.mark.parametrize("comparison", [
    stats.Comparison(-30.0, 2.5, 3, stats.PAIRED), stats.Comparison(-3.0, 9.0, 2, stats.PAIRED),
    stats.Comparison(-30.0, 2.5, 6, stats.WELCH), stats.Comparison(-30.0, math.nan, 1, stats.NO_INTERVAL)])
@pytest.mark.parametrize("one_repetition", [True, False])
def test_verdicts_never_say_significant_or_distinguishable(comparison: stats.Comparison, one_repetition: bool) -> None:
    text = stats.comparison_verdict(comparison, one_repetition=one_repetition).lower()
    assert "significant" not in text and "distinguishable" not in text


# ----------------------------------------------------------------------------- noise floor


def test_minimum_detectable_effect_by_hand() -> None:
    # n = 3 trials per setting: df = 4
    assert stats.minimum_detectable_effect(2.0, 3) == pytest.approx((T975[4] + T80[4]) * 2.0 * math.sqrt(2 / 3))
    assert math.isnan(stats.minimum_detectable_effect(2.0, 1))
    assert stats.minimum_detectable_effect(1.0, np.array([2, 3])).shape == (2,)


def test_repetitions_needed_by_hand() -> None:
    # sd 1: n = 15 (df 28) gives (2.0484 + 0.8546) * sqrt(2/15) = 1.0600; n = 16 (df 30) gives
    # (2.0423 + 0.8538) * sqrt(2/16) = 1.0239. A target of 1.05 needs 16.
    assert (2.0484 + T80[28]) * math.sqrt(2 / 15) > 1.05 > (2.0423 + T80[30]) * math.sqrt(2 / 16)
    assert stats.repetitions_needed(1.0, 1.05) == 16
    assert stats.repetitions_needed(5.0, 5.25) == 16  # only sd / target matters
    assert stats.repetitions_needed(0.0, 1.0) == 2


def test_repetitions_needed_caps_at_1000() -> None:
    n = stats.repetitions_needed(1.0, 0.01)
    assert math.isinf(n)
    assert stats.format_repetitions(n) == "> 1000"
    assert stats.format_repetitions(16.0) == "16"
    assert stats.format_repetitions(stats.repetitions_needed(math.nan, 1.0)) == ""
