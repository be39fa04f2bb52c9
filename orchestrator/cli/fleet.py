"""`ksm-lab fleet ROOT --plan NAME`: the latest good study of each host, per host and pooled with
the host as the level of replication (analysis/across/fleet.py). cli/main.py calls
``register_fleet_command(subparsers)``. Exit 0 with a summary, 2 on a clear error (no studies, an
unknown plan, a single host)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

FLEET_HELP = """Summarise the latest good study (every trial ok) of plan NAME on each host under
RESULTS_ROOT (`collect` writes RESULTS_ROOT/<host>/...; the host is host.json's hostname).

Per host and KSM-on setting: saved_mib, ksmd_cpu_pct and the within-study changes vs KSM off
(tps_vs_off_pct, latency_p95_ms_vs_off_pct), each with that study's own interval.
Pooled: the mean of the per-host values with a 95% t interval at hosts - 1 df (the host is the
unit of replication; the trials of all hosts are never pooled). With fewer than 3 hosts the
per-host values are given and no fleet interval. The host that differs most per setting and
metric is named (leave-one-out: distance from the other hosts' mean in units of their spread),
and what differs between the hosts' host.json (kernel, CPU, memory, QEMU, libvirt).

Exit status: 0 a summary, 2 error (no studies, unknown plan, one host)."""


def cmd_fleet(args: argparse.Namespace) -> int:
    from orchestrator.analysis.across import fleet

    result = fleet.summarise(Path(args.results_root), args.plan)
    if getattr(args, "fleet_json", False):
        json.dump(result.to_json(), sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        print_fleet(result)
    return 0


def _cell(value: float, half: float, n: int, method: str) -> str:
    text = f"{value:.4g}" + (f" ± {half:.2g}" if math.isfinite(half) else "")
    return text + (f" (n={n}, {method})" if n else "")


def _date(wall: float) -> str:
    return datetime.fromtimestamp(wall, timezone.utc).strftime("%Y-%m-%d %H:%M UTC") if wall else "?"


def print_fleet(result: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    from orchestrator.analysis.across.fleet import sentence

    out = Console(width=200)
    out.print(
        f"plan {result.plan} under {result.root}: latest good study of {len(result.hosts)} hosts",
        highlight=False,
        markup=False,
    )
    for h in result.hosts:
        out.print(f"  {h.host}: {h.path} ({_date(h.created_wall)}, kernel {h.kernel})", highlight=False, markup=False)
    for s in result.skipped:
        out.print(f"  {s['host']}: left out: {s['why']}", highlight=False, markup=False)
    hosts = [h.host for h in result.hosts]
    table = Table(title="per host: each study's value ± its own 95% interval; fleet: mean ± host-level 95% interval")
    for column in ("setting", "metric", *hosts, "fleet", "differs most"):
        table.add_column(column, overflow="fold")
    for m in result.metrics:
        by_host = {h.host: h for h in m.hosts}
        cells = [
            _cell(by_host[h].value, by_host[h].half, by_host[h].n, by_host[h].method) if h in by_host else "-"
            for h in hosts
        ]
        fleet_cell = (
            f"{m.mean:.4g}" + (f" ± {m.half:.2g} ({m.n_hosts} hosts)" if math.isfinite(m.half) else "")
            if math.isfinite(m.mean)
            else "no fleet interval"
        )
        most = ""
        if m.differs_most:
            h = by_host[m.differs_most]
            most = f"{h.host} (z {h.z:+.1f}{', stands out' if h.stands_out else ''})"
        table.add_row(m.setting, m.metric, *cells, fleet_cell, most, style="yellow" if "stands out" in most else None)
    out.print(table)
    for m in result.metrics:
        out.print(sentence(m), highlight=False, markup=False)
    if result.standing_out:
        for s in result.standing_out:
            own = "; ".join(f"{d['key']} {d['value']} (others {', '.join(d['others'])})" for d in s["differs_in"])
            out.print(
                f"{s['host']} stands out in {s['setting']} {s['metric']} (z {s['z']:+.1f}, p {s['p']:.2g}, "
                f"Holm over {result.family_size}); its own host.json values: {own or 'none'}",
                highlight=False,
                markup=False,
            )
    elif result.family_size:
        out.print(f"no host stands out (Holm over {result.family_size} leave-one-out distances)", highlight=False)
    if result.host_diff:
        out.print("hosts differ in (host.json):", highlight=False)
        for d in result.host_diff:
            values = ", ".join(f"{h}={v}" for h, v in d["values"].items())
            out.print(f"  {d['key']}: {values}", highlight=False, markup=False)
    else:
        out.print("host.json: nothing differs between the hosts but their names", highlight=False)
    out.print(f"rule: {result.rule}", highlight=False, markup=False)


def register_fleet_command(sub: Any) -> None:
    p = sub.add_parser(
        "fleet",
        help="a plan's latest good study on each host: per host and pooled (host-level interval)",
        description=FLEET_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("results_root")
    p.add_argument("--plan", required=True, metavar="NAME", help="the plan's study name")
    p.add_argument("--json", dest="fleet_json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_fleet)
