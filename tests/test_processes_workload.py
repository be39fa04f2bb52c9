"""The synthetic processes workload: fill content, real worker processes, their lifetime.

KSM knobs are never touched here; whether pages actually merge is the lead's ksm-marked tests.
"""

from __future__ import annotations

import json
import mmap
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from orchestrator.errors import WorkloadError
from orchestrator.workloads import processes
from orchestrator.workloads._filler import CHUNK_PAGES, SAME_BYTE, Filler
from orchestrator.workloads.processes import ProcessesParams, ProcessesWorkload
from orchestrator.host import probes

PAGE = mmap.PAGESIZE
ROOT = Path(__file__).resolve().parents[1]


# -- fill content (pure, on plain numpy buffers) ----------------------------------------------------


def filled(fill: str, pages: int, round_index: int = 0, **kwargs) -> np.ndarray:
    buffer = np.full((pages, PAGE), 0xEE, dtype=np.uint8)  # anything the fills never write
    Filler(fill, PAGE, **kwargs)(buffer, round_index)
    return buffer


def distinct_pages(buffer: np.ndarray) -> int:
    return len({page.tobytes() for page in buffer})


def test_zero_fill_zeroes_every_byte():
    assert not filled("zero", 40).any()


def test_same_fill_gives_one_page_everywhere_and_across_workers():
    worker0 = filled("same", CHUNK_PAGES + 7, worker_index=0)
    worker1 = filled("same", 10, worker_index=1, seed=99)
    assert (worker0 == SAME_BYTE).all()
    assert distinct_pages(np.concatenate([worker0, worker1])) == 1


@pytest.mark.parametrize("pages, expected", [(100, 26), (CHUNK_PAGES * 2 + 3, 26), (10, 10)])
def test_fixed_random_uses_exactly_min_pages_k_patterns(pages, expected):
    assert distinct_pages(filled("fixed_random", pages, seed=5)) == expected


def test_fixed_random_honours_distinct_pages():
    assert distinct_pages(filled("fixed_random", 50, distinct_pages=3)) == 3


def test_fixed_random_is_deterministic_by_seed_and_shares_patterns_across_workers():
    first = filled("fixed_random", 60, seed=7)
    assert np.array_equal(first, filled("fixed_random", 60, seed=7))
    assert not np.array_equal(first, filled("fixed_random", 60, seed=8))
    other_worker = filled("fixed_random", 60, seed=7, worker_index=1)
    assert not np.array_equal(first, other_worker)  # placement differs per worker ...
    assert {p.tobytes() for p in first} == {p.tobytes() for p in other_worker}  # ... the patterns do not


def test_fixed_random_reshuffles_each_round():
    assert not np.array_equal(filled("fixed_random", 60, round_index=0), filled("fixed_random", 60, round_index=1))


def test_random_fill_makes_every_page_distinct_and_new_each_round():
    pages = CHUNK_PAGES + 50
    round0 = filled("random", pages, round_index=0)
    round1 = filled("random", pages, round_index=1)
    assert distinct_pages(np.concatenate([round0, round1])) == 2 * pages
    assert np.array_equal(round0, filled("random", pages, round_index=0))


@pytest.mark.parametrize("fraction, pages", [(0.3, 1000), (0.0, 40), (1.0, 40), (0.5, CHUNK_PAGES * 2 + 1)])
def test_duplicate_fraction_makes_that_share_identical_and_the_rest_unique(fraction, pages):
    buffer = filled("duplicate_fraction", pages, duplicate_fraction=fraction)
    is_same_page = (buffer == SAME_BYTE).all(axis=1)
    duplicates = round(pages * fraction)
    assert is_same_page.sum() == duplicates
    assert distinct_pages(buffer[~is_same_page]) == pages - duplicates


def test_populate_is_offered_every_page_once_in_order():
    calls = []
    buffer = np.zeros((CHUNK_PAGES * 2 + 5, PAGE), dtype=np.uint8)
    Filler("same", PAGE)(buffer, 0, populate=lambda first, count: calls.append((first, count)))
    assert calls == [(0, CHUNK_PAGES), (CHUNK_PAGES, CHUNK_PAGES), (2 * CHUNK_PAGES, 5)]


# -- parameters -----------------------------------------------------------------------------------

GOOD = dict(processes=2, pages_per_process=64, fill="same")


