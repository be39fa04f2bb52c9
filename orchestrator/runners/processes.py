"""Trials of the processes workload: N host processes x M mergeable pages (no VMs)."""

from __future__ import annotations

import pandas as pd

from orchestrator.runners.base import PhaseClock, TrialResult, TrialRunner, sampler_health
from orchestrator.plan import Trial
from orchestrator.workloads.processes import ProcessesParams, ProcessesWorkload


class ProcessesRunner(TrialRunner):
    def run(self, trial: Trial, clock: PhaseClock, result: TrialResult) -> None:
        params = trial.workload_model
        assert isinstance(params, ProcessesParams)
        with ProcessesWorkload(params) as workload:
            with clock.phase("fill", None, self.progress):
                workload.start()
                for name in workload.pids():
                    self.settings.announce_start(f"worker {name}")
                workload.wait_filled(timeout_s=600)
            sampler = self.sampler_for(trial, workload.pids)
            try:
                with sampler:
                    self.settle_and_steady(trial, sampler, clock, result)
                    result.converged_by_rule = self.ksm_phases(trial, sampler, clock)
                result.rounds_done = workload.rounds_done()
            finally:
                # Whatever happened, what was sampled is kept.
                result.frames = {
                    "ksm": sampler.ksm_frame(),
                    "processes": sampler.process_frame(),
                    "fills": pd.DataFrame(workload.fills()),
                }
                result.sampler = sampler_health(sampler)
            workload.stop(timeout_s=10)
