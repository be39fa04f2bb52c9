"""orchestrator.analysis' metrics (samplemetrics, trialmetrics, studymetrics) on small hand-made
studies whose right answers are known (the study builders are tests/builders.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from orchestrator.analysis import samplemetrics, stats, studymetrics, trialmetrics
from orchestrator.store import studydata
from orchestrator.errors import StoreError
from tests.builders import (
    MIB,
    PAGE,
    block_study,
    computed,
    disturbed_study,
    drift_study,
    family_study,
    finish_study,
    guests_summary,
    processes_frame,
    ramp_ksm_frame,
    start_study,
    sweep_study,
    sysbench_trial,
    with_order,
    write_trial,
)


# ----------------------------------------------------------------------------- one trial


@pytest.fixture()
def ramp_trial(tmp_path: Path) -> Path:
    study = start_study(tmp_path)
    ksm = ramp_ksm_frame()
    trial_dir = write_trial(study, "t0", {"pages_to_scan": 100}, ksm=ksm, processes=processes_frame(ksm))
    finish_study(study)
    return trial_dir


def test_linear_ramp_saving_four_ways(ramp_trial: Path) -> None:
    m = trialmetrics.trial_metrics(ramp_trial)
    assert m["saved_mib"] == pytest.approx(3.90625)  # 1000 pages x 4 KiB
    assert m["general_profit_mib"] == pytest.approx((1000 * PAGE - 2000 * 64) / MIB)
    assert m["pss_drop_mib"] == pytest.approx(3.90625)
    assert m["mem_available_rise_mib"] == pytest.approx(3.90625)
    assert m["profit_to_saving_ratio"] == pytest.approx(1 - 2000 * 64 / (1000 * PAGE))


def test_linear_ramp_convergence_times_and_scans(ramp_trial: Path) -> None:
    m = trialmetrics.trial_metrics(ramp_trial)
    assert m["time_to_50pct_s"] == 5.0
    assert m["time_to_90pct_s"] == 9.0
    assert m["time_to_99pct_s"] == 10.0
    assert m["full_scans_to_90pct"] == 4.0  # one full scan per 2 s
    assert m["full_scans"] == 5.0
    assert m["converged"] is False  # still climbing 10%/s in its last 5 samples


def test_plateau_is_converged(tmp_path: Path) -> None:
    study = start_study(tmp_path)
    trial_dir = write_trial(study, "t0", {}, ksm=ramp_ksm_frame(plateau=True))
    m = trialmetrics.trial_metrics(trial_dir)
    assert m["converged"] is True
    assert m["time_to_99pct_s"] == 0.0


def test_converged_column_uses_the_plans_tolerance(tmp_path: Path) -> None:
    """A plateau whose last sample dips 1.5%: not converged at the default 1%, converged when
    the study's plan allows 2% (the tolerance until_converged stopped on)."""
    ksm = ramp_ksm_frame(plateau=True)
    ksm.loc[ksm.index[-1], "pages_sharing"] = 985
    strict = start_study(tmp_path, "strict")
    loose = start_study(tmp_path, "loose", plan='[study]\nname = "loose"\n[phases]\nconverge_tolerance_pct = 2.0\n')
    for study_dir in (strict, loose):
        write_trial(study_dir, "t0", {}, ksm=ksm)
        finish_study(study_dir)
    sm_strict = studymetrics.compute_study(studydata.load_study(strict))
    sm_loose = studymetrics.compute_study(studydata.load_study(loose))
    assert sm_strict.converge_tolerance_pct == 1.0 and sm_loose.converge_tolerance_pct == 2.0
    assert sm_strict.trials["converged"].tolist() == [False]
    assert sm_loose.trials["converged"].tolist() == [True]


def test_nothing_merged_is_not_converged(tmp_path: Path) -> None:
    """pages_sharing flat at 0 all through measure: KSM had not begun, not converged."""
    study = start_study(tmp_path)
    trial_dir = write_trial(study, "t0", {}, ksm=ramp_ksm_frame(final_sharing=0, plateau=True))
    assert trialmetrics.trial_metrics(trial_dir)["converged"] is False


