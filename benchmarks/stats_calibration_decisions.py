"""Known-answer simulations of the study's decisions, through the project's own functions.

Each check builds many seeded synthetic studies whose truth is known, runs them through the
functions the report and `recommend` use (studymetrics' settings table with its comparisons
and Holm column, report.worst_verdict, recommend.recommend), and prints how often the decision
was wrong against its target, with PASS or FAIL:

- worst-of-k headline, no effect anywhere: "differs from KSM off" in <= 5% of studies, k = 3, 5, 8
- recommend, a true 3x larger saving (100 vs 300 MiB, 2 blocks, CV 10%): given up in <= 5%
- a sequential-order study with drift and no effect: "differs" in <= 5%

usage: python benchmarks/stats_calibration_decisions.py [--studies N]   (exit 1 on any FAIL)
Another script can import it and call the check_* functions (each returns a Check).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd

from orchestrator.analysis import recommend, studymetrics
from orchestrator.report import study as report
from orchestrator.analysis.trialmetrics import WORKLOAD_METRICS

TARGET_PCT = 5.0
STUDIES = 400  # per check: a 5% rate to about +-1 point, the whole run under 2 minutes


@dataclass(frozen=True)
class Check:
    name: str
    rate_pct: float
    target_pct: float
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.rate_pct <= self.target_pct

    def line(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return f"{verdict}  {self.name}: {self.rate_pct:.1f}% (target <= {self.target_pct:g}%){self.detail}"


# ----------------------------------------------------------------------------- synthetic trials


def _trials(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """A trials table as compute_study leaves it, for the columns the settings table reads;
    metrics a row does not set are NaN (as in a study that did not measure them)."""
    frame = pd.DataFrame(rows)
    for name in (*studymetrics.SUMMARY_METRICS, *studymetrics.NET_METRICS, *WORKLOAD_METRICS):
        if name not in frame.columns:
            frame[name] = np.nan
    for name in WORKLOAD_METRICS:
        frame[f"{name}_guest_sd"] = np.nan
    frame["used_in_stats"] = True
    frame["status"] = "ok"
    frame["rerun_of"] = None
    frame["_offkey"] = "{}"
    return frame


def _trial(setting: str, block: int, ksm_off: bool, **metrics: float) -> dict[str, Any]:
    return {"setting": setting, "_group": setting, "repetition": block, "ksm_off": ksm_off, **metrics}


def _settings(trials: pd.DataFrame, order: str) -> pd.DataFrame:
    paired = studymetrics.study_order({"order": order}) == studymetrics.BLOCKED
    return studymetrics._settings_table(trials, [], paired_by_block=paired)  # the report's own table


def _says_differs(settings: pd.DataFrame) -> tuple[bool, bool]:
    """(the worst-of-k tps headline says "differs", its own unadjusted interval excludes 0)."""
    worst = studymetrics.worst_change(settings, "tps", "min")
    assert worst is not None
    return report.worst_verdict(worst).startswith("differs"), bool(worst.comparison.differs)


# ----------------------------------------------------------------------------- the checks


def check_worst_of_k(k: int, studies: int = STUDIES, blocks: int = 4, cv: float = 0.05, seed: int = 18) -> Check:
    """k KSM-on settings and KSM off, blocked, no effect: tps = 100 x block level x noise."""
    rng = np.random.default_rng([seed, k])
    claimed = unadjusted = 0
    for _ in range(studies):
        rows = []
        for block in range(blocks):
            level = 1 + 0.05 * rng.standard_normal()  # blocks differ; pairing removes it
            rows.append(_trial("off", block, True, tps=100 * level * (1 + cv * rng.standard_normal())))
            rows += [
                _trial(f"s{j}", block, False, tps=100 * level * (1 + cv * rng.standard_normal())) for j in range(k)
            ]
        says, raw = _says_differs(_settings(_trials(rows), "blocked"))
        claimed += says
        unadjusted += raw
    return Check(
        f"worst of k={k} says 'differs' with no effect ({studies} studies, {blocks} blocks)",
        100 * claimed / studies,
        TARGET_PCT,
        f"; one-comparison interval: {100 * unadjusted / studies:.1f}%",
    )


def check_recommend_keeps_3x_saving(studies: int = STUDIES, cv: float = 0.10, seed: int = 18) -> Check:
    """A saves 100 MiB for 2% CPU, B 300 MiB for 10%; 2 blocks, CV 10%: B must be recommended."""
    rng = np.random.default_rng(seed)
    lost = untold = 0
    for _ in range(studies):
        rows = []
        for block in range(2):
            for setting, saved, cpu in (("A", 100.0, 2.0), ("B", 300.0, 10.0)):
                rows.append(
                    _trial(
                        setting,
                        block,
                        False,
                        saved_mib=saved * (1 + cv * rng.standard_normal()),
                        ksmd_cpu_pct=cpu * (1 + cv * rng.standard_normal()),
                    )
                )
        trials = _trials(rows)
        sm = SimpleNamespace(settings=_settings(trials, "blocked"), trials=trials, paired_by_block=True)
        rec = recommend.recommend(sm, recommend.Limits())
        lost += rec.chosen is None or rec.chosen.setting != "B"
        untold += any(c.setting == "A" for c in rec.not_shown_worse)  # the old rule took A here
    return Check(
        f"recommend gives up a true 3x larger saving ({studies} studies, 2 blocks, CV 10%)",
        100 * lost / studies,
        TARGET_PCT,
        f"; 'cannot tell apart' read as 'the same' would have: {100 * untold / studies:.1f}%",
    )


def check_sequential_drift(
    studies: int = STUDIES,
    k: int = 3,
    blocks: int = 5,
    drift_pct_per_trial: float = 0.5,
    cv: float = 0.01,
    seed: int = 18,
) -> Check:
    """Sequential order (KSM off, then the k settings, block after block) with tps drifting
    down 0.5% per trial and no KSM effect: a setting always runs j trials after its KSM-off
    trial, so pairing by block would read j x 0.5% of drift as an effect."""
    rng = np.random.default_rng(seed)
    claimed = paired_claimed = 0
    for _ in range(studies):
        rows = []
        for block in range(blocks):
            for j, setting in enumerate(["off", *(f"s{i}" for i in range(k))]):
                position = block * (k + 1) + j
                tps = 100 * (1 - drift_pct_per_trial / 100 * position) * (1 + cv * rng.standard_normal())
                rows.append(_trial(setting, block, setting == "off", tps=tps))
        trials = _trials(rows)
        claimed += _says_differs(_settings(trials, "sequential"))[0]
        paired_claimed += _says_differs(_settings(trials, "blocked"))[0]
    return Check(
        f"sequential order with drift says 'differs' with no effect ({studies} studies)",
        100 * claimed / studies,
        TARGET_PCT,
        f"; analysed as paired by block: {100 * paired_claimed / studies:.1f}%",
    )


def run_checks(studies: int = STUDIES) -> list[Check]:
    return [
        *(check_worst_of_k(k, studies) for k in (3, 5, 8)),
        check_recommend_keeps_3x_saving(studies),
        check_sequential_drift(studies),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=STUDIES, help="simulated studies per check")
    args = parser.parse_args(argv)
    started = time.monotonic()
    checks = run_checks(args.studies)
    for check in checks:
        print(check.line())
    print(f"run time {time.monotonic() - started:.1f} s")
    return 0 if all(c.passed for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
