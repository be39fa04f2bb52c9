"""How much does the Sampler cost? Prints tick times per tier and its CPU share of one core.

Spawns N child processes that each hold M MiB of touched private anonymous memory in 4 KiB
pages (so smaps_rollup has page tables to walk), samples them for --duration-s at each
--interval-s, and prints next to it ksmd's CPU% over the same window.
Target: the sampler under 1% of one core at 1 s ticks, and with the KSM-counter tier at the
0.05 s a refilling processes workload gets ("auto", plan.fast_interval_s).

--budget: the PSS budget's targets (issue 21): 64 targets x 256 MiB and 16 x 1 GiB at the
plan's default sampling (1 s ticks, PSS every 5, cpu_budget_pct 1): the whole sampler thread
<= 1% of one core and every target's PSS no older than its bound; then the smaps_rollup cost
per GiB measured here and a model of the cost for 1 TiB of guests. Each scenario's memory is
freed before the next.

    .venv/bin/python benchmarks/sampler_overhead.py --intervals 1.0 0.2
    .venv/bin/python benchmarks/sampler_overhead.py --intervals 1.0 --fast-interval-s 0.05
    .venv/bin/python benchmarks/sampler_overhead.py --budget
    .venv/bin/python benchmarks/sampler_overhead.py --budget --shapes 64x256 --profile /tmp/sampler
"""

from __future__ import annotations

import argparse
import cProfile
import math
import os
import pstats
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.host import probes  # noqa: E402
from orchestrator.host.sampler import Sampler  # noqa: E402
from orchestrator.plan import SamplingSection  # noqa: E402

HOLDER = """
import mmap, sys
size = int(sys.argv[1]) << 20
buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
buf.madvise(mmap.MADV_NOHUGEPAGE)  # 4 KiB pages: the page-table walk's worst case
if sys.argv[2] == "1":
    buf.madvise(mmap.MADV_MERGEABLE)
    for off in range(0, size, 4096):
        buf[off:off + 8] = off.to_bytes(8, "little")  # unique pages: nothing for KSM to merge
else:
    chunk = bytes([1]) * (64 << 20)  # not mergeable: any content, written at memset speed
    for off in range(0, size, len(chunk)):
        buf[off:off + len(chunk)] = chunk[:size - off]
print("ready", flush=True)
sys.stdin.read()
"""


def spawn_holders(stack: ExitStack, count: int, mib: int, mergeable: bool) -> dict[str, int]:
    targets = {}
    for index in range(count):
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(mib), "1" if mergeable else "0"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        stack.callback(_reap, proc)
        if proc.stdout.readline().strip() != "ready":
            raise SystemExit(f"holder {index} did not start")
        targets[f"proc-{index}"] = proc.pid
    return targets


