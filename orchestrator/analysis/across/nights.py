"""The night as a level of replication: judge tonight against the spread between earlier nights.

Two nights of one plan differ by more than their trials' noise: everything a night's trials share
(the host's state after boot, fragmentation, page cache, CPU frequency) moves all of them
together. So tonight's value of a setting's metric is judged against the band of the previous k
nights of the same plan, host and setting (a one-way random-effects model, night the random
factor, by the method of moments):

    s_b^2   variance of the k night means (ddof=1)
    s_w^2   pooled within-night variance of the trials
    sigma_night^2 = max(0, s_b^2 - s_w^2 / n_h)          n_h: harmonic mean of the nights' trials
    var_pred = sigma_night^2 + s_w^2 / n_tonight + s_b^2 / k
    band    = mean_k +- t(0.975, k - 1) * sqrt(var_pred)

With equal trial counts var_pred is s_b^2 (1 + 1/k), the textbook prediction interval for one
more night; the split lets a confirmation run with other trial counts be judged on the same band.
The degrees of freedom are those of s_b (k - 1): the night is the unit, however many trials a
night has. A series with no spread at all (every night's every trial equal: a count, whole full
scans) has no band: "no spread measured: cannot tell", never a zero-width interval. Otherwise the
spread is floored at the metric's resolution.

`walk` runs a series night by night, as the nightly job saw it: a night that lay outside the band
(the bad or the good way, beyond the threshold, p < SUSPECT_P) does not join the band, so a real
step stays visible on every night it lasts; once `new_level_after` nights running are outside the
same way, they are taken as the new level (the band restarts from them), as asv's step detection
accepts a step. compare (tonight against the history) and history (every night of the page) use
the same walk, so a night gets the same verdict from both.

Pure functions over (mean, sd, n) summaries: history.setting_summaries makes them from trials.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from orchestrator.analysis.stats import bh_reject, half_width95, holm_reject, t_two_sided_p

SUSPECT_P = 0.05  # a night outside its band at this level is a suspect (confirmation, not an alarm)


@dataclass(frozen=True)
class NightRules:
    """How many earlier nights a band needs and keeps, and the error rates of the verdicts."""

    min_nights: int = 3  # fewer earlier nights: no band, no alarm (the two-study rule applies)
    window: int = 10  # the band uses at most this many of the latest nights
    alpha: float = 0.05  # Holm family-wise error of the nightly exit status; BH q of history flags
    suspect_p: float = SUSPECT_P
    new_level_after: int = 3  # this many nights running outside the band, the same way: the new level

    def __post_init__(self) -> None:
        if self.min_nights < 2:
            raise ValueError(f"min_nights must be >= 2 (a band needs the spread of 2 nights), got {self.min_nights}")
        if self.window < self.min_nights:
            raise ValueError(f"window ({self.window}) must be >= min_nights ({self.min_nights})")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")


Summary = tuple[float, float, int]  # (mean, sd with ddof=1 or NaN, trials)


@dataclass(frozen=True)
class Band:
    nights: int  # k
    mean: float  # mean of the k night means
    between_sd: float  # s_b, floored at the resolution
    within_sd: float  # pooled s_w (NaN: no night had 2 trials)
    night_sd: float  # sigma_night, the night-level spread beyond the trials' own
    dof: int  # k - 1

    def se(self, n_tonight: int) -> float:
        """Standard error of (tonight's mean - the band's mean) for a night of n trials."""
        if not math.isfinite(self.within_sd) or n_tonight < 1:
            return self.between_sd * math.sqrt(1 + 1 / self.nights)
        var = self.night_sd**2 + self.within_sd**2 / n_tonight + self.between_sd**2 / self.nights
        return math.sqrt(var)

    def half(self, n_tonight: int) -> float:
        return half_width95(self.se(n_tonight), self.dof)


NO_SPREAD = "no spread measured in the earlier nights: cannot tell"


def band_of(nights: Sequence[Summary], resolution: float) -> Band | str:
    """The band of these nights, or why there is none (a sentence)."""
    kept = [(m, s, int(n)) for m, s, n in nights if math.isfinite(m) and n >= 1]
    k = len(kept)
    if k < 2:
        return f"{k} earlier night{'s' if k != 1 else ''} with a value: a band needs 2"
    means = np.array([m for m, _, _ in kept])
    s_b = float(means.std(ddof=1))
    with_sd = [(s, n) for _, s, n in kept if n >= 2 and math.isfinite(s)]
    dof_w = sum(n - 1 for _, n in with_sd)
    s_w = math.sqrt(sum((n - 1) * s * s for s, n in with_sd) / dof_w) if dof_w else math.nan
    if s_b == 0 and (not math.isfinite(s_w) or s_w == 0):
        return NO_SPREAD
    n_h = k / sum(1 / n for _, _, n in kept)
    s_b = max(s_b, resolution)
    if math.isfinite(s_w):
        s_w = max(s_w, resolution)
        night_sd = math.sqrt(max(0.0, s_b**2 - s_w**2 / n_h))
    else:
        night_sd = s_b
    return Band(k, float(means.mean()), s_b, s_w, night_sd, k - 1)


@dataclass
class Judgement:
    """One night's value of one setting's metric against the band of the nights before it."""

    mean: float
    n: int
    band: Band | None
    why_no_band: str  # "" when there is a band
    change: float = math.nan  # mean - band mean, in the metric's unit
    change_pct: float = math.nan  # in percent of |band mean| (relative metrics) or points (absolute)
    half_pct: float = math.nan  # 95% half width of the change, same scale as change_pct
    p: float = math.nan  # two-sided, t with k - 1 dof
    beyond: int = 0  # +1 beyond the threshold the good way, -1 the bad way, 0 within
    outside: bool = False  # beyond the threshold and p < suspect_p: does not join the band

    @property
    def band_low(self) -> float:
        return self.band.mean - self.band.half(self.n) if self.band else math.nan

    @property
    def band_high(self) -> float:
        return self.band.mean + self.band.half(self.n) if self.band else math.nan


def judge(
    value: Summary,
    band: Band | str,
    higher_is_better: bool,
    threshold: float,
    absolute: bool,
    near_zero: float,
    rules: NightRules = NightRules(),
) -> Judgement:
    """Tonight's (mean, sd, n) against a band. `threshold` is percent of the band's mean, or
    points of the metric itself when `absolute` (a change vs KSM off, already in percent)."""
    mean, _, n = value
    if isinstance(band, str):
        return Judgement(mean, int(n), None, band)
    if not math.isfinite(mean) or n < 1:
        return Judgement(mean, int(n), band, "no value tonight")
    if not absolute and abs(band.mean) < near_zero:
        return Judgement(mean, int(n), band, "the earlier nights' mean is about 0: no percent, no threshold")
    se = band.se(int(n))
    change = mean - band.mean
    scale = 1.0 if absolute else 100.0 / abs(band.mean)
    p = float(t_two_sided_p(change, se, band.dof))
    good = change > 0 if higher_is_better else change < 0
    beyond = 0 if abs(change * scale) <= threshold else (1 if good else -1)
    return Judgement(
        mean,
        int(n),
        band,
        "",
        change,
        change * scale,
        band.half(int(n)) * scale,
        p,
        beyond,
        beyond != 0 and p < rules.suspect_p,
    )


def walk(
    series: Iterable[Summary],
    higher_is_better: bool,
    threshold: float,
    absolute: bool,
    near_zero: float,
    resolution: float,
    rules: NightRules = NightRules(),
) -> tuple[list[Judgement], Band | str]:
    """Judge each night of a time-ordered series against the nights before it (module docstring);
    also return the band the next night would be judged against."""
    included: deque[Summary] = deque(maxlen=rules.window)
    run: list[tuple[Summary, int]] = []
    out: list[Judgement] = []

    def current() -> Band | str:
        if len(included) < rules.min_nights:
            return f"{len(included)} earlier night{'s' if len(included) != 1 else ''} in the band: {rules.min_nights} needed"
        return band_of(list(included), resolution)

    for night in series:
        j = judge(night, current(), higher_is_better, threshold, absolute, near_zero, rules)
        out.append(j)
        if not math.isfinite(night[0]):
            continue
        if j.outside:
            run = run + [(night, j.beyond)] if run and run[-1][1] == j.beyond else [(night, j.beyond)]
            if len(run) >= rules.new_level_after:
                included = deque((s for s, _ in run), maxlen=rules.window)
                run = []
        else:
            included.append(night)
            run = []
    return out, current()


def holm_gate(p_values: Any, bad_way: Any, alpha: float) -> np.ndarray:
    """The alarm of one night: Holm over the whole declared family (NaN p-values count), then
    only rejections the bad way beyond the threshold (bad_way) are regressions."""
    return holm_reject(p_values, alpha) & np.asarray(bad_way, dtype=bool)


def bh_flags(p_values: Any, beyond: Any, q: float) -> np.ndarray:
    """History flags over a page: Benjamini-Hochberg over every judged change, then only those
    beyond the threshold (either way) are flagged."""
    return bh_reject(p_values, q) & (np.asarray(beyond) != 0)
