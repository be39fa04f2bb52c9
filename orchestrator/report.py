"""The study report, from the study folder only (what store.py wrote), never the live host.

``write_report(study_dir)`` writes into ``<study>/report/``:

- ``summary.csv``      one row per trial (failed ones too) with every derived metric
- ``settings.csv``     one row per setting: means and 95% CI half widths across repetitions
- ``per_process.csv``  PSS before/after, merging pages, profit per trial x tracked process
- ``samples.parquet``  every trial's ksm.csv rows stacked, with trial_id and swept settings
- ``*.png``            the plots, each readable alone
- ``report.html``      one self-contained page (plots embedded as data URIs, no external assets)
"""

from __future__ import annotations

import base64
import io
import math
import tomllib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from matplotlib import colormaps
from matplotlib.figure import Figure

from orchestrator import policy_report, recommend, samplemetrics, studydata, studymetrics
from orchestrator.costreport import cost_findings, cost_sections
from orchestrator.samplemetrics import MIB
from orchestrator.stats import (
    ONE_REPETITION,
    PAIRED,
    PARETO_TOLERANCE,
    WELCH,
    comparison_verdict,
    format_repetitions,
    mean_ci95,
    pareto_mask,
    t_quantile_975,
)
from orchestrator.store import atomic_write_bytes
from orchestrator.studydata import StudyData
from orchestrator.studymetrics import StudyMetrics

MAX_POINTS_PER_LINE = 2000  # longer traces keep each bucket's min and max: a sawtooth stays one
MAX_SCAN_MARKERS = 40
MAX_SERIES_PER_PANEL = 6
MAX_KEY_LINES = 25
MAX_LEGEND_SETTINGS = 12  # more settings than this: the time plot is coloured by one axis  # more combinations of the other axes than this are pooled
NEAR_MAX_FRACTION = 0.90


@dataclass(frozen=True)
class Plot:
    name: str
    title: str
    caption: str
    png: bytes

    @property
    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")


@dataclass(frozen=True)
class Finding:
    text: str
    warn: bool = False


def write_report(study_dir: Path) -> Path:
    """Write the report folder for one study and return the path of report.html."""
    study_dir = Path(study_dir)
    study = studydata.load_study(study_dir)
    sm = studymetrics.compute_study(study)
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
    html = render_html(study, sm, plots, study_findings(sm))
    report_path = out_dir / "report.html"
    atomic_write_bytes(report_path, html.encode())
    return report_path




