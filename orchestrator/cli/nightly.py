"""Subcommands for nightly lab runs: compare, history, prune, collect, studies.

cli/main.py calls ``register_nightly_commands(subparsers)`` once; everything else is here, so the two
files change independently. Exit codes follow cli/main.py's: 0 fine, 1 the answer is "something is
wrong" (compare: a regression; collect: a host could not be collected), 2 a clear error
(OrchestratorError: not a study, studies of different plans, nothing in common, bad arguments).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from orchestrator.errors import OrchestratorError

COMPARE_HELP = """Compare study B (typically last night's) with study A (the reference) setting by setting.

For every setting both ran: saved_mib (and general_profit_mib, pss_drop_mib, mem_available_rise_mib),
ksmd_cpu_pct, time_to_90pct_s, tps and latency_p95_ms, and the within-night changes vs that night's
KSM-off trials (tps_vs_off_pct, latency_p95_ms_vs_off_pct, in points), with a 95% Welch interval
across the two studies' trials of that setting.

What the verdict can rest on:
- two studies only: nothing is known of how much nights differ, so a bad-way change beyond its
  threshold is UNCONFIRMED and the exit status stays 0;
- --history RESULTS_ROOT: B is judged against the band of the earlier nights of the same plan,
  host and setting (at least --min-nights of them), the night being the unit of replication;
- --night-sd METRIC=VALUE: the sd between nights' means of METRIC (its unit), from earlier nights.
Exit status 1 needs a headline change (--headline; default saved_mib, ksmd_cpu_pct, tps_vs_off_pct,
latency_p95_ms_vs_off_pct, per KSM-on setting) that goes the bad way beyond its threshold and
survives Holm-Bonferroni at --alpha across the headline family; everything else is reported.

Exit status: 0 no regression, 1 at least one regression, 2 error (not a study, studies of
different plans or swept axes, no setting in common, bad arguments)."""


def _night_sd(values: list[str]) -> dict[str, float]:
    import math

    from orchestrator.analysis.across.compare import check_metric_names

    out: dict[str, float] = {}
    for item in values:
        name, sep, raw = item.partition("=")
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not sep or not math.isfinite(value) or value < 0:
            raise OrchestratorError(f"--night-sd {item!r}: expected METRIC=VALUE with a finite VALUE >= 0")
        out[check_metric_names([name], "--night-sd")[0]] = value
    return out


def _nightly_section(study_dir: Path) -> Any:
    """Study B's [nightly] settings (defaults when its plan has none or cannot be read)."""
    from orchestrator.plan import NightlySection, parse_plan

    try:
        return parse_plan((study_dir / "plan.toml").read_text(), str(study_dir / "plan.toml")).nightly
    except (OSError, OrchestratorError) as exc:
        logging.getLogger("orchestrator").warning("%s: [nightly] defaults used (%s)", study_dir, exc)
        return NightlySection()


def _context(args: argparse.Namespace, study_b: Path) -> Any:
    from orchestrator.analysis.across import history
    from orchestrator.analysis.across.compare import NightContext, check_metric_names
    from orchestrator.analysis.across.nights import NightRules

    section = _nightly_section(study_b)
    try:
        rules = NightRules(
            min_nights=args.min_nights or section.min_nights,
            window=max(args.window or section.window, args.min_nights or section.min_nights),
            alpha=args.alpha or section.alpha,
            new_level_after=args.min_nights or section.min_nights,
        )
    except ValueError as exc:
        raise OrchestratorError(f"compare: {exc}") from None
    headline = check_metric_names(args.headline or section.headline, "headline")
    rows = None
    if args.history:
        root = Path(args.history)
        if not root.is_dir():
            raise OrchestratorError(f"--history {root}: no such results folder")
        rows = history.filtered(history.build_index(root).index)
    return NightContext(history=rows, night_sd=_night_sd(args.night_sd or []), rules=rules, headline=headline), section


def _thresholds(args: argparse.Namespace) -> Any:
    from orchestrator.analysis.across.compare import Thresholds

    return Thresholds(
        saving_drop_pct=args.max_saving_drop_pct,
        cpu_rise_pct=args.max_cpu_rise_pct,
        converge_rise_pct=args.max_converge_rise_pct,
        tps_drop_pct=args.max_tps_drop_pct,
        latency_rise_pct=args.max_latency_rise_pct,
    )


def _add_thresholds(p: argparse.ArgumentParser) -> None:
    from orchestrator.analysis.across.compare import Thresholds

    d = Thresholds()
    g = p.add_argument_group("thresholds (percent of study A's mean; see the rule above)")
    g.add_argument(
        "--max-saving-drop-pct",
        type=float,
        default=d.saving_drop_pct,
        metavar="PCT",
        help="for each of the four saving views (default %(default)s)",
    )
    g.add_argument(
        "--max-cpu-rise-pct",
        type=float,
        default=d.cpu_rise_pct,
        metavar="PCT",
        help="ksmd_cpu_pct (default %(default)s)",
    )
    g.add_argument(
        "--max-converge-rise-pct",
        type=float,
        default=d.converge_rise_pct,
        metavar="PCT",
        help="time_to_90pct_s (default %(default)s)",
    )
    g.add_argument(
        "--max-tps-drop-pct", type=float, default=d.tps_drop_pct, metavar="PCT", help="tps (default %(default)s)"
    )
    g.add_argument(
        "--max-latency-rise-pct",
        type=float,
        default=d.latency_rise_pct,
        metavar="PCT",
        help="latency_p95_ms (default %(default)s)",
    )


def _add_nights(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("nights (defaults: the plan's [nightly] table)")
    g.add_argument(
        "--history",
        default=None,
        metavar="RESULTS_ROOT",
        help="judge against the earlier nights of this plan and host under RESULTS_ROOT",
    )
    g.add_argument(
        "--night-sd",
        action="append",
        default=[],
        metavar="METRIC=VALUE",
        help="sd between nights' means of METRIC, in its unit (repeatable)",
    )
    g.add_argument("--min-nights", type=int, default=None, metavar="K", help="earlier nights a band needs (3)")
    g.add_argument("--window", type=int, default=None, metavar="N", help="a band uses the latest N nights (10)")
    g.add_argument("--alpha", type=float, default=None, help="family-wise error of the exit status (0.05)")
    g.add_argument(
        "--headline",
        action="append",
        default=None,
        metavar="METRIC",
        help="a metric of the gating family (repeatable; default the plan's [nightly] headline)",
    )


def _want_json(args: argparse.Namespace) -> bool:
    # cli/main.py may grow a global --json: honour it as well as ours
    return bool(getattr(args, "nightly_json", False) or getattr(args, "json", False))


def _print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


# ----------------------------------------------------------------------------- compare


def cmd_compare(args: argparse.Namespace) -> int:
    from orchestrator.analysis.across import compare
    from orchestrator.report import compare as compare_report

    a, sa, b, sb = compare.load_pair(Path(args.study_a), Path(args.study_b))
    context, _ = _context(args, Path(args.study_b))
    result = compare.compare_studies(a, sa, b, sb, _thresholds(args), context)
    if args.html:
        result.html = str(compare_report.write_compare_html(Path(args.html), a, sa, b, sb, result))
    elif not args.no_html:
        try:
            default = Path(args.study_b) / "report" / "compare.html"
            result.html = str(compare_report.write_compare_html(default, a, sa, b, sb, result))
        except OrchestratorError as exc:  # a read-only study (collected, someone else's) still compares
            logging.getLogger("orchestrator").warning("%s", exc)
    if args.json_file:
        from orchestrator.fsutil import atomic_write_json

        try:
            Path(args.json_file).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(Path(args.json_file), result.to_json())
        except OSError as exc:  # a full or read-only disk is the host's problem, not a bug (exit 2)
            raise OrchestratorError(f"cannot write {args.json_file}: {exc.strerror or exc}") from None
    if _want_json(args):
        _print_json(result.to_json())
    else:
        print_comparison(result)
    return 1 if result.regressions else 0


def print_comparison(result: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    from orchestrator.report.compare import table_rows

    out = Console(width=200)
    out.print(f"A: {result.a['path']} (host {result.a['host']}, kernel {result.a['kernel']})", highlight=False)
    out.print(f"B: {result.b['path']} (host {result.b['host']}, kernel {result.b['kernel']})", highlight=False)
    table = Table(title="change B - A per setting (95% Welch interval across trials); * headline")
    for column in ("setting", "metric", "A", "B", "change", "earlier nights' band", "threshold", "verdict", "why"):
        table.add_column(column, overflow="fold")
    colours = {"regression": "red", "suspect": "yellow", "unconfirmed": "yellow", "improvement": "green"}
    for r in table_rows(result):
        style = colours.get(r["verdict"])
        table.add_row(
            r["setting"],
            r["metric"],
            r["a"],
            r["b"],
            r["change"],
            r["band"],
            r["threshold"],
            r["verdict"],
            r["note"],
            style=style,
        )
    out.print(table)
    for note in result.notes:
        out.print(f"note: {note}", highlight=False)
    if result.only_in_a or result.only_in_b:
        out.print(
            f"not compared: only in A: {result.only_in_a or 'none'}; only in B: {result.only_in_b or 'none'}",
            highlight=False,
        )
    if result.host_diff:
        out.print("hosts/runs differ in:", highlight=False)
        for d in result.host_diff:
            out.print(f"  {d['key']}: {d['a']} -> {d['b']}", highlight=False, markup=False)
    else:
        out.print("host.json: nothing differs", highlight=False)
    out.print(
        "plan.toml: " + ("differs:\n" + result.plan_diff if result.plan_diff else "identical"),
        highlight=False,
        markup=False,
    )
    from orchestrator.analysis.across.compare import chance_sentence

    out.print(f"judged by: {result.mode}. {result.mode_rule}", highlight=False)
    out.print(f"rule: {result.rule}", highlight=False)
    out.print(f"chance: {chance_sentence(result)}", highlight=False)
    count = len(result.regressions)
    suspects = len(result.suspects) - count
    out.print(
        f"{count} regression{'s' if count != 1 else ''}"
        + (
            f", {suspects} suspect{'s' if suspects != 1 else ''} (`ksm-lab confirm` re-measures them)"
            if suspects
            else ""
        )
        + (f"; page: {result.html}" if result.html else ""),
        highlight=False,
    )


# ----------------------------------------------------------------------------- confirm


def cmd_confirm(args: argparse.Namespace) -> int:
    from orchestrator.cli import confirm

    study = Path(args.study)
    context, section = _context(args, study)
    if context.history is None:
        raise OrchestratorError("confirm needs --history RESULTS_ROOT: the band it confirms against")
    result, tonight = confirm.run_confirmation(
        study, context, _thresholds(args), max_s=args.max_s, enabled=section.confirm and not args.no_confirm
    )
    try:
        path = confirm.record(study, result)
    except OSError as exc:
        raise OrchestratorError(
            f"cannot write the confirmation record in {study}/report: {exc.strerror or exc}"
        ) from None
    if _want_json(args):
        _print_json(result.to_json())
    else:
        if result.note:
            print(f"confirm: {result.note}")
        for r in result.results:
            print(
                f"{r.setting} {r.metric}: {r.verdict.upper()} (tonight {r.tonight_pct:+.1f}, confirmation "
                f"{r.confirm_pct:+.1f} p={r.confirm_p:.2g} over {r.confirm_n} trials, combined {r.combined_pct:+.1f} "
                f"p={r.combined_p:.2g}): {r.note}"
            )
        print(f"{'CONFIRMED regression' if result.confirmed else 'no confirmed regression'}; {path}")
    return 1 if result.confirmed else 0


# ----------------------------------------------------------------------------- history


def cmd_history(args: argparse.Namespace) -> int:
    import time

    from orchestrator.analysis.across import history
    from orchestrator.report import history as history_report

    root = Path(args.results_root)
    if not root.is_dir():
        raise OrchestratorError(f"{root}: no such results folder")
    started = time.monotonic()
    built = history.build_index(root, Path(args.index) if args.index else None)
    index_s = time.monotonic() - started
    out = Path(args.out) if args.out else root / "history.html"
    rows = history.filtered(built.index, args.plan, args.host)
    tests = history.judge_page(rows, _thresholds(args))  # the page's and the JSON's flags: one walk
    history_report.write_history_html(out, built.index, root, args.plan, args.host, _thresholds(args), tests)
    page_s = time.monotonic() - started - index_s
    if _want_json(args):
        _print_json(
            {
                "index": str(built.path),
                "html": str(out),
                "studies": built.studies,
                "reread": built.reread,
                "index_s": round(index_s, 3),
                "page_s": round(page_s, 3),
                "flags": [vars(f) for f in history.flags(rows, _thresholds(args), tests=tests)],
            }
        )
    else:
        print(
            f"{built.studies} studies ({built.reread} read, the rest from the index {built.path}) "
            f"indexed in {index_s:.2f} s, page in {page_s:.2f} s: {out}"
        )
    return 0


# ----------------------------------------------------------------------------- prune


def cmd_prune(args: argparse.Namespace) -> int:
    from orchestrator.store.prune import prune

    decisions = prune(Path(args.results_root), keep=args.keep, older_than_days=args.older_than, dry_run=args.dry_run)
    if _want_json(args):
        _print_json(
            [
                {
                    "path": str(d.entry.path),
                    "plan": d.entry.name,
                    "host": d.entry.host,
                    "state": d.entry.state,
                    "remove": d.remove,
                    "why": d.why,
                }
                for d in decisions
            ]
        )
        return 0
    verb = "would remove" if args.dry_run else "removed"
    removed = [d for d in decisions if d.remove]
    for d in removed:
        print(f"{verb} {d.entry.path} ({d.entry.name} on {d.entry.host}, {d.entry.state})")
    print(f"{len(removed)} {verb}, {len(decisions) - len(removed)} kept")
    return 0


# ----------------------------------------------------------------------------- collect


def cmd_collect(args: argparse.Namespace) -> int:
    from orchestrator.store.collect import DEFAULT_REMOTE_ROOT, collect

    results = collect(
        args.hosts,
        Path(args.into),
        rsync=args.rsync,
        ssh_options=tuple(args.ssh_option or ()),
        remote_root=args.remote_root or DEFAULT_REMOTE_ROOT,
    )
    if _want_json(args):
        _print_json(
            [
                {
                    "host": r.host,
                    "collected": [str(p) for p in r.collected],
                    "skipped": [{"study": s, "why": w} for s, w in r.skipped],
                    "error": r.error,
                }
                for r in results
            ]
        )
    else:
        for r in results:
            for path in r.collected:
                print(f"{r.host}: collected {path}")
            for study, why in r.skipped:
                print(f"{r.host}: skipped {study} ({why})")
            if r.error:
                print(f"{r.host}: FAILED: {r.error}", file=sys.stderr)
            elif not r.collected:
                print(f"{r.host}: nothing new")
    return 1 if any(r.error for r in results) else 0


# ----------------------------------------------------------------------------- studies


def cmd_studies(args: argparse.Namespace) -> int:
    from orchestrator.store import catalog

    entries = catalog.scan(Path(args.results_root), args.plan, args.host)
    states = tuple(args.state) if args.state else catalog.STATES
    if args.latest:
        one = catalog.latest(entries, states, Path(args.exclude) if args.exclude else None)
        entries = [one] if one else []
    else:
        excluded = Path(args.exclude).resolve() if args.exclude else None
        entries = [e for e in entries if e.state in states and e.path.resolve() != excluded]
    if _want_json(args):
        _print_json(
            [
                {
                    "path": str(e.path),
                    "plan": e.name,
                    "host": e.host,
                    "created_wall": e.created_wall,
                    "state": e.state,
                    "trials": e.trials,
                    "failed": e.failed,
                }
                for e in entries
            ]
        )
    elif args.paths:
        for e in entries:
            print(e.path)
    else:
        for e in entries:
            print(f"{e.path}\t{e.name}\t{e.host}\t{e.state}")
    return 0 if entries or not args.latest else 1


# ----------------------------------------------------------------------------- registration


def register_nightly_commands(sub: Any) -> None:
    """Add compare, confirm, history, prune, collect and studies to cli/main.py's subparsers."""
    p = sub.add_parser(
        "compare",
        help="compare two studies of one plan: regressions, host and plan changes",
        description=COMPARE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("study_a", help="reference study folder (e.g. the last good night)")
    p.add_argument("study_b", help="study folder to judge against it (e.g. last night)")
    p.add_argument("--json", dest="nightly_json", action="store_true", help="print the comparison as JSON")
    p.add_argument("--html", default=None, help="where to write the page (default: STUDY_B/report/compare.html)")
    p.add_argument("--no-html", action="store_true", help="do not write the page")
    p.add_argument("--json-file", default=None, metavar="PATH", help="also write the JSON to this file")
    _add_nights(p)
    _add_thresholds(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "confirm",
        help="re-measure tonight's suspect regressions; exit 1 only when confirmed",
        description="Judge STUDY against the band of the earlier nights under --history (as "
        "compare does); when a headline change lies outside it the bad way, run a "
        "short confirmation study of just those settings and KSM off, blocked, inside "
        "STUDY/confirm/, bounded by the plan's [nightly] confirm_max_s. Exit 1 only "
        "when the regression is still there (the confirmation alone, after Holm "
        "across the suspects, and combined with tonight's trials); the result goes "
        "to STUDY/report/confirm.json and compare.json.",
    )
    p.add_argument("study", help="tonight's study folder")
    p.add_argument(
        "--max-s",
        type=float,
        default=None,
        metavar="S",
        help="time bound (default: the plan's [nightly] confirm_max_s)",
    )
    p.add_argument("--no-confirm", action="store_true", help="judge only: the compare verdict stands")
    p.add_argument("--json", dest="nightly_json", action="store_true")
    _add_nights(p)
    _add_thresholds(p)
    p.set_defaults(func=cmd_confirm)

    p = sub.add_parser(
        "history",
        help="index every study under a results root; write history.html",
        description="Find every study under RESULTS_ROOT (any depth), update the cached index "
        "(Parquet, re-reading only new or changed studies) and write a trend report: "
        "each metric per setting over time, kernel/QEMU/libvirt changes marked, "
        "regressions against the previous run highlighted (compare's rule).",
    )
    p.add_argument("results_root")
    p.add_argument("--plan", default=None, help="only studies of this plan (study name)")
    p.add_argument("--host", default=None, help="only studies of this host (host.json hostname)")
    p.add_argument("--out", default=None, help="page to write (default: RESULTS_ROOT/history.html)")
    p.add_argument("--index", default=None, help="index file (default: RESULTS_ROOT/.ksm-lab-history.parquet)")
    p.add_argument("--json", dest="nightly_json", action="store_true")
    _add_thresholds(p)
    p.set_defaults(func=cmd_history)

    p = sub.add_parser(
        "prune",
        help="remove old studies (never the last good one per plan and host)",
        description="Remove study folders beyond the newest N and/or older than DAYS, per plan "
        "and host. The last good study (every trial ok) and the newest study of each "
        "plan and host are always kept. Only folders with a study.json carrying a "
        "schema_version are removed; symlinks are never followed.",
    )
    p.add_argument("results_root")
    p.add_argument("--keep", type=int, default=None, metavar="N", help="keep the newest N per plan and host")
    p.add_argument("--older-than", type=float, default=None, metavar="DAYS", help="remove only studies older than this")
    p.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    p.add_argument("--json", dest="nightly_json", action="store_true")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser(
        "collect",
        help="pull new finished studies from lab hosts (rsync over SSH)",
        description="Copy finished studies from each HOST ([user@]host[:results root]) into "
        "INTO/<host>/..., verifying SSH host keys (never adding one). A study appears "
        "only once completely copied. Exit 1 when a host could not be collected.",
    )
    p.add_argument("hosts", nargs="+", metavar="HOST")
    p.add_argument("--into", required=True, help="local results root")
    p.add_argument("--remote-root", default=None, help="results root on hosts given without :path")
    p.add_argument(
        "--ssh-option",
        action="append",
        default=[],
        metavar="ARG",
        help="extra ssh argument, repeatable (e.g. --ssh-option=-p2222 --ssh-option=-iKEY)",
    )
    p.add_argument("--rsync", default="rsync", help="rsync command (default: %(default)s)")
    p.add_argument("--json", dest="nightly_json", action="store_true")
    p.set_defaults(func=cmd_collect)

    p = sub.add_parser(
        "studies",
        help="list the studies under a results root with their state",
        description="List study folders (plan, host, state: good | finished | unfinished), "
        "oldest first. Exit 1 with --latest when there is none.",
    )
    p.add_argument("results_root")
    p.add_argument("--plan", default=None)
    p.add_argument("--host", default=None)
    p.add_argument(
        "--state", action="append", choices=("good", "finished", "unfinished"), help="only these states (repeatable)"
    )
    p.add_argument("--latest", action="store_true", help="only the newest match")
    p.add_argument("--exclude", default=None, metavar="STUDY_DIR", help="leave this study out")
    p.add_argument("--paths", action="store_true", help="print paths only")
    p.add_argument("--json", dest="nightly_json", action="store_true")
    p.set_defaults(func=cmd_studies)
