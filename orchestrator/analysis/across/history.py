"""The history of a results root: one index row per study x setting, trends, regressions.

The index is one Parquet table (INDEX_NAME at the root, hidden so discovery skips it): study path,
plan, host, date, kernel/QEMU/libvirt versions, state, and per setting each compared metric's
mean, 95% half width, sd and n across the setting's trials. It is rebuilt incrementally: a study
is re-read only when its key (path + trials.csv mtime) is new or changed; removed studies drop out.

A study's numbers come from its trials.csv, which sweep wrote with every derived metric per trial
(``used_in_stats`` included), so the index never re-reads samples: hundreds of studies take
seconds. A trials.csv without the derived columns (its metrics failed at sweep time) falls back to
studymetrics.compute_study on the stored samples.

Flags: every night of a series (plan, host, setting, metric) is judged against the band of the
nights before it (nights.walk: the night is the level of replication, not the trial), and the
page's judged changes are put through Benjamini-Hochberg at q = alpha; a change is flagged when BH
keeps it and it is beyond the metric's threshold. compare judges tonight with the same walk.
"""

from __future__ import annotations

import csv
import io
import logging
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
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from orchestrator.analysis import studymetrics
from orchestrator.analysis.across import nights
from orchestrator.store import catalog, studydata
from orchestrator.analysis.across.compare import (
    HEADLINE,
    IMPROVEMENT,
    METRICS,
    REGRESSION,
    SPECS,
    WORSE,
    Thresholds,
    band_verdict,
)
from orchestrator.analysis.stats import mean_half_width95
from orchestrator.fsutil import atomic_write_bytes

log = logging.getLogger(__name__)

INDEX_NAME = ".ksm-lab-history.parquet"
INDEX_VERSION = 2  # bump when the columns change: an old cache is then rebuilt, not misread
# 2: the within-night changes vs KSM off (tps_vs_off_pct, latency_p95_ms_vs_off_pct) joined METRICS
NO_CSV = -1  # trials_csv_mtime_ns of a study without trials.csv (unfinished: no numbers yet)
# host.json values whose change between two runs is marked on the trend plots
VERSION_COLUMNS = {"kernel": ("kernel",), "qemu": ("versions", "qemu"), "libvirt": ("versions", "libvirtd")}
IDENTITY = (
    "index_version",
    "study",
    "study_path",
    "plan",
    "host",
    "created_wall",
    "date",
    "state",
    "trials_csv_mtime_ns",
    *VERSION_COLUMNS,
    "setting",
    "ksm_off",
    "trials",
    "n",
)
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


NEEDED_COLUMNS = ("setting", "ksm_off", "used_in_stats")
TrialColumns = dict[str, Any]  # "setting": list[str], "ksm_off"/"used_in_stats": bool arrays, metrics: float arrays


def _bools(values: Any) -> np.ndarray:
    return np.array([v is True or str(v).lower() in ("true", "1", "1.0") for v in values], dtype=bool)


def _floats(column: pa.ChunkedArray) -> np.ndarray:
    try:
        return column.cast(pa.float64()).to_numpy(zero_copy_only=False).astype(float)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):  # text in a metric column: not a number
        return pd.to_numeric(pd.Series(column.to_pylist(), dtype=object), errors="coerce").to_numpy(float)


def _from_csv(path: Path) -> TrialColumns | None:
    """The few trials.csv columns the index needs, read by pyarrow (pandas costs ~10x more per
    small file, and history reads hundreds)."""
    try:
        with path.open(newline="") as handle:
            header = next(csv.reader(handle), [])
        if not set(NEEDED_COLUMNS) <= set(header):
            return None
        wanted = [c for c in (*NEEDED_COLUMNS, *METRIC_NAMES) if c in header]
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(use_threads=False),
            convert_options=pacsv.ConvertOptions(include_columns=wanted),
        )
    except (OSError, ValueError, pa.ArrowInvalid):  # ValueError: a trials.csv that is not UTF-8 text
        return None
    out: TrialColumns = {
        "setting": [str(v) for v in table.column("setting").to_pylist()],
        "ksm_off": _bools(table.column("ksm_off").to_pylist()),
        "used_in_stats": _bools(table.column("used_in_stats").to_pylist()),
    }
    for name in METRIC_NAMES:
        if name in table.column_names:
            out[name] = _floats(table.column(name))
    return out