def test_ksmd_cost_from_cpu_seconds(ramp_trial: Path) -> None:
    m = trialmetrics.trial_metrics(ramp_trial)
    assert m["ksmd_cpu_pct"] == pytest.approx(5.0)
    assert m["ksmd_cpu_pct_max"] == pytest.approx(5.0)
    assert m["ksmd_cpu_s"] == pytest.approx(0.5)
    assert m["mib_saved_per_ksmd_cpu_s"] == pytest.approx(3.90625 / 0.5)


def test_overheads_and_side_effects(ramp_trial: Path) -> None:
    m = trialmetrics.trial_metrics(ramp_trial)
    assert m["rmap_items_per_merging_page"] == pytest.approx(2.0)
    assert m["ksm_merging_pages"] == 1000
    assert m["cow_ksm_delta"] == 2
    assert m["thp_split_page_delta"] == 3
    assert m["pages_volatile_share"] == pytest.approx(100 / 1400)
    assert m["pages_unshared_share"] == pytest.approx(200 / 1400)


def test_per_process_before_after(ramp_trial: Path) -> None:
    per_proc = trialmetrics.trial_metrics(ramp_trial)["per_process"].set_index("label")
    assert per_proc.loc["proc-0", "pss_before_kib"] == 8000
    assert per_proc.loc["proc-0", "pss_after_kib"] == 6000
    assert per_proc.loc["proc-1", "ksm_merging_pages"] == 500
    assert per_proc.loc["proc-1", "ksm_process_profit_mib"] == pytest.approx((500 * PAGE - 64000) / MIB)


def test_zero_pages_count_only_when_use_zero_pages_was_on(tmp_path: Path) -> None:
    study = start_study(tmp_path)
    ksm = ramp_ksm_frame(zero_pages=256)
    on = write_trial(study, "zero-on", {}, ksm=ksm, ksm_knobs={"run": 1, "use_zero_pages": 1})
    off = write_trial(study, "zero-off", {}, ksm=ksm, ksm_knobs={"run": 1, "use_zero_pages": 0})
    assert trialmetrics.trial_metrics(on)["saved_mib"] == pytest.approx(3.90625 + 1.0)
    assert trialmetrics.trial_metrics(off)["saved_mib"] == pytest.approx(3.90625)


def test_pss_baseline_falls_back_to_first_pss_row_without_baseline_phase(tmp_path: Path) -> None:
    study = start_study(tmp_path)
    ksm = ramp_ksm_frame(baseline_s=0)
    trial_dir = write_trial(study, "t0", {}, ksm=ksm, processes=processes_frame(ksm))
    m = trialmetrics.trial_metrics(trial_dir)
    assert m["pss_drop_mib"] == pytest.approx(3.90625)
    assert m["mem_available_rise_mib"] == pytest.approx(3.90625)


def test_failed_trial_has_status_and_no_metrics(tmp_path: Path) -> None:
    study = start_study(tmp_path)
    trial_dir = write_trial(study, "bad", {}, status="failed", reason="guest vm0 never answered SSH")
    m = trialmetrics.trial_metrics(trial_dir)
    assert (m["status"], m["reason"]) == ("failed", "guest vm0 never answered SSH")
    assert "saved_mib" not in m


# ----------------------------------------------------------------------------- study level


def test_study_metrics_one_row_per_trial_with_ci(tmp_path: Path) -> None:
    study_dir = sweep_study(tmp_path)
    table = studymetrics.study_metrics(study_dir)
    assert len(table) == 4
    assert set(table["setting"]) == {"pages_to_scan=100", "pages_to_scan=1000"}
    sm = studymetrics.compute_study(studydata.load_study(study_dir))
    assert sm.swept_axes == ["pages_to_scan"]
    row = sm.settings.set_index("setting").loc["pages_to_scan=1000"]
    saved = np.array([1000, 1040]) * PAGE / MIB
    assert row["saved_mib"] == pytest.approx(saved.mean())
    assert row["saved_mib_ci95"] == pytest.approx(12.7062 * saved.std(ddof=1) / math.sqrt(2))
    assert row["ksmd_cpu_pct"] == pytest.approx(10.5)


def test_study_with_failed_and_unrun_trials(tmp_path: Path) -> None:
    study_dir = start_study(tmp_path)
    write_trial(study_dir, "good", {"pages_to_scan": 100}, ksm=ramp_ksm_frame())
    write_trial(study_dir, "bad", {"pages_to_scan": 1000}, status="failed", reason="sysbench prepare failed")
    finish_study(study_dir)
    study = json.loads((study_dir / "study.json").read_text())
    study["trial_ids"].append("never-ran")
    (study_dir / "study.json").write_text(json.dumps(study))
    table = studymetrics.study_metrics(study_dir).set_index("trial_id")
    assert table.loc["good", "saved_mib"] == pytest.approx(3.90625)
    assert table.loc["bad", "status"] == "failed"
    assert math.isnan(table.loc["bad", "saved_mib"])
    assert table.loc["never-ran", "status"] == "not_run"


