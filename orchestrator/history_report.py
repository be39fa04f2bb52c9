"""history.html: each metric per setting over time, per plan and host, self-contained.

One figure per plan x host: a panel per metric, a line per setting (mean across its trials, error
bars = 95% interval across trials; none with one trial), dotted vertical lines where kernel, QEMU
or libvirt changed, red rings on regressions and green rings on improvements against the previous
run (compare's rule). Tables below list those points, the version changes and every study.
"""

from __future__ import annotations

import io
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure

from orchestrator.compare import IMPROVEMENT, METRICS, REGRESSION, RULE, Thresholds
from orchestrator.history import Flag, VersionChange, filtered, flags, metrics_present, version_changes
from orchestrator.report import Plot
from orchestrator.store import atomic_write_bytes

MAX_SETTINGS_PER_PANEL = 10  # more lines than this are unreadable: the rest is in the index
UNITS = {m.name: m.unit for m in METRICS}
RING = {REGRESSION: "#c62828", IMPROVEMENT: "#2e7d32"}


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    return buffer.getvalue()


def _dates(walls: Any) -> list[datetime]:
    return [datetime.fromtimestamp(float(w), tz=timezone.utc) for w in walls]


def plot_group(plan: str, host: str, rows: pd.DataFrame, changes: list[VersionChange],
               group_flags: list[Flag]) -> Plot | None:
    present = metrics_present(rows)
    if not present:
        return None
    settings = list(dict.fromkeys(rows.sort_values("created_wall")["setting"]))[:MAX_SETTINGS_PER_PANEL]
    colours = ([colormaps["tab10"](i) for i in range(len(settings))] if len(settings) <= 10 else
               [colormaps["viridis"](i / (len(settings) - 1)) for i in range(len(settings))])
    cols = min(2, len(present))
    nrows = math.ceil(len(present) / cols)
    fig = Figure(figsize=(6.2 * cols, 3.0 * nrows + 0.6))
    flagged = {(f.study, f.setting, f.metric): f.verdict for f in group_flags}
    for i, metric in enumerate(present):
        ax = fig.add_subplot(nrows, cols, i + 1)
        for colour, setting in zip(colours, settings):
            series = rows[rows["setting"] == setting].sort_values("created_wall")
            values = pd.to_numeric(series[metric], errors="coerce").to_numpy(dtype=float)
            if not np.isfinite(values).any():
                continue
            when = _dates(series["created_wall"])
            half = np.nan_to_num(pd.to_numeric(series[f"{metric}_ci95"], errors="coerce").to_numpy(dtype=float))
            ax.errorbar(when, values, yerr=half, color=colour, marker="o", ms=3, lw=1, capsize=2, label=setting)
            for study, x, y in zip(series["study"], when, values):
                verdict = flagged.get((study, setting, metric))
                if verdict:
                    ax.plot([x], [y], marker="o", ms=11, mfc="none", mec=RING[verdict], mew=2)
        for change in changes:
            ax.axvline(_dates([change.created_wall])[0], color="#555555", ls=":", lw=1)
        ax.set_title(f"{metric} ({UNITS[metric]})", fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(axis="x", labelsize=7, rotation=20)
        if i == 0:
            ax.legend(fontsize=6, loc="best")
    fig.suptitle(f"{plan} on {host}: dotted = kernel/QEMU/libvirt changed; red ring = regression, "
                 "green = improvement vs the previous run", fontsize=10)
    return Plot(f"history_{plan}_{host}", f"{plan} on {host}",
                "Mean per setting per study; bars: 95% interval across that study's trials.", _png(fig))


def render(index: pd.DataFrame, plan: str | None, host: str | None, thresholds: Thresholds,
           root: Path) -> str:
    rows = filtered(index, plan, host)
    changes = version_changes(rows)
    all_flags = flags(rows, thresholds)
    plots = []
    for (group_plan, group_host), group in rows.groupby(["plan", "host"], sort=True):
        plot = plot_group(group_plan, group_host, group,
                          [c for c in changes if (c.plan, c.host) == (group_plan, group_host)],
                          [f for f in all_flags if (f.plan, f.host) == (group_plan, group_host)])
        if plot is not None:
            plots.append(plot)
    studies = index.drop_duplicates("study_path")
    if plan is not None:
        studies = studies[studies["plan"] == plan]
    if host is not None:
        studies = studies[studies["host"] == host]
    env = jinja2.Environment(loader=jinja2.PackageLoader("orchestrator", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined)
    return env.get_template("history.html.j2").render(
        root=str(root), plan=plan, host=host, plots=plots, rule=RULE, thresholds=thresholds,
        flags=sorted(all_flags, key=lambda f: -f.created_wall), changes=changes,
        studies=studies.sort_values("created_wall", ascending=False).to_dict("records"),
        date=lambda wall: datetime.fromtimestamp(float(wall), tz=timezone.utc).strftime("%Y-%m-%d %H:%M"),
        pct=lambda v, h: ("–" if not math.isfinite(v) else f"{v:+.1f}%") + (f" ± {h:.1f}%" if math.isfinite(h) else ""),
    )


def write_history_html(path: Path, index: pd.DataFrame, root: Path, plan: str | None = None,
                       host: str | None = None, thresholds: Thresholds = Thresholds()) -> Path:
    path = Path(path)
    atomic_write_bytes(path, render(index, plan, host, thresholds, root).encode())
    return path
