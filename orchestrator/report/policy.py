"""The report's policy parts: the knobs each policy chose over time beside the saving, and the
findings a policy trial can produce (it never turned KSM on; its nominal vs measured scan rate).
report/study.py (the findings) and report/plots.py (the plot) call these; they return plain data (png bytes,
sentences) so they import neither."""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from orchestrator.analysis import samplemetrics
from orchestrator.units import MIB


def _policy_of(row: Any) -> str:
    value = row.get("policy") if hasattr(row, "get") else None
    return value if isinstance(value, str) else "static"


def plot_policy_knobs(study: Any, sm: Any) -> tuple[str, str, str, bytes] | None:
    """Three stacked panels over time since measure start: saving, pages_to_scan and
    sleep_millisecs, one colour per policy; None unless the study ran a policy other than static."""
    trials = sm.trials
    if trials.empty or "policy" not in trials.columns or set(trials["policy"].dropna()) <= {"static"}:
        return None
    info = trials.set_index("trial_id")
    names = sorted(set(trials.loc[~trials["ksm_off"], "policy"].dropna()))
    colours = dict(zip(names, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")))
    fig = Figure(figsize=(11, 8))
    axes = fig.subplots(3, 1, sharex=True)
    labelled: set[str] = set()
    drawn = 0
    for data in study.trials:
        row = info.loc[data.trial_id]
        if row["status"] != "ok" or row["ksm_off"] or data.ksm is None:
            continue
        ksm = data.ksm
        measure = np.flatnonzero(samplemetrics.phase_mask(ksm, "measure"))
        if measure.size == 0:
            continue
        t_s = pd.to_numeric(ksm["t_s"], errors="coerce").to_numpy(float)
        t_rel = t_s - t_s[measure[0]]
        name = _policy_of(row)
        label = None if name in labelled else name
        labelled.add(name)
        colour = colours.get(name, "0.4")
        saved = samplemetrics.saved_pages_series(ksm, row["_ksm"]) * sm.page_size_bytes / MIB
        axes[0].plot(t_rel, saved, color=colour, lw=1.0, label=label)
        for ax, knob in ((axes[1], "pages_to_scan"), (axes[2], "sleep_millisecs")):
            if knob in ksm.columns:
                values = pd.to_numeric(ksm[knob], errors="coerce").to_numpy(float)
                ok = np.isfinite(values)  # knobs are read on cheap ticks only
                ax.step(t_rel[ok], values[ok], where="post", color=colour, lw=1.0)
        drawn += 1
    if drawn == 0:
        return None
    for ax, ylabel in zip(axes, ("saved (MiB)", "pages_to_scan", "sleep_millisecs")):
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.axvline(0, color="0.3", lw=0.8, ls=":")
    axes[0].legend(fontsize=8, loc="upper left")
    axes[0].set_title("What each policy chose: saving, pages_to_scan and sleep_millisecs over time")
    axes[2].set_xlabel("time since measure start (s)")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return (
        "policy_knobs",
        "Policies: knobs over time",
        f"{drawn} KSM-on trials, one colour per policy. Knobs are sampled on the cheap ticks; a flat "
        "pages_to_scan with saving still rising means the policy never moved it (static), a step is a "
        "policy's decision. KSM may be off (run=0) while a policy's knobs show a value.",
        buffer.getvalue(),
    )


def policy_findings(sm: Any) -> list[tuple[str, bool]]:
    """(sentence, warn) pairs: policies that never turned KSM on; nominal vs measured scan rate."""
    trials = sm.trials
    out: list[tuple[str, bool]] = []
    if trials.empty or "policy" not in trials.columns:
        return out
    ok = trials[(trials["status"] == "ok") & ~trials["ksm_off"]]
    if "policy_ksm_turned_on" in ok.columns:
        never = ok[ok["policy_ksm_turned_on"].astype(object).eq(False)]
        for name, group in never.groupby("policy"):
            why = (
                " (ksmtuned turns KSM on only when QEMU's committed memory plus its threshold nears "
                "MemTotal, or free memory falls below the threshold)"
                if name == "ksmtuned"
                else " (the KubeVirt rule turns KSM on only when MemAvailable falls to free_percent of MemTotal)"
                if name == "kubevirt"
                else " (the throttler runs KSM only after a guest or worker start, and with initial_run = 0 "
                "none reached it)"
                if name == "throttler"
                else ""
            )
            out.append(
                (
                    f"Policy {name} never turned KSM on in {len(group)} of "
                    f"{int((ok['policy'] == name).sum())} trials{why}: on this host and load it would "
                    "save nothing. That is a finding about the policy, not a failed trial.",
                    True,
                )
            )
    if {"nominal_pages_per_s", "pages_scanned_per_s"} <= set(ok.columns):
        parts = []
        for name, group in ok.groupby("policy"):
            nominal = pd.to_numeric(group["nominal_pages_per_s"], errors="coerce").mean()
            measured = pd.to_numeric(group["pages_scanned_per_s"], errors="coerce").mean()
            if math.isfinite(nominal) or math.isfinite(measured):
                parts.append(f"{name}: nominal {nominal:.0f}, measured {measured:.0f} pages/s")
        if parts:
            out.append(
                (
                    "Scan rate asked for by the knobs (pages_to_scan / sleep_millisecs, while KSM ran) vs "
                    "scanned by ksmd (pages_scanned), means of trials: " + "; ".join(parts) + ".",
                    False,
                )
            )
    return out
