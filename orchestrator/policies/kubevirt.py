"""kubevirt: an EMULATION of KubeVirt's virt-handler KSM node rule, not KubeVirt itself.

Source read: kubevirt/kubevirt, pkg/virt-handler/ksm/ksm.go (calculateNewRunSleepAndPages and
writeKsmValuesToFiles; stored copy at commit 0b9b142d), itself "inspired from oVirt MoM's
ksm.rules". What we reproduce, per spin:
- pressure = MemAvailable <= free_percent * MemTotal (KubeVirt: available > total*free -> none)
- sleep_millisecs = sleep_ms_baseline * 16 GiB / (MemTotal - MemAvailable) (KiB units),
  at least sleep_ms_baseline / 10
- under pressure: KSM off -> on with pages_to_scan = pages_init; on -> pages += boost, <= max
- no pressure: on -> pages += decay; below pages_min -> pages = min and KSM off; off -> stays off
- writes sleep and pages only when running, then run (as KubeVirt does)
What we leave out: the node label selector, annotations (our plan's [ksm.kubevirt] stands in
for KubeVirt's override annotations), and the 3-minute ticker (period_s, 10 s by default, so
that a trial sees several spins). The first spin runs as measure starts, as KubeVirt's loop()
spins once on start.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from orchestrator.host import probes
from orchestrator.plugins import PolicyPlugin
from orchestrator.policies.params import KubevirtParams

log = logging.getLogger(__name__)

SIXTEEN_GIB_KIB = 16 * 1024 * 1024


@dataclass(frozen=True)
class KsmState:
    running: bool
    pages_to_scan: int
    sleep_millisecs: int


def sleep_for(total_kib: int, available_kib: int, params: KubevirtParams) -> int:
    used_kib = max(1, total_kib - available_kib)  # KubeVirt divides by it unguarded
    return max(params.sleep_ms_baseline * SIXTEEN_GIB_KIB // used_kib, params.sleep_ms_baseline // 10)


def kubevirt_step(
    running: bool, pages_now: int, total_kib: int, available_kib: int, params: KubevirtParams
) -> KsmState:
    """One spin of the rule (pure): the state to write, from the current run state and
    pages_to_scan (KubeVirt reads both back from sysfs) and /proc/meminfo."""
    sleep = sleep_for(total_kib, available_kib, params)
    if available_kib > total_kib * params.free_percent:
        if not running:
            return KsmState(False, pages_now, sleep)
        pages = pages_now + params.pages_decay
        if pages < params.pages_min:
            return KsmState(False, params.pages_min, sleep)
        return KsmState(True, pages, sleep)
    if not running:
        return KsmState(True, params.pages_init, sleep)
    return KsmState(True, min(pages_now + params.pages_boost, params.pages_max), sleep)


def read_meminfo_kib(root: Path) -> tuple[int, int]:
    info = probes.read_meminfo(root)
    return int(info["MemTotal"]), int(info["MemAvailable"])


class KubevirtRun:
    """The rule as a controller thread; writes go through HostSettings (recorded, restorable)."""

    def __init__(self, settings: Any, params: KubevirtParams) -> None:
        self.settings = settings
        self.params = params
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None
        self.steps: list[dict[str, Any]] = []
        self.error: str | None = None

    def spin(self) -> KsmState:
        root = self.settings.root
        total, available = read_meminfo_kib(root)
        # KubeVirt reads both back from sysfs (loadKSM, getKsmPages) rather than remembering them.
        running = self.settings.read_counter("run") == 1
        pages_now = self.settings.read_counter("pages_to_scan")
        state = kubevirt_step(running, pages_now, total, available, self.params)
        if state.running:
            self.settings.write_knob("sleep_millisecs", state.sleep_millisecs)
            self.settings.write_knob("pages_to_scan", state.pages_to_scan)
        self.settings.write_knob("run", 1 if state.running else 0)
        self.steps.append(
            {"t_wall": round(time.time(), 3), "mem_total_kib": total, "mem_available_kib": available, **asdict(state)}
        )
        return state

    def _loop(self) -> None:
        while True:
            try:
                self.spin()
            except Exception as exc:  # one failed spin must not kill the trial; it is recorded
                self.error = f"{type(exc).__name__}: {exc}"
                log.error("kubevirt controller: %s", self.error)
            if self.stop_event.wait(self.params.period_s):
                return

    def start(self) -> None:
        for knob in ("run", "pages_to_scan", "sleep_millisecs"):
            self.settings.remember(knob)
        # KSM starts stopped (run=0 after the sweep's reset): the rule decides when it runs.
        self.thread = threading.Thread(target=self._loop, name="kubevirt-ksm", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join(timeout=10)

    def summary(self) -> dict[str, Any]:
        return {
            "name": "kubevirt",
            "emulation_of": "kubevirt/kubevirt pkg/virt-handler/ksm/ksm.go",
            "params": self.params.model_dump(),
            "steps": self.steps,
            "ksm_turned_on": any(s["running"] for s in self.steps),
            "error": self.error,
        }


PLUGIN = PolicyPlugin(
    name="kubevirt", params=KubevirtParams, start=lambda settings, params, work_dir: KubevirtRun(settings, params)
)
