"""Sharing between guests of different images ([guests] groups): the saving split into zero
pages, pages shared within an image group and pages shared across groups.

Per KSM-on trial (use_zero_pages = 1, so empty pages are counted in ksm_zero_pages and kept out
of pages_sharing): the content saving S (pages_sharing at the end of measure,
``content_merged_mib``), the zero pages Z (``zero_pages_mib``), and the layout (trial.json's
[guests]: which image each guest booted). A trial is "one-image" when every guest booted the
same image, "mixed" otherwise.

The estimator, for each mixed trial and the one-image trials of the same block (same KSM
settings), one value per block:

    within = sum over the images g of the mix:  S_g * (k_g - 1) / (n_g - 1)
    across = S_mix - within

S_g is the content saving of the one-image trial of image g with n_g guests, k_g the guests of
image g in the mix. Assumption: a group's saving grows by the same amount with every guest
after the first, i.e. what KSM shares among guests of one image is in every one of them, so
k of the n guests save (k - 1)/(n - 1) of what all n save. Pages duplicated inside one guest
break it (they scale with k/n, not (k-1)/(n-1)): then `within` is too low and `across` too high
by that self-sharing times (n - k)/(n (n - 1)) per group. The per-process ksm_stat checks the
assumption: in a one-image trial, (sum of the guests' ksm_merging_pages) / pages_shared is the
mean number of guests' pages mapping one KSM page, n when every shared page is in every guest
(``mappings_per_ksm_page``). Across-group sharing is `across` as a share of S_mix; an interval
is given only over 2 or more blocks (the block is the replicated unit).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping
from typing import Any

import pandas as pd

from orchestrator.analysis.stats import mean_ci95
from orchestrator.units import MIB, number

SPLIT_COLUMNS = ("trial_id", "block", "setting", "guests", "guest_ram_mib", "content_mib", "zero_mib",
                 "within_mib", "across_mib", "within_pct", "across_pct", "zero_pct", "content_pct_of_ram",
                 "zero_by_image_mib")
SUMMARY_COLUMNS = ("setting", "blocks", "content_mib", "content_mib_ci95", "zero_mib", "zero_mib_ci95",
                   "within_mib", "within_mib_ci95", "across_mib", "across_mib_ci95", "across_pct",
                   "across_pct_ci95", "content_pct_of_ram", "content_pct_of_ram_ci95")
# trials-table columns this module adds (references and summary.csv read them)
TRIAL_COLUMNS = ("one_image_content_pct_of_ram", "mixed_content_pct_of_ram", "one_image_saved_pct_of_ram",
                 "mixed_saved_pct_of_ram", "within_group_pct", "across_group_pct", "across_group_pct_of_ram",
                 "mappings_per_ksm_page")


def image_id(table: Any) -> str:
    """One image's identity as a plan names it: a bare recipe name is {"recipe": name}."""
    if isinstance(table, str):
        table = {"recipe": table}
    return json.dumps(table or {}, sort_keys=True, default=str)


def guest_layout(guests: Mapping[str, Any] | None) -> list[str]:
    """Each guest's image id by index, from a trial's stored [guests] table."""
    if not guests:
        return []
    groups = guests.get("groups")
    if isinstance(groups, list) and groups:
        return [image_id(g.get("image") if g.get("image") is not None else guests.get("image"))
                for g in groups for _ in range(int(g.get("count") or 0))]
    return [image_id(guests.get("image"))] * int(guests.get("count") or 0)


def guest_index(label: Any) -> int | None:
    """A guest's index from its domain name (`ksmlab-<stem>-<index>`)."""
    found = re.search(r"-(\d+)$", str(label))
    return int(found.group(1)) if found else None