def test_all_failed_study_still_has_metric_columns(tmp_path: Path) -> None:
    study_dir = start_study(tmp_path)
    write_trial(study_dir, "bad", {}, status="failed", reason="boom")
    table = studymetrics.study_metrics(finish_study(study_dir))
    assert table["saved_mib"].isna().all()


def test_not_a_study_folder_raises_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError):
        studydata.load_study(tmp_path)


def test_workload_deltas_against_matched_ksm_off_baseline(tmp_path: Path) -> None:
    study_dir = start_study(tmp_path)
    ksm = ramp_ksm_frame()
    for rep, (a, b) in enumerate(((100.0, 104.0), (98.0, 102.0))):
        write_trial(
            study_dir,
            f"off-r{rep}",
            {"threads": 1},
            ksm_off=True,
            repetition=rep,
            kind="sysbench",
            ksm=ksm,
            workload_summary=guests_summary(a, b, p95_ms=20.0),
        )
        write_trial(
            study_dir,
            f"on-r{rep}",
            {"threads": 1, "pages_to_scan": 1000},
            repetition=rep,
            kind="sysbench",
            ksm=ksm,
            workload_summary=guests_summary(a * 0.9, b * 0.9, p95_ms=25.0),
        )
    # an unmatched KSM-off trial with other threads must not be used as the baseline
    write_trial(
        study_dir,
        "off-t4",
        {"threads": 4},
        ksm_off=True,
        kind="sysbench",
        ksm=ksm,
        workload_summary=guests_summary(400.0, 400.0),
    )
    sm = studymetrics.compute_study(studydata.load_study(finish_study(study_dir)))
    trials = sm.trials.set_index("trial_id")
    assert trials.loc["on-r0", "tps"] == pytest.approx(0.9 * 102.0)
    # vs the KSM-off trial of its own block (102 tps), not the mean over blocks
    assert trials.loc["on-r0", "baseline"] == "same block"
    assert trials.loc["on-r0", "tps_vs_off_pct"] == pytest.approx(-10.0)
    assert trials.loc["on-r0", "latency_p95_ms_vs_off_pct"] == pytest.approx(25.0)
    row = sm.settings.set_index("setting").loc["threads=1"]  # pages_to_scan has one value: not swept
    trial_tps = np.array([102.0, 100.0]) * 0.9  # one value per trial: its guests' mean
    assert row["tps_n"] == 2
    assert row["tps_ci95"] == pytest.approx(12.7062 * trial_tps.std(ddof=1) / math.sqrt(2))
    assert row["tps_guest_sd"] == pytest.approx(0.9 * np.std([100.0, 104.0], ddof=1))
    assert row["tps_vs_off_pct"] == pytest.approx(-10.0)
    assert (row["tps_vs_off_method"], row["tps_vs_off_n"]) == ("paired by block", 2)
    assert row["tps_vs_off_ci95_pct"] == pytest.approx(0.0)  # -10% in both blocks


def test_workload_from_interval_rows_without_summary(tmp_path: Path) -> None:
    study_dir = start_study(tmp_path)
    workload = pd.DataFrame(
        {
            "guest": ["vm0", "vm0", "vm1", "vm1"],
            "t_s": [10, 20, 10, 20],
            "threads": 1,
            "tps": [10.0, 12.0, 20.0, 22.0],
            "qps": [200.0, 240, 400, 440],
            "latency_p95_ms": [30.0, 40.0, 50.0, 60.0],
        }
    )
    trial_dir = write_trial(study_dir, "t0", {}, kind="sysbench", ksm=ramp_ksm_frame(), workload=workload)
    m = trialmetrics.trial_metrics(trial_dir)
    assert m["tps"] == pytest.approx(16.0)
    assert m["latency_p95_ms"] == pytest.approx(45.0)


