"""The probe's exposure mode, controller side: a victim and an observer (``_exposer.py``), two
unrelated processes, and the table their outputs make together (exposure.csv).

    params = ProbeParams(mode="exposure")
    with ExposurePair(params, workdir) as pair:
        pair.start(); pair.wait_filled(timeout_s=600)
        ...                                  # KSM on
        pair.go(); pair.wait_done(timeout_s) # both CSVs written
        frame = pair.frame()
    # leaving the block stops and reaps both

The runner (runners/exposure.py) drives KSM and the sampler; the statistics are
analysis/cowstats.py's.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pandas as pd

from orchestrator.errors import WorkloadError
from orchestrator.host import probes
from orchestrator.workloads.probe import ProbeParams, ProbeWorker

EXPOSURE_COLUMNS = (
    "kind",
    "secret",
    "t_s",
    "latency_ns",
    "truth_merged",
    "called_merged",
    "ksm_merging_pages",
    "written_s",
    "since_write_s",
)


class ExposureWorker(ProbeWorker):
    """One role (victim or observer) of the pair: ProbeWorker's process handling, another module."""

    def __init__(
        self, role: str, params: ProbeParams, samples_path: Path, *, truth: str = "auto", root: Path = Path("/")
    ) -> None:
        super().__init__(params, samples_path, root=root)
        self.role = role
        self._truth = truth

    def start(self) -> None:
        e = self.params.exposure_params()
        spec = {
            "role": self.role,
            "secrets": e.secrets,
            "decoys": e.decoys,
            "background_pages": e.background_pages,
            "calibration_writes": e.calibration_writes,
            "threshold_quantile": e.threshold_quantile,
            "threshold_factor": e.threshold_factor,
            "test_interval_s": e.test_interval_s,
            "warmup_s": e.warmup_s,
            "write_gap_s": e.write_gap_s,
            "duration_s": e.duration_s(),
            "seed": e.seed,
            "truth": self._truth,
            "samples_path": str(self.samples_path),
        }
        self._spawn("orchestrator.workloads._exposer", spec)

    def wait_done(self, timeout_s: float) -> str:
        return self._wait("done", timeout_s)


class ExposurePair:
    """The victim and the observer, started, released ("go") and stopped together."""

    def __init__(self, params: ProbeParams, workdir: Path, *, truth: str = "auto", root: Path = Path("/")) -> None:
        self.params = params
        self.victim = ExposureWorker("victim", params, Path(workdir) / "victim.csv", root=root)
        self.observer = ExposureWorker("observer", params, Path(workdir) / "observer.csv", truth=truth, root=root)
        self.go_mono = math.nan
        self.threshold_ns = math.nan
        self.truth_source: str | None = None

    def __enter__(self) -> ExposurePair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.observer.stop()
        self.victim.stop()

    def pids(self) -> dict[str, int]:
        return {"victim": self.victim.pid, "observer": self.observer.pid}

    def start(self) -> None:
        self.victim.start()
        self.observer.start()

    def wait_filled(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for worker in (self.victim, self.observer):
            worker.wait_filled(max(0.0, deadline - time.monotonic()))

    def go(self) -> None:
        """The victim's schedule and the observer's calibration and tests start now."""
        self.go_mono = time.monotonic()
        self.victim.send("go")
        self.observer.send("go")

    def wait_done(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        self.victim.wait_done(timeout_s)
        _, threshold, source = self.observer.wait_done(max(0.0, deadline - time.monotonic())).split()
        self.threshold_ns, self.truth_source = float(threshold), source

    def merged_pages(self) -> dict[str, int | None]:
        """Each role's ksm_merging_pages now (ksm_stat)."""
        return {
            role: (probes.read_ksm_stat(pid, self.victim._root) or {}).get("ksm_merging_pages")
            for role, pid in self.pids().items()
        }

    def frame(self) -> pd.DataFrame:
        """exposure.csv: the observer's rows, times in seconds from "go", each candidate's test
        beside its secret's write (written_s) and the time since it (since_write_s: negative
        before the victim wrote it; NaN for decoys and calibration)."""
        for worker in (self.victim, self.observer):
            if not worker.samples_path.exists():
                raise WorkloadError(f"exposure {worker.role}: no samples written")
        return exposure_frame(
            pd.read_csv(self.observer.samples_path), pd.read_csv(self.victim.samples_path), self.go_mono
        )


def exposure_frame(observer: pd.DataFrame, victim: pd.DataFrame, go_mono: float) -> pd.DataFrame:
    """The observer's rows joined with the victim's write times (both CLOCK_MONOTONIC)."""
    out = observer.copy()
    out["t_s"] = out.pop("t_mono") - go_mono
    written = dict(zip(victim["secret"].astype(int), victim["t_mono"] - go_mono))
    secret = out["secret"].astype(int)
    out["written_s"] = np.where(out["kind"] == "candidate", secret.map(written).astype(float), math.nan)
    out["since_write_s"] = out["t_s"] - out["written_s"]
    return out.reindex(columns=list(EXPOSURE_COLUMNS))
