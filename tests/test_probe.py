"""Issue 12: scan speed, zero pages, KSM's own memory, the probe workload (merge, COW, unmerge)
and guest density.

Pure tests run on hand-made frames (tests/builders.py) and scripted hosts. Tests
marked ksm change the real KSM (run by the engineer who owns the host's KSM); vm ones start guests.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from orchestrator.analysis import costs, cowstats, trialmetrics
from orchestrator.workloads import density
from orchestrator.errors import PlanError, WorkloadError
from orchestrator.plan import DensitySection, parse_plan
from orchestrator.workloads.probe import ProbeParams, ProbeWorker
from orchestrator.host import probes
from tests.builders import PAGE, finish_study, processes_frame, ramp_ksm_frame, start_study, write_trial

MIB = 1024 * 1024


def scanning_frame(scanned_per_s: float = 2500.0, chains: int = 5, **kwargs) -> pd.DataFrame:
    """ramp_ksm_frame plus what the scan-speed and memory metrics read: pages_scanned rising
    scanned_per_s during measure, stable_node_chains."""
    ksm = ramp_ksm_frame(**kwargs)
    measure = ksm["phase"] == "measure"
    t0 = ksm.loc[measure, "t_s"].min()
    ksm["pages_scanned"] = np.where(measure, (ksm["t_s"] - t0) * scanned_per_s, 0).astype(int)
    ksm["stable_node_chains"] = np.where(measure, chains, 0)
    return ksm


def one_trial(
    tmp_path: Path,
    knobs: dict,
    ksm: pd.DataFrame,
    *,
    ksm_off: bool = False,
    extra: dict | None = None,
    cow: pd.DataFrame | None = None,
) -> dict:
    study = start_study(tmp_path)
    trial_dir = write_trial(
        study,
        "t",
        {"pages_to_scan": knobs.get("pages_to_scan")},
        ksm=ksm,
        processes=processes_frame(ksm),
        ksm_knobs=knobs,
        ksm_off=ksm_off,
        extra=extra,
    )
    if cow is not None:
        cow.to_csv(trial_dir / "cow.csv", index=False)
    finish_study(study)
    return trialmetrics.trial_metrics(trial_dir, PAGE)


# ----------------------------------------------------------------------------- scan speed


def test_scan_speed_achieved_against_nominal(tmp_path: Path) -> None:
    m = one_trial(tmp_path, {"pages_to_scan": 100, "sleep_millisecs": 20, "use_zero_pages": 0}, scanning_frame())
    assert m["nominal_pages_per_s"] == pytest.approx(5000.0)  # 100 pages per 20 ms
    assert m["pages_scanned_per_s"] == pytest.approx(2500.0)
    assert m["scan_rate_achieved_pct"] == pytest.approx(50.0)
    assert m["seconds_per_full_scan"] == pytest.approx(2.0)  # the builder completes a scan every 2 s


def test_sleep_zero_asks_for_unbounded_rate() -> None:
    assert costs.nominal_pages_per_s(1000, 0) == math.inf
    assert costs.nominal_pages_per_s(1000, 1) == pytest.approx(1_000_000)  # the original study's setting
    ksm = scanning_frame()
    measure = ksm[ksm["phase"] == "measure"]
    out = costs.scan_speed(measure, {"pages_to_scan": 1000, "sleep_millisecs": 0}, 10.0)
    assert out["nominal_pages_per_s"] == math.inf and math.isnan(out["scan_rate_achieved_pct"])


def test_knob_left_at_host_value_is_read_from_the_samples() -> None:
    ksm = scanning_frame().assign(sleep_millisecs=10)
    out = costs.scan_speed(ksm[ksm["phase"] == "measure"], {"pages_to_scan": 100}, 10.0)
    assert out["nominal_pages_per_s"] == pytest.approx(10_000)


def test_ksm_off_trial_has_no_scan_or_memory_columns(tmp_path: Path) -> None:
    m = one_trial(tmp_path, {}, scanning_frame(), ksm_off=True)
    # KSM never ran: no scan rate was asked for (NaN) and KSM kept no metadata to count.
    assert math.isnan(m.get("nominal_pages_per_s", math.nan)) and "ksm_metadata_mib" not in m


def test_no_full_scan_completed_gives_nan_seconds_per_scan() -> None:
    ksm = scanning_frame().assign(full_scans=0)
    out = costs.scan_speed(ksm[ksm["phase"] == "measure"], {"pages_to_scan": 100, "sleep_millisecs": 20}, 10.0)
    assert math.isnan(out["seconds_per_full_scan"])


# ----------------------------------------------------------------------------- zero pages


def test_zero_pages_split_from_content_merges(tmp_path: Path) -> None:
    knobs = {"pages_to_scan": 100, "sleep_millisecs": 20, "use_zero_pages": 1}
    m = one_trial(tmp_path, knobs, scanning_frame(final_sharing=900, zero_pages=300))
    assert m["zero_pages_mib"] == pytest.approx(300 * PAGE / MIB)
    assert m["content_merged_mib"] == pytest.approx(900 * PAGE / MIB)
    assert m["zero_pages_share_pct"] == pytest.approx(25.0)
    assert m["saved_mib_end"] == pytest.approx(m["zero_pages_mib"] + m["content_merged_mib"])


def test_zero_pages_not_split_when_use_zero_pages_off(tmp_path: Path) -> None:
    m = one_trial(
        tmp_path, {"pages_to_scan": 100, "sleep_millisecs": 20, "use_zero_pages": 0}, scanning_frame(zero_pages=300)
    )
    assert "zero_pages_mib" not in m


# ----------------------------------------------------------------------------- KSM's own memory


def test_rmap_items_derived_from_general_profit_match_the_processes(tmp_path: Path) -> None:
    # The builder's general_profit = pages_sharing * page - 2 * final rmap items * 64 B, and its
    # two processes report 1000 rmap items each.
    m = one_trial(
        tmp_path,
        {"pages_to_scan": 100, "sleep_millisecs": 20, "use_zero_pages": 0},
        scanning_frame(final_sharing=1000, chains=5),
    )
    assert m["ksm_rmap_items_est"] == pytest.approx(2000)
    assert m["ksm_rmap_items_processes"] == pytest.approx(2000)
    assert m["rmap_items_mib"] == pytest.approx(2000 * 64 / MIB)
    assert m["stable_nodes"] == pytest.approx(100 + 5)  # pages_shared + stable_node_chains
    assert m["stable_nodes_mib"] == pytest.approx(105 * 64 / MIB)
    assert m["ksm_metadata_mib"] == pytest.approx((2000 + 105) * 64 / MIB)
    profit_mib = (1000 * PAGE - 2000 * 64) / MIB
    assert m["general_profit_mib_end"] == pytest.approx(profit_mib)
    # general_profit and the raw saving part by the rmap items exactly
    assert m["saved_mib_end"] - m["general_profit_mib_end"] == pytest.approx(m["rmap_items_mib"])
    assert m["profit_after_stable_nodes_mib"] == pytest.approx(profit_mib - 105 * 64 / MIB)


# ----------------------------------------------------------------------------- COW statistics


def synthetic_cow(overhead_ns: float = 100.0, n: int = 1000, seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    merged = overhead_ns + rng.lognormal(np.log(3000), 0.3, n)
    unmerged = overhead_ns + rng.lognormal(np.log(40), 0.3, n)
    rows = [("overhead", i, overhead_ns) for i in range(200)]
    rows += [("merged", i, v) for i, v in enumerate(merged)]
    rows += [("unmerged", i, v) for i, v in enumerate(unmerged)]
    return pd.DataFrame(rows, columns=["region", "order", "latency_ns"])


def test_cow_percentiles_are_net_of_the_loop_overhead() -> None:
    samples = synthetic_cow()
    out = cowstats.cow_summary(samples)
    assert out["cow_overhead_ns"] == pytest.approx(100.0)
    merged_net = samples.loc[samples["region"] == "merged", "latency_ns"].to_numpy() - 100.0
    for pct in (50, 90, 99):
        assert out[f"cow_merged_p{pct}_ns"] == pytest.approx(np.percentile(merged_net, pct))
    assert out["cow_merged_p50_ns"] == pytest.approx(3000, rel=0.05)
    assert out["cow_unmerged_p50_ns"] == pytest.approx(40, rel=0.05)
    raw = {r: np.median(samples.loc[samples["region"] == r, "latency_ns"]) for r in ("merged", "unmerged")}
    assert out["cow_p50_diff_ns"] == pytest.approx(raw["merged"] - raw["unmerged"])
    assert out["cow_p50_diff_ns"] == pytest.approx(out["cow_merged_p50_ns"] - out["cow_unmerged_p50_ns"])
    assert out["cow_median_ratio"] == pytest.approx(raw["merged"] / raw["unmerged"])  # raw: timer included
    assert out["cow_merged_n"] == out["cow_unmerged_n"] == 1000


def test_cow_latency_below_overhead_is_floored_not_negative() -> None:
    samples = pd.DataFrame(
        {
            "region": ["overhead"] * 3 + ["unmerged"] * 3 + ["merged"] * 3,
            "order": list(range(3)) * 3,
            "latency_ns": [100, 100, 100, 90, 95, 100, 500, 600, 700],
        }
    )
    out = cowstats.cow_summary(samples)
    assert out["cow_unmerged_p50_ns"] == cowstats.FLOOR_NS
    assert out["cow_merged_p50_ns"] == pytest.approx(500)
    # the difference and the ratio use the raw medians (600 and 95): the floor never enters them
    assert out["cow_p50_diff_ns"] == pytest.approx(505)
    assert out["cow_median_ratio"] == pytest.approx(600 / 95)


def test_cow_gap_is_stable_where_the_floored_ratio_was_not() -> None:
    """The issue's case: the unmerged median moves by 2 ns across the 1 ns floor. The net ratio
    went 4843 -> 2200; the difference of medians moves by 2 ns of ~4842."""

    def gap(unmerged_ns: float) -> dict:
        samples = pd.DataFrame(
            {
                "region": ["overhead"] * 3 + ["unmerged"] * 3 + ["merged"] * 3,
                "order": list(range(3)) * 3,
                "latency_ns": [160, 160, 160, *[unmerged_ns] * 3, *[160 + 4843] * 3],
            }
        )
        return cowstats.cow_summary(samples)

    before, after = gap(161.0), gap(163.0)
    assert before["cow_merged_p50_ns"] / before["cow_unmerged_p50_ns"] == pytest.approx(4843)
    assert after["cow_merged_p50_ns"] / after["cow_unmerged_p50_ns"] == pytest.approx(4843 / 3)
    assert before["cow_p50_diff_ns"] - after["cow_p50_diff_ns"] == pytest.approx(2.0)
    assert after["cow_median_ratio"] == pytest.approx(5003 / 163)


def test_cow_summary_of_nothing_is_empty() -> None:
    assert cowstats.cow_summary(None) == {}
    assert cowstats.cow_summary(pd.DataFrame()) == {}


def test_probe_trial_columns_and_report_sections(tmp_path: Path) -> None:
    from orchestrator.report.study import write_report

    probe = {
        "merged_pages": 25600,
        "merge_target_reached": True,
        "merge_wall_s": 2.0,
        "merge_ksmd_cpu_s": 0.5,
        "unmerge_s": 0.25,
        "pages_before_unmerge": 262144,
        "pages_sharing_after_unmerge": 0,
    }
    knobs = {"pages_to_scan": 1000, "sleep_millisecs": 20, "use_zero_pages": 0}
    m = one_trial(tmp_path, knobs, scanning_frame(), extra={"probe": probe, "kind": "probe"}, cow=synthetic_cow())
    assert m["merged_mib"] == pytest.approx(100.0)
    assert m["merge_mib_per_s"] == pytest.approx(50.0)
    assert m["merge_mib_per_ksmd_cpu_s"] == pytest.approx(200.0)
    assert m["unmerge_s_per_gib"] == pytest.approx(0.25)  # 262144 pages = 1 GiB
    html = write_report(tmp_path / "study").read_text()
    for title in (
        "Scan speed: asked and achieved",
        "KSM&#39;s own memory",
        "Merge throughput and unmerge",
        "Copy-on-write break latency",
        "side channels",
    ):
        assert title in html
    assert "significant" not in html.lower()
    trials = pd.read_csv(tmp_path / "study" / "report" / "summary.csv")
    for column in ("cow_merged_p99_ns", "cow_median_ratio", "unmerge_s_per_gib", "scan_rate_achieved_pct"):
        assert column in trials.columns


def test_a_probe_that_merged_nothing_claims_no_cow_ratio(tmp_path: Path) -> None:
    """Seen in plans/probe.toml: fill=zero under thp=always merged 0 pages, yet its "merged"
    region's first writes were 14x slower (THP faults). That is not a KSM copy-on-write cost."""
    probe = {
        "merged_pages": 0,
        "merge_target_reached": False,
        "merge_wall_s": 300.0,
        "merge_ksmd_cpu_s": 5.0,
        "unmerge_s": 0.01,
        "pages_before_unmerge": 0,
        "pages_sharing_after_unmerge": 0,
    }
    knobs = {"pages_to_scan": 1000, "sleep_millisecs": 20, "use_zero_pages": 0}
    m = one_trial(tmp_path, knobs, scanning_frame(), extra={"probe": probe, "kind": "probe"}, cow=synthetic_cow())
    assert math.isnan(m["cow_median_ratio"]) and "nothing merged" in m["cow_note"]
    assert math.isnan(m["cow_p50_diff_ns"])
    assert m["cow_merged_p50_ns"] > 0  # the latencies themselves are kept


