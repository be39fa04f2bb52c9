"""Study folders under a results root: where they are, whose they are, whether they finished.

`history`, `prune`, `collect` and the nightly job all need the same three answers about a study
folder without computing its metrics: which plan and host it belongs to, when it ran, and its
state:

``good``        finished, every trial ok
``finished``    finished, some trial failed (its numbers exclude that trial)
``unfinished``  interrupted, killed, or still running: a trial in study.json has no trial.json,
                or was stopped by a signal, or trials.csv is missing or older than a trial.json
                (sweep writes trials.csv last, after every trial it ran; a resumed run that has
                not reached its end has a trials.csv from the interrupted run)

Discovery walks the root at any depth without following symlinks, skips hidden folders
(``.``-prefixed: collect's half-copied studies, caches, lock files) and does not descend into a
study folder once found (its trials/ can hold thousands of files).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.errors import StoreError
from orchestrator.host.hostinfo import is_machine_id
from orchestrator.runners.record import TrialRecord

STUDY_FILE = "study.json"
GOOD, FINISHED, UNFINISHED = "good", "finished", "unfinished"
STATES = (GOOD, FINISHED, UNFINISHED)
UNKNOWN_HOST = "unknown"
# sweep._run_one's reason for a trial a SIGINT/SIGTERM stopped: it ran, but not to its end.
INTERRUPTED_REASON = "interrupted by signal"


def find_study_dirs(root: Path) -> Iterator[Path]:
    """Every folder under root (root included) holding a regular study.json, in walk order."""
    root = Path(root)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        if STUDY_FILE in filenames and not os.path.islink(os.path.join(dirpath, STUDY_FILE)):
            dirnames[:] = []  # a study's own folders are never studies
            yield Path(dirpath)
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _mtime_ns(path: Path) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


@dataclass(frozen=True)
class StudyEntry:
    path: Path
    name: str
    host: str  # the hostname, for people
    created_wall: float
    schema_version: Any
    state: str
    trials: int
    failed: int
    trials_csv_mtime_ns: int | None
    host_id: str = UNKNOWN_HOST  # the machine id host.json records, else the hostname: prune's groups

    @property
    def good(self) -> bool:
        return self.state == GOOD

    @property
    def finished(self) -> bool:
        return self.state != UNFINISHED


def hostname_of(host: Any) -> str:
    if isinstance(host, dict) and isinstance(host.get("hostname"), str) and host["hostname"]:
        return host["hostname"]
    return UNKNOWN_HOST


def host_id_of(host: Any) -> str:
    """The machine id a study's host.json records (studies before it was recorded: the hostname)."""
    if isinstance(host, dict) and is_machine_id(host.get("machine_id")):
        return host["machine_id"]
    return hostname_of(host)


def study_state(study_dir: Path, trial_ids: list[str]) -> tuple[str, int]:
    """(state, failed trials) from trial.json files and trials.csv's age (see module docstring)."""
    csv_mtime = _mtime_ns(study_dir / "trials.csv")
    unfinished = csv_mtime is None or not trial_ids
    failed = 0
    for trial_id in trial_ids:
        path = study_dir / "trials" / str(trial_id) / "trial.json"
        try:
            record = TrialRecord.from_json(_read_json(path), str(path))
        except StoreError:  # none, cut short, or a shape or schema this ksm-lab does not read
            unfinished = True
            continue
        if record.status not in ("ok", "failed"):
            unfinished = True
            continue
        if record.status != "ok":
            failed += 1
            if record.reason == INTERRUPTED_REASON:
                unfinished = True
        mtime = _mtime_ns(path)
        if csv_mtime is not None and mtime is not None and mtime > csv_mtime:
            unfinished = True
    if unfinished:
        return UNFINISHED, failed
    return (GOOD if failed == 0 else FINISHED), failed


def read_entry(study_dir: Path) -> StudyEntry | None:
    """The catalog entry of one folder, or None when its study.json is not a study's."""
    study_dir = Path(study_dir)
    meta = _read_json(study_dir / STUDY_FILE)
    if not isinstance(meta, dict) or "schema_version" not in meta:
        return None
    trial_ids = [str(t) for t in meta.get("trial_ids") or []]
    state, failed = study_state(study_dir, trial_ids)
    created = meta.get("created_wall")
    host = _read_json(study_dir / "host.json")
    return StudyEntry(
        path=study_dir,
        name=str(meta.get("name") or study_dir.name),
        host=hostname_of(host),
        host_id=host_id_of(host),
        created_wall=float(created) if isinstance(created, (int, float)) else 0.0,
        schema_version=meta.get("schema_version"),
        state=state,
        trials=len(trial_ids),
        failed=failed,
        trials_csv_mtime_ns=_mtime_ns(study_dir / "trials.csv"),
    )


FUTURE_TOLERANCE_S = 86_400.0  # a clock a day fast is a clock; beyond that the date is not believed
EARLIEST_WALL = 946_684_800.0  # 2000-01-01: a study "older" than ksm-lab is a reset clock or a forgery


def date_trusted(wall: float, now_wall: float | None = None) -> bool:
    """Whether a study's claimed created_wall can order it among the others: a number, not
    before 2000, not more than a day in the future. A study dated wrongly (a clock wrong at
    boot, a cloned host, a crafted folder) must not push real studies out of prune's newest N or
    become the nightly's baseline."""
    now_wall = time.time() if now_wall is None else now_wall
    return math.isfinite(wall) and EARLIEST_WALL <= wall <= now_wall + FUTURE_TOLERANCE_S


def _order(e: StudyEntry) -> tuple[float, str]:
    return (e.created_wall if math.isfinite(e.created_wall) else -math.inf, str(e.path))


def scan(root: Path, plan: str | None = None, host: str | None = None) -> list[StudyEntry]:
    """Every study under root, oldest first (by created_wall, then path), optionally filtered
    (`host`: a hostname or a machine id)."""
    entries = [e for e in (read_entry(d) for d in find_study_dirs(root)) if e is not None]
    entries = [e for e in entries if (plan is None or e.name == plan) and (host is None or host in (e.host, e.host_id))]
    return sorted(entries, key=_order)


def latest(
    entries: list[StudyEntry], states: tuple[str, ...] = STATES, exclude: Path | None = None
) -> StudyEntry | None:
    """The newest entry in one of the states, skipping `exclude` (the study just run) and
    studies whose date is not trusted (date_trusted)."""
    excluded = Path(exclude).resolve() if exclude is not None else None
    kept = [
        e
        for e in entries
        if e.state in states and (excluded is None or e.path.resolve() != excluded) and date_trusted(e.created_wall)
    ]
    return max(kept, key=_order) if kept else None
