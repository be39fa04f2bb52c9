"""contrib/ksm-lab-nightly.sh: dated folders, resume, no overlap, compare with the last good night.

All but the last test run the script with KSM_LAB_NIGHTLY_SWEEP pointing at tests/fake_sweep.py
(hand-made studies, no KSM). The last runs the real sweep twice on a tiny processes plan and is
marked ksm: it changes the host's KSM knobs (and puts them back)."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.store import catalog

CHECKOUT = Path(__file__).resolve().parents[1]
SCRIPT = CHECKOUT / "contrib" / "ksm-lab-nightly.sh"
FAKE_SWEEP = Path(__file__).with_name("fake_sweep.py")
PLAN = '[study]\nname = "nightly"\nrepetitions = 3\n\n[sweep.ksm]\npages_to_scan = [100, 1000]\n'
HOST = os.uname().nodename


def _env(tmp_path: Path, fake: bool = True, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KSM_LAB", "FAKE_SWEEP"))}
    env.update(
        {
            "PYTHONPATH": str(CHECKOUT),  # this checkout's orchestrator, whatever the venv installed
            "KSM_LAB_PYTHON": sys.executable,
            "KSM_LAB": f"{sys.executable} -m orchestrator",
            "FAKE_SWEEP_LOG": str(tmp_path / "sweep.log"),
        }
    )
    if fake:
        env["KSM_LAB_NIGHTLY_SWEEP"] = f"{sys.executable} {FAKE_SWEEP}"
    env.update(extra)
    return env


def _night(tmp_path: Path, root: Path, plan: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), str(plan), str(root)],
        env=_env(tmp_path, **extra),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _sweeps(tmp_path: Path) -> list[list[str]]:
    log = tmp_path / "sweep.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.fixture()
def plan(tmp_path: Path) -> Path:
    path = tmp_path / "nightly.toml"
    path.write_text(PLAN)
    return path


def test_first_night_has_nothing_to_compare_second_night_compares_with_it(tmp_path: Path, plan: Path) -> None:
    root = tmp_path / "results"
    first = _night(tmp_path, root, plan)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "nothing to compare with (first night)" in first.stdout
    second = _night(tmp_path, root, plan)
    assert second.returncode == 0, second.stdout + second.stderr
    studies = catalog.scan(root)
    assert [e.state for e in studies] == [catalog.GOOD, catalog.GOOD]
    night1, night2 = (e.path for e in studies)
    assert night1.parent.parent == night2.parent.parent == root / "nightly"  # RESULTS/<name>/<date>/<name>
    assert night1 != night2
    assert f"compare {night1} -> {night2}" in second.stdout
    compared = json.loads((night2 / "report" / "compare.json").read_text())
    assert compared["a"]["path"] == str(night1) and compared["b"]["path"] == str(night2)
    assert compared["regressions"] == 0
    assert (night2 / "report" / "compare.html").exists() and (root / "history.html").exists()
    assert all("--resume" not in call for call in _sweeps(tmp_path))


def test_a_regression_makes_the_job_exit_1_once_there_are_enough_nights(tmp_path: Path, plan: Path) -> None:
    root = tmp_path / "results"
    assert _night(tmp_path, root, plan).returncode == 0
    early = _night(tmp_path, root, plan, FAKE_SWEEP_SAVED_MIB="30", KSM_LAB_NO_CONFIRM="1")
    assert early.returncode == 0, early.stdout  # one earlier night: "unconfirmed", no band yet
    assert "unconfirmed" in early.stdout and "3 needed" in " ".join(early.stdout.split())
    root = tmp_path / "later"
    for _ in range(4):
        assert _night(tmp_path, root, plan).returncode == 0
    worse = _night(tmp_path, root, plan, FAKE_SWEEP_SAVED_MIB="30", KSM_LAB_NO_CONFIRM="1")
    assert worse.returncode == 1, worse.stdout + worse.stderr
    assert "REGRESSION (not re-measured" in worse.stdout
    looser = _night(
        tmp_path,
        root,
        plan,
        FAKE_SWEEP_SAVED_MIB="29.5",
        KSM_LAB_NO_CONFIRM="1",
        KSM_LAB_COMPARE_ARGS="--max-saving-drop-pct 50",
    )
    assert looser.returncode == 0, looser.stdout  # the same band, a looser rule


def test_an_interrupted_night_is_resumed_then_compared(tmp_path: Path, plan: Path) -> None:
    root = tmp_path / "results"
    assert _night(tmp_path, root, plan).returncode == 0
    cut = _night(tmp_path, root, plan, FAKE_SWEEP_INTERRUPT="1")
    assert cut.returncode == 143 and "the next run resumes" in cut.stdout
    interrupted = catalog.latest(catalog.scan(root))
    assert interrupted.state == catalog.UNFINISHED
    resumed = _night(tmp_path, root, plan)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    last = _sweeps(tmp_path)[-1]
    assert "--resume" in last and last[last.index("--results") + 1] == str(interrupted.path.parent)
    studies = catalog.scan(root)
    assert len(studies) == 2 and all(e.good for e in studies)
    assert f"compare {studies[0].path} -> {interrupted.path}" in resumed.stdout


def test_an_unfinished_night_of_another_plan_text_is_not_resumed(tmp_path: Path, plan: Path) -> None:
    root = tmp_path / "results"
    assert _night(tmp_path, root, plan, FAKE_SWEEP_INTERRUPT="1").returncode == 143
    plan.write_text(PLAN.replace("[100, 1000]", "[100, 1000] # changed"))
    again = _night(tmp_path, root, plan)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "started with another plan text: starting a new one" in again.stdout
    assert "--resume" not in _sweeps(tmp_path)[-1]


def test_refuses_to_overlap_with_a_run_still_going(tmp_path: Path, plan: Path) -> None:
    root = tmp_path / "results"
    root.mkdir()
    with open(root / ".ksm-lab-nightly.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        blocked = _night(tmp_path, root, plan)
    assert blocked.returncode == 75 and "still holds" in blocked.stdout
    assert _sweeps(tmp_path) == [] and catalog.scan(root) == []


def test_nights_skipped_in_a_row_fail_loudly_and_a_run_resets_the_count(tmp_path: Path, plan: Path) -> None:
    root = tmp_path / "results"
    root.mkdir()
    with open(root / ".ksm-lab-nightly.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        codes = [_night(tmp_path, root, plan, KSM_LAB_MAX_SKIPPED="3") for _ in range(3)]
    assert [c.returncode for c in codes] == [75, 75, 2]
    assert "3 nights in a row skipped" in codes[2].stdout
    assert _night(tmp_path, root, plan).returncode == 0  # the lock is free: it runs, the count goes
    assert not (root / ".ksm-lab-nightly.skipped").exists()
    with open(root / ".ksm-lab-nightly.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert _night(tmp_path, root, plan).returncode == 75


def test_a_run_holding_the_lock_for_more_than_a_day_is_reported_stuck(tmp_path: Path, plan: Path) -> None:
    import time

    root = tmp_path / "results"
    root.mkdir()
    (root / ".ksm-lab-nightly.started").write_text(f"{int(time.time()) - 2 * 86400} 4242\n")
    with open(root / ".ksm-lab-nightly.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        stuck = _night(tmp_path, root, plan)
    assert stuck.returncode == 2 and "pid 4242" in stuck.stdout and "stuck?" in stuck.stdout
    assert _sweeps(tmp_path) == []


def test_a_failing_sweep_is_an_error_and_nothing_is_compared(tmp_path: Path, plan: Path) -> None:
    root = tmp_path / "results"
    failing = _night(tmp_path, root, plan, KSM_LAB_NIGHTLY_SWEEP="false")
    assert failing.returncode == 2 and "sweep failed (exit 1)" not in failing.stdout
    assert "sweep left no study" in failing.stdout
    assert _night(tmp_path, root, tmp_path / "nope.toml").returncode == 2


def test_prune_after_the_run_when_asked(tmp_path: Path, plan: Path) -> None:
    root = tmp_path / "results"
    for _ in range(3):
        assert _night(tmp_path, root, plan, KSM_LAB_KEEP="2").returncode == 0
    assert len(catalog.scan(root)) == 2


def test_a_failed_sweep_is_not_judged_but_history_and_prune_still_run(tmp_path: Path, plan: Path) -> None:
    root = tmp_path / "results"
    for _ in range(3):
        assert _night(tmp_path, root, plan).returncode == 0
    full_disk = tmp_path / "full-disk-sweep"
    full_disk.write_text("#!/bin/sh\necho 'error: cannot write report: No space left on device' >&2\nexit 2\n")
    full_disk.chmod(0o755)
    failed = _night(tmp_path, root, plan, KSM_LAB_NIGHTLY_SWEEP=str(full_disk), KSM_LAB_KEEP="1")
    assert failed.returncode == 2 and "tonight is not compared" in failed.stdout
    assert "compare " not in failed.stdout and "history failed" not in failed.stdout
    assert len(catalog.scan(root)) == 1  # prune ran: keep 1


TINY_PLAN = """[study]
name = "nightly-tiny"
repetitions = 2
ksm_off_baseline = true

