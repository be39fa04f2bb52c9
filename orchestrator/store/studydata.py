"""A study folder as the store wrote it, read once into frames: TrialData, StudyData and the
``load_*`` readers, the only part of the metrics that reads files.

A missing file leaves its frame None; an unreadable one (a truncated CSV, bad JSON) is noted in
the trial's ``problems`` instead of sinking the whole report. Only a folder that is not a study
(no such folder, no study.json) raises.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

from orchestrator.errors import StoreError
from orchestrator.runners.record import TrialRecord, UnknownTrialSchema, not_run_record

DEFAULT_PAGE_SIZE_BYTES = 4096


@dataclass
class TrialData:
    """One trial folder as the store wrote it; frames are None when the file is absent."""

    trial_dir: Path
    trial: TrialRecord
    ksm: pd.DataFrame | None = None
    ksm_table: pa.Table | None = None  # the same ksm.csv as Arrow, for samples.parquet
    processes: pd.DataFrame | None = None
    workload: pd.DataFrame | None = None
    fills: pd.DataFrame | None = None  # processes workload: every fill's start/end (fills.csv)
    cow: pd.DataFrame | None = None  # probe workload: one row per timed write (cow.csv)
    exposure: pd.DataFrame | None = None  # probe, mode exposure: the observer's tests (exposure.csv)
    workload_summary: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def trial_id(self) -> str:
        return self.trial.trial_id or self.trial_dir.name


@dataclass
class StudyData:
    study_dir: Path
    study: dict[str, Any]
    host: dict[str, Any]
    plan_text: str
    trials: list[TrialData]

    @property
    def page_size_bytes(self) -> int:
        return page_size_from_host(self.host)


def page_size_from_host(host: dict[str, Any]) -> int:
    """host.json's page size if it records one, else 4 KiB (the x86-64 base page)."""
    for key in ("page_size_bytes", "page_size"):
        value = host.get(key)
        if isinstance(value, (int, float)) and value > 0:
            return int(value)
    return DEFAULT_PAGE_SIZE_BYTES


# processes.csv columns the metrics use; the rest (t_wall, pid, uss, swap) is not converted,
# which is a quarter of the read time on a large study
PROCESS_COLUMNS = (
    "t_s",
    "phase",
    "label",
    "rss_kib",
    "pss_kib",
    "ksm_merging_pages",
    "ksm_rmap_items",
    "ksm_zero_pages",
    "ksm_process_profit",
)


def _read_table(path: Path, problems: list[str], columns: tuple[str, ...] | None = None) -> pa.Table | None:
    """pyarrow's multithreaded CSV reader; low-cardinality text (phase, label, guest) is
    dictionary-encoded (pandas categoricals), which keeps filtering and grouping fast."""
    if not path.exists():
        return None
    try:
        options = pacsv.ConvertOptions(auto_dict_encode=True)
        if columns is not None:
            with path.open(newline="") as handle:
                header = next(csv.reader(handle), [])
            options.include_columns = [c for c in columns if c in header]
        return pacsv.read_csv(path, convert_options=options)
    except (
        pa.ArrowInvalid,
        OSError,
        ValueError,
    ) as exc:  # truncated or not text (UnicodeDecodeError): noted, not fatal
        problems.append(f"{path.name} unreadable: {exc}")
        return None


def _to_frame(table: pa.Table | None) -> pd.DataFrame | None:
    # split_blocks: numeric columns are shared with the Arrow table instead of copied
    return None if table is None else table.to_pandas(split_blocks=True)


def _read_csv(path: Path, problems: list[str]) -> pd.DataFrame | None:
    return _to_frame(_read_table(path, problems))


def _read_json(path: Path, problems: list[str]) -> Any:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        problems.append(f"{path.name} unreadable: {exc}")
        return None


def load_trial(trial_dir: Path) -> TrialData:
    """Read one trial folder. A folder without trial.json, or with one that cannot be read
    (cut short, a shape the record's model does not read), is reported as status "not_run"
    with the reason; a trial.json of a schema version this ksm-lab does not read is refused
    (UnknownTrialSchema: the study was written by another ksm-lab)."""
    trial_dir = Path(trial_dir)
    problems: list[str] = []
    raw = _read_json(trial_dir / "trial.json", problems)
    trial: TrialRecord | None = None
    if raw is not None:
        try:
            trial = TrialRecord.from_json(raw, str(trial_dir / "trial.json"))
        except UnknownTrialSchema:
            raise
        except StoreError as exc:
            problems.append(str(exc))
    if trial is None:
        trial = not_run_record(
            trial_dir.name, problems[0] if problems else "no trial.json (not run, or crashed before storing)"
        )
    summary = _read_json(trial_dir / "workload_summary.json", problems)
    ksm_table = _read_table(trial_dir / "ksm.csv", problems)
    return TrialData(
        trial_dir=trial_dir,
        trial=trial,
        ksm=_to_frame(ksm_table),
        ksm_table=ksm_table,
        processes=_to_frame(_read_table(trial_dir / "processes.csv", problems, PROCESS_COLUMNS)),
        workload=_read_csv(trial_dir / "workload.csv", problems),
        fills=_read_csv(trial_dir / "fills.csv", problems),
        cow=_read_csv(trial_dir / "cow.csv", problems),
        exposure=_read_csv(trial_dir / "exposure.csv", problems),
        workload_summary=summary if isinstance(summary, dict) else None,
        problems=problems,
    )


def load_study(study_dir: Path) -> StudyData:
    """Read a study folder: study.json, host.json, plan.toml and every trial folder."""
    study_dir = Path(study_dir)
    if not study_dir.is_dir():
        raise StoreError(f"{study_dir}: no such study folder")
    problems: list[str] = []
    study = _read_json(study_dir / "study.json", problems)
    if not isinstance(study, dict):
        raise StoreError(f"{study_dir}: study.json missing or unreadable; is this a study folder?")
    host = _read_json(study_dir / "host.json", problems)
    plan_path = study_dir / "plan.toml"
    plan_text = plan_path.read_text(errors="replace") if plan_path.exists() else ""
    trials_root = study_dir / "trials"
    ids = [str(t) for t in study.get("trial_ids", [])]
    on_disk = sorted(p.name for p in trials_root.iterdir() if p.is_dir()) if trials_root.is_dir() else []
    ids += [t for t in on_disk if t not in ids]
    trials = [load_trial(trials_root / t) for t in ids]
    return StudyData(study_dir, study, host if isinstance(host, dict) else {}, plan_text, trials)
