"""Loopback ports for the guests' SSH forwards, unique on the host: across threads, sweeps and
processes (a flock'd table under /run/ksm-lab), so two sweeps never forward the same port.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from orchestrator.host import probes
from orchestrator.errors import HostError
from orchestrator.fsutil import atomic_write_json

DEFAULT_PORT_STATE_DIR = Path("/run/ksm-lab")

# flock is per open file; this lock keeps threads of one process apart as well.
_PORTS_LOCK = threading.Lock()
PORT_LOCK_TIMEOUT_S = 30.0  # the table is held for milliseconds; longer means a stuck holder
_LOCK_POLL_S = 0.05
_PORTS_IN_PROCESS: set[int] = set()


def _process_start_ticks(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot; tells a live holder from a reused pid."""
    try:
        stat = probes.read_proc_stat(pid)
    except OSError:
        return None
    return None if stat is None else stat.start_ticks


class PortRegistry:
    """Loopback ports for SSH forwards, unique across threads, sweeps and processes.

    The kernel picks a free port (bind 127.0.0.1:0), but QEMU binds it only seconds later, so
    every port handed out is recorded in a flock'd host-wide table and a process-wide set until
    released. Entries of processes that died without releasing (SIGKILL) are pruned on the
    next use; a holder is its pid plus its start time, so a reused pid does not keep a port.
    """

    def __init__(self, state_dir: Path = DEFAULT_PORT_STATE_DIR, lock_timeout_s: float = PORT_LOCK_TIMEOUT_S) -> None:
        self.state_dir = Path(state_dir)
        self.lock_timeout_s = lock_timeout_s
        self.lock_path = self.state_dir / "ports.lock"
        self.table_path = self.state_dir / "ports.json"

    @contextlib.contextmanager
    def _locked_table(self) -> Iterator[dict[str, dict]]:
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise HostError(f"cannot open the port lock {self.lock_path}: {exc}") from exc
        with _PORTS_LOCK:
            try:
                self._flock_within(lock_fd)
                table = self._load()
                yield table
                atomic_write_json(self.table_path, table)
            finally:
                os.close(lock_fd)  # drops the flock

    def _flock_within(self, fd: int) -> None:
        deadline = time.monotonic() + self.lock_timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise HostError(
                        f"the port table lock {self.lock_path} was not free within "
                        f"{self.lock_timeout_s:g} s: another process holds it (stuck?)"
                    ) from None
                time.sleep(_LOCK_POLL_S)

    def _load(self) -> dict[str, dict]:
        try:
            table = json.loads(self.table_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
        return {
            port: entry
            for port, entry in table.items()
            if entry.get("start_ticks") is not None and _process_start_ticks(int(entry["pid"])) == entry["start_ticks"]
        }

    def allocate(self, owner: str, attempts: int = 50) -> int:
        with self._locked_table() as table:
            for _ in range(attempts):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                    probe.bind(("127.0.0.1", 0))
                    port = probe.getsockname()[1]
                if str(port) not in table and port not in _PORTS_IN_PROCESS:
                    table[str(port)] = {
                        "pid": os.getpid(),
                        "start_ticks": _process_start_ticks(os.getpid()),
                        "owner": owner,
                    }
                    _PORTS_IN_PROCESS.add(port)
                    return port
        raise HostError(f"no free loopback port after {attempts} attempts ({self.table_path})")

    def release(self, port: int) -> None:
        with self._locked_table() as table:
            entry = table.get(str(port))
            if entry is not None and int(entry["pid"]) == os.getpid():
                del table[str(port)]
            _PORTS_IN_PROCESS.discard(port)

    def prune(self) -> None:
        """Drop the entries of dead holders (a SIGKILLed sweep): loading the table prunes it."""
        with self._locked_table():
            pass

    def held(self) -> dict[int, dict]:
        with self._locked_table() as table:
            return {int(port): dict(entry) for port, entry in table.items()}
