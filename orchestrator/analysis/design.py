"""`design STUDY --detect 5%`: how many blocks a study needs to detect a change, sized on a pilot.

The study's comparison is paired by block (each KSM-on setting against its block's KSM-off
trial), so what sizes it is the spread of the per-block differences (studymetrics
``paired_differences``, pooled over the pilot's settings). Following Kalibera & Jones
("Rigorous Benchmarking in Reasonable Time", ISMM 2013), where the pilot repeated KSM-off
trials inside a block their spread gives the trial-level variance T1^2 separately, and the
block level is what the paired differences hold beyond it: T2^2 = S_d^2 - T1^2 (1/r_on + 1/r_off)
for r_on / r_off trials averaged per block. A plan runs one trial of each setting per block, so
the design's sd is sqrt(T2^2 + 2 T1^2); without replicated trials the pilot already had that
design and S_d is used as measured.

A pilot of 2 blocks measures its sd with few dof, and a study sized on a low draw misses the
effect: the recommended blocks reach 80% power on average over what the true sd could be
(stats.blocks_needed_expected); the range is the blocks needed at the ends of the sd's 95%
chi-square range. Both use the dof of studymetrics.paired_spread (the settings of a block share
its KSM-off trial); with the trial level split off, the design's sd keeps those dof, a little
optimistic since T1^2 has its own.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from orchestrator.analysis import stats, studymetrics
from orchestrator.store import studydata
from orchestrator.errors import DesignError
from orchestrator.analysis.trialmetrics import WORKLOAD_METRICS
from orchestrator.units import number

DESIGN_METRICS = WORKLOAD_METRICS  # compared with KSM off in percent, as the study does
DEFAULT_METRIC = "tps"
# A new block costs nothing beyond its trials (the sweep runs blocks back to back), so in
# Kalibera & Jones' r = sqrt(c_block / c_trial * T1^2 / T2^2) the optimum is one trial per
# setting per block: replication is cheapest as blocks, which is also all a plan can say.
TRIALS_PER_SETTING_PER_BLOCK = 1


@dataclass(frozen=True)
class Pilot:
    """What the pilot measured (percent of KSM off throughout)."""

    blocks: int
    settings_compared: int
    sd_d_pct: float  # pooled sd of the per-block differences
    sd_dof: float  # see studymetrics.paired_spread
    trial_sd_pct: float  # KSM-off trials repeated in a block: trial-level sd (NaN: none)
    trial_dof: int
    trial_weight: float  # mean of 1/r_on + 1/r_off over the pilot's pairs
    trials_per_block: int
    trial_wall_s: float  # median seconds per trial

    @property
    def block_sd_pct(self) -> float:
        """T2: the block-level sd of a difference, net of the trial-level part (NaN: not separable)."""
        if not math.isfinite(self.trial_sd_pct):
            return math.nan
        return math.sqrt(max(0.0, self.sd_d_pct**2 - self.trial_sd_pct**2 * self.trial_weight))

    @property
    def design_sd_pct(self) -> float:
        """sd of one block's difference with one trial per side (what a plan runs)."""
        if not math.isfinite(self.trial_sd_pct):
            return self.sd_d_pct
        return math.sqrt(self.block_sd_pct**2 + 2 * self.trial_sd_pct**2 / TRIALS_PER_SETTING_PER_BLOCK)


@dataclass(frozen=True)
class Design:
    study: str
    metric: str
    target_pct: float
    pilot: Pilot
    design_sd_pct: float
    design_sd_range_pct: tuple[float, float]
    blocks: float  # recommended (expected power 80%); inf past the cap
    blocks_range: tuple[float, float]
    blocks_if_sd_as_measured: float
    mde_pct: float  # the change the recommended blocks find with 80% expected power
    trials: float
    wall_s: float

    @property
    def plan_toml(self) -> str:
        if not math.isfinite(self.blocks):
            return ""
        return (
            f"# {self.target_pct:g}% {self.metric} change vs KSM off at 80% power (ksm-lab design)\n"
            "[study]\n"
            f"repetitions = {int(self.blocks)}    # blocks: every setting and its KSM-off trial once each\n"
            'order = "blocked"\n'
            "ksm_off_baseline = true\n"
        )

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["pilot"].update(block_sd_pct=self.pilot.block_sd_pct, design_sd_pct=self.pilot.design_sd_pct)
        out["plan_toml"] = self.plan_toml
        return _clean(out)

    def text(self) -> str:
        return "\n".join(_text_lines(self))


