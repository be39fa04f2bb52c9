"""The host as a level of replication: what a KSM setting does across a fleet of lab hosts.

Per host the latest good study of the plan (catalog: every trial ok, date trusted) gives, per
KSM-on setting, the headline metrics (compare.HEADLINE: saved_mib, ksmd_cpu_pct and the
within-study changes vs KSM off, tps_vs_off_pct and latency_p95_ms_vs_off_pct, exactly as
studymetrics computes them) with that study's own interval (across its trials or blocks).

Pooled across hosts, the host is the unit, as nights.py makes the night the unit: one value per
host (that host's study-level value), their mean, and the 95% t interval of that mean with
hosts - 1 degrees of freedom (stats.mean_ci95 over the per-host values). Everything one host's
trials share (its CPU, kernel, memory, the guests' placement) moves all of them together, so
the trials of all hosts pooled are not replicates of the fleet: their interval would shrink with
trials while the hosts still differ (tests/test_fleet.py's simulation shows it missing the fleet
mean). With fewer than MIN_HOSTS hosts the per-host values are given and no fleet interval.
Hosts whose values are all equal give "no spread between hosts measured", never a zero-width
interval.

Which hosts differ most (leave-one-out): for each host i of k, the other k-1 hosts' mean m and
sd s (floored at the metric's resolution) predict one more host as m +- t(k-2) s sqrt(1 + 1/(k-1))
(the prediction interval nights.py uses for one more night); host i's standardized distance is
z = (x_i - m) / (s sqrt(1 + 1/(k-1))) and its two-sided p is from t with k - 2 df. Leaving the
host out keeps it from widening the spread it is judged against. Per setting and metric the host
with the largest |z| is named; it "stands out" only when its p survives Holm across every host x
setting x metric judged (the largest of many distances is always large-ish). Needs k >= 3.

What differs between the hosts comes from host.json through compare.hosts_differences (the one
host.json diff): kernel, CPU model, memory, QEMU, libvirt first.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.analysis import studymetrics
from orchestrator.analysis.across.compare import HEADLINE, SPECS, _clean, hosts_differences
from orchestrator.analysis.stats import holm_reject, mean_ci95, t_two_sided_p
from orchestrator.errors import FleetError
from orchestrator.store import catalog, studydata

MIN_HOSTS = 3  # a host-level interval needs 3 hosts (t with >= 2 df); also the leave-one-out rule
ALPHA = 0.05
HOST_LEVEL = "host-level interval"
RULE = (
    "One value per host (its latest good study's value of the setting), their mean and the 95% t interval "
    "with hosts - 1 df: the host is the unit of replication, never the trials pooled. A host differs most "
    "when its distance from the other hosts' mean, in units of their spread (leave-one-out prediction, "
    "t with hosts - 2 df), is the largest; it stands out when that p survives Holm across every host x "
    "setting x metric judged."
)


@dataclass
class HostValue:
    host: str
    value: float
    half: float  # the study's own 95% half width (NaN: none)
    n: int  # trials (or blocks, when paired) the study's value is over
    method: str  # "trials", or the vs-off comparison's method (paired by block, Welch, none)
    z: float = math.nan  # leave-one-out standardized distance from the other hosts
    p: float = math.nan
    stands_out: bool = False


@dataclass
class FleetMetric:
    setting: str
    metric: str
    unit: str
    hosts: list[HostValue]
    mean: float = math.nan  # mean of the per-host values (None in JSON below MIN_HOSTS)
    half: float = math.nan  # host-level 95% half width, t with hosts - 1 df
    dof: int = 0
    why_no_interval: str = ""
    differs_most: str = ""  # the host with the largest |z| ("" when not judged)

    @property
    def n_hosts(self) -> int:
        return len(self.hosts)


@dataclass
class HostStudy:
    host: str
    path: str
    created_wall: float
    kernel: Any
    host_json: dict[str, Any] = field(repr=False, default_factory=dict)


@dataclass
class Fleet:
    root: str
    plan: str
    hosts: list[HostStudy]
    metrics: list[FleetMetric]
    host_diff: list[dict[str, Any]]  # compare.hosts_differences over the hosts (hostname left out)
    skipped: list[dict[str, str]]  # hosts with studies of the plan but no good one: {"host", "why"}
    standing_out: list[dict[str, Any]]  # hosts that stand out: {"host", "setting", "metric", "z", "p", "differs_in"}
    family_size: int  # Holm's m: host x setting x metric distances judged
    rule: str = RULE

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for h in out["hosts"]:
            h.pop("host_json", None)
        for m, metric in zip(out["metrics"], self.metrics):
            m["n_hosts"] = metric.n_hosts
            m["sentence"] = sentence(metric)
        return _clean(out)


def pool(values: Any) -> tuple[float, float, int, str]:
    """(mean, 95% half width, dof, why no interval) of one value per host: stats.mean_ci95 at
    hosts - 1 df. Below MIN_HOSTS, or with no spread, the half width is NaN and the reason says why."""
    arr = np.asarray(values, dtype=float)
    arr = arr[np.isfinite(arr)]
    k = int(arr.size)
    if k < MIN_HOSTS:
        return (
            math.nan,
            math.nan,
            0,
            (
                f"{k} host{'s' if k != 1 else ''} with a value: no fleet interval "
                f"(a host-level interval needs {MIN_HOSTS})"
            ),
        )
    mean, half, _ = mean_ci95(arr)
    if not half > 0:
        return mean, math.nan, k - 1, "no spread between hosts measured (every host's value equal): cannot tell"
    return mean, half, k - 1, ""


def leave_one_out(values: Any, resolution: float) -> tuple[np.ndarray, np.ndarray]:
    """(z, p) per host, by the module docstring's rule; NaN everywhere below MIN_HOSTS."""
    arr = np.asarray(values, dtype=float)
    k = arr.size
    z, p = np.full(k, math.nan), np.full(k, math.nan)
    if k < MIN_HOSTS or not np.isfinite(arr).all():
        return z, p
    for i in range(k):
        others = np.delete(arr, i)
        sd = max(float(others.std(ddof=1)), resolution)
        se = sd * math.sqrt(1 + 1 / (k - 1))
        z[i] = (arr[i] - others.mean()) / se
        p[i] = float(t_two_sided_p(arr[i] - others.mean(), se, k - 2))
    return z, p