def _from_samples(entry: catalog.StudyEntry) -> TrialColumns | None:
    try:
        trials = studymetrics.compute_study(studydata.load_study(entry.path)).trials
    except Exception:  # one broken study must not stop the history of hundreds
        return None
    out: TrialColumns = {
        "setting": [str(v) for v in trials["setting"]],
        "ksm_off": _bools(trials["ksm_off"]),
        "used_in_stats": _bools(trials["used_in_stats"]),
    }
    for name in METRIC_NAMES:
        if name in trials:
            out[name] = pd.to_numeric(trials[name], errors="coerce").to_numpy(float)
    return out


def trial_columns(entry: catalog.StudyEntry) -> TrialColumns | None:
    """Per-trial metrics with setting, ksm_off and used_in_stats: from trials.csv, else (a
    trials.csv without the derived columns) computed from the stored samples."""
    return _from_csv(entry.path / "trials.csv") or _from_samples(entry)


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
    columns = trial_columns(entry) if entry.state != catalog.UNFINISHED else None
    if not columns or not columns["setting"]:
        return [{**base, "setting": None, "ksm_off": None, "trials": 0, "n": 0}]
    return [{**base, **row} for row in setting_summaries(columns)]


def setting_summaries(columns: TrialColumns) -> list[dict[str, Any]]:
    """Per setting (label + KSM off, in order of first appearance): trials, n (used in
    statistics), and per metric the mean, 95% t half width (as stats.mean_ci95), sd (ddof=1) and
    n over the finite values of the trials used. numpy bincounts: no per-group Python work."""
    codes_of: dict[tuple[str, bool], int] = {}
    codes = np.array(
        [codes_of.setdefault((s, bool(o)), len(codes_of)) for s, o in zip(columns["setting"], columns["ksm_off"])],
        dtype=int,
    )
    groups = len(codes_of)
    used = columns["used_in_stats"]
    rows: list[dict[str, Any]] = [{"setting": s, "ksm_off": o} for s, o in codes_of]
    trials = np.bincount(codes, minlength=groups)
    n_used = np.bincount(codes[used], minlength=groups)
    for g, row in enumerate(rows):
        row["trials"], row["n"] = int(trials[g]), int(n_used[g])
    for name in METRIC_NAMES:
        values = columns.get(name)
        if values is None:
            for row in rows:
                row.update({name: math.nan, f"{name}_ci95": math.nan, f"{name}_sd": math.nan, f"{name}_n": 0})
            continue
        ok = used & np.isfinite(values)
        count = np.bincount(codes[ok], minlength=groups)
        with np.errstate(divide="ignore", invalid="ignore"):
            mean = np.bincount(codes[ok], weights=values[ok], minlength=groups) / count
            squares = np.bincount(codes[ok], weights=(values[ok] - mean[codes[ok]]) ** 2, minlength=groups)
            sd = np.where(count >= 2, np.sqrt(squares / (count - 1)), math.nan)
        half = mean_half_width95(sd, count)
        for g, row in enumerate(rows):
            row.update(
                {
                    name: float(mean[g]) if count[g] else math.nan,
                    f"{name}_ci95": float(half[g]),
                    f"{name}_sd": float(sd[g]),
                    f"{name}_n": int(count[g]),
                }
            )
    return rows


TEXT_COLUMNS = ("study", "study_path", "plan", "host", "date", "state", *VERSION_COLUMNS, "setting")


def _text_as_object(frame: pd.DataFrame) -> pd.DataFrame:
    """One dtype for text whether built here or read back from Parquet (pandas may pick its
    string dtype for the latter), with None for missing values."""
    for name in TEXT_COLUMNS:
        frame[name] = pd.Series(
            [None if v is None or v != v else str(v) for v in frame[name]], index=frame.index, dtype=object
        )
    return frame