def test_samples_table_is_long_form_with_settings(tmp_path: Path) -> None:
    study_dir = sweep_study(tmp_path)
    study = studydata.load_study(study_dir)
    samples = studymetrics.samples_arrow(study, studymetrics.compute_study(study)).to_pandas()
    assert len(samples) == 4 * len(ramp_ksm_frame())
    assert {"trial_id", "setting_pages_to_scan", "pages_sharing", "t_s", "phase"} <= set(samples.columns)
    by_trial = samples.groupby("trial_id", observed=True)["setting_pages_to_scan"].first()
    assert by_trial["p1000-r1"] == 1000


def test_truncated_csv_is_reported_not_fatal(tmp_path: Path) -> None:
    study_dir = start_study(tmp_path)
    trial_dir = write_trial(study_dir, "t0", {})
    (trial_dir / "ksm.csv").write_bytes(b"")
    m = trialmetrics.trial_metrics(trial_dir)
    assert "ksm.csv unreadable" in m["data_problems"]


def test_a_csv_that_is_not_text_is_reported_not_fatal(tmp_path: Path) -> None:
    study_dir = start_study(tmp_path)
    trial_dir = write_trial(study_dir, "t0", {})
    (trial_dir / "processes.csv").write_bytes(b"\xff\xfe\x00t_s,pss\x80\n\x81")
    m = trialmetrics.trial_metrics(trial_dir)
    assert "processes.csv unreadable" in m["data_problems"]


# ----------------------------------------------------------------------------- trial as the unit


def test_guests_that_agree_are_not_replicates(tmp_path: Path) -> None:
    """Guests of a trial agree (x and x + 0.1) but trials do not: KSM on ran 6 then 12 tps, KSM off
    10 then 9. Pooling guests would make 4 tight samples per side; the trial is the unit, so n = 2
    and no difference may be claimed."""
    sm = computed(block_study(tmp_path, on_tps=[6.0, 12.0], off_tps=[10.0, 9.0]))
    on = sm.settings[~sm.settings["ksm_off"]].iloc[0]
    assert on["tps"] == pytest.approx(9.05)
    assert on["tps_n"] == 2
    assert on["tps_ci95"] == pytest.approx(12.7062 * np.std([6.05, 12.05], ddof=1) / math.sqrt(2))
    assert on["tps_guest_sd"] == pytest.approx(np.std([6.0, 6.1], ddof=1))  # description only
    blocks = [100 * (6.05 - 10.05) / 10.05, 100 * (12.05 - 9.05) / 9.05]
    assert (on["tps_vs_off_method"], on["tps_vs_off_n"]) == ("paired by block", 2)
    assert on["tps_vs_off_pct"] == pytest.approx(np.mean(blocks))
    assert on["tps_vs_off_ci95_pct"] == pytest.approx(12.7062 * np.std(blocks, ddof=1) / math.sqrt(2))
    comparison = studymetrics.settings_comparison(on, "tps")
    assert comparison.differs is False
    assert stats.comparison_verdict(comparison) == "no difference detectable at 95% (n=2 blocks, paired)"


def test_consistent_trial_level_effect_is_claimed(tmp_path: Path) -> None:
    # -30%, -31%, -29% in three blocks: mean -30, sd 1, half = t(0.975, 2) / sqrt(3)
    sm = computed(block_study(tmp_path, on_tps=[7.0, 8.28, 5.68], off_tps=[10.0, 12.0, 8.0], guest_spread=0.0))
    on = sm.settings[~sm.settings["ksm_off"]].iloc[0]
    assert on["tps_vs_off_pct"] == pytest.approx(-30.0)
    assert on["tps_vs_off_ci95_pct"] == pytest.approx(4.3027 / math.sqrt(3), rel=1e-4)
    assert (
        stats.comparison_verdict(studymetrics.settings_comparison(on, "tps"))
        == "differs from KSM off (95% interval excludes 0; n=3 blocks, paired)"
    )
    trials = sm.trials.set_index("trial_id")
    assert trials.loc["on-r1", "baseline"] == "same block"
    assert trials.loc["on-r1", "tps_vs_off_pct"] == pytest.approx(-31.0)


