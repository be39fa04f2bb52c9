"""Builders of hand-made study folders for the analysis, report and policy tests: each writes a
study exactly as docs/ARCHITECTURE.md describes it (study.json, trials/<id>/trial.json and its
CSVs, trials.csv), with numbers chosen so the right answers are known."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from orchestrator.analysis import studymetrics, trialmetrics
from orchestrator.store import studydata

PAGE = 4096
MIB = 1024 * 1024


def ramp_ksm_frame(
    final_sharing: int = 1000,
    measure_s: int = 10,
    baseline_s: int = 2,
    cpu_core_fraction: float = 0.05,
    zero_pages: int = 0,
    plateau: bool = False,
) -> pd.DataFrame:
    """ksm.csv rows, one per second: baseline (KSM idle) then measure where pages_sharing ramps
    linearly from 0 to final_sharing over measure_s (or sits at final_sharing when plateau).
    ksmd burns cpu_core_fraction of a core all along; a full scan completes every 2 s of measure.
    """
    t_s = np.arange(0, baseline_s + measure_s + 1, dtype=float)
    in_measure = t_s >= baseline_s
    t_rel = np.where(in_measure, t_s - baseline_s, 0.0)
    if plateau:
        sharing = np.where(in_measure, final_sharing, 0)
    else:
        sharing = np.round(final_sharing * t_rel / measure_s).astype(int)
    cpu_s = cpu_core_fraction * t_s
    cpu_pct = np.concatenate([[np.nan], np.diff(cpu_s) / np.diff(t_s) * 100])
    rmap_items = np.where(in_measure, 2 * final_sharing, 0)
    frame = pd.DataFrame(
        {
            "t_wall": 1_700_000_000.0 + t_s,
            "t_s": t_s,
            "phase": np.where(in_measure, "measure", "baseline"),
            "pages_shared": np.where(in_measure, final_sharing // 10, 0),
            "pages_sharing": sharing,
            "pages_unshared": np.where(in_measure, 2 * final_sharing // 10, 0),
            "pages_volatile": np.where(in_measure, final_sharing // 10, 0),
            "full_scans": (t_rel // 2).astype(int),
            "general_profit": sharing * PAGE - rmap_items * 64,
            "ksm_zero_pages": np.where(in_measure, zero_pages, 0),
            "run": np.where(in_measure, 1, 0),
            "pages_to_scan": 100,
            "ksmd_cpu_s": cpu_s,
            "ksmd_cpu_pct": cpu_pct,
            "mem_available_kib": 1_000_000 + sharing * PAGE // 1024,
            "mem_free_kib": 900_000,
            "anon_pages_kib": 50_000,
            "anon_huge_pages_kib": 0,
            "vmstat_cow_ksm": np.where(t_s >= t_s[-1], 2, 0),
            "vmstat_thp_split_page": 10 + np.where(in_measure, 3, 0),
            "tick_ms": 1.5,
            "pss_tier": (t_s.astype(int) % 2) == 0,
        }
    )
    return frame


def processes_frame(ksm: pd.DataFrame, pss_start_kib: float = 8000, pss_drop_total_kib: float = 4000) -> pd.DataFrame:
    """Two processes; their summed PSS falls by pss_drop_total_kib linearly over measure."""
    rows = []
    measure = ksm["phase"] == "measure"
    progress = np.where(measure, ksm["pages_sharing"] / max(ksm["pages_sharing"].max(), 1), 0.0)
    for label, pid in (("proc-0", 101), ("proc-1", 102)):
        pss = pss_start_kib - progress * pss_drop_total_kib / 2
        rows.append(
            pd.DataFrame(
                {
                    "t_wall": ksm["t_wall"],
                    "t_s": ksm["t_s"],
                    "phase": ksm["phase"],
                    "label": label,
                    "pid": pid,
                    "rss_kib": 8000.0,
                    "pss_kib": np.where(ksm["pss_tier"], pss, np.nan),
                    "uss_kib": np.where(ksm["pss_tier"], pss - 100, np.nan),
                    "swap_kib": 0.0,
                    "ksm_merging_pages": np.where(measure, 500, 0),
                    "ksm_rmap_items": np.where(measure, 1000, 0),
                    "ksm_zero_pages": 0,
                    "ksm_process_profit": np.where(measure, 500 * PAGE - 1000 * 64, 0),
                }
            )
        )
    return pd.concat(rows).sort_values(["t_s", "label"], kind="stable").reset_index(drop=True)


def write_trial(
    study_dir: Path,
    trial_id: str,
    settings: dict[str, Any],
    *,
    repetition: int = 0,
    status: str = "ok",
    reason: str | None = None,
    ksm_off: bool = False,
    ksm: pd.DataFrame | None = None,
    processes: pd.DataFrame | None = None,
    workload_summary: dict[str, Any] | None = None,
    workload: pd.DataFrame | None = None,
    kind: str = "processes",
    ksm_knobs: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """One trial folder; extra: more trial.json fields (disturbed, outside_cpu_pct, rerun_of)."""
    trial_dir = study_dir / "trials" / trial_id
    trial_dir.mkdir(parents=True)
    knobs = (
        ksm_knobs
        if ksm_knobs is not None
        else {
            "run": 0 if ksm_off else 1,
            "pages_to_scan": settings.get("pages_to_scan", 100),
            "sleep_millisecs": 20,
            "use_zero_pages": 0,
        }
    )
    trial = {
        "trial_id": trial_id,
        "index": len(list((study_dir / "trials").iterdir())) - 1,
        "repetition": repetition,
        "settings": settings,
        "ksm": knobs,
        "workload": {},
        "status": status,
        "reason": reason,
        "kind": kind,
        "ksm_off": ksm_off,
        "timings": {"measure": {"start_wall": 1_700_000_002.0, "end_wall": 1_700_000_012.0}},
        **(extra or {}),
    }
    (trial_dir / "trial.json").write_text(json.dumps(trial))
    if ksm is not None:
        ksm.to_csv(trial_dir / "ksm.csv", index=False)
    if processes is not None:
        processes.to_csv(trial_dir / "processes.csv", index=False)
    if workload_summary is not None:
        (trial_dir / "workload_summary.json").write_text(json.dumps(workload_summary))
    if workload is not None:
        workload.to_csv(trial_dir / "workload.csv", index=False)
    return trial_dir


def start_study(root: Path, name: str = "study", plan: str = '[study]\nname = "study"\n') -> Path:
    study_dir = root / name
    (study_dir / "trials").mkdir(parents=True)
    (study_dir / "plan.toml").write_text(plan)
    (study_dir / "host.json").write_text(
        json.dumps(
            {
                "kernel": "6.18.0-test",
                "cpu_model": "Test CPU",
                "cpu_count": 2,
                "mem_total_kib": 24_000_000,
                "thp": {"enabled": "madvise"},
                "versions": {"python": "3.11", "ksm_lab": "0.1.0"},
            }
        )
    )
    return study_dir


def finish_study(study_dir: Path) -> Path:
    ids = sorted(p.name for p in (study_dir / "trials").iterdir())
    (study_dir / "study.json").write_text(
        json.dumps({"schema_version": 1, "name": study_dir.name, "created_wall": 1_700_000_000.0, "trial_ids": ids})
    )
    return study_dir


def guests_summary(*tps: float, p95_ms: float = 20.0) -> dict[str, Any]:
    return {
        f"vm{i}": {
            "transactions": 1000,
            "tps": v,
            "queries": 20000,
            "qps": 20 * v,
            "latency_p95_ms": p95_ms,
            "errors": 0,
        }
        for i, v in enumerate(tps)
    }


def sweep_study(root: Path) -> Path:
    """pages_to_scan 100 and 1000, two repetitions each; 1000 saves more and costs more CPU."""
    study_dir = start_study(root)
    for pages, final, cpu in ((100, 800, 0.02), (1000, 1000, 0.10)):
        for rep in (0, 1):
            ksm = ramp_ksm_frame(final_sharing=final + 40 * rep, cpu_core_fraction=cpu + 0.01 * rep)
            write_trial(
                study_dir,
                f"p{pages}-r{rep}",
                {"pages_to_scan": pages},
                repetition=rep,
                ksm=ksm,
                processes=processes_frame(ksm),
            )
    return finish_study(study_dir)


def with_drift(
    ksm: pd.DataFrame, processes: pd.DataFrame, pss_growth_mib: float, avail_fall_mib: float
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The guests' own growth during a trial, KSM or not: over measure the tracked PSS grows by
    pss_growth_mib (split over the processes) and MemAvailable falls by avail_fall_mib, linearly."""

    def progress(t_s: pd.Series) -> np.ndarray:
        start = ksm.loc[ksm["phase"] == "measure", "t_s"].min()
        return np.clip((t_s - start) / (ksm["t_s"].max() - start), 0.0, 1.0).to_numpy()

    ksm = ksm.assign(mem_available_kib=ksm["mem_available_kib"] - avail_fall_mib * 1024 * progress(ksm["t_s"]))
    per_process = pss_growth_mib * 1024 / processes["label"].nunique()
    processes = processes.assign(pss_kib=processes["pss_kib"] + per_process * progress(processes["t_s"]))
    return ksm, processes


