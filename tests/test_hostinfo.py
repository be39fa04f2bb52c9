"""host.json's environment snapshot (sysctl vm.*, THP, CPU topology and vulnerabilities, cpufreq,
kernel config, KSM before/after) on crafted root trees, the KSM counters' sanity judgement on
crafted values, how compare lists the differences, and the report's warning."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

from orchestrator.analysis.across.compare import host_differences
from orchestrator.host import hostinfo
from orchestrator.host.probes import KSM_SYSFS
from orchestrator.report.study import host_findings

RELEASE = os.uname().release


def write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def crafted_root(
    tmp_path: Path,
    governor: str = "performance",
    spectre: str = "Mitigation: Retpolines",
    full_scans: int = 3,
    config: str = "gz",
) -> Path:
    root = tmp_path / "root"
    write(root, "proc/meminfo", "MemTotal: 1000 kB\nMemAvailable: 500 kB\n")
    for name, value in {
        "run": "0",
        "pages_to_scan": "100",
        "sleep_millisecs": "20",
        "full_scans": str(full_scans),
        "pages_scanned": str(1000 * full_scans),
        "ksm_zero_pages": "0",
    }.items():
        write(root, f"{KSM_SYSFS}/{name}", value + "\n")
    write(root, "proc/sys/vm/swappiness", "60\n")
    write(root, "proc/sys/vm/lowmem_reserve_ratio", "256\t256\t32\t0\n")
    thp = "sys/kernel/mm/transparent_hugepage"
    write(root, f"{thp}/enabled", "always [madvise] never\n")
    write(root, f"{thp}/khugepaged/pages_to_scan", "4096\n")
    write(root, f"{thp}/khugepaged/full_scans", "17\n")  # a counter: left out
    write(root, f"{thp}/hugepages-2048kB/enabled", "always [inherit] madvise never\n")
    cpu = "sys/devices/system/cpu"
    write(root, f"{cpu}/online", "0-3\n")
    for n, (package, core) in enumerate([(0, 0), (0, 0), (0, 1), (0, 1)]):  # 2 cores x 2 threads
        write(root, f"{cpu}/cpu{n}/topology/physical_package_id", f"{package}\n")
        write(root, f"{cpu}/cpu{n}/topology/core_id", f"{core}\n")
        write(root, f"{cpu}/cpu{n}/cpufreq/scaling_governor", governor + "\n")
        write(root, f"{cpu}/cpu{n}/cpufreq/scaling_driver", "intel_pstate\n")
    write(root, f"{cpu}/cpu0/cache/index0/level", "1\n")
    write(root, f"{cpu}/cpu0/cache/index0/type", "Data\n")
    write(root, f"{cpu}/cpu0/cache/index0/size", "48K\n")
    write(root, f"{cpu}/cpu0/cache/index3/level", "3\n")
    write(root, f"{cpu}/cpu0/cache/index3/type", "Unified\n")
    write(root, f"{cpu}/cpu0/cache/index3/size", "32768K\n")
    write(root, f"{cpu}/vulnerabilities/spectre_v2", spectre + "\n")
    write(root, f"{cpu}/vulnerabilities/meltdown", "Not affected\n")
    config_text = "CONFIG_KSM=y\n# CONFIG_TRANSPARENT_HUGEPAGE_ALWAYS is not set\nCONFIG_HZ=250\nCONFIG_OTHER=y\n"
    if config == "gz":
        (root / "proc/config.gz").write_bytes(gzip.compress(config_text.encode()))
    elif config == "boot":
        write(root, f"boot/config-{RELEASE}", config_text)
    return root


def test_snapshot_of_a_crafted_tree(tmp_path):
    info = hostinfo.collect_host_info(crafted_root(tmp_path))
    assert info["sysctl_vm"]["swappiness"] == "60"
    assert info["sysctl_vm"]["lowmem_reserve_ratio"] == "256 256 32 0"
    assert info["thp_settings"] == {
        "enabled": "madvise",
        "khugepaged/pages_to_scan": "4096",
        "hugepages-2048kB/enabled": "inherit",
    }
    topology = info["cpu_topology"]
    assert (
        topology["online"],
        topology["cpus"],
        topology["packages"],
        topology["cores"],
        topology["threads_per_core"],
    ) == ("0-3", 4, 1, 2, 2.0)
    assert topology["caches"] == {
        "L1d": {"size": "48K", "shared_cpu_list": None},
        "L3": {"size": "32768K", "shared_cpu_list": None},
    }
    assert info["cpu_vulnerabilities"] == {"meltdown": "Not affected", "spectre_v2": "Mitigation: Retpolines"}
    assert info["cpufreq"] == {"governors": {"performance": 4}, "drivers": {"intel_pstate": 4}}
    assert info["kernel_config"] == {
        "source": "/proc/config.gz",
        "options": {"CONFIG_KSM": "y", "CONFIG_TRANSPARENT_HUGEPAGE_ALWAYS": "not set", "CONFIG_HZ": "250"},
    }
    assert info["ksm_before"]["full_scans"] == "3"


def test_kernel_config_from_boot_and_an_empty_tree_is_tolerated(tmp_path):
    boot = hostinfo.kernel_config(RELEASE, crafted_root(tmp_path / "b", config="boot"))
    assert boot is not None and boot["source"] == f"/boot/config-{RELEASE}" and boot["options"]["CONFIG_KSM"] == "y"
    (tmp_path / "broken/proc").mkdir(parents=True)
    (tmp_path / "broken/proc/config.gz").write_bytes(b"not gzip")
    assert hostinfo.kernel_config(RELEASE, tmp_path / "broken") is None
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (
        hostinfo.sysctl_vm(empty),
        hostinfo.thp_settings(empty),
        hostinfo.cpu_topology(empty),
        hostinfo.cpu_vulnerabilities(empty),
        hostinfo.cpufreq(empty),
        hostinfo.kernel_config(RELEASE, empty),
    ) == ({}, {}, {}, {}, None, None)


def test_reads_are_bounded(tmp_path):
    big = tmp_path / "proc/sys/vm"
    big.mkdir(parents=True)
    (big / "huge").write_text("x" * 100_000)
    for n in range(hostinfo.MAX_ENTRIES + 50):
        (big / f"k{n:04d}").write_text("1\n")
    values = hostinfo.sysctl_vm(tmp_path)
    assert len(values) == hostinfo.MAX_ENTRIES
    assert len(hostinfo.read_small(big / "huge")) == hostinfo.MAX_FILE_BYTES


def test_ksm_counter_sanity_on_crafted_snapshots():
    before = {"full_scans": "3", "pages_scanned": "3000", "ksm_zero_pages": "0"}
    good = hostinfo.judge_ksm_counters(
        before, {"full_scans": "5", "pages_scanned": "9000", "ksm_zero_pages": "12"}, "6.12.0"
    )
    assert good["ok"] and good["problems"] == [] and not good["known_counter_bugs"]
    assert good["checked"] == ["ksm_zero_pages before", "ksm_zero_pages after", "pages_scanned with full_scans"]
    negative = hostinfo.judge_ksm_counters(
        before, {"full_scans": "3", "pages_scanned": "3000", "ksm_zero_pages": "-1"}, "6.6.30"
    )
    assert not negative["ok"] and negative["known_counter_bugs"]
    assert negative["problems"] == ["ksm_zero_pages read -1 after the study (a count cannot be negative)"]
    stalled = hostinfo.judge_ksm_counters(before, {"full_scans": 9, "pages_scanned": 3000}, "6.8.0")
    assert stalled["problems"] == ["full_scans advanced by 6 but pages_scanned did not move: the counter stalled"]
    backwards = hostinfo.judge_ksm_counters(before, {"full_scans": "1", "pages_scanned": "10"}, "6.12")
    assert not backwards["ok"] and "went backwards" in backwards["problems"][0]
    # an old kernel without pages_scanned nor ksm_zero_pages: nothing checked, nothing claimed
    old = hostinfo.judge_ksm_counters({"full_scans": "1"}, {"full_scans": "4"}, "5.10.0")
    assert old["ok"] and old["checked"] == []


def test_study_end_records_ksm_after_and_its_judgement(tmp_path):
    root = crafted_root(tmp_path)
    host = hostinfo.collect_host_info(root)
    (root / KSM_SYSFS / "full_scans").write_text("7\n")  # ksmd scanned, pages_scanned stayed
    end = hostinfo.study_end_info(host, root)
    assert end["ksm_after"]["full_scans"] == "7" and end["ksm_before"]["full_scans"] == "3"
    assert not end["ksm_counter_sanity"]["ok"]
    (finding,) = host_findings(end)
    assert finding.warn and "full_scans advanced by 4 but pages_scanned did not move" in finding.text
    assert host_findings(host) == [] and host_findings(None) == []


def test_compare_lists_the_environment_that_differs_and_not_the_counters(tmp_path):
    a_root = crafted_root(tmp_path / "a")
    b_root = crafted_root(tmp_path / "b", governor="powersave", spectre="Vulnerable", full_scans=40)
    a = hostinfo.study_end_info(hostinfo.collect_host_info(a_root), a_root)
    b = hostinfo.study_end_info(hostinfo.collect_host_info(b_root), b_root)
    diff = {d["key"]: (d["a"], d["b"]) for d in host_differences(a, b)}
    assert diff == {
        "cpufreq.governors.performance": (4, None),
        "cpufreq.governors.powersave": (None, 4),
        "cpu_vulnerabilities.spectre_v2": ("Mitigation: Retpolines", "Vulnerable"),
    }
    (b_root / "proc/sys/vm/swappiness").write_text("10\n")
    b = hostinfo.collect_host_info(b_root)
    (b_root / KSM_SYSFS / "pages_to_scan").write_text("500\n")  # a knob not restored at the end: shown
    b = hostinfo.study_end_info(b, b_root)
    diff = {d["key"]: (d["a"], d["b"]) for d in host_differences(a, b)}
    assert diff["sysctl_vm.swappiness"] == ("60", "10") and diff["ksm_after.pages_to_scan"] == ("100", "500")


def test_compare_with_a_study_from_before_the_snapshot_shows_one_row_per_new_section(tmp_path):
    root = crafted_root(tmp_path)
    new = hostinfo.collect_host_info(root)
    old = {k: v for k, v in new.items() if k not in ("sysctl_vm", "thp_settings", "cpu_vulnerabilities")}
    diff = {d["key"]: (d["a"], d["b"]) for d in host_differences(old, new)}
    assert diff == {
        "cpu_vulnerabilities": (None, "(recorded: 2 values)"),
        "thp_settings": (None, "(recorded: 3 values)"),
        "sysctl_vm": (None, "(recorded: 2 values)"),
    }
