"""orchestrator.analysis.stats with numbers worked out by hand (t quantiles as printed in standard tables)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from orchestrator.analysis import stats

T975 = {1: 12.7062, 2: 4.3027, 4: 2.7764}
T80 = {4: 0.9410, 28: 0.8546, 30: 0.8538}


# ----------------------------------------------------------------------------- t(0.975), mean_ci95, pareto_mask


def _t_pdf(x: np.ndarray, dof: float) -> np.ndarray:
    log_norm = math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2) - 0.5 * math.log(dof * math.pi)
    return np.exp(log_norm - (dof + 1) / 2 * np.log1p(x * x / dof))


@pytest.mark.parametrize("dof", [1, 2, 3, 5, 7, 13, 30, 45, 90, 250])
def test_t_quantile_covers_95_percent(dof: float) -> None:
    q = stats.t_quantile_975(dof)
    x = np.linspace(-q, q, 400_001)
    coverage = np.trapezoid(_t_pdf(x, dof), x)
    assert coverage == pytest.approx(0.95, abs=2e-4)


def test_t_quantile_large_dof_is_normal_and_small_dof_nan() -> None:
    assert stats.t_quantile_975(1e9) == pytest.approx(1.96, abs=1e-4)
    assert math.isnan(stats.t_quantile_975(0))


def test_mean_ci95_of_two_values_uses_t_with_one_dof() -> None:
    mean, half, n = stats.mean_ci95([10.0, 14.0, math.nan])
    assert (mean, n) == (12.0, 2)
    assert half == pytest.approx(12.7062 * np.std([10.0, 14.0], ddof=1) / math.sqrt(2))
    assert math.isnan(stats.mean_ci95([3.0])[1])


def test_pareto_mask_keeps_non_dominated_points() -> None:
    cost = [1.0, 2.0, 2.0, 3.0, math.nan]
    saved = [10.0, 20.0, 15.0, 19.0, 50.0]
    assert stats.pareto_mask(cost, saved).tolist() == [True, True, False, False, False]


def test_pareto_mask_tolerance_drops_noise_sized_gains_and_duplicates() -> None:
    cost = [1.0, 2.0, 5.0, 5.0]
    saved = [100.0, 100.5, 200.0, 200.0]
    assert stats.pareto_mask(cost, saved).tolist() == [True, True, True, False]
    assert stats.pareto_mask(cost, saved, tolerance=2.0).tolist() == [True, False, True, False]


def test_t_quantiles_match_the_printed_tables_and_fractional_dof() -> None:
    assert stats.t_quantile_975(1) == pytest.approx(12.706, abs=5e-4)
    assert stats.t_quantile_975(2) == pytest.approx(4.303, abs=5e-4)
    assert stats.t_quantile_975(np.inf) == pytest.approx(1.960, abs=5e-4)
    # df 2.5 (a Welch dof) lies between df 2 and 3, nearer 3 than a straight line in df says:
    # scipy's exact t(0.975, 2.5) = 3.5747 (a line between 4.303 and 3.182 would give 3.742)
    assert stats.t_quantile_975(2.5) == pytest.approx(3.5747, abs=1e-4)
    assert stats.t_quantile_975(3) < stats.t_quantile_975(2.5) < stats.t_quantile_975(2)


# ----------------------------------------------------------------------------- comparisons


def test_paired_pct_by_hand() -> None:
    # per block: -10%, -20%, +10%; mean -20/3, sd^2 = (100/9 + 1600/9 + 2500/9) / 2 = 700/3
    pct, half, n = stats.paired_pct_ci95([90.0, 80.0, 110.0], [100.0, 100.0, 100.0])
    assert (pct, n) == (pytest.approx(-20 / 3), 3)
    assert half == pytest.approx(T975[2] * math.sqrt(700 / 3) / math.sqrt(3), rel=1e-4)


def test_paired_pct_skips_blocks_missing_a_side_or_with_zero_reference() -> None:
    pct, half, n = stats.paired_pct_ci95([90.0, math.nan, 5.0, 60.0], [100.0, 100.0, 0.0, 50.0])
    assert n == 2  # -10% and +20%
    assert pct == pytest.approx(5.0)
    assert half == pytest.approx(T975[1] * np.std([-10.0, 20.0], ddof=1) / math.sqrt(2), rel=1e-4)


def test_welch_pct_by_hand() -> None:
    # diff -1; var/n = 1 and 1, se^2 = 2, Welch df = 4 / (1 + 1) = 2; reference mean 10
    pct, half, n = stats.welch_pct_ci95([8.0, 10.0], [9.0, 11.0])
    assert (pct, n) == (pytest.approx(-10.0), 4)
    assert half == pytest.approx(100 * T975[2] * math.sqrt(2) / 10, rel=1e-4)


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
    assert (
        verdict(stats.Comparison(-30.0, 2.5, 3, stats.PAIRED))
        == "differs from KSM off (95% interval excludes 0; n=3 blocks, paired)"
    )
    assert (
        verdict(stats.Comparison(-3.3, 465.9, 2, stats.PAIRED))
        == "no difference detectable at 95% (n=2 blocks, paired)"
    )
    assert (
        verdict(stats.Comparison(-10.0, 60.9, 4, stats.WELCH)) == "no difference detectable at 95% (n=4 trials, Welch)"
    )
    one = stats.Comparison(-2.0, math.nan, 1, stats.NO_INTERVAL)
    assert verdict(one, one_repetition=True) == "one repetition: this study cannot tell workload differences from noise"
    assert "cannot tell this difference from noise" in verdict(one)


@pytest.mark.parametrize(
    "comparison",
    [
        stats.Comparison(-30.0, 2.5, 3, stats.PAIRED),
        stats.Comparison(-3.0, 9.0, 2, stats.PAIRED),
        stats.Comparison(-30.0, 2.5, 6, stats.WELCH),
        stats.Comparison(-30.0, math.nan, 1, stats.NO_INTERVAL),
    ],
)
@pytest.mark.parametrize("one_repetition", [True, False])
def test_verdicts_never_say_significant_or_distinguishable(comparison: stats.Comparison, one_repetition: bool) -> None:
    text = stats.comparison_verdict(comparison, one_repetition=one_repetition).lower()
    assert "significant" not in text and "distinguishable" not in text


# ----------------------------------------------------------------------------- noise floor


def test_power_matches_published_sample_sizes() -> None:
    # Cohen (1988): d = 0.5 needs 64 per group for 80% (two-sample, two-sided 5%): power 0.8015;
    # the paired / one-sample test with d = 1 at n = 10 has power 0.8031 (G*Power gives the same)
    assert stats.t_test_power(0.5 * math.sqrt(64 / 2), 126) == pytest.approx(0.8015, abs=1e-4)
    assert stats.t_test_power(1.0 * math.sqrt(10), 9) == pytest.approx(0.8031, abs=1e-4)
    assert stats.t_test_power(0.0, 5) == pytest.approx(0.05)


def test_minimum_detectable_effect_is_the_effect_with_80_percent_power() -> None:
    mde = stats.minimum_detectable_effect(2.0, 3)  # n = 3 trials per setting: df = 4
    assert stats.t_test_power(mde / (2.0 * math.sqrt(2 / 3)), 4) == pytest.approx(0.80, abs=1e-6)
    # the normal-approximation formula with t quantiles is a little optimistic at small df
    assert mde > (T975[4] + T80[4]) * 2.0 * math.sqrt(2 / 3)
    assert stats.minimum_detectable_effect(1.0, 64) == pytest.approx(0.5, abs=2e-3)
    assert math.isnan(stats.minimum_detectable_effect(2.0, 1))
    assert stats.minimum_detectable_effect(1.0, np.array([2, 3])).shape == (2,)


def test_paired_minimum_detectable_effect_by_hand() -> None:
    # d = 1 sd at 10 blocks has power 0.8031: the 80% effect is just under 1 sd
    assert stats.paired_minimum_detectable_effect(1.0, 10) == pytest.approx(0.9960, abs=1e-4)
    assert stats.paired_minimum_detectable_effect(3.0, 10) == pytest.approx(3 * 0.9960, abs=3e-4)
    assert math.isnan(stats.paired_minimum_detectable_effect(1.0, 1))
    assert stats.blocks_needed(1.0, 1.0) == 10  # 0.996 <= 1 at 10; at 9 it is above 1
    assert stats.paired_minimum_detectable_effect(1.0, 9) > 1.0


def test_paired_mde_has_80_percent_power_in_a_seeded_simulation() -> None:
    rng = np.random.default_rng(18)
    blocks, sd_d, studies = 5, 4.0, 4000
    mde = stats.paired_minimum_detectable_effect(sd_d, blocks)
    differences = rng.normal(mde, sd_d, size=(studies, blocks))
    off = 100.0 + rng.normal(0.0, 30.0, size=(studies, 1))  # a block effect that pairs cancel
    on = off * (1 + differences / 100)
    rejected = [stats.compare_pct(o, f, o, f).differs for o, f in zip(on, np.broadcast_to(off, on.shape))]
    assert np.mean(rejected) == pytest.approx(0.80, abs=0.025)  # binomial sd 0.0063


def test_repetitions_needed_by_hand() -> None:
    # sd 1: n = 64 gives 0.4991, n = 63 gives 0.5031 (Cohen's 64 for d = 0.5)
    assert stats.minimum_detectable_effect(1.0, 63) > 0.5 > stats.minimum_detectable_effect(1.0, 64)
    assert stats.repetitions_needed(1.0, 0.5) == 64
    assert stats.repetitions_needed(5.0, 2.5) == 64  # only sd / target matters
    assert stats.repetitions_needed(0.0, 1.0) == 2


def test_sd_range_from_chi_square() -> None:
    # dof 4: chi2(0.975) = 11.143, chi2(0.025) = 0.4844
    low, high = stats.sd_range95(1.0, 4)
    assert (low, high) == (
        pytest.approx(math.sqrt(4 / 11.143), abs=1e-4),
        pytest.approx(math.sqrt(4 / 0.4844), abs=1e-3),
    )
    assert all(math.isnan(x) for x in stats.sd_range95(1.0, 0))


def test_pooled_sd_keeps_each_group_mean() -> None:
    # deviations (-1, 1) and (-2, 0, 2): 2 + 8 = 10 over 1 + 2 dof
    sd, dof = stats.pooled_sd([[9.0, 11.0], [98.0, 100.0, 102.0], [5.0]])
    assert (sd, dof) == (pytest.approx(math.sqrt(10 / 3)), 3)
    assert stats.pooled_sd([[1.0]]) == (pytest.approx(math.nan, nan_ok=True), 0)


def test_shared_block_dof_runs_from_independent_to_one_shared_trial() -> None:
    rng = np.random.default_rng(3)
    independent = rng.normal(0.0, 1.0, (4, 40))
    assert stats.shared_block_dof(independent) == pytest.approx(4 * 39, rel=0.25)
    shared = rng.normal(0.0, 1.0, (1, 40)) + rng.normal(0.0, 1e-3, (4, 40))  # all noise from the block
    assert stats.shared_block_dof(shared) == pytest.approx(39, rel=0.01)
    assert stats.shared_block_dof(np.array([[1.0, 2.0, 4.0]])) == 2  # one setting: blocks - 1


def test_expected_power_allows_for_the_pilot_sd() -> None:
    # with a well-measured sd expected power is the power; with a pilot of 3 dof it needs more blocks
    assert stats.paired_expected_power(0.996, 1.0, 10_000, 10) == pytest.approx(0.80, abs=3e-3)
    assert stats.blocks_needed_expected(1.0, 10_000, 1.0) == 10
    assert stats.blocks_needed_expected(1.0, 3, 1.0) > stats.blocks_needed(1.0, 1.0)
    mde = stats.paired_expected_mde(1.0, 3, 12)
    assert stats.paired_expected_power(mde, 1.0, 3, 12) == pytest.approx(0.80, abs=1e-6)
    assert stats.format_needed_range(4.0, 3.0, math.inf) == "4 (3 to > 1000)"


def test_repetitions_needed_caps_at_1000() -> None:
    n = stats.repetitions_needed(1.0, 0.01)
    assert math.isinf(n)
    assert stats.format_repetitions(n) == "> 1000"
    assert stats.format_repetitions(16.0) == "16"
    assert stats.format_repetitions(stats.repetitions_needed(math.nan, 1.0)) == ""
