"""The sweep loop: for each trial, reset KSM -> apply -> workload -> sample -> store; restore.

This is the only module that imports every stage. Signals only set `stop`; every phase waits
on that event, and every resource (host knobs, workload processes, guests, the sampler) is
released by a `with`/`finally` on every path. After a SIGKILL, `restore` and `cleanup` do it.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from orchestrator import metrics
from orchestrator.errors import HostError, OrchestratorError, StoreError
from orchestrator.hostinfo import collect_host_info
from orchestrator.ksm import HostSettings, host_lock, read_ksm_knobs, refuse_if_ksmtuned
from orchestrator.plan import (KSM_INT_KNOBS, KSM_STR_KNOBS, Plan, Trial, check_against_host, expand,
                               fast_interval_s, processes_params)
from orchestrator.preflight import space_checks
from orchestrator.probes import KSM_SYSFS
from orchestrator.sampler import Sampler
from orchestrator.store import Study, atomic_write_json
from orchestrator.workloads.processes import ProcessesParams, ProcessesWorkload

log = logging.getLogger(__name__)


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


@dataclass
class PhaseClock:
    """Wall-clock start/end of each phase, stored in trial.json."""

    timings: dict[str, dict[str, float]] = field(default_factory=dict)

    @contextlib.contextmanager
    def phase(self, name: str, sampler: Sampler | None = None, progress: Callable[[str], None] | None = None) -> Iterator[None]:
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


def measure(plan_phases: Mapping[str, Any], sampler: Sampler, stop: threading.Event,
            check: Callable[[], None] | None = None) -> bool:
    """Hold the measure phase for measure_s, then (optionally) until pages_sharing is stable
    over converge_window_s, capped at max_measure_s. Returns whether it converged."""
    measure_s = float(plan_phases["measure_s"])
    start = time.monotonic()
    if not plan_phases["until_converged"]:
        wait_or_stop(stop, measure_s, check)
        return False
    window_s = float(plan_phases["converge_window_s"])
    tolerance = float(plan_phases["converge_tolerance_pct"]) / 100
    cap_s = float(plan_phases["max_measure_s"])
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
            values = [v for _, v in history]
            high = max(values)
            if high > 0 and (high - min(values)) <= tolerance * high:
                return True
        if now >= cap_s:
            return False


def _slope_mib_per_min(t_s: Any, kib: Any) -> float:
    """Least-squares slope of a KiB series in MiB per minute (NaN with < 3 points)."""
    import numpy as np

    t, v = np.asarray(t_s, dtype=float), np.asarray(kib, dtype=float)
    ok = np.isfinite(t) & np.isfinite(v)
    if ok.sum() < 3 or np.ptp(t[ok]) <= 0:
        return math.nan
    return float(np.polyfit(t[ok], v[ok], 1)[0]) * 60.0 / 1024.0


def wait_steady(phases: Mapping[str, Any], sampler: Sampler, stop: threading.Event,
                check: Callable[[], None] | None = None) -> dict[str, Any]:
    """Hold until the tracked processes' summed RSS and host MemAvailable each move by less than
    steady_slope_mib_per_min over the last steady_window_s, at most steady_max_s. A guest that
    is still growing puts its growth into every delta-based saving of the trial; waiting for it
    (and saying how long it took, or that it never settled) keeps that out of the baseline."""
    max_s = float(phases.get("steady_max_s", 0.0))
    if max_s <= 0:
        return {}
    window_s = float(phases["steady_window_s"])
    limit = float(phases["steady_slope_mib_per_min"])
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
                return {"steady_wait_s": round(waited, 1), "steady_timed_out": False,
                        "steady_slopes_mib_per_min": {k: round(v, 2) for k, v in slopes.items()}}
        if waited >= max_s:
            log.warning("guests still not steady after %.0f s (slopes %s MiB/min, limit %s): measuring anyway",
                        max_s, {k: round(v, 1) for k, v in slopes.items()}, limit)
            return {"steady_wait_s": round(waited, 1), "steady_timed_out": True,
                    "steady_slopes_mib_per_min": {k: round(v, 2) for k, v in slopes.items()}}
        wait_or_stop(stop, 1.0, check)


class TrialRunner:
    """Runs one trial of a given kind; the sweep picks the runner by workload type."""

    def __init__(self, plan: Plan, settings: HostSettings, stop: threading.Event,
                 progress: Callable[[str], None]) -> None:
        self.plan = plan
        self.settings = settings
        self.stop = stop
        self.progress = progress

    def sampler_for(self, trial: Trial, targets: Callable[[], Mapping[str, int]]) -> Sampler:
        sampling = self.plan.sampling
        pss_every = max(1, round(sampling.pss_interval_s / sampling.interval_s))
        # The first tick fires on entry, before the first phase is announced: name it here.
        return Sampler(sampling.interval_s, pss_every, targets, phase="settle",
                       fast_interval_s=fast_interval_s(trial.sampling, trial.workload),
                       jitter_fraction=sampling.jitter_fraction)

    def ksm_phases(self, trial: Trial, sampler: Sampler, clock: PhaseClock) -> bool:
        """baseline (KSM stopped) -> measure (KSM running, or kept off for the baseline trial)."""
        phases = trial_phases(trial)
        with clock.phase("baseline", sampler, self.progress):
            wait_or_stop(self.stop, phases["baseline_s"])
        if trial.ksm_off:
            self.settings.stop()
        else:
            self.settings.start()
        with clock.phase("measure", sampler, self.progress):
            return measure(phases, sampler, self.stop)

    def run(self, trial: Trial, clock: PhaseClock, result: dict[str, Any]) -> None:
        """Run one trial, filling `result` ("frames", extra trial.json fields) as data arrives,
        so that a failure or a stop request keeps what was measured."""
        raise NotImplementedError

    def close(self) -> None:
        """Release anything kept across trials (guests)."""

    def finish(self) -> None:
        """The study is over: release everything, including what lives for the whole study."""
        self.close()


def trial_phases(trial: Trial) -> dict[str, Any]:
    return trial.phases


class ProcessesRunner(TrialRunner):
    def run(self, trial: Trial, clock: PhaseClock, result: dict[str, Any]) -> None:
        params = ProcessesParams(**processes_params(trial.workload))
        phases = trial_phases(trial)
        with ProcessesWorkload(params) as workload:
            with clock.phase("fill", None, self.progress):
                workload.start()
                workload.wait_filled(timeout_s=600)
            sampler = self.sampler_for(trial, workload.pids)
            try:
                with sampler:
                    with clock.phase("settle", sampler, self.progress):
                        wait_or_stop(self.stop, phases["settle_s"])
                    with clock.phase("steady", sampler, self.progress):
                        result.update(wait_steady(phases, sampler, self.stop))
                    result["converged_by_rule"] = self.ksm_phases(trial, sampler, clock)
                result["rounds_done"] = workload.rounds_done()
            finally:
                # Whatever happened, what was sampled is kept.
                result["frames"] = {"ksm": sampler.ksm_frame(), "processes": sampler.process_frame(),
                                    "fills": pd.DataFrame(workload.fills())}
                result["sampler"] = sampler_health(sampler)
            workload.stop(timeout_s=10)


def sampler_health(sampler: Sampler) -> dict[str, Any]:
    return {
        "error_count": sampler.error_count,
        "last_error": repr(sampler.last_error) if sampler.last_error else None,
        "missed_ticks": getattr(sampler, "missed_ticks", 0),
    }


def runner_for(plan: Plan, settings: HostSettings, stop: threading.Event, progress: Callable[[str], None]) -> TrialRunner:
    if plan.workload.type == "processes":
        return ProcessesRunner(plan, settings, stop, progress)
    from orchestrator.vmrunner import VmRunner  # the VM stages load libvirt/paramiko only when needed

    return VmRunner(plan, settings, stop, progress)


@dataclass
class SweepOutcome:
    study: Study
    ran: int = 0
    skipped: int = 0
    failed: int = 0
    reruns: int = 0
    interrupted: bool = False
    stop_signal: int | None = None  # the signal that interrupted it
    aborted: str | None = None  # why the study stopped early (results no longer writable)


def disturbed_reruns(study: Study, trials: list[Trial]) -> list[Trial]:
    """One rerun for each finished trial that outside load disturbed and that has no finished
    rerun yet (so a resumed study does not rerun twice). The rerun is the same trial under the
    id <trial_id>-rerun1; the disturbed one stays in the study, marked."""
    reruns = []
    for trial in trials:
        record = study.trial_record(trial.trial_id) or {}
        rerun_id = f"{trial.trial_id}-rerun1"
        if record.get("status") == "ok" and record.get("disturbed") and not study.is_finished(rerun_id):
            reruns.append(dataclasses.replace(trial, trial_id=rerun_id, rerun_of=trial.trial_id))
    return reruns


def run_sweep(plan: Plan, plan_text: str, results_dir: Path, resume: bool = False,
              progress_factory: Callable[[int], Any] | None = None, root: Path = Path("/"),
              on_study: Callable[[Study], None] | None = None) -> SweepOutcome:
    """Run (or resume) the study; `on_study` is called once its folder exists (the CLI opens
    the study's sweep.log there)."""
    trials = expand(plan)
    check_against_host(trials, root / KSM_SYSFS)
    refuse_if_ksmtuned(root)
    short = [c for c in space_checks(plan, trials, results_dir) if not c.ok]
    if short:  # a study that cannot store what it measures must not start
        raise HostError("not enough disk space: " + "; ".join(f"{c.name}: {c.detail}" for c in short))
    stop = StopFlag()
    with host_lock():
        study = Study.create(results_dir, plan.study.name, plan_text, [t.trial_id for t in trials], resume)
        if on_study is not None:
            on_study(study)
        host_json = study.path / "host.json"
        if not host_json.exists():
            atomic_write_json(host_json, collect_host_info(root, with_vm_tools=plan.guests is not None))
        outcome = SweepOutcome(study)
        settings = HostSettings(study.settings_record, root)
        progress = progress_factory(len(trials)) if progress_factory else _LogProgress(len(trials))
        with stop_on_signals(stop), progress:
            runner = runner_for(plan, settings, stop, progress.phase)
            try:
                for trial in trials:
                    if study.is_finished(trial.trial_id):
                        outcome.skipped += 1
                        progress.advance(trial, "skipped (finished)")
                        continue
                    if stop.is_set():
                        break
                    try:
                        status = _run_one(study, runner, settings, trial, stop, progress)
                    except ResultsNotWritable as exc:
                        outcome.aborted = str(exc)
                        outcome.failed += 1
                        log.error("%s: stopping the study (trials already written are kept)", exc)
                        break
                    outcome.ran += 1
                    outcome.failed += status != "ok"
                    progress.advance(trial, status)
                if plan.study.rerun_disturbed and not stop.is_set() and outcome.aborted is None:
                    for rerun in disturbed_reruns(study, trials):
                        if stop.is_set():
                            break
                        study.add_trial_ids([rerun.trial_id])
                        log.warning("trial %s was disturbed by outside load: running it again as %s",
                                    rerun.rerun_of, rerun.trial_id)
                        status = _run_one(study, runner, settings, rerun, stop, progress)
                        outcome.ran += 1
                        outcome.reruns += 1
                        outcome.failed += status != "ok"
                        progress.advance(rerun, status)
            finally:
                try:
                    runner.finish()
                finally:
                    try:
                        restored = settings.restore()
                        log.info("host settings restored: %s", ", ".join(restored) or "nothing changed")
                    finally:
                        # What was measured is summarised even when a restore step is refused.
                        outcome.interrupted = stop.is_set()
                        outcome.stop_signal = stop.signum
                        try:
                            write_trials_table(study)
                        except StoreError as exc:
                            log.error("trials.csv not written: %s", exc)
    if outcome.aborted is not None:
        raise StoreError(f"{outcome.aborted}. The study stopped there; the trials written before are in "
                         f"{study.path}. Free space, then run the same command with --resume.")
    return outcome


def _run_one(study: Study, runner: TrialRunner, settings: HostSettings, trial: Trial,
             stop: threading.Event, progress: Any) -> str:
    clock = PhaseClock()
    record: dict[str, Any] = {
        "trial_id": trial.trial_id,
        "index": trial.index,
        "repetition": trial.repetition,
        "label": trial.label,
        "settings": trial.settings,
        "ksm": trial.ksm,
        "host": trial.host,
        "workload": trial.workload,
        "guests": trial.guests,
        "kind": trial.workload["type"],
        "ksm_off": trial.ksm_off,
        "rerun_of": trial.rerun_of,
        "status": "failed",
        "reason": None,
        "started_wall": time.time(),
    }
    result: dict[str, Any] = {}
    progress.start_trial(trial)
    try:
        with clock.phase("reset", None, progress.phase):
            record["unmerge_s"] = round(settings.reset(timeout_s=trial_phases(trial)["reset_timeout_s"]), 3)
            settings.apply(trial.ksm, trial.host)
            record["ksm_applied"] = settable_knobs(settings.root)
        runner.run(trial, clock, result)
        record["status"] = "ok"
        record.update(outside_load(result.get("frames", {}).get("ksm"), trial.sampling))
    except StopRequested:
        record["reason"] = "interrupted by signal"
    except OrchestratorError as exc:
        record["reason"] = str(exc)
        log.error("trial %s failed: %s", trial.trial_id, exc)
    except Exception as exc:  # a bug in one trial must not lose the study: record it and go on
        record["reason"] = f"{type(exc).__name__}: {exc}"
        log.exception("trial %s failed unexpectedly", trial.trial_id)
    finally:
        with contextlib.suppress(OrchestratorError):
            settings.reset(timeout_s=trial_phases(trial)["reset_timeout_s"])
    record["timings"] = clock.timings
    record["ended_wall"] = time.time()
    record.update({k: v for k, v in result.items() if k not in ("frames", "json")})
    try:
        study.write_trial(trial.trial_id, record, result.get("frames", {}), result.get("json"))
    except StoreError as exc:
        # Nothing more can be stored (a full disk): end the study here, keep what is written.
        raise ResultsNotWritable(str(exc)) from None
    return record["status"]


class ResultsNotWritable(OrchestratorError):
    """The study folder took no more data: the sweep stops, keeping every trial written."""


def outside_load(ksm: pd.DataFrame | None, sampling: Mapping[str, Any]) -> dict[str, Any]:
    """The trial's mean CPU use outside the study over measure (% of one core) and whether it
    exceeds the plan's threshold: a disturbed trial's numbers say more about the host than KSM."""
    if ksm is None or ksm.empty or "outside_cpu_pct" not in ksm.columns:
        return {"outside_cpu_pct": None, "disturbed": False}
    measure = ksm[(ksm["phase"] == "measure") & ksm["outside_cpu_pct"].notna()]
    if measure.empty:
        return {"outside_cpu_pct": None, "disturbed": False}
    mean = metrics.time_mean(measure["t_s"].to_numpy(float), measure["outside_cpu_pct"].to_numpy(float))
    limit = float(sampling.get("outside_load_max_pct", 5.0))
    return {"outside_cpu_pct": round(mean, 2), "outside_load_max_pct": limit, "disturbed": bool(mean > limit)}


def settable_knobs(root: Path) -> dict[str, str]:
    """What every knob a plan may set really read when the trial started."""
    knobs = read_ksm_knobs(root)
    return {k: knobs[k] for k in (*KSM_INT_KNOBS, *KSM_STR_KNOBS) if k in knobs}


def write_trials_table(study: Study) -> Path:
    """trials.csv: one row per trial (finished, failed or not run), swept settings + metrics."""
    rows = []
    for record in study.trial_records():
        row: dict[str, Any] = {
            "trial_id": record["trial_id"],
            "status": record.get("status"),
            "reason": record.get("reason"),
            "label": record.get("label"),
            "repetition": record.get("repetition"),
            "ksm_off": record.get("ksm_off"),
            "disturbed": record.get("disturbed"),
            "rerun_of": record.get("rerun_of"),
        }
        row.update(record.get("settings") or {})
        rows.append(row)
    table = pd.DataFrame(rows)
    try:
        derived = metrics.study_metrics(study.path)
    except Exception as exc:  # the table of what ran must be written even if a metric breaks
        log.error("derived metrics failed, trials.csv has settings and status only: %s", exc)
        derived = pd.DataFrame()
    if not derived.empty and "trial_id" in derived:
        extra = [c for c in derived.columns if c not in table.columns or c == "trial_id"]
        table = table.merge(derived[extra], on="trial_id", how="left")
    return study.write_trials_csv(table)


class _LogProgress:
    """Progress as log lines, when no rich console is wanted."""

    def __init__(self, total: int) -> None:
        self.total = total

    def __enter__(self) -> "_LogProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def start_trial(self, trial: Trial) -> None:
        log.info("trial %d/%d %s (%s)", trial.index + 1, self.total, trial.trial_id, trial.label)

    def phase(self, name: str) -> None:
        log.info("  phase %s", name)

    def advance(self, trial: Trial, status: str) -> None:
        log.info("trial %s: %s", trial.trial_id, status)
