"""The phases every trial runner shares, below the sweep loop and the runners alike.

TrialRunner is the base of the runners (processes, probe, VM, density); TrialResult is what a
runner hands the sweep; PhaseClock times the phases for trial.json; wait_or_stop, wait_steady
and measure are the bounded waits a phase is made of, each ending early on a stop request.
The stop request lives here whole: stop_on_signals turns SIGINT/SIGTERM into a StopFlag, the
waits raise StopRequested on it. Runners import this module, the sweep imports the runners:
data flows one way.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from orchestrator.errors import OrchestratorError
from orchestrator.host.ksm import HostSettings
from orchestrator.plan import PhasesSection, Plan, Trial, fast_interval_s, pages_sharing_converged
from orchestrator.runners.record import MergeableRecord, ProbeRecord, ProvisionRecord, SamplerRecord, TrialRecord
from orchestrator.workloads.density import DensityRecord
from orchestrator.host.sampler import Sampler

log = logging.getLogger(__name__)


# --- the stop request: a signal sets a flag (stop_on_signals), every bounded wait checks it and
# raises StopRequested, the sweep finishes tearing down, the CLI exits 128 + signum.


class StopRequested(OrchestratorError):
    """SIGINT/SIGTERM arrived: finish tearing down, keep what was measured, exit non-zero."""


class StopFlag(threading.Event):
    """The sweep's stop request; `signum` is the signal that made it, so the CLI can exit with
    128 + signum as a shell reports a signal (130 SIGINT, 143 SIGTERM)."""

    signum: int | None = None


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    def request_stop(signum: int, _frame: Any) -> None:
        if not stop.is_set():
            log.warning("%s received: stopping after teardown (measured data is kept)", signal.Signals(signum).name)
            if isinstance(stop, StopFlag):
                stop.signum = signum
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@dataclass(frozen=True)
class SteadyWait:
    """How the steady phase ended: after how long, whether at its cap, the last slopes."""

    wait_s: float
    timed_out: bool
    slopes_mib_per_min: dict[str, float]


@dataclass
class TrialResult:
    """What a runner measured in one trial. The runner fills it as data arrives, so that a
    failure or a stop request keeps what was measured; the sweep puts its parts into the trial's
    record (runners/record.py TrialRecord) and the store writes them. None means "this runner
    does not produce it": the part is then absent from trial.json."""

    frames: dict[str, pd.DataFrame] = field(default_factory=dict)  # <name>.csv in the trial folder
    extra_json: dict[str, Any] = field(default_factory=dict)  # <name>.json in the trial folder
    provision: ProvisionRecord | None = None  # how the guests were started (VM runners)
    mergeable: dict[str, Any] | None = None  # VM runners: {guest: its QEMU's guest RAM VmFlags mg}
    probe: ProbeRecord | None = None  # the probe runner's record (costs.probe_record_metrics)
    density: DensityRecord | None = None  # density.DensityResult.record()
    steady: SteadyWait | None = None  # None: no steady wait (steady_max_s = 0)
    converged_by_rule: bool | None = None  # measure ended by the until_converged rule
    rounds_done: int | None = None  # processes: fills by the slowest worker
    sampler: SamplerRecord | None = None  # sampler_health

    def fill(self, record: TrialRecord) -> None:
        """Put what the runner measured into the trial's record."""
        record.provision = self.provision
        record.mergeable = (
            None
            if self.mergeable is None
            else {name: MergeableRecord.model_validate(info) for name, info in self.mergeable.items()}
        )
        record.probe = self.probe
        record.density = self.density
        if self.steady is not None:
            record.steady_wait_s = self.steady.wait_s
            record.steady_timed_out = self.steady.timed_out
            record.steady_slopes_mib_per_min = self.steady.slopes_mib_per_min
        record.converged_by_rule = self.converged_by_rule
        record.rounds_done = self.rounds_done
        record.sampler = self.sampler


