"""compare.html: one self-contained page (plots as PNG data URIs, as report/study.py does) for a Comparison.

Three plots, each with study A and study B side by side:
- every compared metric per setting, A's and B's means with their 95% intervals across trials;
- the change in percent of A with its Welch interval, the threshold drawn on the bad side;
- saved MiB over measure, every trial of A and of B, one panel per KSM-on setting in common.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import io

import numpy as np
from matplotlib.figure import Figure

from orchestrator.analysis import samplemetrics
from orchestrator.analysis.across.compare import (
    IMPROVEMENT,
    METRICS,
    REGRESSION,
    SPECS,
    SUSPECT,
    UNCONFIRMED,
    Comparison,
    chance_sentence,
)
from orchestrator.report.plots import Plot
from orchestrator.errors import StoreError
from orchestrator.fsutil import atomic_write_bytes
from orchestrator.store.studydata import StudyData
from orchestrator.analysis.studymetrics import StudyMetrics
from orchestrator.report.pages import page_template
from orchestrator.units import MIB, NO_VALUE, number, plus_minus, signed_change

COLOR_A, COLOR_B = "#1f77b4", "#ff7f0e"
VERDICT_COLORS = {REGRESSION: "#c62828", SUSPECT: "#ef6c00", UNCONFIRMED: "#ef6c00", IMPROVEMENT: "#2e7d32"}
MAX_TIME_PANELS = 12  # more KSM-on settings than this: the first 12 (the table has them all)


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return buffer.getvalue()


def _grid(n: int, width_in: float = 5.2, height_in: float = 3.2) -> tuple[Figure, list[Any]]:
    cols = min(n, 2)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(width_in * cols, height_in * rows), layout="constrained")
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n)]
    return fig, axes


def _metric_rows(comparison: Comparison) -> dict[str, list[tuple[int, str, Any]]]:
    """metric -> [(setting position, label, MetricChange)] in METRICS order, metrics with data only."""
    out: dict[str, list[tuple[int, str, Any]]] = {}
    for position, setting in enumerate(comparison.settings):
        for change in setting.metrics:
            out.setdefault(change.metric, []).append((position, setting.setting, change))
    return {m.name: out[m.name] for m in METRICS if m.name in out}


def _ticks(ax: Any, rows: list[tuple[int, str, Any]]) -> None:
    ax.set_xticks([p for p, _, _ in rows])
    ax.set_xticklabels([label for _, label, _ in rows], rotation=30, ha="right", fontsize=7)


def _err(value: float) -> float:
    return value if math.isfinite(value) else 0.0


def plot_side_by_side(comparison: Comparison) -> Plot | None:
    by_metric = _metric_rows(comparison)
    if not by_metric:
        return None
    fig, axes = _grid(len(by_metric))
    for ax, (metric, rows) in zip(axes, by_metric.items()):
        x = np.array([p for p, _, _ in rows], dtype=float)
        for position, _, c in rows:  # the earlier nights' band B was judged against (history)
            if c.band_nights:
                ax.fill_between(
                    [position - 0.35, position + 0.35],
                    c.band_low,
                    c.band_high,
                    color="#999999",
                    alpha=0.25,
                    lw=0,
                    label="earlier nights' band" if position == rows[0][0] else None,
                )
        for offset, side, color, name in ((-0.15, "a", COLOR_A, "A"), (0.15, "b", COLOR_B, "B")):
            means = [getattr(c, f"{side}_mean") for _, _, c in rows]
            halves = [_err(getattr(c, f"{side}_ci95")) for _, _, c in rows]
            ax.errorbar(x + offset, means, yerr=halves, fmt="o", color=color, capsize=3, label=name)
            for position, _, c in rows:  # each trial beside its mean
                values = getattr(c, f"{side}_values")
                ax.plot(
                    [position + 2 * offset] * len(values), values, ls="none", marker="x", ms=3, color=color, alpha=0.7
                )
        ax.set_title(f"{metric} ({rows[0][2].unit})", fontsize=9)
        _ticks(ax, rows)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        "A (blue) and B (orange): mean per setting, bars = 95% interval across trials (none with 1 trial); "
        "x = each trial; grey = earlier nights' band"
    )
    return Plot(
        "compare_metrics",
        "Each metric, A and B side by side",
        "Means across the trials of each setting with each trial beside them (x); error bars are 95% t "
        "intervals across trials (absent with one trial); the grey band, with --history, is the 95% "
        "prediction band of the earlier nights B was judged against.",
        _png(fig),
    )


def plot_changes(comparison: Comparison) -> Plot | None:
    by_metric = _metric_rows(comparison)
    by_metric = {m: [r for r in rows if math.isfinite(r[2].change_pct)] for m, rows in by_metric.items()}
    by_metric = {m: rows for m, rows in by_metric.items() if rows}
    if not by_metric:
        return None
    fig, axes = _grid(len(by_metric))
    for ax, (metric, rows) in zip(axes, by_metric.items()):
        x = [p for p, _, _ in rows]
        for position, _, change in rows:
            ax.errorbar(
                [position],
                [change.change_pct],
                yerr=[_err(change.change_ci95_pct)],
                fmt="o",
                capsize=3,
                color=VERDICT_COLORS.get(change.verdict, "#555555"),
            )
        threshold = rows[0][2].threshold_pct
        bad = -threshold if rows[0][2].better == "higher" else threshold
        ax.axhline(0, color="black", lw=0.8)
        ax.axhline(bad, color=VERDICT_COLORS[REGRESSION], ls="--", lw=0.8)
        ax.axhspan(bad, bad * 50 if bad else -1, color=VERDICT_COLORS[REGRESSION], alpha=0.06)
        ax.set_xlim(min(x) - 0.5, max(x) + 0.5)
        changes = [r[2].change_pct for r in rows]
        span = max([abs(c) + _err(r[2].change_ci95_pct) for c, r in zip(changes, rows)] + [abs(bad)]) * 1.2
        ax.set_ylim(-span, span)
        ax.set_title(f"{metric}: change B - A, % of A (threshold {threshold:g}%)", fontsize=9)
        _ticks(ax, rows)
        ax.grid(alpha=0.3)
    fig.suptitle("Change with its 95% Welch interval; red = regression, green = improvement, dashed = threshold")
    return Plot(
        "compare_changes",
        "Change per setting, with the threshold",
        "A point is a regression (red) only beyond the dashed threshold with its interval excluding 0.",
        _png(fig),
    )


def _saved_traces(study: StudyData, sm: StudyMetrics, group: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """(seconds since measure start, saved MiB) of every trial of the setting used in statistics."""
    used = set(sm.trials.loc[sm.trials["used_in_stats"] & (sm.trials["_group"] == group), "trial_id"])
    traces = []
    for data in study.trials:
        if data.trial_id not in used or data.ksm is None or data.ksm.empty or "t_s" not in data.ksm:
            continue
        in_measure = samplemetrics.phase_mask(data.ksm, "measure")
        if not in_measure.any():
            continue
        t_s = data.ksm["t_s"].to_numpy(dtype=float)[in_measure]
        saved = samplemetrics.saved_pages_series(data.ksm, data.trial.ksm)[in_measure]
        traces.append((t_s - t_s[0], saved * study.page_size_bytes / MIB))
    return traces


def plot_saving_over_time(
    a: StudyData, sa: StudyMetrics, b: StudyData, sb: StudyMetrics, comparison: Comparison
) -> Plot | None:
    labels = {s.setting for s in comparison.settings if not s.ksm_off}
    groups = []
    for group, label in zip(sa.settings.get("_group", []), sa.settings.get("setting", [])):
        if label in labels and (sb.settings.get("_group", []) == group).any():
            groups.append((group, label))
    groups = groups[:MAX_TIME_PANELS]
    if not groups:
        return None
    fig, axes = _grid(len(groups), height_in=2.8)
    drawn = False
    for ax, (group, label) in zip(axes, groups):
        for study, sm, color, name in ((a, sa, COLOR_A, "A"), (b, sb, COLOR_B, "B")):
            for i, (t_s, saved) in enumerate(_saved_traces(study, sm, group)):
                ax.plot(t_s, saved, color=color, lw=1, alpha=0.8, label=name if i == 0 else None)
                drawn = True
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("s since measure start", fontsize=8)
        ax.set_ylabel("saved MiB", fontsize=8)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if not drawn:
        return None
    fig.suptitle("Saved MiB (pages_sharing) over measure: every trial of A (blue) and B (orange)")
    return Plot(
        "compare_saving_over_time",
        "Saving over time, A and B",
        "One line per trial, from the stored ksm.csv samples.",
        _png(fig),
    )


def _pm(mean: float, half: float, n: int) -> str:
    return f"{plus_minus(mean, half)} (n={n})"


def table_rows(comparison: Comparison) -> list[dict[str, str]]:
    rows = []
    for setting in comparison.settings:
        for c in setting.metrics:
            unit = " pt" if SPECS[c.metric].absolute else "%"
            pct = signed_change(c.change_pct, c.change_ci95_pct, unit)
            band = NO_VALUE
            if c.band_nights:
                band = f"{c.band_low:.4g} to {c.band_high:.4g} ({c.band_nights} nights)"
            rows.append(
                {
                    "setting": setting.setting,
                    "metric": f"{c.metric} ({c.unit})" + (" *" if c.headline else ""),
                    "better": c.better,
                    "a": _pm(c.a_mean, c.a_ci95, c.a_n),
                    "b": _pm(c.b_mean, c.b_ci95, c.b_n),
                    "change": pct,
                    "band": band,
                    "threshold": f"{c.threshold_pct:g}{unit}",
                    "verdict": c.verdict,
                    "note": c.note,
                }
            )
    return rows


def render_html(comparison: Comparison, plots: list[Plot]) -> str:
    return page_template("compare.html.j2").render(
        c=comparison,
        rows=table_rows(comparison),
        plots=plots,
        regressions=len(comparison.regressions),
        fmt=number,
        chance=chance_sentence(comparison),
    )


def write_compare_html(
    path: Path, a: StudyData, sa: StudyMetrics, b: StudyData, sb: StudyMetrics, comparison: Comparison
) -> Path:
    plots = [
        p
        for p in (
            plot_side_by_side(comparison),
            plot_changes(comparison),
            plot_saving_over_time(a, sa, b, sb, comparison),
        )
        if p is not None
    ]
    path = Path(path)
    html = render_html(comparison, plots)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, html.encode())
    except OSError as exc:
        raise StoreError(f"cannot write {path}: {exc.strerror}; pass --html elsewhere or --no-html") from None
    return path
