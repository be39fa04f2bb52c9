"""Pull finished studies from lab hosts into one results root, with rsync over SSH.

KSM is per host, so every lab host runs its own nightly sweep; `collect` only copies. For each
HOST ("[user@]host[:remote results root]"):

1. rsync the remote root's small metadata files (study.json, host.json, trials.csv, trial.json)
   into a hidden mirror, INTO/.collect/<host>/meta/, and judge each study there (catalog's states:
   a study still running or interrupted is "unfinished" and is not copied);
2. for a finished study not yet collected, rsync the whole folder into INTO/.collect/<host>/partial/
   <path>, check the copy is finished too (the remote may have changed meanwhile), then rename
   it to INTO/<host>/<path>. The rename is atomic, and discovery skips hidden folders, so a study
   half-copied (an interrupted collect, a dropped connection) is never visible; the next collect
   resumes the partial copy incrementally.

SSH verifies host keys and never adds one (StrictHostKeyChecking=yes, BatchMode=yes: no prompt
in a nightly job). ssh uses the first value it gets for an option, so these come before any
--ssh-option and cannot be overridden by it. rsync runs with -rt only: symlinks, devices and
owners from the remote are not recreated here.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.store import catalog
from orchestrator.errors import CollectError
from orchestrator.host.subproc import run_bounded

DEFAULT_REMOTE_ROOT = "/var/lib/ksm-lab/results"  # the nightly job's default results root
SSH_BASE = ("ssh", "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=30")
METADATA_FILTER = (
    "--include=*/",
    "--include=study.json",
    "--include=host.json",
    "--include=trials.csv",
    "--include=trial.json",
    "--exclude=*",
)
STAGING = ".collect"
HOST_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
USER = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")  # never a leading "-": rsync would read an option
RSYNC_TIMEOUT_S = 3600  # one study over a slow link; a hung connection must not hold the night
RSYNC_IO_TIMEOUT_S = 300  # rsync --timeout: no data for this long = a dead link


@dataclass(frozen=True)
class HostSpec:
    label: str  # the folder under INTO: host name without user
    remote: str  # what rsync gets before the colon: [user@]host
    root: str  # results root on that host


def parse_host(spec: str, default_root: str = DEFAULT_REMOTE_ROOT) -> HostSpec:
    remote, _, root = spec.partition(":")
    user, at, host = remote.rpartition("@")
    if not HOST_LABEL.match(host) or (at and not USER.match(user)):
        raise CollectError(f"{spec!r}: expected [user@]host[:path] with a plain host name")
    return HostSpec(host, remote, (root or default_root).rstrip("/") or "/")


@dataclass
class HostResult:
    host: str
    collected: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (study path on the host, why)
    error: str | None = None


def ssh_command(options: tuple[str, ...] = ()) -> str:
    return shlex.join([*SSH_BASE, *options])


def _rsync(rsync: str, ssh: str, args: list[str]) -> None:
    argv = [*shlex.split(rsync), "-rt", f"--timeout={RSYNC_IO_TIMEOUT_S}", "-e", ssh, *args]
    try:
        done = run_bounded(argv, RSYNC_TIMEOUT_S, text=True)  # rsync's ssh too
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CollectError(f"{argv[0]}: {exc}") from None
    if done.returncode != 0:
        # ssh's own reason ("Host key verification failed.") comes before rsync's summary line
        lines = [line.strip() for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        raise CollectError(f"rsync exited {done.returncode}: {'; '.join(lines[-4:]) or 'no message'}")


def collect_host(spec: HostSpec, into: Path, rsync: str = "rsync", ssh_options: tuple[str, ...] = ()) -> HostResult:
    result = HostResult(spec.label)
    ssh = ssh_command(ssh_options)
    staging = into / STAGING / spec.label
    meta, partial = staging / "meta", staging / "partial"
    meta.mkdir(parents=True, exist_ok=True)
    try:
        _rsync(
            rsync, ssh, ["--delete", "--prune-empty-dirs", *METADATA_FILTER, f"{spec.remote}:{spec.root}/", f"{meta}/"]
        )
        for study_meta in catalog.find_study_dirs(meta):
            rel = os.path.relpath(study_meta, meta)
            entry = catalog.read_entry(study_meta)
            final = into / spec.label / rel
            if entry is None:
                result.skipped.append((rel, "study.json without schema_version"))
            elif final.exists():
                continue  # collected before: a finished study does not change
            elif not entry.finished:
                result.skipped.append((rel, "unfinished on the host"))
            else:
                copy = partial / rel
                copy.mkdir(parents=True, exist_ok=True)
                _rsync(rsync, ssh, ["--delete", f"{spec.remote}:{spec.root}/{rel}/", f"{copy}/"])
                copied = catalog.read_entry(copy)
                if copied is None or not copied.finished:
                    result.skipped.append((rel, "changed on the host while copying; kept hidden, retried next time"))
                    continue
                final.parent.mkdir(parents=True, exist_ok=True)
                os.rename(copy, final)  # atomic: the study appears whole or not at all
                result.collected.append(final)
    except CollectError as exc:
        result.error = str(exc)
    return result


def collect(
    hosts: list[str],
    into: Path,
    rsync: str = "rsync",
    ssh_options: tuple[str, ...] = (),
    remote_root: str = DEFAULT_REMOTE_ROOT,
) -> list[HostResult]:
    into = Path(into)
    specs = [parse_host(h, remote_root) for h in hosts]  # all parsed before anything is copied
    into.mkdir(parents=True, exist_ok=True)
    return [collect_host(spec, into, rsync, ssh_options) for spec in specs]
