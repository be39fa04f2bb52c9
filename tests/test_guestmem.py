"""Guest memory snapshot: /proc/meminfo and InnoDB buffer pool parsers on real output, and a
snapshot through a local session against a hand-started MariaDB (skipped without MariaDB)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from orchestrator.errors import GuestError, WorkloadError
from orchestrator.workloads.guestmem import (
    BUFFER_POOL_FIELDS,
    MEMINFO_FIELDS,
    meminfo_argv,
    parse_buffer_pool,
    parse_guest_meminfo,
    snapshot,
)
from orchestrator.workloads.sysbench import SysbenchParams
from tests.guest_sessions import LocalSession, Result, needs_mariadb

DATA = Path(__file__).parent / "data" / "sysbench"
MEMINFO = (DATA / "meminfo.txt").read_text()
BUFFER_POOL = (DATA / "buffer_pool.stdout").read_text()


class ScriptedSession:
    """Answers by the command's first word; for the failure paths of snapshot()."""

    def __init__(self, answers: dict[str, Result | Exception]) -> None:
        self.answers = answers

    def run(self, cmd, timeout_s: float, check: bool = False) -> Result:
        answer = self.answers[cmd[0]]
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_meminfo_argv():
    assert meminfo_argv() == ["cat", "/proc/meminfo"]


def test_parse_captured_meminfo():
    values = parse_guest_meminfo(MEMINFO)
    assert set(values) == set(MEMINFO_FIELDS.values())
    assert values["mem_total_kib"] == 24731708
    assert values["cached_kib"] == int(
        next(line for line in MEMINFO.splitlines() if line.startswith("Cached:")).split()[1]
    )
    assert 0 < values["mem_free_kib"] <= values["mem_available_kib"] <= values["mem_total_kib"]


def test_parse_live_meminfo():
    values = parse_guest_meminfo(Path("/proc/meminfo").read_text())
    assert not any(math.isnan(v) for v in values.values())  # every field exists on kernel 6.x
    assert values["anon_pages_kib"] > 0 and values["mem_total_kib"] > values["mem_free_kib"]


def test_meminfo_missing_field_is_nan():
    text = "".join(line + "\n" for line in MEMINFO.splitlines() if not line.startswith("Shmem:"))
    values = parse_guest_meminfo(text)
    assert math.isnan(values["shmem_kib"]) and values["mem_total_kib"] == 24731708


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "not /proc/meminfo"),
        ("cat: /proc/meminfo: No such file or directory\n", "not /proc/meminfo"),
        ("MemTotal:       lots kB\n", "unexpected /proc/meminfo line"),
        ("MemTotal:       1024 MB\n", "unexpected /proc/meminfo line"),
    ],
)
def test_meminfo_garbage_raises(text, message):
    with pytest.raises(WorkloadError, match=message):
        parse_guest_meminfo(text)


def test_parse_captured_buffer_pool():
    assert parse_buffer_pool(BUFFER_POOL) == {
        "innodb_buffer_pool_bytes": 134217728,
        "innodb_buffer_pool_pages_data": 610,
        "innodb_buffer_pool_data_bytes": 9994240,
    }


def test_buffer_pool_missing_status_is_nan():
    values = parse_buffer_pool("innodb_buffer_pool_size\t268435456\n")
    assert values["innodb_buffer_pool_bytes"] == 268435456
    assert math.isnan(values["innodb_buffer_pool_pages_data"])


@pytest.mark.parametrize(
    "text",
    [
        "",
        "ERROR 2002 (HY000): Can't connect to local server through socket\n",
    ],
)
def test_buffer_pool_garbage_raises(text):
    with pytest.raises(WorkloadError, match="no InnoDB buffer pool figures"):
        parse_buffer_pool(text)


def test_snapshot_row_from_recorded_outputs():
    session = ScriptedSession({"cat": Result(0, MEMINFO, "", 0.01), "mariadb": Result(0, BUFFER_POOL, "", 0.02)})
    row = snapshot(session, "vm-0", "start")
    assert list(row)[:2] == ["guest", "when"] and (row["guest"], row["when"]) == ("vm-0", "start")
    assert set(row) == {"guest", "when", *MEMINFO_FIELDS.values(), *BUFFER_POOL_FIELDS.values()}
    assert row["mem_total_kib"] == 24731708 and row["innodb_buffer_pool_bytes"] == 134217728


def test_snapshot_without_buffer_pool_never_asks_mariadb():
    session = ScriptedSession({"cat": Result(0, MEMINFO, "", 0.01)})
    row = snapshot(session, "vm-0", "end", with_buffer_pool=False)
    assert math.isnan(row["innodb_buffer_pool_bytes"]) and row["anon_pages_kib"] > 0


@pytest.mark.parametrize(
    "answers, message",
    [
        (
            {"cat": GuestError("127.0.0.1:2201: `cat /proc/meminfo` timed out after 30 s")},
            "vm-1: cat failed: 127.0.0.1:2201: .* timed out",
        ),
        (
            {
                "cat": Result(0, MEMINFO, "", 0.0),
                "mariadb": Result(1, "", "ERROR 2002 (HY000): Can't connect to local server", 0.0),
            },
            "vm-1: mariadb exited with status 1: ERROR 2002",
        ),
        (
            {"cat": Result(0, "garbage\n", "", 0.0), "mariadb": Result(0, BUFFER_POOL, "", 0.0)},
            "vm-1: not /proc/meminfo",
        ),
    ],
)
def test_snapshot_failures_are_workload_errors(answers, message):
    with pytest.raises(WorkloadError, match=message):
        snapshot(ScriptedSession(answers), "vm-1", "start")


def test_snapshot_when_must_be_start_or_end():
    with pytest.raises(WorkloadError, match="when must be one of"):
        snapshot(ScriptedSession({}), "vm-0", "middle")


@needs_mariadb
def test_snapshot_against_real_meminfo_and_mariadb(mariadb_socket):  # the fixture is conftest's
    row = snapshot(LocalSession(mariadb_socket), "local", "end", params=SysbenchParams())
    assert row["mem_total_kib"] == parse_guest_meminfo(Path("/proc/meminfo").read_text())["mem_total_kib"]
    # MariaDB 10.11's default pool is 128 MiB; a fresh server already holds system tables.
    assert row["innodb_buffer_pool_bytes"] == 128 * 1024 * 1024
    assert row["innodb_buffer_pool_pages_data"] > 0
    assert 0 < row["innodb_buffer_pool_data_bytes"] <= row["innodb_buffer_pool_bytes"]
