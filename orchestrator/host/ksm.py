"""KSM and THP host settings as operations that remember.

Every write goes through `HostSettings.write()`, which first appends (path, old, new) to the
study's settings-record.json (fsynced) and only then writes sysfs. `restore()` undoes the record
in reverse order on every exit path; `restore_from_record()` does the same from the file after a
SIGKILL, so a crashed sweep never leaves the host with foreign KSM knobs.

Kernel rules this module respects (Documentation/admin-guide/mm/ksm.rst):
- merge_across_nodes can only change while nothing is merged: write run=2 (unmerge) first.
- pages_to_scan is not writable while advisor_mode is scan-time: set advisor_mode first.
- run=2 unmerges synchronously in the writer's context; we still wait, bounded, for
  pages_shared to reach 0 so no trial inherits merged pages.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from orchestrator.host import probes
from orchestrator.errors import HostError, KsmError, LockError
from orchestrator.fsutil import atomic_write_json
from orchestrator.host.probes import KSM_SYSFS

log = logging.getLogger(__name__)

# The one list of KSM knobs and THP modes (plan.py validates with it, this module writes only
# these). KSM knobs a plan may set, with the range the kernel accepts (mm/ksm.c). Counters are
# read-only and are not listed. "run" is driven by the sweep itself (reset -> 2, measure -> 1,
# off -> 0).
KSM_INT_KNOBS: dict[str, tuple[int, int]] = {
    "pages_to_scan": (0, 2**31 - 1),
    "sleep_millisecs": (0, 2**31 - 1),
    "max_page_sharing": (2, 2**31 - 1),
    "merge_across_nodes": (0, 1),
    "use_zero_pages": (0, 1),
    "stable_node_chains_prune_millisecs": (0, 2**31 - 1),
    "smart_scan": (0, 1),
    "advisor_max_cpu": (1, 100),
    "advisor_min_pages_to_scan": (1, 2**31 - 1),
    "advisor_max_pages_to_scan": (1, 2**31 - 1),
    "advisor_target_scan_time": (1, 2**31 - 1),
}
KSM_STR_KNOBS: dict[str, tuple[str, ...]] = {"advisor_mode": ("none", "scan-time")}
THP_MODES = ("always", "madvise", "never")
THP_DEFRAG_MODES = ("always", "defer", "defer+madvise", "madvise", "never")
# Every KSM knob: the ones a plan sets and run.
KSM_KNOBS: tuple[str, ...] = ("run", *KSM_INT_KNOBS, *KSM_STR_KNOBS)

THP_REL = Path("sys/kernel/mm/transparent_hugepage")
HOST_KNOB_FILES = {"thp_enabled": THP_REL / "enabled", "thp_defrag": THP_REL / "defrag"}

# The only folders this module ever writes under, whatever a settings record names: a record
# is a file in the results folder, and restore runs as root.
WRITABLE_RELS = (KSM_SYSFS, THP_REL)
# ... and in them only these files (the knobs; a crafted record naming another file of the two
# trees, or a new kernel's file we have never measured, is refused).
WRITABLE_FILES = frozenset([KSM_SYSFS / name for name in KSM_KNOBS] + list(HOST_KNOB_FILES.values()))

# Applied first, in this order, because later writes depend on them (see module docstring).
_ORDER_FIRST = ("advisor_mode", "merge_across_nodes")
_BRACKETED = re.compile(r"\[([^\]]+)\]")


def chosen_value(text: str) -> str:
    """A sysfs knob's value; for choice files ("always [madvise] never") the chosen one."""
    text = text.strip()
    match = _BRACKETED.search(text)
    return match.group(1) if match else text


def read_sysfs_value(path: Path) -> str:
    return chosen_value(path.read_text())


def read_ksm_knobs(root: Path = Path("/")) -> dict[str, str]:
    """Every readable file under /sys/kernel/mm/ksm (older kernels lack some: tolerated)."""
    return {name: chosen_value(text) for name, text in probes.read_ksm_files(root).items()}


def read_host_knobs(root: Path = Path("/")) -> dict[str, str]:
    values = {}
    for name, rel in HOST_KNOB_FILES.items():
        with contextlib.suppress(OSError):
            values[name] = read_sysfs_value(root / rel)
    return values