def _clean(value: Any) -> Any:
    """JSON has no NaN or inf: null for both (the text says "> 1000")."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ----------------------------------------------------------------------------- input


_TARGET = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*%?\s*$")


def parse_target_pct(text: str) -> float:
    """ "5%" or "5" -> 5.0 (percent of KSM off); anything else, zero or negative: DesignError."""
    match = _TARGET.match(str(text))
    value = float(match.group(1)) if match else math.nan
    if not (math.isfinite(value) and value > 0):
        raise DesignError(f"--detect {text!r}: give the change to detect as a positive percent, e.g. --detect 5%")
    return value


def _trial_level(trials: pd.DataFrame, metric: str) -> tuple[float, int]:
    """(pooled sd, dof) of KSM-off trials repeated inside one block, as percent of that block's
    KSM-off mean: the trial-level variance (NaN, 0 when no block repeats a KSM-off trial)."""
    off = trials[trials["ksm_off"] & trials["used_in_stats"]]
    groups = []
    for _, members in off.groupby(["_offkey", "repetition"], sort=False):
        values = pd.to_numeric(members[metric], errors="coerce").dropna().to_numpy(float)
        if values.size >= 2 and values.mean() != 0:
            groups.append(100.0 * values / values.mean())
    return stats.pooled_sd(groups)


def _trial_weight(trials: pd.DataFrame) -> float:
    """Mean over the pilot's (setting, block) pairs of 1/r_on + 1/r_off: how much trial-level
    variance each paired difference carries."""
    used = trials[trials["used_in_stats"]]
    off_counts = used[used["ksm_off"]].groupby(["_offkey", "repetition"]).size()
    weights = []
    for (offkey, _, block), r_on in used[~used["ksm_off"]].groupby(["_offkey", "_group", "repetition"]).size().items():
        r_off = off_counts.get((offkey, block))
        if r_off:
            weights.append(1.0 / r_on + 1.0 / r_off)
    return float(np.mean(weights)) if weights else 2.0


def _pooled_over_groups(spreads: list[studymetrics.PairedSpread]) -> tuple[float, float]:
    """(sd, dof) over non-KSM setting groups: their squares add (each over its own divisor),
    and so do their dof (the groups share no KSM-off trial)."""
    usable = [s for s in spreads if s.independent_dof >= 1]
    divisor = sum(s.independent_dof for s in usable)
    if not divisor:
        return math.nan, 0.0
    squares = sum(s.sd**2 * s.independent_dof for s in usable)
    return math.sqrt(squares / divisor), float(sum(s.dof for s in usable))


def pilot_from_trials(trials: pd.DataFrame, metric: str = DEFAULT_METRIC) -> Pilot:
    """The pilot's figures from a trials table (studymetrics' columns); DesignError when the
    pilot cannot size a paired design."""
    if metric not in DESIGN_METRICS:
        raise DesignError(f"--metric {metric!r}: one of {', '.join(DESIGN_METRICS)}")
    blocks = studymetrics.study_blocks(trials)
    if blocks < 2:
        raise DesignError(
            f"the pilot has {blocks} block{'s' if blocks != 1 else ''}: a paired design needs a "
            "pilot with 2 or more (run it with repetitions >= 2)"
        )
    if not (trials["ksm_off"] & trials["used_in_stats"]).any():
        raise DesignError("the pilot has no usable KSM-off trials: run it with ksm_off_baseline = true")
    by_group: dict[str, list[pd.Series]] = {}
    for offkey, _, d in studymetrics.paired_differences(trials, metric):
        by_group.setdefault(offkey, []).append(d)
    sd, dof = _pooled_over_groups([studymetrics.paired_spread(group) for group in by_group.values()])
    if dof < 1:
        raise DesignError(
            f"the pilot has no {metric} compared with KSM off in 2 or more blocks "
            "(a guests workload with ksm_off_baseline = true gives it)"
        )
    trial_sd, trial_dof = _trial_level(trials, metric)
    walls = pd.to_numeric(trials.get("trial_wall_s", pd.Series(dtype=float)), errors="coerce").dropna()
    compared = sum(1 for group in by_group.values() for d in group if d.size >= 2)
    return Pilot(
        blocks=blocks,
        settings_compared=compared,
        sd_d_pct=sd,
        sd_dof=dof,
        trial_sd_pct=trial_sd,
        trial_dof=trial_dof,
        trial_weight=_trial_weight(trials),
        trials_per_block=int(trials["_group"].nunique()),  # settings + KSM-off: one block
        trial_wall_s=float(walls.median()) if walls.size else math.nan,
    )


def design_from_pilot(pilot: Pilot, target_pct: float, metric: str = DEFAULT_METRIC, study: str = "") -> Design:
    """Blocks for a target change at 80% power, from the pilot's design sd."""
    sd = pilot.design_sd_pct
    low_sd, high_sd = stats.sd_range95(sd, pilot.sd_dof)
    blocks = stats.blocks_needed_expected(sd, pilot.sd_dof, target_pct)
    mde = stats.paired_expected_mde(sd, pilot.sd_dof, int(blocks)) if math.isfinite(blocks) else math.nan
    trials = blocks * pilot.trials_per_block
    return Design(
        study=study,
        metric=metric,
        target_pct=target_pct,
        pilot=pilot,
        design_sd_pct=sd,
        design_sd_range_pct=(low_sd, high_sd),
        blocks=blocks,
        blocks_range=(stats.blocks_needed(low_sd, target_pct), stats.blocks_needed(high_sd, target_pct)),
        blocks_if_sd_as_measured=stats.blocks_needed(sd, target_pct),
        mde_pct=mde,
        trials=trials,
        wall_s=trials * pilot.trial_wall_s,
    )


