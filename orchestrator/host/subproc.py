"""One way to run a host command with a deadline: the whole process group goes at the deadline.

subprocess.run(timeout=...) kills only the direct child: debootstrap's or apt's children, an
rsync's ssh, keep running (and a rootfs may then be deleted under them). Here the command starts
a session of its own; at the deadline the group gets SIGTERM, then SIGKILL after a grace, and
TimeoutExpired carries the output so far, as subprocess.run's does.
"""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Any

KILL_GRACE_S = 5.0  # between SIGTERM and SIGKILL of the group


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone already


def run_bounded(argv: list[str], timeout_s: float, **kwargs: Any) -> subprocess.CompletedProcess:
    """subprocess.run(argv, timeout=timeout_s, capture_output=True, **kwargs), but at the
    deadline every process the command started is stopped, not only the command."""
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, **kwargs
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                out, err = proc.communicate(timeout=KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                out, err = proc.communicate()
            _signal_group(proc.pid, signal.SIGKILL)  # children that ignored SIGTERM
            raise subprocess.TimeoutExpired(argv, timeout_s, output=out, stderr=err) from None
        _signal_group(proc.pid, signal.SIGKILL)  # what the command left running in its group
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)