[ksm]
sleep_millisecs = 20

[workload]
type = "processes"
processes = 2
pages_per_process = 2560
rounds = 1
merge_mode = "madvise"
fill = "same"

[phases]
baseline_s = 1
measure_s = 4

[sampling]
interval_s = 0.5
pss_interval_s = 1.0

[sweep.ksm]
pages_to_scan = [100, 1000]
"""


@pytest.mark.ksm
def test_two_real_nights_on_a_tiny_processes_plan(tmp_path: Path, ksm_guard) -> None:
    plan = tmp_path / "tiny.toml"
    plan.write_text(TINY_PLAN)
    root = tmp_path / "results"
    first = _night(tmp_path, root, plan, fake=False)
    assert first.returncode in (0, 1), first.stdout + first.stderr
    second = _night(tmp_path, root, plan, fake=False)
    assert second.returncode in (0, 1), second.stdout + second.stderr  # 1: a real regression is possible
    studies = catalog.scan(root, plan="nightly-tiny", host=HOST)
    assert len(studies) == 2 and all(e.finished for e in studies)
    compared = json.loads((studies[1].path / "report" / "compare.json").read_text())
    assert compared["a"]["path"] == str(studies[0].path) and compared["b"]["path"] == str(studies[1].path)
    assert {s["setting"] for s in compared["settings"]} == {
        "KSM off",
        "ksm.pages_to_scan=100",
        "ksm.pages_to_scan=1000",
    }
    assert (root / "history.html").exists()


# --- the systemd unit ----------------------------------------------------------------------------

UNIT = CHECKOUT / "contrib" / "ksm-lab-nightly.service"
# A hardening directive that would take away what the job needs: KSM knobs under /sys, the
# results root under /var/lib, libvirtd's socket, or root's own capabilities.
BREAKS_THE_JOB = (
    "ProtectKernelTunables",
    "ProtectSystem=strict",
    "PrivateDevices",
    "DynamicUser",
    "CapabilityBoundingSet",
    "ReadOnlyPaths=/sys",
    "InaccessiblePaths=/run",
)


def test_nightly_unit_is_hardened_and_valid(tmp_path: Path) -> None:
    text = UNIT.read_text()
    directives = {
        line.split("=", 1)[0]: line.split("=", 1)[1]
        for line in text.splitlines()
        if "=" in line and not line.startswith("#")
    }
    assert directives["ProtectSystem"] == "full" and directives["PrivateTmp"] == "true"
    assert directives["NoNewPrivileges"] == "true" and directives["ProtectHome"] == "read-only"
    assert not [d for d in BREAKS_THE_JOB if d in text.replace("no ProtectKernelTunables", "")]
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    # verify needs the ExecStart binary to exist; everything else is checked as shipped.
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace(directives["ExecStart"], "/bin/true"))
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "Unknown key" not in done.stderr, done.stderr
