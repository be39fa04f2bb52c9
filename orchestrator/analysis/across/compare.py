"""Compare two studies of one plan (two nights, or two hosts): what changed, and is it a regression.

For every setting both studies ran (matched by the swept settings and KSM off), each metric's
change B - A, in the metric's unit and in percent of A's mean (in points for the changes vs KSM
off, already percentages), with a 95% Welch interval across the two studies' trials of that
setting. The trial is the unit of replication inside a study; guests never are.

Two single studies cannot tell a regression from a night effect: everything one night's trials
share moves them together, and no interval of either study contains it. So the verdict depends on
what is known about the spread between nights (RULES below, printed and in --json):
- two studies only: a bad-way change beyond the threshold whose Welch interval excludes 0 is
  "unconfirmed", and never an exit status;
- `night_sd` (the sd between earlier nights' means, per metric, from the user): the interval of
  the change takes it in (var >= 2 night_sd^2), and the headline family is gated by Holm;
- the history of earlier nights (nights.py): tonight is judged against the band of the previous
  nights of the same plan, host and setting, and the headline family is gated by Holm.
The exit status rests on the declared headline set (HEADLINE: the saving, ksmd CPU and the
within-night changes vs KSM off, per KSM-on setting) with Holm-Bonferroni across it at alpha;
every other change is reported, never gating. Raw tps and latency stay in the tables, but the
nightly gate uses the change vs that night's KSM-off trials (paired by block), which cancels the
host's speed that night.

Pure functions over StudyData / StudyMetrics (and the history index rows), plus `load_pair`.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from orchestrator.analysis import studymetrics
from orchestrator.analysis.across import nights
from orchestrator.store import studydata
from orchestrator.store.catalog import hostname_of
from orchestrator.errors import CompareError
from orchestrator.analysis.stats import NO_INTERVAL, WELCH, half_width95, mean_ci95, t_two_sided_p, welch_ci95
from orchestrator.store.studydata import StudyData
from orchestrator.analysis.studymetrics import StudyMetrics
from orchestrator.host.probes import KSM_COUNTERS

REGRESSION = "regression"  # gating: a headline change that survives Holm (exit 1)
SUSPECT = "suspect"  # a headline change outside the band that does not survive Holm: confirm it
WORSE = "worse, not gating"  # outside the band the bad way, not a headline metric
UNCONFIRMED = "unconfirmed"  # bad way beyond the threshold, but nothing known of the nights' spread
IMPROVEMENT = "improvement"
WITHIN_THRESHOLD = "within threshold"
NO_CHANGE = "no detectable change"
CANNOT_TELL = "cannot tell"
VERDICTS = (REGRESSION, SUSPECT, WORSE, UNCONFIRMED, IMPROVEMENT, WITHIN_THRESHOLD, NO_CHANGE, CANNOT_TELL)
MANY_COMPARISONS = 20  # from this many judged changes on, say that a few may be flagged by chance
NO_SPREAD = "no spread measured (every trial equal): cannot tell"

TWO_STUDIES = "two studies"
NIGHT_SD = "night sd"
HISTORY = "history"

RULE = (
    "A change is beyond its threshold when it goes the metric's bad way by more than the threshold "
    "(percent of A's mean; points for the changes vs KSM off) AND its 95% interval (Welch, across the "
    "two studies' trials of that setting) excludes 0; an improvement likewise the good way. A change "
    "whose interval excludes 0 but that is smaller than the threshold is 'within threshold'. With one "
    "trial on a side there is no interval: 'cannot tell'."
)
RULES = {
    TWO_STUDIES: (
        "Two single studies cannot measure how much nights differ, so a bad-way change beyond its "
        "threshold is 'unconfirmed' and never makes the exit status 1. Pass --history RESULTS_ROOT "
        "(earlier nights of this plan and host) or --night-sd METRIC=VALUE for a verdict."
    ),
    NIGHT_SD: (
        "The interval of a change with a given --night-sd has at least the variance two nights differ "
        "by (2 night_sd^2). The exit status is 1 when a headline change goes the bad way beyond its "
        "threshold and survives Holm-Bonferroni at alpha across the headline family; metrics without "
        "a night sd follow the two-study rule ('unconfirmed')."
    ),
    HISTORY: (
        "Study B is judged against the band of the previous nights of the same plan, host and setting "
        "(random-effects prediction interval, t with nights-1 df). The exit status is 1 when a headline "
        "change goes the bad way beyond its threshold and survives Holm-Bonferroni at alpha across the "
        "headline family; a headline change outside the band (p < 0.05) that does not survive is a "
        "'suspect' (the nightly job confirms it); other metrics are reported, never gating. With fewer "
        "earlier nights than needed a metric follows the two-study rule ('unconfirmed')."
    ),
}


@dataclass(frozen=True)
class MetricSpec:
    name: str
    unit: str
    higher_is_better: bool
    threshold: str  # field of Thresholds
    near_zero: float  # |mean of A| below this: a percent change is undefined (e.g. no saving at all)
    # (so is one whose own 95% interval includes 0, see percent_defined)
    on_ksm_off: bool  # meaningful for KSM-off settings too (workload), or only with KSM running
    resolution: float  # the smallest step the metric is recorded in: the floor of any sd
    absolute: bool = False  # already a percent change (vs KSM off): judged in points, not percent of A


METRICS = (
    MetricSpec("saved_mib", "MiB", True, "saving_drop_pct", 1.0, False, 1 / 256),  # one 4 KiB page
    MetricSpec("general_profit_mib", "MiB", True, "saving_drop_pct", 1.0, False, 1 / 256),
    MetricSpec("pss_drop_mib", "MiB", True, "saving_drop_pct", 1.0, False, 1 / 1024),  # smaps is in KiB
    MetricSpec("mem_available_rise_mib", "MiB", True, "saving_drop_pct", 1.0, False, 1 / 1024),
    MetricSpec("ksmd_cpu_pct", "% of a core", False, "cpu_rise_pct", 0.05, False, 0.01),
    MetricSpec("time_to_90pct_s", "s", False, "converge_rise_pct", 0.5, False, 0.01),
    MetricSpec("tps", "tx/s", True, "tps_drop_pct", 1e-9, True, 0.01),  # sysbench prints 2 decimals
    MetricSpec("latency_p95_ms", "ms", False, "latency_rise_pct", 1e-9, True, 0.01),
    # within the night, paired by block with that night's KSM-off trials: the host's speed cancels
    MetricSpec("tps_vs_off_pct", "% vs KSM off", True, "tps_drop_pct", 0.0, False, 0.01, absolute=True),
    MetricSpec("latency_p95_ms_vs_off_pct", "% vs KSM off", False, "latency_rise_pct", 0.0, False, 0.01, absolute=True),
)
METRIC_NAMES = tuple(m.name for m in METRICS)
SPECS = {m.name: m for m in METRICS}
# the declared family the exit status rests on (per KSM-on setting); everything else is reported
HEADLINE = ("saved_mib", "ksmd_cpu_pct", "tps_vs_off_pct", "latency_p95_ms_vs_off_pct")


def check_metric_names(names: Any, what: str) -> tuple[str, ...]:
    """The names, or a CompareError naming the unknown ones and the known."""
    names = tuple(names)
    unknown = [n for n in names if n not in SPECS]
    if unknown:
        raise CompareError(f"{what}: unknown metric {', '.join(map(repr, unknown))} (known: {', '.join(METRIC_NAMES)})")
    return names


@dataclass(frozen=True)
class Thresholds:
    """Percent of study A's mean (or of the earlier nights' band) by which a metric may move the bad
    way before it is a regression; points for the changes vs KSM off (tps_vs_off_pct: tps_drop_pct)."""

    saving_drop_pct: float = 10.0
    cpu_rise_pct: float = 20.0
    converge_rise_pct: float = 25.0
    tps_drop_pct: float = 5.0
    latency_rise_pct: float = 10.0

    def for_metric(self, spec: MetricSpec) -> float:
        return float(getattr(self, spec.threshold))


@dataclass
class MetricChange:
    metric: str
    unit: str
    better: str  # "higher" | "lower"
    a_mean: float
    a_ci95: float
    a_n: int
    b_mean: float
    b_ci95: float
    b_n: int
    change: float  # b_mean - a_mean, in unit
    change_ci95: float  # half width of Welch's 95% interval of the change, in unit (NaN: none)
    change_pct: float  # change in percent of |a_mean| (NaN when a_mean is ~0)
    change_ci95_pct: float
    method: str  # stats.WELCH | stats.NO_INTERVAL
    threshold_pct: float
    verdict: str
    note: str
    headline: bool = False  # part of the family the exit status rests on
    p: float = math.nan  # two-sided p of the judged change (against the band, or the night-sd interval)
    band_mean: float = math.nan  # the earlier nights' band (history), in unit
    band_low: float = math.nan
    band_high: float = math.nan
    band_nights: int = 0
    band_night_sd: float = math.nan  # the night-level spread beyond the trials' own, in unit
    band_change_pct: float = math.nan  # B against the band's mean, in % (points for vs-off metrics)
    band_half_pct: float = math.nan
    a_values: list[float] = field(default_factory=list)  # the raw per-trial values behind the means
    b_values: list[float] = field(default_factory=list)


@dataclass
class SettingChange:
    setting: str
    ksm_off: bool
    metrics: list[MetricChange]


@dataclass
class Comparison:
    a: dict[str, Any]
    b: dict[str, Any]
    thresholds: Thresholds
    settings: list[SettingChange]
    only_in_a: list[str]
    only_in_b: list[str]
    host_diff: list[dict[str, Any]]
    plan_diff: str
    rule: str = RULE
    html: str | None = None
    notes: list[str] = field(default_factory=list)
    mode: str = TWO_STUDIES  # what the exit status rests on: TWO_STUDIES | NIGHT_SD | HISTORY
    mode_rule: str = RULES[TWO_STUDIES]
    headline: tuple[str, ...] = HEADLINE
    alpha: float = 0.05
    family_size: int = 0  # headline changes judged with a night-level spread (Holm's m)

    @property
    def regressions(self) -> list[tuple[str, MetricChange]]:
        return [(s.setting, m) for s in self.settings for m in s.metrics if m.verdict == REGRESSION]

    @property
    def suspects(self) -> list[tuple[str, MetricChange]]:
        """Headline changes worth a confirmation run: regressions and suspects."""
        return [(s.setting, m) for s in self.settings for m in s.metrics if m.verdict in (REGRESSION, SUSPECT)]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["thresholds"] = asdict(self.thresholds)
        out["regressions"] = len(self.regressions)
        out["suspects"] = [{"setting": s, "metric": m.metric} for s, m in self.suspects]
        out["chance"] = chance_sentence(self)
        return _clean(out)


def chance_sentence(result: "Comparison") -> str:
    """How often chance alone would give this verdict on an unchanged night."""
    if result.mode == TWO_STUDIES or not result.family_size:
        return "no change here can make the exit status 1 (no night-level spread known)"
    return (
        f"Holm over {result.family_size} headline changes at alpha {result.alpha:g}: on a night where "
        f"nothing changed, the exit status is 1 by chance at most {100 * result.alpha:g}% of the time"
    )


def _clean(value: Any) -> Any:
    """NaN / inf are not JSON: null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


