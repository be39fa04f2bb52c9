"""advisor: the kernel's scan-time advisor (mm/ksm.c, Linux 6.8+) sets pages_to_scan itself so
that a full scan takes about advisor_target_scan_time seconds, within advisor_min/max_pages_to_scan
and advisor_max_cpu (% of a core). The plan's advisor_* knobs are applied like any knob
(plan.py adds advisor_mode = "scan-time"); this module only guards and records.

Kernel facts this relies on (Documentation/admin-guide/mm/ksm.rst): pages_to_scan is refused
while advisor_mode is scan-time; switching advisor_mode resets pages_to_scan (to the advisor's
minimum, or to the default 100 when switching back to none).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.errors import PlanError
from orchestrator.plugins import PolicyPlugin

ADVISOR_FILES = (
    "advisor_mode",
    "advisor_max_cpu",
    "advisor_min_pages_to_scan",
    "advisor_max_pages_to_scan",
    "advisor_target_scan_time",
)


def missing_advisor_files(ksm_dir: Path) -> list[str]:
    """The advisor's sysfs files this kernel lacks (all of them before Linux 6.8)."""
    return [name for name in ADVISOR_FILES if not (ksm_dir / name).exists()]


def advisor_refusal(ksm_dir: Path) -> str | None:
    """Why the advisor policy cannot run on this host (None when it can)."""
    missing = missing_advisor_files(ksm_dir)
    if not missing:
        return None
    return (
        f"policy 'advisor' needs the kernel's scan-time advisor (Linux 6.8+), but {ksm_dir} has no "
        f"{', '.join(missing)}: run the advisor trials on a newer kernel or drop 'advisor' from the plan"
    )


class AdvisorRun:
    def __init__(self, settings: Any) -> None:
        self.settings = settings

    def start(self) -> None:
        # The advisor rewrites pages_to_scan behind HostSettings: record its value first.
        self.settings.remember("pages_to_scan")
        self.settings.run_ksmd()

    def stop(self) -> None:
        return None

    def summary(self) -> dict[str, Any]:
        return {"name": "advisor"}


def advisor_knobs(ksm: dict[str, Any]) -> None:
    """A trial's knobs under the advisor: advisor_mode scan-time, no pages_to_scan (the advisor
    drives it; the kernel refuses writes meanwhile)."""
    if ksm.get("advisor_mode") == "none":
        raise PlanError('[ksm] policy = "advisor" with advisor_mode = "none": drop advisor_mode')
    ksm["advisor_mode"] = "scan-time"
    ksm.pop("pages_to_scan", None)


PLUGIN = PolicyPlugin(
    name="advisor",
    start=lambda settings, params, work_dir: AdvisorRun(settings),
    knobs=advisor_knobs,
    refusal=advisor_refusal,
)
