"""Where the command line's messages go: the terminal, each study's sweep.log, crash logs.

- The terminal gets rich's display (log lines, the trials bar) on stderr; stdout is kept for
  what scripts read (paths, --json).
- A sweep also writes a plain-text sweep.log in its study folder: every log line with an ISO
  timestamp, unwrapped, plus the phase of each trial (which the terminal shows as a bar).
  Appended to on --resume, so one file tells the whole study's story.
- An unexpected error (a bug) leaves its traceback in that log, or, before a study folder
  exists, in a ksm-lab-error-*.log file, so the terminal gets one line.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
import traceback
from datetime import datetime
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler

console = Console(stderr=True)

# Trial phases go here: into sweep.log, not onto the terminal (the progress bar shows them).
PROGRESS_LOGGER = "orchestrator.progress"
STUDY_LOG_NAME = "sweep.log"
_NOISY = ("paramiko", "matplotlib", "PIL")

_study_log: logging.FileHandler | None = None


class _NotProgress(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith(PROGRESS_LOGGER)


class _IsoFormatter(logging.Formatter):
    """`2026-12-01T19:57:03.123+01:00 INFO    orchestrator.sweep: message` (local time, offset)."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="milliseconds")


def setup(verbose: bool) -> None:
    handler = RichHandler(console=console, show_path=False, rich_tracebacks=False, markup=False)
    handler.addFilter(_NotProgress())
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        handlers=[handler],
        format="%(message)s",
        datefmt="[%X]",
        force=True,
    )
    for noisy in _NOISY:
        logging.getLogger(noisy).setLevel(logging.WARNING)


def open_study_log(study_dir: Path) -> Path:
    """Start copying every log record into <study_dir>/sweep.log (appending); returns its path."""
    global _study_log
    close_study_log()
    path = Path(study_dir) / STUDY_LOG_NAME
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(_IsoFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    _study_log = handler
    return path


def close_study_log() -> None:
    global _study_log
    if _study_log is not None:
        logging.getLogger().removeHandler(_study_log)
        _study_log.close()
        _study_log = None


def to_study_log(level: int, message: str) -> None:
    """A line for sweep.log alone (the terminal already shows it its own way)."""
    if _study_log is not None:
        _study_log.handle(logging.LogRecord("orchestrator.cli.main", level, __file__, 0, message, None, None))


def save_traceback(fallback_dir: Path, argv: list[str]) -> Path:
    """Record the exception being handled with its traceback; returns where it went.

    Into the open sweep.log when there is one; else a new ksm-lab-error-<time>-<pid>.log in
    fallback_dir (the results folder), else in the temp folder when that one is not writable.
    """
    exc_info = sys.exc_info()
    if _study_log is not None:
        record = logging.LogRecord(
            "orchestrator.cli.main",
            logging.ERROR,
            __file__,
            0,
            "unexpected error (a bug in ksm-lab): %s",
            (" ".join(argv),),
            exc_info,
        )
        _study_log.handle(record)  # the file only: the terminal gets one line
        return Path(_study_log.baseFilename)
    name = f"ksm-lab-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    text = f"{datetime.now().astimezone().isoformat(timespec='seconds')} ksm-lab {' '.join(argv)}\n" + "".join(
        traceback.format_exception(*exc_info)
    )
    for folder in (Path(fallback_dir), Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text)
            return folder / name
        except OSError:
            continue
    raise OSError("nowhere to write the traceback")
