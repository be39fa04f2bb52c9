"""Workloads are plugins: a toy workload from a package of its own (a real distribution with an
entry point, found by importlib.metadata) runs a study end to end, with no edit to ksm-lab."""

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
from orchestrator.plan import WORKLOAD_PLUGINS, parse_plan
from orchestrator.plugins import WORKLOAD_GROUP, WorkloadPlugin, _check

REPO = Path(__file__).resolve().parent.parent

# The toy: one child process holding MiB of identical pages marked MADV_MERGEABLE. Its model and
# plugin (toyload/__init__.py) and its runner (toyload/runner.py) live in its own package, as a
# third party would write them: the plugin's module imports no runner (the plan loads it while
# orchestrator.plan is still importing), the runner is named by a string and loaded by the sweep.
TOY_INIT = textwrap.dedent('''
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
''')

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


def _install_toy(site: Path, init: str = TOY_INIT) -> dict[str, str]:
    """A distribution in `site` (its package and its .dist-info with the entry point), and the
    environment a child ksm-lab needs to see it."""
    package = site / "toyload"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(init)
    (package / "runner.py").write_text(TOY_RUNNER)
    info = site / "toyload-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toyload\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{WORKLOAD_GROUP}]\ntoy = toyload:PLUGIN\n")
    return dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{REPO}")


def test_the_shipped_workloads_are_registered_as_plugins():
    assert set(WORKLOAD_PLUGINS) == {"processes", "idle", "sysbench", "probe"}
    assert {t: p.where for t, p in WORKLOAD_PLUGINS.items()} == \
        {"processes": "host", "probe": "host", "idle": "guests", "sysbench": "guests"}


def test_a_plugin_whose_model_does_not_carry_its_type_is_refused():
    from orchestrator.workloads.idle import IdleWorkload

    with pytest.raises(PlanError, match="Literal"):
        _check("toy", WorkloadPlugin(type="toy", model=IdleWorkload, runner="x:Y", where="host"))
    with pytest.raises(PlanError, match="not a WorkloadPlugin"):
        _check("toy", object())


def test_an_unknown_workload_type_names_the_registered_ones():
    with pytest.raises(PlanError, match="workload"):
        parse_plan(TOY_PLAN)  # no toy plugin in this process


@pytest.mark.ksm
def test_a_toy_workload_from_its_own_package_runs_a_study(tmp_path: Path, ksm_guard) -> None:
    env = _install_toy(tmp_path / "site")
    plan = tmp_path / "toy.toml"
    plan.write_text(TOY_PLAN)
    results = tmp_path / "results"
    run = subprocess.run([sys.executable, "-m", "orchestrator", "sweep", str(plan), "--results", str(results),
                          "--json"], cwd=tmp_path, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout)
    assert summary["exit_code"] == 0
    trials = pd.read_csv(results / "toy" / "trials.csv")
    assert list(trials["status"]) == ["ok", "ok"]
    processes = pd.read_csv(next((results / "toy" / "trials").glob("*/processes.csv")))
    assert set(processes["label"]) == {"toy-0"}
    assert (results / "toy" / "report" / "report.html").exists()


def test_a_broken_third_party_plugin_is_left_out_with_a_warning(tmp_path: Path) -> None:
    env = _install_toy(tmp_path / "site", init="raise ImportError('toy is broken')\n")
    run = subprocess.run([sys.executable, "-c", "from orchestrator.plan import WORKLOAD_MODELS; print(sorted(WORKLOAD_MODELS))"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "['idle', 'probe', 'processes', 'sysbench']"
    assert "workload plugin 'toy'" in run.stderr and "toy is broken" in run.stderr