def sysbench_trial(
    study_dir: Path,
    trial_id: str,
    settings: dict[str, Any],
    tps: float,
    *,
    rep: int = 0,
    ksm_off: bool = False,
    guest_spread: float = 0.1,
    **kwargs: Any,
) -> Path:
    """A two-guest sysbench trial whose guests ran tps and tps + guest_spread (trial mean
    tps + guest_spread / 2): guests of one trial agree closely, as they do on a real host."""
    return write_trial(
        study_dir,
        trial_id,
        settings,
        repetition=rep,
        ksm_off=ksm_off,
        kind="sysbench",
        ksm=kwargs.pop("ksm", ramp_ksm_frame()),
        workload_summary=guests_summary(tps, tps + guest_spread),
        **kwargs,
    )


def block_study(root: Path, on_tps: list[float], off_tps: list[float], guest_spread: float = 0.1) -> Path:
    """One KSM-on setting (pages_to_scan=1000) and its KSM-off trial in each block; block b ran the
    setting's guests at on_tps[b] (and + guest_spread) and KSM off at off_tps[b]."""
    study_dir = start_study(root)
    for block, (on, off) in enumerate(zip(on_tps, off_tps, strict=True)):
        sysbench_trial(
            study_dir, f"off-r{block}", {"threads": 1}, off, rep=block, ksm_off=True, guest_spread=guest_spread
        )
        sysbench_trial(
            study_dir,
            f"on-r{block}",
            {"threads": 1, "ksm.pages_to_scan": 1000},
            on,
            rep=block,
            guest_spread=guest_spread,
        )
    return finish_study(study_dir)