def test_welch_on_trials_when_blocks_do_not_pair(tmp_path: Path) -> None:
    """KSM off ran in blocks 0 and 1, the setting in 1 and 2: one common block, so Welch."""
    study_dir = start_study(tmp_path)
    for block, tps in ((0, 9.0), (1, 11.0)):
        sysbench_trial(study_dir, f"off-r{block}", {"threads": 1}, tps, rep=block, ksm_off=True, guest_spread=0.0)
    for block, tps in ((1, 8.0), (2, 10.0)):
        sysbench_trial(study_dir, f"on-r{block}", {"threads": 1, "ksm.run": 1}, tps, rep=block, guest_spread=0.0)
    sm = computed(finish_study(study_dir))
    on = sm.settings[~sm.settings["ksm_off"]].iloc[0]
    assert (on["tps_vs_off_method"], on["tps_vs_off_n"]) == ("Welch", 4)
    assert on["tps_vs_off_pct"] == pytest.approx(-10.0)
    assert on["tps_vs_off_ci95_pct"] == pytest.approx(100 * 4.3027 * math.sqrt(2) / 10, rel=1e-4)  # Welch df = 2
    trials = sm.trials.set_index("trial_id")
    assert trials.loc["on-r2", "baseline"] == "matched"  # no KSM-off trial in block 2: mean of both (10)
    assert trials.loc["on-r2", "tps_vs_off_pct"] == pytest.approx(0.0)


def test_one_repetition_has_no_interval(tmp_path: Path) -> None:
    sm = computed(block_study(tmp_path, on_tps=[9.0], off_tps=[10.0], guest_spread=0.0))
    on = sm.settings[~sm.settings["ksm_off"]].iloc[0]
    assert (on["tps_vs_off_method"], on["tps_vs_off_n"]) == ("none", 1)
    assert on["tps_vs_off_pct"] == pytest.approx(-10.0)
    assert math.isnan(on["tps_vs_off_ci95_pct"]) and math.isnan(on["tps_ci95"])
    assert sm.blocks == 1
    assert (
        stats.comparison_verdict(studymetrics.settings_comparison(on, "tps"), one_repetition=True)
        == "one repetition: this study cannot tell workload differences from noise"
    )


# ----------------------------------------------------------------------------- noise floor


def test_noise_floor_of_a_blocked_study_is_paired(tmp_path: Path) -> None:
    # per block: 90 vs 100, 90 vs 104.8, 90 vs 95.2 -> -10%, -14.12%, -5.46%
    off = [100.0, 104.8, 95.2]
    study_dir = block_study(tmp_path, on_tps=[90.0, 90.0, 90.0], off_tps=off, guest_spread=0.0)
    sysbench_trial(study_dir, "off-t4", {"threads": 4}, 300.0, ksm_off=True)  # once, no pairs: unpaired
    sm = computed(finish_study(study_dir))
    noise = sm.noise.set_index(["group", "metric"])
    tps = noise.loc[("KSM off, threads=1", "tps")]
    differences = [100 * (90 - o) / o for o in off]
    sd = np.std(differences, ddof=1)
    assert (tps["design"], tps["n_blocks"], tps["sd_dof"], tps["sd_unit"]) == ("paired by block", 3, 2, "%")
    assert tps["sd"] == pytest.approx(sd)
    assert (tps["sd_low"], tps["sd_high"]) == (
        pytest.approx(sd * math.sqrt(2 / 7.3778), rel=1e-4),
        pytest.approx(sd * math.sqrt(2 / 0.05064), rel=1e-3),
    )
    # the paired mde has 80% power in a paired t test over 3 blocks (dof 2)
    assert stats.t_test_power(tps["mde"] / (sd / math.sqrt(3)), 2) == pytest.approx(0.80, abs=1e-6)
    assert tps["mde_pct_of_mean"] == tps["mde"]
    assert tps["repetitions_for_5pct"] == stats.blocks_needed(sd, 5.0)
    assert tps["repetitions_for_5pct_low"] <= tps["repetitions_for_5pct"] <= tps["repetitions_for_5pct_high"]
    assert noise.loc[("KSM off, threads=1", "latency_p95_ms"), "sd"] == 0.0
    memory = noise.loc[("KSM off, threads=1", "mem_available_rise_mib")]
    assert memory["sd_unit"] == "MiB" and math.isnan(memory["repetitions_for_5pct"])
    single = noise.loc[("KSM off, threads=4", "tps")]
    assert single["design"] == "unpaired"
    assert single["n_trials"] == 1 and math.isnan(single["sd"]) and math.isnan(single["mde"])


