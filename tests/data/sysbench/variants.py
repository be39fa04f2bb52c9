"""Derives the damaged variants in this folder from the captured sysbench 1.0.20 outputs.

Run `python variants.py` here after `capture.sh` refreshed the captures. Every variant is a
captured text cut at a chosen byte, or with the FATAL lines sysbench 1.0.20 prints when a
worker loses its MariaDB connection spliced in (the message formats are the ones in
/usr/bin/sysbench and /usr/share/sysbench/oltp_common.lua of Debian's 1.0.20+ds-5).
"""

from pathlib import Path

HERE = Path(__file__).resolve().parent

# What a worker prints when mariadbd goes away under a prepared statement (oltp_common.lua:419
# is `stmt[tnum].point_selects:execute()`).
LOST_CONNECTION = (
    "FATAL: mysql_stmt_execute() returned error 2013 (Lost connection to MySQL server during "
    "query)\n"
    "FATAL: `thread_run' function failed: /usr/share/sysbench/oltp_common.lua:419: SQL error, "
    "errno = 2013, state = 'HY000': Lost connection to MySQL server during query\n"
)


def captured(name: str) -> str:
    return (HERE / f"{name}.stdout").read_text()


def through(text: str, marker: str) -> str:
    """text up to and including the first `marker`."""
    return text[: text.index(marker) + len(marker)]


def before(text: str, marker: str) -> str:
    return text[: text.index(marker)]


def after_line(text: str, marker: str, insert: str) -> str:
    """text with `insert` after the line that holds `marker`."""
    end = text.index("\n", text.index(marker)) + 1
    return text[:end] + insert + text[end:]


def variants() -> dict[str, tuple[str, int]]:
    """name -> (stdout, exit status)."""
    one, two = captured("run_1thread"), captured("run_2threads")
    return {
        # The channel dropped inside "avg:   3.17": the text ends in "3", no newline.
        "cut_in_latency_avg": (through(two, "avg:                                    3"), 0),
        # Cut right after the latency block: every number whole, "Threads fairness" missing.
        "cut_after_latency": (through(one, "sum:                                 9982.07\n"), 0),
        # A worker died after three reports; sysbench exits 1 without statistics.
        "fatal_mid_run": (before(one, "[ 4s ]") + LOST_CONNECTION, 1),
        # One of two workers died; the other finished, the statistics were printed, exit 0.
        "fatal_with_summary": (after_line(two, "[ 4s ]", LOST_CONNECTION), 0),
    }


def main() -> None:
    for name, (stdout, status) in variants().items():
        (HERE / f"{name}.stdout").write_text(stdout)
        (HERE / f"{name}.stderr").write_text("")
        (HERE / f"{name}.rc").write_text(f"{status}\n")


if __name__ == "__main__":
    main()