def computed(study_dir: Path) -> studymetrics.StudyMetrics:
    return studymetrics.compute_study(studydata.load_study(study_dir))


def drift_study(root: Path, drifts_mib: tuple[float, ...] = (95.0, 85.0)) -> Path:
    """Per block: a KSM-off trial whose guests grow (PSS +d MiB, MemAvailable -(d - 1) MiB) and a
    KSM-on trial that saves 100 MiB (25,600 pages) on top of the same growth."""
    study_dir = start_study(root)
    for block, drift in enumerate(drifts_mib):
        off_ksm = ramp_ksm_frame(final_sharing=0)
        off_ksm, off_procs = with_drift(off_ksm, processes_frame(off_ksm, pss_start_kib=200_000), drift, drift - 1)
        write_trial(
            study_dir, f"off-r{block}", {"threads": 1}, repetition=block, ksm_off=True, ksm=off_ksm, processes=off_procs
        )
        on_ksm = ramp_ksm_frame(final_sharing=25_600)
        on_procs = processes_frame(on_ksm, pss_start_kib=200_000, pss_drop_total_kib=100 * 1024)
        on_ksm, on_procs = with_drift(on_ksm, on_procs, drift, drift - 1)
        write_trial(
            study_dir,
            f"on-r{block}",
            {"threads": 1, "ksm.pages_to_scan": 1000},
            repetition=block,
            ksm=on_ksm,
            processes=on_procs,
        )
    return finish_study(study_dir)


