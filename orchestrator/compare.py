"""Compare two studies of one plan (two nights, or two hosts): what changed, and is it a regression.

For every setting both studies ran (matched by the swept settings and KSM off), each metric's
change B - A, in the metric's unit and in percent of A's mean, with a 95% Welch interval across
the two studies' trials of that setting. The unit of replication is the trial (as everywhere in
ksm-lab): a trial's workload value is the mean of its guests, and guests are never replicates.

The rule (RULE below, printed with every comparison): a change is a regression only when it goes
the metric's bad way by more than the user's threshold AND its 95% interval excludes 0; an
improvement likewise the good way. With one trial on a side there is no interval, and the verdict
is "cannot tell" whatever the size of the change.

Pure functions over StudyData / StudyMetrics, plus `load_pair`, which reads the two folders.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from orchestrator import studydata, studymetrics
from orchestrator.catalog import hostname_of
from orchestrator.errors import CompareError
from orchestrator.stats import NO_INTERVAL, WELCH, t_quantile_975, welch_ci95
from orchestrator.studydata import StudyData
from orchestrator.studymetrics import StudyMetrics

REGRESSION = "regression"
IMPROVEMENT = "improvement"
WITHIN_THRESHOLD = "within threshold"
NO_CHANGE = "no detectable change"
CANNOT_TELL = "cannot tell"
VERDICTS = (REGRESSION, IMPROVEMENT, WITHIN_THRESHOLD, NO_CHANGE, CANNOT_TELL)
MANY_COMPARISONS = 20  # from this many judged changes on, say that a few may be flagged by chance

RULE = ("A change counts as a regression only when it goes the metric's bad way by more than its "
        "threshold AND its 95% interval (Welch, across the two studies' trials of that setting) "
        "excludes 0; an improvement likewise the good way. A change whose interval excludes 0 but "
        "that is smaller than the threshold is 'within threshold'. With one trial on a side there is "
        "no interval: 'cannot tell'.")


@dataclass(frozen=True)
class MetricSpec:
    name: str
    unit: str
    higher_is_better: bool
    threshold: str  # field of Thresholds
    near_zero: float  # |mean of A| below this: a percent change is undefined (e.g. no saving at all)
    # (so is one whose own 95% interval includes 0, see percent_defined)
    on_ksm_off: bool  # meaningful for KSM-off settings too (workload), or only with KSM running


METRICS = (
    MetricSpec("saved_mib", "MiB", True, "saving_drop_pct", 1.0, False),
    MetricSpec("general_profit_mib", "MiB", True, "saving_drop_pct", 1.0, False),
    MetricSpec("pss_drop_mib", "MiB", True, "saving_drop_pct", 1.0, False),
    MetricSpec("mem_available_rise_mib", "MiB", True, "saving_drop_pct", 1.0, False),
    MetricSpec("ksmd_cpu_pct", "% of a core", False, "cpu_rise_pct", 0.05, False),
    MetricSpec("time_to_90pct_s", "s", False, "converge_rise_pct", 0.5, False),
    MetricSpec("tps", "tx/s", True, "tps_drop_pct", 1e-9, True),
    MetricSpec("latency_p95_ms", "ms", False, "latency_rise_pct", 1e-9, True),
)
METRIC_NAMES = tuple(m.name for m in METRICS)


@dataclass(frozen=True)
class Thresholds:
    """Percent of study A's mean by which a metric may move the bad way before it is a regression."""

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

    @property
    def regressions(self) -> list[tuple[str, MetricChange]]:
        return [(s.setting, m) for s in self.settings for m in s.metrics if m.verdict == REGRESSION]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["thresholds"] = asdict(self.thresholds)
        out["regressions"] = len(self.regressions)
        return _clean(out)


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


def judge(change_pct: float, half_pct: float, has_interval: bool, higher_is_better: bool,
          threshold_pct: float) -> tuple[str, str]:
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
            return NO_CHANGE, (f"the interval reaches {bad_sign * reach:+.1f}%, beyond the {threshold_pct:g}% "
                               "threshold: too few trials to rule out a regression of that size")
        return NO_CHANGE, "the 95% interval includes 0"
    if abs(change_pct) > threshold_pct:
        return (REGRESSION if worse else IMPROVEMENT), (
            f"beyond the {threshold_pct:g}% threshold and the 95% interval excludes 0")
    return WITHIN_THRESHOLD, f"the 95% interval excludes 0, but the change is under the {threshold_pct:g}% threshold"


