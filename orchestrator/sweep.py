"""The sweep loop: for each trial, reset KSM -> apply -> workload -> sample -> store; restore.

This is the only module that imports every stage. Signals only set `stop`; every phase waits
on that event, and every resource (host knobs, workload processes, guests, the sampler) is
released by a `with`/`finally` on every path. After a SIGKILL, `restore` and `cleanup` do it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from orchestrator import policies
from orchestrator.analysis import studymetrics
from orchestrator.errors import HostError, HostUnresponsive, OrchestratorError, StoreError
from orchestrator.host.hostinfo import collect_host_info, study_end_info
from orchestrator.host.ksm import (
    KSM_INT_KNOBS,
    KSM_STR_KNOBS,
    HostSettings,
    host_lock,
    read_ksm_knobs,
    refuse_if_ksmtuned,
    run_dir,
)
from orchestrator.plan import WORKLOAD_PLUGINS, Plan, SamplingSection, Trial, check_against_host, expand, run_order
from orchestrator.plugins import load_object
from orchestrator.preflight import memory_backing_checks, qemu_reach_checks, space_checks
from orchestrator.host.probes import KSM_SYSFS
from orchestrator.analysis.stats import time_mean
from orchestrator.fsutil import atomic_write_json
from orchestrator.store.study import Study
from orchestrator.analysis.studymetrics import StudyAnalysis
from orchestrator.runners.base import PhaseClock, StopFlag, StopRequested, TrialResult, TrialRunner, stop_on_signals
from orchestrator.runners.record import PhaseTiming, PolicyRecord, TrialRecord

log = logging.getLogger(__name__)


def runner_for(
    plan: Plan, settings: HostSettings, stop: threading.Event, progress: Callable[[str], None]
) -> TrialRunner:
    """The workload's registered runner (plugins.py); [density] has its own over the VM runner.
    Runners load here, so libvirt and paramiko load only for plans that run guests."""
    if plan.density is not None:
        from orchestrator.runners.density import DensityVmRunner

        return DensityVmRunner(plan, settings, stop, progress)
    runner = load_object(WORKLOAD_PLUGINS[plan.workload.type].runner)
    return runner(plan, settings, stop, progress)


@dataclass
class SweepOutcome:
    study: Study
    ran: int = 0
    skipped: int = 0
    failed: int = 0
    reruns: int = 0
    interrupted: bool = False
    stop_signal: int | None = None  # the signal that interrupted it
    aborted: StudyHalted | None = None  # why the study stopped early (results not writable, libvirtd gone)
    # The study read and analysed once, for trials.csv; the report reuses it (report.study.write_report).
    analysis: StudyAnalysis | None = None


def rerun_of(study: Study, trial: Trial, in_block: bool = False) -> Trial | None:
    """The rerun of `trial` when it finished disturbed by outside load and has no finished rerun
    yet (so a resumed study does not rerun twice): the same trial under the id
    <trial_id>-rerun1; the disturbed one stays in the study, marked."""
    record = study.trial_record(trial.trial_id)
    rerun_id = f"{trial.trial_id}-rerun1"
    if record is None or record.status != "ok" or not record.disturbed or study.is_finished(rerun_id):
        return None
    return dataclasses.replace(trial, trial_id=rerun_id, rerun_of=trial.trial_id, rerun_in_block=in_block)


def disturbed_reruns(study: Study, trials: list[Trial]) -> list[Trial]:
    """One rerun for each finished trial that is still owed one (see rerun_of)."""
    return [rerun for rerun in (rerun_of(study, trial) for trial in trials) if rerun is not None]


def _add_trials(progress: Any, count: int) -> None:
    """Grow the progress total for reruns (a caller's progress object may not know how)."""
    grow = getattr(progress, "add_trials", None)
    if grow is not None:
        grow(count)


def _run_rerun(
    study: Study,
    runner: TrialRunner,
    settings: HostSettings,
    rerun: Trial,
    stop: threading.Event,
    progress: Any,
    outcome: "SweepOutcome",
    when: str,
) -> None:
    """Run a disturbed trial's rerun (`when`: "now", inside its block, or "after the study")."""
    study.add_trial_ids([rerun.trial_id])
    _add_trials(progress, 1)
    log.warning(
        "trial %s was disturbed by outside load: running it again %s as %s", rerun.rerun_of, when, rerun.trial_id
    )
    status = _run_one(study, runner, settings, rerun, stop, progress)
    outcome.ran += 1
    outcome.reruns += 1
    outcome.failed += status != "ok"
    progress.advance(rerun, status)


def _in_block_rerun(plan: Plan, study: Study, trial: Trial) -> Trial | None:
    """The rerun of `trial` to run right now, inside its block (one rerun at most; a search
    plan's trials are chosen as it goes and never rerun)."""
    if not plan.study.rerun_disturbed or plan.search is not None or trial.rerun_of is not None:
        return None
    return rerun_of(study, trial, in_block=True)


def run_sweep(
    plan: Plan,
    plan_text: str,
    results_dir: Path,
    resume: bool = False,
    progress_factory: Callable[[int], Any] | None = None,
    root: Path = Path("/"),
    on_study: Callable[[Study], None] | None = None,
) -> SweepOutcome:
    """Run (or resume) the study; `on_study` is called once its folder exists (the CLI opens
    the study's sweep.log there)."""
    trials = expand(plan)
    check_against_host(trials, root / KSM_SYSFS)
    policies.check_host(trials, root)
    with host_lock():  # a live sweep holds it; if we get it, the one the marker names is dead
        heal_killed_sweep(root)
    refuse_if_ksmtuned(root)
    if plan.guests is not None:
        _refuse_unreachable_libvirt(plan.guests.uri)
        blocked = [c for c in qemu_reach_checks(plan) + memory_backing_checks(trials) if not c.ok]
        if blocked:  # every trial would fail on its disks, or measure RAM KSM never merges
            raise HostError("; ".join(f"{c.name}: {c.detail}" for c in blocked))
    short = [c for c in space_checks(plan, trials, results_dir) if not c.ok]
    if short:  # a study that cannot store what it measures must not start
        raise HostError("not enough disk space: " + "; ".join(f"{c.name}: {c.detail}" for c in short))
    stop = StopFlag()
    with host_lock():
        planned = [] if plan.search is not None else [t.trial_id for t in trials]  # search: chosen as it goes
        study = Study.create(results_dir, plan.study.name, plan_text, planned, resume, order=run_order(plan))
        marker = running_marker()
        # The libvirt URI, study name and work folder let the next sweep remove guests (and uncached
        # saved states) this one leaves if killed.
        atomic_write_json(marker, _marker_record(plan, study.path))
        if plan.search is not None:
            from orchestrator.analysis.search import search_trials

            trials = search_trials(plan, study)  # type: ignore[assignment]  # a generator of Trials
        if on_study is not None:
            on_study(study)
        host_json = study.path / "host.json"
        if not host_json.exists():
            atomic_write_json(host_json, collect_host_info(root, with_vm_tools=plan.guests is not None))
        outcome = SweepOutcome(study)
        settings = HostSettings(study.settings_record, root)
        total = plan.search.max_trials if plan.search is not None else len(trials)
        progress = progress_factory(total) if progress_factory else _LogProgress(total)
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
                    except StudyHalted as exc:
                        outcome.aborted = exc
                        outcome.ran += exc.trial_written
                        outcome.failed += 1
                        progress.advance(trial, "failed")
                        log.error("%s: stopping the study (trials already written are kept)", exc)
                        break
                    outcome.ran += 1
                    outcome.failed += status != "ok"
                    progress.advance(trial, status)
                    # A disturbed trial runs again at once, inside its block: the rerun sits
                    # beside the block's other trials in time, so its pair with the block's
                    # KSM-off trial holds no drift and the block still pairs.
                    rerun = _in_block_rerun(plan, study, trial)
                    if rerun is not None and not stop.is_set():
                        _run_rerun(study, runner, settings, rerun, stop, progress, outcome, "now")
                # Leftovers (a resumed study whose disturbed trial has no rerun yet) run after
                # the study, far from their block: the analysis does not pair their block.
                if plan.study.rerun_disturbed and not stop.is_set() and outcome.aborted is None and plan.search is None:
                    for rerun in disturbed_reruns(study, trials):
                        if stop.is_set():
                            break
                        _run_rerun(study, runner, settings, rerun, stop, progress, outcome, "after the study")
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
                        record_study_end(host_json, root)
                        try:
                            outcome.analysis = analyse_study(study)
                            write_trials_table(study, outcome.analysis)
                        except StoreError as exc:
                            log.error("trials.csv not written: %s", exc)
                        _close_marker(marker, plan)
    if outcome.aborted is not None:
        halt = outcome.aborted
        raise halt.error(
            f"{halt}. The study stopped there; the trials written before are in {study.path}. {halt.advice}"
        )
    return outcome


def record_study_end(host_json: Path, root: Path) -> None:
    """host.json gets the KSM files after the study (knobs restored) and the counters' sanity
    judgement between before and after; a failure here is logged, never the study's end."""
    try:
        host = json.loads(host_json.read_text())
        end = study_end_info(host, root)
        atomic_write_json(host_json, end)
    except (OSError, ValueError, OrchestratorError) as exc:
        log.error("host.json: the study's end was not recorded: %s", exc)
        return
    sanity = end.get("ksm_counter_sanity") or {}
    if sanity.get("ok") is False:
        log.warning("KSM counters misbehaved during the study: %s", "; ".join(sanity["problems"]))


def running_marker() -> Path:
    """Names the study of the sweep holding the host lock; removed once its knobs are restored.
    Found by the next sweep, it means the last one was killed (SIGKILL, the OOM killer, a
    reboot has /run emptied: nothing to do then)."""
    return run_dir() / "sweep-study.json"


def _marker_record(plan: Plan, study_path: Path) -> dict[str, Any]:
    record: dict[str, Any] = {"study": str(study_path), "pid": os.getpid(), "name": plan.study.name, "uri": None}
    if plan.guests is not None:
        from orchestrator.guests.provision import DEFAULT_WORK_ROOT, study_work_dir

        work_root = Path(plan.guests.workdir) if plan.guests.workdir else DEFAULT_WORK_ROOT
        record.update(uri=plan.guests.uri, work_dir=str(study_work_dir(work_root, plan.study.name).absolute()))
    return record


# How long the sweep's last look for guests it could not tear down waits for libvirt to answer.
LEFTOVER_CHECK_TIMEOUT_S = 10.0


def _close_marker(marker: Path, plan: Plan) -> None:
    """The knobs are restored. The marker goes, unless guests of this study may still be defined
    (libvirtd stopped answering during a trial or the teardown, so the set could not be torn down;
    a restore that libvirtd finishes once it runs again starts a guest nobody owns): then it stays,
    marked so, and the next sweep removes them (heal_killed_sweep) without touching the knobs."""
    if plan.guests is not None:
        from orchestrator.guests.cleanup import leftover

        name = plan.study.name
        try:
            left = leftover(plan.guests.uri, (name, f"{name}-prep"), LEFTOVER_CHECK_TIMEOUT_S)
        except OrchestratorError as exc:
            left = [f"unknown ({exc})"]
        if left:
            log.warning(
                "guests of this study may be left (%s): the next sweep removes them, or run "
                "`ksm-lab cleanup --study %s`",
                ", ".join(left),
                name,
            )
            try:
                recorded = json.loads(marker.read_text())
                atomic_write_json(marker, dict(recorded, settings_restored=True, guests_left=left))
                return
            except (OSError, ValueError, OrchestratorError) as exc:
                log.error("%s: could not mark the guests left: %s", marker, exc)
    marker.unlink(missing_ok=True)


def heal_killed_sweep(root: Path = Path("/")) -> list[str]:
    """Undo what a killed sweep left (call with the host lock held): stop the ksmtuned it
    started (by recorded pid and start time), put back the knobs of its settings record (unless
    it ended and restored them itself, leaving only guests libvirt would not let it remove), and
    remove the guests it left (only those whose metadata names its study, on its libvirt URI)
    with its uncached saved states. One attempt: a libvirt that cannot be reached is named for
    `ksm-lab cleanup` and the marker goes.

    Leftover guests would keep running through the next night, ksmd scanning them, and their
    saved-state names would make every restored trial fail."""
    marker = running_marker()
    try:
        recorded = json.loads(marker.read_text())
        study_dir = Path(recorded["study"])
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("%s is unreadable: removed", marker)
        marker.unlink(missing_ok=True)
        return []
    done: list[str] = []
    from orchestrator.policies.ksmtuned import stop_left_behind

    done += [f"stopped {line}" for line in stop_left_behind(study_dir)]
    record = study_dir / "settings-record.json"
    if record.exists() and not recorded.get("settings_restored"):
        done += [f"restored {line}" for line in HostSettings(record, root).restore()]
    done += _remove_killed_guests(recorded, study_dir)
    how = "ended leaving guests" if recorded.get("settings_restored") else "was killed before it cleaned up"
    log.warning("the last sweep (%s) %s: %s", study_dir, how, "; ".join(done) or "nothing left")
    marker.unlink(missing_ok=True)
    return done


def _remove_killed_guests(recorded: dict[str, Any], study_dir: Path) -> list[str]:
    """The killed sweep's guests (and their saved-state builds' guests, "<name>-prep"), removed
    through `cleanup`, then its uncached saved states; a libvirt that cannot be reached leaves
    them, named for `ksm-lab cleanup`."""
    uri, name = recorded.get("uri"), recorded.get("name")
    if not isinstance(uri, str) or not isinstance(name, str):
        plan_file = study_dir / "plan.toml"
        if plan_file.exists() and "[guests]" in plan_file.read_text(errors="replace"):
            log.warning("the killed sweep of %s ran guests: `ksm-lab cleanup` removes any it left", study_dir)
        return []
    from orchestrator.guests.cleanup import cleanup, remove_study_states

    removed: list[str] = []
    for study in (name, f"{name}-prep"):
        try:
            removed += cleanup(uri, study=study)
        except OrchestratorError as exc:
            log.warning("could not remove the killed sweep's guests (%s): run `ksm-lab cleanup -c %s`", exc, uri)
            return [f"removed guest {guest}" for guest in removed]
    done = [f"removed guest {guest}" for guest in removed]
    work_dir = recorded.get("work_dir")
    if isinstance(work_dir, str) and remove_study_states(Path(work_dir)):
        done.append(f"removed the uncached saved states in {work_dir}")
    return done


def _refuse_unreachable_libvirt(uri: str) -> None:
    """A VM plan whose libvirt cannot be reached is refused before the study starts (exit 2),
    not run trial by trial to "failed"."""
    from orchestrator.guests.libvirtconn import connect  # libvirt loads only for VM plans

    try:
        conn = connect(uri)
    except OrchestratorError as exc:
        raise HostError(f"refusing to start: {exc} (check [guests] uri, -c, or `ksm-lab host setup`)") from None
    with contextlib.suppress(Exception):
        conn.close()


def _run_one(
    study: Study, runner: TrialRunner, settings: HostSettings, trial: Trial, stop: threading.Event, progress: Any
) -> str:
    earlier = study.set_aside_attempt(trial.trial_id)
    if earlier is not None:
        log.info("trial %s: the earlier attempt's files are kept in %s", trial.trial_id, earlier)
    clock = PhaseClock()
    # The trial's record, written by this function alone (runners/record.py): failed until
    # the runner returns; the runner's parts join it at the end, whatever happened.
    record = TrialRecord(
        trial_id=trial.trial_id,
        index=trial.index,
        repetition=trial.repetition,
        label=trial.label,
        settings=trial.settings,
        ksm=trial.ksm,
        host=trial.host,
        workload=trial.workload,
        guests=trial.guests,
        kind=trial.workload["type"],
        ksm_off=trial.ksm_off,
        rerun_of=trial.rerun_of,
        rerun_in_block=trial.rerun_in_block,
        search_reason=trial.search_reason,
        status="failed",
        reason=None,
        started_wall=time.time(),
    )
    result = TrialResult()
    host_gone: HostUnresponsive | None = None
    policy_run: policies.PolicyRun | None = None
    reset_timeout_s = trial.phases_model.reset_timeout_s
    progress.start_trial(trial)
    try:
        with clock.phase("reset", None, progress.phase):
            record.reset_unmerge_s = round(settings.reset(timeout_s=reset_timeout_s), 3)
            settings.apply(trial.ksm, trial.host)
            record.ksm_applied = settable_knobs(settings.root)
        # The policy (static, advisor, ksmtuned, kubevirt, throttler) decides how KSM runs
        # during measure; the throttler also hears the trial's guest and worker starts.
        policy_run = policies.run_for(trial.policy, settings, study.trial_dir(trial.trial_id))
        settings.policy_start = policy_run.start
        settings.start_listener = getattr(policy_run, "on_start", None)
        runner.run(trial, clock, result)
        record.status = "ok"
        load = outside_load(result.frames.get("ksm"), trial.sampling_model)
        record.outside_cpu_pct, record.outside_load_max_pct, record.disturbed = load
    except StopRequested:
        record.reason = "interrupted by signal"
    except OrchestratorError as exc:
        record.reason = str(exc)
        log.error("trial %s failed: %s", trial.trial_id, exc)
        if isinstance(exc, HostUnresponsive):  # libvirtd stopped answering: no later trial can start
            host_gone = exc
    except Exception as exc:  # a bug in one trial must not lose the study: record it and go on
        record.reason = f"{type(exc).__name__}: {exc}"
        log.exception("trial %s failed unexpectedly", trial.trial_id)
    finally:
        settings.policy_start = None
        settings.start_listener = None
        if policy_run is not None:
            record.policy = stop_policy(policy_run)
        with contextlib.suppress(OrchestratorError):
            settings.reset(timeout_s=reset_timeout_s)
    record.timings = {name: PhaseTiming.model_validate(span) for name, span in clock.timings.items()}
    record.ended_wall = time.time()
    result.fill(record)
    try:
        study.write_trial(trial.trial_id, record, result.frames, result.extra_json)
    except StoreError as exc:
        # Nothing more can be stored (a full disk): end the study here, keep what is written.
        raise StudyHalted(
            str(exc), StoreError, "Free space, then run the same command with --resume.", trial_written=False
        ) from None
    if host_gone is not None:
        raise StudyHalted(str(host_gone), HostUnresponsive, host_gone.advice, trial_written=True)
    return record.status


class StudyHalted(OrchestratorError):
    """No later trial can run (the study folder takes no more data; libvirtd stopped
    answering): the sweep ends the study after this trial, keeping every trial written, and
    raises ``error`` with ``advice`` once the host settings are restored."""

    def __init__(self, message: str, error: type[OrchestratorError], advice: str, trial_written: bool) -> None:
        super().__init__(message)
        self.error = error
        self.advice = advice
        self.trial_written = trial_written


def stop_policy(policy_run: policies.PolicyRun) -> PolicyRecord:
    """Stop the trial's policy (before the reset: ksmtuned must not write after it) and return
    its summary for trial.json; a stop that fails is recorded, never lost."""
    try:
        policy_run.stop()
    except Exception as exc:
        log.error("stopping the KSM policy failed: %s", exc)
        return PolicyRecord.model_validate({**policy_run.summary(), "stop_error": f"{type(exc).__name__}: {exc}"})
    return PolicyRecord.model_validate(policy_run.summary())


def outside_load(ksm: pd.DataFrame | None, sampling: SamplingSection) -> tuple[float | None, float | None, bool]:
    """The trial's mean CPU use outside the study over measure (% of one core), the plan's
    threshold, and whether the mean exceeds it: a disturbed trial's numbers say more about the
    host than KSM. (None, None, False) when nothing was sampled."""
    if ksm is None or ksm.empty or "outside_cpu_pct" not in ksm.columns:
        return None, None, False
    measure = ksm[(ksm["phase"] == "measure") & ksm["outside_cpu_pct"].notna()]
    if measure.empty:
        return None, None, False
    mean = time_mean(measure["t_s"].to_numpy(float), measure["outside_cpu_pct"].to_numpy(float))
    limit = sampling.outside_load_max_pct
    return round(mean, 2), limit, bool(mean > limit)


def settable_knobs(root: Path) -> dict[str, str]:
    """What every knob a plan may set really read when the trial started."""
    knobs = read_ksm_knobs(root)
    return {k: knobs[k] for k in (*KSM_INT_KNOBS, *KSM_STR_KNOBS) if k in knobs}


def analyse_study(study: Study) -> StudyAnalysis | None:
    """The study read and analysed once (trials.csv's metrics, then the report's); None, logged,
    when a metric breaks: the table of what ran is written all the same."""
    try:
        return StudyAnalysis.of(study.path)
    except Exception as exc:
        log.error("derived metrics failed, trials.csv has settings and status only: %s", exc)
        return None


def write_trials_table(study: Study, analysis: StudyAnalysis | None = None) -> Path:
    """trials.csv: one row per trial (finished, failed or not run), swept settings + metrics.
    `analysis`: the study's (analyse_study), else computed here."""
    rows = []
    for record in study.trial_records():
        row: dict[str, Any] = {
            "trial_id": record.trial_id,
            "status": record.status,
            "reason": record.reason,
            "label": record.label if record.status != "not_run" else None,
            "repetition": record.repetition,
            "ksm_off": record.ksm_off if record.status != "not_run" else None,
            "disturbed": record.disturbed if record.status == "ok" else None,
            "rerun_of": record.rerun_of,
            "rerun_in_block": record.rerun_in_block,
        }
        row.update(record.settings)
        rows.append(row)
    table = pd.DataFrame(rows)
    analysis = analysis if analysis is not None else analyse_study(study)
    derived = studymetrics.public_trials_table(analysis.metrics) if analysis is not None else pd.DataFrame()
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

    def add_trials(self, count: int) -> None:
        self.total += count
