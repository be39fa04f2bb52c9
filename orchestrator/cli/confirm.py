"""Confirmation before an alarm: re-measure tonight's suspects, then decide.

When tonight's headline change lies outside the band of the earlier nights (compare with
history: a "regression" or a "suspect"), the nightly job runs a short confirmation study of just
the suspect settings and KSM off, blocked, from the same plan (and so the same saved guest state),
inside tonight's study folder (STUDY/confirm/, so history never takes it for another night). A
suspect is confirmed only when

- the confirmation on its own lies outside the same band the bad way, beyond the threshold, and
  survives Holm across the suspects at alpha (the change is still there), and
- tonight's and the confirmation's trials together (the combined evidence) do the same.

Otherwise it is "not confirmed", recorded in STUDY/report/confirm.json (and compare.json, and so
the history page), and the night ends with exit 0. The plan's `[nightly] confirm_max_s` bounds
the confirmation: the blocks are sized to fit it from tonight's measured trial time, and the sweep
is stopped (SIGTERM, teardown and knob restore as for any interrupted sweep) when it runs over.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import statistics
import threading
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w

from orchestrator.analysis import studymetrics, trialmetrics
from orchestrator.analysis.across import compare, nights
from orchestrator.store import studydata
from orchestrator.analysis.across.compare import NightContext, Thresholds
from orchestrator.errors import OrchestratorError
from orchestrator.plan import Plan, expand, parse_plan
from orchestrator.fsutil import atomic_write_json

log = logging.getLogger(__name__)

CONFIRMED = "confirmed"
NOT_CONFIRMED = "not confirmed"
CONFIRM_DIR = "confirm"
OVERRUN_GRACE_S = 120.0  # beyond confirm_max_s x 1.5: the sweep is stopped (teardown still runs)


class ConfirmError(OrchestratorError):
    """A confirmation that cannot be planned (a search plan, no suspect setting in the plan)."""


@dataclass
class SuspectResult:
    setting: str
    metric: str
    verdict: str  # CONFIRMED | NOT_CONFIRMED
    tonight_pct: float  # change vs the band, percent (points for vs-off metrics)
    confirm_pct: float
    confirm_p: float
    combined_pct: float
    combined_p: float
    confirm_n: int
    note: str


@dataclass
class Confirmation:
    study: str
    suspects: list[dict[str, str]]
    ran: bool  # a confirmation study was run
    confirmed: bool
    blocks: int = 0
    confirm_study: str | None = None
    results: list[SuspectResult] = field(default_factory=list)
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return compare._clean(asdict(self))


def per_trial_s(study: studydata.StudyData) -> float:
    """Median wall time of tonight's finished trials (what one confirmation trial will take)."""
    spans = [s for s in (trialmetrics.trial_wall_s(trial.trial) for trial in study.trials) if math.isfinite(s)]
    return statistics.median(spans) if spans else math.nan


def _key(point: dict[str, Any]) -> str:
    return json.dumps(point, sort_keys=True, default=str)


def suspect_points(sm: studymetrics.StudyMetrics, suspects: list[str]) -> dict[str, dict[str, Any]]:
    """Setting label (as tonight's tables name it) -> the swept values of its trials."""
    out: dict[str, dict[str, Any]] = {}
    trials = sm.trials
    for label in suspects:
        rows = trials[(trials["setting"] == label) & ~trials["ksm_off"]]
        if rows.empty:
            raise ConfirmError(f"suspect setting {label!r} has no trial tonight")
        out[label] = dict(rows["_settings"].iloc[0])
    return out


