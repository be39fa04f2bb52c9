"""ksm-lab: measure what Linux KSM saves and costs, study by study and night by night.

Run as `ksm-lab` (the installed command) or `python -m orchestrator`: the same program.

Exit codes:
  0    success
  1    some trials failed, or `check` found the host not ready
  2    a clear error, named in one line: bad plan, host not usable, study folder exists, ...
  3    an unexpected error (a bug): one line here, the traceback in the study's sweep.log
       (or in a ksm-lab-error-*.log under the results folder)
  130  interrupted by SIGINT, 143 by SIGTERM (128 + signal, as a shell reports it): the host
       is restored and what was measured is kept; finish with `sweep --resume`

libvirt is reached as virsh users expect: -c/--connect URI, else $LIBVIRT_DEFAULT_URI, else
the plan's [guests] uri, else qemu:///system. stdout holds a command's result (a table, a
path, or with --json one JSON document); log lines and progress go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from orchestrator import __version__
from orchestrator.cli import runlog
from orchestrator.errors import OrchestratorError
from orchestrator.cli.runlog import console

PROG = "ksm-lab"
EXIT_OK, EXIT_FAILED, EXIT_ERROR, EXIT_BUG = 0, 1, 2, 3
from orchestrator.analysis.design import add_command as add_design_command
from orchestrator.analysis.recommend import add_command as add_recommend_command
from orchestrator.units import MIB, NO_VALUE, number

log = logging.getLogger("orchestrator")
phase_log = logging.getLogger(runlog.PROGRESS_LOGGER)

DEFAULT_RESULTS = Path(os.environ.get("KSM_LAB_RESULTS", "results"))


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


class RichProgress:
    """Trials bar + current phase, driven by the sweep through start_trial/phase/advance."""

    def __init__(self, total: int) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
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
        phase_log.info("phase %s (%s)", name, self.current)
        self.progress.update(self.task, description=f"{self.current} [{name}]")

    def advance(self, trial: Any, status: str) -> None:
        if status != "ok":
            log.warning("trial %s: %s", trial.trial_id, status)
        self.progress.advance(self.task)

    def add_trials(self, count: int) -> None:
        """Reruns join the study as it runs: the bar's total grows, never reads 10/8."""
        total = self.progress.tasks[self.task].total or 0
        self.progress.update(self.task, total=total + count)


def study_summary(study_dir: Path) -> dict[str, Any]:
    """What a script wants to know about a study folder: where things are, each trial's status."""
    from orchestrator.store.study import Study

    study = Study(Path(study_dir))
    records = study.trial_records()
    log_path = study.path / runlog.STUDY_LOG_NAME
    return {
        "study": str(study.path.resolve()),
        "name": study.meta().get("name"),
        "trials_csv": str((study.path / "trials.csv").resolve()),
        "log": str(log_path.resolve()) if log_path.exists() else None,
        "status_counts": dict(Counter(r.status for r in records)),
        "trials": [{"trial_id": r.trial_id, "label": r.label, "status": r.status, "reason": r.reason} for r in records],
    }


# -- subcommands ------------------------------------------------------------------------------


def _with_uri(plan: Any, connect: str | None) -> Any:
    """The plan with [guests] uri replaced when -c or $LIBVIRT_DEFAULT_URI names another."""
    from orchestrator.guests.hostsetup import libvirt_uri

    if plan.guests is None:
        if connect:
            log.info("--connect %s ignored: this plan runs no guests", connect)
        return plan
    uri = libvirt_uri(connect, plan.guests.uri)
    if uri == plan.guests.uri:
        return plan
    return plan.model_copy(update={"guests": plan.guests.model_copy(update={"uri": uri})})


def _dry_run(plan: Any, trials: list[Any], as_json: bool) -> int:
    if as_json:
        _print_json(
            {
                "name": plan.study.name,
                "workload": plan.workload.type,
                "uri": plan.guests.uri if plan.guests else None,
                "trials": [
                    {
                        "index": t.index,
                        "trial_id": t.trial_id,
                        "label": t.label,
                        "ksm_off": t.ksm_off,
                        "ksm": t.ksm,
                        "settings": t.settings,
                    }
                    for t in trials
                ],
            }
        )
        return EXIT_OK
    where = f", guests via {plan.guests.uri}" if plan.guests else ""
    table = Table(title=f"study '{plan.study.name}': {len(trials)} trials ({plan.workload.type}{where})")
    for column in ("#", "trial_id", "setting", "ksm knobs"):
        table.add_column(column, overflow="fold")
    for t in trials:
        knobs = "run=0 (KSM off)" if t.ksm_off else " ".join(f"{k}={v}" for k, v in t.ksm.items())
        table.add_row(str(t.index), t.trial_id, t.label, knobs)
    Console().print(table)
    return EXIT_OK