# ----------------------------------------------------------------------------- the verdict


def judge(
    change_pct: float, half_pct: float, has_interval: bool, higher_is_better: bool, threshold_pct: float
) -> tuple[str, str]:
    """(verdict, note) of one change in percent, by RULE."""
    if not math.isfinite(change_pct):
        return CANNOT_TELL, "no percent change (A's mean is about 0 or a side has no value)"
    bad_sign = -1.0 if higher_is_better else 1.0
    worse = change_pct * bad_sign > 0
    if not has_interval:
        note = "one trial on a side: no interval, so no claim either way"
        if abs(change_pct) > threshold_pct:
            note += f" (the change, {change_pct:+.1f}%, is beyond the {threshold_pct:g}% threshold: rerun with repetitions >= 2)"
        return CANNOT_TELL, note
    if abs(change_pct) <= half_pct:
        reach = (change_pct + bad_sign * half_pct) * bad_sign  # the interval's bad end, as a positive %
        if reach > threshold_pct:
            return NO_CHANGE, (
                f"the interval reaches {bad_sign * reach:+.1f}%, beyond the {threshold_pct:g}% "
                "threshold: too few trials to rule out a regression of that size"
            )
        return NO_CHANGE, "the 95% interval includes 0"
    if abs(change_pct) > threshold_pct:
        return (REGRESSION if worse else IMPROVEMENT), (
            f"beyond the {threshold_pct:g}% threshold and the 95% interval excludes 0"
        )
    return WITHIN_THRESHOLD, f"the 95% interval excludes 0, but the change is under the {threshold_pct:g}% threshold"