def _public(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop(columns=[c for c in frame.columns if c.startswith("_")])


# ----------------------------------------------------------------------------- plots


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
    plots = [p for p in (
        _plot_saving_over_time(study, sm),
        _plot_vs_setting(sm),
        _plot_frontier(sm),
        _plot_workload(sm),
        _plot_policy_knobs(study, sm),
    ) if p is not None]
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
        ax.plot(t_rel[keep], saved_mib[keep], color=color, lw=0.9 if churning(row) else 1.3, alpha=0.85,
                ls="--" if row["ksm_off"] else "-", label=label)
        if samplemetrics.zero_pages_counted(row["_ksm"]) and "ksm_zero_pages" in ksm.columns:
            # The same trial's content merges alone: the gap down to this line is zero pages.
            content_mib = pd.to_numeric(ksm["pages_sharing"], errors="coerce").to_numpy(float) * sm.page_size_bytes / MIB
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
    ax.annotate("measure starts", xy=(0, 1), xycoords=("data", "axes fraction"), xytext=(3, -12),
                textcoords="offset points", fontsize=8, color="0.3")
    scan_note = "dots = completed full scans" + (
        f" (every {marker_stride_max}th at most)" if marker_stride_max > 1 else "")
    ax.plot([], [], ls="none", marker="o", ms=3.5, color="0.2", label=scan_note)
    if zero_lines:
        ax.plot([], [], ls=":", color="0.2", label="dotted line = content merges only (use_zero_pages=1: the gap above it is zero pages)")
    ax.set_title("Memory saved over time ((pages_sharing + zero pages) x page size), one colour per "
                 + (f"{coloured_by} value" if coloured_by else "setting"))
    ax.set_xlabel("time since measure start (s)")
    ax.set_ylabel("saved (MiB)")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: (labels[i].startswith("dots"), _label_key(labels[i])))
    ax.legend([handles[i] for i in order], [labels[i] for i in order], fontsize=7 if len(labels) > 8 else 8,
              ncol=2 if len(labels) > 24 else 1, loc="upper left", bbox_to_anchor=(1.01, 1))
    grouping = (f"colour = {coloured_by}; lines of one colour differ in the other swept axes"
                if coloured_by else "repetitions share a colour")
    return Plot("saving_over_time", "Saving over time",
                f"{drawn} successful trials; {grouping}. The saving is KSM's raw count "
                "(pages_sharing, plus zero pages when use_zero_pages=1), before metadata cost. Every "
                "sample is drawn (long traces keep each stretch's lowest and highest), so a workload that "
                "refills its pages shows its sawtooth: merges broken at each refill, then re-made."
                + (" For trials with use_zero_pages=1 a dotted line in the same colour is the content merges "
                   "only (pages_sharing): the gap above it is zero pages (ksm_zero_pages)." if zero_lines else ""),
                _png(fig))


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
    stats = keyed.groupby(by, sort=False).agg(x=("_x", "first"), mean=(column, "mean"),
                                             std=(column, "std"), n=(column, "count")).reset_index()
    stats["ci"] = t_quantile_975(stats["n"].to_numpy(float) - 1) * stats["std"] / np.sqrt(stats["n"])
    return stats[stats["n"] > 0]


def _series_by_others(frame: pd.DataFrame, axis: str, others: list[str]) -> tuple[list[str], bool]:
    """The other swept axes to split lines by, or none (pooled) when that makes too many lines."""
    if not others:
        return [], False
    combos = frame[others].astype(str).drop_duplicates()
    return (others, False) if len(combos) <= MAX_SERIES_PER_PANEL else ([], True)


def _draw_ci_series(ax: Any, frame: pd.DataFrame, axis: str, split: list[str], column: str,
                    label: str | None = None) -> tuple[list[str] | None, bool]:
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


def _used_trials(sm: StudyMetrics) -> pd.DataFrame:
    """Trials that feed statistics: ok, and not replaced by a rerun (studymetrics._mark_used_in_stats)."""
    return sm.trials[sm.trials["used_in_stats"]]


def _on_trials(sm: StudyMetrics) -> pd.DataFrame:
    used = _used_trials(sm)
    return used[~used["ksm_off"]]


