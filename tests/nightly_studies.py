"""Hand-made nights: study folders as sweep leaves them (trials.csv included), for compare,
history, prune, collect and the nightly job's tests. Built on tests/builders.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from orchestrator.store.study import Study
from orchestrator.sweep import write_trials_table
from tests.builders import PAGE, guests_summary, processes_frame, ramp_ksm_frame, start_study, write_trial

MIB = 1024 * 1024
PLAN = '[study]\nname = "nightly"\nrepetitions = 2\n\n[sweep.ksm]\npages_to_scan = [100, 1000]\n'


def pages_for_mib(mib: float) -> int:
    return int(round(mib * MIB / PAGE))


def write_night(
    root: Path,
    *,
    name: str = "nightly",
    saved_mib: dict[int, list[float]] | None = None,
    cpu_pct: dict[int, list[float]] | None = None,
    tps: dict[Any, list[float]] | None = None,
    hostname: str = "lab1",
    kernel: str = "6.1.0-test",
    qemu: str | None = None,
    machine_id: str | None = None,
    created_wall: float = 1_700_000_000.0,
    plan: str | None = None,
    axis: str = "ksm.pages_to_scan",
    failed: tuple[str, ...] = (),
    ksm_off: bool = True,
    trials_csv: bool = True,
    missing: tuple[str, ...] = (),
) -> Path:
    """A study under root/<name>: for each pages_to_scan value, one trial per listed saving (the
    repetitions), ksmd burning cpu_pct; with tps, sysbench trials whose guests ran that tps (KSM-off
    trials under key "off"). failed: trial ids stored as failed; missing: ids listed in study.json
    but never run (an interrupted night)."""
    saved_mib = saved_mib if saved_mib is not None else {100: [3.0, 3.1], 1000: [4.0, 4.1]}
    study_dir = start_study(root, name, plan if plan is not None else PLAN.replace('"nightly"', f'"{name}"'))
    reps = max(len(v) for v in saved_mib.values())
    ids = []
    for rep in range(reps):
        if ksm_off:
            trial_id = f"off-r{rep}"
            ids.append(trial_id)
            if trial_id not in missing:
                ksm = ramp_ksm_frame(final_sharing=0, cpu_core_fraction=0.0)
                summary = guests_summary(tps["off"][rep], tps["off"][rep]) if tps else None
                write_trial(
                    study_dir,
                    trial_id,
                    {},
                    repetition=rep,
                    ksm_off=True,
                    ksm=ksm,
                    processes=processes_frame(ksm),
                    workload_summary=summary,
                    kind="sysbench" if tps else "processes",
                    status="failed" if trial_id in failed else "ok",
                )
        for pages, savings in saved_mib.items():
            if rep >= len(savings):
                continue
            trial_id = f"p{pages}-r{rep}"
            ids.append(trial_id)
            if trial_id in missing:
                continue
            cpu = (cpu_pct or {}).get(pages, [5.0] * reps)[rep]
            ksm = ramp_ksm_frame(final_sharing=pages_for_mib(savings[rep]), cpu_core_fraction=cpu / 100)
            summary = guests_summary(tps[pages][rep], tps[pages][rep]) if tps else None
            write_trial(
                study_dir,
                trial_id,
                {axis: pages},
                repetition=rep,
                ksm=ksm,
                processes=processes_frame(ksm),
                workload_summary=summary,
                kind="sysbench" if tps else "processes",
                status="failed" if trial_id in failed else "ok",
                reason="guest vm0 never answered SSH" if trial_id in failed else None,
            )
    host = {
        "hostname": hostname,
        "machine_id": machine_id,
        "kernel": kernel,
        "cpu_model": "Test CPU",
        "cpu_count": 2,
        "mem_total_kib": 24_000_000,
        "thp": {"enabled": "madvise"},
        "collected_wall": created_wall,
        "versions": {"python": "3.11", "ksm-lab": "0.1.0", **({"qemu": qemu} if qemu else {})},
    }
    (study_dir / "host.json").write_text(json.dumps(host))
    (study_dir / "study.json").write_text(
        json.dumps({"schema_version": 1, "name": name, "created_wall": created_wall, "trial_ids": ids})
    )
    if trials_csv:
        write_trials_table(Study(study_dir))
    return study_dir