def test_noise_floor_without_pairs_is_unpaired(tmp_path: Path) -> None:
    # KSM off in three blocks, the setting in one: no setting shares 2 blocks with KSM off
    study_dir = start_study(tmp_path)
    for block, tps in enumerate((100.0, 104.8, 95.2)):
        sysbench_trial(study_dir, f"off-r{block}", {"threads": 1}, tps, rep=block, ksm_off=True, guest_spread=0.0)
    sysbench_trial(study_dir, "on-r0", {"threads": 1, "ksm.pages_to_scan": 1000}, 90.0, rep=0, guest_spread=0.0)
    sm = computed(finish_study(study_dir))
    tps = sm.noise.set_index("metric").loc["tps"]
    assert (tps["design"], tps["n_trials"], tps["sd_unit"]) == ("unpaired", 3, "tps")
    assert (tps["mean"], tps["sd"], tps["cv_pct"]) == (pytest.approx(100.0), pytest.approx(4.8), pytest.approx(4.8))
    mde = tps["mde"]  # n = 3 per setting: a two-sample test with df 4
    assert stats.t_test_power(mde / (4.8 * math.sqrt(2 / 3)), 4) == pytest.approx(0.80, abs=1e-6)
    assert tps["mde_pct_of_mean"] == pytest.approx(mde)  # mean 100
    assert tps["repetitions_for_5pct"] == stats.repetitions_needed(4.8, 5.0)
    assert stats.minimum_detectable_effect(4.8, tps["repetitions_for_5pct"] - 1) > 5.0


def test_drifting_blocks_with_tight_pairs_have_a_small_paired_mde(tmp_path: Path) -> None:
    # KSM off drifts 60 -> 140 tps from block to block; the setting sits 10% below it each time
    off = [60.0, 100.0, 140.0, 80.0, 120.0]
    on = [o * f for o, f in zip(off, (0.899, 0.901, 0.900, 0.899, 0.901))]
    sm = computed(block_study(tmp_path, on_tps=on, off_tps=off, guest_spread=0.0))
    tps = sm.noise.set_index("metric").loc["tps"]
    assert tps["design"] == "paired by block"
    assert tps["mde"] < 0.5  # percent; unpaired, KSM off's 32% sd would give about 65%
    assert stats.minimum_detectable_effect(np.std(off, ddof=1), 5) / np.mean(off) * 100 > 50
    assert tps["repetitions_for_5pct"] == 2


def test_no_noise_floor_without_ksm_off_trials(tmp_path: Path) -> None:
    sm = computed(sweep_study(tmp_path))
    assert sm.noise.empty and "sd" in sm.noise.columns


# ----------------------------------------------------------------------------- net of drift


def test_savings_net_of_drift_use_the_same_block(tmp_path: Path) -> None:
    sm = computed(drift_study(tmp_path))
    trials = sm.trials.set_index("trial_id")
    assert trials.loc["off-r0", "pss_drop_mib"] == pytest.approx(-95.0)
    assert trials.loc["off-r0", "mem_available_rise_mib"] == pytest.approx(-94.0)
    assert trials.loc["on-r1", "pss_drop_mib"] == pytest.approx(100.0 - 85.0)
    # block 1's own KSM-off growth (85) is subtracted, not the mean over blocks (90)
    assert trials.loc["on-r1", "pss_drop_net_mib"] == pytest.approx(100.0)
    assert trials.loc["on-r1", "mem_available_rise_net_mib"] == pytest.approx(100.0)
    assert math.isnan(trials.loc["off-r1", "pss_drop_net_mib"])
    on = sm.settings[~sm.settings["ksm_off"]].iloc[0]
    assert (on["pss_drop_net_mib"], on["pss_drop_net_mib_n"]) == (pytest.approx(100.0), 2)
    assert on["pss_drop_net_mib_ci95"] == pytest.approx(0.0, abs=1e-9)
    assert on["mem_available_rise_net_mib"] == pytest.approx(100.0)
    assert on["pss_drop_mib"] == pytest.approx(10.0)  # raw: (5 + 15) / 2


def test_no_net_savings_without_ksm_off_trials(tmp_path: Path) -> None:
    sm = computed(sweep_study(tmp_path))
    for column in studymetrics.NET_METRICS:
        assert sm.trials[column].isna().all() and sm.settings[column].isna().all()


# ----------------------------------------------------------------------------- disturbed trials