def _plot_vs_setting(sm: StudyMetrics) -> Plot | None:
    """Saving and ksmd CPU% against each swept axis, mean +- 95% CI across repetitions."""
    on = _on_trials(sm)
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
        for row, (column, ylabel) in enumerate((("saved_mib", "saved (MiB, pages_sharing)"),
                                                ("ksmd_cpu_pct", "ksmd CPU (% of one core, mean)"))):
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
    front = pareto_mask(on["ksmd_cpu_pct"], on["saved_mib"], _pareto_tolerance_mib(on))
    fig = Figure(figsize=(10, 6))
    ax = fig.add_subplot()
    for mask, color, label in ((~front, "0.6", "dominated setting"), (front, "tab:red", "Pareto-optimal setting")):
        part = on[mask]
        if part.empty:
            continue
        ax.errorbar(part["ksmd_cpu_pct"], part["saved_mib"], xerr=part["ksmd_cpu_pct_ci95"],
                    yerr=part["saved_mib_ci95"], ls="none", marker="o", ms=7 if color != "0.6" else 5,
                    color=color, capsize=2, label=label)
    best = on[front].sort_values("ksmd_cpu_pct")
    ax.step(best["ksmd_cpu_pct"], best["saved_mib"], where="post", color="tab:red", lw=0.8, alpha=0.6, ls="--")
    # numbers on the points and the settings in a key: long labels on close points overlap
    key_lines = []
    for number, (_, row) in enumerate(best.iterrows(), start=1):
        ax.annotate(str(number), (row["ksmd_cpu_pct"], row["saved_mib"]), xytext=(4, -12 if number % 2 else 4),
                    textcoords="offset points", fontsize=8, color="tab:red", fontweight="bold")
        key_lines.append(f"{number}: {row['setting']}  ({row['saved_mib']:.1f} MiB, {row['ksmd_cpu_pct']:.1f}%)")
    shown = key_lines[:MAX_KEY_LINES] + ([f"... {len(key_lines) - MAX_KEY_LINES} more in report"]
                                         if len(key_lines) > MAX_KEY_LINES else [])
    ax.text(1.02, 1.0, "Pareto-optimal settings\n" + "\n".join(shown), transform=ax.transAxes,
            va="top", ha="left", fontsize=8, family="monospace")
    recommend.mark_on_frontier(ax, recommend.report_recommendation(sm))
    ax.set_title("Cost/benefit frontier: memory saved vs ksmd CPU (each point = one setting)")
    ax.set_xlabel("ksmd CPU during measure (% of one core, mean)")
    ax.set_ylabel("saved (MiB, pages_sharing x page size)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return Plot("frontier", "Cost/benefit frontier",
                "Up and left is better. A setting is Pareto-optimal when no other saves as much for less "
                f"ksmd CPU (savings within {PARETO_TOLERANCE:.0%} of the largest count as equal). "
                "Error bars: 95% CI across repetitions.", _png(fig))


def _pareto_tolerance_mib(settings: pd.DataFrame) -> float:
    largest = settings["saved_mib"].abs().max()
    return float(PARETO_TOLERANCE * largest) if math.isfinite(largest) else 0.0


def _plot_workload(sm: StudyMetrics) -> Plot | None:
    """Throughput and p95 latency vs each swept axis, KSM-off shown as the baseline."""
    # one sample per trial (its guests' mean): guests of one trial are not replicates
    used = _used_trials(sm)
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
        for row, (column, ylabel) in enumerate((("tps", "throughput (transactions/s, guest mean)"),
                                                ("latency_p95_ms", "p95 latency (ms)"))):
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
    return Plot("workload", "Workload throughput and latency",
                "One sample per trial (the mean of its guests' sysbench results); error bars: Student t "
                "95% interval across trials; the dashed line is the KSM-off baseline.", _png(fig))


# ----------------------------------------------------------------------------- findings


