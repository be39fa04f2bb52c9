"""Copy-on-write statistics (analysis/cowstats.py): percentiles net of the timer's cost, the gap
of medians with its interval across trials, the ratio kept as description. Hand-made samples."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from orchestrator.analysis import costs, cowstats
from tests.builders import PAGE, finish_study, start_study, write_trial
from tests.builders import one_trial, scanning_frame


def synthetic_cow(overhead_ns: float = 100.0, n: int = 1000, seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    merged = overhead_ns + rng.lognormal(np.log(3000), 0.3, n)
    unmerged = overhead_ns + rng.lognormal(np.log(40), 0.3, n)
    rows = [("overhead", i, overhead_ns) for i in range(200)]
    rows += [("merged", i, v) for i, v in enumerate(merged)]
    rows += [("unmerged", i, v) for i, v in enumerate(unmerged)]
    return pd.DataFrame(rows, columns=["region", "order", "latency_ns"])


def test_cow_percentiles_are_net_of_the_loop_overhead() -> None:
    samples = synthetic_cow()
    out = cowstats.cow_summary(samples)
    assert out["cow_overhead_ns"] == pytest.approx(100.0)
    merged_net = samples.loc[samples["region"] == "merged", "latency_ns"].to_numpy() - 100.0
    for pct in (50, 90, 99):
        assert out[f"cow_merged_p{pct}_ns"] == pytest.approx(np.percentile(merged_net, pct))
    assert out["cow_merged_p50_ns"] == pytest.approx(3000, rel=0.05)
    assert out["cow_unmerged_p50_ns"] == pytest.approx(40, rel=0.05)
    raw = {r: np.median(samples.loc[samples["region"] == r, "latency_ns"]) for r in ("merged", "unmerged")}
    assert out["cow_p50_diff_ns"] == pytest.approx(raw["merged"] - raw["unmerged"])
    assert out["cow_p50_diff_ns"] == pytest.approx(out["cow_merged_p50_ns"] - out["cow_unmerged_p50_ns"])
    assert out["cow_median_ratio"] == pytest.approx(raw["merged"] / raw["unmerged"])  # raw: timer included
    assert out["cow_merged_n"] == out["cow_unmerged_n"] == 1000


def test_cow_latency_below_overhead_is_floored_not_negative() -> None:
    samples = pd.DataFrame(
        {
            "region": ["overhead"] * 3 + ["unmerged"] * 3 + ["merged"] * 3,
            "order": list(range(3)) * 3,
            "latency_ns": [100, 100, 100, 90, 95, 100, 500, 600, 700],
        }
    )
    out = cowstats.cow_summary(samples)
    assert out["cow_unmerged_p50_ns"] == cowstats.FLOOR_NS
    assert out["cow_merged_p50_ns"] == pytest.approx(500)
    # the difference and the ratio use the raw medians (600 and 95): the floor never enters them
    assert out["cow_p50_diff_ns"] == pytest.approx(505)
    assert out["cow_median_ratio"] == pytest.approx(600 / 95)


def test_cow_gap_is_stable_where_the_floored_ratio_was_not() -> None:
    """The issue's case: the unmerged median moves by 2 ns across the 1 ns floor. The net ratio
    went 4843 -> 2200; the difference of medians moves by 2 ns of ~4842."""

    def gap(unmerged_ns: float) -> dict:
        samples = pd.DataFrame(
            {
                "region": ["overhead"] * 3 + ["unmerged"] * 3 + ["merged"] * 3,
                "order": list(range(3)) * 3,
                "latency_ns": [160, 160, 160, *[unmerged_ns] * 3, *[160 + 4843] * 3],
            }
        )
        return cowstats.cow_summary(samples)

    before, after = gap(161.0), gap(163.0)
    assert before["cow_merged_p50_ns"] / before["cow_unmerged_p50_ns"] == pytest.approx(4843)
    assert after["cow_merged_p50_ns"] / after["cow_unmerged_p50_ns"] == pytest.approx(4843 / 3)
    assert before["cow_p50_diff_ns"] - after["cow_p50_diff_ns"] == pytest.approx(2.0)
    assert after["cow_median_ratio"] == pytest.approx(5003 / 163)


def test_cow_summary_of_nothing_is_empty() -> None:
    assert cowstats.cow_summary(None) == {}
    assert cowstats.cow_summary(pd.DataFrame()) == {}


def test_probe_trial_columns_and_report_sections(tmp_path: Path) -> None:
    from orchestrator.report.study import write_report

    probe = {
        "merged_pages": 25600,
        "merge_target_reached": True,
        "merge_wall_s": 2.0,
        "merge_ksmd_cpu_s": 0.5,
        "unmerge_s": 0.25,
        "pages_before_unmerge": 262144,
        "pages_sharing_after_unmerge": 0,
    }
    knobs = {"pages_to_scan": 1000, "sleep_millisecs": 20, "use_zero_pages": 0}
    m = one_trial(tmp_path, knobs, scanning_frame(), extra={"probe": probe, "kind": "probe"}, cow=synthetic_cow())
    assert m["merged_mib"] == pytest.approx(100.0)
    assert m["merge_mib_per_s"] == pytest.approx(50.0)
    assert m["merge_mib_per_ksmd_cpu_s"] == pytest.approx(200.0)
    assert m["unmerge_s_per_gib"] == pytest.approx(0.25)  # 262144 pages = 1 GiB
    html = write_report(tmp_path / "study").read_text()
    for title in (
        "Scan speed: asked and achieved",
        "KSM&#39;s own memory",
        "Merge throughput and unmerge",
        "Copy-on-write break latency",
        "side channels",
    ):
        assert title in html
    assert "significant" not in html.lower()
    trials = pd.read_csv(tmp_path / "study" / "report" / "summary.csv")
    for column in ("cow_merged_p99_ns", "cow_median_ratio", "unmerge_s_per_gib", "scan_rate_achieved_pct"):
        assert column in trials.columns


def test_a_probe_that_merged_nothing_claims_no_cow_ratio(tmp_path: Path) -> None:
    """Seen in plans/probe.toml: fill=zero under thp=always merged 0 pages, yet its "merged"
    region's first writes were 14x slower (THP faults). That is not a KSM copy-on-write cost."""
    probe = {
        "merged_pages": 0,
        "merge_target_reached": False,
        "merge_wall_s": 300.0,
        "merge_ksmd_cpu_s": 5.0,
        "unmerge_s": 0.01,
        "pages_before_unmerge": 0,
        "pages_sharing_after_unmerge": 0,
    }
    knobs = {"pages_to_scan": 1000, "sleep_millisecs": 20, "use_zero_pages": 0}
    m = one_trial(tmp_path, knobs, scanning_frame(), extra={"probe": probe, "kind": "probe"}, cow=synthetic_cow())
    assert math.isnan(m["cow_median_ratio"]) and "nothing merged" in m["cow_note"]
    assert math.isnan(m["cow_p50_diff_ns"])
    assert m["cow_merged_p50_ns"] > 0  # the latencies themselves are kept