def test_disturbed_trial_is_replaced_by_its_ok_rerun(tmp_path: Path) -> None:
    sm = computed(disturbed_study(tmp_path))
    trials = sm.trials.set_index("trial_id")
    assert len(trials) == 5  # nothing dropped
    assert trials["used_in_stats"].to_dict() == {"off": True, "a": False, "a-rerun": True, "b": True, "b-rerun": False}
    assert trials.loc["a", "stats_note"] == "disturbed; rerun a-rerun used"
    assert trials.loc["a-rerun", "stats_note"] == "rerun of a"
    assert trials.loc["b", "stats_note"] == "disturbed; used, no ok rerun"
    assert trials.loc["b-rerun", "stats_note"] == "failed; not used"
    assert trials.loc["a", "outside_cpu_pct"] == 40.0 and bool(trials.loc["a", "disturbed"])
    assert trials.loc["a", "tps_vs_off_pct"] == pytest.approx(-50.0)  # still described per trial
    settings = sm.settings.set_index("setting")
    a = settings.loc["ksm.pages_to_scan=100"]
    assert (a["trials"], a["ok"], a["n"]) == (2, 2, 1)
    assert a["tps"] == pytest.approx(9.0)
    assert a["tps_vs_off_pct"] == pytest.approx(-10.0)
    b = settings.loc["ksm.pages_to_scan=1000"]
    assert (b["trials"], b["ok"], b["n"], b["tps"]) == (2, 1, 1, pytest.approx(8.0))


def test_rerun_of_a_disturbed_rerun_is_followed(tmp_path: Path) -> None:
    study_dir = start_study(tmp_path)
    sysbench_trial(study_dir, "t", {}, 5.0, extra={"disturbed": True})
    sysbench_trial(study_dir, "t2", {}, 6.0, extra={"disturbed": True, "rerun_of": "t"})
    sysbench_trial(study_dir, "t3", {}, 9.0, extra={"rerun_of": "t2"})
    trials = computed(finish_study(study_dir)).trials.set_index("trial_id")
    assert trials.loc["t", "stats_note"] == "disturbed; rerun t3 used"
    assert trials["used_in_stats"].to_dict() == {"t": False, "t2": False, "t3": True}


# ----------------------------------------------------------------------------- design and family


def test_sequential_study_is_compared_by_welch_not_paired(tmp_path: Path) -> None:
    """Same trials as the consistent -30% blocked study: run sequentially, the repetitions are
    labels, so the comparison is Welch over the 6 trials, never "paired"."""
    study = block_study(tmp_path, on_tps=[7.0, 8.28, 5.68], off_tps=[10.0, 12.0, 8.0], guest_spread=0.0)
    sm = computed(with_order(study, "sequential"))
    on = sm.settings[~sm.settings["ksm_off"]].iloc[0]
    assert (on["tps_vs_off_method"], on["tps_vs_off_n"]) == ("Welch", 6)
    assert sm.order == "sequential" and not sm.paired_by_block
    assert "paired" not in stats.comparison_verdict(studymetrics.settings_comparison(on, "tps"))
    # The noise floor sizes the test the study makes: unpaired, never the paired figure.
    tps = sm.noise[sm.noise["metric"] == "tps"].iloc[0]
    assert tps["design"] == "unpaired"
    blocked = computed(with_order(study, "blocked")).noise
    assert blocked[blocked["metric"] == "tps"].iloc[0]["design"] == "paired by block"


def test_study_without_order_is_read_as_blocked(tmp_path: Path) -> None:
    sm = computed(block_study(tmp_path, on_tps=[7.0, 8.28, 5.68], off_tps=[10.0, 12.0, 8.0], guest_spread=0.0))
    assert sm.order == "blocked"
    assert sm.settings[~sm.settings["ksm_off"]].iloc[0]["tps_vs_off_method"] == "paired by block"


