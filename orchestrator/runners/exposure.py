"""The probe's exposure trial: how soon, and how reliably, an unrelated process can tell that
KSM merged a page it holds with a page another process just wrote (workloads/exposure.py).

Phases (trial.json timings, ksm.csv ``phase``):
    fill      the victim and the observer map and fill their pages (KSM stopped, reset)
    settle / steady / baseline   as for every trial
    measure   KSM on (kept off in a KSM-off trial) and "go": the observer calibrates its
              threshold, the victim writes its secrets on its schedule, the observer tests
              pages until duration_s; ends when both have written their CSVs.
Then run=0 (the merges stay for the sweep's reset, run=2, which unmerges with both alive).

trial.json "probe" gets the mode's record (threshold, truth source, counts); the observer's
rows joined with the victim's write times go to exposure.csv; analysis/cowstats.py turns both
into trials.csv columns.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from orchestrator.errors import WorkloadError
from orchestrator.plan import Trial

from orchestrator.runners.base import PhaseClock, TrialResult, TrialRunner, sampler_health, wait_or_stop
from orchestrator.runners.record import ProbeRecord
from orchestrator.workloads.exposure import ExposurePair
from orchestrator.workloads.probe import ProbeParams

DONE_MARGIN_S = 60.0  # past the planned duration: calibration, writing the CSVs, a loaded host
POLL_S = 0.5


class ExposureRunner(TrialRunner):
    def run(self, trial: Trial, clock: PhaseClock, result: TrialResult) -> None:
        params = trial.workload_model
        assert isinstance(params, ProbeParams)
        e = params.exposure_params()
        phases = trial.phases_model
        workdir = Path(tempfile.mkdtemp(prefix="ksmlab-exposure-"))
        record: dict[str, Any] = {
            "mode": "exposure",
            "secrets": e.secrets,
            "decoys": e.decoys,
            "observe_s": e.observe_s,
            "background_pages": e.background_pages,
            "duration_s": e.duration_s(),
        }
        try:
            with ExposurePair(params, workdir, root=self.settings.root) as pair:
                with clock.phase("fill", None, self.progress):
                    pair.start()
                    self.settings.announce_start("worker exposure victim")
                    self.settings.announce_start("worker exposure observer")
                    pair.wait_filled(timeout_s=600)
                sampler = self.sampler_for(trial, pair.pids)
                try:
                    with sampler:
                        self.settle_and_steady(trial, sampler, clock, result)
                        with clock.phase("baseline", sampler, self.progress):
                            wait_or_stop(self.stop, phases.baseline_s)
                        if trial.ksm_off:
                            self.settings.stop()
                        else:
                            self.settings.start()
                        with clock.phase("measure", sampler, self.progress):
                            pair.go()
                            self._wait_done(pair, e.duration_s() + DONE_MARGIN_S)
                        record["merged_pages_end"] = pair.merged_pages()
                        self.settings.stop()  # run=0: what merged stays for the reset to unmerge
                        record.update(threshold_ns=round(pair.threshold_ns, 1), truth_source=pair.truth_source)
                        result.frames["exposure"] = frame = pair.frame()
                        record["tests"] = int((frame["kind"] != "calibration").sum())
                finally:
                    result.frames.update({"ksm": sampler.ksm_frame(), "processes": sampler.process_frame()})
                    result.sampler = sampler_health(sampler)
        finally:
            result.probe = ProbeRecord.model_validate(record)  # what was measured, even on a failure
            shutil.rmtree(workdir, ignore_errors=True)

    def _wait_done(self, pair: ExposurePair, bound_s: float) -> None:
        """Both workers done, within bound_s; a stop request ends the wait (StopRequested)."""
        deadline = time.monotonic() + bound_s
        while True:
            try:
                pair.wait_done(timeout_s=POLL_S)
                return
            except WorkloadError as exc:
                if "no 'done'" not in str(exc) or time.monotonic() >= deadline:
                    raise
            wait_or_stop(self.stop, 0.0)