def _fmt(value: Any, digits: int = 3, integers: bool = True) -> str:
    """A table cell or a number in a sentence. integers=False keeps "2.00" next to "10.50"
    (sentences); tables show whole floats (counts, deltas) without decimals."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{int(value)}"
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if abs(v) < 1e-9:  # float residue of a difference of equal numbers (-6.8e-15) reads as 0
            v = 0.0
        if integers and v == int(v) and abs(v) < 1e6:
            return f"{int(v)}"
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.{digits}g}"
    return str(value)


def _num(value: Any) -> str:
    return _fmt(value, integers=False)


def _pm(mean: float, half: float, unit: str = "", integers: bool = True) -> str:
    text = _fmt(mean, integers=integers)
    if isinstance(half, float) and math.isfinite(half):
        text += f" ± {_fmt(half, integers=integers)}"
    return text + unit


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
        listed = "; ".join(f"{r.trial_id} ({r.status}: {r.reason or 'no reason recorded'})"
                           for r in failed.head(10).itertuples())
        more = f" and {len(failed) - 10} more" if len(failed) > 10 else ""
        out.append(Finding(f"Trials without results: {listed}{more}.", warn=True))
    out.extend(_disturbed_findings(sm))

    settings = sm.settings
    on = settings[~settings["ksm_off"] & settings["saved_mib"].notna()] if not settings.empty else settings
    if on.empty:
        out.append(Finding("Insufficient data: no successful KSM-on trial recorded KSM samples, so "
                           "nothing can be said about savings or settings.", warn=True))
        return out
    if not sm.swept_axes:
        out.append(Finding("No swept axis: every trial ran the same settings, so this study compares no "
                           "settings; it measures one setting and its repeatability.", warn=True))
    if (on["n"] < 2).all():
        out.append(Finding(_unreplicated_text(sm), warn=True))

    top = on.loc[on["saved_mib"].idxmax()]
    pss, avail, net_note = _delta_savings(top, _net_columns(on))
    out.append(Finding(
        f"Largest saving: {top['setting']}: {_pm(top['saved_mib'], top['saved_mib_ci95'], ' MiB', integers=False)} by "
        f"pages_sharing; general_profit {_num(top['general_profit_mib'])} MiB, PSS drop {pss} MiB, "
        f"MemAvailable rise {avail} MiB; "
        f"ksmd used {_pm(top['ksmd_cpu_pct'], top['ksmd_cpu_pct_ci95'], '%', integers=False)} of one core. "
        + net_note))
    costed = on[on["ksmd_cpu_pct"].notna()]
    if len(costed) > 1:
        mask = pareto_mask(costed["ksmd_cpu_pct"], costed["saved_mib"], _pareto_tolerance_mib(costed))
        front = costed[mask].sort_values("ksmd_cpu_pct")
        listed = "; ".join(f"{r['setting']} ({r['saved_mib']:.1f} MiB at {r['ksmd_cpu_pct']:.1f}% CPU)"
                           for _, r in front.iterrows())
        out.append(Finding(f"Pareto-optimal settings (nothing else saves as much for less ksmd CPU; savings "
                           f"within {PARETO_TOLERANCE:.0%} count as equal): {listed}."))
        near = costed[costed["saved_mib"] >= NEAR_MAX_FRACTION * top["saved_mib"]]
        cheap = near.loc[near["ksmd_cpu_pct"].idxmin()]
        out.append(Finding(
            f"Cheapest setting reaching ≥{NEAR_MAX_FRACTION:.0%} of the largest saving: {cheap['setting']} "
            f"({_num(cheap['saved_mib'])} MiB at {_num(cheap['ksmd_cpu_pct'])}% of one core"
            + (f", vs {_num(top['ksmd_cpu_pct'])}% for the largest)." if cheap["setting"] != top["setting"] else ").")))
    timed = on[on["time_to_90pct_s"].notna()]
    if len(timed) > 1:
        fast = timed.loc[timed["time_to_90pct_s"].idxmin()]
        out.append(Finding(f"Fastest to 90% of its final sharing: {fast['setting']} "
                           f"({_num(fast['time_to_90pct_s'])} s after measure start)."))
    rec = recommend.report_recommendation(sm)
    if rec is not None:  # `recommend` without limits: the largest saving, the cheaper of a tie
        out.append(Finding("Recommendation (no CPU or tps limit; `recommend --max-ksmd-cpu ...` adds them, "
                           "star on the frontier plot): " + rec.reason))
    out.extend(Finding(text, warn) for text, warn in policy_report.policy_findings(sm))
    out.extend(saving_basis_findings(sm))
    out.extend(_convergence_findings(sm))
    out.extend(_disagreement_findings(sm))
    out.extend(_ksm_off_findings(sm))
    out.extend(_noise_findings(sm))
    out.extend(Finding(text) for text in cost_findings(sm))
    return out


def reference_rows(plan_text: str, sm: StudyMetrics) -> list[dict[str, str]]:
    """The plan's [[report.references]] beside this study's value of the same metric, over the
    successful KSM-on trials whose swept settings match the reference's `where`."""
    try:
        references = tomllib.loads(plan_text).get("report", {}).get("references", [])
    except tomllib.TOMLDecodeError:
        return []
    rows = []
    ok = _on_trials(sm)
    for ref in references:
        metric, where = ref.get("metric"), ref.get("where") or {}
        match = ok[ok["_settings"].map(lambda s: all(s.get(k) == v for k, v in where.items()))] \
            if not ok.empty else ok
        values = pd.to_numeric(match[metric], errors="coerce").dropna() if metric in match.columns else pd.Series(dtype=float)
        published = _num(ref.get("low")) + (f"–{_num(ref['high'])}" if ref.get("high") is not None else "")
        ours = (f"{_num(float(values.mean()))} (range {_num(float(values.min()))}–{_num(float(values.max()))}, "
                f"{len(values)} trial(s))" if len(values) else "no matching trial")
        rows.append({"metric": str(metric), "where": ", ".join(f"{k}={v}" for k, v in where.items()) or "all",
                     "published": published, "ours": ours, "source": str(ref.get("source", "")),
                     "note": str(ref.get("note", ""))})
    return rows


