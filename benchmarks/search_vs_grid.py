"""Adaptive search vs a dense grid for the same question, on the processes workload (REAL KSM).

The question: the knee of pages_to_scan in [50, 20000] (log): the setting maximising scaled
saving minus scaled ksmd CPU (search.py's Kneedle definition, scaled between the range's ends).
The grid runs --grid-points log-spaced settings once each and takes the best measured point;
the search runs a [search] plan with max_trials = grid points / 2. Target: the search's answer
within 10% of the grid's, with at most half its trials. Prints both answers and trial counts.

    sudo .venv/bin/python benchmarks/search_vs_grid.py [--grid-points 32] [--pages-per-process 100000]

Changes the host's KSM (restored at the end of each sweep); refuses while ksmtuned or another
sweep runs. Takes about 15 s per trial (fill, 1 s baseline, --measure-s, reset).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.plan import parse_plan  # noqa: E402
from orchestrator.sweep import run_sweep  # noqa: E402

LOW, HIGH = 50, 20000
TARGET_DISTANCE = 0.10


def plan_text(name: str, pages_per_process: int, measure_s: float, body: str) -> str:
    return f"""
[study]
name = "{name}"
order = "shuffled"
[ksm]
sleep_millisecs = 20
[workload]
type = "processes"
processes = 2
pages_per_process = {pages_per_process}
fill = "same"
[phases]
baseline_s = 1
measure_s = {measure_s}
[sampling]
interval_s = 0.5
pss_interval_s = 30
{body}
"""


def knee_of(values: np.ndarray, saved: np.ndarray, cpu: np.ndarray) -> int:
    """search.py's knee on measured points: scaled between the cheap and the expensive end."""
    order = np.argsort(values)
    v, s, c = values[order], saved[order], cpu[order]
    cheap, dear = (0, -1) if c[-1] >= c[0] else (-1, 0)
    score = (s - s[cheap]) / (s[dear] - s[cheap]) - (c - c[cheap]) / (c[dear] - c[cheap])
    return int(v[int(np.nanargmax(score))])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid-points", type=int, default=32)
    parser.add_argument("--pages-per-process", type=int, default=100_000)
    parser.add_argument("--measure-s", type=float, default=10.0)
    parser.add_argument("--results", type=Path, default=None)
    args = parser.parse_args()
    results = args.results or Path(tempfile.mkdtemp(prefix="search-vs-grid-"))

    grid = sorted({int(round(x)) for x in np.geomspace(LOW, HIGH, args.grid_points)})
    text = plan_text("grid", args.pages_per_process, args.measure_s, f"[sweep.ksm]\npages_to_scan = {json.dumps(grid)}")
    grid_study = run_sweep(parse_plan(text), text, results).study.path
    table = pd.read_csv(grid_study / "trials.csv")
    table = table[table["status"] == "ok"]
    grid_answer = knee_of(
        table["ksm.pages_to_scan"].to_numpy(float),
        table["saved_mib"].to_numpy(float),
        table["ksmd_cpu_pct"].to_numpy(float),
    )
    grid_trials = len(table)

    budget = len(grid) // 2
    text = plan_text(
        "search",
        args.pages_per_process,
        args.measure_s,
        f'[search]\nknob = "pages_to_scan"\nlow = {LOW}\nhigh = {HIGH}\nscale = "log"\n'
        f'objective = "knee"\nmax_trials = {budget}\ntolerance_pct = 10',
    )
    search_study = run_sweep(parse_plan(text), text, results).study.path
    decisions = json.loads((search_study / "search.json").read_text())["decisions"]
    search_answer = decisions[-1]["answer"]
    search_trials = len(json.loads((search_study / "study.json").read_text())["trial_ids"])

    print(f"grid:   knee at pages_to_scan={grid_answer} from {grid_trials} trials ({len(grid)} settings)")
    print(
        f"search: knee at pages_to_scan={search_answer} from {search_trials} trials "
        f"(budget {budget}); {decisions[-1]['reason']}"
    )
    if search_answer is None:
        print("FAIL: the search gave no answer")
        return 1
    distance = abs(search_answer - grid_answer) / grid_answer
    ok = distance <= TARGET_DISTANCE and search_trials * 2 <= grid_trials
    print(
        f"distance {distance:.1%} (target <= {TARGET_DISTANCE:.0%}), trials {search_trials}/{grid_trials} "
        f"(target <= 1/2): {'PASS' if ok else 'FAIL'}"
    )
    print(f"studies: {grid_study} {search_study}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
