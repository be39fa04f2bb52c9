"""A DensityHost over the VM runner: guests restored one at a time from a saved set.

WRITTEN, NOT RUN: this machine's guests belong to the main engineer's tests, so this adapter has
never started a guest. It uses VmRunner's own steps (the saved state, the guest set, SSH
reconnect, the clock and marker check) and adds only what density needs:

- the saved state holds max_guests guests (built once by VmRunner._saved_set, which boots them
  all at once: check_memory_fits refuses when they cannot fit). A saved guest comes back under
  its saved name and uuid, so each step restores the next saved guest on its own, as a
  one-guest GuestSet over that guest alone;
- PSS, MemAvailable and ksmd CPU are read directly (probes.py) at each decision, so a decision
  never rests on a tick that happened to be stale;
- the workload: at each decision every started guest runs sysbench at once for the plan's
  measure_s (one burst per step), which gives tps per guest at that count; an idle plan runs none.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from orchestrator.guests import states
from orchestrator.host import probes
from orchestrator.workloads import density
from orchestrator.errors import ProvisionError, WorkloadError
from orchestrator.guests.guest import GuestSession
from orchestrator.plan import Trial, pages_sharing_converged
from orchestrator.guests.provision import GuestSet
from orchestrator.runners.base import PhaseClock, TrialResult, sampler_health, wait_or_stop
from orchestrator.runners.record import ProvisionRecord
from orchestrator.runners.vm import (
    VmRunner,
    guest_set_key,
    guests_of,
    mergeable_record,
    set_clock_and_check,
    unmergeable_reason,
)
from orchestrator.workloads import sysbench

log = logging.getLogger(__name__)
# What a guest can take beyond its RAM (QEMU itself, page tables, device buffers): the first
# guest is planned at RAM + this, before anything was measured.
QEMU_OVERHEAD_MIB = 256


class VmDensityHost:
    def __init__(self, runner: VmRunner, trial: Trial, saved: states.SavedSet) -> None:
        self.runner = runner
        self.trial = trial
        self.saved = saved
        self.image = runner._image(guests_of(trial))
        self.sets: list[GuestSet] = []
        self.sessions: dict[int, GuestSession] = {}
        self.pids: dict[str, int] = {}
        self.mergeable: dict[str, Any] = {}  # {guest: its QEMU's guest RAM VmFlags mg}, as VM trials record
        self.root = runner.settings.root
        workload = trial.workload_model
        self.params = workload.params() if isinstance(workload, sysbench.SysbenchWorkload) else None
        self._cpu_mark: tuple[float, float] | None = None  # (monotonic, ksmd CPU s) at window start

    # -- DensityHost -----------------------------------------------------------------------

    def start_guest(self, index: int) -> None:
        if index >= len(self.saved.guests):
            raise WorkloadError(f"density: the saved state holds {len(self.saved.guests)} guests, guest {index} asked")
        saved_guest = self.saved.guests[index]
        one = dataclasses.replace(self.saved, guests=(saved_guest,))
        guest_set = self.runner._guest_set(self.trial, self.image, count=1, restore=one)
        guest_set.__enter__()
        self.sets.append(guest_set)
        guest = guest_set.guests[0]
        timeout_s = guests_of(self.trial).restore_timeout_s
        session = GuestSession.for_image(
            self.image, guest.ssh_port, connect_deadline_s=timeout_s, connect_timeout_s=5.0, retry_min_s=0.05
        )
        session.connect()
        self.sessions[index] = session
        set_clock_and_check(session, saved_guest.marker)
        pids = guest_set.qemu_pids()
        self.pids.update(pids)
        note_mergeable(self.mergeable, self.trial, pids, self.root)
        self.runner.settings.announce_start(f"guest {guest.name}")  # the throttler policy acts on it

    def run_in_guest(self, index: int, command: str, timeout_s: float) -> str:
        result = self.sessions[index].run(command, timeout_s=timeout_s)
        if not result.ok:
            raise WorkloadError(f"density: guest {index}: {command[:60]}... failed: {result.stderr.strip()[-300:]}")
        return result.stdout

    def wait_converged(self, window_s: float, tolerance_pct: float, max_s: float) -> bool:
        """until_converged's rule (plan.pages_sharing_converged) over the window, at most max_s.
        With KSM off nothing merges, which the rule never calls converged: hold one window
        (the span the step's ksmd CPU is measured over) and say it did not converge."""
        started = time.monotonic()
        self._cpu_mark = (started, self._ksmd_cpu_s())
        if self.trial.ksm_off:
            wait_or_stop(self.runner.stop, window_s)
            return False
        history: collections.deque[tuple[float, float]] = collections.deque()
        while True:
            wait_or_stop(self.runner.stop, 1.0)
            now = time.monotonic() - started
            history.append((now, float(probes.read_ksm(self.root, ("pages_sharing",)).get("pages_sharing", 0))))
            while history and history[0][0] < now - window_s:
                history.popleft()
            if history[-1][0] - history[0][0] >= 0.9 * window_s:
                if pages_sharing_converged((v for _, v in history), tolerance_pct):
                    return True
            if now >= max_s:
                return False

    def measure(self, guests: int, converged: bool) -> density.Step:
        pss_kib = 0.0
        for pid in self.pids.values():
            rollup = probes.read_smaps_rollup(pid, self.root) or {}
            pss_kib += float(rollup.get("pss_kib", math.nan))
        available_mib = probes.read_meminfo(self.root)["MemAvailable"] / 1024
        cpu_pct = math.nan
        if self._cpu_mark is not None:
            since, cpu_before = self._cpu_mark
            elapsed = time.monotonic() - since
            cpu_pct = 100.0 * (self._ksmd_cpu_s() - cpu_before) / elapsed if elapsed > 0 else math.nan
        tps = self._tps_burst() if guests else math.nan
        sharing = float(probes.read_ksm(self.root, ("pages_sharing",)).get("pages_sharing", math.nan))
        return density.Step(guests, pss_kib / 1024, available_mib, cpu_pct, tps, converged, sharing)

    # -- helpers ---------------------------------------------------------------------------

    def _ksmd_cpu_s(self) -> float:
        pid = probes.find_ksmd_pid(self.root)
        value = probes.read_cpu_seconds(pid, self.root) if pid else None
        return float(value) if value is not None else math.nan

    def _tps_burst(self) -> float:
        if self.params is None:
            return math.nan
        burst = self.params.model_copy(update={"duration_s": max(1, int(self.trial.phases_model.measure_s))})
        sessions = {str(i): s for i, s in self.sessions.items()}
        runs = sysbench.run_all(sessions, burst, burst.duration_s + 120)
        values = [r.summary.tps for r in runs.values() if r.ok and r.summary.tps is not None]
        return float(sum(values) / len(values)) if values else math.nan

    def qemu_pids(self) -> dict[str, int]:
        return dict(self.pids)

    def close(self) -> None:
        for session in self.sessions.values():
            with contextlib.suppress(Exception):
                session.close()
        self.sessions.clear()
        for guest_set in reversed(self.sets):
            with contextlib.suppress(Exception):
                guest_set.__exit__(None, None, None)
        self.sets.clear()


def note_mergeable(record: dict[str, Any], trial: Trial, qemu_pids: Mapping[str, int], root: Path) -> None:
    """Add these (just started) QEMUs' guest RAM mg flags to the trial's record, as VM trials
    record them (vm.mergeable_record, read once per guest); a guest KSM could not merge fails
    the trial with vm.unmergeable_reason, after it is recorded."""
    found = mergeable_record(qemu_pids, guests_of(trial).memory_mib, root)
    record.update(found)
    if reason := unmergeable_reason(trial, found):
        raise ProvisionError(reason)


class DensityVmRunner(VmRunner):
    def run(self, trial: Trial, clock: PhaseClock, result: TrialResult) -> None:
        cfg = self.plan.density
        assert cfg is not None
        # The saved state holds max_guests guests; each step restores the next one.
        state_trial = dataclasses.replace(trial, guests=dict(trial.guests or {}, count=cfg.max_guests))
        saved, state_info = self._saved_set(state_trial, guest_set_key(state_trial), clock)
        result.provision = ProvisionRecord(**{**state_info, "start": "restore", "density": True})
        host = VmDensityHost(self, state_trial, saved)
        outcome = density.DensityResult()
        sampler = self.sampler_for(trial, host.qemu_pids)
        try:
            with sampler:
                with clock.phase("baseline", sampler, self.progress):
                    wait_or_stop(self.stop, trial.phases_model.baseline_s)
                if trial.ksm_off:
                    self.settings.stop()
                else:
                    self.settings.start()
                with clock.phase("measure", sampler, self.progress):
                    first_mib = guests_of(state_trial).memory_mib + QEMU_OVERHEAD_MIB
                    density.run_density(host, cfg, first_guest_mib=first_mib, result=outcome)
        finally:
            result.density = outcome.record()
            result.mergeable = dict(host.mergeable)
            result.frames = {
                "ksm": sampler.ksm_frame(),
                "processes": sampler.process_frame(),
                "density": pd.DataFrame([dataclasses.asdict(s) for s in outcome.steps]),
            }
            result.sampler = sampler_health(sampler)
            host.close()