def latest_good(root: Path, plan: str) -> tuple[list[catalog.StudyEntry], list[dict[str, str]]]:
    """The latest good study of `plan` per host under root, and the hosts that have studies of
    the plan but no good one. FleetError (one line) when there is nothing to summarise."""
    root = Path(root)
    if not root.is_dir():
        raise FleetError(f"{root}: no such results folder")
    entries = catalog.scan(root)
    if not entries:
        raise FleetError(f"{root}: no study found (a study is a folder with a study.json)")
    plans = sorted({e.name for e in entries})
    if plan not in plans:
        raise FleetError(f"{root}: no study of plan {plan!r} (plans there: {', '.join(plans)})")
    chosen, skipped = [], []
    for host in sorted({e.host for e in entries if e.name == plan}):
        of_host = [e for e in entries if e.name == plan and e.host == host]
        best = catalog.latest(of_host, (catalog.GOOD,))
        if best is None:
            states = ", ".join(sorted({e.state for e in of_host}))
            skipped.append(
                {"host": host, "why": f"no good study (every trial ok, trusted date): {len(of_host)} found, {states}"}
            )
        else:
            chosen.append(best)
    if len(chosen) < 2:
        which = f" ({chosen[0].host})" if chosen else ""
        raise FleetError(
            f"{root}: {len(chosen)} host{which} with a good study of plan {plan!r}: a fleet summary "
            "needs at least 2 hosts"
        )
    return chosen, skipped


def _host_value(row: Any, metric: str, host: str) -> HostValue | None:
    if metric.endswith("_vs_off_pct"):
        base = metric.removesuffix("_pct")
        value, half = row.get(metric), row.get(f"{base}_ci95_pct")
        n, method = row.get(f"{base}_n"), row.get(f"{base}_method")
    else:
        value, half, n, method = row.get(metric), row.get(f"{metric}_ci95"), row.get(f"{metric}_n"), "trials"
    if value is None or not math.isfinite(float(value)):
        return None
    half = float(half) if half is not None and math.isfinite(float(half)) else math.nan
    n = int(n) if n is not None and math.isfinite(float(n)) else 0
    return HostValue(host, float(value), half, n, str(method))


