"""run_bounded: at the deadline the command and everything it started are stopped."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from orchestrator.host.subproc import run_bounded
from orchestrator.host import probes


def _alive(pid: int) -> bool:
    """Exists and is not a zombie."""
    return probes.live_comm(pid) is not None


def test_the_deadline_stops_the_command_and_its_children(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    with pytest.raises(subprocess.TimeoutExpired) as err:
        run_bounded(["sh", "-c", f"sleep 1000 & echo $! > {pidfile}; echo started; wait"], 0.5, text=True)
    assert "started" in (err.value.output or "")
    child = int(pidfile.read_text())
    for _ in range(50):  # the group got SIGTERM; give the kernel a moment to reap
        if not _alive(child):
            break
        time.sleep(0.1)
    assert not _alive(child), "the command's child outlived the deadline"


def test_a_command_that_finishes_gives_its_output_and_status() -> None:
    done = run_bounded(["sh", "-c", "echo out; echo err >&2; exit 3"], 10, text=True)
    assert (done.returncode, done.stdout, done.stderr) == (3, "out\n", "err\n")
