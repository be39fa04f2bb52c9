"""The probe workload (workloads/probe.py, runners/probe.py): its plan and parameters, the worker's
protocol, the runner on a fake sysfs, a study end to end; tests marked ksm measure a real merge,
copy-on-write break and unmerge."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from pydantic import ValidationError

from orchestrator.errors import PlanError
from orchestrator.plan import parse_plan
from orchestrator.workloads.probe import ProbeParams, ProbeWorker
from orchestrator.host import probes
from tests.builders import PAGE

MIB = 1024 * 1024


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
    with pytest.raises(ValidationError, match="\nfill\n"):
        ProbeParams(pages=1000, fill="random")


def test_shipped_plans_parse() -> None:
    root = Path(__file__).resolve().parents[1] / "plans"
    for name in ("probe.toml", "density.toml", "vm-idle.toml"):
        parse_plan((root / name).read_text(), source=name)
    vm_idle = parse_plan((root / "vm-idle.toml").read_text())
    assert (vm_idle.sweep.model_extra or {})["ksm"]["use_zero_pages"] == [0, 1]


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