def _finite(values: Any) -> np.ndarray:
    arr = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce").to_numpy(dtype=float)
    return arr[np.isfinite(arr)]


def _mean_half(values: np.ndarray) -> tuple[float, float]:
    if values.size == 0:
        return math.nan, math.nan
    if values.size == 1:
        return float(values[0]), math.nan
    return float(values.mean()), float(t_quantile_975(values.size - 1) * values.std(ddof=1) / math.sqrt(values.size))


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
    return CANNOT_TELL, "A's mean cannot be told from 0 (under the floor or within its own interval): no percent, no threshold"


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
    scale = abs(a_mean)
    if a.size and b.size and percent_defined(spec, a_mean, a_half):
        pct, half_pct = 100.0 * change / scale, 100.0 * half / scale
        verdict, note = judge(pct, half_pct, has_interval, spec.higher_is_better, threshold)
    else:
        pct, half_pct = math.nan, math.nan
        if not (a.size and b.size):
            verdict, note = CANNOT_TELL, f"no value in study {'A' if not a.size else 'B'}"
        else:
            verdict, note = _about_zero(has_interval and abs(change) <= half)
    return MetricChange(spec.name, spec.unit, "higher" if spec.higher_is_better else "lower",
                        a_mean, a_half, int(a.size), b_mean, b_half, int(b.size), change,
                        half if has_interval else math.nan, pct, half_pct if has_interval else math.nan,
                        WELCH if has_interval else NO_INTERVAL, threshold, verdict, note)


# ----------------------------------------------------------------------------- the two studies


def study_summary(study: StudyData) -> dict[str, Any]:
    return {"path": str(study.study_dir), "name": str(study.study.get("name") or study.study_dir.name),
            "host": hostname_of(study.host), "created_wall": study.study.get("created_wall"),
            "kernel": study.host.get("kernel")}


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
        raise CompareError(f"refusing to compare studies of different plans: {a.study_dir} is study "
                           f"'{name_a}', {b.study_dir} is study '{name_b}'")
    if set(sa.axes) != set(sb.axes):
        raise CompareError(f"refusing to compare: the plans sweep different axes ({a.study_dir}: "
                           f"{', '.join(sa.axes) or 'none'}; {b.study_dir}: {', '.join(sb.axes) or 'none'})")


def compare_studies(a: StudyData, sa: StudyMetrics, b: StudyData, sb: StudyMetrics,
                    thresholds: Thresholds = Thresholds()) -> Comparison:
    check_comparable(a, sa, b, sb)
    settings_a, settings_b = _settings_of(sa), _settings_of(sb)
    common = [g for g in settings_a if g in settings_b]
    if not common:
        raise CompareError(f"refusing to compare: {a.study_dir} and {b.study_dir} have no setting in common "
                           "with a usable trial (same swept values and KSM on/off)")
    used_a, used_b = _used(sa), _used(sb)
    changes = []
    for group in common:
        label, ksm_off = settings_a[group]
        rows = []
        for spec in METRICS:
            if ksm_off and not spec.on_ksm_off:
                continue  # KSM-off trials save nothing and cost no ksmd: only the workload compares
            change = compare_values(spec, used_a.loc[used_a["_group"] == group, spec.name],
                                    used_b.loc[used_b["_group"] == group, spec.name], thresholds)
            if change is not None:
                rows.append(change)
        changes.append(SettingChange(label, ksm_off, rows))
    notes = []
    judged = sum(1 for c in changes for m in c.metrics if m.method == WELCH)
    if judged >= MANY_COMPARISONS:
        notes.append(f"{judged} changes were judged, each with a 95% interval: over that many, one can exceed its "
                     "threshold by chance; a real change usually shows on several settings or saving views at once")
    if sa.blocks <= 1 or sb.blocks <= 1:
        notes.append("a study has one repetition: its settings have one trial each, so no change can be told "
                     "from noise (run the plan with repetitions >= 2 for intervals)")
    return Comparison(
        a=study_summary(a), b=study_summary(b), thresholds=thresholds, settings=changes,
        only_in_a=[settings_a[g][0] for g in settings_a if g not in settings_b],
        only_in_b=[settings_b[g][0] for g in settings_b if g not in settings_a],
        host_diff=host_differences(a.host, b.host),
        plan_diff=plan_difference(a.plan_text, b.plan_text, str(a.study_dir), str(b.study_dir)),
        notes=notes,
    )


