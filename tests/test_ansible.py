"""contrib/ansible against this machine (ansible_connection=local): the wheel built on the
controller, installed into a venv at a temporary prefix, the plan and the nightly job (cron, then
systemd units without enabling them) written into the test's folder, the study playbook in
--check; and nothing left behind outside that folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator import __version__

REPO = Path(__file__).resolve().parent.parent
ANSIBLE = REPO / "contrib" / "ansible"
PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"  # ansible-core, from the [test] extra
# where the role's defaults would write: none of them may appear (or change) during the test
HOST_PATHS = (
    "/opt/ksm-lab",
    "/etc/ksm-lab",
    "/usr/local/lib/ksm-lab",
    "/etc/default/ksm-lab-nightly",
    "/etc/cron.d/ksm-lab",
    "/etc/systemd/system/ksm-lab-nightly.service",
    "/etc/systemd/system/ksm-lab-nightly.timer",
    "/etc/systemd/system/ksm-lab-nightly.service.d",
    "/var/lib/ksm-lab",
    "/var/log/ksm-lab-nightly.log",
    str(Path.home() / ".ansible"),
    str(Path.home() / ".ansible_async"),
)

pytestmark = pytest.mark.slow


def _state() -> dict[str, object]:
    """What the test must leave as it found it: the host paths, /tmp's wheel folders, the checkout."""
    return {
        "paths": {p: os.path.lexists(p) for p in HOST_PATHS},
        "wheel_dirs": sorted(p.name for p in Path("/tmp").glob("ksm-lab-ansible-wheel.*")),
        "checkout": subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--ignored"], capture_output=True, text=True, check=True
        ).stdout,
    }


def _play(tmp_path: Path, playbook: str, extra: dict[str, object], *args: str) -> subprocess.CompletedProcess:
    inventory = tmp_path / "inventory.ini"
    inventory.write_text(f"[ksm_lab]\nlocalhost ansible_connection=local ansible_python_interpreter={sys.executable}\n")
    variables = tmp_path / "vars.json"
    variables.write_text(json.dumps(extra))
    home = tmp_path / "ansible"
    config = tmp_path / "ansible.cfg"  # ours, so that no ansible.cfg of the machine or the user applies
    config.write_text("[defaults]\n")
    env = {
        **os.environ,
        "ANSIBLE_HOME": str(home),
        "ANSIBLE_LOCAL_TEMP": str(home / "tmp"),
        "ANSIBLE_REMOTE_TEMP": str(home / "tmp"),
        "ANSIBLE_ASYNC_DIR": str(home / "async"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_CONFIG": str(config),
        "PYTHONWARNINGS": "ignore",
        "TMPDIR": "/tmp",
    }
    done = subprocess.run(
        [str(PLAYBOOK), "-i", str(inventory), str(ANSIBLE / playbook), "-e", f"@{variables}", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    return done


def test_site_installs_plan_and_nightly_then_study_check(tmp_path: Path) -> None:
    before = _state()
    where = {
        "ksm_lab_prefix": str(tmp_path / "prefix"),
        "ksm_lab_python": sys.executable,
        "ksm_lab_plan_dest": str(tmp_path / "etc" / "nightly.toml"),
        "ksm_lab_results_root": str(tmp_path / "results"),
        "ksm_lab_script_dir": str(tmp_path / "lib"),
        "ksm_lab_env_file": str(tmp_path / "etc" / "default" / "ksm-lab-nightly"),
        "ksm_lab_cron_file": str(tmp_path / "cron.d" / "ksm-lab"),
        "ksm_lab_log": str(tmp_path / "log" / "ksm-lab-nightly.log"),
        "ksm_lab_systemd_dir": str(tmp_path / "systemd"),
        "ksm_lab_systemd_enable": False,
    }
    _play(tmp_path, "site.yml", {**where, "ksm_lab_nightly": "cron"})

    version = subprocess.run(
        [str(tmp_path / "prefix" / "bin" / "ksm-lab"), "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert version.returncode == 0 and __version__ in version.stdout
    assert (tmp_path / "etc" / "nightly.toml").read_text() == (REPO / "plans" / "nightly.toml").read_text()
    script = tmp_path / "lib" / "ksm-lab-nightly.sh"
    assert script.read_bytes() == (REPO / "contrib" / "ksm-lab-nightly.sh").read_bytes() and os.access(script, os.X_OK)
    cron = (tmp_path / "cron.d" / "ksm-lab").read_text()
    assert cron.endswith("\n")
    assert f"KSM_LAB={tmp_path}/prefix/bin/ksm-lab\n" in cron
    assert (
        f"0 2 * * * root {script} {tmp_path}/etc/nightly.toml {tmp_path}/results "
        f">>{tmp_path}/log/ksm-lab-nightly.log 2>&1\n"
    ) in cron
    assert not (tmp_path / "systemd").exists()  # cron mode writes no units

    # the same hosts switched to systemd: the shipped units + a drop-in with these paths, not enabled
    _play(tmp_path, "site.yml", {**where, "ksm_lab_nightly": "systemd"}, "--tags", "nightly")
    units = tmp_path / "systemd"
    assert (units / "ksm-lab-nightly.timer").read_bytes() == (REPO / "contrib" / "ksm-lab-nightly.timer").read_bytes()
    dropin = (units / "ksm-lab-nightly.service.d" / "ansible.conf").read_text()
    assert f"ExecStart={script} {tmp_path}/etc/nightly.toml {tmp_path}/results\n" in dropin
    assert f"EnvironmentFile=-{tmp_path}/etc/default/ksm-lab-nightly\n" in dropin
    env = (tmp_path / "etc" / "default" / "ksm-lab-nightly").read_text()
    assert f"KSM_LAB_PYTHON={tmp_path}/prefix/bin/python\n" in env

    # starting a study on every host, in --check: it says what it would run and starts nothing
    done = _play(tmp_path, "study.yml", {**where, "ksm_lab_nightly": "cron"}, "--check")
    assert f"{script} {tmp_path}/etc/nightly.toml {tmp_path}/results (detached" in done.stdout
    assert not any((tmp_path / "results").iterdir())

    assert _state() == before
