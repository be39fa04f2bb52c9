"""The probe workload: one worker (``_prober.py``) whose pages KSM merges while the runner times
the merge, then the copy-on-write break of the merged pages, then the unmerge.

    params = ProbeParams(pages=25600, fill="same", sample_pages=2000)
    with ProbeWorker(params, samples_path) as worker:
        worker.start(); worker.wait_filled(timeout_s=60)
        ...                                   # KSM on; poll worker.merged_pages() to a target
        worker.measure_cow(timeout_s=60)      # cow.csv written at samples_path
    # leaving the block stops and reaps the worker

The controller side only: the runner (runners/probe.py) drives KSM and the sampler.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_serializer, model_validator

from orchestrator.host import probes
from orchestrator.errors import WorkloadError
from orchestrator.plugins import WorkloadPlugin
from orchestrator.validation import Params, Strict
from orchestrator.workloads._prober import PROBE_FILLS

log = logging.getLogger(__name__)
_PROJECT_ROOT = Path(__file__).resolve().parents[2]


class ExposureParams(Strict):
    """[workload.exposure] of a probe in mode = "exposure" (workloads/exposure.py runs it): a
    victim process writes `secrets` distinct secret pages, one every write_gap_s after warmup_s;
    an unrelated observer holds one candidate page per secret and `decoys` pages of content
    nobody else has, all MADV_MERGEABLE, and times a write to one of them every test_interval_s."""

    secrets: int = Field(20, ge=1, le=1000)  # one candidate page each in the observer
    decoys: int = Field(20, ge=1, le=10000)  # observer pages no other process holds
    background_pages: int = Field(25600, ge=0, le=4 * 1024 * 1024)  # the victim's other mergeable pages (unique)
    calibration_writes: int = Field(500, ge=100, le=100_000)  # tests of known-unmerged pages, one per test_interval_s
    threshold_quantile: float = Field(0.99, ge=0.5, lt=1)  # of the calibration latencies
    threshold_factor: float = Field(2.0, ge=1, le=100)  # "merged" above factor x that quantile
    test_interval_s: float = Field(0.01, ge=0.001, le=10)  # one timed write per interval
    warmup_s: float = Field(12.0, ge=0, le=3600)  # KSM on -> the victim's first write
    write_gap_s: float = Field(1.5, gt=0, le=3600)
    observe_s: float = Field(30.0, gt=0, le=3600)  # tests go on this long after the last write
    seed: int = Field(0, ge=0)

    def duration_s(self) -> float:
        """KSM on -> the observer's last test."""
        return self.warmup_s + self.write_gap_s * (self.secrets - 1) + self.observe_s


class ProbeParams(Params):
    """The probe workload: a plan's [workload] type = "probe" table, validated here for the plan
    and for the worker alike. mode = "cost" (the default) times merge, COW and unmerge; mode =
    "exposure" runs a victim and an observer ([workload.exposure], ExposureParams)."""

    type: Literal["probe"] = "probe"
    mode: Literal["cost", "exposure"] = "cost"
    exposure: ExposureParams | None = None  # mode = "exposure" only; None: ExposureParams()
    pages: int = Field(25600, ge=2)  # 100 MiB of 4 KiB pages in the probe mapping (and as many in the control)
    fill: Literal[PROBE_FILLS] = "same"  # the worker's own list of fills
    duplicate_fraction: float = Field(0.5, gt=0, le=1)
    sample_pages: int = Field(2000, ge=1)  # merged pages (and as many control pages) whose first write is timed
    overhead_writes: int = Field(2000, ge=2)  # empty-loop writes to one hot page (the timer's cost)
    merge_target_pct: float = Field(95.0, gt=0, le=100)  # of the pages that can merge
    merge_timeout_s: float = Field(300.0, gt=0, le=86400)
    seed: int = Field(0, ge=0)

    writes_during_measure: ClassVar[bool] = False  # the timed writes come after measure

    @model_validator(mode="after")
    def _exposure_only_in_its_mode(self) -> "ProbeParams":
        if self.mode != "exposure" and self.exposure is not None:
            raise ValueError('[workload.exposure] needs mode = "exposure"')
        return self

    @model_serializer(mode="wrap")
    def _cost_mode_dumps_as_before(self, handler: Any) -> dict[str, Any]:
        # Trial ids hash the dumped table: a cost-mode probe keeps the ids it had before modes.
        data = handler(self)
        if self.mode == "cost":
            data.pop("mode", None)
            data.pop("exposure", None)
        return data

    def exposure_params(self) -> ExposureParams:
        return self.exposure or ExposureParams()

    def mergeable_pages(self) -> int:
        """Pages whose content has a twin (what KSM can merge at best)."""
        if self.fill == "duplicate_fraction":
            return round(self.pages * self.duplicate_fraction)
        return self.pages

    def merge_target_pages(self) -> int:
        return max(1, int(self.mergeable_pages() * self.merge_target_pct / 100))