def cmd_sweep(args: argparse.Namespace) -> int:
    from orchestrator.plan import expand, load_plan

    plan, plan_text = load_plan(args.plan)
    plan = _with_uri(plan, args.connect)
    trials = expand(plan)
    if args.dry_run:
        return _dry_run(plan, trials, args.json)

    from orchestrator.sweep import run_sweep

    def open_log(study: Any) -> None:
        path = runlog.open_study_log(study.path)
        log.info(
            "ksm-lab %s: sweep %s (%d trials) -> %s; log %s", __version__, args.plan, len(trials), study.path, path
        )

    outcome = run_sweep(
        plan, plan_text, Path(args.results), resume=args.resume, progress_factory=RichProgress, on_study=open_log
    )
    study_dir = outcome.study.path
    log.info(
        "study %s: %d ran, %d skipped (already finished), %d failed",
        study_dir,
        outcome.ran,
        outcome.skipped,
        outcome.failed,
    )
    html = None
    if not args.no_report:
        from orchestrator.report.study import write_report

        try:
            html = write_report(study_dir, outcome.analysis)  # the sweep's analysis, not computed again
            log.info("report: %s", html)
        except OrchestratorError as exc:
            log.error("report failed: %s", exc)
    if outcome.interrupted:
        signum = outcome.stop_signal or signal.SIGINT
        log.warning(
            "interrupted by %s: resume with `%s sweep %s --resume`", signal.Signals(signum).name, PROG, args.plan
        )
        code = 128 + signum
    else:
        code = EXIT_FAILED if outcome.failed else EXIT_OK
    if args.json:
        _print_json(
            {
                **study_summary(study_dir),
                "report": str(html) if html else None,
                "ran": outcome.ran,
                "skipped": outcome.skipped,
                "failed": outcome.failed,
                "reruns": outcome.reruns,
                "interrupted": outcome.interrupted,
                "signal": signal.Signals(outcome.stop_signal).name if outcome.stop_signal else None,
                "exit_code": code,
            }
        )
    else:
        print(study_dir / "trials.csv")
    return code


def cmd_check(args: argparse.Namespace) -> int:
    from orchestrator.preflight import ready, run_checks

    results = run_checks(Path(args.plan) if args.plan else None, connect=args.connect)
    is_ready = ready(results)
    if args.json:
        _print_json(
            {
                "ready": is_ready,
                "checks": [{"name": r.name, "ok": r.ok, "blocking": r.blocking, "detail": r.detail} for r in results],
            }
        )
    else:
        table = Table(title="ksm-lab preflight")
        for column in ("check", "ok", "detail"):
            table.add_column(column)
        for r in results:
            verdict = (
                "[green]yes[/green]" if r.ok else ("[red]NO[/red]" if r.blocking else "[yellow]no[/yellow] (info)")
            )
            # Details quote sysfs ("always [madvise] never"): not rich markup.
            table.add_row(r.name, verdict, escape(r.detail))
        Console().print(table)
    return EXIT_OK if is_ready else EXIT_FAILED


def _quiet_host(action: str):
    """The host lock, so that `restore` and `cleanup` never act under a running sweep."""
    import contextlib

    from orchestrator.errors import LockError
    from orchestrator.host.ksm import host_lock

    @contextlib.contextmanager
    def held():
        try:
            with host_lock():
                yield
        except LockError as exc:
            raise LockError(f"not {action} while a sweep runs: {exc}") from None

    return held()


def cmd_restore(args: argparse.Namespace) -> int:
    from orchestrator.host.ksm import restore_from_record
    from orchestrator.policies.ksmtuned import stop_left_behind

    with _quiet_host("restoring KSM knobs"):
        # A ksmtuned left running would rewrite the knobs after they are put back.
        for line in stop_left_behind(Path(args.study_dir)):
            print(f"stopped {line}")
        restored = restore_from_record(Path(args.study_dir) / "settings-record.json")
    for line in restored:
        print(f"restored {line}")
    if not restored:
        print("nothing to restore")
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from orchestrator.report.study import write_report

    html = write_report(Path(args.study_dir))
    if args.json:
        _print_json({**study_summary(Path(args.study_dir)), "report": str(html)})
    else:
        print(html)
    return EXIT_OK