def _finite(values: Any) -> np.ndarray:
    arr = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce").to_numpy(dtype=float)
    return arr[np.isfinite(arr)]


def _mean_half(values: np.ndarray) -> tuple[float, float]:
    mean, half, _ = mean_ci95(values)
    return mean, half


def percent_defined(spec: MetricSpec, mean_a: float, half_a: float) -> bool:
    """A percent of A's mean means something only when A's mean is away from 0: above the
    metric's floor and outside its own 95% interval (a saving of 0.3 +- 0.8 MiB is no base for
    "+200%"). With one trial (no interval) only the floor applies."""
    if not (math.isfinite(mean_a) and abs(mean_a) >= spec.near_zero):
        return False
    return not (math.isfinite(half_a) and abs(mean_a) <= half_a)


def _about_zero(interval_includes_zero: bool) -> tuple[str, str]:
    if interval_includes_zero:
        return NO_CHANGE, "A's mean cannot be told from 0, so no percent; the change's 95% interval includes 0"
    return (
        CANNOT_TELL,
        "A's mean cannot be told from 0 (under the floor or within its own interval): no percent, no threshold",
    )


def compare_values(spec: MetricSpec, a_values: Any, b_values: Any, thresholds: Thresholds) -> MetricChange | None:
    """One metric of one setting: Welch on the two studies' trial values. None when neither
    study has a value (the metric does not apply: tps of a processes study)."""
    a, b = _finite(a_values), _finite(b_values)
    if a.size == 0 and b.size == 0:
        return None
    a_mean, a_half = _mean_half(a)
    b_mean, b_half = _mean_half(b)
    threshold = thresholds.for_metric(spec)
    change, half = welch_ci95(b, a)
    has_interval = a.size >= 2 and b.size >= 2 and math.isfinite(half)
    scale = 1.0 if spec.absolute else abs(a_mean)
    if has_interval and half == 0:  # every trial equal on both sides: a zero-width interval claims nothing
        pct = (
            change if spec.absolute else (100.0 * change / scale if percent_defined(spec, a_mean, a_half) else math.nan)
        )
        has_interval, half, half_pct = False, math.nan, math.nan
        verdict, note = CANNOT_TELL, NO_SPREAD
    elif a.size and b.size and (spec.absolute or percent_defined(spec, a_mean, a_half)):
        pct, half_pct = (change, half) if spec.absolute else (100.0 * change / scale, 100.0 * half / scale)
        verdict, note = judge(pct, half_pct, has_interval, spec.higher_is_better, threshold)
    else:
        pct, half_pct = math.nan, math.nan
        if not (a.size and b.size):
            verdict, note = CANNOT_TELL, f"no value in study {'A' if not a.size else 'B'}"
        else:
            verdict, note = _about_zero(has_interval and abs(change) <= half)
    return MetricChange(
        spec.name,
        spec.unit,
        "higher" if spec.higher_is_better else "lower",
        a_mean,
        a_half,
        int(a.size),
        b_mean,
        b_half,
        int(b.size),
        change,
        half if has_interval else math.nan,
        pct,
        half_pct if has_interval else math.nan,
        WELCH if has_interval else NO_INTERVAL,
        threshold,
        verdict,
        note,
        a_values=a.tolist(),
        b_values=b.tolist(),
    )


