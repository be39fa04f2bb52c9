"""Issue 22, "Exposure": the probe's exposure mode (a victim and an unrelated observer timing
copy-on-write), its decision rule, its statistics, its plan keys, on real processes and real KSM.

Known answers run on crafted timings through the real functions; the workers are real
processes (no KSM change unless marked ksm, where the knob guard puts every knob back).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from orchestrator.cli import main as cli
from orchestrator.analysis.cowstats import exposure_metrics, exposure_sentence, median_with_never
from orchestrator.analysis.stats import wilson_ci95
from orchestrator.errors import WorkloadError
from orchestrator.host import probes
from orchestrator.plan import parse_plan
from orchestrator.workloads._exposer import called_merged, merge_threshold_ns
from orchestrator.workloads.exposure import EXPOSURE_COLUMNS, ExposurePair, exposure_frame
from orchestrator.workloads.probe import ProbeParams

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- the decision rule


def test_threshold_is_factor_times_the_quantile_of_known_unmerged_writes() -> None:
    calibration = np.arange(1, 101) * 10.0  # 10 .. 1000 ns
    # numpy's linear quantile at 0.99 of 100 values: 990 + 0.01 * 10 = 990.1 ns
    assert merge_threshold_ns(calibration, 0.99, 2.0) == pytest.approx(1980.2)
    assert merge_threshold_ns([200.0] * 50 + [math.nan], 0.5, 3.0) == pytest.approx(600.0)  # NaN left out
    with pytest.raises(ValueError):
        merge_threshold_ns([math.nan], 0.99, 2.0)


def test_calls_on_crafted_timings() -> None:
    rng = np.random.default_rng(7)
    unmerged = rng.normal(1500, 150, 500).clip(min=900)  # a plain store after a sleep, ns
    threshold = merge_threshold_ns(unmerged, 0.99, 2.0)
    assert 3000 < threshold < 4500
    assert called_merged([9000.0, 12000.0], threshold).all()  # copy-on-write of a merged page
    assert not called_merged(unmerged, threshold).any()
    assert called_merged(threshold, threshold) == np.False_  # strictly above: equal is not merged


# ----------------------------------------------------------------------------- the statistics


def test_wilson_interval_known_values() -> None:
    assert wilson_ci95(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    low, high = wilson_ci95(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    assert all(math.isnan(v) for v in wilson_ci95(0, 0))


def crafted_frame() -> pd.DataFrame:
    """Two secrets written at 1.0 s and 2.0 s; decoys tested throughout.
    Secret 0: merged from 1.5 s, tests at 1.2 (not merged), 1.6 (merged, called), 1.8 (merged,
    missed). Secret 1: never merged. Decoys: 6 tests, one false call."""
    rows = [("calibration", -1, 0.1, 1500, "", 0)] * 3
    rows += [
        ("candidate", 0, 0.5, 1400, 0, 0),
        ("candidate", 0, 1.2, 1500, 0, 0),
        ("candidate", 0, 1.6, 9000, 1, 1),
        ("candidate", 0, 1.8, 2000, 1, 0),
        ("candidate", 1, 1.5, 1500, 0, 0),
        ("candidate", 1, 2.5, 1500, 0, 0),
    ]
    rows += [("decoy", -1, 0.3 * i, 1500 if i else 5000, 0, 0 if i else 1) for i in range(6)]
    observer = pd.DataFrame(rows, columns=["kind", "secret", "t_mono", "latency_ns", "truth_merged", "called_merged"])
    observer["t_mono"] += 100.0
    observer["ksm_merging_pages"] = ""
    victim = pd.DataFrame({"secret": [0, 1], "t_mono": [101.0, 102.0]})
    return exposure_frame(observer, victim, go_mono=100.0)


def test_metrics_known_answer_on_a_crafted_trial() -> None:
    frame = crafted_frame()
    assert list(frame.columns) == list(EXPOSURE_COLUMNS)
    m = exposure_metrics(frame, {"truth_source": "pagemap", "threshold_ns": 4000.0, "secrets": 2})
    assert (m["exposure_tp"], m["exposure_truth_pos"]) == (1, 2)
    assert (m["exposure_fp"], m["exposure_truth_neg"]) == (1, 10)  # 4 candidate negatives + 6 decoys
    assert m["exposure_tpr"] == 0.5 and m["exposure_fpr"] == pytest.approx(0.1)
    assert (m["exposure_tpr_low"], m["exposure_tpr_high"]) == pytest.approx(wilson_ci95(1, 2))
    assert m["exposure_balanced_accuracy"] == pytest.approx((0.5 + 0.9) / 2)
    assert m["exposure_first_detect_s"] == pytest.approx(0.6)  # 1.6 - 1.0
    assert m["exposure_secrets_detected"] == 1 and m["exposure_secrets_merged"] == 1
    assert math.isnan(m["exposure_median_detect_s"])  # half the secrets never detected: no median
    assert (m["exposure_holds_calls"], m["exposure_holds_tests"]) == (1, 4)  # tests at 1.2, 1.6, 1.8, 2.5
    assert "median not reached" in m["exposure_summary"] and "(1/2)" in m["exposure_summary"]


def test_median_counts_never_detected_secrets_as_later_than_any() -> None:
    assert median_with_never([1.0, 2.0, math.inf]) == 2.0
    assert math.isnan(median_with_never([1.0, math.inf, math.inf]))
    assert math.isnan(median_with_never([1.0, math.inf]))  # the middle pair holds a never


def test_ksm_stat_fallback_claims_no_true_positive_rate() -> None:
    frame = crafted_frame()
    frame["truth_merged"] = math.nan
    m = exposure_metrics(frame, {"truth_source": "ksm_stat", "threshold_ns": 4000.0, "secrets": 2})
    assert math.isnan(m["exposure_tpr"]) and math.isnan(m["exposure_balanced_accuracy"])
    # decoys and candidates before their write are unmerged by construction
    assert (m["exposure_fp"], m["exposure_truth_neg"]) == (1, 8)
    assert m["exposure_first_detect_s"] == pytest.approx(0.6)  # a call alone
    assert "balanced accuracy" not in m["exposure_summary"]


def test_sentence_for_a_trial_with_nothing_merged() -> None:
    text = exposure_sentence(
        {
            "exposure_secrets": 4,
            "exposure_tests": 200,
            "exposure_truth_pos": 0,
            "exposure_fp": 2,
            "exposure_truth_neg": 200,
            "exposure_fpr": 0.01,
            "exposure_tpr": math.nan,
            "exposure_truth_source": "pagemap",
        }
    )
    assert text.startswith("no tested page was merged (0 of 200)") and "(2/200)" in text


# ----------------------------------------------------------------------------- plan keys


@pytest.mark.parametrize(
    "table, problem",
    [
        ('mode = "cost"\n[workload.exposure]\nsecrets = 4\n', 'needs mode = "exposure"'),
        ('mode = "exposure"\n[workload.exposure]\nsecrets = 0\n', "exposure.secrets"),
        ('mode = "exposure"\n[workload.exposure]\nthreshold_quantile = 1.0\n', "exposure.threshold_quantile"),
        ('mode = "exposure"\n[workload.exposure]\ntest_interval_s = inf\n', "exposure.test_interval_s"),
        ('mode = "exposure"\n[workload.exposure]\nwatch_s = 3\n', "unknown key"),
        ('mode = "leak"\n', "workload.mode"),
    ],
)
def test_bad_exposure_values_are_refused_in_one_line(tmp_path: Path, capsys, table: str, problem: str) -> None:
    plan = tmp_path / "bad.toml"
    plan.write_text(f'[study]\nname = "x"\n[workload]\ntype = "probe"\n{table}')
    assert cli.main(["sweep", str(plan), "--dry-run"]) == cli.EXIT_ERROR
    err = capsys.readouterr().err.strip()
    # the CLI's plan error: a header naming the file, then one line per problem: here exactly one
    assert "Traceback" not in err and len(err.splitlines()) <= 2, err
    assert sum(problem in line for line in err.splitlines()) == 1, err


def test_cost_mode_probe_keeps_its_trial_table() -> None:
    """Trial ids hash the dumped [workload]: a cost-mode probe dumps as it did before modes."""
    assert "mode" not in ProbeParams().model_dump() and "exposure" not in ProbeParams().model_dump()
    exposure = ProbeParams(mode="exposure")
    assert exposure.model_dump()["mode"] == "exposure" and exposure.exposure_params().secrets == 20


def test_shipped_exposure_plan_sweeps_the_asked_settings() -> None:
    from orchestrator.plan import expand

    trials = expand(parse_plan((REPO / "plans" / "exposure.toml").read_text()))
    assert sum(t.ksm_off for t in trials) == 1
    scanned = {
        (t.ksm.get("pages_to_scan"), t.ksm.get("use_zero_pages"), t.ksm.get("smart_scan"))
        for t in trials
        if not t.ksm_off
    }
    assert {(100, None, None), (1000, None, None), (5000, None, None)} <= scanned
    assert all(t.workload["mode"] == "exposure" for t in trials)


# ----------------------------------------------------------------------------- real processes


TINY = {
    "secrets": 3,
    "decoys": 3,
    "background_pages": 64,
    "calibration_writes": 100,
    "warmup_s": 0.6,
    "write_gap_s": 0.2,
    "observe_s": 0.4,
    "test_interval_s": 0.005,
}


def run_pair(tmp_path: Path, truth: str = "auto") -> tuple[ExposurePair, pd.DataFrame]:
    params = ProbeParams.model_validate({"mode": "exposure", "exposure": TINY})
    with ExposurePair(params, tmp_path, truth=truth) as pair:
        pair.start()
        pids = pair.pids()
        assert pids["victim"] != pids["observer"]
        pair.wait_filled(timeout_s=30)
        pair.go()
        pair.wait_done(timeout_s=30)
        return pair, pair.frame()


def test_real_pair_without_ksm_reads_per_page_truth(tmp_path: Path) -> None:
    if not probes.PageMergeReader("self").usable:
        pytest.skip("pagemap / kpageflags not readable here (needs root)")
    pair, frame = run_pair(tmp_path)
    assert pair.truth_source == "pagemap" and pair.threshold_ns > 0
    assert (frame["kind"] == "calibration").sum() == TINY["calibration_writes"]
    tests = frame[frame["kind"] != "calibration"]
    assert set(tests["kind"]) == {"candidate", "decoy"} and len(tests) > 50
    assert (pd.to_numeric(tests["truth_merged"]) == 0).all()  # KSM never ran on these pages
    candidates = tests[tests["kind"] == "candidate"]
    assert (candidates["since_write_s"] < 0).any() and (candidates["since_write_s"] >= 0).any()
    # the victim wrote on its schedule: secret r at 0.6 + 0.2 r s after "go" (a loaded host is late, never early)
    written = candidates.groupby("secret")["written_s"].first()
    assert all(0.6 + 0.2 * r <= written[r] < 0.6 + 0.2 * r + 0.5 for r in range(3))


def test_real_pair_falls_back_to_ksm_stat_counts(tmp_path: Path) -> None:
    pair, frame = run_pair(tmp_path, truth="ksm_stat")
    assert pair.truth_source == "ksm_stat"
    tests = frame[frame["kind"] != "calibration"]
    assert tests["truth_merged"].isna().all()
    assert (pd.to_numeric(tests["ksm_merging_pages"]) == 0).all()


def test_wait_for_the_workers_is_bounded(tmp_path: Path) -> None:
    import threading

    from orchestrator.host.ksm import HostSettings
    from orchestrator.runners.exposure import ExposureRunner

    class Silent:
        def wait_done(self, timeout_s: float) -> None:
            time.sleep(timeout_s)
            raise WorkloadError(f"probe worker: no 'done' within {timeout_s} s")

    plan = parse_plan('[study]\nname = "x"\n[workload]\ntype = "probe"\nmode = "exposure"\n')
    runner = ExposureRunner(plan, HostSettings(tmp_path / "r.json", tmp_path), threading.Event(), lambda p: None)
    started = time.monotonic()
    with pytest.raises(WorkloadError, match="no 'done'"):
        runner._wait_done(Silent(), bound_s=1.0)
    assert time.monotonic() - started < 3.0


# ----------------------------------------------------------------------------- real KSM


@pytest.mark.ksm
def test_real_ksm_merge_is_observed_and_ksm_off_stays_at_chance(tmp_path: Path, ksm_guard) -> None:
    """One short study: KSM off (nothing merges; any merged call is a false positive, and calls
    do not depend on whether the victim holds the secret) and KSM at 5000 pages / 20 ms (the
    secrets merge, the observer sees them, no decoy ever merges)."""
    from orchestrator.sweep import run_sweep

    text = """
