"""The report's image-diversity section and finding: the saving of guests of several images
split into zero pages, within-group and across-group sharing (analysis/costs.py)."""

from __future__ import annotations

import math
from typing import Any, Callable

import pandas as pd

from orchestrator.analysis import costs as diversity
from orchestrator.analysis.stats import mean_ci95
from orchestrator.analysis.studymetrics import StudyMetrics
from orchestrator.units import number, plus_minus

TableFn = Callable[[pd.DataFrame, tuple[str, ...]], dict[str, Any]]

ESTIMATOR = (
    'Estimator (docs/methodology.md, "Sharing across images"): per block, within-group sharing = the sum '
    "over the mix's images of the one-image trial's content saving × (k − 1)/(n − 1) (k guests of the image "
    "in the mix, n in its one-image trial); across-group = the mixed trial's content saving − within. It "
    "assumes what guests of one image share is in every one of them; pages duplicated inside one guest make "
    "it read across-group sharing too high. Content saving = pages_sharing at the end of measure with "
    "use_zero_pages = 1 (zero pages are counted apart, in ksm_zero_pages; per image from each QEMU's "
    "/proc/PID/ksm_stat). Intervals are 95% t intervals over blocks, given only with 2 or more blocks."
)


def _one_image(sm: StudyMetrics) -> pd.DataFrame:
    trials = sm.trials
    if trials.empty or "one_image_content_pct_of_ram" not in trials.columns:
        return trials.iloc[0:0]
    used = trials[trials["used_in_stats"] & ~trials["ksm_off"]]
    return used[used["one_image_content_pct_of_ram"].notna()]


def diversity_sections(study: Any, sm: StudyMetrics, table: TableFn) -> list[dict[str, Any]]:
    if not diversity.mixes_images(study):
        return []
    rows = diversity.split(study, sm.trials, sm.per_process, sm.page_size_bytes)
    paragraphs = [ESTIMATOR]
    one = _one_image(sm)
    if not one.empty:
        checks = "; ".join(
            f"{setting}: {number(float(group['mappings_per_ksm_page'].mean()), integers=False)}"
            for setting, group in one.groupby("setting", sort=False)
        )
        paragraphs.append(
            "Assumption check (one-image trials, mean over blocks): guests' pages mapping each KSM "
            f"page, sum of ksm_merging_pages / pages_shared: {checks}. It equals the guest count "
            "when every shared page is in every guest once; below it, some pages are shared by "
            "fewer guests; above it, pages are duplicated inside a guest (self-sharing), which "
            "the (k − 1)/(n − 1) scaling treats as sharing between guests, so across-group "
            "sharing reads high. Either way the split is an approximation."
        )
    return [
        {
            "id": "image-diversity",
            "title": "Sharing within and across image groups",
            "paragraphs": paragraphs,
            "table": table(rows, diversity.SPLIT_COLUMNS),
        }
    ]


def diversity_findings(study: Any, sm: StudyMetrics) -> list[str]:
    """One sentence per mixed setting, and one on the one-image settings beside it."""
    if not diversity.mixes_images(study):
        return []
    rows = diversity.split(study, sm.trials, sm.per_process, sm.page_size_bytes)
    if rows.empty:
        return [
            "Guests of several images ran, but no mixed KSM-on trial has a usable content saving "
            "(use_zero_pages = 1 and a successful trial are needed): no within/across split."
        ]
    out = []
    for _, s in diversity.summarize(rows).iterrows():
        blocks = int(s["blocks"])
        replication = f"{blocks} blocks" if blocks >= 2 else "one block: no interval, the split is not replicated"
        if not math.isfinite(s["across_mib"]):
            out.append(
                f"{s['setting']}: no within/across split, a one-image trial of one of its images is "
                "missing in its block."
            )
            continue
        out.append(
            f"{s['setting']}: content saving {plus_minus(s['content_mib'], s['content_mib_ci95'], ' MiB', integers=False)}"
            f" ({plus_minus(s['content_pct_of_ram'], s['content_pct_of_ram_ci95'], '%', integers=False)} of the guests' RAM)"
            f" plus {plus_minus(s['zero_mib'], s['zero_mib_ci95'], ' MiB', integers=False)} of zero pages; of the content"
            f" saving, within image groups {plus_minus(s['within_mib'], s['within_mib_ci95'], ' MiB', integers=False)},"
            f" across groups {plus_minus(s['across_mib'], s['across_mib_ci95'], ' MiB', integers=False)}"
            f" ({plus_minus(s['across_pct'], s['across_pct_ci95'], '%', integers=False)}; {replication}; estimator in"
            ' the section "Sharing within and across image groups").'
        )
    one = _one_image(sm)
    if not one.empty:
        parts = []
        for setting, group in one.groupby("setting", sort=False):
            mean, half, n = mean_ci95(group["one_image_content_pct_of_ram"])
            parts.append(f"{setting} {plus_minus(mean, half, '%', integers=False)} (n={n})")
        out.append("Content saving of the one-image settings, % of the guests' RAM: " + "; ".join(parts) + ".")
    return out
