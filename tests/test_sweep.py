"""The quick study on the real KSM: merging, restoring on every exit path, resume.

Every test here changes the host's one KSM (marker `ksm`) and runs one at a time."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from orchestrator.errors import StoreError
from orchestrator.plan import parse_plan
from orchestrator.sweep import run_sweep
from tests.hoststate import snapshot

pytestmark = pytest.mark.ksm

REPO = Path(__file__).resolve().parent.parent


def plan_text(name: str, fills=("same", "random"), measure_s=4, pts=(2000,), extra="") -> str:
    return f"""
[study]
name = "{name}"
[ksm]
sleep_millisecs = 10
[workload]
type = "processes"
processes = 2
pages_per_process = 4000
{extra}
[phases]
baseline_s = 1
measure_s = {measure_s}
[sampling]
interval_s = 0.25
pss_interval_s = 1
[sweep.ksm]
pages_to_scan = {list(pts)}
[sweep.workload]
fill = {json.dumps(list(fills))}
"""


def sweep(text: str, results: Path, resume: bool = False):
    return run_sweep(parse_plan(text), text, results, resume=resume)


def test_same_fill_merges_and_random_does_not(results_dir, ksm_guard):
    # A fast scan rate: other mergeable memory on the host (e.g. QEMU guests) is scanned too.
    outcome = sweep(plan_text("merge", pts=(20000,), measure_s=8), results_dir)
    table = pd.read_csv(outcome.study.path / "trials.csv").set_index("workload.fill")
    assert (table["status"] == "ok").all()
    # 2 x 4000 identical pages: all but one page per KSM page are sharing.
    assert table.loc["same", "saved_mib"] > 0.9 * 8000 * 4096 / 2**20
    # At 20000 pages per 10 ms the merge can finish before the first measure tick: 0 s is right.
    assert table.loc["same", "time_to_90pct_s"] >= 0
    trials = outcome.study.path / "trials"
    ksm = pd.read_csv(next(trials.glob("pts20000-fillsame*")) / "ksm.csv")
    assert {"baseline", "measure"} <= set(ksm["phase"])
    assert ksm.loc[ksm.phase == "baseline", "pages_sharing"].max() == 0  # KSM was off before measure
    # pages_sharing is host-wide (other mergeable memory counts too): judge our own processes.
    same = pd.read_csv(next(trials.glob("pts20000-fillsame*")) / "processes.csv")
    assert set(same["label"]) == {"proc-0", "proc-1"}
    assert same.groupby("label")["ksm_merging_pages"].max().min() > 0.9 * 4000
    random = pd.read_csv(next(trials.glob("pts20000-fillrandom*")) / "processes.csv")
    assert random["ksm_merging_pages"].max() == 0

    # The report on this real study: every trial in the table, the plots, the computed verdict.
    from orchestrator.report.study import write_report

    html = write_report(outcome.study.path).read_text()
    for trial_id in table["trial_id"]:
        assert trial_id in html
    assert html.count("data:image/png;base64,") >= 2
    samples = pd.read_parquet(outcome.study.path / "report" / "samples.parquet")
    assert set(samples["trial_id"]) == set(table["trial_id"])


def test_knobs_restored_after_a_trial_raises(results_dir, ksm_guard, monkeypatch):
    from orchestrator.runners.processes import ProcessesRunner  # the processes plugin's runner

    def explode(self, trial, clock, result):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(ProcessesRunner, "run", explode)
    outcome = sweep(plan_text("boom", fills=("same",)), results_dir)
    assert outcome.failed == 1
    record = json.loads(next((outcome.study.path / "trials").glob("*/trial.json")).read_text())
    assert record["status"] == "failed" and "injected failure" in record["reason"]


def test_knobs_restored_when_the_loop_itself_is_interrupted(results_dir, ksm_guard, monkeypatch):
    from orchestrator.runners.processes import ProcessesRunner  # the processes plugin's runner

    def interrupt(self, trial, clock, result):
        raise KeyboardInterrupt

    monkeypatch.setattr(ProcessesRunner, "run", interrupt)
    with pytest.raises(KeyboardInterrupt):
        sweep(plan_text("kbd", fills=("same",)), results_dir)


def _start_sweep(plan: Path, results: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "sweep", str(plan), "--results", str(results), "--no-report"],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for_measure(results: Path, name: str, proc: subprocess.Popen, timeout_s: float = 60) -> list[int]:
    """Wait until KSM runs with the plan's settings and return the workload's pids."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        if Path("/sys/kernel/mm/ksm/run").read_text().strip() == "1":
            children = psutil.Process(proc.pid).children(recursive=True)
            if children:
                return [c.pid for c in children]
        time.sleep(0.1)
    raise AssertionError("sweep never reached the measure phase")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_restores_knobs_keeps_data_and_exits_128_plus_signal(tmp_path, results_dir, ksm_guard, signum):
    plan = tmp_path / "plan.toml"
    plan.write_text(plan_text("sigint", fills=("same",), measure_s=60))
    proc = _start_sweep(plan, results_dir)
    workers = _wait_for_measure(results_dir, "sigint", proc)
    time.sleep(1.0)
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, out  # 130 SIGINT, 143 SIGTERM
    assert snapshot() == ksm_guard
    assert not [p for p in workers if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    trial = next((results_dir / "sigint/trials").iterdir())
    record = json.loads((trial / "trial.json").read_text())
    assert record["status"] == "failed" and "interrupted" in record["reason"]
    assert len(pd.read_csv(trial / "ksm.csv")) > 3  # measured data kept


def test_sigkill_then_restore_command(tmp_path, results_dir, ksm_guard):
    plan = tmp_path / "plan.toml"
    plan.write_text(plan_text("sigkill", fills=("same",), measure_s=60, pts=(1234,)))
    proc = _start_sweep(plan, results_dir)
    workers = _wait_for_measure(results_dir, "sigkill", proc)
    proc.kill()
    proc.communicate(timeout=30)
    assert Path("/sys/kernel/mm/ksm/pages_to_scan").read_text().strip() == "1234"
    # Workers notice their parent's death and exit on their own.
    deadline = time.monotonic() + 10
    while any(psutil.pid_exists(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(psutil.pid_exists(p) for p in workers)
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator", "restore", str(results_dir / "sigkill")],
        cwd=REPO,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0, out.stderr
    assert "pages_to_scan=" in out.stdout
    assert snapshot() == ksm_guard


def test_resume_skips_exactly_the_finished_trials(results_dir, ksm_guard):
    text = plan_text("resume", pts=(1000, 3000), measure_s=2)
    first = sweep(text, results_dir)
    assert first.ran == 4
    trials = sorted((results_dir / "resume/trials").iterdir())
    # Pretend the sweep died during two trials: one mid-write (no trial.json), one failed.
    (trials[0] / "trial.json").unlink()
    failed = json.loads((trials[1] / "trial.json").read_text()) | {"status": "failed", "reason": "x"}
    (trials[1] / "trial.json").write_text(json.dumps(failed))
    untouched = {t.name: (t / "trial.json").stat().st_mtime_ns for t in trials[2:]}
    with pytest.raises(StoreError, match="already exists"):
        sweep(text, results_dir)
    with pytest.raises(StoreError, match="plan differs"):
        sweep(text.replace("processes = 2", "processes = 1"), results_dir, resume=True)
    second = sweep(text, results_dir, resume=True)
    assert (second.ran, second.skipped) == (2, 2)
    assert {t.name: (t / "trial.json").stat().st_mtime_ns for t in trials[2:]} == untouched
    table = pd.read_csv(results_dir / "resume/trials.csv")
    assert len(table) == 4 and (table["status"] == "ok").all()


def _knob(name: str) -> str:
    return Path("/sys/kernel/mm/ksm", name).read_text().strip()


def test_outside_load_flags_the_disturbed_trial_and_reruns_it(tmp_path, results_dir, ksm_guard):
    """A CPU hog that is not the study's (the test's child, not the sweep's) runs while the
    second trial measures: that trial, and only that one, is flagged; its rerun is clean."""
    plan = tmp_path / "plan.toml"
    plan.write_text(
        plan_text("disturbed", fills=("same",), pts=(1000, 2000, 4000), measure_s=4).replace(
            "[study]", "[study]\nrerun_disturbed = true"
        )
    )
    sweep = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "sweep", str(plan), "--results", str(results_dir), "--no-report"],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    hog = None
    try:
        deadline = time.monotonic() + 300
        while hog is None or hog.poll() is None:  # start the hog once, stop it when trial 2 ends
            if sweep.poll() is not None or time.monotonic() > deadline:
                break
            measuring_2000 = _knob("pages_to_scan") == "2000" and _knob("run") == "1"
            if hog is None and measuring_2000:
                hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            elif hog is not None and not measuring_2000:
                hog.kill()
                hog.wait()
            time.sleep(0.05)
        assert hog is not None, "the second trial was never seen measuring"
        assert sweep.wait(300) == 0
    finally:
        for proc in (hog, sweep):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    table = pd.read_csv(results_dir / "disturbed" / "trials.csv").set_index("trial_id")
    assert (table["status"] == "ok").all()
    disturbed = table[table["disturbed"] == True]  # noqa: E712 - a column of True/False
    assert len(disturbed) == 1, table[["outside_cpu_pct", "disturbed"]]
    original = disturbed.index[0]
    assert original.startswith("pts2000")
    assert disturbed["outside_cpu_pct"].iloc[0] > 30  # a busy loop for most of measure
    rerun = table.loc[f"{original}-rerun1"]
    assert rerun["rerun_of"] == original and not rerun["disturbed"]
    # It ran at once, inside its block: the next trial to start after the one it replaces.
    assert rerun["rerun_in_block"]
    started = sorted(
        table.index,
        key=lambda t: json.loads((results_dir / "disturbed" / "trials" / t / "trial.json").read_text())["started_wall"],
    )
    assert started[started.index(original) + 1] == f"{original}-rerun1"
    calm = table.drop(index=[original])
    assert (calm["outside_cpu_pct"] < 5).all(), calm["outside_cpu_pct"]
    # The disturbed trial is kept, marked; a resume does not run the rerun again.
    text = plan.read_text()
    again = run_sweep(parse_plan(text), text, results_dir, resume=True)
    assert again.ran == 0 and again.reruns == 0


class _NoProgress:
    def __init__(self, total: int) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def start_trial(self, trial) -> None:
        pass

    def phase(self, name: str) -> None:
        pass

    def advance(self, trial, status: str) -> None:
        pass


class FillDiskAfterFirstTrial(_NoProgress):
    """After the first trial is stored, fill the results file system to the last byte."""

    def __init__(self, total: int, folder: Path) -> None:
        super().__init__(total)
        self.folder = folder
        self.done = 0

    def advance(self, trial, status: str) -> None:
        self.done += 1
        if self.done == 1:
            with open(self.folder / "filler", "wb") as handle:
                try:
                    while True:
                        handle.write(b"\0" * 65536)
                except OSError:
                    pass


def test_a_full_results_disk_stops_the_study_keeps_what_was_written_and_resumes(tmp_path, ksm_guard):
    import shutil

    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    results = tmp_path / "small"
    results.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(results)], check=True)
    try:
        text = plan_text("full", fills=("same",), pts=(1000, 2000, 4000), measure_s=2)
        with pytest.raises(StoreError, match="--resume"):
            run_sweep(
                parse_plan(text), text, results, progress_factory=lambda total: FillDiskAfterFirstTrial(total, results)
            )
        assert snapshot() == ksm_guard  # the host was restored on the way out
        finished = [p for p in (results / "full" / "trials").iterdir() if (p / "trial.json").exists()]
        assert len(finished) == 1  # the first trial, intact
        assert json.loads((finished[0] / "trial.json").read_text())["status"] == "ok"
        (results / "filler").unlink()
        again = run_sweep(parse_plan(text), text, results, resume=True)
        assert (again.skipped, again.ran, again.failed) == (1, 2, 0)
        assert len(pd.read_csv(results / "full" / "trials.csv")) == 3
    finally:
        subprocess.run(["umount", str(results)], check=False)