@dataclass
class PhaseClock:
    """Wall-clock start/end of each phase, stored in trial.json."""

    timings: dict[str, dict[str, float]] = field(default_factory=dict)

    @contextlib.contextmanager
    def phase(
        self, name: str, sampler: Sampler | None = None, progress: Callable[[str], None] | None = None
    ) -> Iterator[None]:
        if sampler is not None:
            sampler.set_phase(name)
        if progress:
            progress(name)
        entry = {"start_wall": time.time()}
        self.timings[name] = entry
        start = time.monotonic()
        try:
            yield
        finally:
            entry["end_wall"] = time.time()
            entry["duration_s"] = round(time.monotonic() - start, 3)


def wait_or_stop(stop: threading.Event, seconds: float, check: Callable[[], None] | None = None) -> None:
    """Wait `seconds` unless a stop is requested; `check` (e.g. "are all guests alive?") runs
    at least once a second and ends the wait by raising."""
    deadline = time.monotonic() + seconds
    while True:
        if check is not None:
            check()
        left = deadline - time.monotonic()
        if stop.is_set() or (left > 0 and stop.wait(min(left, 1.0) if check else left)):
            raise StopRequested("interrupted")
        if deadline - time.monotonic() <= 0:
            if check is not None:
                check()
            return


def measure(
    phases: PhasesSection, sampler: Sampler, stop: threading.Event, check: Callable[[], None] | None = None
) -> bool:
    """Hold the measure phase for measure_s, then (optionally) until pages_sharing is stable
    over converge_window_s (plan.pages_sharing_converged), capped at max_measure_s. Returns
    whether it converged."""
    measure_s = phases.measure_s
    start = time.monotonic()
    if not phases.until_converged:
        wait_or_stop(stop, measure_s, check)
        return False
    window_s = phases.converge_window_s
    cap_s = phases.max_measure_s
    history: collections.deque[tuple[float, float]] = collections.deque()
    poll_s = min(1.0, window_s / 4)
    while True:
        wait_or_stop(stop, poll_s, check)
        now = time.monotonic() - start
        latest = sampler.latest() or {}
        if "pages_sharing" in latest:
            history.append((now, float(latest["pages_sharing"])))
        while history and history[0][0] < now - window_s:
            history.popleft()
        if now >= measure_s and history and history[-1][0] - history[0][0] >= window_s * 0.9:
            if pages_sharing_converged((v for _, v in history), phases.converge_tolerance_pct):
                return True
        if now >= cap_s:
            return False


def _slope_mib_per_min(t_s: Any, kib: Any) -> float:
    """Least-squares slope of a KiB series in MiB per minute (NaN with < 3 points)."""
    t, v = np.asarray(t_s, dtype=float), np.asarray(kib, dtype=float)
    ok = np.isfinite(t) & np.isfinite(v)
    if ok.sum() < 3 or np.ptp(t[ok]) <= 0:
        return math.nan
    return float(np.polyfit(t[ok], v[ok], 1)[0]) * 60.0 / 1024.0