def test_unmerge_per_gib_is_nan_without_merged_pages() -> None:
    assert math.isnan(costs.unmerge_per_gib(0.1, 0, PAGE))
    assert costs.unmerge_per_gib(2.0, 2 * 262144, PAGE) == pytest.approx(1.0)


def test_cow_gap_has_an_interval_across_trials_and_the_ratio_none(tmp_path: Path) -> None:
    from orchestrator.analysis import studymetrics
    from orchestrator.store import studydata
    from orchestrator.report.costs import cow_gap_findings

    study = start_study(tmp_path)
    knobs = {"pages_to_scan": 1000, "sleep_millisecs": 20, "use_zero_pages": 0}
    probe = {"merged_pages": 25600, "merge_target_reached": True, "merge_wall_s": 2.0, "merge_ksmd_cpu_s": 0.5}
    gaps = []
    for rep in range(3):
        cow = synthetic_cow(seed=rep + 1)
        gaps.append(cowstats.cow_summary(cow)["cow_p50_diff_ns"])
        trial_dir = write_trial(
            study,
            f"t{rep}",
            {"pages_to_scan": 1000},
            repetition=rep,
            ksm=scanning_frame(),
            ksm_knobs=knobs,
            extra={"probe": probe, "kind": "probe"},
        )
        cow.to_csv(trial_dir / "cow.csv", index=False)
    sm = studymetrics.compute_study(studydata.load_study(finish_study(study)))
    row = sm.settings.iloc[0]
    assert row["cow_p50_diff_ns"] == pytest.approx(np.mean(gaps))
    assert row["cow_p50_diff_ns_ci95"] == pytest.approx(4.3027 * np.std(gaps, ddof=1) / math.sqrt(3), rel=1e-4)
    assert "cow_median_ratio_ci95" not in sm.settings.columns and "cow_median_ratio" not in sm.settings.columns
    assert "cow_median_ratio" in sm.trials.columns  # per trial, description
    (finding,) = cow_gap_findings(sm)
    assert finding.startswith(
        f"Copy-on-write gap, all trials: a first write to a merged page took {np.mean(gaps):,.0f} ± "
    )
    assert "(95% interval across 3 trials)" in finding
