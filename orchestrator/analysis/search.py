"""Adaptive search over one KSM knob: the next setting from the trials so far.

`choose(spec, observations)` is a pure function: it replays the search from the observations
(so a resumed study continues where it stopped) and returns the next setting to run with the
reason, or the answer. Two objectives ([search] objective):

knee    Kneedle (Satopaa et al., 2011) on the saving-vs-ksmd-CPU curve: with both ends of the
        range measured, saving and CPU are scaled to [0, 1] between the cheap end and the
        expensive end, and the knee is the setting that maximises scaled saving minus scaled
        CPU: past it, each extra unit of CPU buys less than its share of saving. Golden-section
        search over the knob (in log or linear units) finds it, assuming one peak.
budget  the largest saving whose mean ksmd CPU stays <= max_ksmd_cpu_pct (and mean tps loss vs
        KSM off <= max_tps_loss_pct): bisection for the edge of the feasible range, assuming
        cost and saving both grow from the cheap end of the range to the expensive one.

Each setting is run `repetitions` times and its trial means are used; the search stops when
the bracket is within tolerance_pct (pinned), when (repetitions >= 2) the two golden-section
probes' knee scores differ by less than their noise (flat: a 95% Welch interval of the
difference over the repetitions includes 0, so the knee cannot be placed between them), or
when max_trials trials were run (budget spent: the answer is the best of the objective being
searched among the settings measured, and the result is a bracket, not a pinned point).
Means of trials are compared, never single guests; no other interval is claimed here:
`recommend` and the report give the intervals over the repetitions.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from orchestrator.analysis.stats import welch_ci95

log = logging.getLogger(__name__)

GOLDEN = (math.sqrt(5) - 1) / 2  # 0.618...


@dataclass(frozen=True)
class Observation:
    """One finished trial of the search: the knob's value and the trial's means."""

    value: int
    saved_mib: float
    ksmd_cpu_pct: float
    tps_loss_pct: float = math.nan  # 100 * (off - on) / off; NaN without a KSM-off reference


@dataclass(frozen=True)
class Decision:
    next_value: int | None  # None: the search is over
    reason: str
    answer: int | None = None  # the chosen setting when over (None: nothing meets the budget)

    @property
    def done(self) -> bool:
        return self.next_value is None


@dataclass(frozen=True)
class Spec:
    """What choose() needs of a plan's [search] (plan.SearchSection converts via spec_from)."""

    low: int
    high: int
    scale: str = "log"
    objective: str = "knee"
    max_ksmd_cpu_pct: float | None = None
    max_tps_loss_pct: float | None = None
    max_trials: int = 12
    repetitions: int = 1
    tolerance_pct: float = 10.0
    knob: str = "pages_to_scan"


def spec_from(section: Any) -> Spec:
    fields = {f.name for f in dataclasses.fields(Spec)}
    return Spec(**{k: v for k, v in section.model_dump().items() if k in fields})


class _Need(Exception):
    def __init__(self, value: int, reason: str) -> None:
        self.value, self.reason = value, reason


class _Means:
    """Per-setting means of the observations; asking for an unmeasured one raises _Need."""

    def __init__(self, spec: Spec, observations: Sequence[Observation]) -> None:
        self.spec = spec
        self.bracket: tuple[int, int] | None = None  # the search's current bracket, once it has one
        self.by_value: dict[int, list[Observation]] = {}
        for obs in observations:
            self.by_value.setdefault(int(obs.value), []).append(obs)

    def get(self, value: int, why: str) -> tuple[float, float, float]:
        seen = self.by_value.get(value, [])
        if len(seen) < self.spec.repetitions:
            run = len(seen) + 1
            suffix = f" (repetition {run} of {self.spec.repetitions})" if self.spec.repetitions > 1 else ""
            raise _Need(value, f"{self.spec.knob}={value}: {why}{suffix}")
        return tuple(
            _mean([getattr(o, name) for o in seen])  # type: ignore[return-value]
            for name in ("saved_mib", "ksmd_cpu_pct", "tps_loss_pct")
        )


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def to_unit(spec: Spec, value: float) -> float:
    return math.log(value) if spec.scale == "log" else float(value)


def from_unit(spec: Spec, u: float) -> int:
    value = math.exp(u) if spec.scale == "log" else u
    return int(min(spec.high, max(spec.low, round(value))))


