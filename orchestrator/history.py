"""The history of a results root: one index row per study x setting, trends, regressions.

The index is one Parquet table (INDEX_NAME at the root, hidden so discovery skips it): study path,
plan, host, date, kernel/QEMU/libvirt versions, state, and per setting each compared metric's
mean, 95% half width, sd and n across the setting's trials. It is rebuilt incrementally: a study
is re-read only when its key (path + trials.csv mtime) is new or changed; removed studies drop out.

A study's numbers come from its trials.csv, which sweep wrote with every derived metric per trial
(``used_in_stats`` included), so the index never re-reads samples: hundreds of studies take
seconds. A trials.csv without the derived columns (its metrics failed at sweep time) falls back to
metrics.compute_study on the stored samples.

Regressions against the previous run use compare.compare_summaries: Welch from each side's mean,
sd and n, the same interval the trial values give (see compare.welch_from_summary).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator import catalog, metrics
from orchestrator.compare import METRICS, REGRESSION, IMPROVEMENT, Thresholds, compare_summaries
from orchestrator.stats import mean_ci95
from orchestrator.store import atomic_write_bytes

INDEX_NAME = ".ksm-lab-history.parquet"
INDEX_VERSION = 1  # bump when the columns change: an old cache is then rebuilt, not misread
NO_CSV = -1  # trials_csv_mtime_ns of a study without trials.csv (unfinished: no numbers yet)
# host.json values whose change between two runs is marked on the trend plots
VERSION_COLUMNS = {"kernel": ("kernel",), "qemu": ("versions", "qemu"), "libvirt": ("versions", "libvirtd")}
IDENTITY = ("index_version", "study", "study_path", "plan", "host", "created_wall", "date", "state",
            "trials_csv_mtime_ns", *VERSION_COLUMNS, "setting", "ksm_off", "trials", "n")
METRIC_NAMES = tuple(m.name for m in METRICS)


def _metric_columns() -> list[str]:
    return [f"{m}{suffix}" for m in METRIC_NAMES for suffix in ("", "_ci95", "_sd", "_n")]


COLUMNS = (*IDENTITY, *_metric_columns())


def _dig(data: Any, keys: tuple[str, ...]) -> str | None:
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return None if data is None else str(data)


def _utc_date(wall: float) -> str:
    return datetime.fromtimestamp(wall, tz=timezone.utc).strftime("%Y-%m-%d %H:%M")


def _as_bool(series: pd.Series) -> pd.Series:
    if series.dtype == bool:
        return series
    return series.astype(str).str.lower().isin(("true", "1"))


def _trial_table(entry: catalog.StudyEntry) -> pd.DataFrame | None:
    """Per-trial metrics with setting, ksm_off and used_in_stats, from trials.csv (else computed)."""
    path = entry.path / "trials.csv"
    try:
        table = pd.read_csv(path, engine="pyarrow")
    except (OSError, ValueError, pa.ArrowInvalid):
        table = None
    if table is None or not {"setting", "used_in_stats", "ksm_off"} <= set(table.columns):
        try:
            table = metrics.public_trials_table(metrics.compute_study(metrics.load_study(entry.path)))
        except Exception:  # one broken study must not stop the history of hundreds
            return None
    table["used_in_stats"] = _as_bool(table["used_in_stats"])
    table["ksm_off"] = _as_bool(table["ksm_off"])
    return table


def study_rows(entry: catalog.StudyEntry, root: Path, host_json: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The index rows of one study: one per setting (one row without a setting when unfinished
    or unreadable, so the index still knows the study)."""
    if host_json is None:
        host_json = catalog._read_json(entry.path / "host.json") or {}
    base: dict[str, Any] = {
        "index_version": INDEX_VERSION,
        "study": os.path.relpath(entry.path, root),
        "study_path": str(entry.path),
        "plan": entry.name,
        "host": entry.host,
        "created_wall": entry.created_wall,
        "date": _utc_date(entry.created_wall),
        "state": entry.state,
        "trials_csv_mtime_ns": entry.trials_csv_mtime_ns if entry.trials_csv_mtime_ns is not None else NO_CSV,
        **{name: _dig(host_json, keys) for name, keys in VERSION_COLUMNS.items()},
    }
    table = _trial_table(entry) if entry.state != catalog.UNFINISHED else None
    if table is None or table.empty:
        return [{**base, "setting": None, "ksm_off": None, "trials": 0, "n": 0}]
    rows = []
    for (setting, ksm_off), members in table.groupby(["setting", "ksm_off"], sort=False, dropna=False):
        used = members[members["used_in_stats"]]
        row = {**base, "setting": str(setting), "ksm_off": bool(ksm_off), "trials": len(members), "n": len(used)}
        for name in METRIC_NAMES:
            values = pd.to_numeric(used[name], errors="coerce") if name in used else pd.Series(dtype=float)
            mean, half, n = mean_ci95(values)
            finite = values.dropna().to_numpy(dtype=float)
            row.update({name: mean, f"{name}_ci95": half, f"{name}_n": n,
                        f"{name}_sd": float(finite.std(ddof=1)) if finite.size >= 2 else math.nan})
        rows.append(row)
    return rows


