"""Time `write_report` on a synthetic study of 1,000,000 KSM samples and print the figure.

100 trials (pages_to_scan x sleep_millisecs, 2 repetitions) x 10,000 ticks each, with every ksm.csv
column a real study has, and processes.csv for 4 processes per tick (PSS every 5th tick).
Target: under 10 s on the project's 2-core machine.

    .venv/bin/python benchmarks/report_speed.py [--trials 100] [--ticks 10000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not
from orchestrator.report.study import write_report  # noqa: E402

PROCESSES = 4
PSS_EVERY = 5


def _ksm_table(ticks: int, pages_to_scan: int, sleep_ms: int, rng: np.random.Generator) -> pa.Table:
    t_s = np.arange(ticks, dtype=float) * 0.1
    phase = np.where(t_s < 10, "baseline", np.where(t_s < 20, "settle", "measure"))
    t_rel = np.clip(t_s - 10, 0, None)
    rate = pages_to_scan / max(sleep_ms, 1)
    sharing = (200_000 * (1 - np.exp(-t_rel * rate / 500))).astype(np.int64)
    cpu_s = np.cumsum(np.full(ticks, 0.1 * min(0.9, rate / 100)))
    columns = {
        "t_wall": 1_700_000_000 + t_s,
        "t_s": t_s,
        "phase": phase,
        "pages_shared": sharing // 8,
        "pages_sharing": sharing,
        "pages_unshared": 50_000 - sharing // 10,
        "pages_volatile": rng.integers(0, 500, ticks),
        "pages_scanned": np.cumsum(np.full(ticks, pages_to_scan)),
        "pages_skipped": 0,
        "full_scans": (t_rel * rate / 50).astype(np.int64),
        "general_profit": sharing * 4096 - 300_000 * 64,
        "ksm_zero_pages": 0,
        "stable_node_chains": 0,
        "stable_node_dups": 0,
        "run": (t_s >= 10).astype(np.int64),
        "pages_to_scan": pages_to_scan,
        "sleep_millisecs": sleep_ms,
        "max_page_sharing": 256,
        "use_zero_pages": 0,
        "merge_across_nodes": 1,
        "smart_scan": 1,
        "ksmd_cpu_s": cpu_s,
        "ksmd_cpu_pct": np.r_[np.nan, np.diff(cpu_s) / 0.1 * 100],
        "mem_available_kib": 20_000_000 + sharing * 4,
        "mem_free_kib": 19_000_000 + sharing * 4,
        "anon_pages_kib": 3_000_000 - sharing * 4,
        "anon_huge_pages_kib": 1_000_000,
        "vmstat_cow_ksm": np.cumsum(rng.integers(0, 2, ticks)),
        "vmstat_thp_split_page": (t_rel * 3).astype(np.int64),
        "vmstat_thp_split_pmd": (t_rel * 3).astype(np.int64),
        "vmstat_thp_fault_alloc": 5000,
        "tick_ms": rng.uniform(0.5, 3, ticks),
        "pss_tier": np.arange(ticks) % PSS_EVERY == 0,
    }
    return pa.table({k: np.broadcast_to(v, ticks) for k, v in columns.items()})


def _processes_table(ksm: pa.Table) -> pa.Table:
    ticks = ksm.num_rows
    t_s = np.repeat(ksm["t_s"].to_numpy(), PROCESSES)
    phase = np.repeat(ksm["phase"].to_numpy(zero_copy_only=False), PROCESSES)
    sharing = np.repeat(ksm["pages_sharing"].to_numpy(), PROCESSES)
    tier = np.repeat(ksm["pss_tier"].to_numpy(zero_copy_only=False), PROCESSES)
    labels = np.tile([f"proc-{i}" for i in range(PROCESSES)], ticks)
    pss = 1_000_000 - sharing * 4 / PROCESSES
    columns = {
        "t_wall": 1_700_000_000 + t_s,
        "t_s": t_s,
        "phase": phase,
        "label": labels,
        "pid": np.tile(np.arange(1000, 1000 + PROCESSES), ticks),
        "rss_kib": np.full(ticks * PROCESSES, 1_000_000.0),
        "pss_kib": np.where(tier, pss, np.nan),
        "uss_kib": np.where(tier, pss - 1000, np.nan),
        "swap_kib": 0.0,
        "ksm_merging_pages": sharing // PROCESSES,
        "ksm_rmap_items": np.full(ticks * PROCESSES, 75_000),
        "ksm_zero_pages": 0,
        "ksm_process_profit": sharing // PROCESSES * 4096 - 75_000 * 64,
    }
    return pa.table({k: np.broadcast_to(v, ticks * PROCESSES) for k, v in columns.items()})


def build_study(root: Path, trials: int, ticks: int) -> Path:
    study = root / "bench-study"
    (study / "trials").mkdir(parents=True)
    (study / "plan.toml").write_text('[study]\nname = "bench-study"\n[sweep]\npages_to_scan = [...]\n')
    (study / "host.json").write_text(json.dumps({"kernel": "synthetic", "thp": {"enabled": "madvise"}}))
    rng = np.random.default_rng(1)
    scans = [100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000]
    sleeps = [5, 10, 20, 50, 100]
    ids = []
    for i in range(trials):
        pages, sleep_ms, rep = scans[i % 10], sleeps[(i // 10) % 5], i // 50
        trial_id = f"t{i:03d}-p{pages}-s{sleep_ms}-r{rep}"
        trial_dir = study / "trials" / trial_id
        trial_dir.mkdir()
        ksm = _ksm_table(ticks, pages, sleep_ms, rng)
        pacsv.write_csv(ksm, trial_dir / "ksm.csv")
        pacsv.write_csv(_processes_table(ksm), trial_dir / "processes.csv")
        (trial_dir / "trial.json").write_text(
            json.dumps(
                {
                    "trial_id": trial_id,
                    "index": i,
                    "repetition": rep,
                    "status": "ok",
                    "reason": None,
                    "settings": {"pages_to_scan": pages, "sleep_millisecs": sleep_ms},
                    "kind": "processes",
                    "ksm": {"run": 1, "pages_to_scan": pages, "sleep_millisecs": sleep_ms, "use_zero_pages": 0},
                    "workload": {},
                    "ksm_off": False,
                    "timings": {},
                }
            )
        )
        ids.append(trial_id)
    (study / "study.json").write_text(
        json.dumps({"schema_version": 1, "name": "bench-study", "created_wall": 1_700_000_000.0, "trial_ids": ids})
    )
    return study


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--ticks", type=int, default=10_000)
    parser.add_argument("--keep", type=Path, help="build the study here and keep it")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="ksm-report-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        started = time.perf_counter()
        study = build_study(root, args.trials, args.ticks)
        built_s = time.perf_counter() - started
        started, cpu_started = time.perf_counter(), time.process_time()
        report = write_report(study)
        report_s = time.perf_counter() - started
        cpu_s = time.process_time() - cpu_started
        samples = args.trials * args.ticks
        print(
            f"synthetic study: {args.trials} trials x {args.ticks} ticks = {samples:,} ksm samples, "
            f"{samples * PROCESSES:,} process rows (built in {built_s:.1f} s)"
        )
        # CPU time too: on a shared 2-core host the wall clock also measures the neighbours
        print(
            f"write_report: {report_s:.2f} s wall, {cpu_s:.2f} s CPU (target < 10 s wall); "
            f"report.html {report.stat().st_size / 1e6:.1f} MB, load average {os.getloadavg()[0]:.1f}"
        )
    finally:
        if args.keep is None:
            shutil.rmtree(root)


if __name__ == "__main__":
    main()