def pinned(spec: Spec, a: int, b: int) -> bool:
    """The bracket [a, b] is narrow enough: its width is within tolerance of its middle."""
    lo, hi = min(a, b), max(a, b)
    if hi - lo <= 1:
        return True
    middle = math.sqrt(lo * hi) if spec.scale == "log" and lo > 0 else (lo + hi) / 2
    return (hi - lo) / middle <= spec.tolerance_pct / 100


def choose(spec: Spec, observations: Sequence[Observation]) -> Decision:
    """The next setting to run, or the answer (see the module docstring)."""
    means = _Means(spec, observations)
    spent = len(observations) >= spec.max_trials
    try:
        if spec.objective == "knee":
            return _knee(spec, means)
        return _budget(spec, means)
    except _Need as need:
        if spent:
            return budget_spent(spec, means, f"trial budget spent ({spec.max_trials} trials)")
        return Decision(need.value, need.reason)


def budget_spent(spec: Spec, means: _Means, why: str) -> Decision:
    """The answer when trials run out before the search pinned it: the best of the objective
    being searched (knee score, or the largest feasible saving) among the settings measured,
    with the bracket the search had reached."""
    best, how = _best_so_far(spec, means)
    bracket = (
        f"the {'knee' if spec.objective == 'knee' else 'edge'} lies in the bracket "
        f"[{means.bracket[0]}, {means.bracket[1]}], not pinned; "
        if means.bracket
        else ""
    )
    return Decision(None, f"{why} before the answer was pinned: {bracket}{how}", best)


def _complete(spec: Spec, means: _Means) -> dict[int, tuple[float, float, float]]:
    return {v: means.get(v, "") for v, obs in means.by_value.items() if len(obs) >= spec.repetitions}


def _best_so_far(spec: Spec, means: _Means) -> tuple[int | None, str]:
    """(setting, what it is) by the search's own objective: a budget search and a knee search
    answer different questions, so one's best is not the other's."""
    complete = _complete(spec, means)
    if not complete:
        return None, "nothing measured yet"
    if spec.objective == "budget":
        ok = [v for v, m in complete.items() if _feasible(spec, m)]
        if not ok:
            return None, f"no setting measured meets {_limits(spec)}"
        best = max(ok, key=lambda v: complete[v][0])
        return best, f"largest saving measured within {_limits(spec)}: {spec.knob}={best} ({complete[best][0]:.1f} MiB)"
    score = _knee_score(spec, means)
    if score is None:
        return None, "both ends of the range are needed for a knee score, and they were not both measured"
    best = max(complete, key=lambda v: score(v, ""))
    return best, f"best knee score measured: {spec.knob}={best} ({score(best, ''):.3f})"


class _KneeScore:
    """Scaled saving minus scaled CPU between the cheap and the expensive end: of a setting's
    mean (call) or of each of its trials (per_trial, for the noise of a score)."""

    def __init__(self, means: _Means, cheap: tuple[float, float, float], dear: tuple[float, float, float]) -> None:
        self.means, self.cheap = means, cheap
        self.saving_span, self.cpu_span = dear[0] - cheap[0], dear[1] - cheap[1]

    def _of(self, saved_mib: float, cpu_pct: float) -> float:
        return (saved_mib - self.cheap[0]) / self.saving_span - (cpu_pct - self.cheap[1]) / self.cpu_span

    def __call__(self, value: int, why: str) -> float:
        saved, cpu, _ = self.means.get(value, why)
        return self._of(saved, cpu)

    def per_trial(self, value: int) -> list[float]:
        return [self._of(o.saved_mib, o.ksmd_cpu_pct) for o in self.means.by_value.get(value, [])]


def _knee_score(spec: Spec, means: _Means) -> _KneeScore | None:
    """The knee score, or None when either end lacks its repetitions or the ends do not span
    both axes (more scanning bought no saving, or cost no CPU)."""
    try:
        (_, c_m), (_, d_m) = _ends(spec, means, "")
    except _Need:
        return None
    score = _KneeScore(means, c_m, d_m)
    return score if score.saving_span > 0 and score.cpu_span > 0 else None


def _ends(
    spec: Spec, means: _Means, why: str
) -> tuple[tuple[int, tuple[float, float, float]], tuple[int, tuple[float, float, float]]]:
    """(cheap end, expensive end) of the range, by measured ksmd CPU."""
    low = means.get(spec.low, f"the low end of the range; {why}")
    high = means.get(spec.high, f"the high end of the range; {why}")
    if high[1] >= low[1]:
        return (spec.low, low), (spec.high, high)
    return (spec.high, high), (spec.low, low)