def saving_basis_findings(sm: StudyMetrics) -> list[Finding]:
    """Say which number the savings are: a time average for workloads that write during measure
    (one sample of a sawtooth is luck), the end value for those that do not."""
    ok = _on_trials(sm)
    if "saving_basis" not in ok.columns or ok["saving_basis"].isna().all():
        return []
    churn = ok[ok["saving_basis"].astype(str).str.startswith("steady")]
    if churn.empty:
        return [Finding("Savings are the values at the end of measure: the workload did not write during "
                        "measure, so the saving had settled (the time averages are in summary.csv).")]
    spread = (churn["saved_mib_end"] - churn["saved_mib"]).abs()
    return [Finding(
        f"{len(churn)} trial(s) ran a workload that writes during measure: their savings are time averages "
        "over the steady part of measure (from the first time the saving reached 90% of its 95th "
        "percentile), not the last sample; the end value differed from the average by up to "
        f"{_num(float(spread.max()))} MiB (columns saved_mib_end, saved_mib_mean, saved_mib_steady).")]


def _convergence_findings(sm: StudyMetrics) -> list[Finding]:
    ok = _on_trials(sm)
    known = ok[ok["converged"].notna()]
    if known.empty:
        return []
    moving = known[known["converged"] == False]  # noqa: E712 - object column of True/False/None
    if moving.empty:
        return [Finding(f"All {len(known)} successful KSM-on trials had converged (pages_sharing moved "
                        f"< {samplemetrics.CONVERGENCE_TOLERANCE:.0%} over the last "
                        f"{samplemetrics.CONVERGENCE_WINDOW_FRACTION:.0%} of measure).")]
    return [Finding(f"{len(moving)} of {len(known)} successful KSM-on trials had not converged (pages_sharing "
                    f"still moving ≥ {samplemetrics.CONVERGENCE_TOLERANCE:.0%} over the last "
                    f"{samplemetrics.CONVERGENCE_WINDOW_FRACTION:.0%} of measure): their savings are lower bounds; "
                    "a longer measure phase would tell the final value.", warn=True)]


