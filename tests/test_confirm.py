"""The nightly job's confirmation path on real KSM with the processes workload.

A real reference run gives this host's saving; three earlier nights are crafted around it and
tonight is crafted much worse, so tonight is a suspect. The confirmation then re-measures for
real: it finds the usual saving, so the suspect is "not confirmed" and confirm exits 0."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pandas as pd
import pytest

from orchestrator.cli import main as cli
from orchestrator.plan import parse_plan
from orchestrator.sweep import run_sweep
from tests.nightly_studies import write_night

pytestmark = pytest.mark.ksm

PLAN = """
[study]
name = "confirmtest"
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
pages_to_scan = [2000]

[nightly]
confirm_max_s = 600
confirm_blocks = 2
"""


def test_a_suspect_that_confirmation_does_not_find_is_not_confirmed(ksm_guard, tmp_path: Path, capsys) -> None:
    reference = run_sweep(parse_plan(PLAN), PLAN, tmp_path / "reference").study.path
    trials = pd.read_csv(reference / "trials.csv")
    saved = trials.loc[~trials["ksm_off"].astype(bool), "saved_mib"].astype(float)
    level = float(saved.mean())
    assert level > 5, f"the reference run merged almost nothing ({level:.2f} MiB): KSM did not run"
    host = os.uname().nodename
    now = time.time()
    root = tmp_path / "root"
    for i, scale in enumerate((0.99, 1.0, 1.01)):
        write_night(
            root / f"night{i}",
            name="confirmtest",
            plan=PLAN,
            hostname=host,
            created_wall=now - 86400 * (3 - i),
            saved_mib={2000: [level * scale * f for f in (0.99, 1.0, 1.01)]},
        )
    tonight = write_night(
        root / "tonight",
        name="confirmtest",
        plan=PLAN,
        hostname=host,
        created_wall=now - 60,
        saved_mib={2000: [level * 0.5, level * 0.51, level * 0.49]},
    )

    code = cli.main(
        [
            "compare",
            str(root / "night2" / "confirmtest"),
            str(tonight),
            "--history",
            str(root),
            "--no-html",
            "--json-file",
            str(tonight / "report" / "compare.json"),
        ]
    )
    assert code == 1  # the gate fires on tonight alone
    capsys.readouterr()
    code = cli.main(["confirm", str(tonight), "--history", str(root)])
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err
    record = json.loads((tonight / "report" / "confirm.json").read_text())
    assert record["ran"] and not record["confirmed"] and record["blocks"] == 2
    saved_result = [r for r in record["results"] if r["metric"] == "saved_mib"]
    assert saved_result and saved_result[0]["verdict"] == "not confirmed"
    assert abs(saved_result[0]["confirm_pct"]) < 10, saved_result  # the confirmation found the usual saving
    assert json.loads((tonight / "report" / "compare.json").read_text())["confirmation"]["confirmed"] is False
    assert (tonight / "confirm" / "plan.toml").exists()
    # the confirmation study lives inside tonight's folder: history never counts it as a night
    from orchestrator.analysis.across import history

    built = history.build_index(root)
    assert built.studies == 4