def _knee(spec: Spec, means: _Means) -> Decision:
    (cheap, c_m), (dear, d_m) = _ends(spec, means, "both ends scale saving and CPU for the knee")
    score = _knee_score(spec, means)
    if score is None:
        return Decision(
            None,
            f"the expensive end ({spec.knob}={dear}) saved {d_m[0]:.1f} MiB at {d_m[1]:.2f}% CPU "
            f"against {c_m[0]:.1f} MiB at {c_m[1]:.2f}% at the cheap end: more scanning bought no "
            f"saving, so the cheap end is the knee",
            cheap,
        )

    a, b = to_unit(spec, spec.low), to_unit(spec, spec.high)
    c, d = b - GOLDEN * (b - a), a + GOLDEN * (b - a)
    while True:
        xa, xb, xc, xd = (from_unit(spec, u) for u in (a, b, c, d))
        means.bracket = (xa, xb)
        if pinned(spec, xa, xb) or xc == xd:
            best = max(
                (v for v in means.by_value if xa <= v <= xb and len(means.by_value[v]) >= spec.repetitions),
                key=lambda v: score(v, ""),
                default=from_unit(spec, (a + b) / 2),
            )
            return Decision(
                None,
                f"knee pinned to {spec.knob} in [{xa}, {xb}] (within {spec.tolerance_pct:g}%): "
                f"{spec.knob}={best} has the largest scaled saving minus scaled CPU "
                f"({score(best, 'the answer'):.3f}) of the settings measured there",
                best,
            )
        bracket = f"the knee lies in [{xa}, {xb}]"
        fc = score(xc, f"golden-section probe: {bracket}")
        fd = score(xd, f"golden-section probe: {bracket}; {spec.knob}={xc} scored {fc:.3f}")
        flat = _flat(spec, score, xc, xd)
        if flat is not None:
            best = xc if fc >= fd else xd
            return Decision(
                None,
                f"flat between {spec.knob}={xc} and {xd}: their knee scores ({fc:.3f}, {fd:.3f}) "
                f"differ by {flat[0]:+.3f} ± {flat[1]:.3f} (95%, over {spec.repetitions} repetitions "
                f"each), less than their noise, so the knee cannot be placed between them; "
                f"{spec.knob}={best} scored higher",
                best,
            )
        if fc >= fd:
            b, d = d, c
            c = b - GOLDEN * (b - a)
        else:
            a, c = c, d
            d = a + GOLDEN * (b - a)


def _flat(spec: Spec, score: _KneeScore, xc: int, xd: int) -> tuple[float, float] | None:
    """(difference, 95% half width) of the two probes' knee scores when their Welch interval
    over the repetitions includes 0; None when it does not, or with one repetition (no noise
    measured: a search of single trials goes on to the tolerance as before)."""
    if spec.repetitions < 2:
        return None
    diff, half = welch_ci95(score.per_trial(xc), score.per_trial(xd))
    if math.isfinite(half) and abs(diff) <= half:
        return diff, half
    return None


def _feasible(spec: Spec, m: tuple[float, float, float]) -> bool:
    _, cpu, loss = m
    if spec.max_ksmd_cpu_pct is not None and not cpu <= spec.max_ksmd_cpu_pct:
        return False
    if spec.max_tps_loss_pct is not None and math.isfinite(loss) and loss > spec.max_tps_loss_pct:
        return False
    return True


def _limits(spec: Spec) -> str:
    parts = []
    if spec.max_ksmd_cpu_pct is not None:
        parts.append(f"ksmd CPU <= {spec.max_ksmd_cpu_pct:g}% of a core")
    if spec.max_tps_loss_pct is not None:
        parts.append(f"tps loss <= {spec.max_tps_loss_pct:g}%")
    return " and ".join(parts)


