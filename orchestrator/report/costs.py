"""Report sections for KSM's costs and speed (costs.py, cowstats.py, density.py columns).

Each section is {"id", "title", "paragraphs", "table"} and appears only when some trial has
its columns. Tables are rendered by report/study.py's table function (passed in: report imports us).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import pandas as pd

from orchestrator.analysis.studymetrics import StudyMetrics, public_trials_table
from orchestrator.units import has_value, number

TableFn = Callable[[pd.DataFrame, tuple[str, ...]], dict[str, Any]]

ORIGINAL_STUDY_PAGES_PER_S = 1000 * 1000 / 1  # pages_to_scan 1000 every 1 ms

SCAN_COLUMNS = (
    "trial_id",
    "setting",
    "nominal_pages_per_s",
    "pages_scanned_per_s",
    "scan_rate_achieved_pct",
    "seconds_per_full_scan",
    "full_scans",
    "ksmd_cpu_pct",
)
ZERO_COLUMNS = ("trial_id", "setting", "saved_mib", "zero_pages_mib", "content_merged_mib", "zero_pages_share_pct")
MEMORY_COLUMNS = (
    "trial_id",
    "setting",
    "saved_mib_end",
    "general_profit_mib_end",
    "rmap_items_mib",
    "ksm_rmap_items_est",
    "ksm_rmap_items_processes",
    "stable_nodes",
    "stable_nodes_mib",
    "ksm_metadata_mib",
    "profit_after_stable_nodes_mib",
)
PROBE_COLUMNS = (
    "trial_id",
    "setting",
    "merged_mib",
    "merge_wall_s",
    "merge_ksmd_cpu_s",
    "merge_mib_per_s",
    "merge_mib_per_ksmd_cpu_s",
    "merge_target_reached",
    "unmerge_s",
    "unmerge_s_per_gib",
    "pages_sharing_after_unmerge",
)
COW_COLUMNS = (
    "trial_id",
    "setting",
    "cow_overhead_ns",
    "cow_merged_n",
    "cow_merged_p50_ns",
    "cow_merged_p90_ns",
    "cow_merged_p99_ns",
    "cow_unmerged_p50_ns",
    "cow_unmerged_p90_ns",
    "cow_unmerged_p99_ns",
    "cow_p50_diff_ns",
    "cow_median_ratio",
)
EXPOSURE_COLUMNS = (
    "trial_id",
    "setting",
    "ksmd_cpu_pct",
    "pages_scanned_per_s",
    "seconds_per_full_scan",
    "exposure_summary",
    "exposure_median_detect_s",
    "exposure_first_detect_s",
    "exposure_median_merged_s",
    "exposure_secrets_detected",
    "exposure_secrets",
    "exposure_tp",
    "exposure_truth_pos",
    "exposure_tpr",
    "exposure_tpr_low",
    "exposure_tpr_high",
    "exposure_fp",
    "exposure_truth_neg",
    "exposure_fpr",
    "exposure_fpr_low",
    "exposure_fpr_high",
    "exposure_balanced_accuracy",
    "exposure_threshold_ns",
    "exposure_truth_source",
)
DENSITY_COLUMNS = (
    "trial_id",
    "setting",
    "density_guests",
    "density_guests_pss_mib",
    "density_pss_per_guest_mib",
    "density_ksmd_cpu_pct",
    "density_tps_per_guest",
    "density_stop_reason",
    "density_floor_crossed",
    "density_mismatches",
)


def _with(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    if column not in frame.columns:
        return frame.iloc[0:0]
    return frame[(frame["status"] == "ok") & frame[column].notna()]


def cost_sections(sm: StudyMetrics, table: TableFn) -> list[dict[str, Any]]:
    trials = public_trials_table(sm)
    if trials.empty:
        return []
    sections = []
    scan = _with(trials, "nominal_pages_per_s")
    if not scan.empty:
        paragraphs = [
            "What the knobs ask for beside what ksmd did. nominal_pages_per_s = pages_to_scan × 1000 / "
            "sleep_millisecs (ksmd scans pages_to_scan pages, then sleeps); pages_scanned_per_s is the "
            "pages_scanned counter's rise over measure per second; scan_rate_achieved_pct is the second over "
            "the first. The nominal rate ignores the time the scan itself takes, so a large batch falls short "
            "of it; sleep_millisecs = 0 asks for no sleep (nominal unbounded, share not defined). "
            f"seconds_per_full_scan = measure seconds / full scans completed in measure. For scale: the "
            f"original study's 1000 pages per 1 ms asked for {number(ORIGINAL_STUDY_PAGES_PER_S)} pages a second.",
        ]
        achieved = (
            scan["scan_rate_achieved_pct"].dropna() if "scan_rate_achieved_pct" in scan else pd.Series(dtype=float)
        )
        if not achieved.empty:
            low = scan.loc[achieved.idxmin()]
            paragraphs.append(
                f"Lowest share achieved: {low['setting']} ({achieved.min():.1f}% of "
                f"{number(low['nominal_pages_per_s'])} pages/s asked)."
            )
        sections.append(
            {
                "id": "scan-speed",
                "title": "Scan speed: asked and achieved",
                "paragraphs": paragraphs,
                "table": table(scan, SCAN_COLUMNS),
            }
        )
    _add_when_measured(
        sections,
        _with(trials, "zero_pages_mib"),
        table,
        ZERO_COLUMNS,
        id="zero-pages",
        title="Zero pages and content merges (use_zero_pages = 1)",
        paragraphs=[
            "With use_zero_pages = 1 KSM maps empty pages to the kernel's zero page and counts "
            "them in ksm_zero_pages, not pages_sharing. The raw saving (saved_mib) is the sum of "
            "both; zero_pages_mib and content_merged_mib split it at the end of measure. The "
            "saving-over-time plot draws the content merges alone as a dotted line for these "
            "trials."
        ],
    )
    _add_when_measured(
        sections,
        _with(trials, "ksm_metadata_mib"),
        table,
        MEMORY_COLUMNS,
        id="ksm-memory",
        title="KSM's own memory beside general_profit",
        paragraphs=[
            "The kernel's general_profit is (pages_sharing + ksm_zero_pages) × page size − rmap items × "
            'sizeof(struct ksm_rmap_item) (Documentation/admin-guide/mm/ksm.rst, "Monitoring KSM profit"; '
            "mm/ksm.c general_profit_show). So general_profit and the raw saving part by the rmap items "
            "alone: one per page ksmd has looked at, merged or not, 64 bytes each on 64-bit. The rmap count "
            "here is derived from that identity (ksm_rmap_items_est); for host processes the workers' own "
            "ksm_stat sum is shown beside it as a check. Stable-tree nodes (one per KSM page, pages_shared, "
            "plus one per chain, stable_node_chains; struct ksm_stable_node, 64 bytes) are not subtracted by "
            "the kernel: profit_after_stable_nodes_mib subtracts them too. Slab overhead is not counted."
        ],
    )
    _add_when_measured(
        sections,
        _with(trials, "merge_wall_s"),
        table,
        PROBE_COLUMNS,
        id="merge-unmerge",
        title="Merge throughput and unmerge time (probe)",
        paragraphs=[
            "merge_mib_per_s: MiB of the probe's pages merged (ksm_merging_pages + ksm_zero_pages of the "
            "worker) over the wall seconds from KSM start to merge_target_pct of what can merge; per ksmd "
            "CPU-second likewise. A row whose target was not reached (merge_target_reached false) is a partial "
            "merge over the whole timeout. unmerge_s_per_gib: seconds run = 2 took, with the worker alive, per "
            "GiB of page mappings merged when it started; pages_sharing_after_unmerge should be 0."
        ],
    )
    _add_when_measured(
        sections,
        _with(trials, "cow_merged_p50_ns"),
        table,
        COW_COLUMNS,
        id="cow-latency",
        title="Copy-on-write break latency (probe)",
        paragraphs=[
            "Latency of the first write to a page KSM merged (a write fault: the kernel copies the page and "
            "maps the copy) and to a page of an unmerged control mapping (present and writable: a plain store). "
            "Each write is timed with time.perf_counter_ns (CLOCK_MONOTONIC via the vDSO, 1 ns resolution); "
            "the timer's and the interpreter's own cost, measured by the same loop writing to one hot page "
            "(cow_overhead_ns, the median), is subtracted from every sample, and values are floored at 1 ns. "
            "Percentiles are over the per-write samples in cow.csv. The cost of a copy-on-write break is "
            "cow_p50_diff_ns = merged median - unmerged median (raw: the timer's cost cancels in the "
            "difference); the findings average it across trials with a 95% interval. cow_median_ratio is the "
            "ratio of the raw medians, per trial and description only: net of the timer the unmerged median "
            "sits at the 1 ns floor, where a 2 ns change halves a ratio.",
            "This gap is the timing signal KSM side channels exploit: a process that writes to a page and "
            "sees the slow path learns that another process held identical content. A KSM-off trial "
            "times the same writes with nothing merged: its ratio is the method's own floor.",
        ],
    )
    _add_when_measured(
        sections,
        _with(trials, "exposure_summary"),
        table,
        EXPOSURE_COLUMNS,
        id="exposure",
        title="What merging exposes (probe, exposure mode)",
        paragraphs=[
            "Two unrelated processes: a victim writes secret pages on a schedule; an observer holding one "
            "candidate page per secret (and decoy pages no one else holds, all MADV_MERGEABLE) times a write "
            "to one page every test interval and calls it merged when the write took longer than its threshold "
            "(threshold_factor × the threshold_quantile of its own writes to known-unmerged pages). The truth "
            "per tested page is the kernel's: pagemap PFN → kpageflags KSM bit, read just before the write.",
            "exposure_median_detect_s: median over the secrets of the time from the victim's write to the first "
            "test that was called merged and was merged (a secret never detected counts as later than any; no "
            "median when half were never detected); exposure_median_merged_s: the same from the truth alone, "
            "KSM's own latency. TPR / FPR: the calls against the truth over this trial's tests, with counts and "
            "95% Wilson intervals (_low, _high); they describe these tests, not the spread across trials. "
            "Balanced accuracy = (TPR + 1 − FPR) / 2, 50% is chance. KSM off merges nothing: every merged "
            "call is a false positive. ksmd CPU and the achieved scan rate beside it are the other side of the "
            "setting's trade.",
        ],
    )
    _add_when_measured(
        sections,
        _with(trials, "density_guests"),
        table,
        DENSITY_COLUMNS,
        id="density",
        title="Guest density per memory budget",
        paragraphs=[
            "Guests started one by one, KSM converged before each decision, until the next guest would pass "
            "the budget (summed QEMU PSS) or the MemAvailable floor, each planned from the largest per-guest "
            "cost measured so far times the plan's margin. ksmd CPU and per-guest tps are at the final count. "
            "density_mismatches counts guests whose pattern did not verify (any fails the trial)."
        ],
    )
    return sections


def _add_when_measured(
    sections: list[dict[str, Any]],
    rows: pd.DataFrame,
    table: TableFn,
    columns: tuple[str, ...],
    *,
    id: str,
    title: str,
    paragraphs: list[str],
) -> None:
    """Append a section of `rows` (the trials that measured its columns); none when no trial did."""
    if not rows.empty:
        sections.append({"id": id, "title": title, "paragraphs": paragraphs, "table": table(rows, columns)})


def cost_findings(sm: StudyMetrics) -> list[str]:
    """One line each for the scan-rate shortfall, the COW gap and density, when measured."""
    trials = public_trials_table(sm)
    out: list[str] = []
    if trials.empty:
        return out
    scan = _with(trials, "scan_rate_achieved_pct")
    if not scan.empty:
        pct = scan["scan_rate_achieved_pct"]
        out.append(
            f"ksmd achieved {pct.min():.0f}–{pct.max():.0f}% of the scan rate its knobs asked for "
            f"(pages_to_scan × 1000 / sleep_millisecs) over {len(scan)} KSM-on trials; see "
            '"Scan speed: asked and achieved".'
        )
    out.extend(cow_gap_findings(sm))
    exposed = _with(trials, "exposure_summary")
    repeated = set(exposed["setting"][exposed["setting"].duplicated()]) if not exposed.empty else set()
    for row in exposed.to_dict("records"):
        cpu = row.get("ksmd_cpu_pct")
        # an include point's extra knob is not a sweep axis: its label repeats, its trial id does not
        label = f"{row['setting']} ({row['trial_id']})" if row["setting"] in repeated else row["setting"]
        out.append(
            f"Exposure, {label}: {row['exposure_summary']}"
            + (f"; ksmd {number(cpu, integers=False)}% of one core." if has_value(cpu) else ".")
        )
    dens = _with(trials, "density_guests")
    for row in dens.itertuples():
        out.append(f"Density, {row.setting}: {int(row.density_guests)} guests ({row.density_stop_reason}).")
    return out


def cow_gap_findings(sm: StudyMetrics) -> list[str]:
    """Per KSM-on probe setting: the copy-on-write gap (merged - unmerged median, ns) as a mean
    over trials with its 95% interval, the medians beside it for scale."""
    settings = sm.settings
    if settings.empty or "cow_p50_diff_ns" not in settings.columns:
        return []
    out = []
    for row in settings[~settings["ksm_off"] & settings["cow_p50_diff_ns"].notna()].to_dict("records"):
        half, n = row["cow_p50_diff_ns_ci95"], int(row["cow_p50_diff_ns_n"])
        gap = f"{row['cow_p50_diff_ns']:,.0f}" + (
            f" ± {half:,.0f} ns (95% interval across {n} trials)"
            if math.isfinite(half)
            else f" ns ({n} trial, no interval)"
        )
        out.append(
            f"Copy-on-write gap, {row['setting']}: a first write to a merged page took {gap} longer than "
            f"to an unmerged one (median per trial: merged {row['cow_merged_p50_ns']:,.0f} ns, unmerged "
            f"{row['cow_unmerged_p50_ns']:,.0f} ns net of the timer): the gap KSM side channels time."
        )
    return out