def merged_pages_of(stat: dict | None) -> int | None:
    """Pages of one process mapped to a KSM page or, with use_zero_pages, to the zero page."""
    if not stat or "ksm_merging_pages" not in stat:
        return None
    return int(stat["ksm_merging_pages"]) + int(stat.get("ksm_zero_pages", 0))


class ProbeWorker:
    def __init__(
        self,
        params: ProbeParams,
        samples_path: Path,
        *,
        python: str = sys.executable,
        mergeable: bool = True,
        root: Path = Path("/"),
    ) -> None:
        self.params = params
        self.samples_path = Path(samples_path)
        self._python = python
        self._mergeable = mergeable
        self._root = root
        self._process: subprocess.Popen | None = None
        self._events: dict[str, str] = {}
        self._changed = threading.Condition()
        self._reader: threading.Thread | None = None
        self._stderr = b""

    def __enter__(self) -> ProbeWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def start(self) -> None:
        p = self.params
        spec = {
            "pages": p.pages,
            "fill": p.fill,
            "duplicate_fraction": p.duplicate_fraction,
            "sample_pages": p.sample_pages,
            "overhead_writes": p.overhead_writes,
            "seed": p.seed,
            "mergeable": self._mergeable,
            "samples_path": str(self.samples_path),
        }
        self._spawn("orchestrator.workloads._prober", spec)

    def _spawn(self, module: str, spec: dict) -> None:
        """Start `python -m module '<spec json>'` (its own session, our pid as its parent check)
        and the thread that reads its event lines."""
        spec = {"parent_pid": os.getpid(), **spec}
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PROJECT_ROOT), env.get("PYTHONPATH")]))
        try:
            self._process = subprocess.Popen(
                [self._python, "-m", module, json.dumps(spec)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            raise WorkloadError(f"could not start the probe worker: {exc}") from exc
        self._reader = threading.Thread(target=self._read, args=(self._process,), name="probe-reader", daemon=True)
        self._reader.start()

    def _read(self, process: subprocess.Popen) -> None:
        # The process is passed in: stop() clears self._process while this thread finishes.
        assert process.stdout is not None
        for raw in process.stdout:
            kind, _, value = raw.decode(errors="replace").strip().partition(" ")
            with self._changed:
                self._events[kind] = value
                self._changed.notify_all()
        if process.stderr is not None:
            self._stderr = process.stderr.read()[-4096:]
        with self._changed:
            self._events.setdefault("exited", "")
            self._changed.notify_all()

    def _wait(self, kind: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while kind not in self._events:
                if "error" in self._events:
                    raise WorkloadError(f"probe worker failed: {self._events['error']}")
                if "exited" in self._events:
                    raise WorkloadError(
                        f"probe worker exited before '{kind}': {self._stderr.decode(errors='replace').strip()[-500:]}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise WorkloadError(f"probe worker: no '{kind}' within {timeout_s} s")
                self._changed.wait(remaining)
            return self._events[kind]

    def wait_filled(self, timeout_s: float) -> float:
        """Wall time the fill ended."""
        return float(self._wait("filled", timeout_s))

    def merged_pages(self) -> int | None:
        """This worker's merged pages now (/proc/PID/ksm_stat through probes.py)."""
        return merged_pages_of(probes.read_ksm_stat(self.pid, self._root))

    def send(self, command: str) -> None:
        """One command line on the worker's stdin."""
        assert self._process is not None and self._process.stdin is not None
        self._process.stdin.write(command.encode() + b"\n")
        self._process.stdin.flush()

    def measure_cow(self, timeout_s: float) -> int:
        """Ask for the timed writes; returns the number of rows written to samples_path."""
        self.send("measure")
        rows, _, _ = self._wait("measured", timeout_s).partition(" ")
        return int(rows)

    def stop(self, timeout_s: float = 5.0) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.stdin is not None:
            try:
                process.stdin.close()  # EOF: the worker exits by itself
            except OSError:
                pass
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


PLUGIN = WorkloadPlugin(type="probe", model=ProbeParams, runner="orchestrator.runners.probe:ProbeRunner", where="host")
