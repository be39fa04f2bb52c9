"""The host's KSM knobs and THP modes as tests see them: `snapshot` reads every knob a test must
leave as it found it, `force` writes a snapshot back (ksm_guard's repair when a test failed);
and fake KSM sysfs trees for tests that must not touch the real one. Test files import these
from here; conftest.py only holds fixtures."""

from __future__ import annotations

from pathlib import Path

from orchestrator.host.ksm import HOST_KNOB_FILES, KSM_KNOBS, read_host_knobs, read_ksm_knobs, read_sysfs_value
from orchestrator.host.probes import KSM_SYSFS

ROOT = Path("/")
# Knobs (not counters) whose value a test must leave as it found it.
KNOBS = KSM_KNOBS


def snapshot() -> dict[str, str]:
    ksm = read_ksm_knobs(ROOT)
    state = {k: ksm[k] for k in KNOBS if k in ksm}
    state.update(read_host_knobs(ROOT))
    return state


def force(state: dict[str, str]) -> None:
    ksm_dir = ROOT / KSM_SYSFS
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


# A KSM sysfs folder as a kernel before 6.1 has it (no general_profit, ksm_zero_pages, advisor).
OLD_KERNEL_KSM = {
    "run": "0",
    "pages_to_scan": "100",
    "sleep_millisecs": "20",
    "pages_shared": "0",
    "pages_sharing": "0",
    "pages_unshared": "0",
    "pages_volatile": "0",
    "full_scans": "0",
    "merge_across_nodes": "1",
    "max_page_sharing": "256",
    "use_zero_pages": "0",
}


def fake_ksm_tree(root: Path, files: dict[str, str]) -> Path:
    """root/sys/kernel/mm/ksm holding `files` (name: value), as sysfs writes them (a newline)."""
    ksm_dir = root / KSM_SYSFS
    ksm_dir.mkdir(parents=True)
    for name, value in files.items():
        (ksm_dir / name).write_text(value + "\n")
    return ksm_dir
