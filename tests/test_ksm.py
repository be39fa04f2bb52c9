"""KSM knobs on the real sysfs (marked ksm: never run two of these at once) and fake trees."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.errors import HostError, KsmError, LockError
from orchestrator.host.ksm import (
    HostSettings,
    host_lock,
    read_ksm_knobs,
    read_sysfs_value,
    refuse_if_ksmtuned,
    restore_from_record,
)
from orchestrator.host.probes import KSM_SYSFS
from tests.hoststate import OLD_KERNEL_KSM, fake_ksm_tree

ksm = pytest.mark.ksm


OLD_KERNEL = OLD_KERNEL_KSM


def test_reads_an_old_kernel_without_newer_files(tmp_path):
    fake_ksm_tree(tmp_path, OLD_KERNEL)
    knobs = read_ksm_knobs(tmp_path)
    assert knobs["pages_to_scan"] == "100"
    assert "general_profit" not in knobs and "advisor_mode" not in knobs


def test_missing_ksm_is_a_clear_host_error(tmp_path):
    with pytest.raises(HostError, match="CONFIG_KSM"):
        read_ksm_knobs(tmp_path)


def test_choice_files_read_the_selected_value(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert read_sysfs_value(path) == "madvise"


def test_record_is_written_before_the_write_and_restore_is_reverse(tmp_path):
    fake_ksm_tree(tmp_path, OLD_KERNEL)
    record = tmp_path / "record.json"
    settings = HostSettings(record, tmp_path)
    settings.write(KSM_SYSFS / "run", 2)
    settings.apply({"pages_to_scan": 1000, "merge_across_nodes": 0}, {})
    settings.start()
    entries = json.loads(record.read_text())
    assert [e["path"].rsplit("/", 1)[1] for e in entries] == ["run", "merge_across_nodes", "pages_to_scan"]
    assert entries[0]["old"] == "0" and entries[2]["old"] == "100"
    # A second trial changes pages_to_scan again: the record keeps the host's original.
    settings.reset(timeout_s=1)
    settings.apply({"pages_to_scan": 3000}, {})
    assert json.loads(record.read_text())[2]["old"] == "100"
    # merge_across_nodes goes back to the host's value because this trial did not name it.
    assert read_sysfs_value(tmp_path / KSM_SYSFS / "merge_across_nodes") == "1"
    restore_from_record(record, tmp_path)
    assert read_ksm_knobs(tmp_path) == {k: v for k, v in OLD_KERNEL.items()}


def test_apply_refuses_a_knob_the_kernel_lacks(tmp_path):
    fake_ksm_tree(tmp_path, OLD_KERNEL)
    settings = HostSettings(tmp_path / "r.json", tmp_path)
    settings.reset(timeout_s=1)
    with pytest.raises(KsmError, match="smart_scan"):
        settings.apply({"smart_scan": 1}, {})


def test_restore_without_record_is_a_clear_error(tmp_path):
    with pytest.raises(HostError, match="no settings record"):
        restore_from_record(tmp_path / "nope.json")


def test_ksmtuned_is_refused(tmp_path):
    (tmp_path / "proc/4242").mkdir(parents=True)
    (tmp_path / "proc/4242/comm").write_text("ksmtuned\n")
    # the name is read from /proc/PID/stat (probes' one parser), as the kernel writes it
    (tmp_path / "proc/4242/stat").write_text(
        "4242 (ksmtuned) S 1 4242 4242 0 -1 4194560 5 0 0 0 1 1 0 0 20 0 1 0 9 0 0\n"
    )
    with pytest.raises(HostError, match="ksmtuned is running \\(pid 4242\\)"):
        refuse_if_ksmtuned(tmp_path)
    refuse_if_ksmtuned(Path("/"))  # this host runs no ksmtuned


def test_second_sweep_is_refused_by_the_host_lock(tmp_path):
    lock = tmp_path / "sweep.lock"
    with host_lock(lock):
        code = (
            "import sys; from pathlib import Path; from orchestrator.host.ksm import host_lock\n"
            "from orchestrator.errors import LockError\n"
            f"try:\n    with host_lock(Path({str(lock)!r})): sys.exit(0)\n"
            "except LockError as e:\n    print(e); sys.exit(3)\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert out.returncode == 3 and f"pid {os.getpid()}" in out.stdout
    with host_lock(lock):
        pass  # released


def _record(path: Path, entries: list[dict[str, str]]) -> Path:
    path.write_text(json.dumps(entries))
    return path


def test_restore_refuses_record_entries_outside_ksm_and_thp(tmp_path):
    ksm_dir = fake_ksm_tree(tmp_path / "root", {**OLD_KERNEL, "pages_to_scan": "5000"})
    root = tmp_path / "root"
    thp = root / "sys/kernel/mm/transparent_hugepage"
    thp.mkdir(parents=True)
    (thp / "enabled").write_text("always [madvise] never\n")
    victim = tmp_path / "x"
    victim.write_text("untouched\n")
    passwd_before = Path("/etc/passwd").read_bytes()
    (ksm_dir / "link").symlink_to(victim)  # a symlink inside ksm/ pointing out of it
    escapes = [
        {"path": "/etc/passwd", "old": "root::0:0::/:/bin/sh", "new": "x"},
        {"path": "sys/kernel/mm/ksm/../../../../x", "old": "pwned", "new": "x"},
        {"path": "sys/kernel/mm/ksm/link", "old": "pwned", "new": "x"},
        {"path": "sys/kernel/mm/ksm", "old": "pwned", "new": "x"},
        # inside the trees, but not a knob ksm-lab sets (a counter, a file of khugepaged)
        {"path": "sys/kernel/mm/ksm/pages_shared", "old": "7", "new": "x"},
        {"path": "sys/kernel/mm/transparent_hugepage/khugepaged/defrag", "old": "0", "new": "x"},
    ]
    record = _record(
        tmp_path / "record.json",
        [
            {"path": "sys/kernel/mm/ksm/pages_to_scan", "old": "100", "new": "5000"},
            {"path": "sys/kernel/mm/transparent_hugepage/enabled", "old": "never", "new": "madvise"},
            *escapes,
        ],
    )
    with pytest.raises(KsmError, match="restore incomplete") as err:
        restore_from_record(record, root)
    message = str(err.value)
    for entry in escapes:
        assert f"refused {entry['path']!r}" in message
    assert "outside /sys/kernel/mm/ksm/ or /sys/kernel/mm/transparent_hugepage/" in message
    assert "not a KSM or THP knob ksm-lab sets" in message
    assert not (thp / "khugepaged").exists()
    assert Path("/etc/passwd").read_bytes() == passwd_before
    assert victim.read_text() == "untouched\n" and (ksm_dir / "link").is_symlink()
    # The entries inside KSM/THP were restored all the same.
    assert read_sysfs_value(ksm_dir / "pages_to_scan") == "100"
    assert read_sysfs_value(thp / "enabled") == "never"
    assert "restored: " in message and "pages_to_scan=100" in message


def test_resume_keeps_refused_entries_unwritten_and_in_the_record(tmp_path):
    fake_ksm_tree(tmp_path / "root", OLD_KERNEL)
    victim = tmp_path / "x"
    record = _record(
        tmp_path / "record.json", [{"path": "sys/kernel/mm/ksm/../../../../x", "old": "pwned", "new": "1"}]
    )
    settings = HostSettings(record, tmp_path / "root")  # what `sweep --resume` does
    assert settings.entries == [] and len(settings.refused) == 1
    settings.write(KSM_SYSFS / "pages_to_scan", 300)
    assert [e["path"] for e in json.loads(record.read_text())] == [
        "sys/kernel/mm/ksm/pages_to_scan",
        "sys/kernel/mm/ksm/../../../../x",
    ]
    with pytest.raises(KsmError, match="refused 'sys/kernel/mm/ksm/../../../../x'"):
        settings.restore()
    assert not victim.exists()
    assert read_sysfs_value(tmp_path / "root" / KSM_SYSFS / "pages_to_scan") == "100"


def test_writes_never_leave_ksm_and_thp(tmp_path):
    fake_ksm_tree(tmp_path, OLD_KERNEL)
    settings = HostSettings(tmp_path / "record.json", tmp_path)
    with pytest.raises(KsmError, match="refusing to write .*outside"):
        settings.write("sys/kernel/mm/ksm/../../../../record.json", "x")
    # Nor does a write create a file the kernel does not have, or write one that is no knob.
    with pytest.raises(KsmError, match="not a KSM or THP knob"):
        settings._raw_write(tmp_path / KSM_SYSFS / "no_such_knob", "1")
    (tmp_path / KSM_SYSFS / "smart_scan").unlink(missing_ok=True)
    with pytest.raises(KsmError, match="No such file"):
        settings._raw_write(tmp_path / KSM_SYSFS / "smart_scan", "1")
    assert not (tmp_path / KSM_SYSFS / "no_such_knob").exists()


@pytest.mark.parametrize("content", ['{"path": "x"}', '[{"path": 1, "old": "0", "new": "1"}]', "not json"])
def test_malformed_record_is_a_clear_error(tmp_path, content):
    record = tmp_path / "record.json"
    record.write_text(content)
    with pytest.raises(HostError, match="settings record .*record.json"):
        restore_from_record(record, tmp_path)


def test_host_lock_does_not_follow_a_planted_symlink(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    lock_dir = tmp_path / "run"
    lock_dir.mkdir()
    (lock_dir / "sweep.lock").symlink_to(victim)
    with pytest.raises(LockError, match="sweep.lock is a symlink"):
        with host_lock(lock_dir=lock_dir):
            pass
    assert victim.read_text() == "precious\n"
    # A dangling one would otherwise create its target.
    (lock_dir / "sweep.lock").unlink()
    (lock_dir / "sweep.lock").symlink_to(tmp_path / "created")
    with pytest.raises(LockError, match="symlink"):
        with host_lock(lock_dir=lock_dir):
            pass
    assert not (tmp_path / "created").exists()


def test_host_lock_refuses_non_regular_files_and_hard_links(tmp_path):
    fifo_dir, dir_dir, link_dir = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for folder in (fifo_dir, dir_dir, link_dir):
        folder.mkdir()
    os.mkfifo(fifo_dir / "sweep.lock")
    (dir_dir / "sweep.lock").mkdir()
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    os.link(victim, link_dir / "sweep.lock")
    with pytest.raises(LockError, match="not a regular file"):
        with host_lock(lock_dir=fifo_dir):
            pass
    with pytest.raises(LockError, match="cannot open the sweep lock"):
        with host_lock(lock_dir=dir_dir):
            pass
    with pytest.raises(LockError, match="2 hard links"):
        with host_lock(lock_dir=link_dir):
            pass
    assert victim.read_text() == "precious\n"
    with host_lock(lock_dir=tmp_path / "fresh"):
        assert (tmp_path / "fresh" / "sweep.lock").read_text() == f"{os.getpid()}\n"


@ksm
def test_real_knobs_apply_and_restore(tmp_path, ksm_guard):
    settings = HostSettings(tmp_path / "record.json", Path("/"))
    settings.reset(timeout_s=30)
    settings.apply({"pages_to_scan": 1234, "sleep_millisecs": 7, "use_zero_pages": 1}, {"thp_enabled": "never"})
    settings.start()
    knobs = read_ksm_knobs()
    assert (knobs["run"], knobs["pages_to_scan"], knobs["sleep_millisecs"], knobs["use_zero_pages"]) == (
        "1",
        "1234",
        "7",
        "1",
    )
    assert read_sysfs_value(Path("/sys/kernel/mm/transparent_hugepage/enabled")) == "never"
    settings.restore()


@ksm
def test_real_advisor_mode_and_pages_to_scan(tmp_path, ksm_guard):
    if "advisor_mode" not in read_ksm_knobs():
        pytest.skip("kernel without the KSM advisor")
    settings = HostSettings(tmp_path / "record.json", Path("/"))
    settings.reset(timeout_s=30)
    settings.apply({"advisor_mode": "scan-time"}, {})
    settings.reset(timeout_s=30)
    # pages_to_scan is refused by the kernel while the advisor drives it: apply sets it aside.
    settings.apply({"pages_to_scan": 2222}, {})
    assert read_ksm_knobs()["advisor_mode"] == "none"
    settings.restore()
