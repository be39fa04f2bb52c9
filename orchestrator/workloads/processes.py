"""Synthetic workload: N worker processes, each holding M anonymous private mergeable pages.

Each worker maps its pages, marks them mergeable (MADV_MERGEABLE, or PR_SET_MEMORY_MERGE for the
whole process), fills them with a pattern, then refills them every `round_wait_s` for `rounds`
rounds. Refills are the point: they write to pages KSM may have merged, which breaks the merge by
copy-on-write and keeps ksmd working, as in the original study's C workload. After the last
round a worker keeps its pages unchanged until stopped, so a trial can also watch a settled set.

Workers are fresh interpreters (``python -m orchestrator.workloads._filler``), never forks of
the sweep, and they die with it: PR_SET_PDEATHSIG, a parent-pid check for the race before that,
and a stdin lifeline that exits on EOF.

    params = ProcessesParams(processes=4, pages_per_process=10_000, fill="fixed_random", rounds=0)
    with ProcessesWorkload(params) as workload:
        workload.start()
        workload.wait_filled(timeout_s=60)
        tracked = workload.pids()            # {"proc-0": pid, ...} for the sampler
        ...                                  # workload.rounds_done() grows while it runs
    # leaving the block stops and reaps every worker
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Literal, Sequence

from pydantic import Field, field_validator

from orchestrator.host import probes
from orchestrator.errors import WorkloadError
from orchestrator.resources import package_root
from orchestrator.plugins import WorkloadPlugin
from orchestrator.validation import Params
from orchestrator.workloads._filler import FILLS, memory_merge_supported

log = logging.getLogger("orchestrator.workloads.processes")

Fill = Literal[FILLS]  # the worker's own list of fills
MergeMode = Literal["madvise", "prctl"]

# Never plan to take more than this share of MemAvailable: the sampler and ksmd need room too.
_MEMORY_HEADROOM = 0.9
_STDERR_TAIL_BYTES = 4096


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# Whole numbers only (not true, 2.0 or "2"), finite numbers only: a typo in a plan is refused,
# not read as 1 or as "wait forever".
_INT = {"strict": True}
_NUMBER = {"strict": True, "allow_inf_nan": False}


class ProcessesParams(Params):
    """The processes workload: a plan's [workload] type = "processes" table, validated here
    for the plan and for the workers alike."""

    type: Literal["processes"] = "processes"
    processes: int = Field(2, ge=1, le=4096, **_INT)
    pages_per_process: int = Field(25600, ge=1, **_INT)
    fill: Fill = "same"
    distinct_pages: int = Field(26, ge=1, **_INT)  # K patterns for fill="fixed_random" (the original used 26 letters)
    duplicate_fraction: float = Field(0.5, ge=0, le=1, **_NUMBER)  # share of identical pages for "duplicate_fraction"
    # Fills per worker, the first included; 0 = refill every round_wait_s until the trial ends.
    # Refills rewrite merged pages: copy-on-write breaks merges, which is what makes pages volatile.
    rounds: int = Field(1, ge=0, **_INT)
    round_wait_s: float = Field(1.0, ge=0, **_NUMBER)
    merge_mode: MergeMode = "madvise"
    # "none", "alternate" (worker i on CPU i % ncpu) or CPU ids (a tuple: the params stay hashable)
    cpu_pin: Literal["none", "alternate"] | tuple[int, ...] = "none"
    seed: int = Field(0, ge=0, **_INT)  # numpy's SeedSequence takes no negative seed

    @field_validator("cpu_pin", mode="before")
    @classmethod
    def _cpu_pin(cls, pin: object) -> object:
        if pin in ("none", "alternate"):
            return pin
        if isinstance(pin, (list, tuple)) and pin and all(_is_int(c) and c >= 0 for c in pin):
            return tuple(pin)
        raise ValueError('must be "none", "alternate" or a non-empty list of CPU ids >= 0')

    @property
    def writes_during_measure(self) -> bool:
        """Refills (rounds other than 1) keep rewriting merged pages while KSM measures."""
        return self.rounds != 1

    @property
    def bytes_total(self) -> int:
        return self.processes * self.pages_per_process * mmap.PAGESIZE

    def cpu_for(self, worker_index: int, usable_cpus: Sequence[int]) -> int | None:
        """The CPU worker `worker_index` is pinned to: round robin over the pin list.

        "alternate" is round robin over the CPUs this process may use, which on an unrestricted
        host is the original study's `i % ncpu`.
        """
        if self.cpu_pin == "none":
            return None
        cpus = sorted(usable_cpus) if self.cpu_pin == "alternate" else self.cpu_pin
        return cpus[worker_index % len(cpus)]


@dataclass
class _Worker:
    label: str
    process: subprocess.Popen
    rounds_done: int = 0
    mapping: tuple[int, int] | None = None
    error: str | None = None  # what the worker reported on an "error" line
    failure: str | None = None  # set once it is known to have died without being asked to
    stdout_partial: bytes = b""
    stderr_tail: bytes = b""
    open_streams: int = 2
    fill_started_wall: float | None = None  # of the fill in progress
    fills: list[tuple[int, float, float]] = field(default_factory=list)  # (fill n, start, end) wall


def _mem_available_bytes() -> int | None:
    try:
        available_kib = probes.read_meminfo().get("MemAvailable")
    except OSError:
        return None
    return None if available_kib is None else available_kib * 1024


def _describe_exit(returncode: int) -> str:
    if returncode < 0:
        name = signal.Signals(-returncode).name
        hint = " (the OOM killer? see dmesg)" if -returncode == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited with status {returncode}"


class ProcessesWorkload:
    """Controller for the worker processes of one trial. Use as a context manager."""

    def __init__(self, params: ProcessesParams, *, python: str = sys.executable) -> None:
        self.params = params
        self._python = python
        self._workers: list[_Worker] = []
        self._changed = threading.Condition()
        self._stopping = False
        self._reader: threading.Thread | None = None
        self._selector: selectors.BaseSelector | None = None

    def __enter__(self) -> ProcessesWorkload:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- starting -----------------------------------------------------------------------------

    def start(self) -> None:
        """Spawn the workers; returns once they are started, not filled (see wait_filled).

        Call from a thread that outlives the workload (normally the main thread): the kernel's
        parent-death signal fires when the *thread* that spawned a worker exits.
        """
        if self._workers:
            raise WorkloadError("processes workload already started")
        params = self.params
        self._preflight()
        usable_cpus = sorted(os.sched_getaffinity(0))
        log.info(
            "starting %d worker(s) x %d pages (%.2f GiB), fill=%s, merge_mode=%s, rounds=%s, wait=%ss",
            params.processes,
            params.pages_per_process,
            params.bytes_total / 2**30,
            params.fill,
            params.merge_mode,
            params.rounds or "until stopped",
            params.round_wait_s,
        )
        env = dict(os.environ)
        # Workers import this same ksm-lab (checkout or installed wheel), whatever the cwd.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(package_root()), env.get("PYTHONPATH")]))
        self._selector = selectors.DefaultSelector()
        try:
            for index in range(params.processes):
                spec = {
                    "index": index,
                    "parent_pid": os.getpid(),
                    "pages": params.pages_per_process,
                    "fill": params.fill,
                    "distinct_pages": params.distinct_pages,
                    "duplicate_fraction": params.duplicate_fraction,
                    "rounds": params.rounds,
                    "round_wait_s": params.round_wait_s,
                    "merge_mode": params.merge_mode,
                    "cpu": params.cpu_for(index, usable_cpus),
                    "seed": params.seed,
                }
                process = subprocess.Popen(
                    [self._python, "-m", "orchestrator.workloads._filler", json.dumps(spec)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    env=env,
                    # Own session: a Ctrl-C meant for the sweep must not kill workers behind its back.
                    start_new_session=True,
                )
                worker = _Worker(f"proc-{index}", process)
                self._workers.append(worker)
                self._selector.register(process.stdout, selectors.EVENT_READ, (worker, "stdout"))
                self._selector.register(process.stderr, selectors.EVENT_READ, (worker, "stderr"))
                log.debug("%s: pid %d, cpu %s", worker.label, process.pid, spec["cpu"])
        except OSError as exc:
            self.stop()
            raise WorkloadError(f"could not start processes workload worker: {exc}") from exc
        self._reader = threading.Thread(target=self._read_workers, name="processes-workload-reader", daemon=True)
        self._reader.start()

    def _preflight(self) -> None:
        params = self.params
        if params.merge_mode == "prctl" and not memory_merge_supported():
            raise WorkloadError(
                f"merge_mode=prctl needs PR_SET_MEMORY_MERGE (Linux >= 6.4 with KSM); "
                f"this kernel ({os.uname().release}) does not support it"
            )
        if isinstance(params.cpu_pin, tuple):
            usable = os.sched_getaffinity(0)
            missing = sorted(set(params.cpu_pin) - usable)
            if missing:
                raise WorkloadError(
                    f"cpu_pin lists CPU(s) {missing} this process may not use (usable: {sorted(usable)})"
                )
        available = _mem_available_bytes()
        if available is not None and params.bytes_total > _MEMORY_HEADROOM * available:
            raise WorkloadError(
                f"processes workload needs {params.bytes_total / 2**30:.2f} GiB but only "
                f"{available / 2**30:.2f} GiB is available (limit {_MEMORY_HEADROOM:.0%} of it)"
            )

    # -- the reader thread ----------------------------------------------------------------------

    def _read_workers(self) -> None:
        assert self._selector is not None
        while self._selector.get_map():
            for key, _ in self._selector.select(timeout=1.0):
                worker, stream = key.data
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    self._selector.unregister(key.fileobj)
                    self._on_stream_closed(worker)
                elif stream == "stdout":
                    self._on_stdout(worker, chunk)
                else:
                    self._on_stderr(worker, chunk)

    def _on_stdout(self, worker: _Worker, chunk: bytes) -> None:
        *lines, worker.stdout_partial = (worker.stdout_partial + chunk).split(b"\n")
        with self._changed:
            for raw in lines:
                kind, _, value = raw.decode(errors="replace").partition(" ")
                if kind == "fill":
                    _, _, wall = value.partition(" ")
                    worker.fill_started_wall = float(wall) if wall else None
                elif kind == "round":
                    number, _, wall = value.partition(" ")
                    worker.rounds_done = int(number)
                    if wall and worker.fill_started_wall is not None:
                        worker.fills.append((worker.rounds_done, worker.fill_started_wall, float(wall)))
                    worker.fill_started_wall = None
                elif kind == "mapped":
                    start, length = value.split()
                    worker.mapping = (int(start, 16), int(length))
                elif kind == "error":
                    worker.error = value
                    log.error("%s (pid %d): %s", worker.label, worker.process.pid, value)
            self._changed.notify_all()

    def _on_stderr(self, worker: _Worker, chunk: bytes) -> None:
        worker.stderr_tail = (worker.stderr_tail + chunk)[-_STDERR_TAIL_BYTES:]
        for line in chunk.decode(errors="replace").splitlines():
            if line.strip():
                log.warning("%s stderr: %s", worker.label, line)

    def _on_stream_closed(self, worker: _Worker) -> None:
        worker.open_streams -= 1
        if worker.open_streams:
            return
        try:
            returncode = worker.process.wait(timeout=10)
        except subprocess.TimeoutExpired:  # closed its pipes but lives on: leave it to stop()
            return
        with self._changed:
            if not self._stopping:
                who = f"{worker.label} (pid {worker.process.pid})"
                if worker.error is not None:
                    worker.failure = f"{who}: {worker.error}"
                else:
                    worker.failure = f"{who} {_describe_exit(returncode)}"
                    tail = worker.stderr_tail.decode(errors="replace").strip()
                    if tail:
                        worker.failure += f"\n--- stderr tail ---\n{tail}"
                log.error("processes workload: %s", worker.failure)
            self._changed.notify_all()

    # -- state ----------------------------------------------------------------------------------

    def _raise_if_failed(self) -> None:
        failures = [w.failure for w in self._workers if w.failure]
        if failures:
            raise WorkloadError("processes workload failed: " + "; ".join(failures))

    def _wait_for_rounds(self, rounds: int, timeout_s: float, what: str) -> None:
        if not self._workers or self._stopping:
            raise WorkloadError("processes workload is not running (not started, or stopped)")
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                self._raise_if_failed()
                behind = [w for w in self._workers if w.rounds_done < rounds]
                if not behind:
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    labels = ", ".join(f"{w.label} at round {w.rounds_done}" for w in behind)
                    raise WorkloadError(f"processes workload: {what} not reached within {timeout_s} s ({labels})")
                self._changed.wait(remaining)

    def wait_filled(self, timeout_s: float) -> None:
        """Block until every worker has finished its first fill; WorkloadError on failure/timeout."""
        self._wait_for_rounds(1, timeout_s, "first fill")
        log.info("all %d worker(s) filled", len(self._workers))

    def wait_rounds(self, rounds: int, timeout_s: float) -> None:
        """Block until every worker has completed `rounds` fills (the first fill counts as 1)."""
        self._wait_for_rounds(rounds, timeout_s, f"round {rounds}")

    def rounds_done(self) -> int:
        """Fills completed by the slowest worker (first fill included); WorkloadError if one failed."""
        with self._changed:
            self._raise_if_failed()
            return min((w.rounds_done for w in self._workers), default=0)

    def fills(self) -> list[dict[str, object]]:
        """Every completed fill of every worker: label, fill (1 = first), start/end wall time.
        Refills (fill >= 2) are when copy-on-write breaks the merges KSM made."""
        with self._changed:
            return [
                {"label": w.label, "fill": n, "start_wall": start, "end_wall": end}
                for w in self._workers
                for n, start, end in w.fills
            ]

    def pids(self) -> dict[str, int]:
        return {w.label: w.process.pid for w in self._workers}

    def mappings(self) -> dict[str, tuple[int, int]]:
        """(start address, length in bytes) of each worker's page mapping, once it has mapped it."""
        with self._changed:
            return {w.label: w.mapping for w in self._workers if w.mapping is not None}

    def is_running(self) -> bool:
        """True while every worker is alive and none has been stopped."""
        return bool(self._workers) and not self._stopping and all(w.process.poll() is None for w in self._workers)

    # -- stopping -------------------------------------------------------------------------------

    def stop(self, timeout_s: float = 5.0) -> None:
        """Terminate and reap every worker: lifeline closed + SIGTERM, SIGKILL after `timeout_s`.

        Idempotent, and never raises for a worker that had already failed.
        """
        with self._changed:
            self._stopping = True
        alive = [w for w in self._workers if w.process.poll() is None]
        for worker in self._workers:
            if worker.process.stdin is not None and not worker.process.stdin.closed:
                try:
                    worker.process.stdin.close()
                except OSError:  # EPIPE: it is already gone
                    pass
        for worker in alive:
            worker.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for worker in alive:
            try:
                worker.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning(
                    "%s (pid %d) ignored SIGTERM for %s s; sending SIGKILL", worker.label, worker.process.pid, timeout_s
                )
                worker.process.kill()
                worker.process.wait()
        if self._reader is not None:
            self._reader.join(timeout=10)
            self._reader = None
        if self._selector is not None:
            self._selector.close()
            self._selector = None
        for worker in self._workers:
            for stream in (worker.process.stdout, worker.process.stderr):
                if stream is not None:
                    stream.close()
        if alive:
            log.info("stopped %d worker(s)", len(alive))


PLUGIN = WorkloadPlugin(
    type="processes", model=ProcessesParams, runner="orchestrator.runners.processes:ProcessesRunner", where="host"
)