def test_unmerge_per_gib_is_nan_without_merged_pages() -> None:
    assert math.isnan(costs.unmerge_per_gib(0.1, 0, PAGE))
    assert costs.unmerge_per_gib(2.0, 2 * 262144, PAGE) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- plan and params


PROBE_PLAN = """
[study]
name = "p"
[workload]
type = "probe"
pages = 64
fill = "{fill}"
[sweep.host]
thp_enabled = ["never", "always"]
"""


def test_probe_plan_parses_and_sweeps_fill_and_thp() -> None:
    plan = parse_plan(PROBE_PLAN.format(fill="zero"))
    assert plan.workload.type == "probe" and plan.workload.fill == "zero"
    with pytest.raises(PlanError):
        parse_plan(PROBE_PLAN.format(fill="random"))  # nothing to merge: not a probe fill
    with pytest.raises(PlanError, match="runs on the host"):
        parse_plan(PROBE_PLAN.format(fill="same") + "[guests]\ncount = 1\n")


def test_probe_params_target_counts_only_mergeable_pages() -> None:
    assert (
        ProbeParams(
            pages=1000, fill="duplicate_fraction", duplicate_fraction=0.25, merge_target_pct=80
        ).merge_target_pages()
        == 200
    )
    assert ProbeParams(pages=1000, fill="same").merge_target_pages() == 950
    with pytest.raises(PlanError, match="^probe workload: fill: "):
        ProbeParams.from_mapping({"pages": 1000, "fill": "random"})