class HostSettings:
    """Writes host knobs, remembering each original value before the first change.

    The record keeps one entry per path, in the order of first change, with the value the host
    had before this tool touched it. Restoring goes in reverse order of that list.

    Entries of a loaded record that point outside the KSM and THP sysfs folders (after `..` and
    symlinks) are set aside in `refused`: never written, kept in the file, reported by restore().
    """

    def __init__(self, record_path: Path, root: Path = Path("/")) -> None:
        self.root = root
        self.record_path = record_path
        self.entries: list[dict[str, str]] = []
        self.refused: list[dict[str, str]] = []
        # Set by the sweep for one trial: how KSM starts for measure (policies/); None = run=1.
        self.policy_start: Callable[[], None] | None = None
        # Set by the sweep for one trial: who hears that a guest or worker started (the
        # throttler policy, as Kata's throttler hears of a new VM); None = nobody listens.
        self.start_listener: Callable[[str], None] | None = None
        if record_path.exists():
            for entry in _load_record(record_path):
                if reason := self.outside_writable(entry["path"]):
                    log.warning("settings record %s: ignoring %s: it %s", record_path, entry["path"], reason)
                    self.refused.append(entry)
                else:
                    self.entries.append(entry)

    # -- low level -----------------------------------------------------------------------------

    def _abs(self, rel: Path | str) -> Path:
        return self.root / rel

    def outside_writable(self, rel: Path | str) -> str | None:
        """Why root/rel may not be written (None when it is inside KSM's or THP's folder).

        Resolved first, so neither `..` nor a symlink nor an absolute path (which pathlib lets
        replace root) can lead a write out of those folders.
        """
        resolved = self._abs(rel).resolve()
        for folder in WRITABLE_RELS:
            base = self._abs(folder).resolve()
            if resolved != base and resolved.is_relative_to(base):
                if folder / resolved.relative_to(base) in WRITABLE_FILES:
                    return None
                return f"resolves to {resolved}, which is not a KSM or THP knob ksm-lab sets"
        allowed = " or ".join(f"/{folder}/" for folder in WRITABLE_RELS)
        return f"resolves to {resolved}, outside {allowed}"

    def write(self, rel: Path | str, value: Any) -> None:
        path = self._abs(rel)
        new = str(value)
        # Checked before the record grows, so a refused path never becomes an entry.
        self._refuse_outside(path)
        try:
            old = read_sysfs_value(path)
        except OSError as exc:
            raise KsmError(f"cannot read {path}: {exc.strerror}") from None
        if old == new:
            return
        key = str(Path(rel))
        if not any(e["path"] == key for e in self.entries):
            self.entries.append({"path": key, "old": old, "new": new})
            # Refused entries stay in the file: what a record said is evidence, not noise.
            atomic_write_json(self.record_path, self.entries + self.refused)
        self._raw_write(path, new)

    def _refuse_outside(self, path: Path) -> None:
        if reason := self.outside_writable(path):
            raise KsmError(f"refusing to write {path}: it {reason}")

    def _raw_write(self, path: Path, value: str) -> None:
        self._refuse_outside(path)
        try:
            # No O_CREAT: a knob that does not exist is an error, never a new file. O_NOFOLLOW
            # keeps a symlink swapped in after the check above from redirecting the write.
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC)
            with open(fd, "w") as f:
                f.write(value)
        except OSError as exc:
            raise KsmError(f"writing {value!r} to {path} failed: {exc.strerror or exc}") from None
        actual = read_sysfs_value(path)
        if actual != value:
            raise KsmError(f"wrote {value!r} to {path} but it reads back {actual!r}")

    def remember(self, knob: str) -> None:
        """Record a KSM knob's current value without writing it: for knobs a policy (ksmtuned,
        the advisor) changes behind this object, so that restore() still puts them back."""
        rel = KSM_SYSFS / knob
        key = str(rel)
        if any(e["path"] == key for e in self.entries):
            return
        self._refuse_outside(self._abs(rel))
        try:
            old = read_sysfs_value(self._abs(rel))
        except OSError as exc:
            raise KsmError(f"cannot read {self._abs(rel)}: {exc.strerror}") from None
        self.entries.append({"path": key, "old": old, "new": "(set by a policy)"})
        atomic_write_json(self.record_path, self.entries + self.refused)

    def write_knob(self, knob: str, value: Any) -> None:
        self.write(KSM_SYSFS / knob, value)

    def original(self, rel: Path | str) -> str | None:
        key = str(Path(rel))
        return next((e["old"] for e in self.entries if e["path"] == key), None)

    # -- KSM operations ------------------------------------------------------------------------

    def read_counter(self, name: str) -> int:
        return int(read_sysfs_value(self._abs(KSM_SYSFS / name)))

    def reset(self, timeout_s: float = 120.0) -> float:
        """Stop ksmd and unmerge everything; return how long unmerging took (s)."""
        start = time.monotonic()
        self.write(KSM_SYSFS / "run", 2)
        deadline = start + timeout_s
        while self.read_counter("pages_shared") != 0:
            if time.monotonic() > deadline:
                raise KsmError(
                    f"run=2 did not unmerge within {timeout_s:.0f} s "
                    f"(pages_shared still {self.read_counter('pages_shared')})"
                )
            time.sleep(0.05)
        return time.monotonic() - start

    def apply(self, ksm: Mapping[str, Any], host: Mapping[str, Any]) -> None:
        """Set a trial's knobs (KSM must be reset first). Knobs a previous trial changed but this
        one does not name go back to the host's original, so trials do not depend on order."""
        if read_sysfs_value(self._abs(KSM_SYSFS / "run")) != "2":
            raise KsmError("apply() needs KSM reset (run=2) first")
        wanted: dict[str, str] = {}
        for entry in self.entries:
            path = Path(entry["path"])
            if path.parent == KSM_SYSFS and path.name != "run":
                wanted[path.name] = entry["old"]
        wanted.update({k: str(v) for k, v in ksm.items()})
        missing = [k for k in wanted if not self._abs(KSM_SYSFS / k).exists()]
        if missing:
            raise KsmError(f"this kernel has no KSM knob(s): {', '.join(missing)}")
        # pages_to_scan is refused while the advisor drives it.
        if "pages_to_scan" in ksm and "advisor_mode" not in ksm and self._abs(KSM_SYSFS / "advisor_mode").exists():
            wanted["advisor_mode"] = "none"
        if wanted.get("advisor_mode") == "scan-time":
            # The advisor drives pages_to_scan (the kernel refuses writes to it meanwhile), and
            # entering scan-time overwrites it: record its value now, before anything does.
            wanted.pop("pages_to_scan", None)
            self.remember("pages_to_scan")
        first = [k for k in _ORDER_FIRST if k in wanted]
        order = first + sorted(set(wanted) - set(first))
        if wanted.get("advisor_mode") == "scan-time":
            # Last: entering scan-time sets pages_to_scan to advisor_min_pages_to_scan, which
            # must already be the trial's value.
            order = [k for k in order if k != "advisor_mode"] + ["advisor_mode"]
        for knob in order:
            self.write(KSM_SYSFS / knob, wanted[knob])

        for name, rel in HOST_KNOB_FILES.items():
            value = host.get(name, self.original(rel))
            if value is not None:
                self.write(rel, value)

    def start(self) -> None:
        """KSM on for measure: the trial's policy decides how (static: run=1)."""
        if self.policy_start is not None:
            self.policy_start()
        else:
            self.run_ksmd()

    def announce_start(self, source: str) -> None:
        """A guest or worker of the trial started (the runners call this): the trial's policy
        may act on it."""
        if self.start_listener is not None:
            self.start_listener(source)

    def run_ksmd(self) -> None:
        self.write(KSM_SYSFS / "run", 1)

    def stop(self) -> None:
        self.write(KSM_SYSFS / "run", 0)

    # -- restore -------------------------------------------------------------------------------

    def restore(self) -> list[str]:
        """Put every recorded knob back, in reverse order; return what was restored.

        Errors on one knob do not stop the others; they are raised together at the end.
        """
        restored: list[str] = []
        errors: list[str] = []
        run_rel = str(KSM_SYSFS / "run")
        run_entry = next((e for e in self.entries if e["path"] == run_rel), None)
        if any(Path(e["path"]).parent == KSM_SYSFS for e in self.entries):
            run_path = self._abs(run_rel)
            # Without a record for run, run never changed: it goes back to what it is now.
            run_entry = run_entry or {"path": run_rel, "old": read_sysfs_value(run_path), "new": "2"}
            # Unmerge first: merge_across_nodes is only writable with nothing merged.
            try:
                self._raw_write(run_path, "2")
            except KsmError as exc:
                errors.append(str(exc))
        # advisor_mode first: pages_to_scan is refused while it is scan-time.
        advisor_rel = str(KSM_SYSFS / "advisor_mode")
        ordered = sorted(reversed(self.entries), key=lambda e: e["path"] != advisor_rel)
        for entry in ordered:
            if entry["path"] != run_rel:
                self._restore_one(entry, restored, errors)
        if run_entry is not None:
            self._restore_one(run_entry, restored, errors)
        errors += [f"refused {e['path']!r}: it {self.outside_writable(e['path'])}" for e in self.refused]
        if errors:
            done = f" (restored: {', '.join(restored)})" if restored else ""
            raise KsmError("restore incomplete: " + "; ".join(errors) + done)
        return restored

    def _restore_one(self, entry: dict[str, str], restored: list[str], errors: list[str]) -> None:
        path = self._abs(entry["path"])
        try:
            if read_sysfs_value(path) != entry["old"]:
                self._raw_write(path, entry["old"])
            restored.append(f"{entry['path']}={entry['old']}")
        except (OSError, KsmError) as exc:
            errors.append(f"{entry['path']}: {exc}")