# ----------------------------------------------------------------------------- the two studies


def study_summary(study: StudyData) -> dict[str, Any]:
    return {
        "path": str(study.study_dir),
        "name": str(study.study.get("name") or study.study_dir.name),
        "host": hostname_of(study.host),
        "created_wall": study.study.get("created_wall"),
        "kernel": study.host.get("kernel"),
    }


def _used(sm: StudyMetrics) -> pd.DataFrame:
    trials = sm.trials
    if trials.empty:
        return trials
    return trials[trials["used_in_stats"]]


def _settings_of(sm: StudyMetrics) -> dict[str, tuple[str, bool]]:
    """group key -> (label, ksm_off) of every setting with at least one trial used in statistics."""
    out: dict[str, tuple[str, bool]] = {}
    used = _used(sm)
    if used.empty:
        return out
    for group, label, ksm_off in zip(used["_group"], used["setting"], used["ksm_off"]):
        out.setdefault(str(group), (str(label), bool(ksm_off)))
    return out


def check_comparable(a: StudyData, sa: StudyMetrics, b: StudyData, sb: StudyMetrics) -> None:
    """Refuse studies of different plans: another study name, or other swept axes."""
    name_a, name_b = study_summary(a)["name"], study_summary(b)["name"]
    if name_a != name_b:
        raise CompareError(
            f"refusing to compare studies of different plans: {a.study_dir} is study "
            f"'{name_a}', {b.study_dir} is study '{name_b}'"
        )
    if set(sa.axes) != set(sb.axes):
        raise CompareError(
            f"refusing to compare: the plans sweep different axes ({a.study_dir}: "
            f"{', '.join(sa.axes) or 'none'}; {b.study_dir}: {', '.join(sb.axes) or 'none'})"
        )


