"""How much does the Sampler cost? Prints tick times per tier and its CPU share of one core.

Spawns N child processes that each hold M MiB of touched private anonymous memory
(so smaps_rollup has page tables to walk), samples them for --duration-s at each
--interval-s, and prints next to it ksmd's CPU% over the same window.
Target: the sampler under 1% of one core at 1 s ticks, and with the KSM-counter tier at the
0.05 s a refilling processes workload gets ("auto", plan.fast_interval_s).

    .venv/bin/python benchmarks/sampler_overhead.py --intervals 1.0 0.2
    .venv/bin/python benchmarks/sampler_overhead.py --intervals 1.0 --fast-interval-s 0.05
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.host import probes  # noqa: E402
from orchestrator.host.sampler import Sampler  # noqa: E402

HOLDER = """
import mmap, sys
size = int(sys.argv[1]) << 20
buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
if sys.argv[2] == "1":
    buf.madvise(mmap.MADV_MERGEABLE)
for off in range(0, size, 4096):
    buf[off:off + 8] = off.to_bytes(8, "little")  # unique pages: nothing for KSM to merge
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


def measure(interval_s: float, pss_every: int, duration_s: float, targets: dict[str, int],
            fast_interval_s: float | None = None) -> None:
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
    print(f"\n== interval {interval_s:g} s{fast}, PSS every {pss_every} ticks, {wall_s:.1f} s wall, "
          f"{len(ksm)} ticks, {len(targets)} targets, total target RSS {rss_kib.sum() / 1024:.0f} MiB")
    for name in ("ksm", "cheap", "pss"):
        tier = ksm[ksm["tier"] == name]
        if len(tier):
            print(f"  tick_ms {name:5s}: n={len(tier):3d} mean={tier['tick_ms'].mean():7.3f} "
                  f"p95={tier['tick_ms'].quantile(0.95):7.3f} max={tier['tick_ms'].max():7.3f}")
            print(f"  time in {name} ticks: {100 * tier['tick_ms'].sum() / 1000 / wall_s:.3f}% of the wall time")
    print(f"  sampler thread CPU: {sampler.cpu_s:.4f} s = {100 * sampler.cpu_s / wall_s:.3f}% of one core")
    print(f"  whole benchmark process CPU: {proc_cpu_s:.4f} s = {100 * proc_cpu_s / wall_s:.3f}% of one core")
    print(f"  ksmd CPU over the same window: {ksmd_pct:.3f}% of one core "
          f"(KSM run {run_before} at start, {probes.read_ksm()['run']} at end)")
    print(f"  tick errors: {sampler.error_count}, missed ticks: {sampler.missed_ticks}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--intervals", type=float, nargs="+", default=[1.0])
    parser.add_argument("--pss-every", type=int, default=5, help="PSS tier every N ticks")
    parser.add_argument("--fast-interval-s", type=float, default=None,
                        help="KSM-counter tier tick (default: the interval itself)")
    parser.add_argument("--duration-s", type=float, default=30.0)
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--mib", type=int, default=256)
    # Off by default: KSM is one per host, and another run may be measuring it.
    parser.add_argument("--mergeable", action="store_true", help="MADV_MERGEABLE the holders' memory")
    args = parser.parse_args()
    print(f"kernel {os.uname().release}, {os.cpu_count()} CPUs, holders {args.procs} x {args.mib} MiB")
    with ExitStack() as stack:
        targets = spawn_holders(stack, args.procs, args.mib, args.mergeable)
        for interval_s in args.intervals:
            measure(interval_s, args.pss_every, args.duration_s, targets, args.fast_interval_s)


if __name__ == "__main__":
    main()
