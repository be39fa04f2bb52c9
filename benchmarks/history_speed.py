"""Time `history` over a lab's synthetic studies (default 20 hosts x 365 nights = 7,300): cold (no
index), warm (index up to date) and warm with one new night (what the nightly job does), each
against issue 21's targets: finding + indexing <= 30 s cold and <= 3 s warm, the trend page
<= 15 s. Prints PASS/FAIL per figure and exits 1 on any FAIL.

Each study is what a nightly sweep leaves: study.json, host.json, plan.toml, a trial.json per
trial and a trials.csv as wide as a real one (identity, settings, ~70 metric columns), 16 trials
(3 pages_to_scan x 2 fills x 2 repetitions + 2 KSM-off x 2), spread over the hosts x nights,
with a kernel change half way and a saving drop at 60% of the nights. `history` reads only those
files (never the samples), so the figure is the discovery + index + trend page cost. Each run is a
fresh `python -m orchestrator history` process, interpreter start-up and imports included (the
wall time is printed; the targets apply to the index and page figures the command reports).

    .venv/bin/python benchmarks/history_speed.py [--hosts 20] [--nights 365] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

CHECKOUT = Path(__file__).resolve().parents[1]
TARGETS_S = {"cold index": 30.0, "warm index": 3.0, "page": 15.0}  # issue 21
METRIC_COLUMNS = (
    "saved_mib",
    "general_profit_mib",
    "pss_drop_mib",
    "mem_available_rise_mib",
    "ksmd_cpu_pct",
    "time_to_90pct_s",
    "tps",
    "latency_p95_ms",
)
FILLER_COLUMNS = 62  # the other derived columns a real trials.csv carries (views, shares, deltas)


def _trials(rng: np.random.Generator, night: int, nights: int) -> pd.DataFrame:
    rows = []
    for rep in range(2):
        for fill in ("same", "random"):
            rows.append(
                {
                    "trial_id": f"off-{fill}-r{rep}",
                    "setting": f"KSM off, workload.fill={fill}",
                    "ksm_off": True,
                    "workload.fill": fill,
                    "ksm.pages_to_scan": None,
                    "repetition": rep,
                }
            )
            for pages in (100, 1000, 5000):
                rows.append(
                    {
                        "trial_id": f"p{pages}-{fill}-r{rep}",
                        "ksm_off": False,
                        "repetition": rep,
                        "setting": f"ksm.pages_to_scan={pages}, workload.fill={fill}",
                        "workload.fill": fill,
                        "ksm.pages_to_scan": pages,
                    }
                )
    frame = pd.DataFrame(rows)
    n = len(frame)
    frame.insert(1, "status", "ok")
    frame.insert(2, "reason", None)
    frame["used_in_stats"] = True
    same = (frame["workload.fill"] == "same") & ~frame["ksm_off"]
    frame["saved_mib"] = np.where(same, 190 - (night >= 0.6 * nights) * 40 + rng.normal(0, 2, n), rng.normal(0, 0.1, n))
    frame["general_profit_mib"] = frame["saved_mib"] - 3
    frame["pss_drop_mib"] = frame["saved_mib"] + rng.normal(0, 1, n)
    frame["mem_available_rise_mib"] = frame["saved_mib"] + rng.normal(0, 3, n)
    frame["ksmd_cpu_pct"] = np.where(
        frame["ksm_off"], 0.0, frame["ksm.pages_to_scan"].fillna(0) / 100 + rng.normal(0, 0.2, n)
    )
    frame["time_to_90pct_s"] = np.where(
        same, 500 / frame["ksm.pages_to_scan"].fillna(1) + rng.normal(0, 0.3, n), np.nan
    )
    frame["tps"] = np.nan
    frame["latency_p95_ms"] = np.nan
    for i in range(FILLER_COLUMNS):
        frame[f"derived_{i}"] = rng.normal(0, 1, n)
    return frame


def build(root: Path, hosts: int, nights: int, first: int = 0, last: int | None = None) -> None:
    rng = np.random.default_rng(first)
    plan = '[study]\nname = "nightly"\nrepetitions = 2\n'
    for i in range(first, hosts * nights if last is None else last):
        host, night = f"lab{i % hosts}", i // hosts
        created = 1_735_700_000 + night * 86_400.0
        study = root / host / f"night-{night:04d}" / "nightly"
        trials = _trials(rng, night, nights)
        for trial_id in trials["trial_id"]:
            (study / "trials" / trial_id).mkdir(parents=True)
            (study / "trials" / trial_id / "trial.json").write_text(json.dumps({"trial_id": trial_id, "status": "ok"}))
        (study / "plan.toml").write_text(plan)
        (study / "host.json").write_text(
            json.dumps(
                {
                    "hostname": host,
                    "kernel": "6.1.0" if night < nights // 2 else "6.6.0",
                    "cpu_model": "Bench CPU",
                    "versions": {"qemu": "QEMU 7.2", "libvirtd": "libvirtd 9.0"},
                }
            )
        )
        trials.to_csv(study / "trials.csv", index=False)  # after every trial.json, as sweep writes it
        (study / "study.json").write_text(
            json.dumps(
                {"schema_version": 1, "name": "nightly", "created_wall": created, "trial_ids": list(trials["trial_id"])}
            )
        )


def build_one(root: Path, hosts: int, nights: int) -> None:
    """One more night on lab0, as the nightly job adds it."""
    build(root, hosts, nights, first=hosts * nights, last=hosts * nights + 1)


def run_history(root: Path) -> tuple[float, dict]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator", "history", str(root), "--json"],
        cwd=CHECKOUT,
        capture_output=True,
        text=True,
        check=True,
    )
    return time.monotonic() - started, json.loads(done.stdout)


def verdict(label: str, figure_s: float) -> tuple[str, bool]:
    target = TARGETS_S[label]
    ok = figure_s <= target
    return f"{label} {figure_s:.2f} s (target <= {target:g} s): {'PASS' if ok else 'FAIL'}", ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=20)
    parser.add_argument("--nights", type=int, default=365)
    parser.add_argument("--keep", default=None, help="build here and keep it (default: a temp folder, removed)")
    args = parser.parse_args()
    studies = args.hosts * args.nights
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="ksm-lab-history-"))
    results = []
    try:
        started = time.monotonic()
        build(root, args.hosts, args.nights)
        print(
            f"built {studies} studies ({args.hosts} hosts x {args.nights} nights) in "
            f"{time.monotonic() - started:.1f} s under {root}"
        )
        for label in ("cold", "warm", "warm, one new night"):
            if label == "warm, one new night":
                build_one(root, args.hosts, args.nights)
            wall_s, out = run_history(root)
            print(
                f"history {label}: {wall_s:.2f} s wall = {out['index_s']:.2f} s finding + indexing "
                f"({out['reread']} of {out['studies']} studies read) + {out['page_s']:.2f} s trend page "
                f"({len(out['flags'])} flags) + interpreter start-up"
            )
            results.append(verdict("cold index" if label == "cold" else "warm index", out["index_s"]))
            results.append(verdict("page", out["page_s"]))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    for line, _ in results:
        print(line)
    return 0 if all(ok for _, ok in results) else 1


if __name__ == "__main__":
    sys.exit(main())
