"""sysbench 1.0.x OLTP workload inside the guests: parameters, command builders, pure parsers.

The pure parts (argv builders, `parse_intervals`, `parse_summary`) need no guest; they are tested
against real sysbench 1.0.20 output kept under tests/data/sysbench/. The orchestration helpers at
the bottom only need an object with `run(cmd, timeout_s, check=False)` returning something with
`exit_status, stdout, stderr, duration_s` (guest.GuestSession, or a local stand-in in tests).
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal, Protocol

import pandas as pd
from pydantic import Field, field_validator, model_validator

from orchestrator.errors import GuestError, WorkloadError
from orchestrator.plugins import WorkloadPlugin
from orchestrator.validation import Params

# The lua tests sysbench 1.0 ships in /usr/share/sysbench (all use the oltp_common schema).
SysbenchTest = Literal[
    "oltp_read_write",
    "oltp_read_only",
    "oltp_write_only",
    "oltp_point_select",
    "oltp_update_index",
    "oltp_update_non_index",
    "oltp_insert",
    "oltp_delete",
    "select_random_points",
    "select_random_ranges",
    "bulk_insert",
]

# The interval line and workload.csv report this percentile; sysbench's own default too.
LATENCY_PERCENTILE = 95

WORKLOAD_COLUMNS = [
    "guest",
    "t_s",
    "threads",
    "tps",
    "qps",
    "qps_read",
    "qps_write",
    "qps_other",
    "latency_p95_ms",
    "errors_per_s",
    "reconnects_per_s",
]

_IDENTIFIER = re.compile(r"^[A-Za-z0-9_]+$")


class _SysbenchRun(Params):
    """What one sysbench run is given, as a plan's [workload] table sets it."""

    test: SysbenchTest = "oltp_read_write"
    tables: int = Field(4, ge=1, le=1000)
    table_size: int = Field(10_000, ge=1)
    threads: int = Field(1, ge=1, le=1024)
    duration_s: int = Field(60, ge=1, le=86400)
    report_interval_s: int = Field(1, ge=1, le=3600)
    rate: int = Field(0, ge=0, description="target transactions/s per guest; 0 = unlimited")
    # 0 would make sysbench seed its run from the clock (see seed_for_guest for prepare).
    rand_seed: int = Field(1, ge=1, le=2**31 - 1)

    @model_validator(mode="after")
    def _one_table_tests(self) -> _SysbenchRun:
        # select_random_*.lua assert tables == 1 and fail only once the run has started.
        if self.test.startswith("select_random_") and self.tables != 1:
            raise ValueError(f"{self.test} supports only tables = 1, got {self.tables}")
        return self


class SysbenchParams(_SysbenchRun):
    """One sysbench configuration: the run's settings plus how to reach the guest's MariaDB
    (the guest image's facts, not a plan's keys). What the command builders take."""

    mysql_socket: str = "/run/mysqld/mysqld.sock"
    mysql_db: str = "sbtest"
    mysql_user: str = "root"

    @field_validator("mysql_db", "mysql_user")
    @classmethod
    def _plain_identifier(cls, value: str) -> str:
        # Both end up inside SQL and on a remote shell command line.
        if not _IDENTIFIER.match(value):
            raise ValueError(f"must be letters, digits or '_' only, got {value!r}")
        return value

    @field_validator("mysql_socket")
    @classmethod
    def _absolute_socket(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"must be an absolute path in the guest, got {value!r}")
        return value