def _three_blocks_with_a_rerun(root: Path, rerun_extra: dict) -> pd.Series:
    """KSM off and one setting in 3 blocks; block 1's KSM-on trial was disturbed and rerun
    (rerun_extra: how). Returns the setting's row of the settings table."""
    study = start_study(root)
    on = {"threads": 1, "ksm.pages_to_scan": 1000}
    for block, (a, b) in enumerate(((7.0, 10.0), (8.28, 12.0), (5.68, 8.0))):
        sysbench_trial(study, f"off-r{block}", {"threads": 1}, b, rep=block, ksm_off=True, guest_spread=0.0)
        sysbench_trial(
            study,
            f"on-r{block}",
            on,
            a,
            rep=block,
            guest_spread=0.0,
            extra={"disturbed": block == 1, "outside_cpu_pct": 40.0 if block == 1 else 1.0},
        )
    sysbench_trial(study, "on-r1-rerun1", on, 8.4, rep=1, guest_spread=0.0, extra={"rerun_of": "on-r1", **rerun_extra})
    settings = computed(finish_study(study)).settings
    return settings[~settings["ksm_off"]].iloc[0]


def test_a_block_with_a_rerun_is_not_paired(tmp_path: Path) -> None:
    """Block 1's KSM-on trial was disturbed and rerun after the study: only blocks 0 and 2 pair."""
    row = _three_blocks_with_a_rerun(tmp_path, {})
    assert (row["tps_vs_off_method"], row["tps_vs_off_n"]) == ("paired by block", 2)
    assert row["tps_vs_off_pct"] == pytest.approx(np.mean([-30.0, -29.0]))


def test_a_rerun_run_inside_its_block_pairs(tmp_path: Path) -> None:
    """The sweep reruns a disturbed trial at once, right after it (rerun_in_block): the block
    still pairs, with the rerun in place of the disturbed trial."""
    row = _three_blocks_with_a_rerun(tmp_path, {"rerun_in_block": True})
    assert (row["tps_vs_off_method"], row["tps_vs_off_n"]) == ("paired by block", 3)
    assert row["tps_vs_off_pct"] == pytest.approx(np.mean([-30.0, -30.0, -29.0]))


def test_holm_marks_only_changes_that_survive_the_family(tmp_path: Path) -> None:
    """Three settings, three blocks: one clear -30% (p ~ 0.001), one borderline (its own interval
    just excludes 0, p ~ 0.03 > 0.05 / 2 after the first), one nothing."""
    effects = {100: [-30.0, -31.0, -29.0], 200: [-9.2, -4.8, -7.0], 300: [1.0, -1.0, 0.5]}
    settings = computed(family_study(tmp_path, effects)).settings.set_index("setting")
    rows = {p: settings.loc[f"ksm.pages_to_scan={p}"] for p in effects}
    assert stats.Comparison(rows[200]["tps_vs_off_pct"], rows[200]["tps_vs_off_ci95_pct"], 3, stats.PAIRED).differs
    p = {k: r["tps_vs_off_p"] for k, r in rows.items()}
    assert p[100] < 0.05 / 3 and 0.05 / 2 < p[200] < 0.05 and p[300] > 0.05
    assert [bool(rows[k]["tps_vs_off_holm"]) for k in effects] == [True, False, False]


def test_pss_drop_carries_each_targets_last_read_forward_when_reads_take_turns() -> None:
    """The budgeted sampler reads one target's PSS per tick in turn: the summed PSS at a tick is
    each target's last read (a known answer: every target drops 1000 -> 700 KiB when measure
    starts, and each is read every third tick), and the figures' age is stated."""
    labels = ("a", "b", "c")
    rows = []
    for t in range(20):
        phase = "baseline" if t < 5 else "measure"
        for i, label in enumerate(labels):
            read = t % 3 == i
            pss = (1000.0 if t < 5 else 700.0) if read else np.nan
            rows.append({"t_s": float(t), "phase": phase, "label": label, "rss_kib": 1000.0, "pss_kib": pss})
    out, per_proc = samplemetrics.process_metrics(pd.DataFrame(rows))
    # baseline: the last tick of baseline, every target read before it (a@3, b@4, c@2): 3000 KiB;
    # end: all three read again in measure (by t=7): 2100 KiB. Summing only a tick's fresh
    # reads would give 700 KiB ticks.
    assert out["pss_drop_mib_end"] == pytest.approx((3000 - 2100) / 1024)
    assert out["pss_samples"] == 15
    assert out["pss_age_max_s"] == 2.0  # every figure summed is at most 2 ticks old
    per_proc = per_proc.set_index("label")
    assert per_proc["pss_before_kib"].tolist() == [1000.0] * 3
    assert per_proc["pss_after_kib"].tolist() == [700.0] * 3
    assert per_proc["pss_age_end_s"].tolist() == [1.0, 0.0, 2.0]  # t=19 reads b; a@18, c@17
