"""Sampler: a real run against a child process on this host, then fake trees for timing and errors."""

from __future__ import annotations

import math
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from orchestrator.host import probes
from orchestrator.errors import HostError
from orchestrator.host.sampler import Sampler

DATA = Path(__file__).parent / "data"


@pytest.fixture
def child(holder):
    return lambda: holder(mib=32)


def _wait_for_ticks(sampler: Sampler, ticks: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while sampler.tick_count < ticks and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sampler.tick_count >= ticks


# --- real host --------------------------------------------------------------------------


def test_sampler_real_host_rows_phases_and_pss_cadence(child):
    proc = child()
    with Sampler(0.2, 3, lambda: {"holder": proc.pid}, phase="settle") as sampler:
        _wait_for_ticks(sampler, 2)
        sampler.set_phase("baseline")
        _wait_for_ticks(sampler, 5)
        sampler.set_phase("measure")
        _wait_for_ticks(sampler, 10)
    assert not sampler.running
    assert sampler.error_count == 0, sampler.last_error

    ksm = sampler.ksm_frame()
    n = len(ksm)
    assert 10 <= n <= 12
    assert ksm["t_s"].is_monotonic_increasing and ksm["t_s"].is_unique
    assert ksm["t_s"].iloc[0] < 0.1
    assert abs(ksm["t_wall"].iloc[-1] - time.time()) < 5
    phases = ksm["phase"].tolist()
    order = {"settle": 0, "baseline": 1, "measure": 2}
    assert phases[0] == "settle" and phases[-1] == "measure" and "baseline" in phases
    assert phases == sorted(phases, key=order.get)  # each switch sticks, never back
    assert ksm["pss_tier"].tolist() == [i % 3 == 0 for i in range(n)]
    for column in (
        "pages_sharing",
        "pages_shared",
        "full_scans",
        "run",
        "ksmd_cpu_s",
        "mem_available_kib",
        "mem_free_kib",
        "anon_pages_kib",
        "anon_huge_pages_kib",
        "vmstat_cow_ksm",
        "vmstat_thp_fault_alloc",
        "tick_ms",
    ):
        assert column in ksm.columns, column
    assert "advisor_mode" not in ksm.columns
    assert math.isnan(ksm["ksmd_cpu_pct"].iloc[0])
    assert ksm["ksmd_cpu_pct"].iloc[1:].notna().all()
    assert (ksm["ksmd_cpu_pct"].iloc[1:] >= 0).all()
    assert (ksm["tick_ms"] > 0).all()

    procs = sampler.process_frame()
    assert len(procs) == n
    assert (procs["label"] == "holder").all() and (procs["pid"] == proc.pid).all()
    assert procs["t_s"].tolist() == ksm["t_s"].tolist()
    assert (procs["rss_kib"] >= 32 * 1024).all()
    tier = ksm["pss_tier"].to_numpy()
    assert procs["pss_kib"][tier].notna().all() and (procs["pss_kib"][tier] >= 32 * 1024).all()
    assert procs["pss_kib"][~tier].isna().all()
    assert procs["uss_kib"][~tier].isna().all()
    assert ksm["pss_reads"].tolist() == tier.astype(int).tolist()  # one target: read on each PSS tick
    assert procs["ksm_merging_pages"].notna().all()
    assert sampler.latest()["t_s"] == ksm["t_s"].iloc[-1]


def test_sampler_real_host_process_appearing_and_exiting(child):
    first = child()
    late: dict[str, int] = {}

    def targets() -> dict[str, int]:
        return {"first": first.pid, **late}

    with Sampler(0.1, 1, targets) as sampler:
        _wait_for_ticks(sampler, 3)
        late["late"] = child().pid
        _wait_for_ticks(sampler, sampler.tick_count + 3)
        first.kill()  # zombie until reaped: must be skipped, not an error
        _wait_for_ticks(sampler, sampler.tick_count + 3)
        first.wait()
        _wait_for_ticks(sampler, sampler.tick_count + 3)
        assert _cheap_fds(first.pid) == {}  # reaped: its files closed, no new process to open
    assert sampler.error_count == 0, sampler.last_error
    procs = sampler.process_frame()
    last_t_s = sampler.ksm_frame()["t_s"].iloc[-1]
    by_label = procs.groupby("label")["t_s"]
    assert by_label.max()["first"] < last_t_s  # no rows after it exited
    assert by_label.min()["late"] > 0.25  # no rows before it existed
    assert by_label.max()["late"] == last_t_s


def _open_proc_files(pid: int) -> dict[int, str]:
    """{fd: file name} of this process's descriptors open on /proc/<pid>/*."""
    found = {}
    for entry in os.scandir("/proc/self/fd"):
        try:
            target = os.readlink(entry.path)
        except OSError:  # closed while we looked
            continue
        if target.startswith(f"/proc/{pid}/"):
            found[int(entry.name)] = target.rsplit("/", 1)[1]
    return found


def _cheap_fds(pid: int) -> dict[int, str]:
    return {fd: name for fd, name in _open_proc_files(pid).items() if name in ("statm", "ksm_stat")}


def test_sampler_keeps_each_targets_files_open_and_opens_new_ones_for_a_new_pid(holder):
    """statm and ksm_stat are opened once per target process and re-read (the same descriptors
    tick after tick); when a label's pid changes (a restarted target) the new process's files are
    opened, the old ones closed, and its rows carry the new process's RSS. Nothing stays open."""
    small, big = holder(mib=8), holder(mib=64)
    current = {"vm": small.pid}
    with Sampler(0.1, 1, lambda: dict(current)) as sampler:
        _wait_for_ticks(sampler, 3)
        first = _cheap_fds(small.pid)
        assert sorted(first.values()) == ["ksm_stat", "statm"]
        _wait_for_ticks(sampler, sampler.tick_count + 3)
        assert _cheap_fds(small.pid) == first  # the same descriptors, not reopened
        switched_at = sampler.tick_count
        current["vm"] = big.pid
        _wait_for_ticks(sampler, switched_at + 4)
        assert _cheap_fds(small.pid) == {}
        assert sorted(_cheap_fds(big.pid).values()) == ["ksm_stat", "statm"]
    assert sampler.error_count == 0, sampler.last_error
    assert _open_proc_files(small.pid) == {} and _open_proc_files(big.pid) == {}
    procs = sampler.process_frame()
    assert set(procs["pid"]) == {small.pid, big.pid}
    assert (procs.loc[procs["pid"] == small.pid, "rss_kib"] < 32 * 1024).all()
    assert (procs.loc[procs["pid"] == big.pid, "rss_kib"] >= 64 * 1024).all()
    assert procs.index[procs["pid"] == small.pid].max() < procs.index[procs["pid"] == big.pid].min()
    assert procs["ksm_merging_pages"].notna().all()


def _pss_reads(sampler: Sampler) -> list[tuple[float, str]]:
    procs = sampler.process_frame()
    read = procs[procs["pss_kib"].notna()]
    return list(zip(read["t_s"], read["label"]))


def _in_turn(labels: tuple[str, ...], reads: list[tuple[float, str]]) -> bool:
    return [label for _, label in reads] == [labels[i % len(labels)] for i in range(len(reads))]


def test_sampler_small_budget_reads_one_target_per_floor_tick_in_turn_within_the_age_bound(holder):
    """A budget smaller than a tick's cheap reads (0.2% of a core earns 0.2 ms a 0.1 s tick; a
    tick's reads cost more): only the floor reads, one target on each of its PSS ticks (every k-th,
    k from the costliest read), the one whose PSS is oldest, so the targets come in turn; none
    waits longer than the recorded bound, targets x k PSS intervals."""
    labels = ("a", "b", "c", "d")
    targets = {label: holder(mib=8).pid for label in labels}
    with Sampler(0.1, 1, lambda: targets, cpu_budget_pct=0.2) as sampler:
        _wait_for_ticks(sampler, 30)
    assert sampler.error_count == 0, sampler.last_error
    record = sampler.budget_record()
    k = record["pss_floor_every_pss_ticks"]
    ksm = sampler.ksm_frame()
    assert ksm["pss_reads"].isin([0, 1]).all()
    reads = _pss_reads(sampler)
    assert _in_turn(labels, reads)
    assert record["pss_reads"] == record["pss_floor_reads"] == len(reads) >= len(ksm) // k - 1
    assert record["pss_age_bound_ticks"] == 4 * k and record["pss_age_bound_s"] == pytest.approx(0.4 * k)
    slack_s = 0.1 * (1 + sampler.missed_ticks)  # a late wake-up moves a read by one tick
    assert set(record["pss_age_max_s"]) == set(labels)
    for label, age in record["pss_age_max_s"].items():
        assert age <= record["pss_age_bound_s"] + slack_s, (label, age)


def test_sampler_budget_below_one_read_per_pss_tick_stretches_the_floor_and_its_bound(holder):
    """0.001% of a core earns 2 us a PSS interval, less than one PSS read: the floor reads only
    every k-th PSS tick, k = ceil(costliest read / the budget's share left per PSS interval),
    and the recorded bound grows to targets x k PSS intervals: the budget and the target count
    set it. The cheap tier alone spends more than 0.001%, so the share is its floor, a quarter."""
    labels = ("a", "b", "c")
    targets = {label: holder(mib=8).pid for label in labels}
    with Sampler(0.1, 2, lambda: targets, cpu_budget_pct=0.001) as sampler:
        _wait_for_ticks(sampler, 20)
    assert sampler.error_count == 0, sampler.last_error
    record = sampler.budget_record()
    k = record["pss_floor_every_pss_ticks"]
    # The record rounds the read time (ms, 2 decimals): the k it implies may differ by one.
    assert record["pss_floor_share_pct"] == pytest.approx(0.001 / 4)
    implied = math.ceil(record["pss_read_max_ms"] / 1000 / (0.001 / 4 / 100 * 0.1 * 2))
    assert k >= 2 and abs(k - implied) <= 1, (k, implied)
    assert record["pss_age_bound_ticks"] == 3 * k * 2
    assert record["pss_reads"] == record["pss_floor_reads"] < int(sampler.ksm_frame()["pss_tier"].sum())
    assert _in_turn(labels, _pss_reads(sampler))


def test_sampler_budget_pays_for_every_due_target_and_records_its_use(holder):
    """With budget to spare every target is read as soon as it is due (every PSS interval, as
    before the budget, in turn); the record's counts match the rows written and its CPU share
    is the thread's own, a share of its wall time."""
    labels = ("a", "b", "c")
    targets = {label: holder(mib=8).pid for label in labels}
    started = time.monotonic()
    with Sampler(0.1, 2, lambda: targets, cpu_budget_pct=100) as sampler:
        _wait_for_ticks(sampler, 20)
    wall_s = time.monotonic() - started
    assert sampler.error_count == 0, sampler.last_error
    ksm = sampler.ksm_frame()
    record = sampler.budget_record()
    reads = _pss_reads(sampler)
    assert _in_turn(labels, reads)
    assert record["pss_reads"] == len(reads) == int(ksm["pss_reads"].sum())
    assert len(reads) >= 3 * (len(ksm) // 2 - 1)  # each target once per PSS interval
    assert record["pss_floor_every_pss_ticks"] == 1
    assert 1 <= record["pss_floor_reads"] <= int(ksm["pss_tier"].sum())
    assert record["cpu_budget_pct"] == 100
    assert record["cpu_s"] == pytest.approx(sampler.cpu_s, abs=1e-4) and record["cpu_s"] > 0
    assert 0 < record["cpu_pct"] < 100 and record["cpu_pct"] == pytest.approx(100 * record["cpu_s"] / wall_s, rel=0.2)
    slack_s = 0.1 * (1 + sampler.missed_ticks)
    assert max(record["pss_age_max_s"].values()) <= 0.2 + slack_s
    assert record["outside_reads"] == int(ksm["outside_cpu_pct"].notna().sum()) + 1  # the first one is NaN
    assert 1 <= record["outside_walks"] <= record["outside_reads"]


def test_sampler_stop_is_bounded_while_a_pss_read_hangs(tmp_path):
    """A smaps_rollup read that blocks (here a FIFO nobody writes) cannot hold stop() past its
    grace; the thread ends as soon as the read returns."""
    root = _fake_root(tmp_path, pids=(500,))
    fifo = root / "proc" / "500" / "smaps_rollup"
    fifo.unlink()
    os.mkfifo(fifo)
    sampler = Sampler(0.05, 1, lambda: {"vm": 500}, root=root).start()
    time.sleep(0.3)
    assert sampler.tick_count == 0 and sampler.running  # the first tick waits in the FIFO
    asked = time.monotonic()
    sampler.stop(grace_s=0.3)
    assert time.monotonic() - asked < 1.0
    assert sampler.running  # still in the read
    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # a writer comes and goes: EOF
    sampler._thread.join(5)
    assert not sampler.running


# --- fake trees -----------------------------------------------------------------------


def _fake_root(root: Path, pids: tuple[int, ...] = ()) -> Path:
    """A tree with KSM sysfs from an older kernel (no general_profit, ksm_zero_pages)."""
    ksm_dir = root / probes.KSM_SYSFS
    shutil.copytree(DATA / "ksm_sysfs", ksm_dir)
    (ksm_dir / "general_profit").unlink()
    (ksm_dir / "ksm_zero_pages").unlink()
    proc = root / "proc"
    proc.mkdir()
    shutil.copy(DATA / "meminfo.txt", proc / "meminfo")
    shutil.copy(DATA / "vmstat.txt", proc / "vmstat")
    (proc / "37").mkdir()
    shutil.copy(DATA / "ksmd_stat.txt", proc / "37" / "stat")
    for pid in pids:
        (proc / str(pid)).mkdir()
        (proc / str(pid) / "statm").write_text("1000 500 100 1 0 400 0\n")
        shutil.copy(DATA / "smaps_rollup.txt", proc / str(pid) / "smaps_rollup")
    return root


def test_sampler_fake_older_kernel_columns_absent_and_ksm_stat_nan(tmp_path):
    root = _fake_root(tmp_path, pids=(500,))
    with Sampler(0.05, 2, lambda: {"vm": 500}, root=root) as sampler:
        _wait_for_ticks(sampler, 3)
    ksm = sampler.ksm_frame()
    assert "general_profit" not in ksm.columns and "ksm_zero_pages" not in ksm.columns
    assert (ksm["pages_to_scan"] == 100).all()
    assert (ksm["ksmd_cpu_s"] == 0.0).all()
    procs = sampler.process_frame()
    assert (procs["rss_kib"] == 500 * probes.PAGE_KIB).all()
    assert procs["ksm_merging_pages"].isna().all()
    assert procs.loc[0, "pss_kib"] == 74946
    assert sampler.error_count == 0


def test_sampler_ticks_on_absolute_deadlines(tmp_path):
    root = _fake_root(tmp_path)

    def slow_targets() -> dict[str, int]:
        time.sleep(0.04)  # reads that take 40% of the interval must not shift the grid
        return {}

    with Sampler(0.1, 1, slow_targets, root=root) as sampler:
        _wait_for_ticks(sampler, 12)
    t_s = sampler.ksm_frame()["t_s"].to_numpy()
    drift_s = t_s - 0.1 * np.arange(len(t_s))
    if sampler.missed_ticks:  # a skipped slot: measure each tick from its own grid slot
        drift_s = t_s - 0.1 * np.round(t_s / 0.1)
    # A sleep(interval) loop drifts 0.04 s more every tick (median ~0.2 s here); the median,
    # and one missed tick allowed, keep a late wake-up on a loaded host from failing the test.
    assert np.median(np.abs(drift_s)) < 0.03
    assert sampler.missed_ticks <= 1


def test_sampler_overrun_skips_missed_deadlines(tmp_path):
    root = _fake_root(tmp_path)

    def very_slow_targets() -> dict[str, int]:
        time.sleep(0.15)
        return {}

    with Sampler(0.1, 1, very_slow_targets, root=root) as sampler:
        _wait_for_ticks(sampler, 6)
    steps_s = np.diff(sampler.ksm_frame()["t_s"].to_numpy())
    # Next free grid slot: 0, 0.2, 0.4, ... A catch-up burst would step 0.15 s,
    # a sleep-after-work loop 0.25 s.
    assert abs(np.median(steps_s) - 0.2) < 0.03
    assert sampler.missed_ticks >= 4


def test_sampler_failing_targets_are_recorded_and_sampling_continues(tmp_path):
    root = _fake_root(tmp_path)
    calls = 0

    def flaky_targets() -> dict[str, int]:
        nonlocal calls
        calls += 1
        if calls % 2:
            raise RuntimeError(f"lookup failed #{calls}")
        return {}

    with Sampler(0.05, 1, flaky_targets, root=root) as sampler:
        _wait_for_ticks(sampler, 6)
    assert sampler.error_count >= 3
    assert isinstance(sampler.last_error, RuntimeError)
    assert len(sampler.ksm_frame()) == sampler.tick_count  # KSM rows kept on every tick


def test_sampler_without_ksm_records_host_error_and_keeps_running(tmp_path):
    (tmp_path / "proc").mkdir()
    with Sampler(0.05, 1, dict, root=tmp_path) as sampler:
        _wait_for_ticks(sampler, 3)
        assert sampler.running
    # every tick that ran failed; a loaded host may skip grid positions (counted in tick_count)
    assert sampler.error_count == sampler.tick_count - sampler.missed_ticks >= 1
    assert isinstance(sampler.last_error, HostError)
    assert sampler.ksm_frame().empty
    assert sampler.latest() == {}


def test_sampler_frames_are_safe_to_read_while_running(tmp_path):
    root = _fake_root(tmp_path, pids=(500,))
    seen: list[int] = []
    with Sampler(0.01, 1, lambda: {"vm": 500}, root=root) as sampler:
        while sampler.tick_count < 20:
            frame = sampler.ksm_frame()
            seen.append(len(frame))
            assert len(sampler.process_frame()) >= len(frame)
    assert seen == sorted(seen) and seen[-1] > 0
    assert sampler.error_count == 0


def test_sampler_stop_returns_promptly_on_long_interval(tmp_path):
    root = _fake_root(tmp_path)
    sampler = Sampler(60.0, 1, dict, root=root).start()
    _wait_for_ticks(sampler, 1)
    thread_count = threading.active_count()
    sampler.stop(grace_s=5)  # Event.wait wakes at once; a sleep loop would block 60 s
    assert not sampler.running
    assert threading.active_count() == thread_count - 1


def test_sampler_rejects_bad_arguments_and_double_start(tmp_path):
    with pytest.raises(ValueError):
        Sampler(0, 1, dict)
    with pytest.raises(ValueError):
        Sampler(1.0, 0, dict)
    with pytest.raises(ValueError):
        Sampler(1.0, 1, dict, cpu_budget_pct=0)
    sampler = Sampler(0.05, 1, dict, root=_fake_root(tmp_path))
    with sampler:
        with pytest.raises(RuntimeError):
            sampler.start()