def disturbed_study(root: Path) -> Path:
    """One block. Setting A's trial was disturbed (outside CPU 40%) and its rerun is ok; setting
    B's trial was disturbed (35%) and its rerun failed."""
    study_dir = start_study(root)
    a, b = {"threads": 1, "ksm.pages_to_scan": 100}, {"threads": 1, "ksm.pages_to_scan": 1000}
    sysbench_trial(study_dir, "off", {"threads": 1}, 10.0, ksm_off=True, guest_spread=0.0)
    sysbench_trial(study_dir, "a", a, 5.0, guest_spread=0.0, extra={"disturbed": True, "outside_cpu_pct": 40.0})
    sysbench_trial(study_dir, "a-rerun", a, 9.0, guest_spread=0.0, extra={"rerun_of": "a", "outside_cpu_pct": 2.0})
    sysbench_trial(study_dir, "b", b, 8.0, guest_spread=0.0, extra={"disturbed": True, "outside_cpu_pct": 35.0})
    write_trial(
        study_dir, "b-rerun", b, status="failed", reason="guest vm0 never answered SSH", extra={"rerun_of": "b"}
    )
    return finish_study(study_dir)


def with_order(study_dir: Path, order: str) -> Path:
    """Record the plan's run order in study.json, as the sweep does."""
    meta = json.loads((study_dir / "study.json").read_text())
    (study_dir / "study.json").write_text(json.dumps({**meta, "order": order}))
    return study_dir


def family_study(root: Path, effects: dict[int, list[float]], off: tuple[float, ...] = (10.0, 12.0, 8.0)) -> Path:
    """KSM off and one setting per pages_to_scan in each block; a setting's tps is the block's
    KSM-off tps changed by effects[pages][block] percent."""
    study = start_study(root)
    for block, ref in enumerate(off):
        sysbench_trial(study, f"off-r{block}", {"threads": 1}, ref, rep=block, ksm_off=True, guest_spread=0.0)
        for pages, pcts in effects.items():
            sysbench_trial(
                study,
                f"p{pages}-r{block}",
                {"threads": 1, "ksm.pages_to_scan": pages},
                ref * (1 + pcts[block] / 100),
                rep=block,
                guest_spread=0.0,
            )
    return finish_study(study)


def scanning_frame(scanned_per_s: float = 2500.0, chains: int = 5, **kwargs) -> pd.DataFrame:
    """ramp_ksm_frame plus what the scan-speed and memory metrics read: pages_scanned rising
    scanned_per_s during measure, stable_node_chains."""
    ksm = ramp_ksm_frame(**kwargs)
    measure = ksm["phase"] == "measure"
    t0 = ksm.loc[measure, "t_s"].min()
    ksm["pages_scanned"] = np.where(measure, (ksm["t_s"] - t0) * scanned_per_s, 0).astype(int)
    ksm["stable_node_chains"] = np.where(measure, chains, 0)
    return ksm


def one_trial(
    tmp_path: Path,
    knobs: dict,
    ksm: pd.DataFrame,
    *,
    ksm_off: bool = False,
    extra: dict | None = None,
    cow: pd.DataFrame | None = None,
) -> dict:
    study = start_study(tmp_path)
    trial_dir = write_trial(
        study,
        "t",
        {"pages_to_scan": knobs.get("pages_to_scan")},
        ksm=ksm,
        processes=processes_frame(ksm),
        ksm_knobs=knobs,
        ksm_off=ksm_off,
        extra=extra,
    )
    if cow is not None:
        cow.to_csv(trial_dir / "cow.csv", index=False)
    finish_study(study)
    return trialmetrics.trial_metrics(trial_dir, PAGE)
