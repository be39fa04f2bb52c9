"""Timer thread that samples KSM and per-process memory into tidy rows.

Three tiers, each a subset of the next:
- ksm: every tick (every `fast_interval_s`) reads the KSM sysfs counters and ksmd's CPU
  time: a few sysfs files, cheap enough to resolve a workload that refills its pages every
  second (a 1 s tick against a ~1 s refill cycle aliases: the saving it reports depends on
  where the tick falls in the cycle).
- cheap: every `interval_s` also reads the KSM knobs, meminfo, vmstat and each target's statm
  RSS and ksm_stat. Every file is opened once and re-read with pread (probes.CounterFiles,
  probes.ProcessCounters: statm + ksm_stat of a target cost ~11 us instead of ~90 us for open +
  read + close), and only the fields wanted are parsed. A target's files are opened when its pid
  is first seen, and closed when it leaves targets() or its process has been reaped (then a
  process with the same pid gets files of its own): the cheap tier of 64 targets costs about
  1 ms CPU.
- pss: smaps_rollup (PSS, USS) walks the page tables of a target while holding its mmap lock,
  about 4-5 ms per GiB resident: on a host with 1 TiB of guests, reading every target at once
  takes seconds of CPU in one burst. So PSS reads are spread under a CPU budget
  (`cpu_budget_pct` of one core for the whole thread, averaged over the trial), one target at a
  time, oldest PSS first (round-robin):
  * the floor: every `pss_every_n_ticks`-th cheap tick is a "PSS tick" (the first one
    included); every k-th PSS tick reads the target whose PSS is oldest, budget or not, where
    k is the smallest that keeps the floor within what the budget leaves once the rest of the
    thread (the cheap tier) has had its share (1 unless one read costs more than that earns in
    a PSS interval: k = ceil(costliest read / ((budget - rest's share) x PSS interval)), from
    what was measured so far; the share left is never taken below a quarter of the budget, so
    PSS ages stay bounded where the cheap tier alone spends it, and the record shows the
    overrun). k is the largest so far. With n targets each target's PSS is then at most n x k
    PSS intervals old (`pss_age_bound_s`, the largest over the run): each floor read takes one
    older than it, or none is due;
  * the budget: any cheap tick also reads the next due targets (PSS older than
    pss_every_n_ticks cheap ticks) while the thread's CPU credit pays for the next read in full
    (at its last read's cost). The credit is a token bucket filled at cpu_budget_pct from zero,
    holding at most one PSS interval's worth, charged with everything the thread uses. A small
    host reads every target every PSS tick; a 1 TiB one reads what the budget pays for.
  Rows without a fresh read keep NaN in pss_kib/uss_kib; the analysis carries each target's last
  PSS forward with its age (samplemetrics.process_metrics). `budget_record()` is what was used.
  PSS ticks also read `outside_cpu_pct`.

Ticks sit on absolute monotonic deadlines (start + k * fast_interval_s), so the time spent
reading does not push later ticks back; each tick may be moved by up to +-jitter_fraction/2 of
an interval, so that no periodic workload can stay in phase with the sampling. A tick that
overruns skips the deadlines it missed instead of firing a burst to catch up.

`outside_cpu_pct` (PSS ticks): CPU time used by every process that is not the study (ksmd,
this process, the targets: workers or QEMU, and their descendants), in % of one core. Another
job, a backup or a cron task on a 2-core host moves throughput by tens of percent; this column
is how a trial knows it was disturbed. Its cost grows with the study's processes, not the
host's: the host's busy time (from /proc/stat) minus the study's (see _outside_cpu_pct). The
study's process tree is walked (task/*/children) only when the host's last pid (/proc/loadavg)
has moved since the last walk, i.e. when a process may have joined it; otherwise the processes
of the last walk are read again, through stat files kept open.
"""

from __future__ import annotations

import logging
import math
import os
import random
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import pandas as pd

from orchestrator.errors import HostError
from orchestrator.host import probes

log = logging.getLogger(__name__)

_KSMD_STAT = "ksmd/stat"  # ksmd's /proc stat among the open counter files