def cmd_cleanup(args: argparse.Namespace) -> int:
    from orchestrator.guests import images, states
    from orchestrator.guests.hostsetup import libvirt_uri
    from orchestrator.guests.cleanup import cleanup

    with _quiet_host("cleaning up guests"):
        removed = cleanup(libvirt_uri(args.connect), study=args.study)
        for name in removed:
            print(f"removed {name}")
        # Saved states half-written by a killed sweep (complete ones stay: they are the cache).
        for root in states.all_roots(images.default_cache_dir()):
            for path in states.remove_stale_builds(root):
                removed.append(str(path))
                print(f"removed unfinished saved state {path}")
    if not removed:
        print("nothing left behind")
    return EXIT_OK


def _image_json(ref: Any) -> dict[str, Any]:
    disk = Path(ref.disk_path)
    return {
        "key": ref.key,
        "name": ref.name,
        "manifest": ref.manifest_path,
        "disk": disk,
        "disk_bytes": disk.stat().st_size if disk.exists() else None,
        "recipe_hash": ref.recipe_hash,
        "kernel": ref.kernel_path,
        "ssh_user": ref.ssh_user,
    }


def cmd_image(args: argparse.Namespace) -> int:
    from orchestrator.guests import images, states

    cache = Path(args.cache_dir) if args.cache_dir else None
    if args.image_cmd == "build":
        started = time.monotonic()
        ref = images.resolve_image({"recipe": args.recipe}, cache_dir=cache)
        log.info("image %s ready in %.1f s", ref.key, time.monotonic() - started)
        print(ref.manifest_path)
    elif args.image_cmd == "list":
        refs = images.list_images(cache)
        saved_sets = [
            saved
            for root in states.all_roots(cache or images.default_cache_dir())
            for saved in states.list_states(root)
        ]
        if args.json:
            _print_json(
                {
                    "cache_dir": cache or images.default_cache_dir(),
                    "images": [_image_json(ref) for ref in refs],
                    "states": [
                        {"key": s.key, "folder": s.folder, "size_bytes": s.size_bytes, "guests": len(s.guests)}
                        for s in saved_sets
                    ],
                }
            )
            return EXIT_OK
        for ref in refs:
            size_mib = number(ref.disk_path.stat().st_size / MIB) if ref.disk_path.exists() else NO_VALUE
            print(f"{ref.key}\t{size_mib} MiB\t{ref.manifest_path}")
        if not refs:
            print(f"no images in {cache or images.default_cache_dir()}")
        for saved in saved_sets:
            print(f"state {saved.key}\t{saved.size_bytes / MIB:.0f} MiB\t{len(saved.guests)} guest(s)\t{saved.folder}")
    elif args.image_cmd == "rm":
        roots = [r for r in states.all_roots(cache or images.default_cache_dir()) if (r / args.key).is_dir()]
        if roots:  # a saved guest state's key
            states.remove(roots[0], args.key)
        else:
            images.remove_image(cache or images.default_cache_dir(), args.key)
        print(f"removed {args.key}")
    return EXIT_OK


def cmd_host(args: argparse.Namespace) -> int:
    from orchestrator.guests import hostsetup

    print(hostsetup.setup_host(stop=args.host_cmd == "stop"), end="")
    return EXIT_OK


def _connect_option(parser: argparse.ArgumentParser, *aliases: str, what: str, plan: bool) -> None:
    fallback = "$LIBVIRT_DEFAULT_URI, else " + ("the plan's [guests] uri, else " if plan else "")
    parser.add_argument(
        "-c",
        "--connect",
        *aliases,
        dest="connect",
        metavar="URI",
        default=None,
        help=f"libvirt URI {what} (default: {fallback}qemu:///system)",
    )


