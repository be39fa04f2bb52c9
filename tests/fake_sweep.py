"""A stand-in for `ksm-lab sweep PLAN --results DIR [--resume]` (KSM_LAB_NIGHTLY_SWEEP in the
nightly job's tests): writes a hand-made study DIR/<plan's study name> on this host, with no KSM.

FAKE_SWEEP_SAVED_MIB: the saving at pages_to_scan=1000 (default 40; three repetitions, so the
nightly compare has intervals). FAKE_SWEEP_INTERRUPT=1: leave the study unfinished and exit 143 (SIGTERM, as the real sweep).
Like the real sweep it refuses an existing folder without --resume and a missing one with it
(exit 2). Every call is appended to FAKE_SWEEP_LOG as a JSON list.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.nightly_studies import write_night  # noqa: E402


def main(argv: list[str]) -> int:
    with open(os.environ["FAKE_SWEEP_LOG"], "a") as log:
        log.write(json.dumps(argv) + "\n")
    plan_path, results = Path(argv[0]), Path(argv[argv.index("--results") + 1])
    resume = "--resume" in argv
    plan_text = plan_path.read_text()
    name = tomllib.loads(plan_text)["study"]["name"]
    study = results / name
    if study.exists() and not resume:
        print(f"study folder {study} already exists; pass --resume", file=sys.stderr)
        return 2
    if resume and not study.exists():
        print(f"--resume given but {study} does not exist", file=sys.stderr)
        return 2
    created = time.time()
    if resume:  # the real sweep keeps the folder and its created_wall, and runs what is missing
        created = json.loads((study / "study.json").read_text())["created_wall"]
        shutil.rmtree(study)
    saved = float(os.environ.get("FAKE_SWEEP_SAVED_MIB", "40"))
    interrupt = os.environ.get("FAKE_SWEEP_INTERRUPT") == "1"
    write_night(
        results,
        name=name,
        plan=plan_text,
        hostname=os.uname().nodename,
        created_wall=created,
        saved_mib={100: [3.0, 3.1, 2.9], 1000: [saved, saved + 0.5, saved - 0.5]},
        missing=("p1000-r2",) if interrupt else (),
    )
    return 128 + 15 if interrupt else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