@dataclass(frozen=True)
class NightContext:
    """What is known of the spread between nights (module docstring): the history index rows of
    the results root (history.build_index), and/or a night sd per metric, in its unit."""

    history: pd.DataFrame | None = None
    night_sd: dict[str, float] = field(default_factory=dict)
    rules: nights.NightRules = nights.NightRules()
    headline: tuple[str, ...] = HEADLINE


def _summary(values: Any) -> nights.Summary:
    v = _finite(values)
    if v.size == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size >= 2 else math.nan, int(v.size)


def _series(rows: pd.DataFrame, metric: str) -> list[nights.Summary]:
    cols = [pd.to_numeric(rows[f"{metric}{s}"], errors="coerce").to_numpy(float) for s in ("", "_sd", "_n")]
    return [(float(m), float(sd), int(n) if math.isfinite(n) else 0) for m, sd, n in zip(*cols)]


def earlier_nights(
    history: pd.DataFrame, plan: str, host: str, setting: str, ksm_off: bool, before_wall: float, exclude: Path
) -> pd.DataFrame:
    """Index rows of the same plan, host and setting, started before `before_wall`, oldest first
    (the study judged, `exclude`, left out)."""
    if history is None or history.empty:
        return history.iloc[0:0] if history is not None else pd.DataFrame()
    rows = history[
        (history["plan"] == plan)
        & (history["host"] == host)
        & (history["setting"] == setting)
        & (history["ksm_off"].astype(bool) == bool(ksm_off))
        & (pd.to_numeric(history["created_wall"], errors="coerce") < before_wall)
    ]
    excluded = str(Path(exclude).resolve())
    rows = rows[[str(Path(p).resolve()) != excluded for p in rows["study_path"]]]
    return rows.sort_values("created_wall", kind="stable")


