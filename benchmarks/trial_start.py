"""What does it cost to start a trial's guests? Restore from a saved state vs a fresh boot.

Runs small idle studies through the real sweep (qemu:///system, the cached image) and reads
what the runner recorded per trial: for restore, restore + SSH back + clock set + identity
check (trial.json provision.start_s); for boot, define + start + first SSH (boot_wall_s).
Prints the median per guest count. Targets: a trial of 2 guests starts in under 5 s (restore);
16 small guests restored and SSH-ready in <= 20 s (issue 21), and after each study nothing left:
no domain, QEMU process, overlay or forwarded port that was not there before (PASS/FAIL each).

    .venv/bin/python benchmarks/trial_start.py --guests 1 2 3 --restores 3 --boots 1
    .venv/bin/python benchmarks/trial_start.py --guests 8 16 --restores 2 --boots 0 --memory-mib 512
    .venv/bin/python benchmarks/trial_start.py --demo    # also the demo plan's wall time both ways

Changes the host's KSM (restored afterwards) and runs guests: run it alone on the host.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.guests.ports import PortRegistry  # noqa: E402
from orchestrator.guests.provision import DEFAULT_WORK_ROOT  # noqa: E402
from orchestrator.plan import parse_plan  # noqa: E402
from orchestrator.sweep import run_sweep  # noqa: E402

URI = "qemu:///system"
MANY_GUESTS = 16
MANY_GUESTS_TARGET_S = 20.0

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
boot_timeout_s = {boot_timeout_s}
[phases]
baseline_s = 0
measure_s = 1
[sampling]
interval_s = 1.0
[sweep.ksm]
pages_to_scan = {pts}
"""


def host_state() -> dict[str, set]:
    """What guests leave behind if torn down badly: libvirt domains (running or defined), QEMU
    processes, files under the work root (overlays, console logs, uncached states), forwarded
    ports in ksm-lab's port table."""
    virsh = subprocess.run(
        ["virsh", "-c", URI, "list", "--all", "--name"], capture_output=True, text=True, timeout=60, check=True
    )
    qemus = subprocess.run(["pgrep", "-f", "qemu-system"], capture_output=True, text=True, timeout=30).stdout
    files = {str(p) for p in DEFAULT_WORK_ROOT.rglob("*")} if DEFAULT_WORK_ROOT.exists() else set()
    return {
        "domains": {n for n in virsh.stdout.split() if n},
        "qemu": set(qemus.split()),
        "work files": files,
        "ports": set(PortRegistry().held()),
    }


def left_behind(before: dict[str, set]) -> dict[str, set]:
    after = host_state()
    return {what: after[what] - before[what] for what in after if after[what] - before[what]}


def run(start: str, count: int, trials: int, memory_mib: int, results: Path) -> list[dict]:
    name = f"bench-{start}-{count}"
    # boot: every guest SSH-ready within the bound; n guests booting at once on few TCG cores
    # take about n times one guest's boot
    text = PLAN.format(
        name=name,
        count=count,
        memory_mib=memory_mib,
        start=start,
        pts=[100 + i for i in range(trials)],
        boot_timeout_s=max(600, 120 * count),
    )
    before = host_state()
    outcome = run_sweep(parse_plan(text), text, results)
    left = left_behind(before)
    print(f"  {name}: after the study, left behind: {left or 'nothing'}: {'FAIL' if left else 'PASS'}")
    if outcome.failed:
        raise SystemExit(f"{name}: {outcome.failed} trial(s) failed; see {outcome.study.path}")
    return [json.loads(p.read_text()) for p in sorted((outcome.study.path / "trials").glob("*/trial.json"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guests", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--restores", type=int, default=3, help="restored trials per guest count")
    parser.add_argument("--boots", type=int, default=1, help="booted trials per guest count (0: none)")
    parser.add_argument("--memory-mib", type=int, default=768)
    parser.add_argument("--demo", action="store_true", help="also time plans/demo.toml with restore and boot")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ksmlab-bench-") as tmp:
        results = Path(tmp)
        print(f"guest memory {args.memory_mib} MiB; idle guests; medians over trials")
        rows = []
        for count in args.guests:
            restored = run("restore", count, args.restores + 1, args.memory_mib, results)
            # The first trial also built the state (boot + save): report it apart.
            build_s = restored[0]["provision"].get("state_build_s")
            reused = [r["provision"] for r in restored if r["provision"].get("state_reused")]
            boots = (
                [r["provision"]["boot_wall_s"] for r in run("boot", count, args.boots, args.memory_mib, results)]
                if args.boots
                else []
            )
            row = {
                "count": count,
                "start": [p["start_s"] for p in reused],
                "restore": [p["restore_wall_s"] for p in reused],
                "ssh": [p["ssh_wall_s"] for p in reused],
                "teardown": [r["provision"]["teardown_s"] for r in restored if "teardown_s" in r["provision"]],
                "boot": boots,
                "build": build_s,
            }
            rows.append(row)
            print(
                f"  {count} guests: restore + SSH + check (start_s) {row['start']}, restore {row['restore']}, "
                f"SSH-ready {row['ssh']}, teardown {row['teardown']} s; state build {build_s} s"
            )
        print(
            f"\n{'guests':>6} {'start s':>8} {'restore s':>10} {'SSH-ready s':>12} {'teardown s':>11} "
            f"{'boot to SSH s':>14}  state build s"
        )
        for row in rows:

            def median(key: str) -> str:
                return f"{statistics.median(row[key]):.2f}" if row[key] else "-"

            print(
                f"{row['count']:>6} {median('start'):>8} {median('restore'):>10} {median('ssh'):>12} "
                f"{median('teardown'):>11} {median('boot'):>14}  {row['build']}"
            )
            if row["count"] == MANY_GUESTS and row["ssh"]:
                worst = max(row["ssh"])
                print(
                    f"  {MANY_GUESTS} guests restored and SSH-ready in <= {MANY_GUESTS_TARGET_S:g} s (every trial; "
                    f"slowest {worst:.2f} s): {'PASS' if worst <= MANY_GUESTS_TARGET_S else 'FAIL'}"
                )
        if args.demo:
            demo = (Path(__file__).resolve().parents[1] / "plans" / "demo.toml").read_text()
            for start in ("restore", "boot"):
                text = demo.replace('start = "restore"', f'start = "{start}"').replace(
                    'name = "demo"', f'name = "demo-{start}"'
                )
                began = time.monotonic()
                outcome = run_sweep(parse_plan(text), text, results)
                print(
                    f"demo plan, start = {start}: {time.monotonic() - began:.0f} s wall, "
                    f"{outcome.ran} trials, {outcome.failed} failed"
                )


if __name__ == "__main__":
    main()
