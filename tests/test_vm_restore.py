"""Trials that restore saved guests on qemu:///system: every trial starts from the same guest
memory and disk, on fresh overlays; the restored guest proves it is the saved one; and nothing
is left behind after success, SIGINT, or SIGKILL + `cleanup`.

Marked vm (slow, needs `make host` and the image) and ksm (changes the host's one KSM)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import libvirt
import pandas as pd
import psutil
import pytest

from orchestrator.guests import images, states
from orchestrator.plan import parse_plan
from orchestrator.sweep import run_sweep
from tests.hoststate import snapshot
from tests.vmhost import files_under, need_vm_host, restore_plan, studies_guests

pytestmark = [pytest.mark.vm, pytest.mark.ksm]
REPO = Path(__file__).resolve().parent.parent
URI = "qemu:///system"


def _ours(study: str) -> dict[str, list]:
    return studies_guests(study)


def idle_plan(
    study: str, workdir: Path, pts: list[int], measure_s: float = 3, cache: bool = False, memory_mib: int = 640
) -> str:
    return restore_plan(study, workdir, pts, measure_s=measure_s, cache=cache, memory_mib=memory_mib)


def test_every_trial_restores_the_saved_guests_onto_fresh_overlays(tmp_path, results_dir, ksm_guard):
    need_vm_host()
    study = f"pyt-restore-{os.getpid()}"
    # Fast scanning: 2 x 640 MiB of guest RAM is scanned twice (needed to merge) within measure.
    text = idle_plan(study, tmp_path / "work", [20000, 40000], measure_s=6)
    outcome = run_sweep(parse_plan(text), text, results_dir)
    assert (outcome.ran, outcome.failed) == (2, 0), (results_dir / study / "trials.csv").read_text()
    table = pd.read_csv(results_dir / study / "trials.csv")
    first, second = (
        json.loads((results_dir / study / "trials" / t / "trial.json").read_text())["provision"]
        for t in table["trial_id"]
    )
    assert first["start"] == second["start"] == "restore"
    assert (first["state_reused"], second["state_reused"]) == (False, True)
    assert first["state"] == second["state"]
    # The marker check passed (else the trial would have failed) and the clocks were set.
    for info in (first, second):
        assert set(info["clock_offset_s"]) == set(info["restore_s"]) and len(info["restore_s"]) == 2
        assert info["start_s"] < 60
    assert not set(first["overlays"]) & set(second["overlays"])  # fresh overlays per trial
    for trial_id in table["trial_id"]:  # restored QEMUs' guest RAM is marked mergeable too
        mergeable = json.loads((results_dir / study / "trials" / trial_id / "trial.json").read_text())["mergeable"]
        assert len(mergeable) == 2 and all(g["mergeable"] is True for g in mergeable.values()), mergeable
    # The saved guests' memory merges again in each trial: same state, same saving.
    assert (table["saved_mib"] > 0).all()
    # cache_states = false: states went with the study; nothing else is left either.
    assert _ours(study) == {"domains": [], "qemu": []}
    assert files_under(tmp_path / "work") == []


def test_a_guest_that_is_not_the_saved_one_is_refused(tmp_path, results_dir, ksm_guard):
    """Build a cached state, break its marker record, and the next restore must refuse it."""
    image = need_vm_host()
    study = f"pyt-ident-{os.getpid()}"
    text = idle_plan(study, tmp_path / "work", [1000], cache=True, memory_mib=576)
    root = states.states_root(Path(image.manifest_path).parent, images.default_cache_dir(), image.disk_path)
    before = {p.name for p in root.iterdir()} if root.exists() else set()
    try:
        assert run_sweep(parse_plan(text), text, results_dir).failed == 0
        (new,) = {p.name for p in root.iterdir()} - before
        meta_path = root / new / states.STATE_FILE
        meta = json.loads(meta_path.read_text())
        meta["guests"][0]["marker"] = "not-the-saved-guest"
        meta_path.write_text(json.dumps(meta))
        again = text.replace(f'name = "{study}"', f'name = "{study}-2"')
        outcome = run_sweep(parse_plan(again), again, results_dir)
        assert outcome.failed == 1
        record = pd.read_csv(results_dir / f"{study}-2" / "trials.csv").iloc[0]
        assert "is not the saved guest" in record["reason"]
    finally:
        for name in ({p.name for p in root.iterdir()} - before) if root.exists() else ():
            shutil.rmtree(root / name)
    assert _ours(study) == _ours(f"{study}-2") == {"domains": [], "qemu": []}
    assert files_under(tmp_path / "work") == []


def _sweep_until_measuring(plan: Path, results_dir: Path, pts: int, output: Path | None = None) -> subprocess.Popen:
    """Start the sweep and return once its trial at pages_to_scan=pts measures; its terminal
    output (wide, so messages are not wrapped) goes to `output` when given."""
    with output.open("w") if output else open(os.devnull, "w") as out:
        sweep = subprocess.Popen(
            [sys.executable, "-m", "orchestrator", "sweep", str(plan), "--results", str(results_dir), "--no-report"],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "COLUMNS": "400"},
        )
    deadline = time.monotonic() + 600
    while (
        Path("/sys/kernel/mm/ksm/pages_to_scan").read_text().strip() != str(pts)
        or Path("/sys/kernel/mm/ksm/run").read_text().strip() != "1"
    ):
        if sweep.poll() is not None:
            raise AssertionError("sweep ended before its measure phase")
        if time.monotonic() > deadline:
            sweep.kill()
            raise AssertionError("guests never reached the measure phase")
        time.sleep(0.5)
    return sweep


def _lose_a_guest_mid_measure(tmp_path: Path, results_dir: Path, study: str, pts: int, act: str) -> tuple[dict, str]:
    """Run a one-trial restored study, do `act` ("destroy", "suspend") to one guest while it
    measures, and return (the trial's record, the guest's name) once the sweep has ended with
    "some trials failed" within 60 s."""
    plan = tmp_path / "plan.toml"
    plan.write_text(idle_plan(study, tmp_path / "work", [pts], measure_s=600))
    sweep = _sweep_until_measuring(plan, results_dir, pts)
    try:
        victim = sorted(_ours(study)["domains"])[0]
        with libvirt.open(URI) as conn:
            getattr(conn.lookupByName(victim), act)()
        acted_at = time.monotonic()
        assert sweep.wait(120) == 1  # some trials failed: not an error of the tool
        assert time.monotonic() - acted_at < 60
    finally:
        if sweep.poll() is None:
            sweep.kill()
            sweep.wait()
    record = json.loads(next((results_dir / study / "trials").glob("*/trial.json")).read_text())
    return record, victim


def _cleanup_leaves_nothing(study: str, workdir: Path) -> None:
    """`cleanup --study` after a sweep that could not tear down: no domain, QEMU or file left."""
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator", "cleanup", "--study", study],
        cwd=REPO,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=180,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    deadline = time.monotonic() + 30
    while _ours(study)["qemu"] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _ours(study) == {"domains": [], "qemu": []}
    assert files_under(workdir) == []  # no overlay, console log or stray save file


def test_sigint_during_a_restored_trial_leaves_nothing(tmp_path, results_dir, ksm_guard):
    need_vm_host()
    study = f"pyt-rint-{os.getpid()}"
    plan = tmp_path / "plan.toml"
    plan.write_text(idle_plan(study, tmp_path / "work", [4322], measure_s=600))
    sweep = _sweep_until_measuring(plan, results_dir, 4322)
    try:
        qemus = _ours(study)["qemu"]
        assert qemus, "no QEMU process while measuring"
        # Restored guests, too, run as libvirt's unprivileged user (libvirt-qemu here), not root.
        assert "root" not in {psutil.Process(pid).username() for pid in qemus}
        sweep.send_signal(signal.SIGINT)
        assert sweep.wait(120) == 130
    finally:
        if sweep.poll() is None:
            sweep.kill()
            sweep.wait()
    assert _ours(study) == {"domains": [], "qemu": []}
    assert files_under(tmp_path / "work") == []  # overlays, console logs and the uncached states
    assert snapshot() == ksm_guard


def test_sigkilled_restored_trial_then_cleanup_leaves_nothing(tmp_path, results_dir, ksm_guard):
    need_vm_host()
    study = f"pyt-rkill-{os.getpid()}"
    plan = tmp_path / "plan.toml"
    plan.write_text(idle_plan(study, tmp_path / "work", [4323], measure_s=600))
    sweep = _sweep_until_measuring(plan, results_dir, 4323)
    sweep.send_signal(signal.SIGKILL)
    sweep.wait(30)
    assert _ours(study)["domains"]  # SIGKILL leaves them: that is what cleanup is for
    _cleanup_leaves_nothing(study, tmp_path / "work")
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator", "restore", str(results_dir / study)],
        cwd=REPO,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0, out.stderr
    assert snapshot() == ksm_guard


def test_a_guest_destroyed_mid_measure_fails_the_trial_with_its_console(tmp_path, results_dir, ksm_guard):
    need_vm_host()
    study = f"pyt-rlost-{os.getpid()}"
    # destroy: what an OOM kill or a crash looks like from here
    record, victim = _lose_a_guest_mid_measure(tmp_path, results_dir, study, 4324, "destroy")
    assert record["status"] == "failed"
    # The lifecycle event ("was destroyed") or the state check that races it ("is shut off").
    assert "lost mid-trial" in record["reason"] and victim in record["reason"] and "console" in record["reason"]
    assert _ours(study) == {"domains": [], "qemu": []}
    assert files_under(tmp_path / "work") == []
    assert snapshot() == ksm_guard


def _libvirtd_pid() -> int:
    pid = int(Path("/run/libvirtd.pid").read_text().split()[0])
    assert Path(f"/proc/{pid}/comm").read_text().strip() == "libvirtd", "the pid file does not name libvirtd"
    return pid


def test_libvirtd_stopped_mid_trial_ends_the_study_with_what_to_do(tmp_path, results_dir, ksm_guard):
    """SIGSTOP libvirtd while a trial measures: keepalive turns the silence into an error, the
    trial fails as the host's problem, the study ends there (no later trial waits on a dead
    daemon), the KSM knobs are put back, and the message says to run cleanup. After SIGCONT,
    `cleanup --study` leaves nothing."""
    need_vm_host()
    libvirtd = _libvirtd_pid()
    study = f"pyt-rstop-{os.getpid()}"
    plan = tmp_path / "plan.toml"
    plan.write_text(idle_plan(study, tmp_path / "work", [4325, 4326], measure_s=600))
    output = tmp_path / "sweep.out"
    sweep = _sweep_until_measuring(plan, results_dir, 4325, output)
    try:
        os.kill(libvirtd, signal.SIGSTOP)
        try:
            stopped_at = time.monotonic()
            code = sweep.wait(240)
            took_s = time.monotonic() - stopped_at
        finally:
            os.kill(libvirtd, signal.SIGCONT)
    finally:
        if sweep.poll() is None:
            sweep.kill()
            sweep.wait()
    text = output.read_text()
    assert code == 2, text[-3000:]  # a clear error, not "some trials failed" and not a traceback
    assert "stopped answering" in text and f"cleanup --study {study}" in text, text[-3000:]
    assert took_s < 120
    records = [json.loads(p.read_text()) for p in (results_dir / study / "trials").glob("*/trial.json")]
    assert len(records) == 1 and records[0]["status"] == "failed"  # the second trial never started
    assert "stopped answering" in records[0]["reason"]
    assert snapshot() == ksm_guard  # the knobs went back without libvirt
    _cleanup_leaves_nothing(study, tmp_path / "work")


def test_a_guest_paused_mid_measure_fails_the_trial_and_never_hangs(tmp_path, results_dir, ksm_guard):
    """A paused guest (QEMU pauses one whose disk is full; here libvirt's suspend does it) keeps
    its QEMU process and answers nothing: the lifecycle event must fail the trial at once, and
    the sweep go on to tear it down, not wait on the silent guest."""
    need_vm_host()
    study = f"pyt-rpause-{os.getpid()}"
    record, victim = _lose_a_guest_mid_measure(tmp_path, results_dir, study, 4327, "suspend")
    assert record["status"] == "failed"
    assert "lost mid-trial" in record["reason"] and victim in record["reason"] and "paused" in record["reason"]
    assert _ours(study) == {"domains": [], "qemu": []}
    assert files_under(tmp_path / "work") == []
    assert snapshot() == ksm_guard
