"""`recommend STUDY_DIR`: the setting (policy or knob values) that meets the user's limits with
the largest saving, from trial-level replication.

Rules, in order:
1. A candidate is a KSM-on setting of the study (a row of the settings table) with a saving.
2. It qualifies when its MEAN ksmd CPU <= --max-ksmd-cpu, its mean saving >= --min-saved-mib and
   its mean tps change vs KSM off >= -(--max-tps-loss). The paragraph says when a candidate's 95%
   interval reaches past a limit: it meets the limit on average, not surely.
3. The qualifying candidate with the largest mean saving leads. Another qualifying candidate is
   tied with it (the same saving) only when the 95% interval of the difference of savings lies
   inside +-margin (--saving-margin, % of the leader's saving; an equivalence test: "cannot
   tell apart" is not "the same"); of the tied ones the cheapest (lowest mean ksmd CPU) is
   recommended. One whose interval includes 0 but reaches past the margin is named "not shown to
   be worse", never picked: with 2 blocks a saving of 101 MiB was otherwise taken over one of
   300 MiB (difference 199 +- 1893 MiB). The difference is paired by block when the study ran
   blocked and both settings ran in >= 2 blocks, else Welch across trials. With one trial per
   setting no interval exists: the paragraph says the pick rests on single trials, and a limit
   judged on one trial says so (JSON "limit_evidence": "one trial"). Guests inside a trial
   are never treated as replicates (stats.py).
Exit codes: 0 a recommendation; 1 nothing qualifies; 2 bad input (no study, no candidates,
a tps limit on a study without tps vs KSM off).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.units import has_value, plus_minus


@dataclass(frozen=True)
class Limits:
    max_ksmd_cpu_pct: float | None = None
    min_saved_mib: float | None = None
    max_tps_loss_pct: float | None = None

    def text(self) -> str:
        parts = []
        if self.max_ksmd_cpu_pct is not None:
            parts.append(f"ksmd CPU <= {self.max_ksmd_cpu_pct:g}% of a core")
        if self.min_saved_mib is not None:
            parts.append(f"saving >= {self.min_saved_mib:g} MiB")
        if self.max_tps_loss_pct is not None:
            parts.append(f"tps loss vs KSM off <= {self.max_tps_loss_pct:g}%")
        return " and ".join(parts) or "no limits"


@dataclass
class Candidate:
    setting: str
    saved_mib: float
    saved_mib_ci95: float
    ksmd_cpu_pct: float
    ksmd_cpu_pct_ci95: float
    n: int
    tps_vs_off_pct: float = math.nan
    tps_vs_off_ci95_pct: float = math.nan
    policy: str | None = None
    group: str = ""
    fails: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    limit_evidence: str | None = None  # ONE_TRIAL: a limit was judged on a mean without an interval


SAVING_MARGIN_PCT = 2.0  # two savings within 2% of the leader's count as the same (equivalence margin)
ONE_TRIAL = "one trial"


@dataclass
class Recommendation:
    chosen: Candidate | None
    leader: Candidate | None
    tied: list[Candidate]  # shown the same as the leader's saving, within the margin
    candidates: list[Candidate]
    limits: Limits
    reason: str
    not_shown_worse: list[Candidate] = field(default_factory=list)
    saving_margin_pct: float = SAVING_MARGIN_PCT

    def as_json(self) -> dict[str, Any]:
        def clean(c: Candidate | None) -> Any:
            if c is None:
                return None
            return {
                k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in asdict(c).items()
                if k != "group"
            }

        return {
            "recommended": clean(self.chosen),
            "largest_saving": clean(self.leader),
            "tied_with_largest": [clean(c) for c in self.tied],
            "not_shown_worse": [clean(c) for c in self.not_shown_worse],
            "saving_margin_pct": self.saving_margin_pct,
            "limits": asdict(self.limits),
            "limit_evidence": self.chosen.limit_evidence if self.chosen is not None else None,
            "reason": self.reason,
            "candidates": [clean(c) for c in self.candidates],
        }


class BadInput(ValueError):
    """The study cannot answer the question (exit 2)."""


def _f(value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out


def candidates_from(sm: Any) -> list[Candidate]:
    settings = sm.settings
    if settings.empty:
        return []
    out = []
    trials = sm.trials
    for row in settings.to_dict("records"):
        if row.get("ksm_off") or not math.isfinite(_f(row.get("saved_mib"))):
            continue
        members = trials[(trials["_group"] == row["_group"]) & trials["used_in_stats"]]
        policies = sorted({str(p) for p in members.get("policy", []) if isinstance(p, str)})
        out.append(
            Candidate(
                setting=str(row["setting"]),
                saved_mib=_f(row["saved_mib"]),
                saved_mib_ci95=_f(row.get("saved_mib_ci95")),
                ksmd_cpu_pct=_f(row.get("ksmd_cpu_pct")),
                ksmd_cpu_pct_ci95=_f(row.get("ksmd_cpu_pct_ci95")),
                n=int(row.get("n") or 0),
                tps_vs_off_pct=_f(row.get("tps_vs_off_pct")),
                tps_vs_off_ci95_pct=_f(row.get("tps_vs_off_ci95_pct")),
                policy=policies[0] if len(policies) == 1 else None,
                group=str(row["_group"]),
            )
        )
    return out


def _check(c: Candidate, limits: Limits) -> None:
    """Fill c.fails (limits missed on the mean) and c.warnings (met on the mean, but the 95%
    interval reaches past the limit)."""

    def reach(mean: float, half: float, sign: float) -> float:
        return mean + sign * half if math.isfinite(half) else mean

    judged_on = [
        half
        for limit, half in (
            (limits.max_ksmd_cpu_pct, c.ksmd_cpu_pct_ci95),
            (limits.min_saved_mib, c.saved_mib_ci95),
            (limits.max_tps_loss_pct, c.tps_vs_off_ci95_pct),
        )
        if limit is not None
    ]
    if any(not math.isfinite(half) for half in judged_on):
        c.limit_evidence = ONE_TRIAL

    if limits.max_ksmd_cpu_pct is not None:
        if not c.ksmd_cpu_pct <= limits.max_ksmd_cpu_pct:
            c.fails.append(f"ksmd CPU {c.ksmd_cpu_pct:.2f}% > {limits.max_ksmd_cpu_pct:g}%")
        elif reach(c.ksmd_cpu_pct, c.ksmd_cpu_pct_ci95, +1) > limits.max_ksmd_cpu_pct:
            c.warnings.append(f"its ksmd CPU interval reaches {reach(c.ksmd_cpu_pct, c.ksmd_cpu_pct_ci95, 1):.2f}%")
    if limits.min_saved_mib is not None:
        if not c.saved_mib >= limits.min_saved_mib:
            c.fails.append(f"saving {c.saved_mib:.1f} MiB < {limits.min_saved_mib:g} MiB")
        elif reach(c.saved_mib, c.saved_mib_ci95, -1) < limits.min_saved_mib:
            c.warnings.append(f"its saving interval reaches down to {reach(c.saved_mib, c.saved_mib_ci95, -1):.1f} MiB")
    if limits.max_tps_loss_pct is not None:
        loss = -c.tps_vs_off_pct
        if not math.isfinite(loss):
            c.fails.append("no tps comparison with KSM off")
        elif loss > limits.max_tps_loss_pct:
            c.fails.append(f"tps loss {loss:.1f}% > {limits.max_tps_loss_pct:g}%")
        elif reach(loss, c.tps_vs_off_ci95_pct, +1) > limits.max_tps_loss_pct:
            c.warnings.append(f"its tps loss interval reaches {reach(loss, c.tps_vs_off_ci95_pct, 1):.1f}%")


def saving_difference(sm: Any, a: Candidate, b: Candidate) -> tuple[float, float, str]:
    """(mean saving of a - b, 95% half width, method): paired by block when the study ran blocked
    (studymetrics.StudyMetrics.paired_by_block) and both settings ran in >= 2 common blocks, else
    Welch across trials; half is NaN without replication."""
    from orchestrator.analysis import stats

    trials = sm.trials[sm.trials["used_in_stats"]]
    ta, tb = (trials[trials["_group"] == c.group] for c in (a, b))
    by_a = ta.groupby("repetition")["saved_mib"].mean()
    by_b = tb.groupby("repetition")["saved_mib"].mean()
    common = by_a.index.intersection(by_b.index) if getattr(sm, "paired_by_block", True) else by_a.index[:0]
    if len(common) >= 2:
        mean, half, n = stats.mean_ci95((by_a[common] - by_b[common]).to_numpy(float))
        return mean, half, f"paired by block, n={n}"
    diff, half = stats.welch_ci95(ta["saved_mib"], tb["saved_mib"])
    return diff, half, f"Welch, {len(ta)} vs {len(tb)} trials"


def recommend(sm: Any, limits: Limits, saving_margin_pct: float = SAVING_MARGIN_PCT) -> Recommendation:
    candidates = candidates_from(sm)
    if not candidates:
        raise BadInput("the study has no KSM-on setting with a measured saving")
    if limits.max_tps_loss_pct is not None and not any(math.isfinite(c.tps_vs_off_pct) for c in candidates):
        raise BadInput("--max-tps-loss needs tps compared with KSM off (a guests study with ksm_off_baseline)")
    for c in candidates:
        _check(c, limits)
    ok = [c for c in candidates if not c.fails]
    if not ok:
        closest = min(candidates, key=lambda c: len(c.fails))
        reason = (
            f"No setting of {len(candidates)} meets {limits.text()}. Closest: {closest.setting} "
            f"({'; '.join(closest.fails)})."
        )
        return Recommendation(None, None, [], candidates, limits, reason, saving_margin_pct=saving_margin_pct)
    leader = max(ok, key=lambda c: c.saved_mib)
    margin_mib = saving_margin_pct / 100 * abs(leader.saved_mib)
    tied, not_worse, unreplicated = [], [], []
    for c in ok:
        if c is leader:
            continue
        diff, half, how = saving_difference(sm, leader, c)
        verdict = saving_verdict(diff, half, margin_mib)
        if verdict == NO_INTERVAL:
            unreplicated.append(c)
        elif verdict == SAME:
            tied.append((c, diff, half, how))
        elif verdict == NOT_SHOWN_WORSE:
            not_worse.append((c, diff, half, how))
    group = [leader] + [t[0] for t in tied]
    chosen = min(group, key=lambda c: (c.ksmd_cpu_pct, -c.saved_mib))
    cheaper_not_worse = [t for t in not_worse if t[0].ksmd_cpu_pct < chosen.ksmd_cpu_pct]
    reason = _paragraph(
        chosen, leader, tied, cheaper_not_worse, unreplicated, ok, candidates, limits, margin_mib, saving_margin_pct
    )
    return Recommendation(
        chosen, leader, [t[0] for t in tied], candidates, limits, reason, [t[0] for t in not_worse], saving_margin_pct
    )


SAME = "same"  # the interval of the difference lies inside +-margin
SMALLER = "smaller"  # the interval excludes 0: the leader saves more
NOT_SHOWN_WORSE = "not shown worse"  # the interval includes 0 and reaches past the margin
NO_INTERVAL = "no interval"


def saving_verdict(diff_mib: float, half_mib: float, margin_mib: float) -> str:
    """How a candidate's saving stands against the leader's, from the 95% interval of
    leader - candidate: the same only when the whole interval is inside +-margin (two one-sided
    tests), smaller when it excludes 0, else not shown worse (nor shown the same)."""
    if not math.isfinite(half_mib):
        return NO_INTERVAL
    if -margin_mib <= diff_mib - half_mib and diff_mib + half_mib <= margin_mib:
        return SAME
    if diff_mib - half_mib > 0:
        return SMALLER
    return NOT_SHOWN_WORSE


def _pm(mean: float, half: float, unit: str) -> str:
    return plus_minus(mean, half, unit, integers=False) + ("" if has_value(half) else " (no interval)")


def _paragraph(
    chosen: Candidate,
    leader: Candidate,
    tied: list[Any],
    not_worse: list[Any],
    unreplicated: list[Candidate],
    ok: list[Candidate],
    candidates: list[Candidate],
    limits: Limits,
    margin_mib: float,
    margin_pct: float,
) -> str:
    if limits.text() == "no limits":
        plural = "s" if len(ok) != 1 else ""
        parts = [f"{len(ok)} KSM-on setting{plural} measured a saving; with no limits given, each is a candidate."]
    else:
        parts = [f"{len(ok)} of {len(candidates)} settings meet {limits.text()}."]
    describe = (
        f"saves {_pm(chosen.saved_mib, chosen.saved_mib_ci95, ' MiB')} for "
        f"{_pm(chosen.ksmd_cpu_pct, chosen.ksmd_cpu_pct_ci95, '% of a core')} of ksmd CPU "
        f"(means over n={chosen.n} trials, 95% intervals across trials)"
    )
    margin = f"±{margin_mib:.1f} MiB, {margin_pct:g}% of the largest saving"
    if chosen is leader and not tied:
        parts.append(f"Recommended: {chosen.setting}, the largest saving among them; it {describe}.")
    elif chosen is leader:
        parts.append(
            f"Recommended: {chosen.setting}; it {describe}. It has the largest mean saving, and "
            f"{', '.join(t[0].setting for t in tied)} save the same within {margin}, none of them cheaper."
        )
    else:
        detail = next(t for t in tied if t[0] is chosen)
        parts.append(
            f"Recommended: {chosen.setting}; it {describe}. {leader.setting} has the largest mean "
            f"saving ({leader.saved_mib:.1f} MiB), but the two save the same: the difference, "
            f"{detail[1]:.1f} ± {detail[2]:.1f} MiB ({detail[3]}), lies inside {margin}, "
            f"so the cheaper one is preferred."
        )
    for c, diff, half, how in not_worse:
        parts.append(
            f"{c.setting} is cheaper ({c.ksmd_cpu_pct:.2f}% of a core) and not shown to be worse, but not "
            f"shown to save as much either: the difference, {diff:.1f} ± {half:.1f} MiB ({how}), "
            f"reaches past {margin}; more repetitions would tell."
        )
    if unreplicated:
        parts.append(
            f"Against {', '.join(c.setting for c in unreplicated)} there is no interval (one trial "
            "per setting): that part of the choice rests on single trials, which this study cannot "
            "tell from noise."
        )
    if chosen.limit_evidence == ONE_TRIAL:
        parts.append(
            f"It meets {limits.text()} on one trial's value (no interval): whether repeated runs "
            "would stay within the limits is not known."
        )
    if chosen.warnings:
        parts.append(f"It meets the limits on its mean, not surely: {'; '.join(chosen.warnings)}.")
    if math.isfinite(chosen.tps_vs_off_pct):
        parts.append(f"Its tps change vs KSM off: {_pm(chosen.tps_vs_off_pct, chosen.tps_vs_off_ci95_pct, '%')}.")
    return " ".join(parts)


def recommend_study(study_dir: Path, limits: Limits, saving_margin_pct: float = SAVING_MARGIN_PCT) -> Recommendation:
    from orchestrator.analysis import studymetrics
    from orchestrator.store import studydata

    return recommend(studymetrics.compute_study(studydata.load_study(Path(study_dir))), limits, saving_margin_pct)


def cmd_recommend(args: argparse.Namespace) -> int:
    from orchestrator.errors import OrchestratorError

    limits = Limits(args.max_ksmd_cpu, args.min_saved_mib, args.max_tps_loss)
    study_dir = Path(args.study_dir)
    try:
        if not (study_dir / "study.json").exists():
            raise BadInput(f"{study_dir} is not a study folder (no study.json)")
        if not args.saving_margin >= 0:
            raise BadInput(f"--saving-margin must be >= 0 (% of the largest saving), not {args.saving_margin:g}")
        result = recommend_study(study_dir, limits, args.saving_margin)
    except (BadInput, OrchestratorError) as exc:
        if args.json:
            print(json.dumps({"error": str(exc)}))
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.as_json(), indent=1))
    else:
        print(result.reason)
    return 0 if result.chosen is not None else 1


def add_command(sub: Any) -> None:
    """Register `recommend` on cli/main.py's subparsers (cli/main.py calls this in one line)."""
    p = sub.add_parser("recommend", help="the setting that meets CPU/saving/tps limits with the largest saving")
    p.add_argument("study_dir")
    p.add_argument("--max-ksmd-cpu", type=float, default=None, metavar="PCT", help="mean ksmd CPU, %% of a core")
    p.add_argument("--min-saved-mib", type=float, default=None, metavar="N")
    p.add_argument("--max-tps-loss", type=float, default=None, metavar="PCT", help="mean tps loss vs KSM off, %%")
    p.add_argument(
        "--saving-margin",
        type=float,
        default=SAVING_MARGIN_PCT,
        metavar="PCT",
        help="two savings are the same only when the 95%% interval of their difference lies within "
        "+-PCT %% of the largest saving (default %(default)g)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_recommend)


# ----------------------------------------------------------------- for report/study.py and report/plots.py


def report_recommendation(sm: Any, limits: Limits = Limits()) -> Recommendation | None:
    """The report's recommendation: without limits, the largest saving (ties -> the cheaper)."""
    try:
        return recommend(sm, limits)
    except BadInput:
        return None


def mark_on_frontier(ax: Any, rec: Recommendation | None) -> None:
    """A star on the frontier plot at the recommended setting."""
    if rec is None or rec.chosen is None:
        return
    c = rec.chosen
    ax.plot(
        [c.ksmd_cpu_pct],
        [c.saved_mib],
        marker="*",
        ms=18,
        mfc="none",
        mec="black",
        mew=1.5,
        ls="none",
        label=f"recommended: {c.setting}",
    )