def _disagreement_findings(sm: StudyMetrics) -> list[Finding]:
    ok = _on_trials(sm)
    ok = ok[ok["saved_mib"] > 0]
    if ok.empty:
        return []
    # net of drift when KSM-off trials measured it: the raw deltas include the guests' own growth
    net_of = _net_columns(ok)

    def view(raw: str, name: str) -> tuple[str, str]:
        return (studymetrics.NET_OF_DRIFT[raw], f"{name} (net of drift)") if raw in net_of else (raw, name)

    (pss_col, pss_name), (avail_col, avail_name) = (view("pss_drop_mib", "the tracked processes' PSS drop"),
                                                    view("mem_available_rise_mib", "the MemAvailable rise"))
    parts = []
    for column, name in ((pss_col, pss_name), (avail_col, avail_name), ("general_profit_mib", "general_profit")):
        ratio = (ok[column] / ok["saved_mib"]).dropna()
        if not ratio.empty:
            parts.append(f"{name} was {_num(float(ratio.median()))}x")
    if not parts:
        return []
    text = "Four views of the saving, median over successful trials relative to pages_sharing: " + ", ".join(parts) + "."
    over = ok[(ok[pss_col] > 1.2 * ok["saved_mib"]) | (ok[avail_col] > 1.2 * ok["saved_mib"])]
    splits = over["thp_split_page_delta"].dropna()
    if not over.empty and (splits > 0).any():
        text += (f" In {len(over)} trial(s) the host got back over 20% more than KSM counts, and ksmd split "
                 f"transparent huge pages (thp_split_page up to +{_num(float(splits.max()))}): the freed zero "
                 "tails of split THPs are memory KSM never counts.")
    return [Finding(text)]


def _ksm_off_findings(sm: StudyMetrics) -> list[Finding]:
    settings = sm.settings
    if sm.guests.empty or "tps" not in settings.columns or not settings["tps"].notna().any():
        return []
    if not settings["ksm_off"].any():
        return [Finding("Workload data but no KSM-off trial: throughput changes cannot be attributed to KSM.",
                        warn=True)]
    on = settings[~settings["ksm_off"] & settings.get("tps_vs_off_pct", pd.Series(dtype=float)).notna()]
    if on.empty:
        return [Finding("Insufficient data: no KSM-on setting has workload results to compare with KSM off.",
                        warn=True)]
    out = []
    for metric, name, worst_is in (("tps", "throughput", "min"), ("latency_p95_ms", "p95 latency", "max")):
        column = f"{metric}_vs_off_pct"
        if column not in on.columns or not on[column].notna().any():
            continue
        row = on.loc[on[column].idxmin() if worst_is == "min" else on[column].idxmax()]
        comparison = studymetrics.settings_comparison(row, metric)
        change = f"{comparison.pct:+.1f}%"
        if comparison.has_interval:
            change += f" ± {comparison.half_pct:.1f}%"
        if row.get("baseline") == studymetrics.STUDY_OFF_MEAN:
            change += " (vs the mean of all KSM-off trials: none had the same non-KSM settings)"
        verdict = comparison_verdict(comparison, one_repetition=sm.blocks <= 1)
        out.append(Finding(f"Worst {name} change vs KSM off: {row['setting']}: {change}; {verdict}."))
    return out


def _unreplicated_text(sm: StudyMetrics) -> str:
    """Every setting has at most one usable trial: say plainly what that means."""
    if sm.blocks <= 1:
        head = ONE_REPETITION[0].upper() + ONE_REPETITION[1:]
    else:
        head = "Each setting has at most one usable trial: this study cannot tell workload differences from noise"
    return (head + ", nor memory or CPU differences between settings; no number here has an interval. "
            "Run with repetitions >= 2 (and ksm_off_baseline = true) to measure the run-to-run noise.")


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
            values.append(_pm(row[net], row[f"{net}_ci95"], integers=False))
        else:
            values.append(_num(row[raw]))
    net_names = " and ".join(DELTA_NAMES[r] for r in DELTA_NAMES if r in net_of)
    raw_names = " and ".join(DELTA_NAMES[r] for r in DELTA_NAMES if r not in net_of)
    parts = []
    if net_names:
        parts.append(f"{net_names} {_is_are(net_names)} net of drift (each trial's change minus the same change in "
                     "its matched KSM-off trial, same block when there is one), because guests keep growing during "
                     "a trial and the raw change includes that growth")
    if raw_names:
        parts.append(f"{raw_names} {_is_are(raw_names)} the raw change from baseline to the end of measure, "
                     "including the guests' own growth: no matched KSM-off trial measured that growth")
    return values[0], values[1], "; ".join(parts) + "."