def _load_record(record_path: Path) -> list[dict[str, str]]:
    """settings-record.json's entries, each checked to be {"path", "old", "new"} strings."""
    try:
        entries = json.loads(record_path.read_text())
    except (ValueError, OSError) as exc:
        raise HostError(f"settings record {record_path} is unreadable: {exc}") from None
    if not isinstance(entries, list):
        raise HostError(f"settings record {record_path}: expected a list of entries")
    for number, entry in enumerate(entries, 1):
        if not (isinstance(entry, dict) and all(isinstance(entry.get(k), str) for k in ("path", "old", "new"))):
            raise HostError(f'settings record {record_path}: entry {number} is not {{"path", "old", "new"}} strings')
    return entries


def restore_from_record(record_path: Path, root: Path = Path("/")) -> list[str]:
    """Undo a settings record (after a crash). Entries outside KSM/THP sysfs are refused:
    the others are restored, then KsmError names the refused ones."""
    if not record_path.exists():
        raise HostError(f"no settings record at {record_path}: nothing to restore")
    return HostSettings(record_path, root).restore()


# ---------------------------------------------------------------------------------------------
# Host-wide guards


def refuse_if_ksmtuned(root: Path = Path("/")) -> None:
    """ksmtuned rewrites pages_to_scan/sleep_millisecs/run on its own schedule: the sweep's
    settings would silently not be what was measured."""
    pids = probes.live_pids_named("ksmtuned", root)
    if pids:
        raise HostError(
            f"ksmtuned is running (pid {', '.join(map(str, pids))}) and would change KSM knobs under "
            "the sweep; stop it first (`systemctl stop ksmtuned` or kill that pid) and rerun"
        )


