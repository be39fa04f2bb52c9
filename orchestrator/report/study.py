"""The study report, from the study folder only (what store/study.py wrote), never the live host.

``write_report(study_dir)`` writes into ``<study>/report/``:

- ``summary.csv``      one row per trial (failed ones too) with every derived metric
- ``settings.csv``     one row per setting: means and 95% CI half widths across repetitions
- ``per_process.csv``  PSS before/after, merging pages, profit per trial x tracked process
- ``samples.parquet``  every trial's ksm.csv rows stacked, with trial_id and swept settings
- ``*.png``            the plots (report/plots.py), each readable alone
- ``report.html``      one self-contained page (plots embedded as data URIs, no external assets)
"""

from __future__ import annotations

import io
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from orchestrator.analysis import recommend, samplemetrics, studymetrics
from orchestrator.report import policy as policy_report
from orchestrator.report.costs import cost_findings, cost_sections
from orchestrator.report.diversity import diversity_findings, diversity_sections
from orchestrator.report.plots import Plot, build_plots, on_trials, pareto_tolerance_mib
from orchestrator.analysis.stats import (
    ONE_REPETITION,
    PAIRED,
    PARETO_TOLERANCE,
    WELCH,
    comparison_verdict,
    format_needed_range,
    pareto_mask,
)
from orchestrator.fsutil import atomic_write_bytes
from orchestrator.units import NO_VALUE, has_value, number, plus_minus
from orchestrator.store.studydata import StudyData
from orchestrator.analysis.studymetrics import StudyAnalysis, StudyMetrics
from orchestrator.report.pages import page_template

NEAR_MAX_FRACTION = 0.90


@dataclass(frozen=True)
class Finding:
    text: str
    warn: bool = False


def write_report(study_dir: Path, analysis: StudyAnalysis | None = None) -> Path:
    """Write the report folder for one study and return the path of report.html. `analysis`:
    the study already read and analysed (the sweep's, for trials.csv), else read here."""
    study_dir = Path(study_dir)
    if analysis is None or Path(analysis.study.study_dir) != study_dir:
        analysis = StudyAnalysis.of(study_dir)
    study, sm = analysis.study, analysis.metrics
    out_dir = study_dir / "report"
    out_dir.mkdir(exist_ok=True)

    trials_table = studymetrics.public_trials_table(sm)
    settings_table = _public(sm.settings)
    atomic_write_bytes(out_dir / "summary.csv", trials_table.to_csv(index=False).encode())
    atomic_write_bytes(out_dir / "settings.csv", settings_table.to_csv(index=False).encode())
    if not sm.per_process.empty:
        atomic_write_bytes(out_dir / "per_process.csv", sm.per_process.to_csv(index=False).encode())
    buffer = io.BytesIO()
    pq.write_table(studymetrics.samples_arrow(study, sm), buffer)
    atomic_write_bytes(out_dir / "samples.parquet", buffer.getvalue())
    del buffer

    plots = build_plots(study, sm)
    for plot in plots:
        atomic_write_bytes(out_dir / f"{plot.name}.png", plot.png)
    findings = (
        study_findings(sm) + [Finding(text) for text in diversity_findings(study, sm)] + host_findings(study.host)
    )
    html = render_html(study, sm, plots, findings)
    report_path = out_dir / "report.html"
    atomic_write_bytes(report_path, html.encode())
    return report_path