def band_verdict(j: nights.Judgement, suspect_p: float) -> str:
    """The word for a judgement against the band, before Holm (WORSE: the bad way, outside)."""
    if not math.isfinite(j.p):
        return CANNOT_TELL
    if j.p >= suspect_p:
        return NO_CHANGE
    return {-1: WORSE, 1: IMPROVEMENT, 0: WITHIN_THRESHOLD}[j.beyond]


def _against_history(
    m: MetricChange,
    spec: MetricSpec,
    b_values: Any,
    earlier: pd.DataFrame,
    thresholds: Thresholds,
    rules: nights.NightRules,
) -> bool:
    """Judge B's value against the band of the earlier nights; False when there is no band."""
    _, band = nights.walk(
        _series(earlier, spec.name),
        spec.higher_is_better,
        thresholds.for_metric(spec),
        spec.absolute,
        spec.near_zero,
        spec.resolution,
        rules,
    )
    j = nights.judge(
        _summary(b_values),
        band,
        spec.higher_is_better,
        thresholds.for_metric(spec),
        spec.absolute,
        spec.near_zero,
        rules,
    )
    if j.band is None:
        m.note += f"; history: {j.why_no_band}"
        return False
    m.band_mean, m.band_low, m.band_high = j.band.mean, j.band_low, j.band_high
    m.band_nights, m.band_night_sd = j.band.nights, j.band.night_sd
    m.band_change_pct, m.band_half_pct, m.p = j.change_pct, j.half_pct, j.p
    if j.why_no_band:
        m.verdict, m.note = CANNOT_TELL, j.why_no_band
        return True
    m.verdict = band_verdict(j, rules.suspect_p)
    unit = "points" if spec.absolute else "%"
    m.note = (
        f"against the band of {j.band.nights} earlier nights ({j.band_low:.4g} to {j.band_high:.4g} {spec.unit}): "
        f"{j.change_pct:+.1f} {unit} +- {j.half_pct:.1f}, p = {j.p:.2g}"
    )
    return True


def _with_night_sd(
    m: MetricChange, spec: MetricSpec, a_values: Any, b_values: Any, night_sd: float, thresholds: Thresholds
) -> bool:
    """Judge the change with the given between-night sd in its variance."""
    (mean_a, sd_a, n_a), (mean_b, sd_b, n_b) = _summary(a_values), _summary(b_values)
    if not (n_a and n_b) or not math.isfinite(night_sd) or night_sd < 0:
        return False
    within = sum(sd * sd / n for sd, n in ((sd_a, n_a), (sd_b, n_b)) if math.isfinite(sd))
    se = math.sqrt(max(2 * night_sd**2, within, spec.resolution**2))
    dof = max(1, min(n_a, n_b) - 1) if within > 2 * night_sd**2 else 1_000_000  # a given sd: as good as known
    change = mean_b - mean_a
    scale = 1.0 if spec.absolute else (100.0 / abs(mean_a) if abs(mean_a) >= spec.near_zero else math.nan)
    if not math.isfinite(scale):
        return False
    half = half_width95(se, dof)
    m.p = float(t_two_sided_p(change, se, dof))
    verdict, note = judge(change * scale, half * scale, True, spec.higher_is_better, thresholds.for_metric(spec))
    m.verdict = WORSE if verdict == REGRESSION else verdict
    m.change_ci95, m.change_pct, m.change_ci95_pct = half, change * scale, half * scale
    m.note = f"with night sd {night_sd:g} {spec.unit}: {note}"
    return True


def apply_gate(changes: list["SettingChange"], judged: list[tuple[MetricChange, bool]], alpha: float) -> int:
    """Holm over the judged headline changes: the bad-way ones it rejects are regressions, the
    others suspects. Returns the family size (Holm's m)."""
    family = [m for m, headline in judged if headline]
    if family:
        reject = nights.holm_gate([m.p for m in family], [m.verdict == WORSE for m in family], alpha)
        for m, r in zip(family, reject):
            if m.verdict == WORSE:
                m.verdict = REGRESSION if r else SUSPECT
                m.note += (
                    "; survives Holm across the headline family"
                    if r
                    else "; outside the band, but not after Holm across the headline family: confirm it"
                )
    return len(family)


