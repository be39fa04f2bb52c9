"""Workloads and KSM policies are plugins: a toy workload and a toy policy, each from a package of
its own (a real distribution with an entry point, found by importlib.metadata), run a study end to
end, with no edit to ksm-lab."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from orchestrator.errors import PlanError
from orchestrator.plan import POLICY_PLUGINS, WORKLOAD_PLUGINS, expand, load_plan, parse_plan
from orchestrator.plugins import (
    POLICY_GROUP,
    WORKLOAD_GROUP,
    PolicyPlugin,
    WorkloadPlugin,
    _check_policy,
    _check_workload,
)

REPO = Path(__file__).resolve().parent.parent

# The toy: one child process holding MiB of identical pages marked MADV_MERGEABLE. Its model and
# plugin (toyload/__init__.py) and its runner (toyload/runner.py) live in its own package, as a
# third party would write them: the plugin's module imports no runner (the plan loads it while
# orchestrator.plan is still importing), the runner is named by a string and loaded by the sweep.
TOY_INIT = textwrap.dedent("""
    from __future__ import annotations

    from typing import ClassVar, Literal

    from pydantic import Field

    from orchestrator.plugins import WorkloadPlugin
    from orchestrator.validation import Strict


    class ToyParams(Strict):
        type: Literal["toy"] = "toy"
        mib: int = Field(16, ge=1, le=256)

        writes_during_measure: ClassVar[bool] = False


    PLUGIN = WorkloadPlugin(type="toy", model=ToyParams, runner="toyload.runner:ToyRunner", where="host")
""")

TOY_RUNNER = textwrap.dedent('''
    from __future__ import annotations

    import subprocess
    import sys

    from orchestrator.runners.base import TrialRunner, sampler_health

    CHILD = """
    import mmap, sys
    size = int(sys.argv[1]) << 20
    m = mmap.mmap(-1, size)
    m.madvise(mmap.MADV_MERGEABLE)
    for off in range(0, size, mmap.PAGESIZE):
        m[off:off + 4] = b"toy!"
    print("ready", flush=True)
    sys.stdin.read()  # until the runner closes the pipe
    """


    class ToyRunner(TrialRunner):
        def run(self, trial, clock, result):
            params = trial.workload_model
            child = subprocess.Popen([sys.executable, "-c", CHILD, str(params.mib)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
            try:
                assert child.stdout.readline().strip() == "ready"
                sampler = self.sampler_for(trial, lambda: {"toy-0": child.pid})
                try:
                    with sampler:
                        self.settle_and_steady(trial, sampler, clock, result)
                        result.converged_by_rule = self.ksm_phases(trial, sampler, clock)
                finally:
                    result.frames = {"ksm": sampler.ksm_frame(), "processes": sampler.process_frame()}
                    result.sampler = sampler_health(sampler)
            finally:
                child.stdin.close()
                child.wait(timeout=10)
''')

TOY_PLAN = """
[study]
name = "toy"
ksm_off_baseline = true
[ksm]
sleep_millisecs = 10
[workload]
type = "toy"
mib = 16
[phases]
settle_s = 0
steady_max_s = 2
baseline_s = 1
measure_s = 4
[sampling]
interval_s = 0.25
pss_interval_s = 1
[sweep.ksm]
pages_to_scan = [5000]
"""


def _install(site: Path, name: str, files: dict[str, str], entry_points: str) -> dict[str, str]:
    """A distribution `name` in `site`: its files (path: text) and a .dist-info holding
    `entry_points`; returns the environment a child ksm-lab needs to see it."""
    for path, text in files.items():
        (site / path).parent.mkdir(parents=True, exist_ok=True)
        (site / path).write_text(text)
    info = site / f"{name}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(entry_points)
    return dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{REPO}")


def _install_toy(site: Path, init: str = TOY_INIT) -> dict[str, str]:
    """The toy workload's distribution: package toyload, entry point toy = toyload:PLUGIN."""
    files = {"toyload/__init__.py": init, "toyload/runner.py": TOY_RUNNER}
    return _install(site, "toyload", files, f"[{WORKLOAD_GROUP}]\ntoy = toyload:PLUGIN\n")