def _public(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop(columns=[c for c in frame.columns if c.startswith("_")])


# ----------------------------------------------------------------------------- findings


def host_findings(host: Mapping[str, Any] | None) -> list[Finding]:
    """A warning when KSM's counters misbehaved between host.json's before and after snapshots
    (hostinfo.judge_ksm_counters): the counts built on them are then suspect."""
    sanity = (host or {}).get("ksm_counter_sanity")
    if not isinstance(sanity, dict) or sanity.get("ok") is not False:
        return []
    known = (
        " This kernel is older than 6.10, where ksm_zero_pages could read -1 and pages_scanned stall."
        if sanity.get("known_counter_bugs")
        else ""
    )
    return [
        Finding(
            f"KSM's counters misbehaved on kernel {sanity.get('kernel')}: "
            + "; ".join(sanity.get("problems") or [])
            + "."
            + known
            + " The zero-page split and the scan speed of this study rest on them: treat them as suspect.",
            warn=True,
        )
    ]


def study_findings(sm: StudyMetrics) -> list[Finding]:
    """The "What this study says" section, computed from the data. Says so when data is short."""
    out: list[Finding] = []
    trials = sm.trials
    if trials.empty:
        return [Finding("Insufficient data: the study has no trials.", warn=True)]
    counts = trials["status"].value_counts()
    out.append(Finding(f"{len(trials)} trials: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + "."))
    failed = trials[trials["status"] != "ok"]
    if not failed.empty:
        listed = "; ".join(
            f"{r.trial_id} ({r.status}: {r.reason or 'no reason recorded'})" for r in failed.head(10).itertuples()
        )
        more = f" and {len(failed) - 10} more" if len(failed) > 10 else ""
        out.append(Finding(f"Trials without results: {listed}{more}.", warn=True))
    out.extend(_disturbed_findings(sm))

    settings = sm.settings
    on = settings[~settings["ksm_off"] & settings["saved_mib"].notna()] if not settings.empty else settings
    if on.empty:
        out.append(
            Finding(
                "Insufficient data: no successful KSM-on trial recorded KSM samples, so "
                "nothing can be said about savings or settings.",
                warn=True,
            )
        )
        return out
    if not sm.swept_axes:
        out.append(
            Finding(
                "No swept axis: every trial ran the same settings, so this study compares no "
                "settings; it measures one setting and its repeatability.",
                warn=True,
            )
        )
    if (on["n"] < 2).all():
        out.append(Finding(_unreplicated_text(sm), warn=True))

    out.extend(answer_findings(sm, on))
    top = on.loc[on["saved_mib"].idxmax()]
    pss, avail, net_note = _delta_savings(top, _net_columns(on))
    out.append(
        Finding(
            f"Largest saving: {top['setting']}: {plus_minus(top['saved_mib'], top['saved_mib_ci95'], ' MiB', integers=False)} by "
            f"pages_sharing; general_profit {number(top['general_profit_mib'], integers=False)} MiB, PSS drop {pss} MiB, "
            f"MemAvailable rise {avail} MiB; "
            f"ksmd used {plus_minus(top['ksmd_cpu_pct'], top['ksmd_cpu_pct_ci95'], '%', integers=False)} of one core. "
            + net_note
            + _pss_age_note(sm)
        )
    )
    costed = on[on["ksmd_cpu_pct"].notna()]
    if len(costed) > 1:
        mask = pareto_mask(costed["ksmd_cpu_pct"], costed["saved_mib"], pareto_tolerance_mib(costed))
        front = costed[mask].sort_values("ksmd_cpu_pct")
        listed = "; ".join(
            f"{r['setting']} ({r['saved_mib']:.1f} MiB at {r['ksmd_cpu_pct']:.1f}% CPU)" for _, r in front.iterrows()
        )
        out.append(
            Finding(
                f"Pareto-optimal settings (nothing else saves as much for less ksmd CPU; savings "
                f"within {PARETO_TOLERANCE:.0%} count as equal): {listed}."
            )
        )
        near = costed[costed["saved_mib"] >= NEAR_MAX_FRACTION * top["saved_mib"]]
        cheap = near.loc[near["ksmd_cpu_pct"].idxmin()]
        out.append(
            Finding(
                f"Cheapest setting reaching ≥{NEAR_MAX_FRACTION:.0%} of the largest saving: {cheap['setting']} "
                f"({number(cheap['saved_mib'], integers=False)} MiB at {number(cheap['ksmd_cpu_pct'], integers=False)}% of one core"
                + (
                    f", vs {number(top['ksmd_cpu_pct'], integers=False)}% for the largest)."
                    if cheap["setting"] != top["setting"]
                    else ")."
                )
            )
        )
    timed = on[on["time_to_90pct_s"].notna()]
    if len(timed) > 1:
        fast = timed.loc[timed["time_to_90pct_s"].idxmin()]
        out.append(
            Finding(
                f"Fastest to 90% of its final sharing: {fast['setting']} "
                f"({number(fast['time_to_90pct_s'], integers=False)} s after measure start)."
            )
        )
    rec = recommend.report_recommendation(sm)
    if rec is not None:  # `recommend` without limits: the largest saving, the cheaper of a tie
        out.append(
            Finding(
                "Recommendation (no CPU or tps limit; `recommend --max-ksmd-cpu ...` adds them, "
                "star on the frontier plot): " + rec.reason
            )
        )
    out.extend(Finding(text, warn) for text, warn in policy_report.policy_findings(sm))
    out.extend(saving_basis_findings(sm))
    out.extend(_convergence_findings(sm))
    out.extend(_disagreement_findings(sm))
    out.extend(order_findings(sm))
    out.extend(_ksm_off_findings(sm))
    out.extend(_noise_findings(sm))
    out.extend(Finding(text) for text in cost_findings(sm))
    return out


ANSWERED_SETTINGS = 12  # one sentence each; a larger sweep is read from the settings table


def _workload_answer(row: pd.Series, metric: str, label: str, k: int, one_repetition: bool) -> str | None:
    """'tps -7.1% ± 1.9% vs KSM off: <verdict>' for one setting, or None when not measured. The
    verdict is the family's (worst_verdict): with k settings, "differs" needs Holm across them."""
    comparison = studymetrics.settings_comparison(row, metric)
    if not math.isfinite(comparison.pct):
        return None
    change = f"{label} {plus_minus(comparison.pct, comparison.half_pct, '%', integers=False)} vs KSM off"
    judged = studymetrics.WorstChange(row, comparison, bool(row.get(f"{metric}_vs_off_holm", False)), k)
    return f"{change}: {worst_verdict(judged, one_repetition=one_repetition)}"


def answer_findings(sm: StudyMetrics, on: pd.DataFrame) -> list[Finding]:
    """The study's answer, one sentence per KSM-on setting: what it saved, what ksmd cost, and
    the workload's change vs KSM off with its interval and verdict."""
    one_repetition = bool((on["n"] < 2).all())
    out = []
    for _, row in on.head(ANSWERED_SETTINGS).iterrows():
        parts = [f"saved {plus_minus(row['saved_mib'], row['saved_mib_ci95'], ' MiB', integers=False)}"]
        if isinstance(row.get("ksmd_cpu_pct"), float) and math.isfinite(row["ksmd_cpu_pct"]):
            parts.append(
                f"ksmd {plus_minus(row['ksmd_cpu_pct'], row['ksmd_cpu_pct_ci95'], '%', integers=False)} of one core"
            )
        for metric, label in (("tps", "tps"), ("latency_p95_ms", "p95 latency")):
            column = f"{metric}_vs_off_pct"  # Holm's family, as studymetrics._add_holm draws it
            family = sm.settings[~sm.settings["ksm_off"]]
            k = int(pd.to_numeric(family[column], errors="coerce").notna().sum()) if column in family else 0
            answer = _workload_answer(row, metric, label, k, one_repetition)
            if answer:
                parts.append(answer)
        out.append(Finding(f"{row['setting']}: " + "; ".join(parts) + "."))
    if len(on) > ANSWERED_SETTINGS:
        out.append(Finding(f"... and {len(on) - ANSWERED_SETTINGS} more settings: see the settings table."))
    return out


def reference_rows(plan_text: str, sm: StudyMetrics) -> list[dict[str, str]]:
    """The plan's [[report.references]] beside this study's value of the same metric, over the
    successful KSM-on trials whose swept settings match the reference's `where`."""
    try:
        references = tomllib.loads(plan_text).get("report", {}).get("references", [])
    except tomllib.TOMLDecodeError:
        return []
    rows = []
    ok = on_trials(sm)
    for ref in references:
        metric, where = ref.get("metric"), ref.get("where") or {}
        match = ok[ok["_settings"].map(lambda s: all(s.get(k) == v for k, v in where.items()))] if not ok.empty else ok
        values = (
            pd.to_numeric(match[metric], errors="coerce").dropna()
            if metric in match.columns
            else pd.Series(dtype=float)
        )
        published = number(ref.get("low"), integers=False) + (
            f"–{number(ref['high'], integers=False)}" if ref.get("high") is not None else ""
        )
        ours = (
            f"{number(float(values.mean()), integers=False)} (range {number(float(values.min()), integers=False)}–{number(float(values.max()), integers=False)}, "
            f"{len(values)} trial(s))"
            if len(values)
            else "no matching trial"
        )
        rows.append(
            {
                "metric": str(metric),
                "where": ", ".join(f"{k}={v}" for k, v in where.items()) or "all",
                "published": published,
                "ours": ours,
                "source": str(ref.get("source", "")),
                "note": str(ref.get("note", "")),
            }
        )
    return rows


def saving_basis_findings(sm: StudyMetrics) -> list[Finding]:
    """Say which number the savings are: a time average for workloads that write during measure
    (one sample of a sawtooth is luck), the end value for those that do not."""
    ok = on_trials(sm)
    if "saving_basis" not in ok.columns or ok["saving_basis"].isna().all():
        return []
    churn = ok[ok["saving_basis"].astype(str).str.startswith("steady")]
    if churn.empty:
        return [
            Finding(
                "Savings are the values at the end of measure: the workload did not write during "
                "measure, so the saving had settled (the time averages are in summary.csv)."
            )
        ]
    spread = (churn["saved_mib_end"] - churn["saved_mib"]).abs()
    return [
        Finding(
            f"{len(churn)} trial(s) ran a workload that writes during measure: their savings are time averages "
            "over the steady part of measure (from the first time the saving reached 90% of its 95th "
            "percentile), not the last sample; the end value differed from the average by up to "
            f"{number(float(spread.max()), integers=False)} MiB (columns saved_mib_end, saved_mib_mean, saved_mib_steady)."
        )
    ]


def _convergence_findings(sm: StudyMetrics) -> list[Finding]:
    ok = on_trials(sm)
    known = ok[ok["converged"].notna()]
    if known.empty:
        return []
    moving = known[known["converged"] == False]  # noqa: E712 - object column of True/False/None
    tolerance = f"{sm.converge_tolerance_pct:g}%"
    if moving.empty:
        return [
            Finding(
                f"All {len(known)} successful KSM-on trials had converged (pages_sharing moved "
                f"≤ {tolerance} over the last "
                f"{samplemetrics.CONVERGENCE_WINDOW_FRACTION:.0%} of measure)."
            )
        ]
    return [
        Finding(
            f"{len(moving)} of {len(known)} successful KSM-on trials had not converged (pages_sharing "
            f"still moving > {tolerance} over the last "
            f"{samplemetrics.CONVERGENCE_WINDOW_FRACTION:.0%} of measure, or nothing merged yet): their "
            "savings are lower bounds; a longer measure phase would tell the final value.",
            warn=True,
        )
    ]


def _disagreement_findings(sm: StudyMetrics) -> list[Finding]:
    ok = on_trials(sm)
    ok = ok[ok["saved_mib"] > 0]
    if ok.empty:
        return []
    # net of drift when KSM-off trials measured it: the raw deltas include the guests' own growth
    net_of = _net_columns(ok)

    def view(raw: str, name: str) -> tuple[str, str]:
        return (studymetrics.NET_OF_DRIFT[raw], f"{name} (net of drift)") if raw in net_of else (raw, name)

    (pss_col, pss_name), (avail_col, avail_name) = (
        view("pss_drop_mib", "the tracked processes' PSS drop"),
        view("mem_available_rise_mib", "the MemAvailable rise"),
    )
    parts = []
    for column, name in ((pss_col, pss_name), (avail_col, avail_name), ("general_profit_mib", "general_profit")):
        ratio = (ok[column] / ok["saved_mib"]).dropna()
        if not ratio.empty:
            parts.append(f"{name} was {number(float(ratio.median()), integers=False)}x")
    if not parts:
        return []
    text = (
        "Four views of the saving, median over successful trials relative to pages_sharing: " + ", ".join(parts) + "."
    )
    over = ok[(ok[pss_col] > 1.2 * ok["saved_mib"]) | (ok[avail_col] > 1.2 * ok["saved_mib"])]
    splits = over["thp_split_page_delta"].dropna()
    if not over.empty and (splits > 0).any():
        text += (
            f" In {len(over)} trial(s) the host got back over 20% more than KSM counts, and ksmd split "
            f"transparent huge pages (thp_split_page up to +{number(float(splits.max()), integers=False)}): the freed zero "
            "tails of split THPs are memory KSM never counts."
        )
    return [Finding(text)]


def _ksm_off_findings(sm: StudyMetrics) -> list[Finding]:
    settings = sm.settings
    if sm.guests.empty or "tps" not in settings.columns or not settings["tps"].notna().any():
        return []
    if not settings["ksm_off"].any():
        return [
            Finding("Workload data but no KSM-off trial: throughput changes cannot be attributed to KSM.", warn=True)
        ]
    on = settings[~settings["ksm_off"] & settings.get("tps_vs_off_pct", pd.Series(dtype=float)).notna()]
    if on.empty:
        return [
            Finding("Insufficient data: no KSM-on setting has workload results to compare with KSM off.", warn=True)
        ]
    out = []
    for metric, name, worst_is in (("tps", "throughput", "min"), ("latency_p95_ms", "p95 latency", "max")):
        worst = studymetrics.worst_change(on, metric, worst_is)
        if worst is None:
            continue
        row, comparison = worst.row, worst.comparison
        change = f"{comparison.pct:+.1f}%"
        if comparison.has_interval:
            change += f" ± {comparison.half_pct:.1f}%"
        if row.get("baseline") == studymetrics.STUDY_OFF_MEAN:
            change += " (vs the mean of all KSM-off trials: none had the same non-KSM settings)"
        out.append(
            Finding(
                f"Worst {name} change vs KSM off: {row['setting']}: {change}; "
                f"{worst_verdict(worst, one_repetition=sm.blocks <= 1)}."
            )
        )
    return out


def worst_verdict(worst: studymetrics.WorstChange, one_repetition: bool = False) -> str:
    """The verdict on the worst of k settings: it was picked for being the worst, so "differs"
    needs Holm across the k (each setting's own 95% interval alone over-claims: 7.3% of studies
    with no effect and 5 settings). With one setting this is comparison_verdict's sentence."""
    comparison, k = worst.comparison, worst.family_size
    if k <= 1 or not comparison.has_interval:
        return comparison_verdict(comparison, one_repetition=one_repetition)
    unit = "blocks, paired" if comparison.method == PAIRED else "trials, Welch"
    replication = f"n={comparison.n} {unit}"
    holm = f"Holm across the {k} KSM-on settings"
    if worst.survives_holm:
        return f"differs from KSM off (95% level kept by {holm}; {replication})"
    if comparison.differs:
        return (
            f"no difference shown once the {k} settings are taken together (its own 95% interval excludes 0, "
            f"but among {k} settings one does that by chance too often; {holm}; {replication})"
        )
    return f"no difference detectable at 95% ({holm}; {replication})"


def order_findings(sm: StudyMetrics) -> list[Finding]:
    """Say how changes vs KSM off were compared, and why: pairs only mean something when the
    plan ran each block's trials side by side."""
    if not sm.settings["ksm_off"].any() or sm.blocks < 2:
        return []
    if sm.paired_by_block:
        return [
            Finding(
                "Changes vs KSM off are paired by block: the plan ran in blocked order (every setting and "
                "its KSM-off trial once per block, back to back), so drift between blocks cancels in each "
                "pair. A rerun of a disturbed trial ran after the whole study: its block is not paired."
            )
        ]
    return [
        Finding(
            f"Changes vs KSM off are compared by Welch across trials, not paired: the plan ran in "
            f"{sm.order} order, so a setting and the KSM-off trial of the same repetition did not run side "
            "by side, and pairing them would count the drift between them as an effect."
        )
    ]


def _unreplicated_text(sm: StudyMetrics) -> str:
    """Every setting has at most one usable trial: say plainly what that means."""
    if sm.blocks <= 1:
        head = ONE_REPETITION[0].upper() + ONE_REPETITION[1:]
    else:
        head = "Each setting has at most one usable trial: this study cannot tell workload differences from noise"
    return (
        head + ", nor memory or CPU differences between settings; no number here has an interval. "
        "Run with repetitions >= 2 (and ksm_off_baseline = true) to measure the run-to-run noise."
    )


def _net_columns(frame: pd.DataFrame) -> set[str]:
    """The raw delta-based savings whose net-of-drift value the frame has (studymetrics.NET_OF_DRIFT)."""
    return {raw for raw, net in studymetrics.NET_OF_DRIFT.items() if net in frame.columns and frame[net].notna().any()}


DELTA_NAMES = {"pss_drop_mib": "PSS drop", "mem_available_rise_mib": "MemAvailable rise"}


def _delta_savings(row: pd.Series, net_of: set[str]) -> tuple[str, str, str]:
    """The PSS drop and MemAvailable rise to headline (net of drift where the KSM-off trials
    measured the drift, raw otherwise) and the sentence saying which and why."""
    values = []
    for raw in DELTA_NAMES:
        if raw in net_of:
            net = studymetrics.NET_OF_DRIFT[raw]
            values.append(plus_minus(row[net], row[f"{net}_ci95"], integers=False))
        else:
            values.append(number(row[raw], integers=False))
    net_names = " and ".join(DELTA_NAMES[r] for r in DELTA_NAMES if r in net_of)
    raw_names = " and ".join(DELTA_NAMES[r] for r in DELTA_NAMES if r not in net_of)
    parts = []
    if net_names:
        parts.append(
            f"{net_names} {_is_are(net_names)} net of drift (each trial's change minus the same change in "
            "its matched KSM-off trial, same block when there is one), because guests keep growing during "
            "a trial and the raw change includes that growth"
        )
    if raw_names:
        parts.append(
            f"{raw_names} {_is_are(raw_names)} the raw change from baseline to the end of measure, "
            "including the guests' own growth: no matched KSM-off trial measured that growth"
        )
    return values[0], values[1], "; ".join(parts) + "."


def _pss_age_note(sm: StudyMetrics) -> str:
    """How old the PSS figures are: the sampler reads one target's PSS at a time under its CPU
    budget and the PSS drop sums each target's last read (samplemetrics.process_metrics)."""
    ages = on_trials(sm).get("pss_age_max_s")
    ages = ages.dropna() if ages is not None else ages
    if ages is None or ages.empty:
        return ""
    return (
        f" Each target's PSS is read in turn within the sampler's CPU budget and carried forward: the PSS "
        f"figures summed were up to {number(float(ages.max()), integers=False)} s old (median over trials of the oldest, "
        f"{number(float(ages.median()), integers=False)} s; column pss_age_max_s)."
    )


def _is_are(names: str) -> str:
    return "are" if " and " in names else "is"


def _disturbed_findings(sm: StudyMetrics) -> list[Finding]:
    """Trials the sweep marked disturbed (outside CPU load above the plan threshold during measure)."""
    hit = sm.trials[sm.trials["disturbed"]]
    if hit.empty:
        return []
    parts = []
    for row in hit.itertuples():
        load = (
            f"outside CPU {number(row.outside_cpu_pct, integers=False)}%"
            if isinstance(row.outside_cpu_pct, float) and math.isfinite(row.outside_cpu_pct)
            else "outside CPU above the threshold"
        )
        what = str(row.stats_note or "").removeprefix("disturbed; ")
        parts.append(f"{row.trial_id} ({load}; {what})")
    return [
        Finding(
            f"{len(hit)} disturbed trial(s), other load on the host above the plan's threshold during "
            f"measure: {'; '.join(parts)}. A disturbed trial is replaced by its rerun when the rerun "
            "succeeded; one without an ok rerun is used, and its numbers may include the disturbance.",
            warn=True,
        )
    ]


NO_NOISE_ESTIMATE = (
    "No run-to-run noise estimate: the study has fewer than 2 KSM-off trials with the same non-KSM "
    "settings, so it cannot say how much a result moves between identical runs. To get one, run "
    "with repetitions >= 2 and ksm_off_baseline = true: every block then repeats the KSM-off trial."
)
MAX_NOISE_FINDINGS = 3


def _noise_estimated(sm: StudyMetrics) -> pd.DataFrame:
    noise = sm.noise
    return noise[noise["sd"].notna()] if not noise.empty else noise


def _noise_findings(sm: StudyMetrics) -> list[Finding]:
    """One sentence per non-KSM setting group: how much identical runs moved, for the design
    the study ran (paired by block, or unpaired), and what that means for the smallest
    difference this study could see."""
    estimated = _noise_estimated(sm)
    if estimated.empty:
        return [Finding(NO_NOISE_ESTIMATE, warn=True)]
    out = []
    for _, group in list(estimated.groupby("_offkey", sort=False))[:MAX_NOISE_FINDINGS]:
        by_metric = group.set_index("metric")
        name = group["group"].iloc[0]
        if (by_metric["design"] == studymetrics.PAIRED_DESIGN).any():
            blocks = int(by_metric["n_blocks"].max())
            parts = [
                _paired_noise_phrase(metric, r, blocks)
                if r["design"] == studymetrics.PAIRED_DESIGN
                else _noise_phrase(metric, r, int(r["n_trials"])) + " (unpaired: no pairs of this metric)"
                for metric, r in by_metric.iterrows()
            ]
            out.append(
                Finding(
                    f"Noise floor, paired by block ({blocks} blocks, each KSM-on setting against the "
                    f"{name} trial of its block): " + "; ".join(parts) + ". (Smallest detectable: the "
                    f"change from KSM off that a paired 95% test over {blocks} blocks finds with 80% "
                    "power; ranges from the 95% range of the sd.)"
                )
            )
            continue
        n = int(by_metric["n_trials"].max())
        parts = [_noise_phrase(metric, r, n) for metric, r in by_metric.iterrows()]
        out.append(
            Finding(
                f"Noise floor, unpaired, from {n} KSM-off trials ({name}): "
                + "; ".join(parts)
                + f". (Smallest detectable: the difference between two settings of {n} trials each "
                "that a 95% test finds with 80% power.)"
            )
        )
    return out


def _needed_text(r: pd.Series) -> str:
    return format_needed_range(r["repetitions_for_5pct"], r["repetitions_for_5pct_low"], r["repetitions_for_5pct_high"])


def _paired_noise_phrase(metric: str, r: pd.Series, blocks: int) -> str:
    unit = r["sd_unit"] if r["sd_unit"] == "%" else f" {r['sd_unit']}"
    spread = f"sd {number(r['sd'], integers=False)}{unit} (95% range {number(r['sd_low'], integers=False)}-{number(r['sd_high'], integers=False)}{unit})"
    if metric == "tps":
        return (
            f"the per-block tps change vs KSM off varied by {spread}, so the smallest detectable tps change "
            f"at {blocks} blocks is {number(r['mde'], integers=False)}%; a 5% change needs {_needed_text(r)} blocks"
        )
    if metric == "latency_p95_ms":
        return f"per-block p95 latency change {spread}, smallest detectable change {number(r['mde'], integers=False)}%"
    return f"per-block MemAvailable difference {spread}, smallest detectable difference {number(r['mde'], integers=False)}{unit}"


def _noise_phrase(metric: str, r: pd.Series, n: int) -> str:
    if metric == "tps":
        return (
            f"tps varied {number(r['cv_pct'], integers=False)}% run to run (sd {number(r['sd'], integers=False)} tps), so with {n} trials per "
            f"setting the smallest detectable tps change is {number(r['mde_pct_of_mean'], integers=False)}% ({number(r['mde'], integers=False)} tps); "
            f"a 5% change would need {_needed_text(r)} repetitions"
        )
    if metric == "latency_p95_ms":
        return (
            f"p95 latency sd {number(r['sd'], integers=False)} ms (CV {number(r['cv_pct'], integers=False)}%), smallest detectable change "
            f"{number(r['mde'], integers=False)} ms"
        )
    return f"MemAvailable change sd {number(r['sd'], integers=False)} MiB, smallest detectable difference {number(r['mde'], integers=False)} MiB"


# ----------------------------------------------------------------------------- HTML


TRIAL_COLUMNS = (
    "trial_id",
    "status",
    "reason",
    "setting",
    "repetition",
    "saved_mib",
    "saving_basis",
    "saved_mib_end",
    "saved_share_before_refill_pct",
    "saved_share_after_refill_pct",
    "remerge_s_median",
    "merged_share_mean_pct",
    "general_profit_mib",
    "pss_drop_mib",
    "pss_drop_net_mib",
    "pss_age_max_s",
    "mem_available_rise_mib",
    "mem_available_rise_net_mib",
    "ksmd_cpu_pct",
    "ksmd_cpu_s",
    "mib_saved_per_ksmd_cpu_s",
    "time_to_90pct_s",
    "full_scans",
    "converged",
    "zero_pages_mib",
    "content_merged_mib",
    "scan_rate_achieved_pct",
    "thp_split_page_delta",
    "tps",
    "tps_guest_sd",
    "qps",
    "latency_p95_ms",
    "tps_vs_off_pct",
    "latency_p95_ms_vs_off_pct",
    "exposure_summary",
    "outside_cpu_pct",
    "disturbed",
    "stats_note",
    "guest_start",
    "guest_start_s",
    "data_problems",
)
SETTINGS_COLUMNS = (
    "saved_mib",
    "general_profit_mib",
    "pss_drop_mib",
    "pss_drop_net_mib",
    "mem_available_rise_mib",
    "mem_available_rise_net_mib",
    "ksmd_cpu_pct",
    "time_to_90pct_s",
    "tps",
    "tps_guest_sd",
    "tps_vs_off_pct",
    "latency_p95_ms",
    "latency_p95_ms_vs_off_pct",
)
NOISE_TABLE_COLUMNS = (
    "metric",
    "group",
    "design",
    "n_trials",
    "n_blocks",
    "sd_dof",
    "mean",
    "sd",
    "sd_range",
    "sd_unit",
    "cv_pct",
    "mde",
    "mde_pct_of_mean",
    "repetitions_for_5pct",
)
ALWAYS_SHOWN = ("trial_id", "status", "reason", "setting")
METHOD_SHORT = {PAIRED: " blocks, paired", WELCH: " trials, Welch"}
HOLM_MARK = " *"  # the change vs KSM off survives Holm across the KSM-on settings (report.html.j2 says so)


def _ci_cell(record: dict[str, Any], column: str) -> str:
    """ "mean ± half (n=K)": every interval says how many trials (or blocks) it is across."""
    if column.endswith("_vs_off_pct"):
        metric = column.removesuffix("_vs_off_pct")
        half, n = record.get(f"{metric}_vs_off_ci95_pct"), record.get(f"{metric}_vs_off_n")
        unit = METHOD_SHORT.get(record.get(f"{metric}_vs_off_method"), "")
    else:
        half, n, unit = record.get(f"{column}_ci95"), record.get(f"{column}_n"), ""
    text = plus_minus(record[column], half)
    if has_value(record[column]) and has_value(n):
        text += f" (n={int(n)}{unit})"
    if (
        column.endswith("_vs_off_pct")
        and isinstance(record.get(f"{metric}_vs_off_holm"), (bool, np.bool_))
        and record[f"{metric}_vs_off_holm"]
    ):
        text += HOLM_MARK
    return text


def _table(frame: pd.DataFrame, columns: tuple[str, ...], ci: bool = False) -> dict[str, Any]:
    """Headers and formatted cells; empty columns are dropped (the CSV keeps everything)."""
    shown = [c for c in columns if c in frame.columns and (c in ALWAYS_SHOWN or frame[c].notna().any())]
    rows = []
    for record in frame.to_dict("records"):
        cells = []
        for c in shown:
            value = record[c]
            has_ci = f"{c}_ci95" in record or c.endswith("_vs_off_pct")
            text = _ci_cell(record, c) if ci and has_ci else number(value)
            # words read left-aligned, numbers right-aligned
            cells.append({"text": text, "is_text": isinstance(value, str)})
        rows.append({"cells": cells, "failed": record.get("status", "ok") != "ok"})
    return {"headers": shown, "rows": rows}


def _noise_table(sm: StudyMetrics) -> dict[str, Any] | None:
    estimated = _noise_estimated(sm)
    if estimated.empty:
        return None
    needed = [_needed_text(r) for _, r in estimated.iterrows()]
    sd_range = [
        f"{number(r['sd_low'])}-{number(r['sd_high'])}" if math.isfinite(r["sd_low"]) else NO_VALUE
        for _, r in estimated.iterrows()
    ]
    shown = estimated.assign(repetitions_for_5pct=needed, sd_range=sd_range)
    return _table(shown, NOISE_TABLE_COLUMNS)


def _flatten(prefix: str, value: Any) -> list[tuple[str, str]]:
    if isinstance(value, dict):
        return [kv for k, v in value.items() for kv in _flatten(f"{prefix}.{k}" if prefix else str(k), v)]
    return [(prefix, str(value))]


def _utc(wall: Any) -> str | None:
    if not isinstance(wall, (int, float)):
        return None
    return datetime.fromtimestamp(wall, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def render_html(study: StudyData, sm: StudyMetrics, plots: list[Plot], findings: list[Finding]) -> str:
    settings_frame = sm.settings
    settings_table = (
        _table(settings_frame, ("setting", "trials", "ok", "n", *SETTINGS_COLUMNS), ci=True)
        if not settings_frame.empty
        else {"headers": [], "rows": []}
    )
    per_process = _table(sm.per_process, tuple(sm.per_process.columns)) if not sm.per_process.empty else None
    return page_template("report.html.j2").render(
        name=str(study.study.get("name") or study.study_dir.name),
        study_dir=str(study.study_dir),
        created_wall=_utc(study.study.get("created_wall")),
        findings=findings,
        plots=plots,
        trials_table=_table(studymetrics.public_trials_table(sm), TRIAL_COLUMNS),
        settings_table=settings_table,
        noise_table=_noise_table(sm),
        no_noise_estimate=NO_NOISE_ESTIMATE,
        per_process=per_process,
        cost_sections=cost_sections(sm, _table) + diversity_sections(study, sm, _table),
        swept_axes=sm.swept_axes,
        page_size_bytes=sm.page_size_bytes,
        host_rows=_flatten("", study.host),
        plan_text=study.plan_text,
        references=reference_rows(study.plan_text, sm),
        convergence_tolerance_pct=sm.converge_tolerance_pct,
        convergence_window_pct=100 * samplemetrics.CONVERGENCE_WINDOW_FRACTION,
        convergence_min_samples=samplemetrics.CONVERGENCE_MIN_SAMPLES,
    )
