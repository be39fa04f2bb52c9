"""The probe workload: one worker (``_prober.py``) whose pages KSM merges while the runner times
the merge, then the copy-on-write break of the merged pages, then the unmerge.

    params = ProbeParams(pages=25600, fill="same", sample_pages=2000)
    with ProbeWorker(params, samples_path) as worker:
        worker.start(); worker.wait_filled(timeout_s=60)
        ...                                   # KSM on; poll worker.merged_pages() to a target
        worker.measure_cow(timeout_s=60)      # cow.csv written at samples_path
    # leaving the block stops and reaps the worker

The controller side only: the runner (proberunner.py) drives KSM and the sampler.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from orchestrator import probes
from orchestrator.errors import PlanError, WorkloadError
from orchestrator.workloads._prober import PROBE_FILLS

log = logging.getLogger(__name__)
_PROJECT_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class ProbeParams:
    pages: int = 25600  # 100 MiB of 4 KiB pages in the probe mapping (and as many in the control)
    fill: str = "same"
    duplicate_fraction: float = 0.5
    sample_pages: int = 2000  # merged pages (and as many control pages) whose first write is timed
    overhead_writes: int = 2000
    merge_target_pct: float = 95.0  # of the pages that can merge
    merge_timeout_s: float = 300.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.fill not in PROBE_FILLS:
            raise PlanError(f"probe workload: fill must be one of {', '.join(PROBE_FILLS)}, got {self.fill!r}")
        if self.pages < 2 or self.sample_pages < 1:
            raise PlanError("probe workload: pages must be >= 2 and sample_pages >= 1")
        if not 0 < self.merge_target_pct <= 100:
            raise PlanError(f"probe workload: merge_target_pct must be in (0, 100], got {self.merge_target_pct}")

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
    def __init__(self, params: ProbeParams, samples_path: Path, *, python: str = sys.executable,
                 mergeable: bool = True, root: Path = Path("/")) -> None:
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
        spec = {"parent_pid": os.getpid(), "pages": p.pages, "fill": p.fill,
                "duplicate_fraction": p.duplicate_fraction, "sample_pages": p.sample_pages,
                "overhead_writes": p.overhead_writes, "seed": p.seed, "mergeable": self._mergeable,
                "samples_path": str(self.samples_path)}
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PROJECT_ROOT), env.get("PYTHONPATH")]))
        try:
            self._process = subprocess.Popen(
                [self._python, "-m", "orchestrator.workloads._prober", json.dumps(spec)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                start_new_session=True)
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
                    raise WorkloadError(f"probe worker exited before '{kind}': "
                                        f"{self._stderr.decode(errors='replace').strip()[-500:]}")
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

    def measure_cow(self, timeout_s: float) -> int:
        """Ask for the timed writes; returns the number of rows written to samples_path."""
        assert self._process is not None and self._process.stdin is not None
        self._process.stdin.write(b"measure\n")
        self._process.stdin.flush()
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
