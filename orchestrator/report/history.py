"""history.html: each metric per setting over time, per plan and host, self-contained.

One figure per plan x host: a panel per metric, a line per setting (mean across its trials, error
bars = 95% interval across trials; none with one trial), dotted vertical lines where kernel, QEMU
or libvirt changed, red rings on regressions and green rings on improvements against the band of
the earlier nights (history.flags: the night is the level, Benjamini-Hochberg across the page).
Tables below list those points with the band and the nightly job's confirmation, the version
changes and every study.
"""

from __future__ import annotations

import io
import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure

from orchestrator.analysis.across.compare import IMPROVEMENT, METRICS, REGRESSION, Thresholds
from orchestrator.analysis.across.history import (
    Flag,
    PageTest,
    VersionChange,
    filtered,
    flags,
    judge_page,
    latest_nights,
    metrics_present,
    version_changes,
)
from orchestrator.report.plots import Plot
from orchestrator.errors import StoreError
from orchestrator.fsutil import atomic_write_bytes
from orchestrator.report.pages import page_template
from orchestrator.units import signed_change

MAX_SETTINGS_PER_PANEL = 10  # more lines than this are unreadable (and tab10 has 10 colours)
UNITS = {m.name: m.unit for m in METRICS}
RING = {REGRESSION: "#c62828", IMPROVEMENT: "#2e7d32"}


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)  # fixed margins: a tight bbox costs a second draw
    return buffer.getvalue()


def _dates(walls: Any) -> np.ndarray:
    return pd.to_datetime(np.asarray(walls, dtype=float), unit="s").to_numpy()


