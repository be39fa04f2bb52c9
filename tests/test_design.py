"""`design`: blocks sized on a pilot's paired differences, and one-line errors for bad input."""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

import pytest

from orchestrator.analysis import design, stats, studymetrics
from orchestrator.cli import main as cli
from orchestrator.plan import StudySection
from tests.builders import finish_study, ramp_ksm_frame, start_study, sysbench_trial, write_trial

ON = {"threads": 1, "ksm.pages_to_scan": 1000}
OFF = {"threads": 1}
TRIAL_S = 120.0


def timed(block: int) -> dict[str, float]:
    start = 1_700_000_000.0 + 1000 * block
    return {"started_wall": start, "ended_wall": start + TRIAL_S}


def pilot(root: Path, on_tps: list[float], off_tps: list[list[float]]) -> Path:
    """One KSM-on setting per block (on_tps[b]) and its KSM-off trial(s) (off_tps[b]); trials.csv
    written as sweep writes it (the public trials table)."""
    study_dir = start_study(root)
    for block, (on, offs) in enumerate(zip(on_tps, off_tps, strict=True)):
        for i, off in enumerate(offs):
            sysbench_trial(
                study_dir, f"off-r{block}-{i}", OFF, off, rep=block, ksm_off=True, guest_spread=0.0, extra=timed(block)
            )
        sysbench_trial(study_dir, f"on-r{block}", ON, on, rep=block, guest_spread=0.0, extra=timed(block))
    finish_study(study_dir)
    studymetrics.study_metrics(study_dir).to_csv(study_dir / "trials.csv", index=False)
    return study_dir


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(["design", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_blocks_for_the_target_from_the_paired_differences(tmp_path: Path) -> None:
    # per block -10%, -14.12%, -5.46%: sd of the differences 4.34%, dof 2
    off = [100.0, 104.8, 95.2]
    result = design.design_study(pilot(tmp_path, [90.0] * 3, [[o] for o in off]), 5.0)
    sd = stats.pooled_sd([[100 * (90 - o) / o for o in off]])[0]
    assert result.pilot.sd_d_pct == pytest.approx(sd) and result.pilot.sd_dof == 2
    assert math.isnan(result.pilot.trial_sd_pct) and result.design_sd_pct == pytest.approx(sd)
    assert result.blocks == stats.blocks_needed_expected(sd, 2, 5.0)
    assert result.blocks_if_sd_as_measured == stats.blocks_needed(sd, 5.0) <= result.blocks
    assert result.blocks_range[0] <= result.blocks_if_sd_as_measured <= result.blocks_range[1]
    assert result.mde_pct <= 5.0
    assert result.trials == result.blocks * 2  # KSM off + one setting per block
    assert result.wall_s == pytest.approx(result.trials * TRIAL_S)
    study = tomllib.loads(result.plan_toml)["study"]  # the plan's own model accepts the snippet
    assert StudySection(name="sized", **study).repetitions == result.blocks


def test_replicated_ksm_off_trials_give_the_trial_level_part(tmp_path: Path) -> None:
    # two KSM-off trials per block, 98 and 102 around a block mean of 100: trial sd 2.83%
    study_dir = pilot(tmp_path, [90.0, 92.0, 88.0], [[98.0, 102.0]] * 3)
    p = design.design_study(study_dir, 5.0).pilot
    assert p.trial_sd_pct == pytest.approx(2 * math.sqrt(2)) and p.trial_dof == 3
    assert p.trial_weight == pytest.approx(1 + 1 / 2)
    # differences -10, -8, -12: sd 2; T2^2 = 4 - 8 * 1.5 < 0 -> 0; one trial per side: sqrt(2 * 8)
    assert p.block_sd_pct == 0.0 and p.design_sd_pct == pytest.approx(4.0)


def test_text_and_json_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study_dir = pilot(tmp_path, [90.0, 88.0, 93.0], [[100.0], [104.8], [95.2]])
    code, out, _ = run_cli(capsys, str(study_dir), "--detect", "5%")
    assert code == 0 and "a 5% tps change at 80% power needs" in out and "[study]\nrepetitions = " in out
    code, out, _ = run_cli(capsys, str(study_dir), "--detect", "5", "--json")
    data = json.loads(out)
    assert code == 0 and data["target_pct"] == 5.0 and data["blocks"] >= 2 and "repetitions =" in data["plan_toml"]


@pytest.mark.parametrize(
    ("make", "detect", "message"),
    [
        (lambda root: pilot(root, [90.0], [[100.0]]), "5%", "the pilot has 1 block: a paired design needs"),
        (lambda root: root / "empty", "5%", "has no trials.csv"),
        (lambda root: pilot(root, [90.0, 91.0], [[100.0], [101.0]]), "0%", "give the change to detect as a positive"),
        (lambda root: pilot(root, [90.0, 91.0], [[100.0], [101.0]]), "-5%", "positive percent"),
        (lambda root: pilot(root, [90.0, 91.0], [[100.0], [101.0]]), "five", "positive percent"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make, detect: str, message: str
) -> None:
    study_dir = make(tmp_path)
    study_dir.mkdir(exist_ok=True)
    code, out, err = run_cli(capsys, str(study_dir), f"--detect={detect}")
    assert code == 2 and out == ""
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_pilot_without_ksm_off_trials_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study_dir = start_study(tmp_path)
    for block in (0, 1):
        sysbench_trial(study_dir, f"on-r{block}", ON, 90.0, rep=block)
    finish_study(study_dir)
    studymetrics.study_metrics(study_dir).to_csv(study_dir / "trials.csv", index=False)
    code, _, err = run_cli(capsys, str(study_dir), "--detect", "5%")
    assert code == 2 and "no usable KSM-off trials" in err and len(err.strip().splitlines()) == 1


def test_a_pilot_without_the_metric_names_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # a processes study: KSM off and on in two blocks, but no tps to compare
    study_dir = start_study(tmp_path)
    for block in (0, 1):
        write_trial(
            study_dir, f"off-r{block}", OFF, repetition=block, ksm_off=True, ksm=ramp_ksm_frame(final_sharing=0)
        )
        write_trial(study_dir, f"on-r{block}", ON, repetition=block, ksm=ramp_ksm_frame())
    finish_study(study_dir)
    studymetrics.study_metrics(study_dir).to_csv(study_dir / "trials.csv", index=False)
    code, _, err = run_cli(capsys, str(study_dir), "--detect", "5%")
    assert code == 2 and "no tps compared with KSM off in 2 or more blocks" in err
    code, _, err = run_cli(capsys, str(study_dir), "--detect", "5%", "--metric", "saved")
    assert code == 2 and "--metric 'saved': one of tps, qps, latency_p95_ms" in err


def test_a_pilot_run_in_sequential_order_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.builders import with_order

    study_dir = with_order(pilot(tmp_path, [95.0, 96.0, 94.0], [[100.0], [101.0], [99.0]]), "sequential")
    code, _, err = run_cli(capsys, str(study_dir), "--detect", "5%")
    assert code == 2 and "sequential order" in err and len(err.strip().splitlines()) == 1
    with_order(study_dir, "blocked")
    assert run_cli(capsys, str(study_dir), "--detect", "5%")[0] == 0