def wait_steady(
    phases: PhasesSection, sampler: Sampler, stop: threading.Event, check: Callable[[], None] | None = None
) -> SteadyWait | None:
    """Hold until the tracked processes' summed RSS and host MemAvailable each move by less than
    steady_slope_mib_per_min over the last steady_window_s, at most steady_max_s. A guest that
    is still growing puts its growth into every delta-based saving of the trial; waiting for it
    (and saying how long it took, or that it never settled) keeps that out of the baseline."""
    max_s = phases.steady_max_s
    if max_s <= 0:
        return None
    window_s = phases.steady_window_s
    limit = phases.steady_slope_mib_per_min
    started = time.monotonic()
    slopes: dict[str, float] = {}
    while True:
        waited = time.monotonic() - started
        if waited >= window_s:
            ksm = sampler.ksm_frame()
            procs = sampler.process_frame()
            now_t = float(ksm["t_s"].iloc[-1]) if not ksm.empty else 0.0
            recent = ksm[ksm["t_s"] >= now_t - window_s] if not ksm.empty else ksm
            slopes = {"mem_available": _slope_mib_per_min(recent.get("t_s", []), recent.get("mem_available_kib", []))}
            if not procs.empty and "rss_kib" in procs:
                rss = procs[procs["t_s"] >= now_t - window_s].groupby("t_s")["rss_kib"].sum()
                slopes["rss"] = _slope_mib_per_min(rss.index, rss.to_numpy())
            if all(math.isfinite(v) and abs(v) < limit for v in slopes.values()):
                return SteadyWait(round(waited, 1), False, {k: round(v, 2) for k, v in slopes.items()})
        if waited >= max_s:
            log.warning(
                "guests still not steady after %.0f s (slopes %s MiB/min, limit %s): measuring anyway",
                max_s,
                {k: round(v, 1) for k, v in slopes.items()},
                limit,
            )
            return SteadyWait(round(waited, 1), True, {k: round(v, 2) for k, v in slopes.items()})
        wait_or_stop(stop, 1.0, check)


class TrialRunner:
    """Runs one trial of a given kind; the sweep picks the runner by workload type."""

    def __init__(
        self, plan: Plan, settings: HostSettings, stop: threading.Event, progress: Callable[[str], None]
    ) -> None:
        self.plan = plan
        self.settings = settings
        self.stop = stop
        self.progress = progress

    def sampler_for(self, trial: Trial, targets: Callable[[], Mapping[str, int]]) -> Sampler:
        sampling = self.plan.sampling
        pss_every = max(1, round(sampling.pss_interval_s / sampling.interval_s))
        # The first tick fires on entry, before the first phase is announced: name it here.
        return Sampler(
            sampling.interval_s,
            pss_every,
            targets,
            phase="settle",
            fast_interval_s=fast_interval_s(trial.sampling_model, trial.workload_model),
            jitter_fraction=sampling.jitter_fraction,
            cpu_budget_pct=sampling.cpu_budget_pct,
        )

    def settle_and_steady(
        self,
        trial: Trial,
        sampler: Sampler,
        clock: PhaseClock,
        result: TrialResult,
        check: Callable[[], None] | None = None,
    ) -> None:
        """settle (a fixed wait) -> steady (until the targets stop growing, bounded), every
        runner's lead-in to its baseline; the steady wait's record goes into `result`."""
        phases = trial.phases_model
        with clock.phase("settle", sampler, self.progress):
            wait_or_stop(self.stop, phases.settle_s, check)
        with clock.phase("steady", sampler, self.progress):
            result.steady = wait_steady(phases, sampler, self.stop, check)

    def ksm_phases(self, trial: Trial, sampler: Sampler, clock: PhaseClock) -> bool:
        """baseline (KSM stopped) -> measure (KSM running, or kept off for the baseline trial)."""
        phases = trial.phases_model
        with clock.phase("baseline", sampler, self.progress):
            wait_or_stop(self.stop, phases.baseline_s)
        if trial.ksm_off:
            self.settings.stop()
        else:
            self.settings.start()
        with clock.phase("measure", sampler, self.progress):
            return measure(phases, sampler, self.stop)

    def run(self, trial: Trial, clock: PhaseClock, result: TrialResult) -> None:
        """Run one trial, filling `result` as data arrives, so that a failure or a stop
        request keeps what was measured."""
        raise NotImplementedError

    def close(self) -> None:
        """Release anything kept across trials (guests)."""

    def finish(self) -> None:
        """The study is over: release everything, including what lives for the whole study."""
        self.close()


def sampler_health(sampler: Sampler) -> SamplerRecord:
    return SamplerRecord(
        error_count=sampler.error_count,
        last_error=repr(sampler.last_error) if sampler.last_error else None,
        missed_ticks=getattr(sampler, "missed_ticks", 0),
        **sampler.budget_record(),  # the sampling budget's use, PSS reads and ages
    )
