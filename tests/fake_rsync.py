"""A stand-in for `rsync -rt -e SSH [--delete] [--prune-empty-dirs] [--include/--exclude]... SRC DST`
with SRC = host:path: copies from $FAKE_RSYNC_HOSTS/<host>/<path> instead of over SSH.

Enough of rsync for collect's two calls: include patterns match file names (the "*/" directory
rule is implied), mtimes are kept (-t), symlinks are skipped (no -l), --delete removes what the
source lacks. Every call is appended to $FAKE_RSYNC_LOG as a JSON list. $FAKE_RSYNC_FAIL_ON: a
source containing that text copies half its files, then exits 23 (rsync's "partial transfer").
An unknown host exits 255, as ssh does.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    with open(os.environ["FAKE_RSYNC_LOG"], "a") as log:
        log.write(json.dumps(argv) + "\n")
    includes, delete, paths, i = [], False, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "-e":
            i += 1
        elif arg.startswith("--include="):
            includes.append(arg.split("=", 1)[1])
        elif arg == "--delete":
            delete = True
        elif not arg.startswith("-"):
            paths.append(arg)
        i += 1
    src, dst = paths
    remote, _, path = src.partition(":")
    host = remote.rpartition("@")[2]
    source = Path(os.environ["FAKE_RSYNC_HOSTS"]) / host / path.lstrip("/")
    if not (Path(os.environ["FAKE_RSYNC_HOSTS"]) / host).is_dir():
        print(f"ssh: Could not resolve hostname {host}: Name or service not known", file=sys.stderr)
        return 255
    patterns = [p for p in includes if p != "*/"]
    files = []
    for dirpath, dirnames, filenames in os.walk(source):
        dirnames.sort()
        for name in sorted(filenames):
            full = Path(dirpath) / name
            if full.is_symlink() or (patterns and not any(fnmatch.fnmatch(name, p) for p in patterns)):
                continue
            files.append(full.relative_to(source))
    fail = os.environ.get("FAKE_RSYNC_FAIL_ON")
    limit = len(files) // 2 if fail and fail in src else len(files)
    target = Path(dst)
    for rel in files[:limit]:
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / rel, target / rel)
    if limit < len(files):
        print("rsync error: some files/attrs were not transferred (code 23)", file=sys.stderr)
        return 23
    if delete:
        wanted = set(files)
        for dirpath, _, filenames in os.walk(target):
            for name in filenames:
                rel = (Path(dirpath) / name).relative_to(target)
                if rel not in wanted:
                    (target / rel).unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