def test_shipped_plans_parse() -> None:
    root = Path(__file__).resolve().parents[1] / "plans"
    for name in ("probe.toml", "density.toml", "vm-idle.toml"):
        parse_plan((root / name).read_text(), source=name)
    vm_idle = parse_plan((root / "vm-idle.toml").read_text())
    assert (vm_idle.sweep.model_extra or {})["ksm"]["use_zero_pages"] == [0, 1]


# ----------------------------------------------------------------------------- the probe worker


def test_probe_worker_protocol_on_a_tiny_unmerged_mapping(tmp_path: Path) -> None:
    """No MADV_MERGEABLE and KSM untouched: the protocol and the CSV, not the kernel's merging."""
    params = ProbeParams(pages=64, fill="same", sample_pages=16, overhead_writes=20, merge_timeout_s=1)
    samples = tmp_path / "cow.csv"
    with ProbeWorker(params, samples, mergeable=False) as worker:
        worker.start()
        filled_wall = worker.wait_filled(timeout_s=60)
        assert filled_wall > 0
        assert worker.merged_pages() in (0, None)  # None only on kernels without ksm_stat
        rows = worker.measure_cow(timeout_s=60)
        pid = worker.pid
    frame = pd.read_csv(samples)
    assert rows == len(frame)
    counts = frame["region"].value_counts().to_dict()
    assert counts["overhead"] == 20
    # page 0 of the control is the hot (overhead) page: when it is sampled, one pair is dropped
    assert counts["merged"] == counts["unmerged"] == 16 - (1 if 0 in _sampled(params) else 0)
    assert (frame["latency_ns"] >= 0).all()
    assert probes.live_comm(pid) is None  # gone, or a zombie waiting to be reaped


