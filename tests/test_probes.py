"""probes.py: real /proc and /sys on this host first, captured text, then fake trees."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from orchestrator.host import probes
from orchestrator.errors import HostError

DATA = Path(__file__).parent / "data"
KSM_DIR = Path("/sys/kernel/mm/ksm")

# --- real host ------------------------------------------------------------------


def test_read_ksm_real_host_has_core_counters_and_splits_text_files():
    values = probes.read_ksm()
    for name in (
        "pages_shared",
        "pages_sharing",
        "pages_unshared",
        "pages_volatile",
        "full_scans",
        "run",
        "pages_to_scan",
        "sleep_millisecs",
    ):
        assert isinstance(values[name], int), name
    files = probes.read_ksm_files()
    assert set(files) == set(os.listdir(KSM_DIR))
    # The integer files are read_ksm's; text files (advisor_mode) stay out of it.
    assert set(values) <= set(files) and "advisor_mode" not in values
    assert values["run"] == int((KSM_DIR / "run").read_text())


def test_find_ksmd_pid_real_host_is_the_ksmd_kernel_thread():
    pid = probes.find_ksmd_pid()
    assert pid is not None
    assert Path(f"/proc/{pid}/comm").read_text() == "ksmd\n"
    stat = probes.read_proc_stat(pid)
    assert stat.is_kernel_thread
    assert stat.ppid == 2  # kthreadd is the parent of every kernel thread


def test_read_cpu_seconds_real_grows_with_work():
    before = probes.read_cpu_seconds(os.getpid())
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:
        pass
    after = probes.read_cpu_seconds(os.getpid())
    assert after - before >= 0.2


def test_read_cpu_seconds_real_ksmd_is_a_number():
    assert probes.read_cpu_seconds(probes.find_ksmd_pid()) >= 0.0


def read_statm(pid: int, root: Path = Path("/")) -> dict[str, int] | None:
    """statm as the sampler reads it (ProcessCounters), once."""
    with probes.ProcessCounters(pid, root) as files:
        return files.statm()


def test_read_meminfo_and_vmstat_real():
    meminfo = probes.read_meminfo()
    assert 0 < meminfo["MemAvailable"] <= meminfo["MemTotal"]
    assert "AnonPages" in meminfo
    vmstat = probes.parse_vmstat(Path("/proc/vmstat").read_text())
    assert vmstat["pgfault"] > 0


def test_read_statm_real_rss_follows_touched_memory(holder):
    small = holder(mib=8)
    big = holder(mib=72)
    rss_small = read_statm(small.pid)["rss_kib"]
    rss_big = read_statm(big.pid)["rss_kib"]
    assert rss_big - rss_small >= 60 * 1024


def test_read_smaps_rollup_real_counts_private_anon(holder):
    proc = holder(mib=64)
    rollup = probes.read_smaps_rollup(proc.pid)
    assert rollup["pss_kib"] >= 64 * 1024
    assert rollup["uss_kib"] >= 64 * 1024
    assert rollup["rss_kib"] >= rollup["pss_kib"] >= rollup["uss_kib"]
    assert rollup["swap_kib"] >= 0


def test_read_ksm_stat_real_reports_mergeable_flag(holder):
    if not Path(f"/proc/{os.getpid()}/ksm_stat").exists():
        pytest.skip("kernel has no /proc/PID/ksm_stat")
    plain = probes.read_ksm_stat(holder(mib=4, mergeable=False).pid)
    merge = probes.read_ksm_stat(holder(mib=4, mergeable=True).pid)
    assert plain["ksm_mergeable"] is False
    assert merge["ksm_mergeable"] is True
    assert merge["ksm_merging_pages"] >= 0


def test_readers_return_none_for_zombie_then_reaped_process(holder):
    proc = holder(mib=4)
    proc.kill()
    deadline = time.monotonic() + 5
    while probes.read_proc_stat(proc.pid).state != "Z" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert probes.read_proc_stat(proc.pid).state == "Z"
    # Zombie: /proc/PID still exists but has no address space.
    assert read_statm(proc.pid) is None
    assert probes.read_smaps_rollup(proc.pid) is None
    assert probes.read_ksm_stat(proc.pid) is None
    proc.wait()
    assert read_statm(proc.pid) is None
    assert probes.read_smaps_rollup(proc.pid) is None
    assert probes.read_ksm_stat(proc.pid) is None
    assert probes.read_cpu_seconds(proc.pid) is None
    assert probes.read_proc_stat(proc.pid) is None


def test_process_counters_reread_open_files_then_see_zombie_and_reaped_process(holder):
    """statm and ksm_stat read through descriptors kept open give what the path readers give;
    a zombie reads as None (no address space), a reaped process as gone, and the descriptors
    never read a later process."""
    proc = holder(mib=16, mergeable=True)
    with probes.ProcessCounters(proc.pid) as files:
        assert files.has("statm") and files.has("ksm_stat") and not files.gone
        first = files.statm()
        assert first is not None and first["rss_kib"] >= 16 * 1024
        assert abs(first["rss_kib"] - read_statm(proc.pid)["rss_kib"]) <= 1024
        assert files.ksm_stat()["ksm_mergeable"] is True
        assert files.statm() is not None  # read again through the same descriptor
        proc.kill()
        deadline = time.monotonic() + 5
        while probes.read_proc_stat(proc.pid).state != "Z" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert files.statm() is None and files.ksm_stat() is None and not files.gone  # zombie
        proc.wait()
        assert files.statm() is None and files.ksm_stat() is None and files.gone  # reaped
    assert not files.has("statm")  # closed


def test_process_counters_of_a_pid_that_does_not_exist_are_gone(tmp_path):
    (tmp_path / "proc").mkdir()
    with probes.ProcessCounters(99, tmp_path) as files:
        assert files.gone and files.statm() is None and files.ksm_stat() is None


def test_process_counters_fall_back_like_read_ksm_stat_on_older_kernels(tmp_path):
    for pid in (10, 11):
        (tmp_path / "proc" / str(pid)).mkdir(parents=True)
        (tmp_path / "proc" / str(pid) / "statm").write_text("1000 500 100 1 0 400 0\n")
    (tmp_path / "proc" / "10" / "ksm_merging_pages").write_text("77\n")
    for pid in (10, 11):
        with probes.ProcessCounters(pid, tmp_path) as files:
            assert files.ksm_stat() == probes.read_ksm_stat(pid, tmp_path)
            assert files.statm() == probes.statm_of((tmp_path / "proc" / str(pid) / "statm").read_text())
    assert probes.ProcessCounters(10, tmp_path).ksm_stat() == {"ksm_merging_pages": 77}
    assert probes.ProcessCounters(11, tmp_path).ksm_stat() == {}


def test_counter_files_read_a_file_longer_than_their_buffer_whole(tmp_path):
    """/proc/stat runs to tens of KiB on a big host (its intr line): one read, the whole text."""
    big = tmp_path / "stat"
    text = (
        "cpu  1 2 3 4 5 6 7 8 0 0\n"
        + "".join(f"cpu{i} 1 2 3 4 5 6 7 8 0 0\n" for i in range(256))
        + "intr "
        + " ".join(["12345"] * 5000)
        + "\n"
    )
    big.write_text(text)
    with probes.CounterFiles({"stat": big}) as files:
        assert files.read() == {"stat": text}
        assert files.read(["stat", "absent"]) == {"stat": text}
    assert probes.parse_host_cpu(text).cpus == 256


def test_host_counter_files_parse_on_this_host():
    with probes.CounterFiles(probes.host_counter_paths()) as files:
        texts = files.read()
    assert set(texts) == {"meminfo", "vmstat", "stat", "uptime", "loadavg"}
    assert probes.parse_meminfo(texts["meminfo"], ("MemAvailable",))["MemAvailable"] > 0
    assert probes.parse_host_cpu(texts["stat"]).cpus == os.cpu_count()
    assert 0 < probes.parse_uptime_s(texts["uptime"]) <= probes.parse_uptime_s(Path("/proc/uptime").read_text())
    before = probes.parse_last_pid(texts["loadavg"])
    subprocess.run(["true"], check=True)  # a new process moves the host's last pid
    with probes.CounterFiles(probes.host_counter_paths()) as files:
        assert probes.parse_last_pid(files.read(["loadavg"])["loadavg"]) != before


# --- captured text ------------------------------------------------------------------


def test_parse_smaps_rollup_captured():
    rollup = probes.parse_smaps_rollup((DATA / "smaps_rollup.txt").read_text())
    assert rollup == {
        "rss_kib": 76284,
        "pss_kib": 74946,
        "uss_kib": 4492 + 70156,
        "swap_kib": 0,
        "anon_huge_pages_kib": 0,
        "ksm_kib": 0,
    }


def test_parse_smaps_rollup_without_optional_lines():
    text = "Rss:  100 kB\nPss:  50 kB\nPrivate_Clean: 10 kB\nPrivate_Dirty: 20 kB\n"
    assert probes.parse_smaps_rollup(text) == {"rss_kib": 100, "pss_kib": 50, "uss_kib": 30}


def test_parse_ksm_stat_captured():
    assert probes.parse_ksm_stat((DATA / "ksm_stat.txt").read_text()) == {
        "ksm_rmap_items": 0,
        "ksm_zero_pages": 0,
        "ksm_merging_pages": 0,
        "ksm_process_profit": 0,
        "ksm_merge_any": False,
        "ksm_mergeable": True,
    }


def test_parse_ksm_stat_older_kernel_and_negative_profit():
    # 6.1-era ksm_stat: two lines only; profit can be negative (rmap items cost).
    text = "ksm_rmap_items 812\nksm_process_profit -51968\n"
    assert probes.parse_ksm_stat(text) == {"ksm_rmap_items": 812, "ksm_process_profit": -51968}


def test_parse_meminfo_captured():
    meminfo = probes.parse_meminfo((DATA / "meminfo.txt").read_text())
    assert meminfo["MemTotal"] == 24731708
    assert meminfo["MemAvailable"] == 24306952
    assert meminfo["MemFree"] == 23066300
    assert meminfo["AnonPages"] == 14184
    assert meminfo["AnonHugePages"] == 0
    assert meminfo["HugePages_Total"] == 0  # a count without "kB"


def test_parse_vmstat_captured_has_ksm_and_thp_counters():
    vmstat = probes.parse_vmstat((DATA / "vmstat.txt").read_text())
    assert len(vmstat) == 192
    assert vmstat["nr_free_pages"] == 819170
    for name in probes.VMSTAT_OF_INTEREST:
        assert vmstat[name] == 0, name


@pytest.mark.parametrize("name", ["meminfo.txt", "vmstat.txt"])
def test_parse_only_the_fields_asked_for_gives_what_the_full_parse_gives(name):
    """A sampler asks for a few fields; found by search, they must be exactly the full parse's
    (a name that is the prefix of another, thp_split_page / thp_split_page_failed, included)."""
    text = (DATA / name).read_text()
    parse = probes.parse_meminfo if name == "meminfo.txt" else probes.parse_vmstat
    full = parse(text)
    wanted = (*list(full)[:3], *list(full)[-2:], "thp_split_page", "Hugepagesize", "MemFree", "no_such_field")
    assert parse(text, wanted) == {key: full[key] for key in wanted if key in full}
    assert parse(text, ()) == {}
    if name == "meminfo.txt":  # the one parser still refuses a line it cannot read
        with pytest.raises(ValueError, match="unexpected /proc/meminfo line"):
            parse("MemFree: 12 MB\n", ("MemFree",))


def test_parse_proc_stat_captured_ksmd():
    stat = probes.parse_proc_stat((DATA / "ksmd_stat.txt").read_text())
    assert (stat.pid, stat.comm, stat.state, stat.ppid) == (37, "ksmd", "S", 2)
    assert stat.is_kernel_thread


def test_parse_proc_stat_cpu_captured_user_process():
    text = (DATA / "proc_pid_stat.txt").read_text()
    stat = probes.parse_proc_stat(text)
    assert (stat.utime_ticks, stat.stime_ticks) == (3, 2)
    assert stat.comm == "python"
    assert not stat.is_kernel_thread


def test_parse_proc_stat_comm_with_parenthesis_and_spaces():
    text = "4242 (evil) R (x) ) S 1 4242 4242 0 -1 4194560 5 0 0 0 170 31 0 0 20 0 1 0 9 0 0\n"
    stat = probes.parse_proc_stat(text)
    assert stat.comm == "evil) R (x) "
    assert stat.state == "S"
    assert (stat.utime_ticks, stat.stime_ticks) == (170, 31)


def _proc_stat_line(pid: int, comm: str, state: str, ppid: int) -> str:
    return f"{pid} ({comm}) {state} {ppid} {pid} {pid} 0 -1 4194560 5 0 0 0 1 1 0 0 20 0 1 0 9 0 0\n"


def _crafted_proc(tmp_path: Path, *tasks: tuple[int, str, str, int]) -> Path:
    for pid, comm, state, ppid in tasks:
        folder = tmp_path / "proc" / str(pid)
        folder.mkdir(parents=True)
        (folder / "stat").write_text(_proc_stat_line(pid, comm, state, ppid))
    return tmp_path


def test_live_comm_children_and_names_under_a_crafted_root(tmp_path: Path):
    """Zombies keep their comm but are never a live holder of a name; the tree under root is
    the one read (not the host's /proc)."""
    root = _crafted_proc(
        tmp_path,
        (10, "ksmtuned", "S", 1),
        (11, "sleep", "S", 10),
        (12, "ksmtuned", "Z", 1),
        (13, "sleep", "Z", 10),
        (14, "bash", "S", 11),
    )
    assert probes.live_comm(10, root) == "ksmtuned"
    assert probes.live_comm(12, root) is None  # zombie
    assert probes.live_comm(99, root) is None  # gone
    assert probes.children_of(10, root) == [11, 13]
    assert probes.live_pids_named("ksmtuned", root) == [10]
    assert probes.live_pids_named("sleep", root) == [11]
    (root / "proc" / "15").mkdir()
    (root / "proc" / "15" / "stat").write_text("garbage")
    assert probes.live_comm(15, root) is None


def test_live_comm_and_children_of_a_real_child():
    import subprocess

    child = subprocess.Popen(["sleep", "30"])
    try:
        assert probes.live_comm(child.pid) == "sleep"
        assert child.pid in probes.children_of(os.getpid())
        assert child.pid in probes.live_pids_named("sleep")
    finally:
        child.kill()
        child.wait(timeout=10)
    assert probes.live_comm(child.pid) is None


def test_parse_statm():
    assert probes.parse_statm((DATA / "statm.txt").read_text(), page_kib=4) == {
        "size_kib": 19893 * 4,
        "rss_kib": 19071 * 4,
        "shared_kib": 1532 * 4,
    }


def test_parse_ksm_dir_captured_sysfs():
    texts = {path.name: path.read_text() for path in (DATA / "ksm_sysfs").iterdir()}
    values = probes.parse_ksm_dir(texts)
    assert "advisor_mode" not in values
    assert values["sleep_millisecs"] == 20
    assert values["pages_to_scan"] == 100
    assert len(values) == len(texts) - 1


# --- fake trees -----------------------------------------------------------------------


def _ksm_tree(root: Path, drop: tuple[str, ...] = (), **overrides: str) -> Path:
    ksm_dir = root / probes.KSM_SYSFS
    shutil.copytree(DATA / "ksm_sysfs", ksm_dir)
    for name in drop:
        (ksm_dir / name).unlink()
    for name, text in overrides.items():
        (ksm_dir / name).write_text(text)
    return ksm_dir


def test_read_ksm_older_kernel_without_newer_files(tmp_path):
    newer = (
        "general_profit",
        "ksm_zero_pages",
        "smart_scan",
        "advisor_mode",
        "advisor_max_cpu",
        "advisor_max_pages_to_scan",
        "advisor_min_pages_to_scan",
        "advisor_target_scan_time",
    )
    _ksm_tree(tmp_path, drop=newer, pages_sharing="1234\n")
    values = probes.read_ksm(tmp_path)
    assert not set(newer) & set(values)
    assert values["pages_sharing"] == 1234
    assert not set(newer) & set(probes.read_ksm_files(tmp_path))


def test_read_ksm_negative_general_profit_and_text_values(tmp_path):
    _ksm_tree(tmp_path, general_profit="-409600\n")
    assert probes.read_ksm(tmp_path)["general_profit"] == -409600
    assert "advisor_mode" not in probes.read_ksm(tmp_path)
    assert probes.read_ksm_files(tmp_path)["advisor_mode"].strip() == "[none] scan-time"


def test_read_ksm_without_ksm_dir_raises_host_error(tmp_path):
    with pytest.raises(HostError, match="no KSM"):
        probes.read_ksm(tmp_path)


def _fake_stat(root: Path, pid: int, comm: str, flags: int, ppid: int = 2) -> None:
    proc_dir = root / "proc" / str(pid)
    proc_dir.mkdir(parents=True)
    (proc_dir / "stat").write_text(f"{pid} ({comm}) S {ppid} 0 0 0 -1 {flags} 0 0 0 0 700 300 0 0 20 0 1 0 9 0 0\n")


def test_find_ksmd_pid_fake_tree_ignores_impostors(tmp_path):
    _fake_stat(tmp_path, 5, "ksmd", flags=0x400000, ppid=1)  # user process named ksmd
    _fake_stat(tmp_path, 6, "ksmd) S", flags=probes.PF_KTHREAD)
    _fake_stat(tmp_path, 7, "kswapd0", flags=probes.PF_KTHREAD)
    (tmp_path / "proc" / "self").mkdir()
    assert probes.find_ksmd_pid(tmp_path) is None
    _fake_stat(tmp_path, 1234, "ksmd", flags=probes.PF_KTHREAD | 0x40)
    assert probes.find_ksmd_pid(tmp_path) == 1234
    assert probes.read_cpu_seconds(1234, tmp_path) == 1000 / probes.CLOCK_TICKS_PER_S


def test_find_ksmd_pid_without_proc(tmp_path):
    assert probes.find_ksmd_pid(tmp_path) is None


def test_read_ksm_stat_fallbacks_on_older_kernels(tmp_path):
    with_merging = tmp_path / "proc" / "10"
    with_merging.mkdir(parents=True)
    (with_merging / "ksm_merging_pages").write_text("77\n")
    (tmp_path / "proc" / "11").mkdir()
    assert probes.read_ksm_stat(10, tmp_path) == {"ksm_merging_pages": 77}
    assert probes.read_ksm_stat(11, tmp_path) == {}
    assert probes.read_ksm_stat(12, tmp_path) is None


def test_process_readers_missing_pid_return_none(tmp_path):
    (tmp_path / "proc").mkdir()
    assert read_statm(99, tmp_path) is None
    assert probes.read_smaps_rollup(99, tmp_path) is None
    assert probes.read_cpu_seconds(99, tmp_path) is None


def test_parse_proc_stat_start_ticks_names_the_process():
    text = "4242 (evil) R (x) ) S 1 4242 4242 0 -1 4194560 5 0 0 0 170 31 0 0 20 0 1 0 9 0 0\n"
    assert probes.parse_proc_stat(text).start_ticks == 9
    me = probes.read_proc_stat(os.getpid())
    assert me is not None and 0 < me.start_ticks == probes.read_proc_stat(os.getpid()).start_ticks


@pytest.mark.parametrize("line", ["MemTotal:       lots kB", "MemTotal:       1024 MB", "MemFree: 1 kB extra"])
def test_parse_meminfo_refuses_a_line_it_cannot_read(line):
    with pytest.raises(ValueError, match="unexpected /proc/meminfo line"):
        probes.parse_meminfo(f"MemAvailable: 5 kB\n{line}\n")


def test_counter_files_reread_in_place_and_skip_what_is_missing(tmp_path: Path) -> None:
    counter = tmp_path / "pages_sharing"
    counter.write_text("10\n")
    with probes.CounterFiles({"pages_sharing": counter, "gone": tmp_path / "absent"}) as files:
        assert probes.parse_ksm_dir(files.read()) == {"pages_sharing": 10}
        counter.write_text("12345\n")  # sysfs rewrites its value in place; pread sees the new one
        assert probes.parse_ksm_dir(files.read()) == {"pages_sharing": 12345}
    assert files.read() == {}  # closed


def test_counter_files_follow_the_real_ksm_counters() -> None:
    with probes.CounterFiles(probes.ksm_counter_paths()) as files:
        assert probes.parse_ksm_dir(files.read()).keys() == probes.read_ksm(names=probes.KSM_COUNTERS).keys()