def summarise(root: Path, plan: str, headline: tuple[str, ...] = HEADLINE, alpha: float = ALPHA) -> Fleet:
    """The fleet summary of `plan` under root (module docstring)."""
    chosen, skipped = latest_good(root, plan)
    studies: list[HostStudy] = []
    metrics: dict[tuple[str, str], FleetMetric] = {}
    for entry in chosen:
        data = studydata.load_study(entry.path)
        settings = studymetrics.compute_study(data).settings
        studies.append(HostStudy(entry.host, str(entry.path), entry.created_wall, data.host.get("kernel"), data.host))
        if settings.empty:
            continue
        for _, row in settings[~settings["ksm_off"].astype(bool)].iterrows():
            for metric in headline:
                value = _host_value(row, metric, entry.host)
                if value is None:
                    continue
                key = (str(row["setting"]), metric)
                if key not in metrics:
                    metrics[key] = FleetMetric(key[0], metric, SPECS[metric].unit, [])
                metrics[key].hosts.append(value)
    judged: list[HostValue] = []
    for m in metrics.values():
        values = [h.value for h in m.hosts]
        m.mean, m.half, m.dof, m.why_no_interval = pool(values)
        z, p = leave_one_out(values, SPECS[m.metric].resolution)
        for h, zi, pi in zip(m.hosts, z, p):
            h.z, h.p = float(zi), float(pi)
        if np.isfinite(z).any():
            m.differs_most = m.hosts[int(np.nanargmax(np.abs(z)))].host
            judged.extend(h for h in m.hosts if math.isfinite(h.p))
    if judged:
        for h, r in zip(judged, holm_reject([h.p for h in judged], alpha)):
            h.stands_out = bool(r)
    host_jsons = {s.host: s.host_json for s in studies}
    diff = [d for d in hosts_differences(host_jsons) if d["key"] != "hostname"]
    standing = []
    for m in metrics.values():
        for h in m.hosts:
            if h.stands_out:
                standing.append(
                    {
                        "host": h.host,
                        "setting": m.setting,
                        "metric": m.metric,
                        "z": h.z,
                        "p": h.p,
                        "differs_in": differs_in(h.host, diff),
                    }
                )
    return Fleet(str(root), plan, studies, list(metrics.values()), diff, skipped, standing, len(judged))


def differs_in(host: str, diff: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The host.json keys where this host's value is its own (no other host shares it)."""
    out = []
    for d in diff:
        mine = d["values"].get(host)
        others = [v for name, v in d["values"].items() if name != host]
        if all(v != mine for v in others):
            out.append({"key": d["key"], "value": mine, "others": sorted({str(v) for v in others})})
    return out


def _with_unit(value: float, half: float, unit: str) -> str:
    """'-6.8% ± 1.5%' for a change vs KSM off, '40.2 ± 0.5 MiB' otherwise (no ± when half is NaN)."""
    pct = unit == "% vs KSM off"
    text = f"{value:+.1f}%" if pct else f"{value:.4g}"
    if math.isfinite(half):
        text += f" ± {half:.1f}%" if pct else f" ± {half:.2g}"
    return text if pct else f"{text} {unit}"


def sentence(m: FleetMetric) -> str:
    """'ksm.pages_to_scan=1000: tps_vs_off_pct -6.8% ± 1.5% across 5 hosts (host-level interval, t with 4 df)'."""
    what = f"{m.setting}: {m.metric}"
    if not math.isfinite(m.mean):
        values = ", ".join(f"{h.host} {_with_unit(h.value, math.nan, m.unit)}" for h in m.hosts)
        return f"{what} per host: {values}; {m.why_no_interval}"
    text = f"{what} {_with_unit(m.mean, m.half, m.unit)} across {m.n_hosts} hosts"
    return text + (f"; {m.why_no_interval}" if m.why_no_interval else f" ({HOST_LEVEL}, t with {m.dof} df)")
