"""KSM policies, the adaptive search and `recommend`, without the real KSM: each rule on a
scripted input or a fake sysfs tree (tmp_path/sys/kernel/mm/ksm). Real-KSM runs of the policies
are in test_policies_ksm.py (marked ksm)."""

from __future__ import annotations

import json
import math
import os
import stat
import time
from pathlib import Path

import numpy as np
import pytest

from orchestrator.analysis import search, studymetrics
from orchestrator.cli import main as cli
from orchestrator.store import studydata
from orchestrator.errors import PlanError
from orchestrator.host import probes
from orchestrator.host.ksm import KSM_SYSFS, HostSettings, read_sysfs_value
from orchestrator.plan import check_against_host, expand, parse_plan
from orchestrator.policies import ksmtuned, kubevirt, run_for, throttler
from orchestrator.policies.params import KsmtunedParams, KubevirtParams, ThrottlerParams
from orchestrator.analysis import recommend as recommend_mod
from orchestrator.analysis.recommend import BadInput, Limits, recommend
from tests.hoststate import OLD_KERNEL_KSM, fake_ksm_tree
from tests.builders import finish_study, processes_frame, ramp_ksm_frame, start_study, sweep_study, write_trial

GIB_KIB = 1024 * 1024
MIB_PER_PAGE = 1024 * 1024 / 4096  # pages of 4 KiB in a MiB

ADVISOR = {
    "advisor_mode": "none",
    "advisor_max_cpu": "70",
    "advisor_min_pages_to_scan": "500",
    "advisor_max_pages_to_scan": "30000",
    "advisor_target_scan_time": "200",
}


def fake_root(
    tmp_path: Path, advisor: bool = True, mem_total_kib: int = 8 * GIB_KIB, mem_available_kib: int = 6 * GIB_KIB
) -> Path:
    root = tmp_path / "root"
    fake_ksm_tree(root, {**OLD_KERNEL_KSM, **(ADVISOR if advisor else {})})
    set_meminfo(root, mem_total_kib, mem_available_kib)
    return root


def set_meminfo(root: Path, total_kib: int, available_kib: int, anon_kib: int = GIB_KIB) -> None:
    (root / "proc").mkdir(exist_ok=True)
    (root / "proc/meminfo").write_text(
        f"MemTotal: {total_kib} kB\nMemFree: {available_kib // 2} kB\n"
        f"MemAvailable: {available_kib} kB\nAnonPages: {anon_kib} kB\n"
    )


def knob(root: Path, name: str) -> str:
    return read_sysfs_value(root / KSM_SYSFS / name)


PLAN = """
[study]
name = "p"
[ksm]
sleep_millisecs = 20
{ksm}
[workload]
type = "processes"
[phases]
baseline_s = 1
measure_s = 5
{extra}
"""


# ----------------------------------------------------------------------------- plan


def test_policy_is_a_sweep_axis_and_stays_out_of_the_knobs():
    plan = parse_plan(PLAN.format(ksm="", extra='[sweep.ksm]\npolicy = ["static", "advisor", "ksmtuned", "kubevirt"]'))
    by_policy = {t.policy["name"]: t for t in expand(plan)}
    assert set(by_policy) == {"static", "advisor", "ksmtuned", "kubevirt"}
    assert all("policy" not in t.ksm for t in by_policy.values())
    assert by_policy["advisor"].ksm == {"sleep_millisecs": 20, "advisor_mode": "scan-time"}
    assert by_policy["static"].ksm == {"sleep_millisecs": 20}


def test_static_trial_ids_do_not_change_with_an_explicit_static_policy():
    plain = expand(parse_plan(PLAN.format(ksm="", extra="")))
    explicit = expand(parse_plan(PLAN.format(ksm='policy = "static"', extra="")))
    assert [t.trial_id for t in plain] == [t.trial_id for t in explicit]


def test_advisor_drops_pages_to_scan_and_refuses_advisor_mode_none():
    plan = parse_plan(PLAN.format(ksm='policy = "advisor"\npages_to_scan = 500\nadvisor_max_cpu = 30', extra=""))
    (trial,) = expand(plan)
    assert trial.ksm == {"sleep_millisecs": 20, "advisor_max_cpu": 30, "advisor_mode": "scan-time"}
    with pytest.raises(PlanError, match="advisor_mode"):
        parse_plan(PLAN.format(ksm='policy = "advisor"\nadvisor_mode = "none"', extra=""))


def test_advisor_is_refused_clearly_on_a_kernel_without_it(tmp_path):
    root = fake_root(tmp_path, advisor=False)
    trials = expand(parse_plan(PLAN.format(ksm='policy = "advisor"', extra="")))
    with pytest.raises(PlanError, match=r"scan-time advisor \(Linux 6.8\+\).*advisor_mode"):
        check_against_host(trials, root / KSM_SYSFS)
    check_against_host(trials, fake_root(tmp_path / "new", advisor=True) / KSM_SYSFS)  # a 6.8+ tree passes


