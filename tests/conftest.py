"""Shared fixtures. Tests that change the real KSM take `ksm_guard`: it snapshots every knob
and THP mode, and after the test asserts they are back (and forces them back if not, so a
failing test never leaves the host changed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from orchestrator.ksm import HOST_KNOB_FILES, KSM_REL, read_host_knobs, read_ksm_knobs, read_sysfs_value

ROOT = Path("/")
# Knobs (not counters) whose value a test must leave as it found it.
KNOBS = ("run", "pages_to_scan", "sleep_millisecs", "max_page_sharing", "merge_across_nodes",
         "use_zero_pages", "stable_node_chains_prune_millisecs", "smart_scan", "advisor_mode",
         "advisor_max_cpu", "advisor_min_pages_to_scan", "advisor_max_pages_to_scan",
         "advisor_target_scan_time")


def snapshot() -> dict[str, str]:
    ksm = read_ksm_knobs(ROOT)
    state = {k: ksm[k] for k in KNOBS if k in ksm}
    state.update(read_host_knobs(ROOT))
    return state


def _force(state: dict[str, str]) -> None:
    ksm_dir = ROOT / KSM_REL
    (ksm_dir / "run").write_text("2")
    order = ["advisor_mode"] + [k for k in state if k not in ("advisor_mode", "run")]
    for knob in order:
        if knob in HOST_KNOB_FILES:
            path = ROOT / HOST_KNOB_FILES[knob]
        else:
            path = ksm_dir / knob
        if path.exists() and read_sysfs_value(path) != state[knob]:
            path.write_text(state[knob])
    (ksm_dir / "run").write_text(state["run"])


@pytest.fixture
def ksm_guard():
    if not os.access(ROOT / KSM_REL / "run", os.W_OK):
        pytest.skip("needs root and a writable /sys/kernel/mm/ksm")
    before = snapshot()
    yield before
    after = snapshot()
    if after != before:
        _force(before)
    assert after == before, f"KSM/THP knobs not restored: {set(before.items()) ^ set(after.items())}"


@pytest.fixture
def results_dir(tmp_path: Path) -> Path:
    path = tmp_path / "results"
    path.mkdir()
    return path