def _budget(spec: Spec, means: _Means) -> Decision:
    limits = _limits(spec)
    (cheap, c_m), (dear, d_m) = _ends(spec, means, f"the ends bracket the edge of {limits}")
    if not _feasible(spec, c_m):
        return Decision(
            None,
            f"even the cheap end {spec.knob}={cheap} breaks the budget ({c_m[1]:.2f}% CPU, "
            f"{c_m[2]:.1f}% tps loss): no setting in the range meets {limits}",
            None,
        )
    if _feasible(spec, d_m):
        return Decision(
            None,
            f"the expensive end {spec.knob}={dear} meets {limits} ({d_m[1]:.2f}% CPU) and "
            f"saves {d_m[0]:.1f} MiB: the largest saving in the range",
            dear,
        )
    good, bad = to_unit(spec, cheap), to_unit(spec, dear)  # feasible side, infeasible side
    while True:
        xg, xb = from_unit(spec, good), from_unit(spec, bad)
        means.bracket = (min(xg, xb), max(xg, xb))
        if pinned(spec, xg, xb):
            saved = means.get(xg, "")[0]
            return Decision(
                None,
                f"edge of {limits} pinned between {spec.knob}={xg} (meets it, saves "
                f"{saved:.1f} MiB) and {xb} (does not), within {spec.tolerance_pct:g}%",
                xg,
            )
        mid = (good + bad) / 2
        xm = from_unit(spec, mid)
        m = means.get(xm, f"bisection: {xg} meets {limits}, {xb} does not")
        if _feasible(spec, m):
            good = mid
        else:
            bad = mid


# ---------------------------------------------------------------------------------- the sweep


def observations_from(trials: Any, spec: Spec) -> list[Observation]:
    """Observations from a trials table (studymetrics.study_metrics): ok, KSM-on rows of the knob."""
    column = f"ksm.{spec.knob}"
    if trials is None or trials.empty or column not in trials.columns:
        return []
    rows = trials[(trials["status"] == "ok") & ~trials["ksm_off"].astype(bool) & trials[column].notna()]
    out = []
    for row in rows.to_dict("records"):
        tps = row.get("tps_vs_off_pct", math.nan)
        loss = -float(tps) if tps is not None and math.isfinite(float(tps)) else math.nan
        out.append(
            Observation(
                int(row[column]), float(row.get("saved_mib", math.nan)), float(row.get("ksmd_cpu_pct", math.nan)), loss
            )
        )
    return out


def _spent_replay(spec: Spec, observations: Sequence[Observation], why: str) -> Decision:
    """budget_spent after replaying the search, so the answer names the bracket it reached."""
    means = _Means(spec, observations)
    try:
        _knee(spec, means) if spec.objective == "knee" else _budget(spec, means)
    except _Need:
        pass
    return budget_spent(spec, means, why)


def search_trials(plan: Any, study: Any) -> Iterator[Any]:
    """The sweep's trials for a plan with [search]: a KSM-off reference first when the budget
    limits tps loss, then one chosen setting at a time; each decision also goes to search.json."""
    from orchestrator.analysis import studymetrics
    from orchestrator.plan import search_trial

    spec = spec_from(plan.search)
    if spec.max_tps_loss_pct is not None and plan.guests is not None:
        off = search_trial(plan, None, 0, 0, ksm_off=True)
        study.add_trial_ids([off.trial_id])
        yield dataclasses.replace(off, search_reason="KSM-off reference for the tps loss limit")
    decisions: list[dict[str, Any]] = []
    while True:
        table = studymetrics.study_metrics(study.path) if study.meta().get("trial_ids") else None
        observations = observations_from(table, spec)
        attempted = [r for r in study.trial_records() if not r.ksm_off]
        decision = choose(spec, observations)
        if not decision.done and len(attempted) >= spec.max_trials:
            decision = _spent_replay(
                spec, observations, f"trial budget spent ({len(attempted)} trials, failed ones included)"
            )
        decisions.append(
            {
                "next": decision.next_value,
                "reason": decision.reason,
                "answer": decision.answer,
                "observations": len(observations),
            }
        )
        (study.path / "search.json").write_text(
            json.dumps({"spec": dataclasses.asdict(spec), "decisions": decisions}, indent=1)
        )
        if decision.done:
            log.info("search over %s: %s", spec.knob, decision.reason)
            return
        repetition = sum(1 for r in attempted if (r.settings or {}).get(f"ksm.{spec.knob}") == decision.next_value)
        trial = search_trial(plan, decision.next_value, repetition, len(attempted))
        study.add_trial_ids([trial.trial_id])
        log.info("search: %s", decision.reason)
        yield dataclasses.replace(trial, search_reason=decision.reason)