def run_dir() -> Path:
    return Path(os.environ.get("KSM_LAB_RUN_DIR", "/run/ksm-lab"))


@contextlib.contextmanager
def host_lock(lock_path: Path | None = None, lock_dir: Path | None = None) -> Iterator[None]:
    """One sweep per host: two would fight over the one KSM.

    The lock is `lock_path`, else `<lock_dir>/sweep.lock`, else `<run_dir()>/sweep.lock`.
    """
    lock_path = lock_path or (lock_dir or run_dir()) / "sweep.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = _open_lock_file(lock_path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise LockError(
                f"another sweep (pid {holder}) holds {lock_path}: one sweep per host, since both "
                "would change the same KSM"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def _open_lock_file(lock_path: Path) -> int:
    """Open (or create) the lock file itself, never what a planted link points to.

    The sweep runs as root and truncates and writes the lock: a symlink or hard link at that
    path (the run dir may be a shared one, KSM_LAB_RUN_DIR=/tmp/...) would make it clobber
    another file, and a FIFO or device would hang or misbehave.
    """
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(lock_path, flags, 0o644)
    except OSError as exc:
        if lock_path.is_symlink():
            raise LockError(
                f"{lock_path} is a symlink; refusing to follow it for the sweep lock: remove it and rerun"
            ) from None
        raise LockError(f"cannot open the sweep lock {lock_path}: {exc.strerror or exc}") from None
    info = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(info.st_mode):
        problem = "is not a regular file"
    elif info.st_nlink != 1:
        problem = f"has {info.st_nlink} hard links"
    elif info.st_uid != os.geteuid():
        problem = f"belongs to uid {info.st_uid}, not to this user (uid {os.geteuid()})"
    if problem:
        os.close(fd)
        raise LockError(f"{lock_path} {problem}; refusing it as the sweep lock: remove it and rerun")
    os.set_blocking(fd, True)
    return fd
