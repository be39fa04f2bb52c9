"""Command line: sweep, check, restore, cleanup, image, host, report.

Exit codes: 0 success; 1 `check` found the host not ready, or some trials failed; 2 a clear
error (bad plan, host not usable, ...); 130 interrupted by SIGINT/SIGTERM (data kept).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from orchestrator.errors import OrchestratorError

log = logging.getLogger("orchestrator")
console = Console(stderr=True)

DEFAULT_RESULTS = Path(os.environ.get("KSM_LAB_RESULTS", "results"))


def _setup_logging(verbose: bool) -> None:
    handler = RichHandler(console=console, show_path=False, rich_tracebacks=False, markup=False)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler],
                        format="%(message)s", datefmt="[%X]", force=True)
    for noisy in ("paramiko", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class RichProgress:
    """Trials bar + current phase, driven by the sweep through start_trial/phase/advance."""

    def __init__(self, total: int) -> None:
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=console, transient=False)
        self.task = self.progress.add_task("trials", total=total)
        self.current = ""

    def __enter__(self) -> "RichProgress":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def start_trial(self, trial: Any) -> None:
        self.current = trial.label
        log.info("trial %s: %s", trial.trial_id, trial.label)
        self.progress.update(self.task, description=f"{trial.label}")

    def phase(self, name: str) -> None:
        self.progress.update(self.task, description=f"{self.current} [{name}]")

    def advance(self, trial: Any, status: str) -> None:
        if status != "ok":
            log.warning("trial %s: %s", trial.trial_id, status)
        self.progress.advance(self.task)


# -- subcommands ------------------------------------------------------------------------------


def cmd_sweep(args: argparse.Namespace) -> int:
    from orchestrator.plan import expand, load_plan

    plan, plan_text = load_plan(args.plan)
    trials = expand(plan)
    if args.dry_run:
        table = Table(title=f"study '{plan.study.name}': {len(trials)} trials ({plan.workload.type})")
        for column in ("#", "trial_id", "setting", "ksm knobs"):
            table.add_column(column, overflow="fold")
        for t in trials:
            knobs = "run=0 (KSM off)" if t.ksm_off else " ".join(f"{k}={v}" for k, v in t.ksm.items())
            table.add_row(str(t.index), t.trial_id, t.label, knobs)
        Console().print(table)
        return 0

    from orchestrator.sweep import run_sweep

    outcome = run_sweep(plan, plan_text, Path(args.results), resume=args.resume, progress_factory=RichProgress)
    study_dir = outcome.study.path
    log.info("study %s: %d ran, %d skipped (already finished), %d failed", study_dir,
             outcome.ran, outcome.skipped, outcome.failed)
    if not args.no_report:
        from orchestrator.report import write_report

        try:
            html = write_report(study_dir)
            log.info("report: %s", html)
        except OrchestratorError as exc:
            log.error("report failed: %s", exc)
    print(study_dir / "trials.csv")
    if outcome.interrupted:
        log.warning("interrupted: resume with `python -m orchestrator sweep %s --resume`", args.plan)
        return 130
    return 1 if outcome.failed else 0


def cmd_check(args: argparse.Namespace) -> int:
    from orchestrator.preflight import ready, run_checks

    results = run_checks(Path(args.plan) if args.plan else None)
    table = Table(title="ksm-lab preflight")
    for column in ("check", "ok", "detail"):
        table.add_column(column)
    for r in results:
        verdict = "[green]yes[/green]" if r.ok else ("[red]NO[/red]" if r.blocking else "[yellow]no[/yellow] (info)")
        table.add_row(r.name, verdict, r.detail)
    Console().print(table)
    return 0 if ready(results) else 1


def cmd_restore(args: argparse.Namespace) -> int:
    from orchestrator.ksm import restore_from_record

    restored = restore_from_record(Path(args.study_dir) / "settings-record.json")
    for line in restored:
        print(f"restored {line}")
    if not restored:
        print("nothing to restore")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from orchestrator.report import write_report

    print(write_report(Path(args.study_dir)))
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    from orchestrator.provision import cleanup

    removed = cleanup(args.uri, study=args.study)
    for name in removed:
        print(f"removed {name}")
    if not removed:
        print("nothing left behind")
    return 0


def cmd_image(args: argparse.Namespace) -> int:
    from orchestrator import images

    cache = Path(args.cache_dir) if args.cache_dir else None
    if args.image_cmd == "build":
        started = time.monotonic()
        ref = images.resolve_image({"recipe": args.recipe}, cache_dir=cache)
        log.info("image %s ready in %.1f s", ref.key, time.monotonic() - started)
        print(ref.manifest_path)
    elif args.image_cmd == "list":
        refs = images.list_images(cache)
        for ref in refs:
            size_mib = ref.disk_path.stat().st_size / 2**20 if ref.disk_path.exists() else float("nan")
            print(f"{ref.key}\t{size_mib:.0f} MiB\t{ref.manifest_path}")
        if not refs:
            print(f"no images in {cache or images.default_cache_dir()}")
    elif args.image_cmd == "rm":
        images.remove_image(cache or images.default_cache_dir(), args.key)
        print(f"removed {args.key}")
    return 0


def cmd_host(args: argparse.Namespace) -> int:
    from orchestrator import hostsetup

    print(hostsetup.setup_host(stop=args.host_cmd == "stop"), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m orchestrator", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sweep", help="run a study plan")
    p.add_argument("plan")
    p.add_argument("--results", default=str(DEFAULT_RESULTS), help="results folder (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="finish an interrupted study: skip finished trials")
    p.add_argument("--dry-run", action="store_true", help="print the trials, touch nothing")
    p.add_argument("--no-report", action="store_true", help="do not write report.html at the end")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("check", help="preflight: is this host ready (for this plan)?")
    p.add_argument("plan", nargs="?")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("restore", help="restore host knobs from a study's settings record (after SIGKILL)")
    p.add_argument("study_dir")
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("report", help="write report.html for a study folder")
    p.add_argument("study_dir")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("cleanup", help="remove guests, overlays left by a killed sweep (ours only)")
    p.add_argument("--uri", default="qemu:///system")
    p.add_argument("--study", default=None, help="only this study's guests")
    p.set_defaults(func=cmd_cleanup)

    p = sub.add_parser("image", help="guest base images (cached by recipe hash)")
    p.add_argument("--cache-dir", default=None)
    isub = p.add_subparsers(dest="image_cmd", required=True)
    b = isub.add_parser("build")
    b.add_argument("recipe", nargs="?", default="debian-sysbench")
    isub.add_parser("list")
    r = isub.add_parser("rm")
    r.add_argument("key")
    p.set_defaults(func=cmd_image)

    p = sub.add_parser("host", help="make this host ready for VMs (packages, libvirtd)")
    hsub = p.add_subparsers(dest="host_cmd", required=True)
    hsub.add_parser("setup")
    hsub.add_parser("stop", help="stop the daemons `host setup` started (by pid)")
    p.set_defaults(func=cmd_host)

    # -- nightly lab runs: compare, history, prune, collect, studies (orchestrator/nightly_cli.py)
    from orchestrator.nightly_cli import register_nightly_commands
    register_nightly_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except OrchestratorError as exc:
        console.print("[bold red]error:[/bold red]", end=" ")
        console.print(str(exc), markup=False, highlight=False)
        return 2
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
