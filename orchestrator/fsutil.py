"""Atomic file writes: the one helper every module uses (study files, the settings record,
the port table, cached disk layers).

A temp file in the same folder is written, fsynced and renamed over the target, so a reader
(or a resumed sweep after a SIGKILL) sees the old file or the new one, whole, never half.
Shared vocabulary: imports nothing of ksm-lab, so any stage may use it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# mkstemp makes 0600; results and records are meant to be read by others on the host.
DEFAULT_MODE = 0o644


@contextlib.contextmanager
def _replacing(path: Path, mode: int) -> Iterator[Path]:
    """Yield a temp path beside `path`; once the body has filled it, fsync, chmod, rename."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes, mode: int = DEFAULT_MODE) -> None:
    with _replacing(path, mode) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str, mode: int = DEFAULT_MODE) -> None:
    atomic_write_bytes(path, text.encode(), mode)


def atomic_write_json(path: Path, data: Any, mode: int = DEFAULT_MODE) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n", mode)


def atomic_copy(source: Path, path: Path, mode: int = DEFAULT_MODE) -> None:
    """Copy `source` to `path` so that `path` is absent or complete (large files too)."""
    with _replacing(path, mode) as tmp:
        shutil.copyfile(source, tmp)
