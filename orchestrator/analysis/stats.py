"""Small statistics the report needs: t intervals, paired and Welch comparisons with KSM off,
the verdict sentence about them, the noise floor (minimum detectable effect), Pareto fronts.

The unit of replication is the trial: guests inside one trial share everything that varies
from trial to trial (host state, ksmd's timing, the other guests), so they are not replicates.
Callers pass one value per trial (or per block), never one per guest.

The quantiles and the noncentral-t power come from scipy.stats (exact at fractional dof,
which Welch's interval needs).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import special
from scipy import stats as sps
from scipy.optimize import brentq


def _t_quantile(dof: Any, probability: float) -> Any:
    dof_arr = np.asarray(dof, dtype=float)
    usable = ~np.isnan(dof_arr) & (dof_arr >= 1)  # inf dof is the normal, which scipy's t gives
    # scipy.special's t inverse is what sps.t.ppf calls, without its argument checks: the same
    # values, about 50x faster per scalar call (history pages ask for hundreds of thousands)
    out = np.where(usable, special.stdtrit(np.where(usable, dof_arr, 1.0), probability), np.nan)
    return float(out) if out.ndim == 0 else out


def t_quantile_975(dof: Any) -> Any:
    """t(0.975, dof) for the two-sided 95% interval; NaN where dof < 1. Accepts arrays."""
    return _t_quantile(dof, 0.975)


def half_width95(se: Any, dof: Any) -> Any:
    """Half width of the two-sided 95% t interval of an estimate with standard error `se` at
    `dof` degrees of freedom: every t interval of the package is this. NaN where dof < 1."""
    half = t_quantile_975(dof) * np.asarray(se, dtype=float)
    return float(half) if np.ndim(half) == 0 else half


def mean_half_width95(sd: Any, n: Any) -> Any:
    """Half width of the 95% t interval of a mean of n values with sample sd (ddof=1);
    NaN where n < 2. Accepts arrays (one mean per group)."""
    n_arr = np.asarray(n, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        half = np.where(
            n_arr >= 2, t_quantile_975(np.maximum(n_arr - 1, 1)) * np.asarray(sd, dtype=float) / np.sqrt(n_arr), np.nan
        )
    return float(half) if half.ndim == 0 else half


def mean_ci95(values: Any) -> tuple[float, float, int]:
    """(mean, half width of the 95% t interval, n) of the finite values; half is NaN if n < 2."""
    arr = np.asarray(values, dtype=float)
    arr = arr[np.isfinite(arr)]
    n = int(arr.size)
    if n == 0:
        return math.nan, math.nan, 0
    if n == 1:
        return float(arr[0]), math.nan, 1
    return float(arr.mean()), mean_half_width95(float(arr.std(ddof=1)), n), n


def wilson_ci95(successes: int, n: int) -> tuple[float, float]:
    """(low, high) of the 95% Wilson score interval of a proportion successes / n (a rate with
    its count: a true-positive rate of tested pages); (NaN, NaN) for n = 0. Wilson, not the
    normal approximation: it stays inside [0, 1] and is usable at 0 of n and n of n."""
    if n <= 0:
        return math.nan, math.nan
    z = float(sps.norm.ppf(0.975))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def welch_ci95(a: Any, b: Any) -> tuple[float, float]:
    """(mean(a) - mean(b), half width of Welch's 95% interval); half NaN when either n < 2."""
    a_arr = np.asarray(a, dtype=float)
    b_arr = np.asarray(b, dtype=float)
    a_arr, b_arr = a_arr[np.isfinite(a_arr)], b_arr[np.isfinite(b_arr)]
    if a_arr.size == 0 or b_arr.size == 0:
        return math.nan, math.nan
    diff = float(a_arr.mean() - b_arr.mean())
    if a_arr.size < 2 or b_arr.size < 2:
        return diff, math.nan
    va, vb = a_arr.var(ddof=1) / a_arr.size, b_arr.var(ddof=1) / b_arr.size
    se2 = va + vb
    if se2 == 0:
        return diff, 0.0
    return diff, half_width95(math.sqrt(se2), welch_dof(a_arr, b_arr))


def _finite(values: Any) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    return arr[np.isfinite(arr)]


def paired_pct_ci95(on: Any, off: Any) -> tuple[float, float, int]:
    """Percent change of paired values: per pair 100 * (on - off) / off, then the mean, the half
    width of its 95% t interval and the number of usable pairs (both finite, off non-zero).

    A pair is one block: the setting and its KSM-off trial ran back to back, so whatever drifts
    between blocks (host state, time of day) cancels in the difference."""
    return mean_ci95(paired_pct_differences(on, off))


def paired_pct_differences(on: Any, off: Any) -> np.ndarray:
    """Per pair 100 * (on - off) / off, NaN where the pair is not usable (a side missing, off
    zero), aligned with the input: what paired_pct_ci95 averages, and what the paired noise
    floor takes the spread of."""
    on_arr, off_arr = np.asarray(on, dtype=float), np.asarray(off, dtype=float)
    usable = np.isfinite(on_arr) & np.isfinite(off_arr) & (off_arr != 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(usable, 100.0 * (on_arr - off_arr) / off_arr, np.nan)


def welch_pct_ci95(on: Any, off: Any) -> tuple[float, float, int]:
    """Welch's difference of means as a percent of mean(off): (pct, half width, trials used).

    The reference mean is treated as exact in the division; with the few trials a study has
    its own uncertainty is already the larger part of Welch's interval."""
    on_arr, off_arr = _finite(on), _finite(off)
    n = int(on_arr.size + off_arr.size)
    if on_arr.size == 0 or off_arr.size == 0 or off_arr.mean() == 0:
        return math.nan, math.nan, n
    ref = float(off_arr.mean())
    diff, half = welch_ci95(on_arr, off_arr)
    return 100.0 * diff / ref, 100.0 * half / abs(ref), n


PAIRED = "paired by block"
WELCH = "Welch"
NO_INTERVAL = "none"


@dataclass(frozen=True)
class Comparison:
    """A setting vs its reference (KSM off), in percent of the reference.

    n: blocks when paired, trials on both sides for Welch, trials on the setting's side for none.
    """

    pct: float
    half_pct: float
    n: int
    method: str  # PAIRED | WELCH | NO_INTERVAL

    @property
    def has_interval(self) -> bool:
        return self.method != NO_INTERVAL and math.isfinite(self.half_pct)

    @property
    def differs(self) -> bool | None:
        """True when the 95% interval excludes 0; None without an interval."""
        if not self.has_interval or not math.isfinite(self.pct):
            return None
        return abs(self.pct) > self.half_pct


def compare_pct(on_by_block: Any, off_by_block: Any, on_trials: Any, off_trials: Any) -> Comparison:
    """Compare a setting with its reference, choosing the method from what was replicated.

    on_by_block / off_by_block: aligned values per block (NaN where a block lacks one side).
    Paired differences when at least 2 blocks have both sides; else Welch on the trial values
    when both sides have >= 2 trials; else only the difference of means, with no interval.
    """
    pct, half, n = paired_pct_ci95(on_by_block, off_by_block)
    if n >= 2:
        return Comparison(pct, half, n, PAIRED)
    on_arr, off_arr = _finite(on_trials), _finite(off_trials)
    if on_arr.size >= 2 and off_arr.size >= 2:
        pct, half, n = welch_pct_ci95(on_arr, off_arr)
        return Comparison(pct, half, n, WELCH)
    return Comparison(pct_difference(on_arr, off_arr), math.nan, int(on_arr.size), NO_INTERVAL)


def pct_difference(on: Any, off: Any) -> float:
    """100 * (mean(on) - mean(off)) / mean(off) over the finite values; NaN if either is empty."""
    on_arr, off_arr = _finite(on), _finite(off)
    if on_arr.size == 0 or off_arr.size == 0 or off_arr.mean() == 0:
        return math.nan
    return float(100.0 * (on_arr.mean() - off_arr.mean()) / off_arr.mean())


ONE_REPETITION = "one repetition: this study cannot tell workload differences from noise"


def comparison_verdict(comparison: Comparison, one_repetition: bool = False) -> str:
    """The one sentence fragment every report / compare / recommend uses for a comparison.

    Words are chosen so that no claim is made without an interval over trial-level replicates:
    a difference is claimed only when the 95% interval excludes 0."""
    if comparison.has_interval:
        unit = "blocks, paired" if comparison.method == PAIRED else "trials, Welch"
        replication = f"n={comparison.n} {unit}"
        if comparison.differs:
            return f"differs from KSM off (95% interval excludes 0; {replication})"
        return f"no difference detectable at 95% ({replication})"
    if one_repetition:
        return ONE_REPETITION
    return (
        f"no interval (n={comparison.n} trial{'s' if comparison.n != 1 else ''}; too few trials on a side): "
        "this study cannot tell this difference from noise"
    )


# ----------------------------------------------------------------------------- noise floor
# Power is exact: a two-sided t test at level alpha with noncentrality nc rejects with
# probability P(T' > t_crit) + P(T' < -t_crit), T' ~ noncentral t(dof, nc) (scipy.stats.nct).
# The smallest detectable effect is the nc that gives 80% power, times the standard error.

MDE_POWER = 0.80
MDE_ALPHA = 0.05
REPETITIONS_SEARCH_CAP = 1000
_NC_SEARCH_MAX = 40.0  # 80% power needs nc 16.5 at dof 1, less at every larger dof


def t_test_power(nc: Any, dof: float, alpha: float = MDE_ALPHA) -> Any:
    """Chance that a two-sided t test at level alpha rejects when the true mean / se is nc.
    Accepts an array of nc."""
    crit = float(sps.t.ppf(1 - alpha / 2, dof))
    nc_arr = np.abs(np.asarray(nc, dtype=float))  # the test is symmetric
    # scipy's nct loses the far tail of the wrong side (NaN at dof 1, nc 12-25), where it is
    # below Phi(-nc) < 1e-30: count it as 0
    wrong_side = np.nan_to_num(sps.nct.cdf(-crit, dof, nc_arr), nan=0.0)
    out = sps.nct.sf(crit, dof, nc_arr) + wrong_side
    return float(out) if out.ndim == 0 else out


@functools.lru_cache(maxsize=4096)  # bisections over n ask for the same few dof again and again
def detectable_noncentrality(dof: float, power: float = MDE_POWER, alpha: float = MDE_ALPHA) -> float:
    """The true mean / se that a two-sided t test at level alpha detects with the given power;
    NaN where dof < 1."""
    if not (math.isfinite(dof) and dof >= 1):
        return math.nan
    return float(brentq(lambda nc: t_test_power(nc, dof, alpha) - power, 0.0, _NC_SEARCH_MAX, xtol=1e-10))


def _per_n(n: Any, one: Any) -> Any:
    """Apply one(n) to each n (scalar or array), NaN where n < 2."""
    n_arr = np.asarray(n, dtype=float)
    out = np.array([one(float(k)) if k >= 2 else math.nan for k in n_arr.ravel()]).reshape(n_arr.shape)
    return float(out) if out.ndim == 0 else out


def _scaled(factor: Any, sd: Any) -> Any:
    out = np.asarray(factor, dtype=float) * np.asarray(sd, dtype=float)
    return float(out) if out.ndim == 0 else out


def minimum_detectable_effect(sd: Any, n: Any) -> Any:
    """Smallest true difference between two settings of n independent trials each that a
    two-sided 95% two-sample t test detects with 80% power, given run-to-run sd (its units):

        MDE = nc(df) * sd * sqrt(2 / n),   df = 2n - 2,   nc: detectable_noncentrality

    The unpaired design: for a study whose settings share blocks, paired_minimum_detectable_effect
    on the sd of the per-block differences is the figure for the comparison the study makes.
    NaN where n < 2. Accepts arrays."""
    factor = _per_n(n, lambda k: detectable_noncentrality(2 * k - 2) * math.sqrt(2.0 / k))
    return _scaled(factor, sd)


def paired_minimum_detectable_effect(sd_d: Any, blocks: Any) -> Any:
    """Smallest true mean paired difference that a two-sided 95% paired t test over `blocks`
    per-block differences of sd sd_d detects with 80% power:

        MDE = nc(blocks - 1) * sd_d / sqrt(blocks)

    NaN where blocks < 2. Accepts arrays."""
    factor = _per_n(blocks, lambda k: detectable_noncentrality(k - 1) / math.sqrt(k))
    return _scaled(factor, sd_d)


def _usable_sd_target(sd: float, target: float) -> bool:
    return math.isfinite(sd) and math.isfinite(target) and target > 0 and sd >= 0


def _smallest_n(enough: Any, cap: int) -> float:
    """Smallest n in [2, cap] with enough(n), by bisection (enough never turns false as n grows:
    power rises with n); math.inf when even cap is not enough."""
    if enough(2):
        return 2.0
    if not enough(cap):
        return math.inf
    low, high = 2, cap  # not enough(low), enough(high)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if enough(mid) else (mid, high)
    return float(high)


def repetitions_needed(sd: float, target: float, cap: int = REPETITIONS_SEARCH_CAP) -> float:
    """Smallest n (trials per setting, n >= 2) with minimum_detectable_effect(sd, n) <= target,
    as a float so that it sits in a numeric column: math.inf when more than cap trials would be
    needed, NaN when sd or target is not a finite usable number."""
    if not _usable_sd_target(sd, target):
        return math.nan
    return _smallest_n(lambda n: minimum_detectable_effect(sd, n) <= target, cap)


def blocks_needed(sd_d: float, target: float, cap: int = REPETITIONS_SEARCH_CAP) -> float:
    """Smallest number of blocks (>= 2) with paired_minimum_detectable_effect(sd_d, n) <= target;
    math.inf past cap, NaN when sd_d or target is not usable (as repetitions_needed)."""
    if not _usable_sd_target(sd_d, target):
        return math.nan
    return _smallest_n(lambda n: paired_minimum_detectable_effect(sd_d, n) <= target, cap)


def format_repetitions(n: float, cap: int = REPETITIONS_SEARCH_CAP) -> str:
    """repetitions_needed's value as text: "12", "> 1000" for inf, "" for NaN."""
    if math.isnan(n):
        return ""
    return f"> {cap}" if math.isinf(n) else str(int(n))


def format_needed_range(n: float, low: float, high: float, cap: int = REPETITIONS_SEARCH_CAP) -> str:
    """blocks_needed with the range from sd's 95% range: "4 (3-9)", "4 (3 to > 1000)", "" for NaN."""
    if math.isnan(n):
        return ""
    text = format_repetitions(n, cap)
    if math.isnan(low) or math.isnan(high):
        return text
    joint = " to " if math.isinf(high) else "-"
    return f"{text} ({format_repetitions(low, cap)}{joint}{format_repetitions(high, cap)})"


def pooled_sd(groups: Any) -> tuple[float, int]:
    """(pooled sd, dof) over groups that each have their own mean: sqrt(sum of squared
    deviations from each group's mean / sum(n_g - 1)). Groups with fewer than 2 finite values
    add nothing; (NaN, 0) when no group has 2."""
    squares, dof = 0.0, 0
    for values in groups:
        arr = _finite(values)
        if arr.size >= 2:
            squares += float(((arr - arr.mean()) ** 2).sum())
            dof += int(arr.size - 1)
    return (math.sqrt(squares / dof), dof) if dof else (math.nan, 0)


def shared_block_dof(differences: Any) -> float:
    """Degrees of freedom of pooled_sd over a complete settings x blocks matrix of paired
    differences whose settings share each block's reference trial.

    The shared trial's noise moves every setting's difference in that block together, so the
    sum(blocks - 1) per setting overstates what the pooled sd knows. With the two-way split
    d = setting + block + residual, the pooled variance is MS_block / S + (S - 1) / S * MS_resid
    (S settings), and Satterthwaite's dof of that sum runs from S (B - 1) (no shared part) down
    to B - 1 (all of it shared). One setting: B - 1."""
    d = np.asarray(differences, dtype=float)
    settings, blocks = d.shape
    full = settings * (blocks - 1)
    if settings < 2 or blocks < 2:
        return float(full)
    centered = d - d.mean(axis=1, keepdims=True)
    block_means = centered.mean(axis=0)
    block_part = (block_means**2).sum() / (blocks - 1)  # MS_block / S
    resid_part = ((centered - block_means) ** 2).sum() / (settings * (blocks - 1))  # (S-1)/S MS_resid
    if block_part + resid_part == 0:
        return float(full)
    dof = (block_part + resid_part) ** 2 / (
        block_part**2 / (blocks - 1) + resid_part**2 / ((settings - 1) * (blocks - 1))
    )
    return float(min(max(dof, blocks - 1), full))


def sd_range95(sd: float, dof: float) -> tuple[float, float]:
    """95% range of the true sd from a sample sd with dof degrees of freedom (chi-square):
    sd * sqrt(dof / chi2(0.975, dof)) .. sd * sqrt(dof / chi2(0.025, dof)); NaN when dof < 1."""
    if not (math.isfinite(sd) and math.isfinite(dof) and dof >= 1):
        return math.nan, math.nan
    return (sd * math.sqrt(dof / sps.chi2.ppf(0.975, dof)), sd * math.sqrt(dof / sps.chi2.ppf(0.025, dof)))


# A design sized on a pilot's sd inherits the pilot's luck: an sd estimated low sizes a study
# that misses the effect. Expected power averages the power over what the true sd could be
# given the pilot (sigma = s * sqrt(dof / X), X ~ chi2(dof)); because power depends on the sd
# only through effect / sd, a design that reaches 80% expected power for every pilot reaches
# 80% on average over pilots. Quantile midpoints of X are the average's nodes.
_EXPECTED_POWER_NODES = 200


def _sd_draws(sd: float, sd_dof: float) -> np.ndarray:
    x = sps.chi2.ppf((np.arange(_EXPECTED_POWER_NODES) + 0.5) / _EXPECTED_POWER_NODES, sd_dof)
    return sd * np.sqrt(sd_dof / x)


def paired_expected_power(effect: float, sd_d: float, sd_dof: float, blocks: int) -> float:
    """Power of the paired t test over `blocks` blocks for a true mean difference `effect`,
    averaged over the true sd given a pilot's sd_d with sd_dof degrees of freedom."""
    if blocks < 2 or not (sd_dof >= 1 and math.isfinite(sd_d)):
        return math.nan
    if sd_d == 0:
        return 1.0 if effect else MDE_ALPHA
    nc = effect * math.sqrt(blocks) / _sd_draws(sd_d, sd_dof)
    return float(np.mean(t_test_power(nc, blocks - 1)))


def paired_expected_mde(sd_d: float, sd_dof: float, blocks: int, power: float = MDE_POWER) -> float:
    """The true mean difference that the paired test over `blocks` blocks finds with the given
    expected power (paired_expected_power); NaN where it cannot be computed."""
    if blocks < 2 or not (sd_dof >= 1 and math.isfinite(sd_d) and sd_d >= 0):
        return math.nan
    if sd_d == 0:
        return 0.0
    high = paired_minimum_detectable_effect(sd_d, blocks)
    while paired_expected_power(high, sd_d, sd_dof, blocks) < power:
        high *= 2.0
    return float(brentq(lambda e: paired_expected_power(e, sd_d, sd_dof, blocks) - power, 0.0, high, xtol=1e-9 * high))


def blocks_needed_expected(
    sd_d: float, sd_dof: float, target: float, cap: int = REPETITIONS_SEARCH_CAP, power: float = MDE_POWER
) -> float:
    """Smallest number of blocks whose paired test finds `target` with the given expected power
    (the pilot's uncertainty in sd_d allowed for); inf past cap, NaN when not usable."""
    if not (_usable_sd_target(sd_d, target) and sd_dof >= 1):
        return math.nan
    return _smallest_n(lambda n: paired_expected_power(target, sd_d, sd_dof, n) >= power, cap)


def time_mean(
    t_s: np.ndarray,
    values: np.ndarray,
    start_s: float | None = None,
    end_s: float | None = None,
    steps_s: np.ndarray | None = None,
) -> float:
    """Trapezoid average of a sampled signal over its span: ticks need not be evenly spaced
    (they are jittered), and a tick that lands in a dense stretch must not weigh more.

    ``start_s``/``end_s``: average over exactly that window. The signal is interpolated at the
    window's edges, so a window that begins between two ticks weighs the part of the interval
    inside it and nothing outside.

    ``steps_s``: times at which the signal is known to jump (a refill breaking merges by
    copy-on-write). Between two ticks that straddle a step, each tick's value holds up to the
    step instead of a straight line across it: a line across a drop from h to 0 is off by
    h x (half the interval - where the step fell), which does not average out when the ticks
    and the refills drift slowly against each other (3% here for 0.1 s ticks and 14 cycles).
    """
    ok = np.isfinite(t_s) & np.isfinite(values)
    t, v = np.asarray(t_s, dtype=float)[ok], np.asarray(values, dtype=float)[ok]
    if t.size == 0:
        return math.nan
    steps = np.sort(np.asarray(steps_s, dtype=float)) if steps_s is not None else np.empty(0)
    if start_s is not None or end_s is not None:
        lo = t[0] if start_s is None else max(float(start_s), t[0])
        hi = t[-1] if end_s is None else min(float(end_s), t[-1])
        if not hi > lo:
            inside = (t >= lo) & (t <= hi)
            return float(v[inside].mean()) if inside.any() else float(np.interp(lo, t, v))
        inner = (t > lo) & (t < hi)
        edges = [_value_at(t, v, lo, steps, after=True), _value_at(t, v, hi, steps, after=False)]
        t = np.concatenate(([lo], t[inner], [hi]))
        v = np.concatenate(([edges[0]], v[inner], [edges[1]]))
    if t.size == 1 or t[-1] <= t[0]:
        return float(v.mean())
    dt = np.diff(t)
    area = (v[1:] + v[:-1]) * dt / 2.0
    if steps.size:
        # the first step inside each interval (t[i], t[i+1]): hold v[i] before it, v[i+1] after
        i = np.searchsorted(t, steps, side="right") - 1
        inside = (i >= 0) & (i < t.size - 1) & (steps > t[np.clip(i, 0, t.size - 1)])
        i, first = np.unique(i[inside], return_index=True)
        s = steps[inside][first]
        area[i] = v[i] * (s - t[i]) + v[i + 1] * (t[i + 1] - s)
    return float(np.sum(area) / (t[-1] - t[0]))


def _value_at(t: np.ndarray, v: np.ndarray, u: float, steps: np.ndarray, after: bool) -> float:
    """The signal at time u: interpolated between ticks, or held across a step (see time_mean).
    A step exactly at u is taken as already happened (after=True) or not yet (after=False)."""
    j = int(np.searchsorted(t, u, side="right"))
    if j == 0 or j >= t.size or t[j - 1] == u:
        return float(np.interp(u, t, v))
    within = steps[(steps > t[j - 1]) & (steps < t[j])]
    if within.size == 0:
        return float(np.interp(u, t, v))
    step = float(within[0])
    return float(v[j] if (u > step or (u == step and after)) else v[j - 1])


PARETO_TOLERANCE = 0.01  # savings within 1% of the largest count as equal on the frontier


def pareto_mask(cost: Any, benefit: Any, tolerance: float = 0.0) -> np.ndarray:
    """True where no other point is at least as cheap and at least as good.

    Benefits within ``tolerance`` (absolute) of each other count as equal, so a point that buys
    only noise-sized extra benefit for more cost is dominated; of exact duplicates the first is
    kept. NaN points are never Pareto-optimal. O(n^2), fine for the tens of settings a study has.
    """
    c = np.asarray(cost, dtype=float)
    b = np.asarray(benefit, dtype=float)
    valid = np.isfinite(c) & np.isfinite(b)
    n = c.size
    # [i, j]: does j dominate i?
    cheaper_or_equal = c[None, :] <= c[:, None]
    good_enough = b[None, :] >= b[:, None] - tolerance
    better_somewhere = (c[None, :] < c[:, None]) | (b[None, :] > b[:, None])
    duplicate_before = (
        (c[None, :] == c[:, None]) & (b[None, :] == b[:, None]) & (np.arange(n)[None, :] < np.arange(n)[:, None])
    )
    dominates = cheaper_or_equal & good_enough & (better_somewhere | duplicate_before) & valid[None, :]
    return valid & ~dominates.any(axis=1)


# ----------------------------------------------------------------------------- loading


# ----------------------------------------------------------------------------- families of tests
# One source for the multiplicity rules: the nightly exit status (Holm over a declared headline
# set), flags on a history page (Benjamini-Hochberg) and the worst-of-k headline all use these.


def t_two_sided_p(estimate: Any, se: Any, dof: Any) -> Any:
    """Two-sided p-value of estimate / se under Student t with dof degrees of freedom.

    NaN where se or dof is not usable (se <= 0 or non-finite, dof < 1): a test with no spread
    measured has no p-value, never 0 (see the callers' "no spread measured: cannot tell")."""
    est, se_arr, dof_arr = (np.asarray(x, dtype=float) for x in (estimate, se, dof))
    ok = np.isfinite(est) & np.isfinite(se_arr) & (se_arr > 0) & np.isfinite(dof_arr) & (dof_arr >= 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        stat = np.where(ok, np.abs(est) / np.where(ok, se_arr, 1.0), np.nan)
    p = np.where(ok, 2.0 * special.stdtr(np.where(ok, dof_arr, 1.0), -stat), np.nan)  # = sps.t.sf(stat, dof)
    return float(p) if p.ndim == 0 else p


def holm_reject(p_values: Any, alpha: float = 0.05) -> np.ndarray:
    """Holm-Bonferroni step-down over one family: sort p ascending, reject p_(i) while
    p_(i) <= alpha / (m - i + 1), stop at the first that is not. Controls the chance of any false
    rejection in the family at alpha. NaN p-values are never rejected but count in m (a test
    that was declared part of the family does not leave it by failing to give a p-value)."""
    p = np.asarray(p_values, dtype=float).ravel()
    m = p.size
    reject = np.zeros(m, dtype=bool)
    order = np.argsort(np.where(np.isfinite(p), p, np.inf), kind="stable")
    for rank, i in enumerate(order):
        if not (np.isfinite(p[i]) and p[i] <= alpha / (m - rank)):
            break
        reject[i] = True
    return reject


def bh_reject(p_values: Any, q: float = 0.05) -> np.ndarray:
    """Benjamini-Hochberg step-up: reject the k smallest p-values, k the largest rank with
    p_(k) <= q k / m. Keeps the expected share of false flags among the flags at q (and, when
    nothing changed at all, the chance of any flag at q). NaN p-values count in m, never flag."""
    p = np.asarray(p_values, dtype=float).ravel()
    m = p.size
    reject = np.zeros(m, dtype=bool)
    if m == 0:
        return reject
    finite = np.where(np.isfinite(p), p, np.inf)
    order = np.argsort(finite, kind="stable")
    below = np.flatnonzero(finite[order] <= q * np.arange(1, m + 1) / m)
    if below.size:
        reject[order[: below[-1] + 1]] = True
    return reject


# ----------------------------------------------------------------------------- p-values of comparisons
# Appended for the worst-of-k headline (Holm across a study's KSM-on settings): a Comparison
# keeps its half width, not its p-value, so the p-value is recovered from the interval it gave.


def welch_dof(a: Any, b: Any) -> float:
    """Welch-Satterthwaite degrees of freedom of mean(a) - mean(b); NaN when either side has < 2
    finite values or neither side varies."""
    a_arr, b_arr = _finite(a), _finite(b)
    if a_arr.size < 2 or b_arr.size < 2:
        return math.nan
    va, vb = a_arr.var(ddof=1) / a_arr.size, b_arr.var(ddof=1) / b_arr.size
    if va + vb == 0:
        return math.nan
    return float((va + vb) ** 2 / (va**2 / (a_arr.size - 1) + vb**2 / (b_arr.size - 1)))


def comparison_dof(comparison: Comparison, on_trials: Any, off_trials: Any) -> float:
    """Degrees of freedom behind a Comparison's interval: blocks - 1 when paired, Welch's for
    Welch (from the trial values it was built on), NaN without an interval."""
    if not comparison.has_interval:
        return math.nan
    if comparison.method == PAIRED:
        return float(comparison.n - 1)
    return welch_dof(on_trials, off_trials)


def comparison_p_value(comparison: Comparison, dof: float) -> float:
    """Two-sided p-value of a Comparison's difference from 0. The interval is
    pct ± t(0.975, dof) * se, so se is its half width over that quantile."""
    if not (comparison.has_interval and math.isfinite(dof) and dof >= 1):
        return math.nan
    if comparison.half_pct == 0:
        return 0.0 if comparison.pct != 0 else 1.0
    se = comparison.half_pct / float(t_quantile_975(dof))
    return float(t_two_sided_p(comparison.pct, se, dof))
