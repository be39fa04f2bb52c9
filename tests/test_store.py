"""The study folder: never overwritten, resumed only with the same plan, schema checked;
and the atomic writes every file goes through."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pandas as pd
import pytest

from orchestrator import fsutil
from orchestrator.errors import StoreError
from orchestrator.runners.record import TrialRecord
from orchestrator.store.study import SCHEMA_VERSION, Study

PLAN = '[study]\nname = "s"\n'


def _create(results: Path, plan: str = PLAN, resume: bool = False, ids=("a", "b")) -> Study:
    return Study.create(results, "s", plan, list(ids), resume=resume)


def test_a_new_study_holds_the_plan_as_run_and_its_trial_ids(tmp_path):
    study = _create(tmp_path)
    assert (study.path / "plan.toml").read_text() == PLAN
    meta = study.meta()
    assert meta["schema_version"] == SCHEMA_VERSION and meta["trial_ids"] == ["a", "b"]
    assert [r.status for r in study.trial_records()] == ["not_run", "not_run"]


def test_an_existing_study_folder_is_never_overwritten(tmp_path):
    study = _create(tmp_path)
    (study.path / "plan.toml").write_text(PLAN)  # untouched by the refused second create
    with pytest.raises(StoreError, match="already exists.*--resume"):
        _create(tmp_path)
    assert study.meta()["trial_ids"] == ["a", "b"]


def test_resume_needs_the_folder_and_the_same_plan(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        _create(tmp_path, resume=True)
    _create(tmp_path)
    with pytest.raises(StoreError, match="plan differs"):
        _create(tmp_path, plan=PLAN + "# one more line\n", resume=True)
    resumed = _create(tmp_path, resume=True, ids=("a", "c"))
    meta = resumed.meta()
    assert meta["trial_ids"] == ["a", "c", "b"]  # trials known before are kept
    assert len(meta["resumed_wall"]) == 1


@pytest.mark.parametrize("version", [None, SCHEMA_VERSION + 1, "1"])
def test_a_study_of_another_schema_version_is_refused(tmp_path, version):
    study = _create(tmp_path)
    meta = study.meta()
    if version is None:
        del meta["schema_version"]
    else:
        meta["schema_version"] = version
    (study.path / "study.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="schema"):
        study.meta()
    with pytest.raises(StoreError, match="schema"):
        _create(tmp_path, resume=True)


def test_not_a_study_folder_and_a_corrupt_study_json(tmp_path):
    with pytest.raises(StoreError, match="not a study folder"):
        Study(tmp_path).meta()
    (tmp_path / "study.json").write_text("{")
    with pytest.raises(StoreError, match="corrupt"):
        Study(tmp_path).meta()


def test_a_trial_is_finished_only_once_its_trial_json_says_ok(tmp_path):
    study = _create(tmp_path)
    frames = {"ksm": pd.DataFrame({"t_s": [0.0, 1.0]}), "empty": pd.DataFrame()}
    folder = study.write_trial("a", TrialRecord(trial_id="a", status="failed"), frames)
    assert (folder / "ksm.csv").is_file() and not (folder / "empty.csv").exists()
    assert not study.is_finished("a")
    study.write_trial("a", TrialRecord(trial_id="a", status="ok"), {})
    (study.trial_dir("b")).mkdir()
    (study.trial_dir("b") / "trial.json").write_text('{"status": "ok"')  # cut short
    assert study.is_finished("a") and not study.is_finished("b")


def test_atomic_write_replaces_whole_and_leaves_no_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "x.json"
    fsutil.atomic_write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    assert stat.S_IMODE(target.stat().st_mode) == 0o644

    def refuse(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        fsutil.atomic_write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_atomic_copy_sets_the_mode(tmp_path):
    source = tmp_path / "layer.qcow2"
    source.write_bytes(b"q" * 100_000)
    fsutil.atomic_copy(source, tmp_path / "copy.qcow2", mode=0o444)
    assert (tmp_path / "copy.qcow2").read_bytes() == source.read_bytes()
    assert stat.S_IMODE((tmp_path / "copy.qcow2").stat().st_mode) == 0o444
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.qcow2", "layer.qcow2"]


def test_an_earlier_attempt_is_set_aside_whole_before_the_trial_runs_again(tmp_path):
    study = _create(tmp_path)
    assert study.set_aside_attempt("a") is None  # never ran: nothing to move
    study.write_trial("a", TrialRecord(trial_id="a", status="failed"), {"ksm": pd.DataFrame({"t_s": [0.0]})})
    (study.trial_dir("a") / "ksmtuned.log").write_text("old attempt's log\n")
    first = study.set_aside_attempt("a")
    assert first == study.path / "attempts" / "a.1"
    assert sorted(p.name for p in first.iterdir()) == ["ksm.csv", "ksmtuned.log", "trial.json"]
    assert not study.trial_dir("a").exists() and study.trial_record("a") is None
    study.write_trial("a", TrialRecord(trial_id="a", status="failed"), {})
    assert study.set_aside_attempt("a") == study.path / "attempts" / "a.2"  # never overwrites a.1
    assert (first / "ksmtuned.log").read_text() == "old attempt's log\n"
    assert [r.status for r in study.trial_records()] == ["not_run", "not_run"]


def test_study_json_records_the_run_order_and_keeps_it_on_resume(tmp_path):
    from orchestrator.plan import parse_plan, run_order

    workload = '[workload]\ntype = "processes"\n'
    assert run_order(parse_plan(PLAN + "repetitions = 3\n" + workload)) == "blocked"
    assert run_order(parse_plan(PLAN + 'repetitions = 3\norder = "sequential"\n' + workload)) == "sequential"
    study = Study.create(tmp_path, "s", PLAN, ["a"], resume=False, order="shuffled")
    assert study.meta()["order"] == "shuffled"
    again = Study.create(tmp_path, "s", PLAN, ["a"], resume=True, order="shuffled")
    assert again.meta()["order"] == "shuffled"