class SysbenchWorkload(_SysbenchRun):
    """A plan's [workload] type = "sysbench" table: the run's settings plus how the VM runner
    prepares and warms up the guests' data (runners/vm.py)."""

    type: Literal["sysbench"] = "sysbench"
    # "per_guest": each guest index gets its own data (its own seed); "shared": every guest
    # boots from one prepared layer and holds identical tables (KSM merges far more).
    data: Literal["per_guest", "shared"] = "per_guest"
    reuse_prepared: bool = True
    # Unmeasured sysbench run after the guests boot: without it the first trial meets a cold
    # InnoDB buffer pool and page cache, and its throughput says more about order than KSM.
    warmup_s: int = Field(0, ge=0, le=3600)

    writes_during_measure: ClassVar[bool] = True  # every OLTP test writes (the undo log, at least)
    # The fields that do not shape the prepared database: how a run goes, and how the prepared
    # layer reaches the guests. Every other field, one added later too, is part of the keys of
    # the cached disk layer and of booted guests shared between trials (runners/vm.py): a new
    # field costs a rebuild at worst, never a layer prepared for other data.
    NOT_DATA_SHAPE: ClassVar[frozenset[str]] = frozenset(
        {"type", "threads", "duration_s", "report_interval_s", "rate", "warmup_s", "data", "reuse_prepared"}
    )

    @classmethod
    def prepared_data_fields(cls) -> tuple[str, ...]:
        """The fields the prepared database depends on, in the model's order."""
        return tuple(k for k in cls.model_fields if k not in cls.NOT_DATA_SHAPE)

    def prepared_data(self) -> dict[str, Any]:
        """This workload's values of them: what a prepared layer is cached under."""
        data: dict[str, Any] = {k: getattr(self, k) for k in self.prepared_data_fields()}
        if self.test == "bulk_insert":  # its prepare makes one table per thread (_table_setup_argv)
            data["threads"] = self.threads
        return data

    def params(self, **update: Any) -> SysbenchParams:
        """The run's parameters (a warm-up or a burst changes duration_s through `update`)."""
        run = self.model_dump(include=set(_SysbenchRun.model_fields))
        return SysbenchParams(**{**run, **update})


# ---------------------------------------------------------------- command builders


def seed_for_guest(params: SysbenchParams, guest_index: int) -> int:
    """The prepare seed of guest number `guest_index`: distinct per guest, the same every trial.

    Caveat, measured (tests/test_sysbench.py): sysbench 1.0.20's `prepare` never seeds its RNG
    from --rand-seed (only `run` does), so two prepares with one seed still load different
    rows. The seed is passed anyway so a sysbench that honours it gets reproducible data;
    identical data across guests needs one prepared image, not equal seeds.
    """
    return params.rand_seed + guest_index


def _mariadb_argv(params: SysbenchParams, sql: str) -> list[str]:
    return [
        "mariadb",
        f"--socket={params.mysql_socket}",
        f"--user={params.mysql_user}",
        "--batch",
        "--skip-column-names",
        "-e",
        sql,
    ]


def create_database_argv(params: SysbenchParams | None = None) -> list[str]:
    params = params or SysbenchParams()
    return _mariadb_argv(params, f"CREATE DATABASE IF NOT EXISTS {params.mysql_db}")


def innodb_buffer_pool_argv(params: SysbenchParams | None = None) -> list[str]:
    """One `name<TAB>value` line each: pool size (bytes), pages holding data, bytes of data."""
    params = params or SysbenchParams()
    return _mariadb_argv(
        params,
        "SHOW GLOBAL VARIABLES LIKE 'innodb_buffer_pool_size'; "
        "SHOW GLOBAL STATUS WHERE Variable_name IN "
        "('Innodb_buffer_pool_pages_data', 'Innodb_buffer_pool_bytes_data')",
    )


def _common_argv(params: SysbenchParams) -> list[str]:
    return [
        "sysbench",
        params.test,
        "--db-driver=mysql",
        f"--mysql-socket={params.mysql_socket}",
        f"--mysql-user={params.mysql_user}",
        f"--mysql-db={params.mysql_db}",
        f"--tables={params.tables}",
        f"--table-size={params.table_size}",
    ]


def _table_setup_argv(params: SysbenchParams) -> list[str]:
    # bulk_insert.lua creates and drops one table per thread (it ignores --tables), so its
    # prepare/cleanup need --threads; the oltp tests prepare with one thread, which keeps the
    # data of a seed the same whatever thread count a trial runs with.
    threads = params.threads if params.test == "bulk_insert" else 1
    return [*_common_argv(params), f"--threads={threads}"]


def prepare_argv(params: SysbenchParams, seed: int) -> list[str]:
    if seed < 1:
        raise WorkloadError(f"prepare seed must be >= 1 (0 seeds from the clock), got {seed}")
    return [*_table_setup_argv(params), f"--rand-seed={seed}", "prepare"]


