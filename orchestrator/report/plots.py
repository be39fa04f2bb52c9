"""The report's plots: each a Plot holding PNG bytes and readable alone, drawn from the loaded
study (studydata.py) and its metrics (studymetrics.py). A plot with nothing to show is left out,
not drawn empty. report/study.py writes them as *.png and embeds them in report.html; report/compare.py
and report/history.py draw their own Plots.

``used_trials``, ``on_trials`` and ``pareto_tolerance_mib`` are shared with report/study.py's findings,
so a plot and the sentence about it select the same trials.
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure

from orchestrator.analysis import recommend, samplemetrics, studymetrics
from orchestrator.report import policy as policy_report
from orchestrator.units import MIB
from orchestrator.analysis.stats import PARETO_TOLERANCE, mean_ci95, mean_half_width95, pareto_mask
from orchestrator.store.studydata import StudyData
from orchestrator.analysis.studymetrics import StudyMetrics

MAX_POINTS_PER_LINE = 2000  # longer traces keep each bucket's min and max: a sawtooth stays one
MAX_SCAN_MARKERS = 40
MAX_SERIES_PER_PANEL = 6
MAX_KEY_LINES = 25
MAX_LEGEND_SETTINGS = 12  # more settings than this: the time plot is coloured by one axis  # more combinations of the other axes than this are pooled


@dataclass(frozen=True)
class Plot:
    name: str
    title: str
    caption: str
    png: bytes

    @property
    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def _colors(n: int) -> list[Any]:
    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    return [colormaps["viridis"](i / max(n - 1, 1)) for i in range(n)]


def build_plots(study: StudyData, sm: StudyMetrics) -> list[Plot]:
    """Every plot the data allows; a plot with nothing to show is left out, not drawn empty."""
    plots = [
        p
        for p in (
            _plot_saving_over_time(study, sm),
            _plot_vs_setting(sm),
            _plot_frontier(sm),
            _plot_workload(sm),
            _plot_change_vs_off(sm),
            _plot_policy_knobs(study, sm),
        )
        if p is not None
    ]
    return plots


def _plot_policy_knobs(study: StudyData, sm: StudyMetrics) -> Plot | None:
    drawn = policy_report.plot_policy_knobs(study, sm)
    return Plot(*drawn) if drawn else None


def _natural_key(value: Any) -> tuple[int, float, str]:
    """Sort numbers as numbers (5 < 20 < 100), then everything else as text."""
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(value))


def _line_colours(sm: StudyMetrics) -> tuple[dict[str, Any], dict[str, str], str | None]:
    """Colour per trial group and legend label per group. With more settings than a legend can
    hold, colour by one swept axis (a KSM one if any) and say so; lines of one colour then differ
    in the other axes."""
    ok = sm.trials[(sm.trials["status"] == "ok") & ~sm.trials["ksm_off"]]
    groups = list(dict.fromkeys(ok["_group"]))
    labels = dict(zip(sm.trials["_group"], sm.trials["setting"]))
    if len(groups) <= MAX_LEGEND_SETTINGS or not sm.swept_axes:
        return dict(zip(groups, _colors(len(groups)))), labels, None
    axis = next((a for a in sm.swept_axes if a in sm.ksm_axes), sm.swept_axes[0])
    values = sorted({str(v) for v in ok[axis]}, key=_natural_key)
    colour_of_value = dict(zip(values, _colors(len(values))))
    first_axis = ok.drop_duplicates("_group").set_index("_group")[axis].astype(str)
    colours = {g: colour_of_value[first_axis[g]] for g in groups}
    labels.update({g: f"{axis}={first_axis[g]}" for g in groups})
    return colours, labels, axis


def _plot_saving_over_time(study: StudyData, sm: StudyMetrics) -> Plot | None:
    info = sm.trials.set_index("trial_id")
    color_of, label_of, coloured_by = _line_colours(sm)
    fig = Figure(figsize=(11, 5.5))
    ax = fig.add_subplot()
    labelled: set[str] = set()
    drawn = 0
    zero_lines = False
    marker_stride_max = 1
    for data in study.trials:
        row = info.loc[data.trial_id]
        if row["status"] != "ok" or data.ksm is None or "pages_sharing" not in data.ksm.columns:
            continue
        ksm = data.ksm
        measure_rows = np.flatnonzero(samplemetrics.phase_mask(ksm, "measure"))
        if measure_rows.size == 0:
            continue
        t_s = pd.to_numeric(ksm["t_s"], errors="coerce").to_numpy(float)
        t_rel = t_s - t_s[measure_rows[0]]
        saved_mib = samplemetrics.saved_pages_series(ksm, row["_ksm"]) * sm.page_size_bytes / MIB
        keep = envelope_indices(saved_mib, MAX_POINTS_PER_LINE)
        color = "0.5" if row["ksm_off"] else color_of[row["_group"]]
        label = label_of[row["_group"]]
        label, shown = (None, label) if label in labelled else (label, label)
        labelled.add(shown)
        ax.plot(
            t_rel[keep],
            saved_mib[keep],
            color=color,
            lw=0.9 if churning(row) else 1.3,
            alpha=0.85,
            ls="--" if row["ksm_off"] else "-",
            label=label,
        )
        if samplemetrics.zero_pages_counted(row["_ksm"]) and "ksm_zero_pages" in ksm.columns:
            # The same trial's content merges alone: the gap down to this line is zero pages.
            content_mib = (
                pd.to_numeric(ksm["pages_sharing"], errors="coerce").to_numpy(float) * sm.page_size_bytes / MIB
            )
            ax.plot(t_rel[keep], content_mib[keep], color=color, lw=1.0, alpha=0.85, ls=":")
            zero_lines = True
        if "full_scans" in ksm.columns:
            scans = pd.to_numeric(ksm["full_scans"], errors="coerce").to_numpy(float)
            done = np.flatnonzero(np.diff(scans) > 0) + 1
            if done.size:
                every = max(1, math.ceil(done.size / MAX_SCAN_MARKERS))
                marker_stride_max = max(marker_stride_max, every)
                done = done[::every]
                ax.plot(t_rel[done], saved_mib[done], ls="none", marker="o", ms=3.5, color=color)
        drawn += 1
    if drawn == 0:
        return None
    ax.axvline(0, color="0.3", lw=0.8, ls=":")
    ax.annotate(
        "measure starts",
        xy=(0, 1),
        xycoords=("data", "axes fraction"),
        xytext=(3, -12),
        textcoords="offset points",
        fontsize=8,
        color="0.3",
    )
    scan_note = "dots = completed full scans" + (
        f" (every {marker_stride_max}th at most)" if marker_stride_max > 1 else ""
    )
    ax.plot([], [], ls="none", marker="o", ms=3.5, color="0.2", label=scan_note)
    if zero_lines:
        ax.plot(
            [],
            [],
            ls=":",
            color="0.2",
            label="dotted line = content merges only (use_zero_pages=1: the gap above it is zero pages)",
        )
    ax.set_title(
        "Memory saved over time ((pages_sharing + zero pages) x page size), one colour per "
        + (f"{coloured_by} value" if coloured_by else "setting")
    )
    ax.set_xlabel("time since measure start (s)")
    ax.set_ylabel("saved (MiB)")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: (labels[i].startswith("dots"), _label_key(labels[i])))
    ax.legend(
        [handles[i] for i in order],
        [labels[i] for i in order],
        fontsize=7 if len(labels) > 8 else 8,
        ncol=2 if len(labels) > 24 else 1,
        loc="upper left",
        bbox_to_anchor=(1.01, 1),
    )
    grouping = (
        f"colour = {coloured_by}; lines of one colour differ in the other swept axes"
        if coloured_by
        else "repetitions share a colour"
    )
    return Plot(
        "saving_over_time",
        "Saving over time",
        f"{drawn} successful trials; {grouping}. The saving is KSM's raw count "
        "(pages_sharing, plus zero pages when use_zero_pages=1), before metadata cost. Every "
        "sample is drawn (long traces keep each stretch's lowest and highest), so a workload that "
        "refills its pages shows its sawtooth: merges broken at each refill, then re-made."
        + (
            " For trials with use_zero_pages=1 a dotted line in the same colour is the content merges "
            "only (pages_sharing): the gap above it is zero pages (ksm_zero_pages)."
            if zero_lines
            else ""
        ),
        _png(fig),
    )


def churning(row: Any) -> bool:
    basis = row.get("saving_basis") if hasattr(row, "get") else None
    return isinstance(basis, str) and basis.startswith("steady")


def envelope_indices(values: np.ndarray, max_points: int) -> np.ndarray:
    """All indices, or for longer series each bucket's argmin and argmax in time order: a
    stride would skip the troughs of a sawtooth and draw a smooth line that never happened."""
    n = values.size
    if n <= max_points:
        return np.arange(n)
    buckets = np.array_split(np.arange(n), max_points // 2)
    filled = np.nan_to_num(values, nan=0.0)
    keep = [idx for b in buckets for idx in sorted({b[np.argmin(filled[b])], b[np.argmax(filled[b])]})]
    return np.asarray(keep)


def _label_key(label: str) -> list[tuple[int, float, str]]:
    """Sort "a=5, b=20" labels by their values, numerically where they are numbers."""
    return [_natural_key(part.split("=", 1)[-1]) for part in label.split(", ")]


def _axis_positions(values: pd.Series) -> tuple[np.ndarray, list[str] | None, bool]:
    """x positions for an axis' values: numbers as they are (log scale when they span 20x),
    anything else as evenly spaced categories (tick labels returned)."""
    numeric = pd.to_numeric(values, errors="coerce")
    if numeric.notna().all() and values.map(lambda v: not isinstance(v, bool)).all():
        x = numeric.to_numpy(float)
        log = bool((x > 0).all() and x.max() / x.min() >= 20)
        return x, None, log
    cats = sorted({str(v) for v in values}, key=_natural_key)
    return np.array([cats.index(str(v)) for v in values], dtype=float), cats, False


def _ci_table(frame: pd.DataFrame, by: list[str], column: str) -> pd.DataFrame:
    """mean, 95% CI half width and n of column per group (vectorized t quantiles)."""
    keyed = frame.assign(**{b: frame[b].astype(str) for b in by}, _x=frame[by[0]])
    stats = (
        keyed.groupby(by, sort=False)
        .agg(x=("_x", "first"), mean=(column, "mean"), std=(column, "std"), n=(column, "count"))
        .reset_index()
    )
    stats["ci"] = mean_half_width95(stats["std"].to_numpy(float), stats["n"].to_numpy(float))
    return stats[stats["n"] > 0]


def _series_by_others(frame: pd.DataFrame, axis: str, others: list[str]) -> tuple[list[str], bool]:
    """The other swept axes to split lines by, or none (pooled) when that makes too many lines."""
    if not others:
        return [], False
    combos = frame[others].astype(str).drop_duplicates()
    return (others, False) if len(combos) <= MAX_SERIES_PER_PANEL else ([], True)


def _draw_ci_series(
    ax: Any, frame: pd.DataFrame, axis: str, split: list[str], column: str, label: str | None = None
) -> tuple[list[str] | None, bool]:
    """One errorbar line per combination of the split columns; positions shared by all lines.
    Split columns named with a leading underscore label lines by value alone ("KSM off")."""
    stats = _ci_table(frame, [axis, *split], column)
    if stats.empty:
        return None, False
    positions, cats, log = _axis_positions(stats["x"])
    stats = stats.assign(_pos=positions)
    series = [((), stats)] if not split else list(stats.groupby(split, sort=False))
    series.sort(key=lambda item: [_natural_key(k) for k in (item[0] if isinstance(item[0], tuple) else (item[0],))])
    for (key, part), color in zip(series, _colors(len(series))):
        key_t = key if isinstance(key, tuple) else (key,)
        line_label = ", ".join(str(k) if a.startswith("_") else f"{a}={k}" for a, k in zip(split, key_t)) or label
        style: dict[str, Any] = {"color": color, "marker": "o", "capsize": 3, "lw": 1.3}
        if "KSM off" in key_t:
            style.update(color="k", ls="--")
        part = part.sort_values("_pos")
        ax.errorbar(part["_pos"], part["mean"], yerr=part["ci"], label=line_label, **style)
    return cats, log


def _format_axis(ax: Any, cats: list[str] | None, log: bool) -> None:
    if cats is not None:
        ax.set_xticks(range(len(cats)), cats, rotation=30 if max(map(len, cats)) > 6 else 0)
    elif log:
        ax.set_xscale("log")
    ax.grid(alpha=0.3)


def used_trials(sm: StudyMetrics) -> pd.DataFrame:
    """Trials that feed statistics: ok, and not replaced by a rerun (studymetrics._mark_used_in_stats)."""
    return sm.trials[sm.trials["used_in_stats"]]


def on_trials(sm: StudyMetrics) -> pd.DataFrame:
    used = used_trials(sm)
    return used[~used["ksm_off"]]


def _plot_vs_setting(sm: StudyMetrics) -> Plot | None:
    """Saving and ksmd CPU% against each swept axis, mean +- 95% CI across repetitions."""
    on = on_trials(sm)
    axes_list = [a for a in sm.swept_axes if on[a].notna().any()] if not on.empty else []
    if not axes_list or not on["saved_mib"].notna().any():
        return None
    fig = Figure(figsize=(max(6.0, 4.8 * len(axes_list)), 7.5))
    grid = fig.subplots(2, len(axes_list), squeeze=False)
    pooled_any = False
    for col, axis in enumerate(axes_list):
        frame = on[on[axis].notna()]
        split, pooled = _series_by_others(frame, axis, [a for a in axes_list if a != axis])
        pooled_any |= pooled
        for row, (column, ylabel) in enumerate(
            (("saved_mib", "saved (MiB, pages_sharing)"), ("ksmd_cpu_pct", "ksmd CPU (% of one core, mean)"))
        ):
            ax = grid[row][col]
            cats, log = _draw_ci_series(ax, frame, axis, split, column)
            _format_axis(ax, cats, log)
            ax.set_xlabel(axis + (" (log scale)" if log else ""))
            ax.set_ylabel(ylabel)
            if split and row == 0:
                ax.legend(fontsize=7)
    fig.suptitle("Saving and ksmd CPU vs swept setting (mean ± 95% CI across repetitions)")
    caption = "Error bars: Student t 95% interval across repetitions (none when a setting ran once)."
    if pooled_any:
        caption += " Where the other axes had too many combinations, they are pooled into one line."
    return Plot("vs_setting", "Saving and ksmd CPU vs setting", caption, _png(fig))


def _plot_frontier(sm: StudyMetrics) -> Plot | None:
    settings = sm.settings
    if settings.empty:
        return None
    on = settings[~settings["ksm_off"] & settings["saved_mib"].notna() & settings["ksmd_cpu_pct"].notna()]
    if on.empty:
        return None
    front = pareto_mask(on["ksmd_cpu_pct"], on["saved_mib"], pareto_tolerance_mib(on))
    fig = Figure(figsize=(10, 6))
    ax = fig.add_subplot()
    for mask, color, label in ((~front, "0.6", "dominated setting"), (front, "tab:red", "Pareto-optimal setting")):
        part = on[mask]
        if part.empty:
            continue
        ax.errorbar(
            part["ksmd_cpu_pct"],
            part["saved_mib"],
            xerr=part["ksmd_cpu_pct_ci95"],
            yerr=part["saved_mib_ci95"],
            ls="none",
            marker="o",
            ms=7 if color != "0.6" else 5,
            color=color,
            capsize=2,
            label=label,
        )
    best = on[front].sort_values("ksmd_cpu_pct")
    ax.step(best["ksmd_cpu_pct"], best["saved_mib"], where="post", color="tab:red", lw=0.8, alpha=0.6, ls="--")
    # numbers on the points and the settings in a key: long labels on close points overlap
    key_lines = []
    for number, (_, row) in enumerate(best.iterrows(), start=1):
        ax.annotate(
            str(number),
            (row["ksmd_cpu_pct"], row["saved_mib"]),
            xytext=(4, -12 if number % 2 else 4),
            textcoords="offset points",
            fontsize=8,
            color="tab:red",
            fontweight="bold",
        )
        key_lines.append(f"{number}: {row['setting']}  ({row['saved_mib']:.1f} MiB, {row['ksmd_cpu_pct']:.1f}%)")
    shown = key_lines[:MAX_KEY_LINES] + (
        [f"... {len(key_lines) - MAX_KEY_LINES} more in report"] if len(key_lines) > MAX_KEY_LINES else []
    )
    ax.text(
        1.02,
        1.0,
        "Pareto-optimal settings\n" + "\n".join(shown),
        transform=ax.transAxes,
        va="top",
        ha="left",
        fontsize=8,
        family="monospace",
    )
    recommend.mark_on_frontier(ax, recommend.report_recommendation(sm))
    ax.set_title("Cost/benefit frontier: memory saved vs ksmd CPU (each point = one setting)")
    ax.set_xlabel("ksmd CPU during measure (% of one core, mean)")
    ax.set_ylabel("saved (MiB, pages_sharing x page size)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return Plot(
        "frontier",
        "Cost/benefit frontier",
        "Up and left is better. A setting is Pareto-optimal when no other saves as much for less "
        f"ksmd CPU (savings within {PARETO_TOLERANCE:.0%} of the largest count as equal). "
        "Error bars: 95% CI across repetitions.",
        _png(fig),
    )


def pareto_tolerance_mib(settings: pd.DataFrame) -> float:
    largest = settings["saved_mib"].abs().max()
    return float(PARETO_TOLERANCE * largest) if math.isfinite(largest) else 0.0


def _plot_workload(sm: StudyMetrics) -> Plot | None:
    """Throughput and p95 latency vs each swept axis, KSM-off shown as the baseline."""
    # one sample per trial (its guests' mean): guests of one trial are not replicates
    used = used_trials(sm)
    if sm.guests.empty or not used["tps"].notna().any():
        return None
    on, off = used[~used["ksm_off"]], used[used["ksm_off"]]
    axes_list = [a for a in sm.swept_axes if on[a].notna().any()] or ["setting"]
    fig = Figure(figsize=(max(6.0, 4.8 * len(axes_list)), 7.5))
    grid = fig.subplots(2, len(axes_list), squeeze=False)
    for col, axis in enumerate(axes_list):
        frame = on[on[axis].notna()]
        split, _ = _series_by_others(frame, axis, [a for a in axes_list if a not in (axis, "setting")])
        # a non-KSM axis (threads, guests) that the KSM-off trials also swept: KSM off is a line of
        # its own over the same x; otherwise it is one level, drawn across the panel
        off_series = axis != "setting" and axis not in sm.ksm_axes and axis in off and off[axis].notna().any()
        if off_series:
            frame = pd.concat([frame.assign(_ksm="KSM on"), off[off[axis].notna()].assign(_ksm="KSM off")])
            split = ["_ksm", *split]
        for row, (column, ylabel) in enumerate(
            (("tps", "throughput (transactions/s, guest mean)"), ("latency_p95_ms", "p95 latency (ms)"))
        ):
            ax = grid[row][col]
            cats, log = _draw_ci_series(ax, frame, axis, split, column, label="KSM on")
            if not off_series and not off.empty and off[column].notna().any():
                mean, half, _ = mean_ci95(off[column])
                ax.axhline(mean, color="k", ls="--", lw=1.2, label="KSM off (mean)")
                if math.isfinite(half):
                    ax.axhspan(mean - half, mean + half, color="k", alpha=0.08, label="KSM off 95% CI")
            _format_axis(ax, cats, log)
            ax.set_xlabel(axis + (" (log scale)" if log else ""))
            ax.set_ylabel(ylabel)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    fig.suptitle("Workload vs swept setting (mean ± 95% CI across trials)")
    return Plot(
        "workload",
        "Workload throughput and latency",
        "One sample per trial (the mean of its guests' sysbench results); error bars: Student t "
        "95% interval across trials; the dashed line is the KSM-off baseline.",
        _png(fig),
    )


def _plot_change_vs_off(sm: StudyMetrics) -> Plot | None:
    """The evidence the workload verdicts use: per KSM-on setting, the change vs KSM off with the
    interval the study's comparison gives (paired by block, or Welch), and each block's paired
    difference as a point. Raw tps intervals (the workload plot) hold the blocks' drift; this
    one does not, so the two can look different for the same study."""
    settings = sm.settings
    if settings.empty or "tps_vs_off_pct" not in settings:
        return None
    on = settings[~settings["ksm_off"] & settings["tps_vs_off_pct"].notna()]
    if on.empty:
        return None
    order = sorted(on["setting"].astype(str), key=_natural_key)
    fig = Figure(figsize=(max(6.0, 0.9 * len(order) + 3.0), 7.0))
    grid = fig.subplots(2, 1, squeeze=False)
    methods = set()
    for ax, (metric, ylabel) in zip(
        grid[:, 0],
        (("tps", "throughput change vs KSM off (%)"), ("latency_p95_ms", "p95 latency change vs KSM off (%)")),
    ):
        points = {
            setting: d for _, setting, d in studymetrics.paired_differences(sm.trials, metric, sm.paired_by_block)
        }
        for i, setting in enumerate(order):
            row = on[on["setting"].astype(str) == setting].iloc[0]
            comparison = studymetrics.settings_comparison(row, metric)
            if not math.isfinite(comparison.pct):
                continue
            methods.add(comparison.method)
            if setting in points and len(points[setting]):
                jitter = np.linspace(-0.12, 0.12, len(points[setting]))
                ax.scatter(
                    i + jitter,
                    points[setting].to_numpy(float),
                    s=14,
                    color="0.55",
                    zorder=2,
                    label="one block (paired)" if i == 0 else None,
                )
            holm = bool(row.get(f"{metric}_vs_off_holm", False))
            ax.errorbar(
                [i],
                [comparison.pct],
                yerr=[comparison.half_pct if comparison.has_interval else 0.0],
                fmt="o",
                mfc="C3" if holm else "white",
                color="C3",
                capsize=4,
                zorder=3,
                label="mean ± 95% interval" if i == 0 else None,
            )
        ax.axhline(0.0, color="k", lw=1.0)
        ax.set_xticks(range(len(order)), order, rotation=30 if max(map(len, order)) > 6 else 0)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    how = " and ".join(sorted(methods))
    fig.suptitle(f"Change vs KSM off per setting ({how}; mean ± 95% interval)")
    return Plot(
        "change_vs_off",
        "Workload change vs KSM off, as the verdicts judge it",
        f"Per KSM-on setting: the change vs KSM off ({how}) with its 95% interval; grey points: "
        "each block's difference from its own KSM-off trial (drawn only when the study pairs by "
        "block); a filled marker survives Holm across the settings.",
        _png(fig),
    )