def test_policy_tables_are_validated():
    plan = parse_plan(
        PLAN.format(ksm='policy = "ksmtuned"\n[ksm.ksmtuned]\nmonitor_interval_s = 3\nnpages_max = 2000', extra="")
    )
    (trial,) = expand(plan)
    assert trial.policy["name"] == "ksmtuned" and trial.policy["ksmtuned"]["npages_max"] == 2000
    with pytest.raises(PlanError, match="npages_decay"):
        parse_plan(PLAN.format(ksm='policy = "ksmtuned"\n[ksm.ksmtuned]\nnpages_decay = 5', extra=""))
    with pytest.raises(PlanError, match="unknown key"):
        parse_plan(PLAN.format(ksm='policy = "kubevirt"\n[ksm.kubevirt]\nboost = 5', extra=""))


def test_search_section_is_validated():
    ok = parse_plan(PLAN.format(ksm="", extra='[search]\nlow = 50\nhigh = 20000\nobjective = "knee"'))
    assert ok.search is not None and ok.search.scale == "log"
    with pytest.raises(PlanError, match="budget"):
        parse_plan(PLAN.format(ksm="", extra='[search]\nlow = 50\nhigh = 20000\nobjective = "budget"'))
    with pytest.raises(PlanError, match="high"):
        parse_plan(PLAN.format(ksm="", extra="[search]\nlow = 500\nhigh = 50"))


# ----------------------------------------------------------------------------- advisor


def test_advisor_knobs_applied_on_a_fake_tree_and_restored(tmp_path):
    root = fake_root(tmp_path)
    settings = HostSettings(tmp_path / "record.json", root)
    # a static trial first changes pages_to_scan; the advisor trial must not write it
    settings.reset(timeout_s=1)
    settings.apply({"pages_to_scan": 1000}, {})
    settings.reset(timeout_s=1)
    (trial,) = expand(
        parse_plan(PLAN.format(ksm='policy = "advisor"\nadvisor_max_cpu = 30\nadvisor_target_scan_time = 50', extra=""))
    )
    settings.apply(trial.ksm, trial.host)
    assert knob(root, "advisor_mode") == "scan-time"
    assert knob(root, "advisor_max_cpu") == "30" and knob(root, "advisor_target_scan_time") == "50"
    assert knob(root, "pages_to_scan") == "1000"  # not written back while the advisor drives it
    run = run_for(trial.policy, settings, tmp_path / "trial")
    settings.policy_start = run.start
    settings.start()
    assert knob(root, "run") == "1"
    (root / KSM_SYSFS / "pages_to_scan").write_text("4321\n")  # what the advisor would do
    settings.restore()
    assert {k: knob(root, k) for k in ("run", "pages_to_scan", "advisor_mode", "advisor_max_cpu")} == {
        "run": "0",
        "pages_to_scan": "100",
        "advisor_mode": "none",
        "advisor_max_cpu": "70",
    }
    entries = json.loads((tmp_path / "record.json").read_text())
    assert [e["path"].rsplit("/", 1)[1] for e in entries][:2] == ["run", "pages_to_scan"]


def test_restore_puts_advisor_mode_back_before_pages_to_scan(tmp_path):
    root = fake_root(tmp_path)
    settings = HostSettings(tmp_path / "record.json", root)
    settings.write(KSM_SYSFS / "run", 2)
    settings.write(KSM_SYSFS / "pages_to_scan", 999)
    settings.write(KSM_SYSFS / "advisor_mode", "scan-time")
    order: list[str] = []
    real = settings._raw_write
    settings._raw_write = lambda path, value: (order.append(path.name), real(path, value))[1]  # type: ignore[method-assign]
    settings.restore()
    assert order.index("advisor_mode") < order.index("pages_to_scan")


# ----------------------------------------------------------------------------- kubevirt


def test_kubevirt_rule_on_a_scripted_mem_available():
    params = KubevirtParams()
    total = 16 * GIB_KIB
    free, tight = int(0.5 * total), int(0.1 * total)  # 50% and 10% available (threshold 20%)
    script = [free, tight, tight, tight, tight, tight, tight, free, free, free]
    running, pages, states = False, 77, []
    for available in script:
        state = kubevirt.kubevirt_step(running, pages, total, available, params)
        states.append((state.running, state.pages_to_scan))
        running, pages = state.running, state.pages_to_scan
    assert states == [
        (False, 77),
        (True, 100),
        (True, 400),
        (True, 700),
        (True, 1000),
        (True, 1250),
        (True, 1250),
        (True, 1200),
        (True, 1150),
        (True, 1100),
    ]
    # decay below the minimum stops KSM at pages_min
    assert kubevirt.kubevirt_step(True, 100, total, free, params) == kubevirt.KsmState(False, 64, 200)


def test_kubevirt_sleep_scales_with_used_memory():
    params = KubevirtParams()
    total = 32 * GIB_KIB
    assert kubevirt.sleep_for(total, total - 16 * GIB_KIB, params) == 100  # 16 GiB used: the baseline
    assert kubevirt.sleep_for(total, total - 4 * GIB_KIB, params) == 400
    assert kubevirt.sleep_for(total, total - 30 * GIB_KIB, params) == 53
    assert kubevirt.sleep_for(total, 0, KubevirtParams(sleep_ms_baseline=100)) == 50
    assert kubevirt.sleep_for(total, total, params) >= 10  # nothing used: no division by zero