def _is_are(names: str) -> str:
    return "are" if " and " in names else "is"


def _disturbed_findings(sm: StudyMetrics) -> list[Finding]:
    """Trials the sweep marked disturbed (outside CPU load above the plan threshold during measure)."""
    hit = sm.trials[sm.trials["disturbed"]]
    if hit.empty:
        return []
    parts = []
    for row in hit.itertuples():
        load = (f"outside CPU {_num(row.outside_cpu_pct)}%" if isinstance(row.outside_cpu_pct, float)
                and math.isfinite(row.outside_cpu_pct) else "outside CPU above the threshold")
        what = str(row.stats_note or "").removeprefix("disturbed; ")
        parts.append(f"{row.trial_id} ({load}; {what})")
    return [Finding(f"{len(hit)} disturbed trial(s), other load on the host above the plan's threshold during "
                    f"measure: {'; '.join(parts)}. A disturbed trial is replaced by its rerun when the rerun "
                    "succeeded; one without an ok rerun is used, and its numbers may include the disturbance.",
                    warn=True)]


NO_NOISE_ESTIMATE = ("No run-to-run noise estimate: the study has fewer than 2 KSM-off trials with the same non-KSM "
                     "settings, so it cannot say how much a result moves between identical runs. To get one, run "
                     "with repetitions >= 2 and ksm_off_baseline = true: every block then repeats the KSM-off trial.")
MAX_NOISE_FINDINGS = 3


def _noise_estimated(sm: StudyMetrics) -> pd.DataFrame:
    noise = sm.noise
    return noise[noise["sd"].notna()] if not noise.empty else noise


def _noise_findings(sm: StudyMetrics) -> list[Finding]:
    """One sentence per non-KSM setting group: how much identical KSM-off runs moved, and what
    that means for the smallest difference this study could see."""
    estimated = _noise_estimated(sm)
    if estimated.empty:
        return [Finding(NO_NOISE_ESTIMATE, warn=True)]
    out = []
    for _, group in list(estimated.groupby("_offkey", sort=False))[:MAX_NOISE_FINDINGS]:
        by_metric = group.set_index("metric")
        n = int(by_metric["n_trials"].max())
        parts = [_noise_phrase(metric, r, n) for metric, r in by_metric.iterrows()]
        out.append(Finding(f"Noise floor from {n} KSM-off trials ({group['group'].iloc[0]}): " + "; ".join(parts)
                           + f". (Smallest detectable: the difference between two settings of {n} trials each "
                           "that a 95% test finds with 80% power.)"))
    return out


def _noise_phrase(metric: str, r: pd.Series, n: int) -> str:
    if metric == "tps":
        return (f"tps varied {_num(r['cv_pct'])}% run to run (sd {_num(r['sd'])} tps), so with {n} trials per "
                f"setting the smallest detectable tps change is {_num(r['mde_pct_of_mean'])}% ({_num(r['mde'])} tps); "
                f"a 5% change would need {format_repetitions(r['repetitions_for_5pct'])} repetitions")
    if metric == "latency_p95_ms":
        return (f"p95 latency sd {_num(r['sd'])} ms (CV {_num(r['cv_pct'])}%), smallest detectable change "
                f"{_num(r['mde'])} ms")
    return f"MemAvailable change sd {_num(r['sd'])} MiB, smallest detectable difference {_num(r['mde'])} MiB"


# ----------------------------------------------------------------------------- HTML