def _reap(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()


def measure(
    interval_s: float, pss_every: int, duration_s: float, targets: dict[str, int], fast_interval_s: float | None = None
) -> None:
    ksmd_pid = probes.find_ksmd_pid()
    run_before = probes.read_ksm()["run"]
    ksmd_before = probes.read_cpu_seconds(ksmd_pid) if ksmd_pid else None
    proc_cpu_before = time.process_time()
    wall_before = time.monotonic()
    with Sampler(interval_s, pss_every, lambda: targets, fast_interval_s=fast_interval_s) as sampler:
        time.sleep(duration_s)
    wall_s = time.monotonic() - wall_before
    proc_cpu_s = time.process_time() - proc_cpu_before
    ksmd_pct = float("nan")
    if ksmd_pid:
        ksmd_pct = 100 * (probes.read_cpu_seconds(ksmd_pid) - ksmd_before) / wall_s

    ksm = sampler.ksm_frame()
    rss_kib = sampler.process_frame().groupby("label")["rss_kib"].last()
    fast = f", KSM tier every {fast_interval_s:g} s" if fast_interval_s else ""
    print(
        f"\n== interval {interval_s:g} s{fast}, PSS every {pss_every} ticks, {wall_s:.1f} s wall, "
        f"{len(ksm)} ticks, {len(targets)} targets, total target RSS {rss_kib.sum() / 1024:.0f} MiB"
    )
    for name in ("ksm", "cheap", "pss"):
        tier = ksm[ksm["tier"] == name]
        if len(tier):
            print(
                f"  tick_ms {name:5s}: n={len(tier):3d} mean={tier['tick_ms'].mean():7.3f} "
                f"p95={tier['tick_ms'].quantile(0.95):7.3f} max={tier['tick_ms'].max():7.3f}"
            )
            print(f"  time in {name} ticks: {100 * tier['tick_ms'].sum() / 1000 / wall_s:.3f}% of the wall time")
    print(f"  sampler thread CPU: {sampler.cpu_s:.4f} s = {100 * sampler.cpu_s / wall_s:.3f}% of one core")
    print(f"  whole benchmark process CPU: {proc_cpu_s:.4f} s = {100 * proc_cpu_s / wall_s:.3f}% of one core")
    print(
        f"  ksmd CPU over the same window: {ksmd_pct:.3f}% of one core "
        f"(KSM run {run_before} at start, {probes.read_ksm()['run']} at end)"
    )
    print(f"  tick errors: {sampler.error_count}, missed ticks: {sampler.missed_ticks}")


BUDGET_SCENARIOS = ((64, 256), (16, 1024))  # (targets, MiB each): 16 GiB resident each


def cpu_ms(read: Callable[[], object], repeat: int = 5) -> float:
    """Median thread CPU of one call of `read`, in ms."""
    costs = []
    for _ in range(repeat):
        before = time.thread_time()
        read()
        costs.append((time.thread_time() - before) * 1000)
    return sorted(costs)[len(costs) // 2]


def smaps_cost_ms_per_gib(targets: dict[str, int], mib: int, reads: int = 3) -> float:
    """CPU time of one smaps_rollup read per GiB resident, the median over targets x reads."""
    costs = []
    for pid in list(targets.values())[:8]:
        for _ in range(reads):
            before = time.thread_time()
            probes.read_smaps_rollup(pid)
            costs.append((time.thread_time() - before) * 1000 / (mib / 1024))
    return float(sorted(costs)[len(costs) // 2])


def measure_budget(
    count: int, mib: int, duration_s: float, mergeable: bool, profile: Path | None = None
) -> dict[str, float]:
    """One scenario at the plan's default sampling; prints the budget's use and the ages.
    `profile`: run the sampler thread under cProfile, print its top functions, dump the stats
    there (the profiler's own cost inflates the CPU figures of that run)."""
    defaults = SamplingSection()
    pss_every = max(1, round(defaults.pss_interval_s / defaults.interval_s))
    with ExitStack() as stack:
        spawn_started = time.monotonic()
        targets = spawn_holders(stack, count, mib, mergeable)
        print(
            f"\n== {count} targets x {mib} MiB ({count * mib / 1024:.0f} GiB resident, spawned in "
            f"{time.monotonic() - spawn_started:.0f} s), interval {defaults.interval_s:g} s, PSS every "
            f"{pss_every} ticks, budget {defaults.cpu_budget_pct:g}% of one core, {duration_s:g} s"
        )
        per_gib_ms = smaps_cost_ms_per_gib(targets, mib)
        # a cheap tick's CPU, read as the sampler reads (files kept open): its host-wide reads,
        # and statm + ksm_stat per target
        with ExitStack() as files:
            knobs = files.enter_context(
                probes.CounterFiles(probes.ksm_file_paths(Path("/"), probes.ksm_knob_names() or ()))
            )
            host = files.enter_context(probes.CounterFiles(probes.host_counter_paths()))
            counters = [files.enter_context(probes.ProcessCounters(pid)) for pid in targets.values()]

            def host_reads() -> None:
                probes.parse_ksm_dir(knobs.read())
                texts = host.read(("meminfo", "vmstat"))
                probes.parse_meminfo(texts["meminfo"], ("MemAvailable", "MemFree", "AnonPages", "AnonHugePages"))
                probes.parse_vmstat(texts["vmstat"], probes.VMSTAT_OF_INTEREST)

            host_ms = cpu_ms(host_reads)
            per_target_ms = cpu_ms(lambda: [(c.statm(), c.ksm_stat()) for c in counters]) / count
        sampler = Sampler(
            defaults.interval_s,
            pss_every,
            lambda: targets,
            jitter_fraction=defaults.jitter_fraction,
            cpu_budget_pct=defaults.cpu_budget_pct,
        )
        profiler = profiled(sampler) if profile else None
        with sampler:
            time.sleep(duration_s)
        if profiler is not None:
            profiler.dump_stats(profile)
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        record = sampler.budget_record()
        ksm = sampler.ksm_frame()
    # the memory is freed here (ExitStack reaped the holders), before the next scenario
    cheap = ksm[ksm["tier"] != "ksm"]
    no_pss = cheap[cheap["pss_reads"] == 0]
    fixed_ms = float(no_pss["tick_ms"].median()) if len(no_pss) else float("nan")
    # the thread's CPU besides its PSS reads (the cheap tiers, the outside load, the loop), per cheap tick
    rest_ms = 1000 * (record["cpu_s"] - record["pss_read_cpu_s"]) / max(1, len(cheap))
    age_max = max(record["pss_age_max_s"].values())
    bound = record["pss_age_bound_s"]
    cpu_pct = record["cpu_pct"]
    print(f"  smaps_rollup: {per_gib_ms:.2f} ms CPU per GiB resident (4 KiB pages, median of reads)")
    print(
        f"  cheap tick without PSS: median {fixed_ms:.2f} ms wall; CPU {host_ms:.3f} ms host-wide reads + "
        f"{per_target_ms * 1000:.1f} us per target (statm, ksm_stat) = {host_ms + count * per_target_ms:.2f} ms; "
        f"the sampler's CPU besides PSS reads: {rest_ms:.2f} ms per cheap tick "
        f"({100 * rest_ms / 1000 / defaults.interval_s:.3f}% of one core)"
    )
    print(
        f"  outside-load reads {record['outside_reads']}, {record['outside_walks']} of them walked the study's "
        f"process tree"
    )
    print(
        f"  PSS reads: {record['pss_reads']} ({record['pss_floor_reads']} by the floor), "
        f"{record['pss_read_cpu_s']:.3f} s CPU; ticks {len(ksm)}, missed {sampler.missed_ticks}, "
        f"errors {sampler.error_count}"
    )
    print(
        f"  sampler thread {cpu_pct:.3f}% of one core (target <= {defaults.cpu_budget_pct:g}%): "
        f"{'PASS' if cpu_pct <= defaults.cpu_budget_pct else 'FAIL'}"
    )
    ages = sorted(record["pss_age_max_s"].values())
    print(
        f"  largest PSS age {age_max:.1f} s (median target {ages[len(ages) // 2]:.1f} s) vs bound {bound:.0f} s "
        f"(targets x pss_interval_s): {'PASS' if age_max <= bound + defaults.interval_s else 'FAIL'}"
    )
    return {
        "per_gib_ms": per_gib_ms,
        "host_ms": host_ms,
        "per_target_ms": per_target_ms,
        "rest_ms": rest_ms,
        "count": count,
    }


def profiled(sampler: Sampler) -> cProfile.Profile:
    """Wrap the sampler thread's body in a profiler (cProfile sees only its own thread)."""
    profiler = cProfile.Profile()
    run = sampler._run

    def run_profiled() -> None:
        profiler.runcall(run)

    sampler._run = run_profiled  # type: ignore[method-assign]
    return profiler


def shape(text: str) -> tuple[int, int]:
    """ "64x256": 64 targets of 256 MiB each."""
    count, sep, mib = text.partition("x")
    if not (sep and count.isdigit() and mib.isdigit() and int(count) > 0 and int(mib) > 0):
        raise argparse.ArgumentTypeError(f"not TARGETSxMIB: {text!r}")
    return int(count), int(mib)


def print_model(per_gib_ms: float, host_ms: float, per_target_ms: float, overhead: float = 1.0) -> None:
    """Extrapolate the measured costs to 1 TiB of guests at the default sampling, by the
    sampler's own rules (host/sampler.py): the floor reads one target every k PSS ticks, k the
    fewest that keep it within what the budget leaves once the cheap tier has had its share (at
    least a quarter of the budget); the budget's spare CPU reads more, at most every target once
    per PSS interval."""
    defaults = SamplingSection()
    budget_ms_per_s = defaults.cpu_budget_pct / 100 * 1000
    pss_s = defaults.pss_interval_s
    round_ms = per_gib_ms * 1024  # every target's PSS once
    print(
        f"\n== model: 1 TiB of guests at the default sampling (cheap tick {defaults.interval_s:g} s, PSS interval "
        f"{pss_s:g} s, budget {defaults.cpu_budget_pct:g}% = {budget_ms_per_s:.0f} ms CPU per s), from the costs "
        f"measured above: smaps_rollup {per_gib_ms:.2f} ms per GiB, a cheap tick ({host_ms:.3f} ms + "
        f"{per_target_ms * 1000:.1f} us per target) x {overhead:.2f} (the sampler's whole CPU besides PSS reads "
        f"over its reads alone, the largest measured)"
    )
    print(
        f"  without the budget (every target on every PSS tick): {round_ms / 1000:.1f} s CPU per PSS tick in one "
        f"burst, {100 * round_ms / 1000 / pss_s:.0f}% of one core"
    )
    for guests in (16, 64, 256):
        read_ms = per_gib_ms * 1024 / guests
        fixed_ms_per_s = overhead * (host_ms + per_target_ms * guests) / defaults.interval_s
        # the floor's share: what the budget leaves once the cheap tier has had its own, never
        # below a quarter of it (Sampler._floor_share)
        share_ms_per_s = max(budget_ms_per_s - fixed_ms_per_s, budget_ms_per_s / 4)
        k = max(1, math.ceil(read_ms / (share_ms_per_s * pss_s)))
        floor_ms_per_s = read_ms / (k * pss_s)
        pss_ms_per_s = min(round_ms / pss_s, max(budget_ms_per_s - fixed_ms_per_s, floor_ms_per_s))
        thread_pct = 100 * (fixed_ms_per_s + pss_ms_per_s) / 1000
        verdict = "PASS" if thread_pct <= defaults.cpu_budget_pct + 1e-9 else "FAIL"
        print(
            f"  {guests:3d} guests x {1024 / guests:4.0f} GiB: one read {read_ms:5.0f} ms, cheap tier "
            f"{100 * fixed_ms_per_s / 1000:.2f}%, floor every {k} PSS tick(s); thread about {thread_pct:.2f}% of "
            f"one core ({verdict}: <= {defaults.cpu_budget_pct:g}%); each PSS about every "
            f"{round_ms / pss_ms_per_s:.0f} s, bound {guests * k * pss_s:.0f} s"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--intervals", type=float, nargs="+", default=[1.0])
    parser.add_argument("--pss-every", type=int, default=5, help="PSS tier every N ticks")
    parser.add_argument(
        "--fast-interval-s", type=float, default=None, help="KSM-counter tier tick (default: the interval itself)"
    )
    parser.add_argument("--duration-s", type=float, default=30.0)
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--mib", type=int, default=256)
    # Off by default: KSM is one per host, and another run may be measuring it.
    parser.add_argument("--mergeable", action="store_true", help="MADV_MERGEABLE the holders' memory")
    parser.add_argument(
        "--budget", action="store_true", help="the budget scenarios (64 x 256 MiB, 16 x 1 GiB) and the 1 TiB model"
    )
    parser.add_argument(
        "--shapes",
        type=shape,
        nargs="+",
        default=list(BUDGET_SCENARIOS),
        metavar="NxMIB",
        help="with --budget: the scenarios, e.g. 64x256 16x1024 (the default)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="PREFIX",
        help="with --budget: cProfile the sampler thread, stats to PREFIX-NxMIB.prof",
    )
    args = parser.parse_args()
    if args.budget:
        print(f"kernel {os.uname().release}, {os.cpu_count()} CPUs")
        costs = [
            measure_budget(
                count,
                mib,
                args.duration_s,
                args.mergeable,
                None if args.profile is None else Path(f"{args.profile}-{count}x{mib}.prof"),
            )
            for count, mib in args.shapes
        ]
        # the sampler's whole CPU besides PSS reads over what its reads alone cost: rows, the loop,
        # the outside load; the model scales the reads by the largest seen
        overhead = max(c["rest_ms"] / (c["host_ms"] + c["count"] * c["per_target_ms"]) for c in costs)
        print_model(
            *(max(c[key] for c in costs) for key in ("per_gib_ms", "host_ms", "per_target_ms")),
            overhead=max(1.0, overhead),
        )
        return
    print(f"kernel {os.uname().release}, {os.cpu_count()} CPUs, holders {args.procs} x {args.mib} MiB")
    with ExitStack() as stack:
        targets = spawn_holders(stack, args.procs, args.mib, args.mergeable)
        for interval_s in args.intervals:
            measure(interval_s, args.pss_every, args.duration_s, targets, args.fast_interval_s)


if __name__ == "__main__":
    main()