def _json_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--json", action="store_true", help=f"print {what} as JSON on stdout")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.splitlines()[0],
        epilog="exit codes: 0 ok, 1 trials failed / host not ready, 2 clear "
        "error, 3 unexpected error, 130 SIGINT, 143 SIGTERM",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sweep", help="run a study plan")
    p.add_argument("plan")
    p.add_argument("--results", default=str(DEFAULT_RESULTS), help="results folder (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="finish an interrupted study: skip finished trials")
    p.add_argument("--dry-run", action="store_true", help="print the trials, touch nothing")
    p.add_argument("--no-report", action="store_true", help="do not write report.html at the end")
    _connect_option(p, what="the guests run at", plan=True)
    _json_option(p, "the study summary (or with --dry-run the trials)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("check", help="preflight: is this host ready (for this plan)?")
    p.add_argument("plan", nargs="?")
    _connect_option(p, what="to probe", plan=True)
    _json_option(p, "the checks")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("restore", help="restore host knobs from a study's settings record (after SIGKILL)")
    p.add_argument("study_dir")
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("report", help="write report.html for a study folder")
    p.add_argument("study_dir")
    _json_option(p, "the study summary")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("cleanup", help="remove guests, overlays left by a killed sweep (ours only)")
    _connect_option(p, "--uri", what="to clean up", plan=False)
    p.add_argument("--study", default=None, help="only this study's guests")
    p.set_defaults(func=cmd_cleanup)

    p = sub.add_parser("image", help="guest base images (cached by recipe hash)")
    p.add_argument("--cache-dir", default=None)
    isub = p.add_subparsers(dest="image_cmd", required=True)
    b = isub.add_parser("build", help="build a recipe's image (a shipped recipe's name, or a path)")
    b.add_argument("recipe", nargs="?", default="debian-sysbench")
    ls = isub.add_parser("list", help="the cached images")
    _json_option(ls, "the images")
    r = isub.add_parser("rm", help="remove one cached image")
    r.add_argument("key")
    p.set_defaults(func=cmd_image, json=False)

    p = sub.add_parser("host", help="make this host ready for VMs (packages, libvirtd)")
    hsub = p.add_subparsers(dest="host_cmd", required=True)
    hsub.add_parser("setup")
    hsub.add_parser("stop", help="stop the daemons `host setup` started (by pid)")
    p.set_defaults(func=cmd_host)

    add_recommend_command(sub)
    add_design_command(sub)
    # -- nightly lab runs: compare, history, prune, collect, studies (orchestrator/cli/nightly.py)
    from orchestrator.cli.nightly import register_nightly_commands

    register_nightly_commands(sub)
    # -- the host as a level: fleet (orchestrator/cli/fleet.py)
    from orchestrator.cli.fleet import register_fleet_command

    register_fleet_command(sub)
    return parser


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _crash_folder(args: argparse.Namespace) -> Path:
    """Where a traceback goes when no sweep.log is open: the study or results folder."""
    study_dir = getattr(args, "study_dir", None)
    if study_dir and Path(study_dir).is_dir():
        return Path(study_dir)
    return Path(getattr(args, "results", None) or DEFAULT_RESULTS)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    runlog.setup(args.verbose)
    try:
        return int(args.func(args) or EXIT_OK)
    except OrchestratorError as exc:
        console.print("[bold red]error:[/bold red]", end=" ")
        console.print(str(exc), markup=False, highlight=False, soft_wrap=True)
        runlog.to_study_log(logging.ERROR, f"error: {exc}")
        return EXIT_ERROR
    except KeyboardInterrupt:
        console.print("interrupted")
        runlog.to_study_log(logging.WARNING, "interrupted")
        return 128 + signal.SIGINT
    except BrokenPipeError:
        # The reader of stdout went away (`| head`): not a bug. Quiet, as if killed by SIGPIPE.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except OSError as exc:
        # The host refused a read or write (a full disk, a read-only mount, a file removed under
        # us): a clear error about the environment, not a bug. What was measured is already stored.
        where = f" {exc.filename}" if exc.filename else ""
        message = f"error: cannot use{where}: {exc.strerror or exc}"
        console.print(message, markup=False, highlight=False, soft_wrap=True)
        runlog.to_study_log(logging.ERROR, message)
        return EXIT_ERROR
    except Exception as exc:  # a bug: one line here, the traceback kept for the report
        try:
            where = f"traceback in {runlog.save_traceback(_crash_folder(args), [PROG, *argv])}"
        except OSError:
            where = "traceback could not be saved"
        console.print(
            f"error: unexpected {type(exc).__name__}: {_one_line(str(exc))} ({where})",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        return EXIT_BUG
    finally:
        runlog.close_study_log()


if __name__ == "__main__":
    sys.exit(main())