TRIAL_COLUMNS = ("trial_id", "status", "reason", "setting", "repetition", "saved_mib", "saving_basis",
                 "saved_mib_end", "saved_share_before_refill_pct", "saved_share_after_refill_pct",
                 "remerge_s_median", "merged_share_mean_pct", "general_profit_mib",
                 "pss_drop_mib", "pss_drop_net_mib", "mem_available_rise_mib", "mem_available_rise_net_mib",
                 "ksmd_cpu_pct", "ksmd_cpu_s", "mib_saved_per_ksmd_cpu_s", "time_to_90pct_s", "full_scans",
                 "converged", "zero_pages_mib", "content_merged_mib", "scan_rate_achieved_pct",
                 "thp_split_page_delta", "tps", "tps_guest_sd", "qps", "latency_p95_ms",
                 "tps_vs_off_pct", "latency_p95_ms_vs_off_pct", "outside_cpu_pct", "disturbed", "stats_note",
                 "guest_start", "guest_start_s", "data_problems")
SETTINGS_COLUMNS = ("saved_mib", "general_profit_mib", "pss_drop_mib", "pss_drop_net_mib", "mem_available_rise_mib",
                    "mem_available_rise_net_mib", "ksmd_cpu_pct", "time_to_90pct_s", "tps", "tps_guest_sd",
                    "tps_vs_off_pct", "latency_p95_ms", "latency_p95_ms_vs_off_pct")
NOISE_TABLE_COLUMNS = ("metric", "group", "n_trials", "mean", "sd", "cv_pct", "mde", "mde_pct_of_mean",
                       "repetitions_for_5pct")
ALWAYS_SHOWN = ("trial_id", "status", "reason", "setting")
METHOD_SHORT = {PAIRED: " blocks, paired", WELCH: " trials, Welch"}


def _ci_cell(record: dict[str, Any], column: str) -> str:
    """"mean ± half (n=K)": every interval says how many trials (or blocks) it is across."""
    if column.endswith("_vs_off_pct"):
        metric = column.removesuffix("_vs_off_pct")
        half, n = record.get(f"{metric}_vs_off_ci95_pct"), record.get(f"{metric}_vs_off_n")
        unit = METHOD_SHORT.get(record.get(f"{metric}_vs_off_method"), "")
    else:
        half, n, unit = record.get(f"{column}_ci95"), record.get(f"{column}_n"), ""
    text = _pm(record[column], half)
    if text and isinstance(n, (int, float, np.integer, np.floating)) and math.isfinite(n):
        text += f" (n={int(n)}{unit})"
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
            text = _ci_cell(record, c) if ci and has_ci else _fmt(value)
            # words read left-aligned, numbers right-aligned
            cells.append({"text": text, "is_text": isinstance(value, str)})
        rows.append({"cells": cells, "failed": record.get("status", "ok") != "ok"})
    return {"headers": shown, "rows": rows}


def _noise_table(sm: StudyMetrics) -> dict[str, Any] | None:
    estimated = _noise_estimated(sm)
    if estimated.empty:
        return None
    shown = estimated.assign(repetitions_for_5pct=estimated["repetitions_for_5pct"].map(format_repetitions))
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
    env = jinja2.Environment(loader=jinja2.PackageLoader("orchestrator", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined)
    settings_frame = sm.settings
    settings_table = _table(settings_frame, ("setting", "trials", "ok", "n", *SETTINGS_COLUMNS), ci=True) \
        if not settings_frame.empty else {"headers": [], "rows": []}
    per_process = _table(sm.per_process, tuple(sm.per_process.columns)) if not sm.per_process.empty else None
    return env.get_template("report.html.j2").render(
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
        cost_sections=cost_sections(sm, _table),
        swept_axes=sm.swept_axes,
        page_size_bytes=sm.page_size_bytes,
        host_rows=_flatten("", study.host),
        plan_text=study.plan_text,
        references=reference_rows(study.plan_text, sm),
        convergence_tolerance_pct=100 * samplemetrics.CONVERGENCE_TOLERANCE,
        convergence_window_pct=100 * samplemetrics.CONVERGENCE_WINDOW_FRACTION,
        convergence_min_samples=samplemetrics.CONVERGENCE_MIN_SAMPLES,
    )