def compare_studies(
    a: StudyData,
    sa: StudyMetrics,
    b: StudyData,
    sb: StudyMetrics,
    thresholds: Thresholds = Thresholds(),
    context: NightContext | None = None,
) -> Comparison:
    context = context or NightContext()
    headline = check_metric_names(context.headline, "headline")
    check_metric_names(context.night_sd, "--night-sd")
    check_comparable(a, sa, b, sb)
    settings_a, settings_b = _settings_of(sa), _settings_of(sb)
    common = [g for g in settings_a if g in settings_b]
    if not common:
        raise CompareError(
            f"refusing to compare: {a.study_dir} and {b.study_dir} have no setting in common "
            "with a usable trial (same swept values and KSM on/off)"
        )
    mode = HISTORY if context.history is not None else NIGHT_SD if context.night_sd else TWO_STUDIES
    summary_b = study_summary(b)
    b_wall = pd.to_numeric(pd.Series([summary_b["created_wall"]]), errors="coerce").iloc[0]
    b_wall = float(b_wall) if math.isfinite(b_wall) else math.inf
    used_a, used_b = _used(sa), _used(sb)
    changes = []
    judged: list[tuple[MetricChange, bool]] = []
    for group in common:
        label, ksm_off = settings_a[group]
        earlier = (
            earlier_nights(context.history, summary_b["name"], summary_b["host"], label, ksm_off, b_wall, b.study_dir)
            if mode == HISTORY
            else None
        )
        rows = []
        for spec in METRICS:
            if ksm_off and not spec.on_ksm_off:
                continue  # KSM-off trials save nothing and cost no ksmd: only the workload compares
            a_values = used_a.loc[used_a["_group"] == group, spec.name] if spec.name in used_a else []
            b_values = used_b.loc[used_b["_group"] == group, spec.name] if spec.name in used_b else []
            change = compare_values(spec, a_values, b_values, thresholds)
            if change is None:
                continue
            change.headline = not ksm_off and spec.name in headline
            ok = False
            if mode == HISTORY and change.b_n:
                ok = _against_history(change, spec, b_values, earlier, thresholds, context.rules)
            elif mode == NIGHT_SD and spec.name in context.night_sd:
                ok = _with_night_sd(change, spec, a_values, b_values, context.night_sd[spec.name], thresholds)
            if ok:
                judged.append((change, change.headline))
            elif change.verdict == REGRESSION:
                change.verdict = UNCONFIRMED
                change.note += "; no night-level spread known: not an alarm"
            rows.append(change)
        changes.append(SettingChange(label, ksm_off, rows))
    family = apply_gate(changes, judged, context.rules.alpha)
    notes = []
    welch = sum(1 for c in changes for m in c.metrics if m.method == WELCH)
    if mode == TWO_STUDIES and welch >= MANY_COMPARISONS:
        notes.append(
            f"{welch} changes were judged, each with a 95% interval: over that many, one can exceed its "
            "threshold by chance; a real change usually shows on several settings or saving views at once"
        )
    if sa.blocks <= 1 or sb.blocks <= 1:
        notes.append(
            "a study has one repetition: its settings have one trial each, so no change can be told "
            "from noise (run the plan with repetitions >= 2 for intervals)"
        )
    if mode != TWO_STUDIES and not family:
        notes.append(
            "no headline change could be judged against a night-level spread (too few earlier nights?): "
            "the exit status is 0 whatever the changes"
        )
    return Comparison(
        a=study_summary(a),
        b=summary_b,
        thresholds=thresholds,
        settings=changes,
        only_in_a=[settings_a[g][0] for g in settings_a if g not in settings_b],
        only_in_b=[settings_b[g][0] for g in settings_b if g not in settings_a],
        host_diff=host_differences(a.host, b.host),
        plan_diff=plan_difference(a.plan_text, b.plan_text, str(a.study_dir), str(b.study_dir)),
        notes=notes,
        mode=mode,
        mode_rule=RULES[mode],
        headline=headline,
        alpha=context.rules.alpha,
        family_size=family,
    )


