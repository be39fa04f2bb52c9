"""The full VM study on qemu:///system: boot guests, run sysbench in all of them while KSM is
swept, tear down; and a SIGKILLed sweep whose guests `cleanup` removes.

Marked vm (slow, needs `make host` and the image) and ksm (changes the host's one KSM)."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from orchestrator.plan import parse_plan
from orchestrator.sweep import run_sweep
from orchestrator.runners.vm import prepared_dir
from tests.hoststate import snapshot
from tests.vmhost import files_under, need_vm_host, study_leftovers

pytestmark = [pytest.mark.vm, pytest.mark.ksm]
REPO = Path(__file__).resolve().parent.parent
URI = "qemu:///system"


def sysbench_plan(study: str, workdir: Path, seed: int) -> str:
    return f"""
[study]
name = "{study}"
ksm_off_baseline = true
[ksm]
sleep_millisecs = 20
[workload]
type = "sysbench"
tables = 1
table_size = 1000
duration_s = 10
report_interval_s = 2
rand_seed = {seed}
warmup_s = 5
[guests]
count = 2
memory_mib = 1024
start = "boot"     # reboot per trial: the second boot reuses the prepared layers
workdir = "{workdir}"
[phases]
settle_s = 2
baseline_s = 3
[sampling]
interval_s = 1.0
pss_interval_s = 3.0
[sweep.ksm]
pages_to_scan = [5000]
"""


def test_sysbench_in_two_guests_under_a_ksm_sweep_leaves_the_host_clean(tmp_path, results_dir, ksm_guard):
    image = need_vm_host()
    study = f"pyt-sb-{os.getpid()}"
    seed = random.randint(1000, 2**30)  # a fresh prepared layer: the build path runs every time
    text = sysbench_plan(study, tmp_path / "work", seed)
    layers_before = set(prepared_dir(image).glob("*")) if prepared_dir(image).exists() else set()
    try:
        outcome = run_sweep(parse_plan(text), text, results_dir)
        assert (outcome.ran, outcome.failed) == (2, 0), (results_dir / study / "trials.csv").read_text()
        table = pd.read_csv(results_dir / study / "trials.csv")
        assert (table["tps"] > 0).all()
        records = {
            r.trial_id: json.loads((results_dir / study / "trials" / r.trial_id / "trial.json").read_text())
            for r in table.itertuples()
        }
        for trial_id, record in records.items():
            folder = results_dir / study / "trials" / trial_id
            per_guest = pd.read_csv(folder / "workload.csv").groupby("guest")["tps"].mean()
            assert len(per_guest) == 2 and (per_guest > 0).all(), per_guest
            procs = pd.read_csv(folder / "processes.csv")
            assert procs["label"].nunique() == 2 and procs["pss_kib"].max() > 100_000  # QEMU sampled
            memory = pd.read_csv(folder / "guest_memory.csv")
            assert set(memory["when"]) == {"start", "end"} and memory["innodb_buffer_pool_bytes"].gt(0).all()
            # each QEMU's guest RAM (one 1 GiB mapping) carries VmFlags mg, read once per trial
            assert len(record["mergeable"]) == 2, record["mergeable"]
            assert all(g["mergeable"] is True and g["big_kib"] >= 1024 * 1024 for g in record["mergeable"].values())
        first, second = (records[t] for t in table["trial_id"])
        assert first["provision"]["prepared_layer_reused"] is False
        assert second["provision"]["prepared_layer_reused"] is True  # rebooted on the cached layer
        on = table[~table["ksm_off"].astype(bool)].iloc[0]
        assert on["saved_mib"] > 0  # idle guest pages merge within seconds at 5000 pages/scan
    finally:
        for layer in set(prepared_dir(image).glob("*")) - layers_before:
            layer.unlink()
    assert study_leftovers(study) == {"domains": [], "qemu": []}
    assert files_under(tmp_path / "work") == []


KILL_PLAN = """
[study]
name = "{study}"
[workload]
type = "idle"
[guests]
count = 1
memory_mib = 768
start = "boot"
workdir = "{workdir}"
[phases]
measure_s = 600
[sweep.ksm]
pages_to_scan = [4321]
"""


def test_sigkilled_vm_sweep_is_healed_by_the_next_sweep_leaving_nothing(tmp_path, results_dir, ksm_guard):
    need_vm_host()
    study = f"pyt-kill-{os.getpid()}"
    plan = tmp_path / "plan.toml"
    plan.write_text(KILL_PLAN.format(study=study, workdir=tmp_path / "work"))
    sweep = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "sweep", str(plan), "--results", str(results_dir), "--no-report"],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 600
        while (
            Path("/sys/kernel/mm/ksm/pages_to_scan").read_text().strip() != "4321"
            or Path("/sys/kernel/mm/ksm/run").read_text().strip() != "1"
        ):
            assert sweep.poll() is None, "sweep ended before its measure phase"
            assert time.monotonic() < deadline, "guest never reached the measure phase"
            time.sleep(1)
        qemus = study_leftovers(study)["qemu"]
        assert qemus, "no QEMU process while measuring"
        # Guests run as libvirt's unprivileged user (libvirt-qemu on a host ksm-lab set up), not root.
        assert "root" not in {psutil.Process(pid).username() for pid in qemus}
    finally:
        sweep.send_signal(signal.SIGKILL)
        sweep.wait(30)
    left = study_leftovers(study)
    assert left["domains"] and left["qemu"]  # SIGKILL leaves them: the next sweep heals first
    # What the next sweep (or nightly) does before it runs: with the host lock free, the marker
    # names a dead sweep, so its ksmtuned, knobs and guests are put right.
    from orchestrator.host.ksm import host_lock
    from orchestrator.sweep import heal_killed_sweep

    with host_lock():
        done = heal_killed_sweep()
    assert f"removed guest ksmlab-{study}-0" in done, done
    assert any(line.startswith("restored") for line in done), done
    deadline = time.monotonic() + 30
    while study_leftovers(study)["qemu"] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert study_leftovers(study) == {"domains": [], "qemu": []}
    assert files_under(tmp_path / "work") == []
    from orchestrator.guests.ports import PortRegistry

    assert not [e for e in PortRegistry().held().values() if study in e["owner"]]  # ports released
    # `cleanup` and `restore` find nothing left to do.
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator", "cleanup", "--study", study],
        cwd=REPO,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )
    assert out.returncode == 0 and f"ksmlab-{study}-0" not in out.stdout, out.stdout + out.stderr
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator", "restore", str(results_dir / study)],
        cwd=REPO,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0, out.stderr
    assert snapshot() == ksm_guard