[study]
name = "exposure-test"
ksm_off_baseline = true
[ksm]
pages_to_scan = 5000
sleep_millisecs = 20
[workload]
type = "probe"
mode = "exposure"
[workload.exposure]
secrets = 6
decoys = 6
background_pages = 2560
calibration_writes = 200
warmup_s = 3
write_gap_s = 0.5
observe_s = 6
[phases]
baseline_s = 1
[sampling]
interval_s = 0.5
"""
    results = tmp_path / "results"
    results.mkdir()
    outcome = run_sweep(parse_plan(text), text, results)
    trials = pd.read_csv(outcome.study.path / "trials.csv")
    assert (trials["status"] == "ok").all(), trials[["status", "reason"]].to_dict("records")
    off = trials[trials["ksm_off"].astype(bool)].iloc[0]
    on = trials[~trials["ksm_off"].astype(bool)].iloc[0]
    assert off["exposure_truth_source"] == "pagemap"
    assert off["exposure_truth_pos"] == 0 and off["exposure_tp"] == 0 and off["exposure_secrets_detected"] == 0
    assert (
        math.isnan(off["exposure_tpr"])
        and off["exposure_fp"] == off["exposure_holds_calls"] + off["exposure_not_holds_calls"]
    )
    # at chance: the call rate with the secret held is not told apart from the rate without it
    held = wilson_ci95(int(off["exposure_holds_calls"]), int(off["exposure_holds_tests"]))
    not_held = wilson_ci95(int(off["exposure_not_holds_calls"]), int(off["exposure_not_holds_tests"]))
    assert held[0] <= not_held[1] and not_held[0] <= held[1]
    assert on["exposure_secrets_merged"] >= 1 and on["exposure_truth_pos"] >= 1
    assert on["exposure_decoys_merged"] == 0
    assert on["exposure_secrets_detected"] >= 1 and on["exposure_first_detect_s"] > 0