def _frame(rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    return _text_as_object(pd.DataFrame(list(rows), columns=list(COLUMNS)))


def load_index(path: Path) -> pd.DataFrame:
    """The cached index, or an empty one when absent, unreadable or of another INDEX_VERSION."""
    try:
        frame = pq.read_table(path).to_pandas()
    except FileNotFoundError:
        return _frame([])
    except (OSError, pa.ArrowInvalid) as exc:
        log.warning("history index %s unreadable (%s): rebuilding it from the studies", path, exc)
        return _frame([])
    if frame.empty:
        return _frame([])
    versions = set(frame["index_version"]) if "index_version" in frame else {"none"}
    if versions != {INDEX_VERSION} or set(COLUMNS) - set(frame.columns):
        log.warning(
            "history index %s is of schema %s, this ksm-lab writes %d: rebuilding it from the studies",
            path,
            ", ".join(map(str, sorted(versions, key=str))),
            INDEX_VERSION,
        )
        return _frame([])
    return _text_as_object(frame)


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
        try:
            atomic_write_bytes(index_path, buffer.getvalue())
        except OSError as exc:  # a cache: a read-only root (someone else's results) still gets its page
            log.warning("history index not saved (%s: %s); pass --index to keep it elsewhere", index_path, exc.strerror)
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
    """A setting's metric outside the band of the earlier nights of the same plan, host and
    setting, kept by Benjamini-Hochberg across the page."""

    plan: str
    host: str
    study: str
    previous: str  # the latest earlier night in the band
    created_wall: float
    setting: str
    metric: str
    change_pct: float  # against the band's mean: percent, or points for the changes vs KSM off
    change_ci95_pct: float
    verdict: str
    note: str
    p: float = math.nan
    band_low: float = math.nan
    band_high: float = math.nan
    band_nights: int = 0


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
                changed = [
                    f"{name} {getattr(previous, name)} -> {getattr(study, name)}"
                    for name in VERSION_COLUMNS
                    if getattr(previous, name) != getattr(study, name)
                ]
                if changed:
                    out.append(VersionChange(plan, host, study.study, study.created_wall, "; ".join(changed)))
            previous = study
    return out


@dataclass
class PageTest:
    """One judged night: a row of the index, a metric, and its judgement against the band."""

    row: dict[str, Any]
    metric: str
    previous: str
    judgement: nights.Judgement


def judge_page(
    rows: pd.DataFrame, thresholds: Thresholds = Thresholds(), rules: nights.NightRules = nights.NightRules()
) -> list[PageTest]:
    """Every night of every series on the page judged against the nights before it (nights.walk);
    only judgements with a p-value (a band and a value) are returned."""
    out: list[PageTest] = []
    if rows.empty:
        return out
    rows = rows.sort_values(["created_wall", "study_path"], kind="stable")
    for _, group in rows.groupby(["plan", "host", "setting", "ksm_off"], sort=True):
        records = group.to_dict("records")
        for spec in METRICS:
            if spec.name not in group or (bool(records[0]["ksm_off"]) and not spec.on_ksm_off):
                continue
            cols = [pd.to_numeric(group[f"{spec.name}{s}"], errors="coerce").to_numpy(float) for s in ("", "_sd", "_n")]
            series = [(float(m), float(sd), int(n) if math.isfinite(n) else 0) for m, sd, n in zip(*cols)]
            judged, _ = nights.walk(
                series,
                spec.higher_is_better,
                thresholds.for_metric(spec),
                spec.absolute,
                spec.near_zero,
                spec.resolution,
                rules,
            )
            for i, j in enumerate(judged):
                if math.isfinite(j.p):
                    out.append(PageTest(records[i], spec.name, records[i - 1]["study"] if i else "", j))
    return out


OUTSIDE_WORSE = "outside the band, the bad way"


@dataclass
class LatestRow:
    """One headline metric of one KSM-on setting on the latest night of a plan and host."""

    plan: str
    host: str
    study: str
    setting: str
    metric: str
    mean: float
    ci95: float
    n: int
    band_low: float
    band_high: float
    band_nights: int
    verdict: str


def latest_nights(
    rows: pd.DataFrame,
    thresholds: Thresholds = Thresholds(),
    rules: nights.NightRules = nights.NightRules(),
    headline: tuple[str, ...] = HEADLINE,
) -> list[LatestRow]:
    """The dashboard's first table: per plan and host, the latest night's headline metrics with
    their interval, the band of the nights before, and the verdict word (before any family
    correction: the page's flags are the BH-corrected ones)."""
    out: list[LatestRow] = []
    if rows.empty:
        return out
    rows = rows.sort_values(["created_wall", "study_path"], kind="stable")
    for (plan, host), group in rows.groupby(["plan", "host"], sort=True):
        latest = group["study_path"].iloc[-1]
        for (setting, off), series_rows in group.groupby(["setting", "ksm_off"], sort=False):
            if bool(off) or series_rows["study_path"].iloc[-1] != latest:
                continue
            now = series_rows.iloc[-1]
            for name in headline:
                spec = SPECS[name]
                if name not in series_rows or not math.isfinite(float(pd.to_numeric(now[name], errors="coerce"))):
                    continue
                cols = [
                    pd.to_numeric(series_rows[f"{name}{s}"], errors="coerce").to_numpy(float) for s in ("", "_sd", "_n")
                ]
                series = [(float(m), float(sd), int(n) if math.isfinite(n) else 0) for m, sd, n in zip(*cols)]
                judged, _ = nights.walk(
                    series,
                    spec.higher_is_better,
                    thresholds.for_metric(spec),
                    spec.absolute,
                    spec.near_zero,
                    spec.resolution,
                    rules,
                )
                j = judged[-1]
                verdict = (
                    band_verdict(j, rules.suspect_p)
                    if j.band is not None and not j.why_no_band
                    else f"no band ({j.why_no_band})"
                )
                if verdict == WORSE:  # one test, before Holm: whether it gates is the nightly compare's call
                    verdict = OUTSIDE_WORSE
                out.append(
                    LatestRow(
                        plan,
                        host,
                        now["study"],
                        setting,
                        name,
                        j.mean,
                        float(pd.to_numeric(now[f"{name}_ci95"], errors="coerce")),
                        j.n,
                        j.band_low,
                        j.band_high,
                        j.band.nights if j.band else 0,
                        verdict,
                    )
                )
    return out


def flags(
    rows: pd.DataFrame,
    thresholds: Thresholds = Thresholds(),
    rules: nights.NightRules = nights.NightRules(),
    tests: list[PageTest] | None = None,
) -> list[Flag]:
    """The regressions and improvements of the page (module docstring: band, then BH). `tests`:
    judge_page's for these rows and rules, when the caller has them (the page also counts them)."""
    if tests is None:
        tests = judge_page(rows, thresholds, rules)
    keep = nights.bh_flags([t.judgement.p for t in tests], [t.judgement.beyond for t in tests], rules.alpha)
    out = []
    for t, flagged in zip(tests, keep):
        if not flagged:
            continue
        j, now = t.judgement, t.row
        absolute = next(m.absolute for m in METRICS if m.name == t.metric)
        unit = "points" if absolute else "%"
        note = (
            f"outside the band of {j.band.nights} earlier nights ({j.band_low:.4g} to {j.band_high:.4g}), "
            f"p = {j.p:.2g}, kept by Benjamini-Hochberg across the page's {len(tests)} judged changes "
            f"({unit})"
        )
        out.append(
            Flag(
                now["plan"],
                now["host"],
                now["study"],
                t.previous,
                now["created_wall"],
                now["setting"],
                t.metric,
                j.change_pct,
                j.half_pct,
                REGRESSION if j.beyond < 0 else IMPROVEMENT,
                note,
                j.p,
                j.band_low,
                j.band_high,
                j.band.nights,
            )
        )
    return sorted(out, key=lambda f: (f.created_wall, f.study, f.setting, f.metric))


def count_comparisons(
    rows: pd.DataFrame, thresholds: Thresholds = Thresholds(), rules: nights.NightRules = nights.NightRules()
) -> int:
    """How many nights x settings x metrics were judged against a band: BH's m (the page says how
    many flags chance alone would give over that many)."""
    return len(judge_page(rows, thresholds, rules))


def metrics_present(rows: pd.DataFrame) -> list[str]:
    return [m for m in METRIC_NAMES if m in rows and np.isfinite(pd.to_numeric(rows[m], errors="coerce")).any()]