def test_the_next_sweep_heals_what_a_killed_sweep_left(results_dir, ksm_guard, tmp_path, monkeypatch):
    """A sweep killed with SIGKILL restores nothing: its knobs stay changed. The next sweep finds
    its marker (the host lock was free, so it is dead) and puts the knobs back first."""
    from orchestrator import sweep as sweep_module
    from orchestrator.host.ksm import KSM_SYSFS as _KSM

    monkeypatch.setenv("KSM_LAB_RUN_DIR", str(tmp_path / "run"))
    knob = Path("/") / _KSM / "sleep_millisecs"
    original = ksm_guard["sleep_millisecs"]
    killed = tmp_path / "killed-study"
    killed.mkdir()
    (killed / "settings-record.json").write_text(
        json.dumps([{"path": str(_KSM / "sleep_millisecs"), "old": original, "new": "4321"}])
    )
    knob.write_text("4321")  # what the killed sweep left on the host
    marker = sweep_module.running_marker()
    marker.parent.mkdir(parents=True)
    marker.write_text(json.dumps({"study": str(killed), "pid": 999999}))
    outcome = sweep(plan_text("heal", fills=("same",), measure_s=2, pts=(1000,)), results_dir)
    assert (pd.read_csv(outcome.study.path / "trials.csv")["status"] == "ok").all()
    assert knob.read_text().strip() == original  # healed first, so this sweep restored to the original
    assert not marker.exists()
    record = json.loads((outcome.study.path / "settings-record.json").read_text())
    assert all(e["old"] != "4321" for e in record)