def load_pair(study_a: Path, study_b: Path) -> tuple[StudyData, StudyMetrics, StudyData, StudyMetrics]:
    a = studydata.load_study(Path(study_a))
    b = studydata.load_study(Path(study_b))
    return a, studymetrics.compute_study(a), b, studymetrics.compute_study(b)


# ----------------------------------------------------------------------------- hosts and plans

# host.json keys that always differ between runs, and say nothing about the host: the times,
# KSM's counters in the before/after snapshots (state, not settings: the knobs stay compared)
# and the sanity judgement's details (its "ok" stays)
_HOST_NOISE = {"collected_wall", "ended_wall", "ksm_counter_sanity.checked", "ksm_counter_sanity.problems"}
_HOST_NOISE |= {f"{snapshot}.{counter}" for snapshot in ("ksm_before", "ksm_after") for counter in KSM_COUNTERS}
# what a reader looks for first; the rest follows in key order
_HOST_ORDER = (
    "hostname",
    "kernel",
    "kernel_version",
    "arch",
    "cpu_model",
    "cpu_count",
    "numa_nodes",
    "mem_total_kib",
    "page_size_bytes",
    "versions.qemu",
    "versions.libvirtd",
    "kernel_config.",
    "cpu_topology.",
    "cpufreq.",
    "cpu_vulnerabilities.",
    "thp.",
    "thp_settings.",
    "sysctl_vm.",
    "ksm_before.",
    "ksm_after.",
    "ksm_counter_sanity.",
    "versions.",
)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out.update(flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _order(key: str) -> tuple[int, str]:
    for i, head in enumerate(_HOST_ORDER):
        if key == head or (head.endswith(".") and (key.startswith(head) or key == head[:-1])):
            return i, key
    return len(_HOST_ORDER), key


def hosts_differences(hosts: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """[{"key", "values": {name: value}}] for every host.json value (flattened: thp.enabled,
    versions.qemu, ...) that is not the same in all the named host.json records, kernel, CPU,
    memory, QEMU and libvirt first. A key missing from a record is None there."""
    hosts = {name: host or {} for name, host in hosts.items()}
    # A section only some studies recorded (host.json before it had one): one row, not one per value
    every = [set(h) for h in hosts.values()]
    one_sided = (
        {
            k
            for k in set().union(*every) - set.intersection(*every)
            if any(isinstance(h.get(k), dict) for h in hosts.values())
        }
        if every
        else set()
    )
    flat = {}
    for name, host in hosts.items():
        flat[name] = flatten({k: v for k, v in host.items() if k not in one_sided})
        flat[name].update({k: _recorded(host.get(k)) for k in one_sided})
    keys = sorted(set().union(*flat.values()) - _HOST_NOISE, key=_order) if flat else []
    out = []
    for k in keys:
        values = {name: f.get(k) for name, f in flat.items()}
        first = next(iter(values.values()))
        if any(v != first for v in values.values()):
            out.append({"key": k, "values": values})
    return out


def host_differences(host_a: dict[str, Any], host_b: dict[str, Any]) -> list[dict[str, Any]]:
    """[{"key", "a", "b"}] for every host.json value that differs between two hosts or runs
    (hosts_differences of the pair)."""
    return [
        {"key": d["key"], "a": d["values"]["a"], "b": d["values"]["b"]}
        for d in hosts_differences({"a": host_a, "b": host_b})
    ]


def _recorded(section: Any) -> str | None:
    return None if section is None else f"(recorded: {len(flatten(section))} values)"


def plan_difference(plan_a: str, plan_b: str, name_a: str = "A", name_b: str = "B") -> str:
    """Unified diff of the two plan.toml texts ("" when they are identical)."""
    return "".join(
        difflib.unified_diff(
            plan_a.splitlines(keepends=True),
            plan_b.splitlines(keepends=True),
            fromfile=f"{name_a}/plan.toml",
            tofile=f"{name_b}/plan.toml",
        )
    )