@pytest.mark.parametrize(
    "field, value",
    [
        ("processes", 0),
        ("processes", 1.5),
        ("processes", True),
        ("pages_per_process", 0),
        ("fill", "ones"),
        ("distinct_pages", 0),
        ("duplicate_fraction", 1.5),
        ("duplicate_fraction", -0.1),
        ("rounds", -1),
        ("round_wait_s", -1.0),
        ("round_wait_s", float("nan")),
        ("merge_mode", "auto"),
        ("cpu_pin", "odd"),
        ("cpu_pin", []),
        ("cpu_pin", [0, -1]),
        ("seed", -3),
    ],
)
def test_bad_params_raise_plan_error_naming_the_field(field, value):
    with pytest.raises(ValidationError, match=field):
        ProcessesParams(**{**GOOD, field: value})


def test_cpu_pin_list_becomes_a_tuple_and_round_robins():
    params = ProcessesParams(**GOOD, cpu_pin=[3, 1])
    assert params.cpu_pin == (3, 1)
    assert [params.cpu_for(i, [0, 1, 2, 3]) for i in range(3)] == [3, 1, 3]
    assert ProcessesParams(**GOOD, cpu_pin="alternate").cpu_for(3, {0, 1}) == 1
    assert ProcessesParams(**GOOD).cpu_for(0, [0, 1]) is None


# -- real workers ---------------------------------------------------------------------------------


def alive(pid: int) -> bool:
    """Exists and is not a zombie (a zombie holds no memory and is only waiting to be reaped)."""
    return probes.live_comm(pid) is not None


def vma_flags(pid: int, address: int) -> list[str]:
    """VmFlags of the mapping in /proc/PID/smaps that contains `address`."""
    inside = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(" ", 1)[0]
        if "-" in head and ":" not in head:
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= address < end
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    raise AssertionError(f"no mapping of pid {pid} contains {address:#x}")


def ksm_stat(pid: int) -> dict[str, str]:
    path = Path(f"/proc/{pid}/ksm_stat")
    if not path.exists():
        return {}
    return dict(line.replace(":", "").split(None, 1) for line in path.read_text().splitlines())


@pytest.fixture
def small() -> ProcessesParams:
    return ProcessesParams(processes=2, pages_per_process=256, fill="fixed_random", rounds=0, round_wait_s=0.05)


def test_workers_map_mergeable_pages_with_madvise(small):
    with ProcessesWorkload(small) as workload:
        workload.start()
        workload.wait_filled(timeout_s=60)
        pids, mappings = workload.pids(), workload.mappings()
        assert sorted(pids) == ["proc-0", "proc-1"]
        for label, pid in pids.items():
            start, length = mappings[label]
            assert length == small.pages_per_process * PAGE
            assert "mg" in vma_flags(pid, start)
            assert ksm_stat(pid).get("ksm_mergeable", "yes") == "yes"
            assert ksm_stat(pid).get("ksm_merge_any", "no") == "no"


def test_prctl_mode_makes_the_whole_process_mergeable():
    if not processes.memory_merge_supported():
        pytest.skip(f"kernel {os.uname().release} lacks PR_SET_MEMORY_MERGE")
    params = ProcessesParams(processes=1, pages_per_process=64, fill="zero", merge_mode="prctl")
    with ProcessesWorkload(params) as workload:
        workload.start()
        workload.wait_filled(timeout_s=60)
        pid = workload.pids()["proc-0"]
        assert "mg" in vma_flags(pid, workload.mappings()["proc-0"][0])
        assert ksm_stat(pid).get("ksm_merge_any", "yes") == "yes"


def test_prctl_mode_where_unsupported_raises_workload_error(monkeypatch):
    monkeypatch.setattr(processes, "memory_merge_supported", lambda: False)
    params = ProcessesParams(processes=1, pages_per_process=8, fill="zero", merge_mode="prctl")
    with ProcessesWorkload(params) as workload:
        with pytest.raises(WorkloadError, match="PR_SET_MEMORY_MERGE"):
            workload.start()
        assert workload.pids() == {}


def test_rounds_advance_then_workers_hold_their_pages():
    params = ProcessesParams(processes=2, pages_per_process=128, fill="random", rounds=4, round_wait_s=0.02)
    with ProcessesWorkload(params) as workload:
        workload.start()
        workload.wait_filled(timeout_s=60)
        assert workload.rounds_done() >= 1
        workload.wait_rounds(4, timeout_s=30)
        time.sleep(0.3)
        assert workload.rounds_done() == 4
        assert workload.is_running()
        # Every fill is reported with its wall-clock start and end, in order, per worker.
        fills = workload.fills()
        assert sorted((f["label"], f["fill"]) for f in fills) == [
            (w, n) for w in ("proc-0", "proc-1") for n in range(1, 5)
        ]
        for worker in ("proc-0", "proc-1"):
            mine = sorted((f for f in fills if f["label"] == worker), key=lambda f: f["fill"])
            assert all(f["start_wall"] <= f["end_wall"] for f in mine)
            assert all(a["end_wall"] <= b["start_wall"] for a, b in zip(mine, mine[1:]))


