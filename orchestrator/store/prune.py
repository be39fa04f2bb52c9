"""Remove old studies from a results root, never the one a nightly compare needs.

Per plan and host (study.json name, host.json machine_id, else its hostname), studies are ordered by created_wall; a
study whose date is not believable (catalog.date_trusted: NaN, before 2000, more than a day in
the future) is kept and left out of the order, so it can neither push real studies out of the
newest N nor count as the newest or the last good one.
A study is removed when it is beyond the newest ``keep`` (if given) AND older than
``older_than_days`` (if given). Two are always kept: the last good study (finished, every trial
ok: the nightly's compare baseline) and the newest study (it may be running or about to be
resumed).

Only study folders are removed: a folder holding a study.json with a schema_version, found by a
walk that never follows symlinks, that is not itself a symlink and resolves inside the root.
Folders left empty by a removal (the dated folder the nightly job made) are removed up to the root.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from orchestrator.store import catalog
from orchestrator.errors import StoreError

SECONDS_PER_DAY = 86_400


@dataclass(frozen=True)
class PruneDecision:
    entry: catalog.StudyEntry
    remove: bool
    why: str


def plan_prune(
    entries: list[catalog.StudyEntry],
    keep: int | None = None,
    older_than_days: float | None = None,
    now_wall: float | None = None,
) -> list[PruneDecision]:
    if keep is None and older_than_days is None:
        raise StoreError("prune needs --keep N or --older-than DAYS")
    if keep is not None and keep < 1:
        raise StoreError("--keep must be at least 1")
    now_wall = time.time() if now_wall is None else now_wall
    groups: dict[tuple[str, str], list[catalog.StudyEntry]] = {}
    decisions = []
    for entry in entries:
        if not catalog.date_trusted(entry.created_wall, now_wall):
            decisions.append(
                PruneDecision(
                    entry,
                    False,
                    f"its created_wall ({entry.created_wall!r}) is not a "
                    "believable date (not a number, before 2000 or in the future): kept, and "
                    "left out of the order so it cannot push real studies out",
                )
            )
            continue
        # The host is its machine id where host.json records one: two machines sharing a hostname
        # (a clone, a rename, studies collected from elsewhere) never prune each other's studies.
        groups.setdefault((entry.name, entry.host_id), []).append(entry)
    for group in groups.values():
        group = sorted(group, key=lambda e: (e.created_wall, str(e.path)))
        newest = group[-1]
        last_good = catalog.latest(group, (catalog.GOOD,))
        for position, entry in enumerate(reversed(group)):  # 0 = newest
            if entry is newest:
                decisions.append(PruneDecision(entry, False, "newest of its plan and host"))
            elif entry is last_good:
                decisions.append(PruneDecision(entry, False, "last good study of its plan and host"))
            elif keep is not None and position < keep:
                decisions.append(PruneDecision(entry, False, f"among the newest {keep}"))
            elif older_than_days is not None and now_wall - entry.created_wall < older_than_days * SECONDS_PER_DAY:
                decisions.append(PruneDecision(entry, False, f"younger than {older_than_days:g} days"))
            else:
                decisions.append(PruneDecision(entry, True, "old"))
    return sorted(decisions, key=lambda d: str(d.entry.path))


def _inside(path: Path, root: Path) -> bool:
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    return real != real_root and real.startswith(real_root.rstrip(os.sep) + os.sep)


def remove_study(path: Path, root: Path) -> None:
    """Delete one study folder after re-checking it is one, and empty parents up to root."""
    if path.is_symlink() or not path.is_dir() or not _inside(path, root):
        raise StoreError(f"{path}: not a study folder inside {root}; not removed")
    entry = catalog.read_entry(path)
    if entry is None:
        raise StoreError(f"{path}: study.json has no schema_version; not removed")
    shutil.rmtree(path)  # removes symlinks inside, never what they point to
    parent = path.parent
    real_root = os.path.realpath(root)
    while os.path.realpath(parent) != real_root and _inside(parent, root):
        try:
            parent.rmdir()  # only when empty
        except OSError:
            break
        parent = parent.parent


def prune(
    root: Path,
    keep: int | None = None,
    older_than_days: float | None = None,
    dry_run: bool = False,
    now_wall: float | None = None,
) -> list[PruneDecision]:
    root = Path(root)
    if not root.is_dir():
        raise StoreError(f"{root}: no such results folder")
    decisions = plan_prune(catalog.scan(root), keep, older_than_days, now_wall)
    if not dry_run:
        for decision in decisions:
            if decision.remove:
                remove_study(decision.entry.path, root)
    return decisions
