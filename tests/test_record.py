"""trial.json's one model (orchestrator/runners/record.py): written by the sweep, read back the
same; a schema version this ksm-lab does not read refused in one line; a study written before
the model (tests/data/study-v1-quickstart: plans/quickstart.toml run by the code before it)
still reads and reports the same numbers."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from pydantic import ValidationError

from orchestrator.cli import main as cli
from orchestrator.errors import StoreError
from orchestrator.plan import Trial
from orchestrator.runners.record import (
    TRIAL_SCHEMA_VERSION,
    MergeableRecord,
    PhaseTiming,
    PolicyRecord,
    ProbeRecord,
    ProvisionRecord,
    SamplerRecord,
    TrialRecord,
    UnknownTrialSchema,
)
from orchestrator.store.study import Study
from orchestrator.store.studydata import load_study, load_trial
from orchestrator.workloads.density import DensityRecord, Step

OLD_STUDY = Path(__file__).parent / "data" / "study-v1-quickstart"


def full_record() -> TrialRecord:
    """A record with every part set, values chosen to be told apart."""
    return TrialRecord(
        trial_id="t-1",
        index=3,
        repetition=1,
        label="pages_to_scan=100",
        settings={"ksm.pages_to_scan": 100},
        ksm={"pages_to_scan": 100, "sleep_millisecs": 20},
        host={"thp": "never"},
        workload={"type": "probe", "pages": 64},
        guests=None,
        kind="probe",
        ksm_off=False,
        rerun_of="t-0",
        rerun_in_block=True,
        search_reason="low end",
        status="ok",
        reason=None,
        started_wall=1_700_000_000.5,
        reset_unmerge_s=0.012,
        ksm_applied={"pages_to_scan": "100"},
        outside_cpu_pct=3.25,
        outside_load_max_pct=25.0,
        disturbed=False,
        policy=PolicyRecord.model_validate({"name": "kubevirt", "ksm_turned_on": True, "steps": [{"running": True}]}),
        timings={"measure": PhaseTiming(start_wall=1_700_000_001.0, end_wall=1_700_000_011.0, duration_s=10.0)},
        ended_wall=1_700_000_020.0,
        provision=ProvisionRecord.model_validate(
            {"start": "restore", "start_s": 4.5, "state": "abc", "restore_s": {"vm0": 1.5}}
        ),
        mergeable={
            "vm0": MergeableRecord(
                pid=42, big_mappings=1, mergeable_mappings=1, big_kib=1024.0, mergeable_kib=1024.0, mergeable=True
            )
        },
        probe=ProbeRecord(
            pages=64,
            fill="same",
            merged_pages=60,
            merge_target_reached=True,
            merge_wall_s=0.25,
            unmerge_s=0.004,
            pages_before_unmerge=64,
            pages_sharing_after_unmerge=0,
        ),
        density=DensityRecord(
            steps=[Step(0, 0.0, 9000.0, 0.0, 0.0, True, 0.0), Step(2, 800.0, 8000.0, 5.0, 18.0, False, 9e4)],
            stop_reason="budget",
        ),
        steady_wait_s=3.2,
        steady_timed_out=False,
        steady_slopes_mib_per_min={"rss": 0.4},
        converged_by_rule=False,
        rounds_done=2,
        sampler=SamplerRecord(error_count=1, last_error="OSError()", pss_age_max_s={"proc-0": 2.5}),
    )


def test_a_written_record_reads_back_the_same(tmp_path: Path) -> None:
    study = Study.create(tmp_path, "s", "", ["t-1"], False)
    record = full_record()
    folder = study.write_trial("t-1", record, {})
    stored = json.loads((folder / "trial.json").read_text())
    assert stored["schema_version"] == TRIAL_SCHEMA_VERSION == 2
    # the keys the readers have always used, in the file as they were
    assert stored["status"] == "ok" and stored["probe"]["unmerge_s"] == 0.004 and stored["search_reason"] == "low end"
    assert stored["reset_unmerge_s"] == 0.012 and "unmerge_s" not in stored
    assert stored["policy"]["steps"] == [{"running": True}]  # a policy's own keys kept
    assert stored["provision"]["restore_s"] == {"vm0": 1.5}
    assert stored["density"]["steps"][1] == {
        "guests": 2,
        "guests_pss_mib": 800.0,
        "mem_available_mib": 8000.0,
        "ksmd_cpu_pct": 5.0,
        "tps_per_guest": 18.0,
        "converged": False,
        "pages_sharing": 9e4,
    }
    assert study.trial_record("t-1") == record
    assert load_trial(folder).trial == record


def test_parts_a_runner_did_not_produce_are_left_out(tmp_path: Path) -> None:
    stored = TrialRecord(trial_id="x", status="failed", reason="boom").to_json()
    for absent in ("probe", "provision", "density", "sampler", "policy", "search_reason", "steady_wait_s"):
        assert absent not in stored
    assert stored["reason"] == "boom" and stored["rerun_of"] is None  # always-written keys stay, null or not


@pytest.mark.parametrize(
    ("version", "words"), [(3, "newer schema 3"), (0, "older schema 0"), ("2", "unknown schema '2'")]
)
def test_an_unknown_schema_is_refused_naming_both_versions(version: object, words: str) -> None:
    with pytest.raises(UnknownTrialSchema) as caught:
        TrialRecord.from_json({"schema_version": version, "trial_id": "x"}, "a/trial.json")
    assert str(caught.value) == f"a/trial.json: {words}, this ksm-lab reads 2"


def old_study(tmp_path: Path) -> Path:
    study = tmp_path / "quickstart"
    shutil.copytree(OLD_STUDY, study)
    return study


def test_report_refuses_a_newer_trial_schema_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study = old_study(tmp_path)
    path = next(iter(sorted((study / "trials").glob("*/trial.json"))))
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "schema_version": 3}))
    assert cli.main(["report", str(study)]) == 2
    out = capsys.readouterr()
    text = (out.out + out.err).strip()
    assert len(text.splitlines()) == 1, text
    assert f"{path}: newer schema 3, this ksm-lab reads 2" in text and "Traceback" not in text
    assert not (study / "report" / "report.html").exists()


def test_a_study_written_before_the_model_reports_the_numbers_it_did(tmp_path: Path) -> None:
    """The old code's trials.csv is the known answer: the new readers compute the same."""
    study = old_study(tmp_path)
    raw = [json.loads(p.read_text()) for p in sorted((study / "trials").glob("*/trial.json"))]
    assert raw and all("schema_version" not in r and "unmerge_s" in r for r in raw)  # really version 1
    records = Study(study).trial_records()
    assert {r.trial_id: r.reset_unmerge_s for r in records} == {r["trial_id"]: r["unmerge_s"] for r in raw}
    assert all(r.schema_version == 2 and r.status == "ok" and r.sampler is not None for r in records)

    from orchestrator.analysis.studymetrics import StudyAnalysis, public_trials_table

    old = pd.read_csv(study / "trials.csv").set_index("trial_id").sort_index()
    new = public_trials_table(StudyAnalysis.of(study).metrics).set_index("trial_id").sort_index()
    assert list(new.index) == list(old.index)
    compared = 0
    for column in old.columns:
        if column not in new.columns or not pd.api.types.is_numeric_dtype(old[column]):
            continue
        values = pd.to_numeric(new[column], errors="coerce").astype(float)
        assert values.to_numpy() == pytest.approx(old[column].astype(float).to_numpy(), rel=1e-9, nan_ok=True), column
        compared += 1
    assert compared > 30
    assert cli.main(["report", str(study)]) == 0
    assert (study / "report" / "report.html").exists()


