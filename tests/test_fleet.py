"""fleet: the latest good study per host, pooled with the host as the level of replication."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from orchestrator.analysis.across import fleet
from orchestrator.analysis.stats import holm_reject, mean_ci95
from orchestrator.cli import main as cli
from tests.nightly_studies import write_night

DAY_S = 86_400.0
WALL = 1_735_700_000.0
OFF_TPS = [100.0, 104.0, 96.0]  # per block: the host's speed moves from block to block
BLOCK_NOISE_PCT = [-0.5, 0.0, 0.5]  # the within-study spread of the paired change, mean 0
# the true per-host change of tps vs KSM off at pages_to_scan 1000 and 100 (lab5 is the odd one)
EFFECT_1000 = {"lab1": -5.0, "lab2": -6.0, "lab3": -7.0, "lab4": -5.5, "lab5": -30.0}
EFFECT_100 = {"lab1": -1.0, "lab2": -1.5, "lab3": -2.0, "lab4": -1.2, "lab5": -1.8}


def _tps(effect_1000: float, effect_100: float) -> dict:
    def on(effect: float) -> list[float]:
        return [off * (1 + (effect + d) / 100) for off, d in zip(OFF_TPS, BLOCK_NOISE_PCT)]

    return {"off": OFF_TPS, 1000: on(effect_1000), 100: on(effect_100)}


def _host(
    root: Path,
    host: str,
    *,
    wall: float = WALL,
    kernel: str = "6.1.0-test",
    cpu: str | None = None,
    effect_1000: float | None = None,
    **kw,
) -> Path:
    study = write_night(
        root / host / f"{int(wall)}",
        hostname=host,
        kernel=kernel,
        created_wall=wall,
        saved_mib={100: [3.0, 3.1, 2.9], 1000: [40.0, 40.5, 39.5]},
        tps=_tps(EFFECT_1000[host] if effect_1000 is None else effect_1000, EFFECT_100[host]),
        **kw,
    )
    if cpu:
        info = json.loads((study / "host.json").read_text())
        (study / "host.json").write_text(json.dumps({**info, "cpu_model": cpu}))
    return study


def _fleet(root: Path) -> dict[str, Path]:
    """Five hosts; lab5 runs another kernel and CPU. lab1 also has an older good study (another
    effect) and a newer unfinished one: the latest good is the middle one."""
    out = {}
    _host(root, "lab1", wall=WALL - 2 * DAY_S, effect_1000=-20.0)  # older: not the latest
    for host in EFFECT_1000:
        out[host] = _host(
            root,
            host,
            kernel="6.6.0-test" if host == "lab5" else "6.1.0-test",
            cpu="Other CPU" if host == "lab5" else None,
        )
    _host(root, "lab1", wall=WALL + DAY_S, effect_1000=-50.0, missing=("p1000-r2",))  # unfinished
    return out


def _metric(result: fleet.Fleet, setting: str, metric: str) -> fleet.FleetMetric:
    return next(m for m in result.metrics if m.setting == setting and m.metric == metric)


def test_host_level_interval_is_the_hand_computed_t_interval(tmp_path: Path) -> None:
    studies = _fleet(tmp_path)
    result = fleet.summarise(tmp_path, "nightly")
    assert {h.host: h.path for h in result.hosts} == {h: str(p) for h, p in studies.items()}
    for setting, effects in (("ksm.pages_to_scan=1000", EFFECT_1000), ("ksm.pages_to_scan=100", EFFECT_100)):
        m = _metric(result, setting, "tps_vs_off_pct")
        per_host = {h.host: h.value for h in m.hosts}
        assert per_host == pytest.approx(effects)  # each host's within-study paired change
        x = np.array([effects[h] for h in sorted(effects)])
        half = sps.t.ppf(0.975, 4) * x.std(ddof=1) / math.sqrt(5)  # by hand: t(0.975, hosts - 1)
        assert (m.mean, m.half, m.dof) == (pytest.approx(x.mean()), pytest.approx(half), 4)
        # each host's own interval is its study's: paired by block, 3 blocks, the block noise's spread
        own = next(h for h in m.hosts if h.host == "lab2")
        assert own.n == 3 and own.method == "paired by block"
        assert own.half == pytest.approx(sps.t.ppf(0.975, 2) * np.std(BLOCK_NOISE_PCT, ddof=1) / math.sqrt(3), rel=0.02)
    assert "across 5 hosts (host-level interval, t with 4 df)" in fleet.sentence(
        _metric(result, "ksm.pages_to_scan=1000", "tps_vs_off_pct")
    )
    # every host's latency equal to KSM off's: no spread, never a zero-width interval
    latency = _metric(result, "ksm.pages_to_scan=1000", "latency_p95_ms_vs_off_pct")
    assert math.isnan(latency.half) and "no spread" in latency.why_no_interval


def test_the_odd_host_is_named_with_what_differs_on_it(tmp_path: Path) -> None:
    _fleet(tmp_path)
    result = fleet.summarise(tmp_path, "nightly")
    m = _metric(result, "ksm.pages_to_scan=1000", "tps_vs_off_pct")
    assert m.differs_most == "lab5"
    lab5 = next(h for h in m.hosts if h.host == "lab5")
    others = np.array([EFFECT_1000[h] for h in ("lab1", "lab2", "lab3", "lab4")])
    se = others.std(ddof=1) * math.sqrt(1 + 1 / 4)  # leave-one-out prediction of one more host
    assert lab5.z == pytest.approx((-30.0 - others.mean()) / se)
    assert lab5.stands_out and [s["host"] for s in result.standing_out] == ["lab5"]
    own = {d["key"]: d["value"] for d in result.standing_out[0]["differs_in"]}
    assert own == {"kernel": "6.6.0-test", "cpu_model": "Other CPU"}
    assert [d["key"] for d in result.host_diff] == ["kernel", "cpu_model"]
    # pages_to_scan 100: the hosts differ, but none beyond what the others' spread allows
    assert not any(h.stands_out for h in _metric(result, "ksm.pages_to_scan=100", "tps_vs_off_pct").hosts)


def test_cli_text_and_json(tmp_path: Path, capsys) -> None:
    _fleet(tmp_path)
    assert cli.main(["fleet", str(tmp_path), "--plan", "nightly"]) == 0
    text = capsys.readouterr().out
    assert "ksm.pages_to_scan=1000: tps_vs_off_pct -10.7% ± " in text
    assert "across 5 hosts (host-level interval, t with 4 df)" in text
    assert "lab5 stands out in ksm.pages_to_scan=1000 tps_vs_off_pct" in text
    assert "kernel: lab1=6.1.0-test" in text and "lab5=6.6.0-test" in text
    assert cli.main(["fleet", str(tmp_path), "--plan", "nightly", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    m = next(m for m in data["metrics"] if m["setting"] == "ksm.pages_to_scan=1000" and m["metric"] == "tps_vs_off_pct")
    assert m["n_hosts"] == 5 and m["dof"] == 4 and m["differs_most"] == "lab5"
    latency = next(m for m in data["metrics"] if m["metric"] == "latency_p95_ms_vs_off_pct")
    assert latency["half"] is None  # NaN is null in JSON


def test_two_hosts_give_per_host_values_and_no_fleet_interval(tmp_path: Path, capsys) -> None:
    _host(tmp_path, "lab1")
    _host(tmp_path, "lab2")
    assert cli.main(["fleet", str(tmp_path), "--plan", "nightly"]) == 0
    text = capsys.readouterr().out
    assert (
        "ksm.pages_to_scan=1000: tps_vs_off_pct per host: lab1 -5.0%, lab2 -6.0%; 2 hosts with a value: "
        "no fleet interval"
    ) in text
    assert "across 2 hosts" not in text and "host-level interval," not in text


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty", "no study found"),
        ("plan", "no study of plan 'nightly' (plans there: other)"),
        ("one", "1 host (lab1) with a good study of plan 'nightly': a fleet summary needs at least 2 hosts"),
        ("missing", "no such results folder"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path: Path, capsys, case: str, message: str) -> None:
    root = tmp_path / "results"
    root.mkdir()
    if case == "plan":
        write_night(root / "lab1", name="other")
    if case == "one":
        _host(root, "lab1")
        _host(root, "lab2", missing=("p100-r1",))  # lab2's only study is unfinished
    if case == "missing":
        root = tmp_path / "nowhere"
    assert cli.main(["fleet", str(root), "--plan", "nightly"]) == 2
    err = capsys.readouterr().err
    assert message in " ".join(err.split()) and "Traceback" not in err


def test_simulation_host_level_interval_covers_the_fleet_mean_trials_pooled_does_not() -> None:
    """Hosts differ (sd 3 points) more than trials of one host do (sd 1): the host-level interval
    (fleet.pool over per-host means) covers the true fleet mean about 95% of the time; the 95%
    interval of the trials of all hosts pooled covers it far less often."""
    rng = np.random.default_rng(21)
    truth, host_sd, trial_sd, hosts, trials, runs = -6.0, 3.0, 1.0, 5, 5, 2000
    covered_host = covered_trials = 0
    for _ in range(runs):
        effects = truth + host_sd * rng.standard_normal(hosts)
        values = effects[:, None] + trial_sd * rng.standard_normal((hosts, trials))
        mean, half, dof, why = fleet.pool(values.mean(axis=1))
        assert dof == hosts - 1 and not why
        covered_host += abs(mean - truth) <= half
        pooled_mean, pooled_half, _ = mean_ci95(values.ravel())
        covered_trials += abs(pooled_mean - truth) <= pooled_half
    assert 0.93 <= covered_host / runs <= 0.97
    assert covered_trials / runs < 0.80


def test_simulation_no_host_stands_out_by_chance_more_than_alpha() -> None:
    """Five hosts drawn alike: the leave-one-out distances, Holm across the hosts, name a host as
    standing out in at most alpha of the fleets; a host shifted by 12 sd stands out in most."""
    rng = np.random.default_rng(7)
    runs, false_alarm, found = 1000, 0, 0
    for _ in range(runs):
        values = rng.standard_normal(5)
        _, p = fleet.leave_one_out(values, 1e-9)
        false_alarm += holm_reject(p, fleet.ALPHA).any()
        values[0] += 12.0
        _, p = fleet.leave_one_out(values, 1e-9)
        found += holm_reject(p, fleet.ALPHA)[0]
    assert false_alarm / runs <= 0.065
    assert found / runs >= 0.5