def load_pair(study_a: Path, study_b: Path) -> tuple[StudyData, StudyMetrics, StudyData, StudyMetrics]:
    a = studydata.load_study(Path(study_a))
    b = studydata.load_study(Path(study_b))
    return a, studymetrics.compute_study(a), b, studymetrics.compute_study(b)


# ----------------------------------------------------------------------------- hosts and plans

# host.json keys that always differ between runs, and say nothing about the host
_HOST_NOISE = {"collected_wall"}
# what a reader looks for first; the rest follows in key order
_HOST_ORDER = ("hostname", "kernel", "kernel_version", "arch", "cpu_model", "cpu_count", "numa_nodes",
               "mem_total_kib", "page_size_bytes", "versions.qemu", "versions.libvirtd", "thp.", "ksm_before.",
               "versions.")


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out.update(flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _order(key: str) -> tuple[int, str]:
    for i, head in enumerate(_HOST_ORDER):
        if key == head or (head.endswith(".") and key.startswith(head)):
            return i, key
    return len(_HOST_ORDER), key


def host_differences(host_a: dict[str, Any], host_b: dict[str, Any]) -> list[dict[str, Any]]:
    """[{"key", "a", "b"}] for every host.json value (flattened: thp.enabled, versions.qemu, ...)
    that differs, kernel, CPU, memory, QEMU and libvirt first. A key missing on one side is None."""
    fa, fb = flatten(host_a or {}), flatten(host_b or {})
    keys = sorted((set(fa) | set(fb)) - _HOST_NOISE, key=_order)
    return [{"key": k, "a": fa.get(k), "b": fb.get(k)} for k in keys if fa.get(k) != fb.get(k)]


def plan_difference(plan_a: str, plan_b: str, name_a: str = "A", name_b: str = "B") -> str:
    """Unified diff of the two plan.toml texts ("" when they are identical)."""
    return "".join(difflib.unified_diff(plan_a.splitlines(keepends=True), plan_b.splitlines(keepends=True),
                                        fromfile=f"{name_a}/plan.toml", tofile=f"{name_b}/plan.toml"))


# ----------------------------------------------------------------------------- summary statistics


def welch_from_summary(mean_a: float, sd_a: float, n_a: int, mean_b: float, sd_b: float,
                       n_b: int) -> tuple[float, float]:
    """(mean_b - mean_a, half width of Welch's 95% interval) from each side's mean, sd (ddof=1)
    and trial count: the same numbers stats.welch_ci95 gives on the trial values (history keeps
    only these summaries per study and setting). Half is NaN when a side has fewer than 2 trials."""
    diff = mean_b - mean_a
    if not (n_a >= 2 and n_b >= 2 and math.isfinite(sd_a) and math.isfinite(sd_b)):
        return diff, math.nan
    va, vb = sd_a**2 / n_a, sd_b**2 / n_b
    se2 = va + vb
    if se2 == 0:
        return diff, 0.0
    dof = se2**2 / (va**2 / (n_a - 1) + vb**2 / (n_b - 1))
    return diff, float(t_quantile_975(dof)) * math.sqrt(se2)


def compare_summaries(spec: MetricSpec, a: tuple[float, float, int], b: tuple[float, float, int],
                      thresholds: Thresholds) -> tuple[float, float, str, str]:
    """(change %, interval half %, verdict, note) of B against A from (mean, sd, n) summaries."""
    (mean_a, sd_a, n_a), (mean_b, sd_b, n_b) = a, b
    if not (n_a and n_b and math.isfinite(mean_a) and math.isfinite(mean_b)):
        return math.nan, math.nan, CANNOT_TELL, "a side has no value"
    change, half = welch_from_summary(mean_a, sd_a, n_a, mean_b, sd_b, n_b)
    has_interval = math.isfinite(half)
    half_a = float(t_quantile_975(n_a - 1)) * sd_a / math.sqrt(n_a) if n_a >= 2 else math.nan
    if not percent_defined(spec, mean_a, half_a):
        return (math.nan, math.nan, *_about_zero(has_interval and abs(change) <= half))
    pct, half_pct = 100.0 * change / abs(mean_a), 100.0 * half / abs(mean_a)
    verdict, note = judge(pct, half_pct, has_interval, spec.higher_is_better, thresholds.for_metric(spec))
    return pct, half_pct, verdict, note