def test_a_record_has_no_spread_fields_that_could_overwrite_its_own() -> None:
    """Trial.extra (spread last into the record) could set "status"; the search's reason is
    now a typed field, and the record refuses keys it does not name."""
    assert "extra" not in {f.name for f in dataclasses.fields(Trial)}
    assert "search_reason" in {f.name for f in dataclasses.fields(Trial)}
    record = TrialRecord(trial_id="x", status="failed", search_reason="status=ok")
    assert record.to_json()["status"] == "failed"
    with pytest.raises(ValidationError):
        TrialRecord.model_validate({"trial_id": "x", "status": "ok", "surprise": 1})
    with pytest.raises(ValidationError):
        TrialRecord(trial_id="x", status="done")  # type: ignore[arg-type]


def test_a_record_the_model_cannot_read_is_noted_not_fatal(tmp_path: Path) -> None:
    """A trial.json of a known version in a shape the model refuses: that trial is reported
    not run, with the reason, and the rest of the study still reads."""
    study = old_study(tmp_path)
    paths = sorted((study / "trials").glob("*/trial.json"))
    data = json.loads(paths[0].read_text())
    paths[0].write_text(json.dumps({**data, "status": 7}))
    loaded = load_study(study)
    bad = next(t for t in loaded.trials if t.trial_dir == paths[0].parent)
    assert bad.trial.status == "not_run" and "schema 1 in a shape" in bad.trial.reason and "status" in bad.trial.reason
    assert sum(t.trial.status == "ok" for t in loaded.trials) == len(paths) - 1
    assert Study(study).trial_record(paths[0].parent.name) is None  # resume runs it again
    with pytest.raises(StoreError):
        TrialRecord.from_json([1, 2], "x")