def _sampled(params: ProbeParams) -> set[int]:
    from orchestrator.workloads._prober import mergeable_indices, sample_offsets

    offsets = sample_offsets(
        mergeable_indices(params.fill, params.pages, params.duplicate_fraction), params.sample_pages, 4096, params.seed
    )
    return set((offsets // 4096).tolist())


def test_probe_worker_exits_when_its_lifeline_closes(tmp_path: Path) -> None:
    spec = {
        "parent_pid": 0,
        "pages": 8,
        "fill": "zero",
        "sample_pages": 2,
        "samples_path": str(tmp_path / "c.csv"),
        "mergeable": False,
    }
    code = (
        "import json,os,sys; from orchestrator.workloads import _prober; "
        "spec=json.loads(sys.argv[1]); spec['parent_pid']=os.getppid(); sys.exit(_prober.run(spec))"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code, json.dumps(spec)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert process.stdout is not None and process.stdin is not None
    assert process.stdout.readline().startswith(b"mapped ")
    assert process.stdout.readline().startswith(b"filled ")
    process.stdin.close()
    assert process.wait(timeout=10) == 0


# ----------------------------------------------------------------------------- density: stop rule


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


# ----------------------------------------------------------------------------- real KSM (not run here)


def run_probe_study(tmp_path: Path, fill: str, extra_ksm: str = "", thp: str = "never") -> pd.DataFrame:
    from orchestrator.sweep import run_sweep

    text = f"""
[study]
name = "probe-test"
[ksm]
pages_to_scan = 2000
sleep_millisecs = 10
{extra_ksm}
[host]
thp_enabled = "{thp}"
[workload]
type = "probe"
pages = 8192
fill = "{fill}"
sample_pages = 1000
merge_timeout_s = 60
[phases]
baseline_s = 1
measure_s = 5
[sampling]
interval_s = 0.25
"""
    plan = parse_plan(text)
    results = tmp_path / "results"
    results.mkdir(exist_ok=True)
    outcome = run_sweep(plan, text, results)
    trials = pd.read_csv(outcome.study.path / "trials.csv")
    assert (trials["status"] == "ok").all(), trials[["status", "reason"]].to_dict("records")
    return trials


@pytest.mark.ksm
def test_real_merge_throughput_is_positive_and_bounded(tmp_path: Path, ksm_guard) -> None:
    row = run_probe_study(tmp_path, "same").iloc[0]
    assert row["merge_mib_per_s"] > 0 and row["merge_mib_per_ksmd_cpu_s"] > 0
    probe_mib = 8192 * PAGE / MIB
    # never more merged than the probe maps, in the time it took
    assert row["merged_mib"] <= probe_mib
    assert row["merge_mib_per_s"] <= probe_mib / row["merge_wall_s"] + 1e-9


@pytest.mark.ksm
def test_real_cow_break_of_merged_pages_is_slower_in_the_median(tmp_path: Path, ksm_guard) -> None:
    row = run_probe_study(tmp_path, "same").iloc[0]
    if not row["merge_target_reached"]:
        pytest.skip(
            f"KSM merged only {row['merged_mib']:.1f} MiB in {row['merge_wall_s']:.0f} s: no merged pages to time"
        )
    assert row["cow_merged_p50_ns"] > row["cow_unmerged_p50_ns"], (
        f"merged p50 {row['cow_merged_p50_ns']:.0f} ns vs unmerged {row['cow_unmerged_p50_ns']:.0f} ns "
        f"(overhead {row['cow_overhead_ns']:.0f} ns subtracted)"
    )


@pytest.mark.ksm
def test_real_unmerge_leaves_nothing_shared(tmp_path: Path, ksm_guard) -> None:
    row = run_probe_study(tmp_path, "same").iloc[0]
    assert row["pages_sharing_after_unmerge"] == 0
    assert row["unmerge_s_per_gib"] > 0


@pytest.mark.ksm
def test_real_zero_pages_separated_with_use_zero_pages(tmp_path: Path, ksm_guard) -> None:
    if not Path("/sys/kernel/mm/ksm/ksm_zero_pages").exists():
        pytest.skip("this kernel does not count ksm_zero_pages")
    row = run_probe_study(tmp_path, "zero", extra_ksm="use_zero_pages = 1").iloc[0]
    assert row["merged_mib"] > 0
    assert row["zero_pages_mib"] > 0
    assert row["content_merged_mib"] < row["zero_pages_mib"]


@pytest.mark.ksm
@pytest.mark.vm
def test_real_density_run_with_two_guests(tmp_path: Path, ksm_guard) -> None:
    """plans/density.toml cut to 2 guests (one restored, one added at each setting): the state
    build boots every guest of max_guests, so each guest more costs this test about a minute."""
    from orchestrator.sweep import run_sweep

    text = (Path(__file__).resolve().parents[1] / "plans" / "density.toml").read_text()
    assert "max_guests = 6" in text
    text = text.replace("max_guests = 6", "max_guests = 2")
    # The test's saved state goes with its study (and its work folder), not into the cache.
    text = text.replace(
        'start = "restore"', f'start = "restore"\ncache_states = false\nworkdir = "{tmp_path / "work"}"'
    )
    (tmp_path / "results").mkdir()
    outcome = run_sweep(parse_plan(text), text, tmp_path / "results")
    trials = pd.read_csv(outcome.study.path / "trials.csv")
    assert (trials["status"] == "ok").all(), trials[["status", "reason"]].to_dict("records")
    assert (trials["density_guests"] >= 2).all() and (trials["density_mismatches"] == 0).all()


# ----------------------------------------------------------------------------- the probe runner, fake sysfs


@pytest.mark.parametrize("ksm_off", [True, False])
def test_probe_runner_flow_on_a_fake_sysfs(tmp_path: Path, ksm_off: bool) -> None:
    """The runner's phases, record and frames with KSM's files in a fake tree: nothing merges
    (the fake root has no /proc, so the worker's merged pages read 0 and the merge window ends at
    its timeout), and run=2 'unmerges' at once. The real sysfs is only read (by the sampler)."""
    import threading

    from orchestrator.host.ksm import KSM_SYSFS, HostSettings
    from orchestrator.plan import expand
    from orchestrator.runners.probe import ProbeRunner
    from orchestrator.runners.base import PhaseClock, TrialResult

    root = tmp_path / "root"
    ksm_dir = root / KSM_SYSFS
    ksm_dir.mkdir(parents=True)
    for name, value in {
        "run": "2",
        "pages_shared": "0",
        "pages_sharing": "0",
        "pages_to_scan": "100",
        "sleep_millisecs": "20",
        "use_zero_pages": "0",
    }.items():
        (ksm_dir / name).write_text(value + "\n")
    text = """
[study]
name = "fake"
[workload]
type = "probe"
pages = 64
sample_pages = 8
overhead_writes = 10
merge_timeout_s = 0.3
[phases]
baseline_s = 0.5
measure_s = 0.2
[sampling]
interval_s = 0.1
"""
    plan = parse_plan(text)
    trial = expand(plan)[0]
    if ksm_off:
        import dataclasses

        trial = dataclasses.replace(trial, ksm_off=True, ksm={})
    settings = HostSettings(tmp_path / "record.json", root)
    runner = ProbeRunner(plan, settings, threading.Event(), lambda phase: None)
    clock, result = PhaseClock(), TrialResult()
    runner.run(trial, clock, result)
    record = result.probe
    assert record.merged_pages == 0 and record.merge_target_reached is False
    assert record.cow_rows == len(result.frames["cow"]) > 0
    assert {"fill", "baseline", "measure", "cow"} <= set(clock.timings)
    assert (ksm_dir / "run").read_text().strip() == ("0" if ksm_off else "2")
    if not ksm_off:
        assert "unmerge" in clock.timings and record.pages_sharing_after_unmerge == 0
    assert set(result.frames["ksm"]["phase"]) >= {"baseline", "measure"}


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


def test_probe_study_end_to_end_on_a_fake_sysfs_reaches_trials_csv_and_report(tmp_path: Path) -> None:
    """sweep._run_one + the store + trials.csv + report for probe trials, KSM's files faked
    (nothing merges; the real sysfs is only read by the sampler)."""
    import threading

    from orchestrator.host.ksm import KSM_SYSFS, HostSettings
    from orchestrator.plan import expand
    from orchestrator.runners.probe import ProbeRunner
    from orchestrator.report.study import write_report
    from orchestrator.store.study import Study
    from orchestrator.sweep import _LogProgress, _run_one, write_trials_table

    root = tmp_path / "root"
    ksm_dir = root / KSM_SYSFS
    ksm_dir.mkdir(parents=True)
    for name, value in {
        "run": "0",
        "pages_shared": "0",
        "pages_sharing": "0",
        "pages_to_scan": "100",
        "sleep_millisecs": "20",
        "use_zero_pages": "0",
    }.items():
        (ksm_dir / name).write_text(value + "\n")
    text = """
[study]
name = "fake-probe"
ksm_off_baseline = true
[ksm]
pages_to_scan = 200
[workload]
type = "probe"
pages = 64
sample_pages = 8
overhead_writes = 10
merge_timeout_s = 0.3
[phases]
baseline_s = 0.5
measure_s = 0.3
[sampling]
interval_s = 0.1
"""
    plan = parse_plan(text)
    trials = expand(plan)
    results = tmp_path / "results"
    results.mkdir()
    study = Study.create(results, plan.study.name, text, [t.trial_id for t in trials], False)
    (study.path / "host.json").write_text("{}")
    settings = HostSettings(study.settings_record, root)
    stop = threading.Event()
    runner = ProbeRunner(plan, settings, stop, lambda phase: None)
    statuses = [_run_one(study, runner, settings, t, stop, _LogProgress(len(trials))) for t in trials]
    assert statuses == ["ok", "ok"]
    table = pd.read_csv(write_trials_table(study))
    on = table[~table["ksm_off"].astype(bool)].iloc[0]
    assert on["merge_target_reached"] is False or on["merge_target_reached"] in (0, "False")
    assert on["pages_sharing_after_unmerge"] == 0
    assert on["cow_merged_n"] > 0 and on["cow_unmerged_n"] > 0
    assert math.isfinite(on["cow_overhead_ns"])
    html = write_report(study.path).read_text()
    assert "Copy-on-write break latency" in html and "Merge throughput and unmerge" in html


def test_report_draws_zero_pages_apart_and_lists_them(tmp_path: Path) -> None:
    from orchestrator.report.study import write_report

    study = start_study(tmp_path)
    for zero in (0, 1):
        ksm = scanning_frame(final_sharing=900, zero_pages=300)
        write_trial(
            study,
            f"z{zero}",
            {"use_zero_pages": zero},
            ksm=ksm,
            processes=processes_frame(ksm),
            ksm_knobs={"pages_to_scan": 100, "sleep_millisecs": 20, "use_zero_pages": zero},
        )
    finish_study(study)
    html = write_report(study).read_text()
    assert "Zero pages and content merges" in html
    assert "content merges only" in html  # the plot's legend names the dotted line


def test_cow_gap_has_an_interval_across_trials_and_the_ratio_none(tmp_path: Path) -> None:
    from orchestrator.analysis import studymetrics
    from orchestrator.store import studydata
    from orchestrator.report.costs import cow_gap_findings

    study = start_study(tmp_path)
    knobs = {"pages_to_scan": 1000, "sleep_millisecs": 20, "use_zero_pages": 0}
    probe = {"merged_pages": 25600, "merge_target_reached": True, "merge_wall_s": 2.0, "merge_ksmd_cpu_s": 0.5}
    gaps = []
    for rep in range(3):
        cow = synthetic_cow(seed=rep + 1)
        gaps.append(cowstats.cow_summary(cow)["cow_p50_diff_ns"])
        trial_dir = write_trial(
            study,
            f"t{rep}",
            {"pages_to_scan": 1000},
            repetition=rep,
            ksm=scanning_frame(),
            ksm_knobs=knobs,
            extra={"probe": probe, "kind": "probe"},
        )
        cow.to_csv(trial_dir / "cow.csv", index=False)
    sm = studymetrics.compute_study(studydata.load_study(finish_study(study)))
    row = sm.settings.iloc[0]
    assert row["cow_p50_diff_ns"] == pytest.approx(np.mean(gaps))
    assert row["cow_p50_diff_ns_ci95"] == pytest.approx(4.3027 * np.std(gaps, ddof=1) / math.sqrt(3), rel=1e-4)
    assert "cow_median_ratio_ci95" not in sm.settings.columns and "cow_median_ratio" not in sm.settings.columns
    assert "cow_median_ratio" in sm.trials.columns  # per trial, description
    (finding,) = cow_gap_findings(sm)
    assert finding.startswith(
        f"Copy-on-write gap, all trials: a first write to a merged page took {np.mean(gaps):,.0f} ± "
    )
    assert "(95% interval across 3 trials)" in finding
