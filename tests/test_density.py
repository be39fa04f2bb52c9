"""Guest density (workloads/density.py, runners/density.py): the stop rule on scripted hosts,
the pattern check, the summary columns; one real run with two guests (marked vm)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from orchestrator.workloads import density
from orchestrator.errors import WorkloadError
from orchestrator.plan import DensitySection, parse_plan


class ScriptedHost:
    """MemAvailable and PSS scripted per guest: guest i costs costs_mib[i]; no guests, no KSM."""

    def __init__(
        self, costs_mib: list[float], start_available_mib: float = 10_000.0, corrupt: int | None = None
    ) -> None:
        self.costs = costs_mib
        self.available = start_available_mib
        self.pss = 0.0
        self.started = 0
        self.lowest_available = start_available_mib
        self.corrupt = corrupt
        self.patterns: dict[int, str] = {}

    def start_guest(self, index: int) -> None:
        assert index == self.started
        self.pss += self.costs[index]
        self.available -= self.costs[index]
        self.lowest_available = min(self.lowest_available, self.available)
        self.started += 1

    def run_in_guest(self, index: int, command: str, timeout_s: float) -> str:
        if command.startswith("set -e"):
            self.patterns[index] = density.expected_digest(index, 1)
            return ""
        digest = self.patterns[index] if index != self.corrupt else "0" * 64
        return f"{digest}  {density.PATTERN_PATH}\n"

    def wait_converged(self, window_s: float, tolerance_pct: float, max_s: float) -> bool:
        return True

    def measure(self, guests: int, converged: bool) -> density.Step:
        return density.Step(guests, self.pss, self.available, ksmd_cpu_pct=3.0, tps_per_guest=20.0)


CFG = DensitySection(
    budget_mib=100_000,
    mem_available_floor_mib=4000,
    max_guests=64,
    converge_window_s=1,
    converge_tolerance_pct=2,
    converge_max_s=1,
    verify_mib=1,
    cost_margin=1.1,
)


@pytest.mark.parametrize("seed", range(20))
def test_density_never_crosses_the_floor_when_costs_stay_within_the_margin(seed: int) -> None:
    rng = np.random.default_rng(seed)
    base = float(rng.uniform(200, 900))
    # every guest within +-4% of the others: the 10% margin covers the next one
    costs_mib = list(base * rng.uniform(0.96, 1.04, 64))
    host = ScriptedHost(costs_mib, start_available_mib=float(rng.uniform(5000, 20000)))
    result = density.run_density(host, CFG, first_guest_mib=1000.0)
    assert host.lowest_available >= CFG.mem_available_floor_mib
    assert not result.floor_crossed
    assert "floor" in result.stop_reason or "max_guests" in result.stop_reason
    # and it stopped only when the next guest really could have crossed (not far too early)
    assert (
        host.available - 1.1 * max(costs_mib[: host.started]) < CFG.mem_available_floor_mib
        or host.started == CFG.max_guests
    )


def test_density_first_guest_is_planned_at_its_maximum() -> None:
    history = [density.Step(0, 0.0, 5000.0)]
    assert density.next_guest_allowed(history, 10_000, 4000, first_guest_mib=900)[0] is True
    allowed, reason = density.next_guest_allowed(history, 10_000, 4000, first_guest_mib=1100)
    assert not allowed and "floor" in reason


def test_density_budget_stops_before_the_guest_that_would_pass_it() -> None:
    history = [density.Step(0, 0.0, 50_000.0), density.Step(1, 500.0, 49_500.0), density.Step(2, 1000.0, 49_000.0)]
    assert density.next_guest_allowed(history, 1600, 1000, margin=1.1)[0] is True  # 1000 + 550
    allowed, reason = density.next_guest_allowed(history, 1500, 1000, margin=1.1)
    assert not allowed and "budget" in reason


def test_density_plans_with_the_largest_cost_seen_not_the_cheapest() -> None:
    # KSM made guest 2 cheap (merged against guest 1); the next could cost like guest 1 again
    history = [density.Step(0, 0.0, 50_000.0), density.Step(1, 600.0, 49_400.0), density.Step(2, 800.0, 49_200.0)]
    pss_cost, avail_cost = density.per_guest_costs(history)
    assert pss_cost == pytest.approx(600.0) and avail_cost == pytest.approx(600.0)


def test_density_with_cheaper_merged_guests_fits_more_in_a_budget() -> None:
    cfg = CFG.model_copy(update={"budget_mib": 3000, "mem_available_floor_mib": 0})
    off = density.run_density(ScriptedHost([500.0] * 64), cfg, first_guest_mib=600.0)
    merged = density.run_density(ScriptedHost([500.0] + [250.0] * 63), cfg, first_guest_mib=600.0)
    assert off.steps[-1].guests == 5  # 5 x 500 + 550 > 3000
    assert merged.steps[-1].guests > off.steps[-1].guests


def test_density_reports_a_floor_crossed_by_a_guest_that_grew_past_the_margin() -> None:
    host = ScriptedHost([500.0, 500.0, 3000.0] + [500.0] * 10, start_available_mib=6500.0)
    result = density.run_density(host, CFG, first_guest_mib=600.0)
    assert result.floor_crossed and "grew more than the margin" in result.stop_reason


def test_density_pattern_mismatch_fails_loudly() -> None:
    with pytest.raises(WorkloadError, match="DATA INTEGRITY"):
        density.run_density(
            ScriptedHost([500.0] * 4, start_available_mib=6000.0, corrupt=1), CFG, first_guest_mib=600.0
        )


def test_density_pattern_commands_write_what_the_host_expects(tmp_path: Path) -> None:
    path = str(tmp_path / "pattern")
    subprocess.run(["sh", "-c", density.write_command(3, 1, path)], check=True, timeout=30)
    output = subprocess.run(
        ["sh", "-c", density.verify_command(path)], check=True, capture_output=True, text=True, timeout=30
    ).stdout
    assert density.check_verify_output(3, 1, output) is None
    assert density.check_verify_output(4, 1, output) is not None  # another guest's pattern differs
    data = bytearray(Path(path).read_bytes())
    data[12345] ^= 0xFF
    Path(path).write_bytes(bytes(data))
    output = subprocess.run(
        ["sh", "-c", density.verify_command(path)], check=True, capture_output=True, text=True, timeout=30
    ).stdout
    assert "!= expected" in density.check_verify_output(3, 1, output)


def test_density_summary_columns() -> None:
    record = density.DensityResult(
        steps=[density.Step(0, 0, 9000), density.Step(4, 2000.0, 7000, 5.0, 18.0)], stop_reason="budget"
    ).record()
    out = density.density_summary(record)
    assert out["density_guests"] == 4 and out["density_pss_per_guest_mib"] == pytest.approx(500.0)
    assert out["density_ksmd_cpu_pct"] == 5.0 and out["density_tps_per_guest"] == 18.0


def test_density_result_is_kept_when_verification_fails() -> None:
    result = density.DensityResult()
    with pytest.raises(WorkloadError):
        density.run_density(
            ScriptedHost([500.0] * 4, start_available_mib=6000.0, corrupt=0), CFG, first_guest_mib=600.0, result=result
        )
    assert result.steps[-1].guests >= 1 and result.mismatches


def test_density_plan_picks_the_density_runner(tmp_path: Path) -> None:
    import threading

    from orchestrator.host.ksm import HostSettings
    from orchestrator.sweep import runner_for

    pytest.importorskip("libvirt")
    from orchestrator.runners.density import DensityVmRunner

    plan = parse_plan((Path(__file__).resolve().parents[1] / "plans" / "density.toml").read_text())
    runner = runner_for(plan, HostSettings(tmp_path / "r.json", tmp_path), threading.Event(), lambda p: None)
    assert isinstance(runner, DensityVmRunner)


@pytest.mark.ksm
@pytest.mark.vm
def test_real_density_run_with_two_guests(tmp_path: Path, ksm_guard) -> None:
    """plans/density.toml cut to 2 guests (one restored, one added at each setting): the state
    build boots every guest of max_guests, so each guest more costs this test about a minute."""
    from orchestrator.sweep import run_sweep

    text = (Path(__file__).resolve().parents[1] / "plans" / "density.toml").read_text()
    assert "max_guests = 6" in text
    text = text.replace("max_guests = 6", "max_guests = 2")
    # Shorter waits than the plan's (2 x 512 MiB converge in seconds at 1000 pages / 20 ms): the
    # test proves the path, the plan's windows are for a real measurement.
    for old, new in (
        ("converge_window_s = 15", "converge_window_s = 5"),
        ("converge_max_s = 45", "converge_max_s = 20"),
        ("baseline_s = 5", "baseline_s = 2"),
        ("measure_s = 10 ", "measure_s = 5 "),
    ):
        assert old in text, old
        text = text.replace(old, new)
    # The test's saved state goes with its study (and its work folder), not into the cache.
    text = text.replace(
        'start = "restore"', f'start = "restore"\ncache_states = false\nworkdir = "{tmp_path / "work"}"'
    )
    (tmp_path / "results").mkdir()
    outcome = run_sweep(parse_plan(text), text, tmp_path / "results")
    trials = pd.read_csv(outcome.study.path / "trials.csv")
    assert (trials["status"] == "ok").all(), trials[["status", "reason"]].to_dict("records")
    assert (trials["density_guests"] >= 2).all() and (trials["density_mismatches"] == 0).all()
