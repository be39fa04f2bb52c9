"""The on/off control (plans/control.toml), cut down, through the real sweep on qemu:///system:
KSM merges the guest's pages only when its RAM is mergeable; with <nosharepages/> nothing of
its QEMU merges though ksmd scans just as hard.

Marked vm (slow, needs `make host` and the image) and ksm (changes the host's one KSM)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pandas as pd
import pytest

from orchestrator.plan import parse_plan
from orchestrator.sweep import run_sweep
from tests.vmhost import files_under, study_leftovers
from tests.vmhost import need_vm_host

pytestmark = [pytest.mark.vm, pytest.mark.ksm]
PLAN = Path(__file__).resolve().parent.parent / "plans" / "control.toml"
# A merged 512 MiB idle guest holds tens of thousands of merged pages (zero pages and identical
# kernel/page-cache pages: 42.5-42.7k per QEMU in plans/control.toml here); 2,560 pages (10 MiB)
# is far below that, yet no accident: a QEMU whose RAM were not mergeable would show 0.
MERGED_MIN_PAGES = 2560


def cut_down(text: str, study: str, workdir: Path) -> str:
    """The shipped plan with one guest per arm and short phases at a fast scan rate (512 MiB =
    131k pages, scanned in well under a second at 20,000 pages per 20 ms wake-up when ksmd gets
    a core, so 10 s of measure is several full scans: merging needs two)."""
    changes = {
        "name": f'"{study}"',
        "count": "1",
        "settle_s": "3",
        "baseline_s": "1",
        "measure_s": "10",
        "pages_to_scan": "20000",
        "pss_interval_s": "5.0",
    }
    for key, value in changes.items():
        text, n = re.subn(rf"^{key} = .*$", f"{key} = {value}", text, count=1, flags=re.M)
        assert n == 1, f"plans/control.toml has no {key} line"
    return text.replace('start = "boot"', f'start = "boot"\nworkdir = "{workdir}"', 1)


def test_control_merges_only_with_merging_on(tmp_path, results_dir, ksm_guard):
    need_vm_host()
    study = f"pyt-control-{os.getpid()}"
    text = cut_down(PLAN.read_text(), study, tmp_path / "work")
    outcome = run_sweep(parse_plan(text), text, results_dir)
    assert (outcome.ran, outcome.failed) == (2, 0), (results_dir / study / "trials.csv").read_text()
    table = pd.read_csv(results_dir / study / "trials.csv")
    merged: dict[bool, int] = {}
    for trial_id in table["trial_id"]:
        folder = results_dir / study / "trials" / trial_id
        record = json.loads((folder / "trial.json").read_text())
        opted_out = bool(record["guests"]["nosharepages"])
        # The QEMU's guest RAM carries VmFlags mg exactly when merging is on (mem-merge=off clears it).
        assert [g["mergeable"] for g in record["mergeable"].values()] == [not opted_out], record["mergeable"]
        procs = pd.read_csv(folder / "processes.csv")
        measure = procs[procs["phase"] == "measure"]
        assert measure["label"].nunique() == 1 and measure["ksm_merging_pages"].notna().all()
        merged[opted_out] = int(measure["ksm_merging_pages"].max())
        if opted_out:
            # Not one page: QEMU marks nothing MADV_MERGEABLE, so ksmd never even looks at them.
            assert int(measure["ksm_rmap_items"].max()) == 0, measure["ksm_rmap_items"].describe()
    assert set(merged) == {False, True}
    assert merged[False] >= MERGED_MIN_PAGES, merged  # merging on: a saving
    assert merged[True] == 0, merged  # nosharepages: none, whatever the host's other processes do
    # KSM's own count agrees for the arm that merges (pages_sharing is host-wide: only the on arm
    # is checked, another mergeable process on the host could add to either).
    on = table[~table["guests.nosharepages"].astype(bool)]
    assert (on["saved_mib"] >= MERGED_MIN_PAGES * 4 / 1024).all(), on["saved_mib"]
    assert study_leftovers(study) == {"domains": [], "qemu": []}
    assert files_under(tmp_path / "work") == []