def run_argv(params: SysbenchParams) -> list[str]:
    return [
        *_common_argv(params),
        f"--threads={params.threads}",
        f"--time={params.duration_s}",
        f"--report-interval={params.report_interval_s}",
        f"--rate={params.rate}",
        f"--rand-seed={params.rand_seed}",
        f"--percentile={LATENCY_PERCENTILE}",
        "run",
    ]


def cleanup_argv(params: SysbenchParams) -> list[str]:
    return [*_table_setup_argv(params), "cleanup"]


# ---------------------------------------------------------------- parsers

_NUM = r"[-+]?(?:\d+(?:\.\d*)?|nan|inf)"
# sysbench ends every line it prints, so a line counts only with its newline: output cut by a
# dropped channel or a killed command can end mid-number ("avg: 3" of "avg: 3.17").
_EOL = r"[ \t]*(?=\r?\n)"
_INTERVAL = re.compile(
    rf"^\[\s*(?P<t>{_NUM})s\s*\]\s+thds:\s*(?P<threads>\d+)"
    rf"\s+tps:\s*(?P<tps>{_NUM})\s+qps:\s*(?P<qps>{_NUM})"
    rf"\s+\(r/w/o:\s*(?P<r>{_NUM})/(?P<w>{_NUM})/(?P<o>{_NUM})\)"
    rf"\s+lat\s+\(ms,\s*(?P<pct>{_NUM})%\):\s*(?P<lat>{_NUM})"
    rf"(?:\s+err/s:\s*(?P<err>{_NUM}))?"
    rf"(?:\s+reconn/s:\s*(?P<reconn>{_NUM}))?" + _EOL,
    re.IGNORECASE | re.MULTILINE,
)
_BANNER = re.compile(r"^sysbench \d+\.\d+", re.MULTILINE)
_FATAL = re.compile(r"^[ \t]*FATAL:.*$", re.MULTILINE)
# "Running the test with following options:" block; the one place a run without interval
# reports (or one that failed before its first) says how many threads it ran.
_THREADS_HEADER = re.compile(rf"^Number of threads:\s*(\d+){_EOL}", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class IntervalRow:
    """One `[ Ns ] thds: ...` line. `latency_pct_ms` is the `latency_percentile`-th percentile."""

    t_s: float
    threads: int
    tps: float
    qps: float
    qps_read: float
    qps_write: float
    qps_other: float
    latency_pct_ms: float
    latency_percentile: float
    errors_per_s: float
    reconnects_per_s: float


@dataclass(frozen=True, slots=True)
class Summary:
    """The final statistics block; None where the output lacks a piece (e.g. truncated)."""

    queries_read: int | None = None
    queries_write: int | None = None
    queries_other: int | None = None
    queries_total: int | None = None
    transactions: int | None = None
    tps: float | None = None
    queries: int | None = None
    qps: float | None = None
    ignored_errors: int | None = None
    ignored_errors_per_s: float | None = None
    reconnects: int | None = None
    reconnects_per_s: float | None = None
    total_time_s: float | None = None
    total_events: int | None = None
    latency_min_ms: float | None = None
    latency_avg_ms: float | None = None
    latency_max_ms: float | None = None
    latency_pct_ms: float | None = None
    latency_percentile: float | None = None
    latency_sum_ms: float | None = None
    events_per_thread_avg: float | None = None
    events_per_thread_stddev: float | None = None
    exec_time_per_thread_avg_s: float | None = None
    exec_time_per_thread_stddev_s: float | None = None
    threads: int | None = None  # from the options header, not the statistics block

    @property
    def complete(self) -> bool:
        """True when every section of the statistics block arrived whole.

        "Threads fairness" is the last thing sysbench prints, so requiring it too means a
        channel dropped inside the latency block (or right after it) is never taken for a
        finished run.
        """
        return all(getattr(self, name) is not None for name in _COMPLETE_FIELDS)

    @property
    def missing(self) -> list[str]:
        """The fields `complete` needs that this summary lacks (for error messages)."""
        return [name for name in _COMPLETE_FIELDS if getattr(self, name) is None]

    def to_dict(self) -> dict[str, Any]:
        """workload_summary.json's per-guest object (`errors` = sysbench's ignored errors)."""
        out = asdict(self)
        pct_ms = out.pop("latency_pct_ms")
        pct = out.pop("latency_percentile")
        out[_latency_column(pct if pct is not None else LATENCY_PERCENTILE)] = pct_ms
        out["errors"] = out.pop("ignored_errors")
        out["errors_per_s"] = out.pop("ignored_errors_per_s")
        return out


# One field per line of the statistics block, its last line (fairness) included.
_COMPLETE_FIELDS = (
    "transactions",
    "queries",
    "ignored_errors",
    "reconnects",
    "total_time_s",
    "total_events",
    "latency_min_ms",
    "latency_avg_ms",
    "latency_max_ms",
    "latency_pct_ms",
    "latency_sum_ms",
    "events_per_thread_avg",
    "exec_time_per_thread_avg_s",
)


def _latency_column(percentile: float) -> str:
    return f"latency_p{percentile:g}_ms"


def _to_float(token: str | None) -> float:
    return math.nan if token is None else float(token)


def _check_is_sysbench(text: str, found_anything: bool) -> None:
    fatal = fatal_lines(text)
    if fatal and not found_anything:
        raise WorkloadError("sysbench failed: " + " | ".join(fatal))
    if not found_anything and not _BANNER.search(text):
        first = next((line.strip() for line in text.splitlines() if line.strip()), "")
        raise WorkloadError(f"not sysbench output (first line: {first[:200]!r})")


def parse_intervals(text: str) -> list[IntervalRow]:
    """Every per-interval report line, in order.

    Other lines (`queue length` lines under --rate, histograms) are skipped, and so is a last
    line without its newline, which may have been cut off mid-number.
    Raises WorkloadError if the text is not sysbench output, or failed (FATAL) before its
    first report. FATAL after some reports returns the rows measured so far: the run still
    failed (see `fatal_lines`, `run_guest`), but what it measured until then is kept.
    """
    rows = [
        IntervalRow(
            t_s=float(m["t"]),
            threads=int(m["threads"]),
            tps=float(m["tps"]),
            qps=float(m["qps"]),
            qps_read=float(m["r"]),
            qps_write=float(m["w"]),
            qps_other=float(m["o"]),
            latency_pct_ms=float(m["lat"]),
            latency_percentile=float(m["pct"]),
            errors_per_s=_to_float(m["err"]),
            reconnects_per_s=_to_float(m["reconn"]),
        )
        for m in _INTERVAL.finditer(text)
    ]
    _check_is_sysbench(text, found_anything=bool(rows))
    return rows


def _line(body: str) -> re.Pattern[str]:
    """One whole summary line: indented `body`, then its newline (see _EOL)."""
    return re.compile(rf"^[ \t]*{body}{_EOL}", re.MULTILINE | re.IGNORECASE)


def _count_and_rate(label: str) -> re.Pattern[str]:
    return _line(rf"{label}:\s+(\d+)\s+\(\s*({_NUM}) per sec\.\)")


_SUMMARY_INTS = {
    "queries_read": _line(r"read:\s+(\d+)"),
    "queries_write": _line(r"write:\s+(\d+)"),
    "queries_other": _line(r"other:\s+(\d+)"),
    "queries_total": _line(r"total:\s+(\d+)"),
    "total_events": _line(r"total number of events:\s+(\d+)"),
}
_SUMMARY_FLOATS = {
    "total_time_s": _line(rf"total time:\s+({_NUM})s"),
    "latency_min_ms": _line(rf"min:\s+({_NUM})"),
    "latency_avg_ms": _line(rf"avg:\s+({_NUM})"),
    "latency_max_ms": _line(rf"max:\s+({_NUM})"),
    "latency_sum_ms": _line(rf"sum:\s+({_NUM})"),
}
_SUMMARY_PAIRS = {
    ("transactions", "tps"): _count_and_rate("transactions"),
    ("queries", "qps"): _count_and_rate("queries"),
    ("ignored_errors", "ignored_errors_per_s"): _count_and_rate("ignored errors"),
    ("reconnects", "reconnects_per_s"): _count_and_rate("reconnects"),
}
_PERCENTILE = _line(rf"(\d+(?:\.\d+)?)th percentile:\s+({_NUM})")
_FAIRNESS = {
    ("events_per_thread_avg", "events_per_thread_stddev"): _line(rf"events \(avg/stddev\):\s+({_NUM})/({_NUM})"),
    ("exec_time_per_thread_avg_s", "exec_time_per_thread_stddev_s"): _line(
        rf"execution time \(avg/stddev\):\s+({_NUM})/({_NUM})"
    ),
}


def fatal_lines(text: str) -> list[str]:
    """sysbench's `FATAL:` lines, stripped, in order. Any one of them fails a run."""
    return [line.strip() for line in _FATAL.findall(text)]


def parse_threads(text: str) -> int | None:
    """The thread count from the options header (`Number of threads: N`), None if absent."""
    m = _THREADS_HEADER.search(text)
    return int(m[1]) if m else None


def parse_summary(text: str) -> Summary:
    """The statistics block sysbench prints when a run ends.

    Pieces the text lacks are None (check `Summary.complete`); a line counts only once its
    newline arrived, so a cut text never yields a cut number. Raises WorkloadError when the text
    is not sysbench output, or reports FATAL errors anywhere: a run that printed one is not
    measured whatever statistics follow.
    """
    if fatal := fatal_lines(text):
        raise WorkloadError("sysbench failed: " + " | ".join(fatal))
    # Search only the statistics block (or what follows the last report when its header was
    # lost), so a label can never match a line from elsewhere.
    start = text.find("SQL statistics:")
    block = text[start:] if start >= 0 else text[_last_interval_end(text) :]
    values: dict[str, Any] = {}
    for name, pattern in _SUMMARY_INTS.items():
        if m := pattern.search(block):
            values[name] = int(m[1])
    for name, pattern in _SUMMARY_FLOATS.items():
        if m := pattern.search(block):
            values[name] = float(m[1])
    for (count_name, rate_name), pattern in _SUMMARY_PAIRS.items():
        if m := pattern.search(block):
            values[count_name] = int(m[1])
            values[rate_name] = float(m[2])
    for (avg_name, stddev_name), pattern in _FAIRNESS.items():
        if m := pattern.search(block):
            values[avg_name] = float(m[1])
            values[stddev_name] = float(m[2])
    if m := _PERCENTILE.search(block):
        values["latency_percentile"] = float(m[1])
        values["latency_pct_ms"] = float(m[2])
    _check_is_sysbench(text, found_anything=bool(values))
    _check_believable(values)
    return Summary(threads=parse_threads(text), **values)


# The figures compare and the nightly verdicts rest on: a guest that prints nan, inf or a negative
# rate (a broken sysbench, or a hostile guest forging numbers) has its result rejected, never averaged.
_CHECKED = ("tps", "qps", "latency_avg_ms", "latency_pct_ms", "latency_max_ms", "total_time_s")


def _check_believable(values: dict[str, Any]) -> None:
    bad = [f"{k} = {values[k]}" for k in _CHECKED if k in values and not (math.isfinite(values[k]) and values[k] >= 0)]
    if "tps" in values and "qps" in values and not bad and values["qps"] < values["tps"]:
        bad.append(f"qps {values['qps']} < tps {values['tps']} (every transaction has queries)")
    if bad:
        raise WorkloadError("sysbench's statistics are not a measurement (" + "; ".join(bad) + "): result rejected")


def _last_interval_end(text: str) -> int:
    end = 0
    for m in _INTERVAL.finditer(text):
        end = m.end()
    return end


# ---------------------------------------------------------------- running in guests


class CommandResultLike(Protocol):
    exit_status: int
    stdout: str
    stderr: str
    duration_s: float


class Session(Protocol):
    def run(self, cmd: Sequence[str] | str, timeout_s: float, check: bool = False) -> CommandResultLike: ...


@dataclass(frozen=True)
class GuestRun:
    """One guest's sysbench run. `error` is None when it ran to the end and parsed."""

    guest: str
    intervals: list[IntervalRow]
    summary: Summary
    raw_stdout: str
    raw_stderr: str
    exit_status: int | None = None
    start_wall: float = math.nan
    duration_s: float = math.nan
    error: str | None = None
    # From the options header, else the interval lines; known for most failed runs too.
    threads: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _run_checked(session: Session, argv: list[str], timeout_s: float, what: str) -> CommandResultLike:
    result = session.run(argv, timeout_s)
    if result.exit_status != 0:
        raise WorkloadError(f"{what} exited with status {result.exit_status}: {_failure_reason(result)}")
    return result


def _failure_reason(result: CommandResultLike) -> str:
    text = f"{result.stdout}\n{result.stderr}"
    if fatal := fatal_lines(text):
        return " | ".join(fatal)
    tail = [line.strip() for line in text.splitlines() if line.strip()][-3:]
    return " | ".join(tail) or "no output"


def prepare_guest(session: Session, params: SysbenchParams, seed: int, timeout_s: float) -> float:
    """Create the database and load fresh tables; returns seconds spent.

    Old tables are dropped first because oltp_common.lua's prepare uses a bare CREATE TABLE
    and fails on leftovers. `seed` goes to --rand-seed (see seed_for_guest for its limits).
    """
    started = time.monotonic()
    deadline = started + timeout_s
    for argv, what in (
        (create_database_argv(params), "CREATE DATABASE"),
        (cleanup_argv(params), "sysbench cleanup"),
        (prepare_argv(params, seed), "sysbench prepare"),
    ):
        remaining_s = deadline - time.monotonic()
        if remaining_s <= 0:
            raise WorkloadError(f"sysbench prepare took longer than {timeout_s:g} s")
        _run_checked(session, argv, remaining_s, what)
    return time.monotonic() - started


def run_guest(session: Session, params: SysbenchParams, timeout_s: float, guest: str = "") -> GuestRun:
    """Run sysbench once and parse it.

    A run that failed (non-zero exit, FATAL lines, statistics missing or cut, or a session
    timeout that kept the output so far) comes back with `error` set, its raw output and the
    intervals it reported before failing; check `run.ok`. Other session errors (no SSH, a
    timeout without output) propagate.
    """
    start_wall = time.time()
    session_error = None
    try:
        result = session.run(run_argv(params), timeout_s)
    except GuestError as exc:
        # guest.CommandTimeout carries what the command printed before its deadline (as
        # `partial`); duck-typed so this module needs no SSH library.
        partial = getattr(exc, "partial", None)
        if partial is None:
            raise
        result, session_error = partial, str(exc)
    intervals, summary, error = _parse_run(result)
    error = session_error or error
    return GuestRun(
        guest=guest,
        intervals=intervals,
        summary=summary if error is None else Summary(threads=summary.threads),
        raw_stdout=result.stdout,
        raw_stderr=result.stderr,
        exit_status=result.exit_status,
        start_wall=start_wall,
        duration_s=result.duration_s,
        error=None if error is None else f"sysbench in {guest or 'guest'}: {error}",
        threads=summary.threads or (intervals[-1].threads if intervals else None),
    )


def _parse_run(result: CommandResultLike) -> tuple[list[IntervalRow], Summary, str | None]:
    """(intervals, summary, why the run failed or None). Intervals survive every failure."""
    failed = Summary(threads=parse_threads(result.stdout))
    try:
        intervals, unparsable = parse_intervals(result.stdout), None
    except WorkloadError as exc:
        intervals, unparsable = [], str(exc)
    if result.exit_status != 0:
        return intervals, failed, (f"exited with status {result.exit_status}: {_failure_reason(result)}")
    if fatal := fatal_lines(f"{result.stdout}\n{result.stderr}"):
        # sysbench can print FATAL (a worker's query failed) and still exit 0.
        return intervals, failed, "reported " + " | ".join(fatal)
    if unparsable is not None:
        return intervals, failed, unparsable
    try:
        summary = parse_summary(result.stdout)
    except WorkloadError as exc:
        return intervals, failed, str(exc)
    if summary.transactions is None:
        return intervals, summary, (f"no final statistics in the output ({_failure_reason(result)})")
    if not summary.complete:
        return intervals, summary, (f"final statistics cut short (missing: {', '.join(summary.missing)})")
    return intervals, summary, None


def run_all(
    sessions: Mapping[str, Session],
    params: SysbenchParams,
    timeout_s: float,
    barrier_timeout_s: float = 60.0,
) -> dict[str, GuestRun]:
    """Run sysbench in every guest at once; one GuestRun per guest, failures included.

    Every failure (session error, sysbench FATAL, no statistics) is that guest's `error`;
    nothing raised in a runner thread escapes. Results keep the order of `sessions`.
    """
    if not sessions:
        return {}
    barrier = threading.Barrier(len(sessions))
    runs: dict[str, GuestRun] = {}
    lock = threading.Lock()

    def one(guest: str, session: Session) -> None:
        try:
            # All guests start together, so their intervals overlap as fully as possible.
            barrier.wait(barrier_timeout_s)
            run = run_guest(session, params, timeout_s, guest=guest)
        except Exception as exc:  # noqa: BLE001 - a guest's failure is data, not a crash
            run = _failed_run(guest, exc)
        with lock:
            runs[guest] = run

    threads = [
        threading.Thread(target=one, args=(guest, session), name=f"sysbench-{guest}", daemon=True)
        for guest, session in sessions.items()
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        # run() enforces timeout_s itself; the margin covers the barrier and parsing.
        thread.join(timeout_s + barrier_timeout_s + 30)
    for guest in sessions:
        if guest not in runs:
            runs[guest] = _failed_run(guest, WorkloadError(f"sysbench in {guest} never returned"))
    return {guest: runs[guest] for guest in sessions}


def _failed_run(guest: str, exc: BaseException) -> GuestRun:
    if isinstance(exc, threading.BrokenBarrierError):
        message = "another guest's runner did not reach the start barrier"
    else:
        message = str(exc) or type(exc).__name__
    return GuestRun(
        guest=guest,
        intervals=[],
        summary=Summary(),
        raw_stdout="",
        raw_stderr="",
        error=f"{type(exc).__name__}: {message}",
    )


def _as_runs(runs: Mapping[str, GuestRun] | Iterable[GuestRun]) -> list[GuestRun]:
    return list(runs.values()) if isinstance(runs, Mapping) else list(runs)


def intervals_frame(runs: Mapping[str, GuestRun] | Iterable[GuestRun]) -> pd.DataFrame:
    """workload.csv: one row per guest x interval, in the contract's column order.

    A failed guest contributes the reports it printed before failing (its `error` says why).
    """
    records = []
    for run in _as_runs(runs):
        for row in run.intervals:
            if row.latency_percentile != LATENCY_PERCENTILE:
                raise WorkloadError(
                    f"{run.guest}: interval latency is the {row.latency_percentile:g}th "
                    f"percentile, workload.csv holds the {LATENCY_PERCENTILE}th"
                )
            records.append(
                {
                    "guest": run.guest,
                    "t_s": row.t_s,
                    "threads": row.threads,
                    "tps": row.tps,
                    "qps": row.qps,
                    "qps_read": row.qps_read,
                    "qps_write": row.qps_write,
                    "qps_other": row.qps_other,
                    "latency_p95_ms": row.latency_pct_ms,
                    "errors_per_s": row.errors_per_s,
                    "reconnects_per_s": row.reconnects_per_s,
                }
            )
    return pd.DataFrame.from_records(records, columns=WORKLOAD_COLUMNS)


def summary_dict(runs: Mapping[str, GuestRun] | Iterable[GuestRun]) -> dict[str, dict[str, Any]]:
    """workload_summary.json: {guest: {transactions, tps, ..., "error": str | None}}."""
    out = {}
    for run in _as_runs(runs):
        entry = run.summary.to_dict()
        entry["duration_s"] = None if math.isnan(run.duration_s) else run.duration_s
        entry["start_wall"] = None if math.isnan(run.start_wall) else run.start_wall
        entry["threads"] = run.threads
        entry["error"] = run.error
        out[run.guest] = entry
    return out


PLUGIN = WorkloadPlugin(
    type="sysbench", model=SysbenchWorkload, runner="orchestrator.runners.vm:VmRunner", where="guests"
)
