"""prune: old studies go, the last good one per plan and host and the newest stay, nothing else is touched."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from orchestrator.cli import main as cli
from orchestrator.store import catalog
from orchestrator.errors import StoreError
from orchestrator.store.prune import prune, remove_study
from tests.nightly_studies import write_night

DAY_S = 86_400.0
NOW = 1_740_000_000.0


def _night(root: Path, day: int, **kwargs) -> Path:
    return write_night(root / f"day{day:02d}", created_wall=NOW - (30 - day) * DAY_S, **kwargs)


def test_keep_n_never_removes_the_last_good_study(tmp_path: Path, capsys) -> None:
    root = tmp_path / "results"
    good = _night(root, 1)
    failed = [_night(root, day, failed=("p1000-r0",)) for day in (2, 3, 4, 5)]
    other_host = _night(root, 6, hostname="lab2")
    assert catalog.read_entry(failed[0]).state == catalog.FINISHED
    assert cli.main(["prune", str(root), "--keep", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"would remove {failed[0]} " in out and f"would remove {failed[1]} " in out
    assert str(good) not in out and str(other_host) not in out
    assert all(p.exists() for p in (good, *failed))  # dry run
    assert cli.main(["prune", str(root), "--keep", "2"]) == 0
    assert good.exists() and other_host.exists() and failed[2].exists() and failed[3].exists()
    assert not failed[0].exists() and not failed[0].parent.exists()  # the emptied dated folder too
    assert not failed[1].exists()


def test_older_than_days_and_both_rules_together(tmp_path: Path) -> None:
    root = tmp_path / "results"
    nights = [_night(root, day) for day in (1, 10, 20, 29)]  # 29, 20, 10 and 1 days old
    decisions = {d.entry.path: d for d in prune(root, older_than_days=15, dry_run=True, now_wall=NOW)}
    assert [decisions[p].remove for p in nights] == [True, True, False, False]
    decisions = {d.entry.path: d for d in prune(root, keep=3, older_than_days=15, dry_run=True, now_wall=NOW)}
    assert [decisions[p].remove for p in nights] == [True, False, False, False]


def test_newest_is_kept_even_when_unfinished_and_old(tmp_path: Path) -> None:
    root = tmp_path / "results"
    good = _night(root, 1)
    running = _night(root, 2, missing=("p1000-r1",))
    decisions = {d.entry.path: d for d in prune(root, older_than_days=1, now_wall=NOW)}
    assert not decisions[good].remove and "last good" in decisions[good].why
    assert not decisions[running].remove and "newest" in decisions[running].why
    assert good.exists() and running.exists()


def test_only_study_folders_are_removed_and_symlinks_are_not_followed(tmp_path: Path) -> None:
    root = tmp_path / "results"
    for day in (1, 2, 3):
        _night(root, day)
    outside = _night(tmp_path / "elsewhere", 0)
    (root / "link-out").symlink_to(outside.parent, target_is_directory=True)
    not_a_study = root / "notes"
    not_a_study.mkdir()
    (not_a_study / "study.json").write_text(json.dumps({"name": "x"}))  # no schema_version
    prune(root, keep=1, now_wall=NOW)
    assert outside.exists() and not_a_study.exists()
    assert [e.path.parent.name for e in catalog.scan(root)] == ["day03"]


def test_remove_study_refuses_a_symlink_and_a_path_outside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "results"
    inside = _night(root, 1)
    outside = _night(tmp_path / "elsewhere", 0)
    link = root / "link"
    link.symlink_to(outside, target_is_directory=True)
    with pytest.raises(StoreError, match="not a study folder inside"):
        remove_study(link, root)
    with pytest.raises(StoreError, match="not a study folder inside"):
        remove_study(outside, root)
    with pytest.raises(StoreError):
        remove_study(root, root)
    assert outside.exists() and inside.exists()


def test_symlink_inside_a_study_is_removed_not_its_target(tmp_path: Path) -> None:
    root = tmp_path / "results"
    old = _night(root, 1, failed=("off-r0",))
    _night(root, 2)
    _night(root, 3)
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    os.symlink(precious, old / "trials" / "link.txt")
    prune(root, keep=1, now_wall=NOW)
    assert not old.exists() and precious.read_text() == "keep me"


def test_prune_needs_a_rule(tmp_path: Path, capsys) -> None:
    (tmp_path / "results").mkdir()
    assert cli.main(["prune", str(tmp_path / "results")]) == 2
    assert "--keep N or --older-than DAYS" in capsys.readouterr().err


@pytest.mark.parametrize("claimed", [4_000_000_000.0, float("nan"), float("inf"), 12.0])
def test_a_study_with_an_unbelievable_date_cannot_push_real_ones_out(tmp_path: Path, claimed: float) -> None:
    root = tmp_path / "results"
    real = [_night(root, day) for day in (1, 2, 3)]
    forged = write_night(root / "forged", created_wall=claimed)  # same plan and host, date in the future or NaN
    decisions = prune(root, keep=1, now_wall=NOW)
    kept = {d.entry.path for d in decisions if not d.remove}
    assert real[2] in kept and real[2].exists()  # the real newest, also the last good one
    assert forged in kept and "not a believable date" in next(d.why for d in decisions if d.entry.path == forged)
    assert not real[0].exists() and not real[1].exists()
    # nor does it become the nightly's baseline
    assert catalog.latest(catalog.scan(root), (catalog.GOOD,)).path == real[2]


def test_two_machines_sharing_a_hostname_never_prune_each_others_studies(tmp_path: Path) -> None:
    """The host is its /etc/machine-id where host.json records one: a cloned or renamed machine
    collected into the same root keeps its own newest and last good study."""
    root = tmp_path / "results"
    first, second = "a" * 32, "b" * 32
    mine = [_night(root, day, machine_id=first) for day in (1, 2, 3)]
    clone = _night(root, 4, machine_id=second, failed=("p1000-r0",))  # newest by date, same hostname
    assert catalog.read_entry(clone).host == catalog.read_entry(mine[0]).host == "lab1"
    decisions = {d.entry.path: d for d in prune(root, keep=1, dry_run=True, now_wall=NOW)}
    assert not decisions[mine[2]].remove and "newest" in decisions[mine[2]].why
    assert not decisions[clone].remove and "newest" in decisions[clone].why
    assert [decisions[p].remove for p in mine[:2]] == [True, True]
    # Filtering by either name of the host finds its studies.
    assert {e.path for e in catalog.scan(root, host=second)} == {clone}
    assert len(catalog.scan(root, host="lab1")) == 4


def test_host_json_records_the_machine_id(tmp_path: Path) -> None:
    from orchestrator.host.hostinfo import machine_id

    (tmp_path / "etc").mkdir()
    assert machine_id(tmp_path) is None
    (tmp_path / "etc" / "machine-id").write_text("3D1219C7C4C5404AAA1F6D2A48ADFDA4\n")
    assert machine_id(tmp_path) == "3d1219c7c4c5404aaa1f6d2a48adfda4"
    (tmp_path / "etc" / "machine-id").write_text("uninitialized\n")  # systemd's first-boot value
    assert machine_id(tmp_path) is None