def confirmation_plan(plan_text: str, keep: list[dict[str, Any]], blocks: int) -> tuple[Plan, str]:
    """The plan of the confirmation: the same plan, only the settings in `keep` (and KSM off),
    `blocks` repetitions in blocked order."""
    plan = parse_plan(plan_text)
    if plan.search is not None or plan.density is not None:
        raise ConfirmError("confirmation re-runs fixed settings: a [search] or [density] plan cannot be confirmed")
    points = {_key(t.settings): t.settings for t in expand(plan) if not t.ksm_off}
    missing = [p for p in keep if _key(p) not in points]
    if missing:
        raise ConfirmError(f"suspect setting(s) {missing} are not in the plan's sweep")
    wanted = {_key(p) for p in keep}
    data = tomllib.loads(plan_text)
    sweep = data.setdefault("sweep", {})

    def nested(point: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in point.items():
            section, _, name = key.partition(".")
            out.setdefault(section, {})[name] = value
        return out

    sweep["exclude"] = list(sweep.get("exclude", [])) + [nested(p) for k, p in points.items() if k not in wanted]
    sweep["include"] = [inc for inc in sweep.get("include", []) if _key(_flat(inc)) in wanted]
    if not sweep["include"]:
        del sweep["include"]
    study = data.setdefault("study", {})
    study.update({"repetitions": blocks, "order": "blocked", "ksm_off_baseline": True})
    study["description"] = f"confirmation of {len(keep)} suspect setting(s) (ksm-lab confirm)"
    text = (
        "# Written by `ksm-lab confirm`: tonight's plan, only the suspect settings and KSM off, blocked.\n"
        + tomli_w.dumps(data)
    )
    return parse_plan(text), text


def _flat(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}.{key}" if prefix else key
        out.update(_flat(value, name) if isinstance(value, dict) else {name: value})
    return out


def decide(
    band: nights.Band | str,
    spec: compare.MetricSpec,
    tonight: Any,
    confirmation: Any,
    thresholds: Thresholds,
    rules: nights.NightRules,
) -> tuple[nights.Judgement, nights.Judgement]:
    """One suspect: the confirmation's trials alone, and tonight's with them, against the band."""
    args = (spec.higher_is_better, thresholds.for_metric(spec), spec.absolute, spec.near_zero, rules)
    alone = nights.judge(compare._summary(confirmation), band, *args)
    both = nights.judge(compare._summary(list(tonight) + list(confirmation)), band, *args)
    return alone, both


def still_there(pairs: list[tuple[nights.Judgement, nights.Judgement]], alpha: float) -> list[bool]:
    """Confirmed: the confirmation alone outside the band the bad way beyond the threshold after
    Holm across the suspects, and the combined evidence the bad way beyond it at p < alpha."""
    alone_ok = nights.holm_gate([a.p for a, _ in pairs], [a.beyond < 0 for a, _ in pairs], alpha)
    return [
        bool(ok and both.beyond < 0 and math.isfinite(both.p) and both.p < alpha)
        for ok, (_, both) in zip(alone_ok, pairs)
    ]


def judge_suspects(
    tonight: compare.Comparison,
    b: studydata.StudyData,
    sb: studymetrics.StudyMetrics,
    conf_sm: studymetrics.StudyMetrics,
    context: NightContext,
    thresholds: Thresholds,
    points: dict[str, dict[str, Any]],
) -> list[SuspectResult]:
    """Each suspect's confirmation, and tonight's with it, against the band tonight was judged on."""
    rows = []
    used_b, used_c = compare._used(sb), compare._used(conf_sm)
    for setting, change in tonight.suspects:
        spec = compare.SPECS[change.metric]
        earlier = compare.earlier_nights(
            context.history,
            tonight.b["name"],
            tonight.b["host"],
            setting,
            False,
            float(tonight.b["created_wall"] or math.inf),
            b.study_dir,
        )
        _, band = nights.walk(
            compare._series(earlier, spec.name),
            spec.higher_is_better,
            thresholds.for_metric(spec),
            spec.absolute,
            spec.near_zero,
            spec.resolution,
            context.rules,
        )
        values_b = (
            used_b.loc[(used_b["setting"] == setting) & ~used_b["ksm_off"], spec.name] if spec.name in used_b else []
        )
        point = _key(points[setting])
        same = [_key(dict(s)) == point for s in used_c["_settings"]] if not used_c.empty else []
        values_c = (
            used_c.loc[np.array(same, dtype=bool) & ~used_c["ksm_off"].to_numpy(bool), spec.name]
            if spec.name in used_c and len(same)
            else []
        )
        rows.append((setting, change, *decide(band, spec, values_b, values_c, thresholds, context.rules)))
    verdicts = still_there([(alone, both) for _, _, alone, both in rows], context.rules.alpha)
    out = []
    for (setting, change, alone, both), ok in zip(rows, verdicts):
        if ok:
            note = "still outside the band the bad way on its own (Holm across the suspects) and combined"
        elif alone.why_no_band or not math.isfinite(alone.p):
            note = f"the confirmation gave no judgement ({alone.why_no_band or 'no value'})"
        elif not (alone.beyond < 0):
            note = "the confirmation on its own is within the threshold or the good way: the change is not there"
        else:
            note = "not outside the band the bad way after Holm across the suspects, alone and combined"
        out.append(
            SuspectResult(
                setting,
                change.metric,
                CONFIRMED if ok else NOT_CONFIRMED,
                change.band_change_pct,
                alone.change_pct,
                alone.p,
                both.change_pct,
                both.p,
                alone.n,
                note,
            )
        )
    return out


def _deadline(seconds: float) -> threading.Timer:
    """SIGTERM to ourselves after `seconds`: the sweep stops after teardown, knobs restored."""
    timer = threading.Timer(seconds, lambda: os.kill(os.getpid(), signal.SIGTERM))
    timer.daemon = True
    timer.start()
    return timer


def run_confirmation(
    study_dir: Path,
    context: NightContext,
    thresholds: Thresholds = Thresholds(),
    max_s: float | None = None,
    blocks: int | None = None,
    enabled: bool = True,
) -> tuple[Confirmation, compare.Comparison]:
    """Judge tonight against the history, confirm its suspects (module docstring)."""
    from orchestrator.sweep import run_sweep  # the runners load only when a confirmation runs

    b = studydata.load_study(Path(study_dir))
    sb = studymetrics.compute_study(b)
    tonight = compare.compare_studies(b, sb, b, sb, thresholds, context)  # the band does not depend on A
    suspects = list(dict.fromkeys(s for s, _ in tonight.suspects))
    result = Confirmation(
        str(b.study_dir),
        [{"setting": s, "metric": m.metric} for s, m in tonight.suspects],
        ran=False,
        confirmed=bool(tonight.regressions),
    )
    if not suspects:
        result.note = "no suspect tonight: nothing to confirm"
        return result, tonight
    if not enabled:
        result.note = "confirmation is off ([nightly] confirm = false): the compare verdict stands"
        return result, tonight
    plan = parse_plan(b.plan_text)
    max_s = plan.nightly.confirm_max_s if max_s is None else max_s
    most = plan.nightly.confirm_blocks if blocks is None else blocks
    trial_s = per_trial_s(b)
    per_block = len(suspects) + 1  # the suspects and their block's KSM-off trial
    fit = int(max_s // (trial_s * per_block)) if math.isfinite(trial_s) and trial_s > 0 else most
    n_blocks = min(most, fit)
    if n_blocks < 2:
        result.note = (
            f"confirm_max_s = {max_s:g} s fits {fit} block(s) of {per_block} trials at {trial_s:.0f} s "
            "each, fewer than 2: not re-measured, the compare verdict stands"
        )
        return result, tonight
    points = suspect_points(sb, suspects)
    conf_plan, conf_text = confirmation_plan(b.plan_text, list(points.values()), n_blocks)
    out_dir = b.study_dir / CONFIRM_DIR
    out_dir.mkdir(exist_ok=True)
    (out_dir / "plan.toml").write_text(conf_text)
    took = f"about {n_blocks * per_block * trial_s:.0f} s" if math.isfinite(trial_s) else "trial time unknown"
    log.info(
        "confirming %s: %d blocks of %d trials (%s, bound %.0f s) in %s",
        ", ".join(suspects),
        n_blocks,
        per_block,
        took,
        max_s,
        out_dir,
    )
    timer = _deadline(max_s * 1.5 + OVERRUN_GRACE_S)
    try:
        # an interrupted confirmation is finished, not restarted, when confirm runs again
        outcome = run_sweep(conf_plan, conf_text, out_dir, resume=(out_dir / conf_plan.study.name).exists())
    finally:
        timer.cancel()
    conf = studydata.load_study(outcome.study.path)
    conf_sm = studymetrics.compute_study(conf)
    result.ran, result.blocks, result.confirm_study = True, n_blocks, str(outcome.study.path)
    result.results = judge_suspects(tonight, b, sb, conf_sm, context, thresholds, points)
    result.confirmed = any(r.verdict == CONFIRMED for r in result.results)
    if outcome.interrupted:
        result.note = "the confirmation was stopped before its end (deadline or signal): judged on what it measured"
    return result, tonight


def record(study_dir: Path, result: Confirmation) -> Path:
    """Write STUDY/report/confirm.json, and add the result to compare.json when there is one."""
    report = Path(study_dir) / "report"
    report.mkdir(exist_ok=True)
    atomic_write_json(report / "confirm.json", result.to_json())
    compare_json = report / "compare.json"
    try:
        data = json.loads(compare_json.read_text())
        data["confirmation"] = result.to_json()
        atomic_write_json(compare_json, data)
    except (OSError, ValueError):
        pass  # compare was not run with --json-file: confirm.json alone carries the result
    return report / "confirm.json"
