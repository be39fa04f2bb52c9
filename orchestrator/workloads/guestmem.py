"""What a guest thinks of its own memory: /proc/meminfo and the InnoDB buffer pool.

One `snapshot()` per guest at the start and end of a trial gives a guest_memory.csv row, so the
host-side saving can be read against how much of each guest's RAM was cache, anon or buffer pool.
"""

from __future__ import annotations

import math
from typing import Any

from orchestrator.host import probes
from orchestrator.errors import WorkloadError
from orchestrator.workloads.sysbench import Session, SysbenchParams, innodb_buffer_pool_argv

# /proc/meminfo field -> column; all are kB (KiB) in the kernel's output.
MEMINFO_FIELDS = {
    "MemTotal": "mem_total_kib",
    "MemFree": "mem_free_kib",
    "MemAvailable": "mem_available_kib",
    "Cached": "cached_kib",
    "Buffers": "buffers_kib",
    "AnonPages": "anon_pages_kib",
    "Shmem": "shmem_kib",
}

# SHOW VARIABLES / SHOW STATUS name (lower-cased) -> column.
BUFFER_POOL_FIELDS = {
    "innodb_buffer_pool_size": "innodb_buffer_pool_bytes",
    "innodb_buffer_pool_pages_data": "innodb_buffer_pool_pages_data",
    "innodb_buffer_pool_bytes_data": "innodb_buffer_pool_data_bytes",
}

WHEN = ("start", "end")


def meminfo_argv() -> list[str]:
    return ["cat", "/proc/meminfo"]


def parse_guest_meminfo(text: str) -> dict[str, float]:
    """The MEMINFO_FIELDS columns, in KiB; NaN for a field this kernel does not print."""
    if not any(line.startswith("MemTotal:") for line in text.splitlines()):
        first = next((line for line in text.splitlines() if line.strip()), "")
        raise WorkloadError(f"not /proc/meminfo output (no MemTotal; first line {first[:200]!r})")
    try:
        meminfo = probes.parse_meminfo(text)
    except ValueError as exc:
        raise WorkloadError(str(exc)) from None
    values = {column: meminfo[name] for name, column in MEMINFO_FIELDS.items() if name in meminfo}
    return {column: values.get(column, math.nan) for column in MEMINFO_FIELDS.values()}


def parse_buffer_pool(text: str) -> dict[str, float]:
    """The BUFFER_POOL_FIELDS columns from `name<TAB>value` lines; NaN for a missing one."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 2 or parts[0].lower() not in BUFFER_POOL_FIELDS:
            continue
        try:
            values[BUFFER_POOL_FIELDS[parts[0].lower()]] = int(parts[1])
        except ValueError:
            raise WorkloadError(f"unexpected buffer pool line: {line.strip()!r}") from None
    if not values:
        raise WorkloadError(f"no InnoDB buffer pool figures in {text.strip()[:200]!r}")
    return {column: values.get(column, math.nan) for column in BUFFER_POOL_FIELDS.values()}


def snapshot(
    session: Session,
    guest_name: str,
    when: str,
    params: SysbenchParams | None = None,
    timeout_s: float = 30.0,
    with_buffer_pool: bool = True,
) -> dict[str, Any]:
    """One guest_memory.csv row: guest, when, the meminfo columns, the buffer pool columns.

    `with_buffer_pool=False` (a guest without MariaDB running) leaves those columns NaN.
    """
    if when not in WHEN:
        raise WorkloadError(f"snapshot when must be one of {WHEN}, got {when!r}")
    row: dict[str, Any] = {"guest": guest_name, "when": when}
    meminfo_text = _output(session, meminfo_argv(), timeout_s, guest_name)
    pool_text = _output(session, innodb_buffer_pool_argv(params), timeout_s, guest_name) if with_buffer_pool else None
    try:
        row.update(parse_guest_meminfo(meminfo_text))
        if pool_text is None:
            row.update(dict.fromkeys(BUFFER_POOL_FIELDS.values(), math.nan))
        else:
            row.update(parse_buffer_pool(pool_text))
    except WorkloadError as exc:
        raise WorkloadError(f"{guest_name}: {exc}") from exc
    return row


def _output(session: Session, argv: list[str], timeout_s: float, guest_name: str) -> str:
    try:
        result = session.run(argv, timeout_s)
    except WorkloadError:
        raise
    except Exception as exc:  # noqa: BLE001 - the caller wants one error type per guest
        raise WorkloadError(f"{guest_name}: {argv[0]} failed: {exc}") from exc
    if result.exit_status != 0:
        detail = (result.stderr.strip() or result.stdout.strip())[:300] or "no output"
        raise WorkloadError(f"{guest_name}: {argv[0]} exited with status {result.exit_status}: {detail}")
    return result.stdout