def _sweep_with(env: dict[str, str], plan_text: str, tmp_path: Path, name: str) -> Path:
    """`ksm-lab sweep` of `plan_text` in a child seeing `env`'s plugins; asserts it exited 0
    (also in its --json summary) and returns the study's folder."""
    plan = tmp_path / f"{name}.toml"
    plan.write_text(plan_text)
    results = tmp_path / "results"
    run = subprocess.run(
        [sys.executable, "-m", "orchestrator", "sweep", str(plan), "--results", str(results), "--json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout)["exit_code"] == 0
    return results / name


def test_the_shipped_workloads_are_registered_as_plugins():
    assert set(WORKLOAD_PLUGINS) == {"processes", "idle", "sysbench", "probe"}
    assert {t: p.where for t, p in WORKLOAD_PLUGINS.items()} == {
        "processes": "host",
        "probe": "host",
        "idle": "guests",
        "sysbench": "guests",
    }


def test_a_plugin_whose_model_does_not_carry_its_type_is_refused():
    from orchestrator.workloads.idle import IdleWorkload

    with pytest.raises(PlanError, match="Literal"):
        _check_workload("toy", WorkloadPlugin(type="toy", model=IdleWorkload, runner="x:Y", where="host"))
    with pytest.raises(PlanError, match="not a WorkloadPlugin"):
        _check_workload("toy", object())


def test_an_unknown_workload_type_names_the_registered_ones():
    with pytest.raises(PlanError, match="workload"):
        parse_plan(TOY_PLAN)  # no toy plugin in this process


@pytest.mark.ksm
def test_a_toy_workload_from_its_own_package_runs_a_study(tmp_path: Path, ksm_guard) -> None:
    study = _sweep_with(_install_toy(tmp_path / "site"), TOY_PLAN, tmp_path, "toy")
    trials = pd.read_csv(study / "trials.csv")
    assert list(trials["status"]) == ["ok", "ok"]
    processes = pd.read_csv(next((study / "trials").glob("*/processes.csv")))
    assert set(processes["label"]) == {"toy-0"}
    assert (study / "report" / "report.html").exists()


def test_a_broken_third_party_plugin_is_left_out_with_a_warning(tmp_path: Path) -> None:
    env = _install_toy(tmp_path / "site", init="raise ImportError('toy is broken')\n")
    run = subprocess.run(
        [sys.executable, "-c", "from orchestrator.plan import WORKLOAD_MODELS; print(sorted(WORKLOAD_MODELS))"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "['idle', 'probe', 'processes', 'sysbench']"
    assert "workload plugin 'toy'" in run.stderr and "toy is broken" in run.stderr


# The toy policy: KSM on for measure at the pages_to_scan its [ksm.toyrate] table gives, written
# through HostSettings (recorded, restored); its Run says what it wrote in trial.json's "policy".
TOY_POLICY = textwrap.dedent("""
    from __future__ import annotations

    from pydantic import Field

    from orchestrator.plugins import PolicyPlugin
    from orchestrator.validation import Strict


    class ToyRateParams(Strict):
        pages_to_scan: int = Field(200, ge=1, le=100000)


    class ToyRateRun:
        def __init__(self, settings, params):
            self.settings = settings
            self.params = params
            self.wrote = None

        def start(self):
            self.settings.write_knob("pages_to_scan", self.params.pages_to_scan)
            self.wrote = self.settings.read_counter("pages_to_scan")
            self.settings.run_ksmd()

        def stop(self):
            return None

        def summary(self):
            return {"name": "toyrate", "wrote_pages_to_scan": self.wrote}


    PLUGIN = PolicyPlugin(name="toyrate", params=ToyRateParams,
                          start=lambda settings, params, work_dir: ToyRateRun(settings, params))
""")

TOY_POLICY_PLAN = """
[study]
name = "toyrate"
[ksm]
sleep_millisecs = 10
pages_to_scan = 100
policy = "toyrate"
[ksm.toyrate]
pages_to_scan = 321
[workload]
type = "processes"
processes = 2
pages_per_process = 2048
[phases]
settle_s = 0
steady_max_s = 2
baseline_s = 1
measure_s = 3
[sampling]
interval_s = 0.25
pss_interval_s = 1
"""


def _install_toy_policy(site: Path, module: str = TOY_POLICY) -> dict[str, str]:
    """The toy policy's distribution: module toyrate, entry point toyrate = toyrate:PLUGIN."""
    return _install(site, "toyrate", {"toyrate.py": module}, f"[{POLICY_GROUP}]\ntoyrate = toyrate:PLUGIN\n")


def test_the_shipped_policies_are_registered_as_plugins():
    assert set(POLICY_PLUGINS) == {"static", "advisor", "ksmtuned", "kubevirt", "throttler"}
    assert {n for n, p in POLICY_PLUGINS.items() if p.params is not None} == {"ksmtuned", "kubevirt", "throttler"}
    assert POLICY_PLUGINS["advisor"].refusal is not None and POLICY_PLUGINS["ksmtuned"].check_host is not None


def test_policy_trial_ids_are_what_they_were_before_policies_became_plugins():
    """Resume finds finished trials by id: plans/policies.toml (every shipped policy, the
    advisor's knob changes, parameter tables) expands to the ids it had before."""
    plan, _ = load_plan(REPO / "plans" / "policies.toml")
    assert [t.trial_id for t in expand(plan)] == [
        "ksmoff_r0_5f5732a4",
        "policykubevirt_r0_b888b57c",
        "policythrottler_r0_5ccbde13",
        "policyadvisor_r0_989eef44",
        "policyksmtuned_r0_3ff327a7",
        "policystatic_r0_245c7f1e",
        "policystatic_r1_f51403dc",
        "policyadvisor_r1_80b2b824",
        "ksmoff_r1_9e22a07c",
        "policythrottler_r1_31be4157",
        "policykubevirt_r1_f7512a88",
        "policyksmtuned_r1_d00640a5",
    ]


def test_a_policy_plugin_without_a_callable_start_or_under_another_name_is_refused():
    def start(settings, params, work_dir):
        return None

    with pytest.raises(PlanError, match="not a PolicyPlugin"):
        _check_policy("toyrate", object())
    with pytest.raises(PlanError, match="same identifier"):
        _check_policy("toyrate", PolicyPlugin(name="other", start=start))
    with pytest.raises(PlanError, match="start must be callable"):
        _check_policy("toyrate", PolicyPlugin(name="toyrate", start="module:Class"))  # type: ignore[arg-type]
    with pytest.raises(PlanError, match="pydantic model"):
        _check_policy("toyrate", PolicyPlugin(name="toyrate", start=start, params=dict))
    assert _check_policy("toyrate", PolicyPlugin(name="toyrate", start=start)).name == "toyrate"


def test_an_unknown_policy_names_the_installed_ones():
    with pytest.raises(PlanError) as caught:
        parse_plan(TOY_POLICY_PLAN.replace("[ksm.toyrate]\npages_to_scan = 321\n", ""))  # no toyrate here
    assert (
        "ksm.policy: not an installed KSM policy; installed: advisor, ksmtuned, kubevirt, static, throttler "
        "(got 'toyrate')" in str(caught.value)
    )


@pytest.mark.ksm
def test_a_toy_policy_from_its_own_package_runs_a_study(tmp_path: Path, ksm_guard) -> None:
    study = _sweep_with(_install_toy_policy(tmp_path / "site"), TOY_POLICY_PLAN, tmp_path, "toyrate")
    trials = pd.read_csv(study / "trials.csv")
    assert list(trials["status"]) == ["ok"]
    record = json.loads(next((study / "trials").glob("*/trial.json")).read_text())
    # the plan's [ksm.toyrate] reached the policy, which wrote it to the real knob during measure
    assert record["policy"] == {"name": "toyrate", "wrote_pages_to_scan": 321}
    assert (study / "report" / "report.html").exists()


def test_a_broken_third_party_policy_is_left_out_with_a_warning(tmp_path: Path) -> None:
    env = _install_toy_policy(tmp_path / "site", module="raise ImportError('toyrate is broken')\n")
    run = subprocess.run(
        [sys.executable, "-c", "from orchestrator.plan import POLICY_PLUGINS; print(sorted(POLICY_PLUGINS))"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "['advisor', 'ksmtuned', 'kubevirt', 'static', 'throttler']"
    assert "policy plugin 'toyrate'" in run.stderr and "toyrate is broken" in run.stderr
