"""KSM's costs and speed from a trial's samples (analysis/costs.py): the scan rate asked and
achieved, zero pages apart from content merges, KSM's own memory beside general_profit. Hand-made
frames (tests/builders.py), no KSM."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from orchestrator.analysis import costs
from tests.builders import PAGE, finish_study, processes_frame, start_study, write_trial
from tests.builders import one_trial, scanning_frame

MIB = 1024 * 1024


def test_scan_speed_achieved_against_nominal(tmp_path: Path) -> None:
    m = one_trial(tmp_path, {"pages_to_scan": 100, "sleep_millisecs": 20, "use_zero_pages": 0}, scanning_frame())
    assert m["nominal_pages_per_s"] == pytest.approx(5000.0)  # 100 pages per 20 ms
    assert m["pages_scanned_per_s"] == pytest.approx(2500.0)
    assert m["scan_rate_achieved_pct"] == pytest.approx(50.0)
    assert m["seconds_per_full_scan"] == pytest.approx(2.0)  # the builder completes a scan every 2 s


def test_sleep_zero_asks_for_unbounded_rate() -> None:
    assert costs.nominal_pages_per_s(1000, 0) == math.inf
    assert costs.nominal_pages_per_s(1000, 1) == pytest.approx(1_000_000)  # the original study's setting
    ksm = scanning_frame()
    measure = ksm[ksm["phase"] == "measure"]
    out = costs.scan_speed(measure, {"pages_to_scan": 1000, "sleep_millisecs": 0}, 10.0)
    assert out["nominal_pages_per_s"] == math.inf and math.isnan(out["scan_rate_achieved_pct"])


def test_knob_left_at_host_value_is_read_from_the_samples() -> None:
    ksm = scanning_frame().assign(sleep_millisecs=10)
    out = costs.scan_speed(ksm[ksm["phase"] == "measure"], {"pages_to_scan": 100}, 10.0)
    assert out["nominal_pages_per_s"] == pytest.approx(10_000)


def test_ksm_off_trial_has_no_scan_or_memory_columns(tmp_path: Path) -> None:
    m = one_trial(tmp_path, {}, scanning_frame(), ksm_off=True)
    # KSM never ran: no scan rate was asked for (NaN) and KSM kept no metadata to count.
    assert math.isnan(m.get("nominal_pages_per_s", math.nan)) and "ksm_metadata_mib" not in m


def test_no_full_scan_completed_gives_nan_seconds_per_scan() -> None:
    ksm = scanning_frame().assign(full_scans=0)
    out = costs.scan_speed(ksm[ksm["phase"] == "measure"], {"pages_to_scan": 100, "sleep_millisecs": 20}, 10.0)
    assert math.isnan(out["seconds_per_full_scan"])


def test_zero_pages_split_from_content_merges(tmp_path: Path) -> None:
    knobs = {"pages_to_scan": 100, "sleep_millisecs": 20, "use_zero_pages": 1}
    m = one_trial(tmp_path, knobs, scanning_frame(final_sharing=900, zero_pages=300))
    assert m["zero_pages_mib"] == pytest.approx(300 * PAGE / MIB)
    assert m["content_merged_mib"] == pytest.approx(900 * PAGE / MIB)
    assert m["zero_pages_share_pct"] == pytest.approx(25.0)
    assert m["saved_mib_end"] == pytest.approx(m["zero_pages_mib"] + m["content_merged_mib"])


def test_zero_pages_not_split_when_use_zero_pages_off(tmp_path: Path) -> None:
    m = one_trial(
        tmp_path, {"pages_to_scan": 100, "sleep_millisecs": 20, "use_zero_pages": 0}, scanning_frame(zero_pages=300)
    )
    assert "zero_pages_mib" not in m


def test_rmap_items_derived_from_general_profit_match_the_processes(tmp_path: Path) -> None:
    # The builder's general_profit = pages_sharing * page - 2 * final rmap items * 64 B, and its
    # two processes report 1000 rmap items each.
    m = one_trial(
        tmp_path,
        {"pages_to_scan": 100, "sleep_millisecs": 20, "use_zero_pages": 0},
        scanning_frame(final_sharing=1000, chains=5),
    )
    assert m["ksm_rmap_items_est"] == pytest.approx(2000)
    assert m["ksm_rmap_items_processes"] == pytest.approx(2000)
    assert m["rmap_items_mib"] == pytest.approx(2000 * 64 / MIB)
    assert m["stable_nodes"] == pytest.approx(100 + 5)  # pages_shared + stable_node_chains
    assert m["stable_nodes_mib"] == pytest.approx(105 * 64 / MIB)
    assert m["ksm_metadata_mib"] == pytest.approx((2000 + 105) * 64 / MIB)
    profit_mib = (1000 * PAGE - 2000 * 64) / MIB
    assert m["general_profit_mib_end"] == pytest.approx(profit_mib)
    # general_profit and the raw saving part by the rmap items exactly
    assert m["saved_mib_end"] - m["general_profit_mib_end"] == pytest.approx(m["rmap_items_mib"])
    assert m["profit_after_stable_nodes_mib"] == pytest.approx(profit_mib - 105 * 64 / MIB)


def test_report_draws_zero_pages_apart_and_lists_them(tmp_path: Path) -> None:
    from orchestrator.report.study import write_report

    study = start_study(tmp_path)
    for zero in (0, 1):
        ksm = scanning_frame(final_sharing=900, zero_pages=300)
        write_trial(
            study,
            f"z{zero}",
            {"use_zero_pages": zero},
            ksm=ksm,
            processes=processes_frame(ksm),
            ksm_knobs={"pages_to_scan": 100, "sleep_millisecs": 20, "use_zero_pages": zero},
        )
    finish_study(study)
    html = write_report(study).read_text()
    assert "Zero pages and content merges" in html
    assert "content merges only" in html  # the plot's legend names the dotted line
