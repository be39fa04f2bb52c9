"""What does it cost to start a trial's guests? Restore from a saved state vs a fresh boot.

Runs small idle studies through the real sweep (qemu:///system, the cached image) and reads
what the runner recorded per trial: for restore, restore + SSH back + clock set + identity
check (trial.json provision.start_s); for boot, define + start + first SSH (boot_wall_s).
Prints the median per guest count. Target: a trial of 2 guests starts in under 5 s (restore).

    .venv/bin/python benchmarks/trial_start.py --guests 1 2 3 --restores 3 --boots 1
    .venv/bin/python benchmarks/trial_start.py --demo    # also the demo plan's wall time both ways

Changes the host's KSM (restored afterwards) and runs guests: run it alone on the host.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.plan import parse_plan  # noqa: E402
from orchestrator.sweep import run_sweep  # noqa: E402

PLAN = """
[study]
name = "{name}"
[workload]
type = "idle"
[guests]
count = {count}
memory_mib = {memory_mib}
start = "{start}"
cache_states = false
[phases]
baseline_s = 0
measure_s = 1
[sampling]
interval_s = 1.0
[sweep.ksm]
pages_to_scan = {pts}
"""


def run(start: str, count: int, trials: int, memory_mib: int, results: Path) -> list[dict]:
    name = f"bench-{start}-{count}"
    text = PLAN.format(name=name, count=count, memory_mib=memory_mib, start=start,
                       pts=[100 + i for i in range(trials)])
    outcome = run_sweep(parse_plan(text), text, results)
    if outcome.failed:
        raise SystemExit(f"{name}: {outcome.failed} trial(s) failed; see {outcome.study.path}")
    return [json.loads(p.read_text()) for p in sorted((outcome.study.path / "trials").glob("*/trial.json"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guests", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--restores", type=int, default=3, help="restored trials per guest count")
    parser.add_argument("--boots", type=int, default=1, help="booted trials per guest count")
    parser.add_argument("--memory-mib", type=int, default=768)
    parser.add_argument("--demo", action="store_true", help="also time plans/demo.toml with restore and boot")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ksmlab-bench-") as tmp:
        results = Path(tmp)
        print(f"guest memory {args.memory_mib} MiB; idle guests; medians over trials")
        print(f"{'guests':>6} {'restore start s':>16} {'(restore only)':>15} {'boot to SSH s':>14}  state build s")
        for count in args.guests:
            restored = run("restore", count, args.restores + 1, args.memory_mib, results)
            # The first trial also built the state (boot + save): report it apart.
            build_s = restored[0]["provision"].get("state_build_s")
            starts = [r["provision"]["start_s"] for r in restored if r["provision"].get("state_reused")]
            restore_only = [r["provision"]["restore_wall_s"] for r in restored if r["provision"].get("state_reused")]
            booted = run("boot", count, args.boots, args.memory_mib, results)
            boots = [r["provision"]["boot_wall_s"] for r in booted]
            print(f"{count:>6} {statistics.median(starts):>16.2f} {statistics.median(restore_only):>15.2f} "
                  f"{statistics.median(boots):>14.1f}  {build_s}")
        if args.demo:
            demo = (Path(__file__).resolve().parents[1] / "plans" / "demo.toml").read_text()
            for start in ("restore", "boot"):
                text = demo.replace('start = "restore"', f'start = "{start}"').replace(
                    'name = "demo"', f'name = "demo-{start}"')
                began = time.monotonic()
                outcome = run_sweep(parse_plan(text), text, results)
                print(f"demo plan, start = {start}: {time.monotonic() - began:.0f} s wall, "
                      f"{outcome.ran} trials, {outcome.failed} failed")


if __name__ == "__main__":
    main()