def _finite(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number if math.isfinite(number) else math.nan


def _pct(part: float, whole: float) -> float:
    return 100.0 * part / whole if whole > 0 and math.isfinite(part) else math.nan


def estimate_block(mixed: Mapping[str, Any], alone: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """The split of one mixed trial, from the one-image trials of its block.

    mixed: {"layout": [image id per guest], "content_mib", "zero_mib"}; alone: {image id:
    {"guests": n, "content_mib"}}. NaN within/across when an image of the mix has no usable
    one-image trial (or one of a single guest: nothing to scale)."""
    counts = Counter(mixed["layout"])
    content, zero = _finite(mixed.get("content_mib")), _finite(mixed.get("zero_mib"))
    within = 0.0
    for image, k in counts.items():
        ref = alone.get(image)
        n = int(ref["guests"]) if ref else 0
        saved = _finite(ref["content_mib"]) if ref else math.nan
        if k == 1:
            continue  # one guest shares nothing with its own group (self-sharing: see the docstring)
        if n < 2 or not math.isfinite(saved):
            within = math.nan
            break
        within += saved * (k - 1) / (n - 1)
    across = content - within
    return {"content_mib": content, "zero_mib": zero, "within_mib": within, "across_mib": across,
            "within_pct": _pct(within, content), "across_pct": _pct(across, content),
            "zero_pct": _pct(zero, content + zero) if math.isfinite(zero) else math.nan}


def _trial_layouts(study: Any) -> dict[str, dict[str, Any]]:
    out = {}
    for data in study.trials:
        guests = data.trial.get("guests") or {}
        layout = guest_layout(guests)
        memory = _finite(guests.get("memory_mib"))
        out[data.trial_id] = {"layout": layout, "ram_mib": memory * len(layout),
                              "ksm": json.dumps(data.trial.get("ksm") or {}, sort_keys=True, default=str)}
    return out


def _zero_by_image(per_process: pd.DataFrame, trial_id: str, layout: list[str],
                   page_size_bytes: int) -> dict[str, float]:
    """Zero pages of each image's guests (per-process ksm_stat ksm_zero_pages), MiB."""
    if per_process.empty or "ksm_zero_pages" not in per_process.columns:
        return {}
    rows = per_process[per_process["trial_id"] == trial_id]
    out: dict[str, float] = {}
    for label, zero in zip(rows["label"], pd.to_numeric(rows["ksm_zero_pages"], errors="coerce")):
        index = guest_index(label)
        if index is None or index >= len(layout) or not math.isfinite(zero):
            continue
        out[layout[index]] = out.get(layout[index], 0.0) + zero * page_size_bytes / MIB
    return out


def _mappings_per_ksm_page(per_process: pd.DataFrame, trial: Mapping[str, Any], page_size_bytes: int) -> float:
    """sum of the guests' ksm_merging_pages / pages_shared at the end of measure."""
    if per_process.empty or "ksm_merging_pages" not in per_process.columns:
        return math.nan
    merging = pd.to_numeric(per_process.loc[per_process["trial_id"] == trial["trial_id"], "ksm_merging_pages"],
                            errors="coerce").sum()
    sharing = _finite(trial.get("content_merged_mib")) * MIB / page_size_bytes
    shared = _finite(trial.get("merged_pages_end")) - sharing
    return float(merging) / shared if shared > 0 and merging > 0 else math.nan


def split(study: Any, trials: pd.DataFrame, per_process: pd.DataFrame, page_size_bytes: int) -> pd.DataFrame:
    """One row per usable mixed KSM-on trial (SPLIT_COLUMNS); empty when the study has none."""
    layouts = _trial_layouts(study)
    usable = trials[trials["used_in_stats"] & ~trials["ksm_off"]] if not trials.empty else trials
    rows = []
    for _, trial in usable.iterrows():
        info = layouts.get(trial["trial_id"])
        if not info or len(set(info["layout"])) < 2:
            continue
        alone: dict[str, dict[str, Any]] = {}
        for _, other in usable[usable["repetition"] == trial["repetition"]].iterrows():
            other_info = layouts.get(other["trial_id"])
            if other_info and len(set(other_info["layout"])) == 1 and other_info["ksm"] == info["ksm"]:
                alone[other_info["layout"][0]] = {"guests": len(other_info["layout"]),
                                                  "content_mib": other["content_merged_mib"]}
        est = estimate_block({"layout": info["layout"], "content_mib": trial["content_merged_mib"],
                              "zero_mib": trial["zero_pages_mib"]}, alone)
        zero_by_image = _zero_by_image(per_process, trial["trial_id"], info["layout"], page_size_bytes)
        rows.append({"trial_id": trial["trial_id"], "block": trial["repetition"], "setting": trial["setting"],
                     "guests": len(info["layout"]), "guest_ram_mib": info["ram_mib"], **est,
                     "content_pct_of_ram": _pct(est["content_mib"], info["ram_mib"]),
                     "zero_by_image_mib": "; ".join(f"{_short(k)} {number(v, integers=False)}" for k, v in zero_by_image.items())})
    return pd.DataFrame(rows, columns=list(SPLIT_COLUMNS))


def _short(image: str) -> str:
    table = json.loads(image)
    value = table.get("recipe") or table.get("manifest") or table.get("disk") or "image"
    return str(value).rsplit("/", 1)[-1].removesuffix(".toml")


def summarize(rows: pd.DataFrame) -> pd.DataFrame:
    """Per mixed setting: the mean over blocks and, from 2 blocks on, its 95% t half width."""
    out = []
    for setting, group in rows.groupby("setting", sort=False):
        record: dict[str, Any] = {"setting": setting}
        for column in ("content_mib", "zero_mib", "within_mib", "across_mib", "across_pct", "content_pct_of_ram"):
            mean, half, n = mean_ci95(pd.to_numeric(group[column], errors="coerce"))
            record[column], record[f"{column}_ci95"] = mean, half
            if column == "across_mib":
                record["blocks"] = n
        out.append(record)
    return pd.DataFrame(out, columns=list(SUMMARY_COLUMNS))


def add_columns(trials: pd.DataFrame, study: Any, per_process: pd.DataFrame, page_size_bytes: int) -> None:
    """TRIAL_COLUMNS into the trials table, in place: the content saving (zero pages excluded)
    and the whole saving (zero pages included) as % of the guests' RAM, for one-image and mixed
    trials apart (the report's references compare each with published figures), the
    within/across shares of mixed trials, and the mappings per KSM page of one-image trials
    (the estimator's assumption check)."""
    for column in TRIAL_COLUMNS:
        trials[column] = math.nan
    if trials.empty or "content_merged_mib" not in trials.columns:
        return
    layouts = _trial_layouts(study)
    for index, trial in trials.iterrows():
        info = layouts.get(trial["trial_id"])
        if not info or not info["layout"] or trial["ksm_off"]:
            continue
        content = _finite(trial["content_merged_mib"])
        kind = "one_image" if len(set(info["layout"])) == 1 else "mixed"
        trials.at[index, f"{kind}_content_pct_of_ram"] = _pct(content, info["ram_mib"])
        trials.at[index, f"{kind}_saved_pct_of_ram"] = _pct(content + _finite(trial["zero_pages_mib"]), info["ram_mib"])
        if kind == "one_image":
            trials.at[index, "mappings_per_ksm_page"] = _mappings_per_ksm_page(per_process, trial, page_size_bytes)
    if "used_in_stats" not in trials.columns:
        return
    rows = split(study, trials, per_process, page_size_bytes)
    for _, row in rows.iterrows():
        hit = trials["trial_id"] == row["trial_id"]
        trials.loc[hit, "within_group_pct"] = row["within_pct"]
        trials.loc[hit, "across_group_pct"] = row["across_pct"]
        trials.loc[hit, "across_group_pct_of_ram"] = _pct(row["across_mib"], row["guest_ram_mib"])


def mixes_images(study: Any) -> bool:
    """Does any trial of the study run guests of more than one image?"""
    return any(len(set(guest_layout(d.trial.get("guests")))) > 1 for d in study.trials)