def plot_group(
    plan: str, host: str, rows: pd.DataFrame, changes: list[VersionChange], group_flags: list[Flag]
) -> Plot | None:
    """A band (fill_between) per setting rather than error bars: hundreds of nights x settings
    of caps cost seconds to draw, a band costs one polygon, and reads better as a trend."""
    present = metrics_present(rows)
    if not present:
        return None
    rows = rows.sort_values("created_wall", kind="stable")
    settings = list(dict.fromkeys(rows["setting"]))[:MAX_SETTINGS_PER_PANEL]
    colours = [colormaps["tab10"](i) for i in range(len(settings))]
    cols = min(2, len(present))
    nrows = math.ceil(len(present) / cols)
    legend_in = 0.2 * math.ceil(len(settings) / 3) + 0.3  # the settings' key, below the panels
    height_in = 2.8 * nrows + 0.6 + legend_in
    fig = Figure(figsize=(6.2 * cols, height_in))
    fig.subplots_adjust(
        left=0.08, right=0.98, bottom=(legend_in + 0.35) / height_in, top=1 - 0.5 / height_in, hspace=0.45, wspace=0.18
    )
    flagged = {(f.study, f.setting, f.metric): f.verdict for f in group_flags}
    by_setting = {setting: rows[rows["setting"] == setting] for setting in settings}
    change_x = _dates([c.created_wall for c in changes])
    for i, metric in enumerate(present):
        ax = fig.add_subplot(nrows, cols, i + 1)
        for colour, setting in zip(colours, settings):
            series = by_setting[setting]
            values = pd.to_numeric(series[metric], errors="coerce").to_numpy(dtype=float)
            if not np.isfinite(values).any():
                continue
            when = _dates(series["created_wall"])
            half = pd.to_numeric(series[f"{metric}_ci95"], errors="coerce").to_numpy(dtype=float)
            ax.plot(when, values, color=colour, marker="o", ms=2.5, lw=1, label=setting)
            if np.isfinite(half).any():
                ax.fill_between(when, values - half, values + half, color=colour, alpha=0.18, lw=0)
            for verdict, ring in RING.items():
                hit = np.array([flagged.get((study, setting, metric)) == verdict for study in series["study"]])
                if hit.any():
                    ax.plot(when[hit], values[hit], ls="none", marker="o", ms=10, mfc="none", mec=ring, mew=2)
        for x in change_x:
            ax.axvline(x, color="#555555", ls=":", lw=1)
        ax.set_title(f"{metric} ({UNITS[metric]})", fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.suptitle(
        f"{plan} on {host}: dotted = kernel/QEMU/libvirt changed; red ring = regression, "
        "green = improvement vs the earlier nights' band",
        fontsize=10,
    )
    return Plot(
        f"history_{plan}_{host}",
        f"{plan} on {host}",
        "Mean per setting per study; band: 95% interval across that study's trials (none with one trial).",
        _png(fig),
    )


PAGE_RULE = (
    "Each night of a setting's metric is judged against the band of the earlier nights of the same plan, "
    "host and setting (random-effects prediction interval: the night, not the trial, is the unit; a band "
    "needs 3 earlier nights). A change is flagged when it is beyond its threshold and Benjamini-Hochberg "
    "across every change judged on this page keeps it. A night outside its band does not join it, so a "
    "step stays flagged while it lasts; after 3 such nights running it is the new level."
)


def chance_sentence(judged: int, flagged: int, q: float) -> str:
    if not judged:
        return "No change could be judged yet: a band needs 3 earlier nights of the same plan, host and setting."
    return (
        f"{judged} changes were judged against their band, with Benjamini-Hochberg at q = {q:g}: if nothing "
        f"changed on this page, chance alone gives any flag at most {100 * q:g}% of the time; of the {flagged} "
        f"flag{'s' if flagged != 1 else ''} shown, about {q * flagged:.1f} may be chance."
    )


def _confirmations(studies: pd.DataFrame) -> dict[tuple[str, str, str], str]:
    """(study, setting, metric) -> the nightly job's confirmation verdict (report/confirm.json)."""
    out: dict[tuple[str, str, str], str] = {}
    for study, path in zip(studies["study"], studies["study_path"]):
        try:
            data = json.loads((Path(path) / "report" / "confirm.json").read_text())
            for r in data.get("results", []):
                out[(study, str(r["setting"]), str(r["metric"]))] = str(r["verdict"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue  # no confirmation run (the usual case), or a damaged file: nothing to show
    return out


def render(
    index: pd.DataFrame,
    plan: str | None,
    host: str | None,
    thresholds: Thresholds,
    root: Path,
    tests: list[PageTest] | None = None,
) -> str:
    """The page. `tests`: judge_page's for these rows, when the caller needs them too (the
    walk over every night of every series is the page's costliest step: done once)."""
    rows = filtered(index, plan, host)
    changes = version_changes(rows)
    if tests is None:
        tests = judge_page(rows, thresholds)
    all_flags = flags(rows, thresholds, tests=tests)
    judged = len(tests)  # BH's m
    plots = []
    for (group_plan, group_host), group in rows.groupby(["plan", "host"], sort=True):
        plot = plot_group(
            group_plan,
            group_host,
            group,
            [c for c in changes if (c.plan, c.host) == (group_plan, group_host)],
            [f for f in all_flags if (f.plan, f.host) == (group_plan, group_host)],
        )
        if plot is not None:
            plots.append(plot)
    studies = index.drop_duplicates("study_path")
    if plan is not None:
        studies = studies[studies["plan"] == plan]
    if host is not None:
        studies = studies[studies["host"] == host]
    confirmed = _confirmations(studies[studies["study"].isin({f.study for f in all_flags})])
    return page_template("history.html.j2").render(
        root=str(root),
        plan=plan,
        host=host,
        plots=plots,
        rule=PAGE_RULE,
        thresholds=thresholds,
        chance=chance_sentence(judged, len(all_flags), 0.05),
        latest=latest_nights(rows, thresholds),
        confirmation=lambda f: confirmed.get((f.study, f.setting, f.metric), "not run"),
        flags=sorted(all_flags, key=lambda f: -f.created_wall),
        changes=changes,
        studies=studies.sort_values("created_wall", ascending=False).to_dict("records"),
        date=lambda wall: datetime.fromtimestamp(float(wall), tz=timezone.utc).strftime("%Y-%m-%d %H:%M"),
        pct=signed_change,
    )


def write_history_html(
    path: Path,
    index: pd.DataFrame,
    root: Path,
    plan: str | None = None,
    host: str | None = None,
    thresholds: Thresholds = Thresholds(),
    tests: list[PageTest] | None = None,
) -> Path:
    path = Path(path)
    html = render(index, plan, host, thresholds, root, tests)
    try:
        atomic_write_bytes(path, html.encode())
    except OSError as exc:
        raise StoreError(f"cannot write {path}: {exc.strerror}; pass --out elsewhere") from None
    return path