_MEMINFO_COLUMNS = {
    "MemAvailable": "mem_available_kib",
    "MemFree": "mem_free_kib",
    "AnonPages": "anon_pages_kib",
    "AnonHugePages": "anon_huge_pages_kib",
}
_PSS_TIER_COLUMNS = ("pss_kib", "uss_kib", "swap_kib", "anon_huge_pages_kib")
_KSM_STAT_COLUMNS = ("ksm_merging_pages", "ksm_rmap_items", "ksm_zero_pages", "ksm_process_profit")

Targets = Callable[[], Mapping[str, int]]


DEFAULT_CPU_BUDGET_PCT = 1.0  # of one core, the whole sampler thread (plan: sampling.cpu_budget_pct)


class Sampler:
    """Samples on a background thread until stop(); use as a context manager.

    `targets` is called on every tick and returns {label: pid}, so processes
    that appear late (QEMU started after the sampler) or exit are handled.
    A failing tick is counted (`error_count`, `last_error`) and sampling goes on.
    `cpu_budget_pct`: the thread's CPU budget in % of one core (module docstring).
    """

    def __init__(
        self,
        interval_s: float,
        pss_every_n_ticks: int,
        targets: Targets,
        root: Path = Path("/"),
        phase: str = "baseline",
        fast_interval_s: float | None = None,
        jitter_fraction: float = 0.0,
        seed: int | None = None,
        cpu_budget_pct: float = DEFAULT_CPU_BUDGET_PCT,
    ) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        if pss_every_n_ticks < 1:
            raise ValueError(f"pss_every_n_ticks must be >= 1, got {pss_every_n_ticks}")
        fast = interval_s if fast_interval_s is None else fast_interval_s
        if not 0 < fast <= interval_s:
            raise ValueError(f"fast_interval_s must be in (0, interval_s], got {fast_interval_s}")
        if not 0 <= jitter_fraction < 1:
            raise ValueError(f"jitter_fraction must be in [0, 1), got {jitter_fraction}")
        if not 0 < cpu_budget_pct <= 100:
            raise ValueError(f"cpu_budget_pct must be in (0, 100], got {cpu_budget_pct}")
        self.interval_s = interval_s
        self.fast_interval_s = fast
        # A cheap tick every this many ticks: the fast grid is the clock, cheap ticks sit on it.
        self.cheap_every_n_ticks = max(1, round(interval_s / fast))
        self.jitter_fraction = jitter_fraction
        self._rng = random.Random(seed)
        self.pss_every_n_ticks = pss_every_n_ticks
        self.root = root
        self._targets = targets
        self._phase = phase  # the first tick fires as soon as start() returns, so it needs a label
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._ksm_rows: list[dict[str, Any]] = []
        self._process_rows: list[dict[str, Any]] = []
        self._ksmd_pid: int | None = None
        self._knob_names: tuple[str, ...] | None = None  # the KSM folder minus its counters
        self._prev_ksmd: tuple[float, float] | None = None  # (monotonic s, cpu s)
        # (monotonic s, host CPU, {(pid, start ticks): (cpu s incl. reaped children, ppid)} of
        # the study, s since boot) at the last PSS tick
        self._prev_host: tuple[float, probes.HostCpu, dict[tuple[int, int], tuple[float, int]], float] | None = None
        # The PSS budget (module docstring): credit in CPU s, refilled at cpu_budget_pct.
        self.cpu_budget_pct = cpu_budget_pct
        self._credit_cap_s = cpu_budget_pct / 100 * interval_s * pss_every_n_ticks
        self._credit_s = 0.0  # earned from the first tick on: no burst at start
        self._charged_at: tuple[float, float] | None = None  # (monotonic s, thread CPU s)
        # (monotonic s, thread CPU s) at the first tick's charge: the floor's share is sized
        # from the thread's use after it, start-up (opening files, first reads) left out
        self._began: tuple[float, float] | None = None
        self._floor_every = 1  # k (module docstring), the largest so far
        self._floor_share_pct = cpu_budget_pct  # the budget's share k was last sized with
        self._cheap_index = -1  # cheap ticks so far, minus one
        self._pss_read_at: dict[str, int] = {}  # label -> cheap tick of its last PSS read
        self._pss_read_t: dict[str, float] = {}  # label -> monotonic s of that read (or first sight)
        self._pss_age_max_s: dict[str, float] = {}
        self._label_order: dict[str, int] = {}  # first-seen order: ties in the round-robin
        self._floor_at = -math.inf  # PSS tick of the floor's last read
        self._read_cost_max_s = 0.0  # the costliest PSS read so far, thread CPU s
        self._read_cost_s: dict[str, float] = {}  # label -> CPU s of its last PSS read
        self.pss_age_bound_ticks = 0  # cheap ticks; the largest targets x k x pss_every_n_ticks
        self.pss_reads = 0
        self.pss_floor_reads = 0  # reads taken by the floor, budget or not
        self.pss_read_cpu_s = 0.0
        self._stopped_at: float | None = None
        self._t0 = 0.0
        self.tick_count = 0
        self.missed_ticks = 0
        self.error_count = 0
        self.last_error: BaseException | None = None
        self.cpu_s = 0.0  # CPU time the sampler thread itself has used
        # Files the thread keeps open (opened in _run): the KSM knobs, the host's /proc files,
        # each target's statm and ksm_stat ({pid: files}), each study process's stat.
        self._knob_files: probes.CounterFiles | None = None
        self._host_files: probes.CounterFiles | None = None
        self._target_files: dict[int, probes.ProcessCounters] = {}
        self._stat_files: dict[int, probes.ProcessFiles] = {}
        self._study_pids: set[int] = set()  # the study's processes at the last outside-load read
        self._walked_last_pid: int | None = None  # the host's last pid when they were walked
        self._walked_roots: set[int] = set()  # and the roots walked from
        self.outside_reads = 0  # outside-load reads (PSS ticks)
        self.study_walks = 0  # of them, those that walked the study's process tree

    # --- lifecycle -----------------------------------------------------------

    def start(self) -> Sampler:
        if self._thread is not None:
            raise RuntimeError("Sampler.start() called twice; make a new Sampler per trial")
        self._ksmd_pid = probes.find_ksmd_pid(self.root)
        if self._ksmd_pid is None:
            log.warning("no ksmd kernel thread under %s/proc: ksmd_cpu_* will be NaN", self.root)
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="ksm-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self, grace_s: float | None = None) -> None:
        """Ask the thread to finish and wait up to grace_s (default: 2 cheap ticks, >= 5 s)."""
        self._stop.set()
        if self._thread is None:
            return
        if self._stopped_at is None:
            self._stopped_at = time.monotonic()
        if grace_s is None:
            grace_s = max(5.0, 2 * self.interval_s)
        self._thread.join(grace_s)
        if self._thread.is_alive():
            # A read blocked in the kernel; the daemon thread dies with the process.
            log.warning("sampler thread still busy %.1f s after stop()", grace_s)

    def __enter__(self) -> Sampler:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def set_phase(self, name: str) -> None:
        """Label rows from the next tick on (baseline, settle, measure, tail).

        May be called before start(); otherwise the tick taken by start() keeps
        the phase given to the constructor.
        """
        self._phase = name

    # --- snapshots (safe while the thread runs) ---------------------------------

    def ksm_frame(self) -> pd.DataFrame:
        with self._lock:
            rows = list(self._ksm_rows)
        return pd.DataFrame.from_records(rows)

    def process_frame(self) -> pd.DataFrame:
        with self._lock:
            rows = list(self._process_rows)
        return pd.DataFrame.from_records(rows)

    def latest(self) -> dict[str, Any]:
        """Copy of the last KSM row, {} before the first tick."""
        with self._lock:
            return dict(self._ksm_rows[-1]) if self._ksm_rows else {}

    def budget_record(self) -> dict[str, Any]:
        """What the sampling budget bought, for trial.json "sampler": the thread's CPU (s and %
        of one core over the time it ran), PSS reads done (and how many the floor forced), the
        age bound the round-robin guarantees and the largest age each target's PSS reached; the
        outside-load reads and how many of them walked the study's process tree."""
        wall_s = (self._stopped_at or time.monotonic()) - self._t0 if self._t0 else 0.0
        bound_ticks = self.pss_age_bound_ticks
        return {
            "cpu_budget_pct": self.cpu_budget_pct,
            "cpu_s": round(self.cpu_s, 4),
            "cpu_pct": round(100 * self.cpu_s / wall_s, 3) if wall_s > 0 else None,
            "pss_reads": self.pss_reads,
            "pss_floor_reads": self.pss_floor_reads,
            "pss_read_cpu_s": round(self.pss_read_cpu_s, 4),
            "pss_read_max_ms": round(1000 * self._read_cost_max_s, 3),
            "pss_floor_every_pss_ticks": self._floor_every,
            "pss_floor_share_pct": round(self._floor_share_pct, 6),
            "pss_age_bound_ticks": bound_ticks,
            "pss_age_bound_s": round(bound_ticks * self.interval_s, 3),
            "pss_age_max_s": {label: round(age, 3) for label, age in sorted(self._pss_age_max_s.items())},
            "outside_reads": self.outside_reads,
            "outside_walks": self.study_walks,
        }

    # --- the thread ----------------------------------------------------------------

    def _run(self) -> None:
        # The thread owns the open files: opened and closed here, read only here.
        paths = probes.ksm_counter_paths(self.root)
        if self._ksmd_pid is not None:
            paths[_KSMD_STAT] = self.root / "proc" / str(self._ksmd_pid) / "stat"
        # The cheap tier adds the rest of the folder (knobs: a policy may change them).
        self._knob_names = probes.ksm_knob_names(self.root)
        self._charged_at = (time.monotonic(), time.thread_time())  # the budget counts from here
        knob_paths = probes.ksm_file_paths(self.root, self._knob_names or ())
        try:
            with (
                probes.CounterFiles(paths) as files,
                probes.CounterFiles(knob_paths) as self._knob_files,
                probes.CounterFiles(probes.host_counter_paths(self.root)) as self._host_files,
            ):
                self._loop(files)
        finally:
            for opened in (*self._target_files.values(), *self._stat_files.values()):
                opened.close()
            self._target_files.clear()
            self._stat_files.clear()

    def _loop(self, files: probes.CounterFiles) -> None:
        grid = self._t0  # the unjittered deadline of the current tick
        tick = 0
        step = self.fast_interval_s
        while True:
            try:
                self._tick(tick, files)
            except Exception as exc:  # noqa: BLE001 - one bad tick must not end sampling
                self._record_error(exc)
            self.cpu_s = time.thread_time()
            tick += 1
            self.tick_count = tick
            grid += step
            now = time.monotonic()
            if now >= grid:
                missed = math.floor((now - grid) / step) + 1
                self.missed_ticks += missed
                grid += missed * step
                tick += missed  # keep the cheap/pss tiers on their grid positions
            offset = self._rng.uniform(-0.5, 0.5) * self.jitter_fraction * step if self.jitter_fraction else 0.0
            if self._stop.wait(max(0.0, grid + offset - now)):
                return

    def _record_error(self, exc: BaseException) -> None:
        self.error_count += 1
        self.last_error = exc
        if self.error_count == 1:
            log.warning("sampler tick failed (sampling continues): %r", exc, exc_info=exc)
        else:
            log.debug("sampler tick failed: %r", exc)

    def _tick(self, tick: int, files: probes.CounterFiles) -> None:
        started = time.monotonic()
        t_wall = time.time()
        phase = self._phase
        cheap_tier = tick % self.cheap_every_n_ticks == 0
        # the PSS tick: the floor's read and the outside load (module docstring)
        pss_tier = cheap_tier and (tick // self.cheap_every_n_ticks) % self.pss_every_n_ticks == 0
        common = {"t_wall": t_wall, "t_s": started - self._t0, "phase": phase}

        row: dict[str, Any] = dict(common)
        texts = files.read()
        ksmd_stat = texts.pop(_KSMD_STAT, None)
        row.update(probes.parse_ksm_dir(texts))
        if cheap_tier:
            if self._knob_names is None:
                # no KSM folder when the thread started: read_ksm says so, as an error per tick
                row.update(probes.read_ksm(self.root, self._knob_names))
            row.update(probes.parse_ksm_dir(self._knob_files.read()))
        row.update(self._ksmd_cpu(ksmd_stat))
        if not cheap_tier:
            row["tick_ms"] = (time.monotonic() - started) * 1000.0
            row["tier"] = "ksm"
            row["pss_tier"] = False
            with self._lock:
                self._ksm_rows.append(row)
            return
        host = self._host_files.read(("meminfo", "vmstat"))
        if "meminfo" not in host or "vmstat" not in host:
            raise HostError(f"cannot read {self.root}/proc/meminfo and vmstat")
        meminfo = probes.parse_meminfo(host["meminfo"], _MEMINFO_COLUMNS)
        for field, column in _MEMINFO_COLUMNS.items():
            if field in meminfo:
                row[column] = meminfo[field]
        vmstat = probes.parse_vmstat(host["vmstat"], probes.VMSTAT_OF_INTEREST)
        for name in probes.VMSTAT_OF_INTEREST:
            if name in vmstat:
                row[f"vmstat_{name}"] = vmstat[name]

        process_rows = []
        targets = self._current_targets()
        self._cheap_index = tick // self.cheap_every_n_ticks
        if pss_tier:
            row["outside_cpu_pct"] = self._outside_cpu_pct(targets.values())
        for label, pid in targets.items():
            try:
                process_row = self._sample_process(label, pid)
            except Exception as exc:  # noqa: BLE001 - other targets still get sampled
                self._record_error(exc)
                continue
            if process_row is not None:
                process_rows.append({**common, **process_row})
        for pid in self._target_files.keys() - set(targets.values()):
            self._target_files.pop(pid).close()  # no longer a target
        row["pss_reads"] = self._read_pss(process_rows, pss_tier, started)

        row["tick_ms"] = (time.monotonic() - started) * 1000.0
        row["tier"] = "pss" if pss_tier else "cheap"
        row["pss_tier"] = pss_tier
        with self._lock:
            self._ksm_rows.append(row)
            self._process_rows.extend(process_rows)

    def _current_targets(self) -> Mapping[str, int]:
        try:
            return dict(self._targets())
        except Exception as exc:  # noqa: BLE001 - the KSM row is still worth keeping
            self._record_error(exc)
            return {}

    def _ksmd_cpu(self, stat_text: str | None) -> dict[str, float]:
        """ksmd's CPU seconds and % of a core since the last tick, from its /proc stat text."""
        if stat_text is None:
            return {"ksmd_cpu_s": math.nan, "ksmd_cpu_pct": math.nan}
        now = time.monotonic()
        cpu_s = probes.parse_proc_stat(stat_text).cpu_s
        pct = math.nan
        if self._prev_ksmd is not None:
            prev_now, prev_cpu_s = self._prev_ksmd
            if now > prev_now:
                pct = 100.0 * (cpu_s - prev_cpu_s) / (now - prev_now)
        self._prev_ksmd = (now, cpu_s)
        return {"ksmd_cpu_s": cpu_s, "ksmd_cpu_pct": pct}

    def _charge(self) -> float:
        """Refill the budget's credit for the wall time since the last call, charge it the
        thread's CPU over that time; the credit left, in CPU s."""
        now, cpu_s = time.monotonic(), time.thread_time()
        if self._charged_at is not None:
            then, cpu_then = self._charged_at
            earned = self.cpu_budget_pct / 100 * (now - then)
            self._credit_s = min(self._credit_cap_s, self._credit_s + earned - (cpu_s - cpu_then))
        self._charged_at = (now, cpu_s)
        return self._credit_s

    def _floor_share(self) -> float:
        """The budget's share the floor's reads may use (% of one core): the budget minus what the
        thread spent outside PSS reads from its first tick to the last charge, never below a quarter
        of the budget (no clock read of its own: this runs every cheap tick)."""
        rest_pct = 0.0
        if self._began is not None and self._charged_at is not None:
            (then, cpu_then), (now, cpu_now) = self._began, self._charged_at
            if now > then:
                rest_pct = max(0.0, 100 * (cpu_now - cpu_then - self.pss_read_cpu_s) / (now - then))
        return max(self.cpu_budget_pct - rest_pct, self.cpu_budget_pct / 4)

    def floor_every_pss_ticks(self) -> int:
        """k: the floor reads on every k-th PSS tick, the fewest that keep its own reads within
        the budget's share left to them (module docstring); the largest so far."""
        self._floor_share_pct = self._floor_share()
        earned_s = self._floor_share_pct / 100 * self.interval_s * self.pss_every_n_ticks
        self._floor_every = max(self._floor_every, math.ceil(self._read_cost_max_s / earned_s))
        return self._floor_every

    def _read_pss(self, process_rows: list[dict[str, Any]], pss_tick: bool, started: float) -> int:
        """Read PSS into this tick's rows of the targets whose turn it is (module docstring):
        oldest first; on the floor's PSS tick the first one whatever the budget, then while
        credit lasts. A target is due once its PSS is pss_every_n_ticks cheap ticks old.
        Returns the reads done."""
        pss_tick_index = self._cheap_index // self.pss_every_n_ticks
        self._charge()  # also the clock readings the floor's share is sized from
        if self._began is None:
            self._began = self._charged_at
        floor_every = self.floor_every_pss_ticks()
        floor_tick = pss_tick and pss_tick_index - self._floor_at >= floor_every
        self.pss_age_bound_ticks = max(
            self.pss_age_bound_ticks, len(process_rows) * floor_every * self.pss_every_n_ticks
        )
        for process_row in process_rows:
            label = process_row["label"]
            self._label_order.setdefault(label, len(self._label_order))
            since = self._pss_read_t.setdefault(label, started)  # never read: age from first sight
            self._pss_age_max_s[label] = max(self._pss_age_max_s.get(label, 0.0), started - since)
        never = -1 - self.pss_every_n_ticks
        order = sorted(
            process_rows, key=lambda r: (self._pss_read_at.get(r["label"], never), self._label_order[r["label"]])
        )
        reads = 0
        for process_row in order:
            label = process_row["label"]
            if self._cheap_index - self._pss_read_at.get(label, never) < self.pss_every_n_ticks:
                break  # sorted oldest first: no later one is due either
            floor = floor_tick and reads == 0
            # a read the credit pays for in full (its last cost, else the costliest so far):
            # the budget is a ceiling, not an average that overdrawn reads pull above it
            expected_s = self._read_cost_s.get(label, self._read_cost_max_s)
            if not floor and (self._credit_s < expected_s or self._credit_s <= 0 or self._stop.is_set()):
                break
            cpu_before = time.thread_time()
            try:
                smaps = probes.read_smaps_rollup(process_row["pid"], self.root)
            except Exception as exc:  # noqa: BLE001 - the next target is still worth reading
                self._record_error(exc)
                smaps = None
            cost_s = time.thread_time() - cpu_before
            self.pss_read_cpu_s += cost_s
            self._read_cost_max_s = max(self._read_cost_max_s, cost_s)
            self._read_cost_s[label] = cost_s
            self._charge()
            reads += 1
            self.pss_reads += 1
            self.pss_floor_reads += floor
            if floor:
                self._floor_at = pss_tick_index
            self._pss_read_at[label] = self._cheap_index
            self._pss_read_t[label] = started
            for column in _PSS_TIER_COLUMNS:
                process_row[column] = smaps.get(column, math.nan) if smaps else math.nan
        return reads

    def _study_stats(self, target_pids: Any, last_pid: int | None) -> dict[tuple[int, int], tuple[float, int]]:
        """{(pid, start ticks): (CPU s incl. reaped children, ppid)} of the study: ksmd, this
        process, the targets and their descendants. The descendants are found through
        /proc/PID/task/*/children only when a process or thread may have been created since the
        last walk (the host's last pid moved, or a new root); otherwise the last walk's processes
        are read again. Their stat files stay open. So the cost grows with the study's processes,
        not the host's, and a quiet study costs one pread per process."""
        roots = {os.getpid(), *target_pids}
        if self._ksmd_pid is not None:
            roots.add(self._ksmd_pid)
        walk = last_pid is None or last_pid != self._walked_last_pid or not roots <= self._walked_roots
        found: dict[tuple[int, int], tuple[float, int]] = {}
        seen: set[int] = set()
        todo = list(roots if walk else roots | self._study_pids)
        while todo:
            pid = todo.pop()
            if pid in seen:
                continue
            seen.add(pid)
            stat = self._proc_stat(pid)
            if stat is None:
                continue
            found[(pid, stat.start_ticks)] = (stat.cpu_s + stat.children_cpu_s, stat.ppid)
            if walk and pid != self._ksmd_pid:
                todo.extend(probes.read_children(pid, self.root))
        living = {pid for pid, _ in found}
        for pid in self._stat_files.keys() - living:
            self._stat_files.pop(pid).close()
        self._study_pids = living
        if walk:
            self._walked_last_pid, self._walked_roots = last_pid, roots
            self.study_walks += 1
        return found

    def _proc_stat(self, pid: int) -> probes.ProcStat | None:
        """pid's /proc stat through a file kept open (opened again once its process has gone:
        the pid may belong to a new one)."""
        files = self._stat_files.get(pid)
        text = None if files is None else files.read("stat")
        if text is None:
            if files is not None:
                files.close()
            files = probes.ProcessFiles(pid, ("stat",), self.root)
            text = files.read("stat")
            if text is None:
                files.close()
                self._stat_files.pop(pid, None)
                return None
            self._stat_files[pid] = files
        return probes.parse_proc_stat(text)

    def _outside_cpu_pct(self, target_pids: Any) -> float:
        """% of one core that processes outside the study used since the previous PSS tick
        (NaN on the first one). The study is ksmd, this process, the targets (workers or QEMU)
        and their descendants; everything else, kernel threads and interrupts included, is
        outside: the host's busy time minus the study's.

        The host's busy time is wall time x CPUs minus /proc/stat's idle, iowait and steal, not
        its busy fields: those are sampled at the timer tick and miss most of a ksmd that runs
        in 1 ms bursts (here they showed 22% busy while ksmd alone used 40%); a tickless kernel
        measures idle at every idle entry and exit. The study's time is per process (exact
        runtime). A study process that exited since the last tick and was reaped by a study
        process hands its total to that parent's cutime/cstime: what we had counted of it comes
        off; one whose parent is outside the study (QEMU under libvirtd) leaves its last
        interval outside. A process that joined the study after starting elsewhere counts from
        the tick after. Not clamped: a tick's noise averages out over measure, where a clamp at
        0 would bias the mean upwards."""
        now = time.monotonic()
        texts = self._host_files.read(("stat", "uptime", "loadavg"))
        try:
            host = probes.parse_host_cpu(texts["stat"])
            boot_s = probes.parse_uptime_s(texts["uptime"])
        except (KeyError, ValueError):
            return math.nan
        try:
            last_pid = probes.parse_last_pid(texts["loadavg"])
        except (KeyError, ValueError, IndexError):
            last_pid = None  # no way to tell whether processes were created: walk every time
        study = self._study_stats(target_pids, last_pid)
        self.outside_reads += 1
        previous = self._prev_host
        self._prev_host = (now, host, study, boot_s)
        if previous is None or now <= previous[0]:
            return math.nan
        prev_now, prev_host, prev_study, prev_boot_s = previous
        elapsed_s = now - prev_now
        busy_s = elapsed_s * host.cpus - (host.not_working_s - prev_host.not_working_s)
        study_s = 0.0
        for key, (total, _) in study.items():
            if key in prev_study:
                study_s += total - prev_study[key][0]
            elif key[1] / probes.CLOCK_TICKS_PER_S >= prev_boot_s:
                study_s += total  # started since the last tick: all of it is this interval's
        living = {pid for pid, _ in study}
        for key, (total, ppid) in prev_study.items():
            if key not in study and ppid in living:
                study_s -= total  # reaped into a study parent's cutime, already counted
        return 100.0 * (busy_s - study_s) / elapsed_s

    def _sample_process(self, label: str, pid: int) -> dict[str, Any] | None:
        files = self._target_files.get(pid)
        if files is None:  # first sight of this pid (or of a new process with its number)
            files = self._target_files[pid] = probes.ProcessCounters(pid, self.root)
        statm = files.statm()
        if statm is None:
            if files.gone:  # reaped: its files read nothing ever again
                self._target_files.pop(pid).close()
            return None  # exited (or zombie) since targets() listed it
        row: dict[str, Any] = {"label": label, "pid": pid, "rss_kib": statm["rss_kib"]}
        for column in _PSS_TIER_COLUMNS:
            row[column] = math.nan  # unless this tick reads its PSS (_read_pss)
        ksm_stat = files.ksm_stat() or {}
        for column in _KSM_STAT_COLUMNS:
            row[column] = ksm_stat.get(column, math.nan)
        return row
