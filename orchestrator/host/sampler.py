"""Timer thread that samples KSM and per-process memory into tidy rows.

Three tiers, each a subset of the next:
- ksm: every tick (every `fast_interval_s`) reads the KSM sysfs counters and ksmd's CPU
  time: a few sysfs files, cheap enough to resolve a workload that refills its pages every
  second (a 1 s tick against a ~1 s refill cycle aliases: the saving it reports depends on
  where the tick falls in the cycle).
- cheap: every `interval_s` also reads meminfo, vmstat and each target's statm RSS and ksm_stat.
- pss: every `pss_every_n_ticks`-th cheap tick (and the first) also reads smaps_rollup, which
  walks the page tables of each target and so costs time proportional to its RSS, and every
  process's CPU time (`outside_cpu_pct`).

Ticks sit on absolute monotonic deadlines (start + k * fast_interval_s), so the time spent
reading does not push later ticks back; each tick may be moved by up to +-jitter_fraction/2 of
an interval, so that no periodic workload can stay in phase with the sampling. A tick that
overruns skips the deadlines it missed instead of firing a burst to catch up.

`outside_cpu_pct` (pss ticks): CPU time used by every process that is not the study (ksmd,
this process, the targets: workers or QEMU, and their descendants), in % of one core. Another
job, a backup or a cron task on a 2-core host moves throughput by tens of percent; this column
is how a trial knows it was disturbed.
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


def _with_descendants(pids: set[int], stats: Mapping[int, probes.ProcStat]) -> set[int]:
    """`pids` and every process below them (an ssh or qemu-img the study started is the study)."""
    children: dict[int, list[int]] = {}
    for pid, st in stats.items():
        children.setdefault(st.ppid, []).append(pid)
    found, todo = set(pids), list(pids)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


class Sampler:
    """Samples on a background thread until stop(); use as a context manager.

    `targets` is called on every tick and returns {label: pid}, so processes
    that appear late (QEMU started after the sampler) or exit are handled.
    A failing tick is counted (`error_count`, `last_error`) and sampling goes on.
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
        # (monotonic s, {pid: cpu s incl. reaped children}, {pid: ppid}, study pids) of the last cheap tick
        self._prev_host: tuple[float, dict[int, float], dict[int, int], set[int]] | None = None
        self._t0 = 0.0
        self.tick_count = 0
        self.missed_ticks = 0
        self.error_count = 0
        self.last_error: BaseException | None = None
        self.cpu_s = 0.0  # CPU time the sampler thread itself has used

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

    # --- the thread ----------------------------------------------------------------

    def _run(self) -> None:
        # The thread owns the open counter files: opened and closed here, read only here.
        paths = probes.ksm_counter_paths(self.root)
        if self._ksmd_pid is not None:
            paths[_KSMD_STAT] = self.root / "proc" / str(self._ksmd_pid) / "stat"
        # The cheap tier adds the rest of the folder (knobs: a policy may change them).
        self._knob_names = probes.ksm_knob_names(self.root)
        with probes.CounterFiles(paths) as files:
            self._loop(files)

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
        pss_tier = cheap_tier and (tick // self.cheap_every_n_ticks) % self.pss_every_n_ticks == 0
        common = {"t_wall": t_wall, "t_s": started - self._t0, "phase": phase}

        row: dict[str, Any] = dict(common)
        texts = files.read()
        ksmd_stat = texts.pop(_KSMD_STAT, None)
        row.update(probes.parse_ksm_dir(texts))
        if cheap_tier:
            # None (no KSM folder when the thread started): read_ksm says so, as an error per tick
            row.update(probes.read_ksm(self.root, self._knob_names))
        row.update(self._ksmd_cpu(ksmd_stat))
        if not cheap_tier:
            row["tick_ms"] = (time.monotonic() - started) * 1000.0
            row["tier"] = "ksm"
            row["pss_tier"] = False
            with self._lock:
                self._ksm_rows.append(row)
            return
        meminfo = probes.read_meminfo(self.root)
        for field, column in _MEMINFO_COLUMNS.items():
            if field in meminfo:
                row[column] = meminfo[field]
        vmstat = probes.read_vmstat(self.root)
        for name in probes.VMSTAT_OF_INTEREST:
            if name in vmstat:
                row[f"vmstat_{name}"] = vmstat[name]

        process_rows = []
        targets = self._current_targets()
        if pss_tier:  # every process's stat costs ~40 us here: on the slow tier, not every tick
            row["outside_cpu_pct"] = self._outside_cpu_pct(targets.values())
        for label, pid in targets.items():
            try:
                process_row = self._sample_process(label, pid, pss_tier)
            except Exception as exc:  # noqa: BLE001 - other targets still get sampled
                self._record_error(exc)
                continue
            if process_row is not None:
                process_rows.append({**common, **process_row})

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

    def _outside_cpu_pct(self, target_pids: Any) -> float:
        """% of one core that processes outside the study used since the previous pss tick
        (NaN on the first one). The study is ksmd, this process, the targets (workers or QEMU)
        and their descendants; everything else, kernel threads included, is outside.

        Per-process times, not /proc/stat: the kernel's per-CPU busy counters are sampled at
        the timer tick and miss most of a ksmd that runs in 1 ms bursts (here /proc/stat showed
        22% busy while ksmd alone used 40%), which would hide real load. A process that exited
        since the last tick hands its total to its parent's cutime/cstime: that total minus what
        was already counted is its last interval. Not clamped: a tick's noise averages out over
        measure, where a clamp at 0 would bias the mean upwards."""
        now = time.monotonic()
        stats = probes.read_all_proc_stats(self.root)
        if not stats:
            return math.nan
        study = {os.getpid(), *target_pids}
        if self._ksmd_pid is not None:
            study.add(self._ksmd_pid)
        study = _with_descendants(study, stats)
        totals = {pid: st.cpu_s + st.children_cpu_s for pid, st in stats.items()}
        parents = {pid: st.ppid for pid, st in stats.items()}
        previous = self._prev_host
        self._prev_host = (now, totals, parents, study)
        if previous is None or now <= previous[0]:
            return math.nan
        prev_now, prev_totals, prev_parents, prev_study = previous
        outside_s = 0.0
        for pid, total in totals.items():
            if pid not in study:
                outside_s += total - prev_totals.get(pid, 0.0)
        for pid, total in prev_totals.items():
            # Gone since the last tick: its parent's cutime now holds what we had counted.
            if pid not in totals and pid not in prev_study and prev_parents.get(pid) not in prev_study:
                outside_s -= total
        return 100.0 * outside_s / (now - prev_now)

    def _sample_process(self, label: str, pid: int, pss_tier: bool) -> dict[str, Any] | None:
        statm = probes.read_statm(pid, self.root)
        if statm is None:
            return None  # exited (or zombie) since targets() listed it
        row: dict[str, Any] = {"label": label, "pid": pid, "rss_kib": statm["rss_kib"]}
        smaps = probes.read_smaps_rollup(pid, self.root) if pss_tier else None
        for column in _PSS_TIER_COLUMNS:
            row[column] = smaps.get(column, math.nan) if smaps else math.nan
        ksm_stat = probes.read_ksm_stat(pid, self.root) or {}
        for column in _KSM_STAT_COLUMNS:
            row[column] = ksm_stat.get(column, math.nan)
        return row
