"""The command line: one name, exit codes, --json, -c/--connect, the study's sweep.log."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from orchestrator import __version__
from orchestrator.cli import main as cli, runlog
from orchestrator.guests.hostsetup import CheckResult
from orchestrator.plan import load_plan
from orchestrator.store.study import Study
from orchestrator.runners.base import StopFlag, stop_on_signals
from orchestrator.sweep import SweepOutcome

REPO = Path(__file__).resolve().parent.parent
PLANS = REPO / "plans"


@pytest.fixture(autouse=True)
def _no_default_uri(monkeypatch):
    monkeypatch.delenv("LIBVIRT_DEFAULT_URI", raising=False)
    yield
    runlog.close_study_log()


def test_version_and_one_program_name(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"ksm-lab {__version__}"
    env = {**os.environ, "COLUMNS": "100"}
    module = subprocess.run(
        [sys.executable, "-m", "orchestrator", "--help"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert module.returncode == 0
    assert module.stdout.startswith("usage: ksm-lab ")
    assert "143 SIGTERM" in module.stdout


def test_bad_plan_is_exit_2_in_one_message(tmp_path, capsys):
    plan = tmp_path / "bad.toml"
    plan.write_text('[study]\nname = "x"\n[workload]\ntype = "processes"\nprocesses = -2\n')
    assert cli.main(["sweep", str(plan), "--dry-run"]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "workload.processes" in err and "Traceback" not in err


def _fake_study(tmp_path: Path) -> Path:
    study = Study.create(tmp_path / "results", "s", "plan text\n", ["t1"], resume=False)
    return study.path


def test_unexpected_error_is_exit_3_one_line_and_a_traceback_file(tmp_path, capsys, monkeypatch):
    from orchestrator.report import study as report

    def broken(study_dir):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(report, "write_report", broken)
    study_dir = _fake_study(tmp_path)
    assert cli.main(["report", str(study_dir)]) == cli.EXIT_BUG
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.count("\n") == 1 and "unexpected RuntimeError: boom second line" in err
    (saved,) = study_dir.glob("ksm-lab-error-*.log")
    assert str(saved) in err
    text = saved.read_text()
    assert "Traceback" in text and "boom" in text and "report" in text.splitlines()[0]


def test_a_full_disk_while_writing_is_exit_2_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    import errno

    from orchestrator.report import study as report

    target = tmp_path / "results" / "s" / "report" / "report.html"

    def disk_full(study_dir):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))

    monkeypatch.setattr(report, "write_report", disk_full)
    assert cli.main(["report", str(_fake_study(tmp_path))]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"cannot use {target}: No space left on device" in err


def _quickstart(tmp_path: Path) -> Path:
    plan = tmp_path / "quickstart.toml"
    plan.write_text((PLANS / "quickstart.toml").read_text())
    return plan


def _fake_sweep(monkeypatch, body):
    """Replace run_sweep with one that makes the study folder, tells the CLI, then runs body."""
    from orchestrator import sweep

    def fake(plan, plan_text, results_dir, resume=False, progress_factory=None, root=Path("/"), on_study=None):
        trials = [t.trial_id for t in __import__("orchestrator.plan", fromlist=["expand"]).expand(plan)]
        study = Study.create(results_dir, plan.study.name, plan_text, trials, resume)
        on_study(study)
        return body(study)

    monkeypatch.setattr(sweep, "run_sweep", fake)


def test_a_bug_during_the_sweep_leaves_its_traceback_in_sweep_log(tmp_path, capsys, monkeypatch):
    long_message = ("a log line well beyond eighty columns " * 4).strip()

    def body(study):
        logging.getLogger("orchestrator.sweep").info(long_message)
        raise ValueError("bug inside")

    _fake_sweep(monkeypatch, body)
    results = tmp_path / "results"
    assert cli.main(["sweep", str(_quickstart(tmp_path)), "--results", str(results)]) == cli.EXIT_BUG
    err = capsys.readouterr().err
    log_path = results / "quickstart" / "sweep.log"
    assert "Traceback" not in err and str(log_path) in err
    lines = log_path.read_text().splitlines()
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d INFO ", lines[0])
    assert any(line.endswith(long_message) for line in lines)  # one line, not wrapped
    assert "Traceback" in log_path.read_text() and "ValueError: bug inside" in log_path.read_text()


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_sweep_exits_128_plus_the_signal(tmp_path, capsys, monkeypatch, signum, code):
    _fake_sweep(monkeypatch, lambda study: SweepOutcome(study, ran=1, failed=1, interrupted=True, stop_signal=signum))
    argv = ["sweep", str(_quickstart(tmp_path)), "--results", str(tmp_path / "r"), "--no-report", "--json"]
    assert cli.main(argv) == code
    summary = json.loads(capsys.readouterr().out)
    assert summary["exit_code"] == code and summary["signal"] == signal.Signals(signum).name
    assert summary["interrupted"] and summary["trials"][0]["status"] == "not_run"
    assert summary["log"].endswith("sweep.log") and Path(summary["log"]).is_file()


def test_a_clear_error_after_the_study_started_is_in_sweep_log_too(tmp_path, capsys, monkeypatch):
    from orchestrator.errors import StoreError

    def body(study):
        raise StoreError("cannot write trial t1: No space left on device")

    _fake_sweep(monkeypatch, body)
    results = tmp_path / "results"
    assert cli.main(["sweep", str(_quickstart(tmp_path)), "--results", str(results)]) == cli.EXIT_ERROR
    assert "No space left on device" in capsys.readouterr().err
    assert (
        "ERROR   orchestrator.cli.main: error: cannot write trial t1" in (results / "quickstart/sweep.log").read_text()
    )


def test_failed_trials_are_exit_1_and_never_3(tmp_path, capsys, monkeypatch):
    _fake_sweep(monkeypatch, lambda study: SweepOutcome(study, ran=2, failed=1))
    argv = ["sweep", str(_quickstart(tmp_path)), "--results", str(tmp_path / "r"), "--no-report"]
    assert cli.main(argv) == cli.EXIT_FAILED
    assert capsys.readouterr().out.strip().endswith("trials.csv")


def test_stop_flag_remembers_the_first_signal():
    stop = StopFlag()
    with stop_on_signals(stop):
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.wait(5)
        os.kill(os.getpid(), signal.SIGINT)
    assert stop.signum == signal.SIGTERM
    plain = threading.Event()  # a plain event still works, it just remembers nothing
    with stop_on_signals(plain):
        os.kill(os.getpid(), signal.SIGINT)
        assert plain.wait(5)


VM_PLAN = '[study]\nname = "vm"\n[workload]\ntype = "idle"\n[guests]\ncount = 1\nuri = "qemu:///session"\n'


def _dry_run_uri(tmp_path, capsys, *extra: str) -> str:
    plan = tmp_path / "vm.toml"
    plan.write_text(VM_PLAN)
    assert cli.main(["sweep", str(plan), "--dry-run", "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)["uri"]


def test_connect_beats_the_environment_which_beats_the_plan(tmp_path, capsys, monkeypatch):
    assert _dry_run_uri(tmp_path, capsys) == "qemu:///session"
    monkeypatch.setenv("LIBVIRT_DEFAULT_URI", "test:///default")
    assert _dry_run_uri(tmp_path, capsys) == "test:///default"
    assert _dry_run_uri(tmp_path, capsys, "-c", "qemu:///system") == "qemu:///system"
    plan, _ = load_plan(tmp_path / "vm.toml")
    assert cli._with_uri(plan, "qemu+ssh://lab/system").guests.uri == "qemu+ssh://lab/system"


def test_a_vm_plan_whose_libvirt_is_unreachable_is_refused_before_it_starts(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LIBVIRT_DEFAULT_URI", raising=False)
    plan = tmp_path / "vm.toml"
    plan.write_text(VM_PLAN.replace("qemu:///session", f"qemu+unix:///system?socket={tmp_path}/no.sock"))
    results = tmp_path / "results"
    assert cli.main(["sweep", str(plan), "--results", str(results)]) == 2
    err = capsys.readouterr().err
    assert "refusing to start" in err and "no.sock" in err
    assert not (results / "vm").exists()  # no study folder, no failed trial


def test_check_probes_the_uri_the_plan_or_option_names(tmp_path, monkeypatch):
    from orchestrator import preflight

    seen = []
    monkeypatch.setattr(preflight, "check_host", lambda plan_needs_vms, uri: seen.append(uri) or [])
    plan = tmp_path / "vm.toml"
    plan.write_text(VM_PLAN)
    preflight.run_checks(plan)
    preflight.run_checks(None)
    preflight.run_checks(plan, connect="test:///default")
    monkeypatch.setenv("LIBVIRT_DEFAULT_URI", "qemu+ssh://lab/system")
    preflight.run_checks(plan)
    assert seen == ["qemu:///session", "qemu:///system", "test:///default", "qemu+ssh://lab/system"]


@pytest.mark.parametrize(("blocking", "code"), [(False, 0), (True, 1)])
def test_check_json(monkeypatch, capsys, blocking, code):
    from orchestrator import preflight

    calls = []

    def fake(plan_path, connect=None):
        calls.append((plan_path, connect))
        return [CheckResult("KSM", True, "fine"), CheckResult("kvm", False, "no", blocking=blocking)]

    monkeypatch.setattr(preflight, "run_checks", fake)
    assert cli.main(["check", "--json", "-c", "test:///default"]) == code
    data = json.loads(capsys.readouterr().out)
    assert data["ready"] is (not blocking)
    assert data["checks"][1] == {"name": "kvm", "ok": False, "blocking": blocking, "detail": "no"}
    assert calls == [(None, "test:///default")]


def test_image_list_json(tmp_path, capsys):
    assert cli.main(["image", "--cache-dir", str(tmp_path), "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"cache_dir": str(tmp_path), "images": [], "states": []}


def test_report_json_is_the_study_summary(tmp_path, capsys, monkeypatch):
    from orchestrator.report import study as report

    monkeypatch.setattr(report, "write_report", lambda study_dir: study_dir / "report" / "report.html")
    study_dir = _fake_study(tmp_path)
    assert cli.main(["report", str(study_dir), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["name"] == "s" and data["status_counts"] == {"not_run": 1}
    assert data["report"].endswith("report.html") and data["log"] is None


def test_cleanup_connects_where_told(monkeypatch, capsys, tmp_path):
    from orchestrator.guests import cleanup as cleanup_module

    # cleanup takes the host lock: a private one, never the real sweep's.
    monkeypatch.setenv("KSM_LAB_RUN_DIR", str(tmp_path))
    monkeypatch.setenv("KSM_LAB_IMAGE_CACHE", str(tmp_path / "images"))
    seen = []
    monkeypatch.setattr(cleanup_module, "cleanup", lambda uri, study=None: seen.append(uri) or [])
    assert cli.main(["cleanup"]) == 0
    monkeypatch.setenv("LIBVIRT_DEFAULT_URI", "test:///default")
    assert cli.main(["cleanup"]) == 0
    assert cli.main(["cleanup", "--connect", "qemu:///session"]) == 0
    assert cli.main(["cleanup", "--uri", "qemu:///system"]) == 0  # the old spelling
    assert seen == ["qemu:///system", "test:///default", "qemu:///session", "qemu:///system"]


def test_the_sweep_analyses_the_study_once_and_the_report_reuses_it(tmp_path, capsys, monkeypatch):
    """trials.csv and the report come from one analysis: `sweep` hands the report the one its
    trials.csv was made of (a study written by plans/quickstart.toml, tests/data)."""
    import shutil

    from orchestrator.analysis import studymetrics
    from orchestrator.analysis.studymetrics import StudyAnalysis

    computed: list[Path] = []
    real = studymetrics.compute_study

    def counted(study):
        computed.append(study.study_dir)
        return real(study)

    monkeypatch.setattr(studymetrics, "compute_study", counted)

    def body(study):
        shutil.copytree(
            Path(__file__).parent / "data" / "study-v1-quickstart" / "trials", study.trials_dir, dirs_exist_ok=True
        )
        return SweepOutcome(study, ran=7, analysis=StudyAnalysis.of(study.path))

    _fake_sweep(monkeypatch, body)
    results = tmp_path / "r"
    assert cli.main(["sweep", str(_quickstart(tmp_path)), "--results", str(results)]) == cli.EXIT_OK
    assert len(computed) == 1
    assert (results / "quickstart" / "report" / "report.html").is_file()
    assert cli.main(["report", str(results / "quickstart")]) == cli.EXIT_OK  # `report` alone analyses it
    assert len(computed) == 2