def _frame(rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(list(rows), columns=list(COLUMNS))
    for name in ("setting", "kernel", "qemu", "libvirt"):
        frame[name] = frame[name].astype(object)
    return frame


def load_index(path: Path) -> pd.DataFrame:
    """The cached index, or an empty one when absent, unreadable or of another INDEX_VERSION."""
    try:
        frame = pq.read_table(path).to_pandas()
    except (OSError, pa.ArrowInvalid):
        return _frame([])
    if frame.empty or "index_version" not in frame or (frame["index_version"] != INDEX_VERSION).any():
        return _frame([])
    return frame


@dataclass
class IndexResult:
    index: pd.DataFrame
    studies: int
    reread: int
    path: Path


def build_index(root: Path, index_path: Path | None = None) -> IndexResult:
    """Find every study under root and bring the cached index up to date (see module docstring)."""
    root = Path(root)
    index_path = Path(index_path) if index_path else root / INDEX_NAME
    cached = load_index(index_path)
    known: dict[str, int] = {}
    if not cached.empty:
        keys = cached.drop_duplicates("study_path")
        known = dict(zip(keys["study_path"], keys["trials_csv_mtime_ns"].astype("int64")))
    keep: list[str] = []
    fresh: list[dict[str, Any]] = []
    found = 0
    for study_dir in catalog.find_study_dirs(root):
        found += 1
        try:
            mtime = os.stat(study_dir / "trials.csv").st_mtime_ns
        except OSError:
            mtime = NO_CSV
        if known.get(str(study_dir)) == mtime and mtime != NO_CSV:
            keep.append(str(study_dir))  # unchanged since indexed
            continue
        entry = catalog.read_entry(study_dir)
        if entry is not None:
            fresh.extend(study_rows(entry, root))
    kept = cached[cached["study_path"].isin(set(keep))]
    changed = bool(fresh) or len(kept) != len(cached)
    parts = [f for f in (kept, _frame(fresh)) if not f.empty]
    index = pd.concat(parts, ignore_index=True) if parts else _frame([])
    index = index.sort_values(["created_wall", "study_path"], kind="stable", ignore_index=True)
    if changed or not index_path.exists():
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pandas(index, preserve_index=False), buffer)
        atomic_write_bytes(index_path, buffer.getvalue())
    reread = len({r["study_path"] for r in fresh})
    return IndexResult(index, found, reread, index_path)


# ----------------------------------------------------------------------------- trends


@dataclass
class VersionChange:
    plan: str
    host: str
    study: str
    created_wall: float
    what: str  # "kernel 6.1.0 -> 6.6.0"


@dataclass
class Flag:
    """A setting's metric that moved against the previous run of the same plan and host."""

    plan: str
    host: str
    study: str
    previous: str
    created_wall: float
    setting: str
    metric: str
    change_pct: float
    change_ci95_pct: float
    verdict: str
    note: str


def filtered(index: pd.DataFrame, plan: str | None = None, host: str | None = None) -> pd.DataFrame:
    """Rows with numbers (finished studies) of the plan / host asked for."""
    rows = index[index["setting"].notna() & (index["state"] != catalog.UNFINISHED)]
    if plan is not None:
        rows = rows[rows["plan"] == plan]
    if host is not None:
        rows = rows[rows["host"] == host]
    return rows


def version_changes(rows: pd.DataFrame) -> list[VersionChange]:
    """Where kernel, QEMU or libvirt differ from the previous study of the same plan and host."""
    out = []
    for (plan, host), group in rows.groupby(["plan", "host"], sort=True):
        studies = group.drop_duplicates("study_path").sort_values("created_wall")
        previous = None
        for study in studies.itertuples(index=False):
            if previous is not None:
                changed = [f"{name} {getattr(previous, name)} -> {getattr(study, name)}" for name in VERSION_COLUMNS
                           if getattr(previous, name) != getattr(study, name)]
                if changed:
                    out.append(VersionChange(plan, host, study.study, study.created_wall, "; ".join(changed)))
            previous = study
    return out


def _summary(row: Any, metric: str) -> tuple[float, float, int]:
    n = row[f"{metric}_n"]
    return float(row[metric]), float(row[f"{metric}_sd"]), int(n) if n == n else 0


def flags(rows: pd.DataFrame, thresholds: Thresholds = Thresholds()) -> list[Flag]:
    """Every regression and improvement (compare's rule) of a run against the previous run of the
    same plan, host and setting."""
    out = []
    for (plan, host, setting), series in rows.groupby(["plan", "host", "setting"], sort=True):
        series = series.sort_values("created_wall")
        records = series.to_dict("records")
        for before, now in zip(records, records[1:]):
            for spec in METRICS:
                if now["ksm_off"] and not spec.on_ksm_off:
                    continue
                a, b = _summary(before, spec.name), _summary(now, spec.name)
                if not (a[2] and b[2]):
                    continue
                pct, half, verdict, note = compare_summaries(spec, a, b, thresholds)
                if verdict in (REGRESSION, IMPROVEMENT):
                    out.append(Flag(plan, host, now["study"], before["study"], now["created_wall"], setting,
                                    spec.name, pct, half, verdict, note))
    return out


def metrics_present(rows: pd.DataFrame) -> list[str]:
    return [m for m in METRIC_NAMES if m in rows and np.isfinite(pd.to_numeric(rows[m], errors="coerce")).any()]
