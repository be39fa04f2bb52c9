"""The probe trial: merge throughput, copy-on-write break latency and unmerge time, on real KSM.

Phases (trial.json timings, ksm.csv ``phase``):
    fill      the worker maps and fills its probe and control mappings (KSM stopped, reset)
    settle / steady / baseline   as for every trial
    measure   KSM on until the worker's merged pages reach merge_target_pct of what can merge
              (or merge_timeout_s): the merge window. Its wall seconds and ksmd's CPU seconds
              over it (read from /proc directly at both ends, not from the jittered ticks; in clock
              ticks of 10 ms, so a merge of a second has a CPU figure good to about 1%) give
              merge_mib_per_s and merge_mib_per_ksmd_cpu_s.
    cow       ksmd stopped (run=0: merges kept); the worker times its first write to sampled
              merged and control pages (cow.csv)
    unmerge   run=2 with the worker alive, so the unmerge really breaks its merges; seconds
              per GiB of what was merged when it started (trial.json probe.unmerge_s: not the
              reset before every trial, which is reset_unmerge_s).
A KSM-off trial fills and times writes with nothing merged: both regions are then the same
kind of page, and its latency ratio is the method's own floor (near 1).

What the runner records goes to trial.json "probe"; costs.probe_record_metrics turns it into
trials.csv columns. mode = "exposure" is another trial altogether: runners/exposure.py runs it.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

from orchestrator.host import probes
from orchestrator.plan import Trial
from orchestrator.runners.exposure import ExposureRunner
from orchestrator.runners.base import PhaseClock, TrialResult, TrialRunner, sampler_health, wait_or_stop
from orchestrator.runners.record import ProbeRecord
from orchestrator.workloads.probe import ProbeParams, ProbeWorker

log = logging.getLogger(__name__)
MERGE_POLL_S = 0.05  # ksm_stat is a cheap read; 50 ms keeps the merge time's error small


def merged_mappings(counters: dict[str, int], zero_pages_counted: bool) -> float:
    """Page mappings run=2 has to break: every mapping of a KSM page (the kept one included)
    plus, with use_zero_pages, the mappings of the zero page."""
    total = float(counters.get("pages_shared", 0) + counters.get("pages_sharing", 0))
    if zero_pages_counted:
        total += float(counters.get("ksm_zero_pages", 0))
    return total


class ProbeRunner(TrialRunner):
    def run(self, trial: Trial, clock: PhaseClock, result: TrialResult) -> None:
        params = trial.workload_model
        assert isinstance(params, ProbeParams)
        if params.mode == "exposure":
            ExposureRunner(self.plan, self.settings, self.stop, self.progress).run(trial, clock, result)
            return
        phases = trial.phases_model
        root = self.settings.root
        workdir = Path(tempfile.mkdtemp(prefix="ksmlab-probe-"))
        record = ProbeRecord(
            pages=params.pages,
            fill=params.fill,
            mergeable_pages=params.mergeable_pages(),
            merge_target_pages=params.merge_target_pages(),
        )
        result.probe = record
        samples_path = workdir / "cow.csv"
        try:
            with ProbeWorker(params, samples_path, root=root) as worker:
                with clock.phase("fill", None, self.progress):
                    worker.start()
                    self.settings.announce_start("worker probe")  # the throttler policy acts on it
                    worker.wait_filled(timeout_s=600)
                sampler = self.sampler_for(trial, lambda: {"probe": worker.pid})
                try:
                    with sampler:
                        self.settle_and_steady(trial, sampler, clock, result)
                        with clock.phase("baseline", sampler, self.progress):
                            wait_or_stop(self.stop, phases.baseline_s)
                        self._merge(trial, clock, sampler, worker, params, record)
                        # run=0 stops ksmd and keeps what it merged: the timed writes then
                        # do not share the CPU with a scan (2 cores here), nor race a re-merge.
                        self.settings.stop()
                        with clock.phase("cow", sampler, self.progress):
                            record.cow_rows = worker.measure_cow(timeout_s=120)
                        if not trial.ksm_off:
                            with clock.phase("unmerge", sampler, self.progress):
                                self._unmerge(trial, record)
                            wait_or_stop(self.stop, max(0.2, trial.sampling_model.interval_s))
                finally:
                    frames = {"ksm": sampler.ksm_frame(), "processes": sampler.process_frame()}
                    if samples_path.exists():
                        frames["cow"] = pd.read_csv(samples_path)
                    result.frames = frames
                    result.sampler = sampler_health(sampler)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def _merge(
        self,
        trial: Trial,
        clock: PhaseClock,
        sampler: Any,
        worker: ProbeWorker,
        params: ProbeParams,
        record: ProbeRecord,
    ) -> None:
        root = self.settings.root
        ksmd = probes.find_ksmd_pid(root)
        cpu_before = probes.read_cpu_seconds(ksmd, root) if ksmd else None
        if trial.ksm_off:
            self.settings.stop()
        else:
            self.settings.start()
        started = time.monotonic()
        target = params.merge_target_pages()
        merged = 0
        with clock.phase("measure", sampler, self.progress):
            while not trial.ksm_off:
                merged = worker.merged_pages() or 0
                if merged >= target or time.monotonic() - started >= params.merge_timeout_s:
                    break
                wait_or_stop(self.stop, MERGE_POLL_S)
            if trial.ksm_off:
                wait_or_stop(self.stop, trial.phases_model.measure_s)
        wall_s = time.monotonic() - started
        cpu_after = probes.read_cpu_seconds(ksmd, root) if ksmd else None
        record.merged_pages = merged
        record.merge_target_reached = bool(merged >= target)
        record.merge_wall_s = round(wall_s, 4)
        record.merge_ksmd_cpu_s = (cpu_after - cpu_before) if cpu_before is not None and cpu_after is not None else None
        if not trial.ksm_off and merged < target:
            log.warning(
                "probe: %d of %d target pages merged after %.0f s: throughput is over a partial merge",
                merged,
                target,
                wall_s,
            )

    def _unmerge(self, trial: Trial, record: ProbeRecord) -> None:
        counted = str(trial.ksm.get("use_zero_pages")) == "1"
        record.pages_before_unmerge = merged_mappings(probes.read_ksm(self.settings.root), counted)
        record.unmerge_s = round(self.settings.reset(timeout_s=trial.phases_model.reset_timeout_s), 4)
        after = probes.read_ksm(self.settings.root)
        record.pages_sharing_after_unmerge = after.get("pages_sharing", math.nan)
