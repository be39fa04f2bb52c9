"""The results folder: layout, atomic writes, resume.

<results>/<study>/plan.toml, study.json, host.json, settings-record.json, trials/<id>/...,
trials.csv (see docs/ARCHITECTURE.md), each written atomically (fsutil.py). A trial is finished when its trial.json says "ok";
trial.json is written last, so a trial interrupted mid-write is simply run again on resume.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from orchestrator.errors import StoreError
from orchestrator.runners.record import TrialRecord, UnknownTrialSchema, not_run_record

# Re-exported: the study's writers have always found them here.
from orchestrator.fsutil import atomic_write_bytes, atomic_write_json, atomic_write_text

SCHEMA_VERSION = 1


def atomic_write_csv(path: Path, frame: pd.DataFrame) -> None:
    atomic_write_bytes(path, frame.to_csv(index=False).encode())


class Study:
    """One study folder. Never overwritten: an existing folder is only reopened with resume."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def trials_dir(self) -> Path:
        return self.path / "trials"

    @property
    def settings_record(self) -> Path:
        return self.path / "settings-record.json"

    def trial_dir(self, trial_id: str) -> Path:
        return self.trials_dir / trial_id

    # -- opening -------------------------------------------------------------------------------

    @classmethod
    def create(
        cls, results_dir: Path, name: str, plan_text: str, trial_ids: list[str], resume: bool, order: str | None = None
    ) -> "Study":
        """order: the run order (plan.run_order), recorded so the analysis knows whether a
        repetition is a block of trials run side by side."""
        path = results_dir / name
        study = cls(path)
        if path.exists():
            if not resume:
                raise StoreError(
                    f"study folder {path} already exists; pass --resume to finish it, "
                    "or change [study] name / --results to start a new one"
                )
            meta = study.meta()  # checks the schema version
            study._check_resumable(plan_text)
            # Reruns of disturbed trials are not in the plan's list: keep them.
            meta["trial_ids"] = trial_ids + [t for t in meta.get("trial_ids", []) if t not in trial_ids]
            meta["resumed_wall"] = meta.get("resumed_wall", []) + [time.time()]
            if order is not None:
                meta.setdefault("order", order)  # the plan is unchanged, so is its order
            atomic_write_json(path / "study.json", meta)
            return study
        if resume:
            raise StoreError(f"--resume given but {path} does not exist")
        try:
            path.mkdir(parents=True)
        except OSError as exc:
            raise StoreError(f"cannot create study folder {path}: {exc.strerror}") from None
        study.trials_dir.mkdir()
        atomic_write_text(path / "plan.toml", plan_text)
        atomic_write_json(
            path / "study.json",
            {
                "schema_version": SCHEMA_VERSION,
                "name": name,
                "created_wall": time.time(),
                "trial_ids": trial_ids,
                **({"order": order} if order is not None else {}),
            },
        )
        return study

    def meta(self) -> dict[str, Any]:
        meta_path = self.path / "study.json"
        try:
            meta = json.loads(meta_path.read_text())
        except FileNotFoundError:
            raise StoreError(f"{self.path} is not a study folder (no study.json)") from None
        except json.JSONDecodeError as exc:
            raise StoreError(f"{meta_path} is corrupt: {exc}") from None
        if meta.get("schema_version") != SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} was written with results schema {meta.get('schema_version')}, "
                f"this version reads schema {SCHEMA_VERSION}"
            )
        return meta

    def _check_resumable(self, plan_text: str) -> None:
        stored = (self.path / "plan.toml").read_text()
        if stored != plan_text:
            raise StoreError(
                f"the plan differs from the one {self.path} was started with ({self.path / 'plan.toml'}); "
                "resume with that plan, or start a new study under another name"
            )

    # -- trials --------------------------------------------------------------------------------

    def trial_record(self, trial_id: str) -> TrialRecord | None:
        """The trial's record; None when it has none or an unreadable one (cut short, a shape
        the model does not read): such a trial runs again on resume. A schema version this
        ksm-lab does not read is refused (UnknownTrialSchema)."""
        path = self.trial_dir(trial_id) / "trial.json"
        try:
            return TrialRecord.from_json(json.loads(path.read_text()), str(path))
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        except UnknownTrialSchema:
            raise
        except StoreError:
            return None

    def is_finished(self, trial_id: str) -> bool:
        record = self.trial_record(trial_id)
        return record is not None and record.status == "ok"

    def write_trial(
        self,
        trial_id: str,
        record: TrialRecord,
        frames: Mapping[str, pd.DataFrame],
        extra_json: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write a trial's data files, then trial.json (the mark that it is complete).
        StoreError (with the errno) when the folder cannot take them, e.g. a full disk."""
        folder = self.trial_dir(trial_id)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for name, frame in frames.items():
                if frame is not None and not frame.empty:
                    atomic_write_csv(folder / f"{name}.csv", frame)
            for name, data in (extra_json or {}).items():
                atomic_write_json(folder / f"{name}.json", data)
            atomic_write_json(folder / "trial.json", record.to_json())
        except OSError as exc:
            error = StoreError(f"cannot write trial {trial_id} into {folder}: {exc.strerror or exc}")
            error.errno = exc.errno  # type: ignore[attr-defined]
            raise error from None
        return folder

    def set_aside_attempt(self, trial_id: str) -> Path | None:
        """Before a trial runs again (a resume, a failed attempt): move what an earlier attempt left
        in its folder (its trial.json, CSVs, the policy's log) to attempts/<trial_id>.<n>, so the
        new record never sits beside the old attempt's files. Nothing measured is deleted."""
        folder = self.trial_dir(trial_id)
        if not folder.is_dir() or not any(folder.iterdir()):
            return None
        attempts = self.path / "attempts"
        n = 1
        while (attempts / f"{trial_id}.{n}").exists():
            n += 1
        target = attempts / f"{trial_id}.{n}"
        try:
            attempts.mkdir(exist_ok=True)
            folder.rename(target)
        except OSError as exc:
            raise StoreError(
                f"cannot set aside the earlier attempt of trial {trial_id} ({folder}): {exc.strerror or exc}"
            ) from None
        return target

    def add_trial_ids(self, trial_ids: list[str]) -> None:
        """Append trials decided during the study (reruns) to study.json's list."""
        meta = self.meta()
        meta["trial_ids"] = meta.get("trial_ids", []) + [t for t in trial_ids if t not in meta.get("trial_ids", [])]
        atomic_write_json(self.path / "study.json", meta)

    def trial_records(self) -> list[TrialRecord]:
        records = []
        for trial_id in self.meta()["trial_ids"]:
            record = self.trial_record(trial_id)
            records.append(record or not_run_record(trial_id))
        return records

    def write_trials_csv(self, table: pd.DataFrame) -> Path:
        path = self.path / "trials.csv"
        try:
            atomic_write_csv(path, table)
        except OSError as exc:
            raise StoreError(f"cannot write {path}: {exc.strerror or exc}") from None
        return path