def test_rounds_keep_coming_until_stopped(small):
    with ProcessesWorkload(small) as workload:
        workload.start()
        workload.wait_filled(timeout_s=60)
        seen = workload.rounds_done()
        workload.wait_rounds(seen + 3, timeout_s=30)
        assert workload.rounds_done() >= seen + 3
        assert workload.is_running()  # rounds go on until stopped, not a fixed count


def test_stop_reaps_every_worker(small):
    workload = ProcessesWorkload(small)
    workload.start()
    workload.wait_filled(timeout_s=60)
    pids = list(workload.pids().values())
    assert all(alive(pid) for pid in pids)
    workload.stop(timeout_s=5)
    assert not workload.is_running()
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)  # reaped, not even zombies
    workload.stop()  # idempotent


def test_exit_reaps_even_when_the_block_raises(small):
    with pytest.raises(RuntimeError):
        with ProcessesWorkload(small) as workload:
            workload.start()
            pids = list(workload.pids().values())
            raise RuntimeError("sweep broke")
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)


def wait_gone(pids: list[int], within_s: float) -> list[int]:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline and any(alive(pid) for pid in pids):
        time.sleep(0.05)
    return [pid for pid in pids if alive(pid)]


def test_workers_die_when_the_sweep_is_sigkilled():
    parent_code = (
        "import json, time\n"
        "from orchestrator.workloads.processes import ProcessesParams, ProcessesWorkload\n"
        "w = ProcessesWorkload(ProcessesParams(processes=3, pages_per_process=256, fill='same',"
        " round_wait_s=0.05))\n"
        "w.start(); w.wait_filled(60)\n"
        "print(json.dumps(w.pids()), flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], cwd=ROOT, stdout=subprocess.PIPE)
    pids: list[int] = []
    try:
        ready, _, _ = select.select([parent.stdout], [], [], 60)
        assert ready, "parent never reported its workers"
        pids = list(json.loads(parent.stdout.readline()).values())
        assert len(pids) == 3 and all(alive(pid) for pid in pids)
        parent.kill()
        parent.wait()
        assert wait_gone(pids, within_s=5) == []
    finally:
        parent.kill()
        parent.wait()
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def start_filler(spec_overrides: dict) -> subprocess.Popen:
    spec = {
        "index": 0,
        "parent_pid": os.getpid(),
        "pages": 16,
        "fill": "same",
        "distinct_pages": 26,
        "duplicate_fraction": 0.5,
        "rounds": 0,
        "round_wait_s": 0.05,
        "merge_mode": "madvise",
        "cpu": None,
        "seed": 0,
        **spec_overrides,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator.workloads._filler", json.dumps(spec)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_parent_death_signal_alone_kills_the_worker():
    # The lifeline is held open by this test, so only PR_SET_PDEATHSIG can end the worker.
    lifeline_read, lifeline_write = os.pipe()
    spec = {
        "index": 0,
        "pages": 16,
        "fill": "same",
        "distinct_pages": 26,
        "duplicate_fraction": 0.5,
        "rounds": 0,
        "round_wait_s": 0.05,
        "merge_mode": "madvise",
        "cpu": None,
        "seed": 0,
    }
    middle_code = (
        "import json, os, subprocess, sys, time\n"
        f"spec = dict({spec!r}, parent_pid=os.getpid())\n"
        "w = subprocess.Popen([sys.executable, '-m', 'orchestrator.workloads._filler', json.dumps(spec)],"
        " stdout=subprocess.DEVNULL)\n"
        "print(w.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    middle = subprocess.Popen(
        [sys.executable, "-c", middle_code], cwd=ROOT, stdin=lifeline_read, stdout=subprocess.PIPE
    )
    os.close(lifeline_read)
    worker_pid = None
    try:
        worker_pid = int(middle.stdout.readline())
        time.sleep(1.0)  # usually past its prctl by now; if not, its parent-pid check ends it instead
        assert alive(worker_pid)
        middle.kill()
        middle.wait()
        assert wait_gone([worker_pid], within_s=5) == []
    finally:
        os.close(lifeline_write)
        middle.kill()
        middle.wait()
        if worker_pid and alive(worker_pid):
            os.kill(worker_pid, signal.SIGKILL)


def test_worker_exits_when_its_lifeline_reaches_eof():
    worker = start_filler({})
    try:
        assert worker.stdout.readline().startswith(b"mapped ")
        assert worker.stdout.readline().startswith(b"fill 1 ")
        assert worker.stdout.readline().startswith(b"round 1 ")
        worker.stdin.close()
        assert worker.wait(timeout=5) == 0
    finally:
        worker.kill()
        worker.wait()


def test_worker_whose_parent_already_died_exits_at_once():
    # The race PR_SET_PDEATHSIG cannot cover: the parent is gone before the worker asks for it.
    worker = start_filler({"parent_pid": 1})
    try:
        assert worker.wait(timeout=30) == 3
        assert worker.stdout.read() == b""
    finally:
        worker.kill()
        worker.wait()


def test_worker_reports_its_own_errors():
    worker = start_filler({"cpu": 4095})
    try:
        out = worker.stdout.read()  # stdin stays open: closing it would end the worker via its lifeline
        assert worker.wait(timeout=30) == 1
    finally:
        worker.kill()
        worker.wait()
    assert out.startswith(b"error OSError") and b"Invalid argument" in out


def test_worker_killed_from_outside_surfaces_as_workload_error(small):
    with ProcessesWorkload(small) as workload:
        workload.start()
        workload.wait_filled(timeout_s=60)
        os.kill(workload.pids()["proc-1"], signal.SIGKILL)
        with pytest.raises(WorkloadError, match=r"proc-1 \(pid \d+\) was killed by SIGKILL"):
            workload.wait_rounds(10_000, timeout_s=10)
        assert not workload.is_running()
        with pytest.raises(WorkloadError, match="proc-1"):
            workload.rounds_done()


def test_worker_out_of_memory_surfaces_as_workload_error(tmp_path):
    # A real allocation failure: the worker's address space is capped below its mapping.
    wrapper = tmp_path / "python-capped"
    wrapper.write_text(f'#!/bin/sh\nulimit -v {1536 * 1024}\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    params = ProcessesParams(processes=1, pages_per_process=(2 << 30) // PAGE, fill="zero")
    with ProcessesWorkload(params, python=str(wrapper)) as workload:
        workload.start()
        with pytest.raises(WorkloadError, match=r"proc-0 \(pid \d+\): OSError: .*Cannot allocate memory"):
            workload.wait_filled(timeout_s=60)


def test_wait_filled_times_out_with_a_clear_error():
    params = ProcessesParams(processes=1, pages_per_process=64, fill="zero")
    with ProcessesWorkload(params) as workload:
        workload.start()
        with pytest.raises(WorkloadError, match="first fill not reached within 0 s"):
            workload.wait_filled(timeout_s=0)


def test_alternate_pinning_puts_worker_i_on_cpu_i_mod_n():
    usable = sorted(os.sched_getaffinity(0))
    params = ProcessesParams(processes=3, pages_per_process=16, fill="zero", cpu_pin="alternate")
    with ProcessesWorkload(params) as workload:
        workload.start()
        workload.wait_filled(timeout_s=60)
        for i in range(3):
            assert os.sched_getaffinity(workload.pids()[f"proc-{i}"]) == {usable[i % len(usable)]}


def test_listed_cpus_are_assigned_round_robin():
    usable = sorted(os.sched_getaffinity(0))
    params = ProcessesParams(processes=2, pages_per_process=16, fill="zero", cpu_pin=[usable[-1]])
    with ProcessesWorkload(params) as workload:
        workload.start()
        workload.wait_filled(timeout_s=60)
        assert all(os.sched_getaffinity(pid) == {usable[-1]} for pid in workload.pids().values())


def test_unusable_cpu_is_refused_before_any_worker_starts():
    params = ProcessesParams(processes=1, pages_per_process=16, fill="zero", cpu_pin=[4095])
    with ProcessesWorkload(params) as workload:
        with pytest.raises(WorkloadError, match="4095"):
            workload.start()
        assert workload.pids() == {}


def test_more_memory_than_available_is_refused():
    params = ProcessesParams(processes=4, pages_per_process=(1 << 50) // PAGE, fill="zero")
    with ProcessesWorkload(params) as workload:
        with pytest.raises(WorkloadError, match="GiB is available"):
            workload.start()
