"""Stand-ins for a guest's SSH session in the workload tests (sysbench, guestmem): a session that
runs the guest's argv on this host, one that answers with a recorded result, and the check
behind conftest's mariadb_socket fixture (a throwaway MariaDB for the real runs)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass

import pytest

from orchestrator.errors import GuestError
from orchestrator.workloads.sysbench import SysbenchParams

GUEST_SOCKET = SysbenchParams().mysql_socket


@dataclass(frozen=True)
class Result:
    exit_status: int
    stdout: str
    stderr: str
    duration_s: float


class LocalSession:
    """Runs a guest's argv on this host; the guest's MariaDB socket path is mapped to a local one."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path

    def run(self, cmd, timeout_s: float, check: bool = False) -> Result:
        argv = (
            ["sh", "-c", cmd] if isinstance(cmd, str) else [arg.replace(GUEST_SOCKET, self.socket_path) for arg in cmd]
        )
        started = time.monotonic()
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise GuestError(f"`{argv[0]}` timed out after {timeout_s:g} s") from None
        result = Result(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started)
        if check and result.exit_status != 0:
            raise GuestError(f"`{argv[0]}` exited {result.exit_status}")
        return result


class CannedSession:
    """Answers every run() with one recorded result (for failure paths only)."""

    def __init__(self, result: Result | Exception) -> None:
        self.result = result
        self.calls: list[list[str]] = []

    def run(self, cmd, timeout_s: float, check: bool = False) -> Result:
        self.calls.append(list(cmd))
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


def have_mariadb() -> str | None:
    missing = [tool for tool in ("sysbench", "mariadb", "mariadbd", "mariadb-install-db") if shutil.which(tool) is None]
    if missing:
        return f"not installed: {', '.join(missing)}"
    if os.geteuid() != 0:
        return "MariaDB root over the unix socket needs the OS user root"
    return None


needs_mariadb = pytest.mark.skipif(have_mariadb() is not None, reason=str(have_mariadb()))