def design_study(study_dir: Path, target_pct: float, metric: str = DEFAULT_METRIC) -> Design:
    study_dir = Path(study_dir)
    if not (study_dir / "trials.csv").is_file():
        raise DesignError(f"{study_dir} has no trials.csv: not a finished study folder")
    sm = studymetrics.compute_study(studydata.load_study(study_dir))
    if not sm.paired_by_block:
        raise DesignError(
            f"the pilot ran in {sm.order} order: its trials do not pair by block, and a paired "
            "design cannot be sized on it (run the pilot with the default blocked order)"
        )
    return design_from_pilot(pilot_from_trials(sm.trials, metric), target_pct, metric, study=str(study_dir))


# ----------------------------------------------------------------------------- output


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "sweep time unknown (the pilot's trials have no started_wall / ended_wall)"
    hours, rest = divmod(round(seconds), 3600)
    took = f"{hours} h {rest // 60:02d} min" if hours else f"{rest // 60} min {rest % 60:02d} s"
    return f"about {took} of sweep time at the pilot's time per trial"


def _text_lines(d: Design) -> list[str]:
    p, n = d.pilot, stats.format_repetitions
    lines = [
        f"pilot: {p.blocks} blocks, {p.settings_compared} KSM-on setting(s) against KSM off, "
        f"{p.trials_per_block} trials per block, {number(p.trial_wall_s, integers=False)} s per trial (median)",
        f"per-block {d.metric} difference vs KSM off: sd {number(p.sd_d_pct, integers=False)}% (dof {number(p.sd_dof)})",
    ]
    if math.isfinite(p.trial_sd_pct):
        lines.append(
            f"  trial level (KSM-off trials repeated in a block): sd {number(p.trial_sd_pct, integers=False)}% (dof {p.trial_dof}); "
            f"block level: sd {number(p.block_sd_pct, integers=False)}%; one trial per side per block: sd {number(d.design_sd_pct, integers=False)}%"
        )
        lines.append(
            f"  trials per setting per block: {TRIALS_PER_SETTING_PER_BLOCK} (a block costs nothing beyond its "
            "trials, so more blocks are the cheaper replication)"
        )
    else:
        lines.append(
            "  trial level not separable (one KSM-off trial per block): the block-level sd is used as measured"
        )
    low, high = d.design_sd_range_pct
    lines.append(f"  95% range of that sd: {number(low, integers=False)}-{number(high, integers=False)}%")
    if not math.isfinite(d.blocks):
        lines.append(f"a {d.target_pct:g}% change needs more than {stats.REPETITIONS_SEARCH_CAP} blocks at 80% power")
        return lines
    lines += [
        f"a {d.target_pct:g}% {d.metric} change at 80% power needs {n(d.blocks)} blocks "
        f"({n(d.blocks_range[0])}-{n(d.blocks_range[1])} over the sd's 95% range; {n(d.blocks_if_sd_as_measured)} "
        "if the sd is exactly as measured): the recommended blocks allow for the pilot's uncertainty",
        f"at {n(d.blocks)} blocks the smallest detectable change is {number(d.mde_pct, integers=False)}%",
        f"that design: {n(d.trials)} trials, {_duration(d.wall_s)}",
        "",
        d.plan_toml.rstrip(),
    ]
    return lines


def cmd_design(args: argparse.Namespace) -> int:
    target = parse_target_pct(args.detect)
    result = design_study(Path(args.study_dir), target, args.metric)
    if args.json:
        print(json.dumps(result.as_json(), indent=2))
    else:
        print(result.text())
    return 0


def add_command(sub: Any) -> None:
    """Register `design` on cli/main.py's subparsers (cli/main.py calls this in one line)."""
    p = sub.add_parser("design", help="blocks a study needs to detect a change, sized on a pilot study")
    p.add_argument("study_dir", help="a finished pilot study with 2 or more blocks and KSM-off trials")
    p.add_argument("--detect", required=True, metavar="PCT", help="the change vs KSM off to detect, e.g. 5%%")
    p.add_argument(
        "--metric", default=DEFAULT_METRIC, help=f"one of {', '.join(DESIGN_METRICS)} (default {DEFAULT_METRIC})"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_design)