def test_kubevirt_controller_writes_through_host_settings(tmp_path):
    total = 8 * GIB_KIB
    root = fake_root(tmp_path, mem_total_kib=total, mem_available_kib=total // 2)
    settings = HostSettings(tmp_path / "record.json", root)
    settings.reset(timeout_s=1)
    run = kubevirt.KubevirtRun(settings, KubevirtParams(period_s=3600))
    run.start()
    run.stop()  # one spin ran on start: no pressure, KSM stays off
    assert knob(root, "run") == "0"
    set_meminfo(root, total, total // 10)
    run.spin()
    assert (knob(root, "run"), knob(root, "pages_to_scan"), knob(root, "sleep_millisecs")) == (
        "1",
        "100",
        str(100 * 16 * GIB_KIB // (total - total // 10)),
    )
    run.spin()
    assert knob(root, "pages_to_scan") == "400"
    summary = run.summary()
    assert summary["ksm_turned_on"] and [s["pages_to_scan"] for s in summary["steps"]][-2:] == [100, 400]
    settings.restore()
    assert (knob(root, "run"), knob(root, "pages_to_scan"), knob(root, "sleep_millisecs")) == ("0", "100", "20")


# ----------------------------------------------------------------------------- throttler


def test_throttler_steps_down_after_a_start_as_kata_does():
    params = ThrottlerParams()
    anon = 1_000_000  # pages
    step = throttler.throttler_step("initial", "start", anon, params)
    assert step == throttler.Step("aggressive", 100_000, 1, 30.0)
    step = throttler.throttler_step(step.mode, "timer", anon, params)
    assert step == throttler.Step("standard", 10_000, 10, 120.0)
    step = throttler.throttler_step(step.mode, "timer", anon, params)
    assert step == throttler.Step("slow", 2_000, 100, 120.0)
    step = throttler.throttler_step(step.mode, "timer", anon, params)
    assert step == throttler.Step("initial", None, None, None)
    # the timer never moves "initial"; a start in any step goes back to aggressive
    assert throttler.throttler_step("initial", "timer", anon, params).mode == "initial"
    for mode in ("standard", "slow", "aggressive"):
        assert throttler.throttler_step(mode, "start", 999, params) == throttler.Step("aggressive", 99, 1, 30.0)
    short = ThrottlerParams(aggressive_s=1, standard_s=2, slow_s=3)
    assert [throttler.throttler_step(m, "timer", anon, short).hold_s for m in ("aggressive", "standard")] == [2, 3]


def test_throttler_params_are_validated():
    (trial,) = expand(parse_plan(PLAN.format(ksm='policy = "throttler"\n[ksm.throttler]\naggressive_s = 2', extra="")))
    assert trial.policy == {
        "name": "throttler",
        "throttler": {"aggressive_s": 2.0, "standard_s": 120.0, "slow_s": 120.0, "initial_run": 1},
    }
    with pytest.raises(PlanError, match="initial_run"):
        parse_plan(PLAN.format(ksm='policy = "throttler"\n[ksm.throttler]\ninitial_run = 2', extra=""))
    with pytest.raises(PlanError, match="slow_s"):
        parse_plan(PLAN.format(ksm='policy = "throttler"\n[ksm.throttler]\nslow_s = 0', extra=""))


def test_throttler_controller_on_a_fake_tree_kicks_steps_and_restores(tmp_path):
    root = fake_root(tmp_path)
    set_meminfo(root, 8 * GIB_KIB, 6 * GIB_KIB, anon_kib=400_000)  # 100,000 pages of 4 KiB
    settings = HostSettings(tmp_path / "record.json", root)
    settings.reset(timeout_s=1)
    settings.apply({"pages_to_scan": 300, "sleep_millisecs": 50}, {})
    run = throttler.ThrottlerRun(settings, ThrottlerParams(aggressive_s=3600), page_size_bytes=4096)
    settings.start_listener = run.on_start
    settings.announce_start("guest a")  # before measure: delivered when measure starts
    settings.announce_start("guest b")
    settings.policy_start = run.start
    try:
        settings.start()
        deadline = time.monotonic() + 10
        while len(run.steps) < 2:
            assert time.monotonic() < deadline, "the start was never delivered"
            time.sleep(0.01)
        assert (knob(root, "run"), knob(root, "pages_to_scan"), knob(root, "sleep_millisecs")) == ("1", "10000", "1")
        run.transition("timer", [])  # what the timer does after aggressive_s
        assert (knob(root, "pages_to_scan"), knob(root, "sleep_millisecs")) == ("1000", "10")
        run.transition("timer", [])
        assert (knob(root, "pages_to_scan"), knob(root, "sleep_millisecs")) == ("200", "100")
        run.transition("timer", [])
        assert (knob(root, "run"), knob(root, "pages_to_scan"), knob(root, "sleep_millisecs")) == ("1", "300", "50")
    finally:
        run.stop()
    summary = run.summary()
    assert [s["mode"] for s in summary["steps"]] == ["initial", "aggressive", "standard", "slow", "initial"]
    assert summary["steps"][1]["event"] == "start x2" and summary["steps"][1]["anon_pages"] == 100_000
    assert [s["source"] for s in summary["starts"]] == ["guest a", "guest b"]
    assert summary["original"] == {"pages_to_scan": "300", "sleep_millisecs": "50", "run": "1"}
    settings.restore()
    assert (knob(root, "run"), knob(root, "pages_to_scan"), knob(root, "sleep_millisecs")) == ("0", "100", "20")


def test_throttler_stop_is_bounded_while_it_holds_a_step(tmp_path):
    root = fake_root(tmp_path)
    settings = HostSettings(tmp_path / "record.json", root)
    settings.reset(timeout_s=1)
    run = throttler.ThrottlerRun(settings, ThrottlerParams(), page_size_bytes=4096)  # holds 30 s, 120 s...
    run.on_start("worker 0")
    run.start()
    deadline = time.monotonic() + 10
    while len(run.steps) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    started = time.monotonic()
    run.stop()
    assert time.monotonic() - started < 2 and run.thread is not None and not run.thread.is_alive()
    assert run.steps[-1]["mode"] == "aggressive" and run.error is None


# ----------------------------------------------------------------------------- ksmtuned


def test_ksmtuned_config_from_the_plan(tmp_path):
    params = KsmtunedParams(
        monitor_interval_s=5,
        npages_boost=500,
        npages_decay=-20,
        npages_min=32,
        npages_max=3000,
        thres_coef=30,
        thres_const=4096,
        sleep_ms=15,
    )
    env = ksmtuned.config_env(params, tmp_path / "k.log", tmp_path / "k.pid")
    assert env == {
        "KSM_MONITOR_INTERVAL": "5",
        "KSM_NPAGES_BOOST": "500",
        "KSM_NPAGES_DECAY": "-20",
        "KSM_NPAGES_MIN": "32",
        "KSM_NPAGES_MAX": "3000",
        "KSM_THRES_COEF": "30",
        "KSM_THRES_CONST": "4096",
        "KSM_SLEEP_MSEC": "15",
        "DEBUG": "1",
        "LOGFILE": str(tmp_path / "k.log"),
        "PIDFILE": str(tmp_path / "k.pid"),
    }
    text = ksmtuned.config_text(env)
    assert "KSM_NPAGES_BOOST=500\n" in text and text.count("\n") == len(env)


def test_system_conf_that_would_override_the_plan_is_detected():
    shipped = "# KSM_MONITOR_INTERVAL=60\n# KSM_SLEEP_MSEC=10\n# LOGFILE=/var/log/ksmtuned\n# DEBUG=1\n"
    assert ksmtuned.conf_overrides(shipped) == []
    assert ksmtuned.conf_overrides(shipped + "KSM_NPAGES_MAX=2000\n  export DEBUG=1\nOTHER=1\n") == [
        "DEBUG",
        "KSM_NPAGES_MAX",
    ]


def test_ksmtuned_log_parsing():
    log = (
        "Tue Dec  1 20:00:00 UTC 2026: total 8000000\n"
        "Tue Dec  1 20:00:05 UTC 2026: committed 0 free 900000\n"
        "Tue Dec  1 20:00:05 UTC 2026: 1600000 < 8000000 and free > 1600000, stop ksm\n"
        "Tue Dec  1 20:00:10 UTC 2026: KSMCTL start 300 20\n"
        "Tue Dec  1 20:00:15 UTC 2026: KSMCTL start 250 20\n"
    )
    assert ksmtuned.parse_log(log) == [
        {"action": "stop"},
        {"action": "start", "pages_to_scan": 300, "sleep_millisecs": 20},
        {"action": "start", "pages_to_scan": 250, "sleep_millisecs": 20},
    ]


FAKE_KSMTUNED = """#!/bin/bash
# Stands in for /usr/sbin/ksmtuned: same start-up (fork the loop, PID to $PIDFILE), no sysfs.
echo "$(date): KSMCTL start $KSM_NPAGES_BOOST $KSM_SLEEP_MSEC" >> "$LOGFILE"
loop () { while true; do sleep 30 & wait $!; done; }
loop &
echo $! > "$PIDFILE"
"""


def _alive(pid: int) -> bool:
    return probes.live_comm(pid) == "ksmtuned"


def _stand_in(tmp_path: Path, conf_text: str) -> tuple[Path, Path]:
    """(executable, system conf) of a stand-in ksmtuned under tmp_path."""
    exe = tmp_path / "bin" / "ksmtuned"
    exe.parent.mkdir()
    exe.write_text(FAKE_KSMTUNED)
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    conf = tmp_path / "ksmtuned.conf"
    conf.write_text(conf_text)
    return exe, conf


def test_ksmtuned_run_starts_and_stops_by_pid_with_a_stand_in(tmp_path):
    exe, conf = _stand_in(tmp_path, "# KSM_MONITOR_INTERVAL=60\n")
    root = fake_root(tmp_path)
    settings = HostSettings(tmp_path / "record.json", root)
    run = ksmtuned.KsmtunedRun(
        settings, KsmtunedParams(npages_boost=444, sleep_ms=12), tmp_path / "trial", executable=exe, system_conf=conf
    )
    run.start()
    pid = run.pid
    assert pid is not None and _alive(pid)
    recorded = [e["path"].rsplit("/", 1)[1] for e in json.loads((tmp_path / "record.json").read_text())]
    assert recorded == ["run", "pages_to_scan", "sleep_millisecs"]  # before the daemon ran
    assert "KSM_NPAGES_BOOST=444" in (tmp_path / "trial" / "ksmtuned.env").read_text()
    assert json.loads((tmp_path / "trial" / ksmtuned.RUNNING_NAME).read_text())["pid"] == pid
    run.stop()
    assert not _alive(pid)
    assert not Path(f"/proc/{pid}").exists()  # reaped (the sweep is its subreaper), not a zombie
    assert not (tmp_path / "trial" / ksmtuned.RUNNING_NAME).exists()  # nothing for `restore` to stop
    summary = run.summary()
    assert summary["ksm_turned_on"] and summary["last_pages_to_scan"] == 444 and summary["stopped"] == "SIGTERM"


def test_restore_stops_the_ksmtuned_a_killed_sweep_left_running(tmp_path):
    """A sweep killed by SIGKILL never stops its ksmtuned; `restore STUDY` must, before it puts
    the knobs back (the daemon would rewrite them). A record whose PID now names another
    process (another start time) is not signalled."""
    exe, conf = _stand_in(tmp_path, "")
    study = tmp_path / "study"
    settings = HostSettings(tmp_path / "record.json", fake_root(tmp_path))
    left = ksmtuned.KsmtunedRun(settings, KsmtunedParams(), study / "trials" / "t1", executable=exe, system_conf=conf)
    left.start()  # ... and the sweep is killed: stop() never runs
    pid = left.pid
    stranger = study / "trials" / "t0" / ksmtuned.RUNNING_NAME
    stranger.parent.mkdir(parents=True)
    stranger.write_text(json.dumps({"pid": os.getpid(), "start_ticks": 1}))  # our PID, another start time
    try:
        assert _alive(pid) and (study / "trials" / "t1" / ksmtuned.RUNNING_NAME).exists()
        assert ksmtuned.stop_left_behind(study) == [f"ksmtuned pid {pid} of trial t1 (SIGTERM)"]
        assert not _alive(pid)
        assert not list(study.glob("trials/*/" + ksmtuned.RUNNING_NAME))
        assert ksmtuned.stop_left_behind(study) == []
    finally:
        ksmtuned.stop_loop(pid)
        ksmtuned._reap([pid], timeout_s=2)
        ksmtuned._set_subreaper(False)


def test_ksmtuned_refuses_a_system_conf_that_overrides(tmp_path):
    conf = tmp_path / "ksmtuned.conf"
    conf.write_text("KSM_MONITOR_INTERVAL=60\n")
    exe = tmp_path / "ksmtuned"
    exe.write_text("#!/bin/sh\n")
    run = ksmtuned.KsmtunedRun(None, KsmtunedParams(), tmp_path, executable=exe, system_conf=conf)
    with pytest.raises(Exception, match="KSM_MONITOR_INTERVAL"):
        run.check()


# ----------------------------------------------------------------------------- search


def saving(x: float) -> float:
    return 800.0 * (1 - math.exp(-x / 2000.0))


def cpu(x: float) -> float:
    return 0.002 * x + 0.5


def observe(spec: search.Spec, limit: int = 200) -> tuple[list[search.Observation], search.Decision]:
    observations: list[search.Observation] = []
    for _ in range(limit):
        decision = search.choose(spec, observations)
        if decision.done:
            return observations, decision
        x = decision.next_value
        assert x is not None
        observations.append(search.Observation(x, saving(x), cpu(x)))
    raise AssertionError("search did not stop")


def grid_knee(low: int, high: int, points: int) -> tuple[int, int]:
    grid = np.unique(np.round(np.geomspace(low, high, points)).astype(int))
    s, c = np.array([saving(x) for x in grid]), np.array([cpu(x) for x in grid])
    score = (s - s[0]) / (s[-1] - s[0]) - (c - c[0]) / (c[-1] - c[0])
    return int(grid[np.argmax(score)]), len(grid)


def test_knee_search_finds_the_synthetic_knee_with_few_trials():
    spec = search.Spec(low=50, high=20000, objective="knee", max_trials=40, tolerance_pct=10)
    observations, decision = observe(spec)
    truth, grid_trials = grid_knee(50, 20000, 400)
    assert decision.answer is not None
    assert abs(decision.answer - truth) / truth <= 0.10
    assert len(observations) <= 30 // 2  # half a 30-point grid at most
    assert "pinned" in decision.reason


def test_budget_search_finds_the_cpu_edge():
    spec = search.Spec(low=50, high=20000, objective="budget", max_ksmd_cpu_pct=10.0, tolerance_pct=5)
    observations, decision = observe(spec)
    edge = (10.0 - 0.5) / 0.002  # 4750
    assert decision.answer is not None and decision.answer <= edge
    assert abs(decision.answer - edge) / edge <= 0.05
    assert len(observations) <= 15


def test_budget_search_says_when_nothing_fits_and_when_everything_does():
    _, none = observe(search.Spec(low=50, high=20000, objective="budget", max_ksmd_cpu_pct=0.1))
    assert none.answer is None and "no setting" in none.reason
    _, all_fit = observe(search.Spec(low=50, high=20000, objective="budget", max_ksmd_cpu_pct=99))
    assert all_fit.answer == 20000


def test_search_repeats_each_setting_and_stops_on_the_budget():
    spec = search.Spec(low=50, high=20000, objective="knee", repetitions=2, max_trials=6)
    observations, decision = observe(spec)
    values = [o.value for o in observations]
    assert values[:4] == [50, 50, 20000, 20000]
    assert len(observations) == 6 and "budget spent" in decision.reason


def test_search_is_a_pure_replay():
    spec = search.Spec(low=50, high=20000)
    observations, _ = observe(spec)
    again = search.choose(spec, observations[:5])
    assert again.next_value == observations[5].value


def knee_score_of(observations: list[search.Observation], value: int) -> float:
    ends = {o.value: o for o in observations if o.value in (50, 20000)}
    lo, hi = ends[50], ends[20000]
    o = next(o for o in observations if o.value == value)
    return (o.saved_mib - lo.saved_mib) / (hi.saved_mib - lo.saved_mib) - (o.ksmd_cpu_pct - lo.ksmd_cpu_pct) / (
        hi.ksmd_cpu_pct - lo.ksmd_cpu_pct
    )


def test_spent_knee_search_answers_by_knee_score_and_calls_it_a_bracket():
    """Four trials: both ends and two probes. Saving per CPU would answer the cheap end (50:
    33 MiB per % of a core, its knee score 0); the knee search must answer its own objective."""
    spec = search.Spec(low=50, high=20000, objective="knee", max_trials=4)
    observations, decision = observe(spec)
    measured = sorted({o.value for o in observations})
    best = max(measured, key=lambda v: knee_score_of(observations, v))
    assert decision.answer == best and best not in (50, 20000)
    assert knee_score_of(observations, best) > 0.3
    assert "budget spent" in decision.reason and "bracket" in decision.reason and "not pinned" in decision.reason
    assert f"best knee score measured: pages_to_scan={best}" in decision.reason


def test_noisy_repeated_knee_search_stops_flat_between_the_probes():
    """Two repetitions a setting, +-150 MiB of run-to-run noise on an 800 MiB curve: the probes'
    scores differ by less than their noise, so the search says so and stops early."""
    spec = search.Spec(low=50, high=20000, objective="knee", repetitions=2, max_trials=40)
    observations: list[search.Observation] = []
    decision = search.choose(spec, observations)
    while not decision.done:
        x = decision.next_value
        assert x is not None
        noise = 150.0 if sum(o.value == x for o in observations) % 2 == 0 else -150.0
        observations.append(search.Observation(x, saving(x) + noise, cpu(x)))
        decision = search.choose(spec, observations)
    assert decision.reason.startswith("flat between pages_to_scan=")
    assert len(observations) < 40 and decision.answer is not None


def test_flat_saving_makes_the_cheap_end_the_knee():
    spec = search.Spec(low=50, high=20000)
    obs = [search.Observation(50, 100.0, 1.0), search.Observation(20000, 100.0, 30.0)]
    decision = search.choose(spec, obs)
    assert decision.done and decision.answer == 50


# ----------------------------------------------------------------------------- recommend


def two_setting_study(
    tmp_path: Path, a: tuple[int, tuple[int, int], float], b: tuple[int, tuple[int, int], float], name: str = "study"
) -> Path:
    """Two pages_to_scan settings, two blocks: (pages, (final sharing per block), cpu share)."""
    study = start_study(tmp_path, name)
    for pages, finals, cpu_share in (a, b):
        for rep, final in enumerate(finals):
            ksm = ramp_ksm_frame(final_sharing=final, cpu_core_fraction=cpu_share + 0.001 * rep)
            write_trial(
                study,
                f"p{pages}-r{rep}",
                {"pages_to_scan": pages},
                repetition=rep,
                ksm=ksm,
                processes=processes_frame(ksm),
            )
    return finish_study(study)


def computed(study_dir: Path) -> studymetrics.StudyMetrics:
    return studymetrics.compute_study(studydata.load_study(study_dir))


def test_recommend_takes_the_largest_saving_when_it_is_told_apart(tmp_path):
    rec = recommend(computed(sweep_study(tmp_path)), Limits())
    assert rec.chosen is not None and rec.chosen.setting == "pages_to_scan=1000" and not rec.tied
    assert "largest saving" in rec.reason and "significant" not in rec.reason.lower()


def test_recommend_respects_the_cpu_limit(tmp_path):
    rec = recommend(computed(sweep_study(tmp_path)), Limits(max_ksmd_cpu_pct=5))
    assert rec.chosen is not None and rec.chosen.setting == "pages_to_scan=100"


def test_recommend_keeps_the_leader_when_the_cheaper_one_is_only_not_told_apart(tmp_path):
    """1100 vs 1150 pages of sharing over 2 noisy blocks: the interval of the difference includes
    0 but reaches far past the 2% margin, so "cannot tell apart" is not "the same"."""
    study = two_setting_study(tmp_path, (1000, (1000, 1200), 0.10), (2000, (1300, 1000), 0.20))
    rec = recommend(computed(study), Limits())
    assert rec.leader is not None and rec.leader.setting == "pages_to_scan=2000"
    assert rec.chosen is rec.leader and not rec.tied
    assert [c.setting for c in rec.not_shown_worse] == ["pages_to_scan=1000"]
    assert "pages_to_scan=1000 is cheaper" in rec.reason and "not shown to be worse" in rec.reason
    assert rec.reason.startswith("2 KSM-on settings measured a saving; with no limits given, each is a candidate.")


def test_recommend_does_not_give_up_a_3x_saving_it_could_not_resolve(tmp_path):
    """The issue's case: 101 MiB vs 300 MiB over 2 blocks, noisy enough that the difference's
    interval is about +-1900 MiB. The cheaper, smaller saving must not be the pick."""
    pages = lambda mib: int(mib * MIB_PER_PAGE)  # noqa: E731
    study = two_setting_study(tmp_path, (100, (pages(10), pages(192)), 0.02), (1000, (pages(450), pages(150)), 0.10))
    rec = recommend(computed(study), Limits())
    assert rec.chosen is not None and rec.chosen.setting == "pages_to_scan=1000"
    assert [c.setting for c in rec.not_shown_worse] == ["pages_to_scan=100"]


def test_recommend_takes_the_cheaper_of_two_that_save_the_same_within_the_margin(tmp_path):
    """Paired differences of 1 and 2 pages on ~1000: the whole interval is inside 2%."""
    study = two_setting_study(tmp_path, (1000, (1000, 1010), 0.10), (2000, (1001, 1012), 0.20))
    rec = recommend(computed(study), Limits())
    assert rec.leader is not None and rec.leader.setting == "pages_to_scan=2000"
    assert rec.chosen is not None and rec.chosen.setting == "pages_to_scan=1000"
    assert "save the same" in rec.reason and "cheaper" in rec.reason
    strict = recommend(computed(study), Limits(), saving_margin_pct=0.01)
    assert strict.chosen is not None and strict.chosen.setting == "pages_to_scan=2000"


def test_recommend_cli_takes_the_saving_margin(tmp_path, capsys):
    study = two_setting_study(tmp_path, (1000, (1000, 1010), 0.10), (2000, (1001, 1012), 0.20))
    assert cli.main(["recommend", str(study), "--json"]) == 0
    wide = json.loads(capsys.readouterr().out)
    assert wide["recommended"]["setting"] == "pages_to_scan=1000" and wide["saving_margin_pct"] == 2.0
    assert cli.main(["recommend", str(study), "--saving-margin", "0.01", "--json"]) == 0
    strict = json.loads(capsys.readouterr().out)
    assert strict["recommended"]["setting"] == "pages_to_scan=2000"
    assert [c["setting"] for c in strict["not_shown_worse"]] == ["pages_to_scan=1000"]
    assert strict["limit_evidence"] is None
    assert cli.main(["recommend", str(study), "--saving-margin", "-1"]) == 2


def test_saving_verdict_is_an_equivalence_test():
    assert recommend_mod.saving_verdict(1.0, 2.0, 5.0) == recommend_mod.SAME
    assert recommend_mod.saving_verdict(1.0, 2.0, 2.5) == recommend_mod.NOT_SHOWN_WORSE
    assert recommend_mod.saving_verdict(199.0, 1893.0, 6.0) == recommend_mod.NOT_SHOWN_WORSE
    assert recommend_mod.saving_verdict(10.0, 2.0, 5.0) == recommend_mod.SMALLER
    assert recommend_mod.saving_verdict(10.0, math.nan, 5.0) == recommend_mod.NO_INTERVAL


def test_recommend_nothing_qualifies_exits_1(tmp_path, capsys):
    study = sweep_study(tmp_path)
    rec = recommend(computed(study), Limits(max_ksmd_cpu_pct=1))
    assert rec.chosen is None and "No setting" in rec.reason
    assert cli.main(["recommend", str(study), "--max-ksmd-cpu", "1"]) == 1
    assert cli.main(["recommend", str(study), "--min-saved-mib", "1000"]) == 1
    assert cli.main(["recommend", str(study), "--max-ksmd-cpu", "50", "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{") :])["recommended"]["setting"] == "pages_to_scan=1000"


def test_recommend_bad_input_exits_2(tmp_path):
    assert cli.main(["recommend", str(tmp_path / "nothing")]) == 2
    study = sweep_study(tmp_path)
    assert cli.main(["recommend", str(study), "--max-tps-loss", "5"]) == 2  # processes: no tps
    with pytest.raises(BadInput):
        recommend(computed(study), Limits(max_tps_loss_pct=5))


def test_recommend_with_one_trial_per_setting_says_it_rests_on_single_trials(tmp_path):
    study = start_study(tmp_path)
    for pages, final, cpu_share in ((100, 800, 0.02), (1000, 1000, 0.1)):
        ksm = ramp_ksm_frame(final_sharing=final, cpu_core_fraction=cpu_share)
        write_trial(study, f"p{pages}", {"pages_to_scan": pages}, ksm=ksm, processes=processes_frame(ksm))
    rec = recommend(computed(finish_study(study)), Limits())
    assert rec.chosen is not None and rec.chosen.setting == "pages_to_scan=1000"
    assert "single trials" in rec.reason and "no interval" in rec.reason
    assert rec.chosen.limit_evidence is None  # no limit was judged
    limited = recommend(computed(study), Limits(max_ksmd_cpu_pct=10))
    assert limited.chosen is not None and limited.chosen.limit_evidence == "one trial"
    assert "on one trial's value (no interval)" in limited.reason
    assert limited.as_json()["limit_evidence"] == "one trial"


# ----------------------------------------------------------------------------- trials table


def test_nominal_scan_rate_and_policy_columns(tmp_path):
    study = start_study(tmp_path)
    ksm = ramp_ksm_frame()
    ksm["sleep_millisecs"] = 20  # pages_to_scan 100 -> 5000 pages/s asked for while run = 1
    write_trial(
        study,
        "kt",
        {"ksm.policy": "ksmtuned"},
        ksm=ksm,
        processes=processes_frame(ksm),
        extra={"policy": {"name": "ksmtuned", "ksm_turned_on": False}},
    )
    sm = computed(finish_study(study))
    row = sm.trials.iloc[0]
    assert row["policy"] == "ksmtuned" and bool(row["policy_ksm_turned_on"]) is False
    assert row["nominal_pages_per_s"] == pytest.approx(5000.0)
    from orchestrator.report.policy import policy_findings

    texts = [t for t, _ in policy_findings(sm)]
    assert any("never turned KSM on" in t for t in texts)


def test_search_plan_dry_run_and_report_with_policies(tmp_path):
    plan = tmp_path / "s.toml"
    plan.write_text(PLAN.format(ksm="", extra="[search]\nlow = 50\nhigh = 20000\nmax_trials = 8"))
    assert cli.main(["sweep", str(plan), "--dry-run"]) == 0


class SyntheticRunner:
    """Stands in for the processes runner: each trial's ksm.csv follows saving()/cpu() of its
    pages_to_scan, so run_sweep's search hook can be driven without KSM or workers."""

    def __init__(self, plan, settings, stop, progress):
        self.settings = settings

    def run(self, trial, clock, result):
        self.settings.start()  # the policy hook (static: run=1 on the fake tree)
        x = trial.ksm["pages_to_scan"]
        pages = int(saving(x) * 1024 * 1024 / 4096)
        result.frames = {"ksm": ramp_ksm_frame(final_sharing=pages, plateau=True, cpu_core_fraction=cpu(x) / 100)}

    def finish(self):
        pass


def test_run_sweep_search_hook_on_a_fake_host(tmp_path, monkeypatch):
    from orchestrator import sweep

    root = fake_root(tmp_path)
    monkeypatch.setenv("KSM_LAB_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setattr(sweep, "runner_for", SyntheticRunner)
    monkeypatch.setattr(sweep, "collect_host_info", lambda root, with_vm_tools: {"kernel": "fake"})
    text = PLAN.format(ksm="", extra="[search]\nlow = 50\nhigh = 20000\nmax_trials = 20")
    outcome = sweep.run_sweep(parse_plan(text), text, tmp_path / "results", root=root)
    study = outcome.study
    records = study.trial_records()
    assert 4 <= len(records) <= 15 and outcome.failed == 0
    assert all(r.search_reason for r in records)
    assert records[0].settings == {"ksm.pages_to_scan": 50} and "low end" in records[0].search_reason
    decisions = json.loads((study.path / "search.json").read_text())["decisions"]
    truth, _ = grid_knee(50, 20000, 400)
    assert decisions[-1]["next"] is None and abs(decisions[-1]["answer"] - truth) / truth <= 0.10
    assert knob(root, "run") == "0" and knob(root, "pages_to_scan") == "100"  # host restored


def test_report_plots_policy_knobs_and_stars_the_recommendation(tmp_path):
    from orchestrator.report import study as report

    study = start_study(tmp_path)
    for name, final, cpu_share, pts in (("static", 1000, 0.10, 1000), ("kubevirt", 900, 0.03, 400)):
        for rep in (0, 1):
            ksm = ramp_ksm_frame(final_sharing=final + 30 * rep, cpu_core_fraction=cpu_share + 0.002 * rep)
            ksm["pages_to_scan"] = pts
            ksm["sleep_millisecs"] = 20
            write_trial(
                study,
                f"{name}-r{rep}",
                {"ksm.policy": name},
                repetition=rep,
                ksm=ksm,
                processes=processes_frame(ksm),
                extra={"policy": {"name": name, "ksm_turned_on": True}},
            )
    study = finish_study(study)
    html = report.write_report(study).read_text()
    assert (study / "report" / "policy_knobs.png").exists()
    assert "Recommendation" in html and "significant" not in html.lower()


def test_sweep_refuses_a_ksmtuned_plan_on_a_host_without_ksmtuned(tmp_path):
    from orchestrator.errors import HostError
    from orchestrator.policies import check_host

    root = fake_root(tmp_path)
    trials = expand(parse_plan(PLAN.format(ksm='policy = "ksmtuned"', extra="")))
    with pytest.raises(HostError, match="apt-get install ksmtuned"):
        check_host(trials, root)
    (root / "usr/sbin").mkdir(parents=True)
    (root / "usr/sbin/ksmtuned").write_text("#!/bin/bash\n")
    (root / "etc").mkdir()
    (root / "etc/ksmtuned.conf").write_text("# KSM_NPAGES_MAX=1250\n")
    check_host(trials, root)
    (root / "etc/ksmtuned.conf").write_text("KSM_NPAGES_MAX=1250\n")
    with pytest.raises(HostError, match="KSM_NPAGES_MAX"):
        check_host(trials, root)


def test_entering_scan_time_records_pages_to_scan_before_the_kernel_overwrites_it(tmp_path):
    """Entering scan-time sets pages_to_scan to advisor_min_pages_to_scan (mm/ksm.c); the value
    the host had must be what restore() puts back, not the advisor's."""
    root = fake_root(tmp_path)
    ksm_dir = root / KSM_SYSFS
    original = knob(root, "pages_to_scan")
    settings = HostSettings(tmp_path / "record.json", root)
    (ksm_dir / "run").write_text("2\n")
    settings.apply({"advisor_mode": "scan-time", "advisor_min_pages_to_scan": 777}, {})
    (ksm_dir / "pages_to_scan").write_text("777\n")  # what the kernel does on entering scan-time
    settings.restore()
    assert knob(root, "pages_to_scan") == original
