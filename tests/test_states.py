"""Saved guest states (layout, commit, stale builds, cleanup's limits), the restore XML, and the
pure pieces of trustworthy comparisons: blocked order, churn metrics, outside-load accounting.

The guests themselves are restored in tests/test_vm_restore.py; here every input is a file
written by a real save (tests/data/domains/saved-state-g0.xml) or a hand-made one."""

from __future__ import annotations

import os
import shutil
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from orchestrator.analysis import samplemetrics
from orchestrator.guests import states
from orchestrator.guests.domains import METADATA_NS, QEMU_NS, parse_metadata, restore_xml
from orchestrator.errors import ProvisionError
from orchestrator.plan import PhasesSection, SamplingSection, expand, fast_interval_s, parse_plan, writes_during_measure
from orchestrator.report.plots import envelope_indices
from orchestrator.guests.states import remove_uncached_states
from orchestrator.workloads.probe import ProbeParams
from orchestrator.workloads.processes import ProcessesParams
from orchestrator.host import probes
from orchestrator.host.sampler import Sampler
from orchestrator.runners.base import SteadyWait, TrialResult, wait_steady

SAVED_XML = (Path(__file__).parent / "data" / "domains" / "saved-state-g0.xml").read_text()


# ----------------------------------------------------------------------------- restore XML


def test_restore_xml_changes_only_what_a_trial_changes():
    out = restore_xml(
        SAVED_XML,
        study="night-2",
        overlay_path=Path("/w/new.qcow2"),
        console_log_path=Path("/w/new.log"),
        host_port=40001,
    )
    root, saved = ET.fromstring(out), ET.fromstring(SAVED_XML)
    assert root.findtext("name") == saved.findtext("name")  # libvirt refuses another name
    assert root.findtext("uuid") == saved.findtext("uuid")
    disk = [d for d in root.iter("disk") if d.get("device") == "disk"][0]
    assert disk.find("source").get("file") == "/w/new.qcow2"
    assert {e.find("source").get("path") for e in (*root.iter("serial"), *root.iter("console"))} == {"/w/new.log"}
    forward = [a.get("value") for a in root.iter(f"{{{QEMU_NS}}}arg") if "hostfwd" in a.get("value")]
    assert forward == ["user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:40001-:22"]
    guest = root.find(f"metadata/{{{METADATA_NS}}}guest")
    meta = parse_metadata(ET.tostring(guest, encoding="unicode"))
    assert (meta.study, meta.overlay_path, meta.console_log_path) == (
        "night-2",
        Path("/w/new.qcow2"),
        Path("/w/new.log"),
    )
    # Everything else libvirt filled in at save time (the ABI it checks) is untouched.
    for tag in ("memory", "vcpu", "os", "cpu", "devices/controller", "devices/interface"):
        assert [ET.tostring(e) for e in root.findall(tag)] == [ET.tostring(e) for e in saved.findall(tag)]


def test_restore_xml_moves_the_capped_console_log():
    """A state saved with a pty console logged by virtlogd (guest.xml.j2; written by a real save,
    no network): the <log file> moves to the trial's console log, serial and console alike."""
    saved = (Path(__file__).parent / "data" / "domains" / "saved-state-pty-g0.xml").read_text()
    out = restore_xml(
        saved, study="s", overlay_path=Path("/w/o.qcow2"), console_log_path=Path("/w/c.log"), host_port=None
    )
    root = ET.fromstring(out)
    logs = [(e.tag, e.get("type"), e.find("log").get("file")) for e in (*root.iter("serial"), *root.iter("console"))]
    assert logs == [("serial", "pty", "/w/c.log"), ("console", "pty", "/w/c.log")]


def test_restore_xml_refuses_a_state_without_a_port_forward_to_move():
    no_forward = SAVED_XML.replace("hostfwd=tcp:", "guestfwd=tcp:")
    with pytest.raises(ProvisionError, match="no SSH port forward"):
        restore_xml(no_forward, study="s", overlay_path=Path("/o"), console_log_path=Path("/c"), host_port=1)


# ----------------------------------------------------------------------------- the state folder


def _fake_set(root: Path, key: str, guests: int = 2) -> states.SavedSet:
    build = states.build_folder(root, key)
    entries = []
    for i in range(guests):
        for path in states.guest_files(build, i):
            path.write_text("x")
        entries.append({"index": i, "name": f"ksmlab-st{key[:8]}-{i}", "uuid": f"u{i}", "marker": f"{key}:{i}:n"})
    return states.commit(build, root, key, {"spec": 1}, entries, {})


def test_a_committed_state_loads_lists_and_is_removed(tmp_path):
    saved = _fake_set(tmp_path, "abcdef0123456789")
    assert [g.name for g in saved.guests] == ["ksmlab-stabcdef01-0", "ksmlab-stabcdef01-1"]
    assert [s.key for s in states.list_states(tmp_path)] == ["abcdef0123456789"]
    assert not list(tmp_path.glob(".*"))  # the build folder became the state folder
    # QEMU (libvirt's unprivileged user) can reach the disk layers by name, not list the folder.
    assert (saved.folder.stat().st_mode & 0o777) == 0o711
    states.remove(tmp_path, "abcdef0123456789")
    assert states.list_states(tmp_path) == []
    with pytest.raises(ProvisionError):
        states.remove(tmp_path, "../etc")


def test_an_incomplete_state_is_never_used(tmp_path):
    saved = _fake_set(tmp_path, "1111222233334444")
    saved.guests[1].save_path.unlink()
    assert states.load(saved.folder) is None


def test_stale_builds_of_dead_processes_are_removed_live_ones_kept(tmp_path):
    dead = tmp_path / ".k.build-999999999"
    mine = tmp_path / f".k.build-{os.getpid()}"
    for folder in (dead, mine):
        folder.mkdir()
        (folder / "g0.save").write_text("memory")
    assert states.remove_stale_builds(tmp_path) == [dead]
    assert mine.exists()


def test_cleanup_removes_uncached_states_but_nothing_else(tmp_path):
    folder = tmp_path / "states"
    _fake_set(folder, "aaaabbbbccccdddd")
    remove_uncached_states(folder)
    assert not folder.exists()
    # A folder that holds anything but saved-state files is not ours to delete.
    _fake_set(folder, "aaaabbbbccccdddd")
    (folder / "aaaabbbbccccdddd" / "thesis.tex").write_text("precious")
    remove_uncached_states(folder)
    assert (folder / "aaaabbbbccccdddd" / "thesis.tex").exists()


# ----------------------------------------------------------------------------- plans


BLOCKED = """
[study]
name = "b"
repetitions = 3
ksm_off_baseline = true
seed = 5
[workload]
type = "processes"
[sweep.ksm]
pages_to_scan = [100, 1000, 5000]
"""


def test_repetitions_run_in_blocks_each_every_setting_once_in_its_own_order():
    trials = expand(parse_plan(BLOCKED))
    blocks = [trials[i : i + 4] for i in range(0, 12, 4)]
    orders = []
    for number, block in enumerate(blocks):
        assert {t.repetition for t in block} == {number}
        assert sorted(t.label for t in block) == sorted(["KSM off", "pts=100", "pts=1000", "pts=5000"])
        orders.append([t.label for t in block])
    assert len({tuple(o) for o in orders}) > 1  # not the same order in every block
    assert [t.trial_id for t in expand(parse_plan(BLOCKED))] == [t.trial_id for t in trials]  # seeded


def test_fast_tier_resolves_refills_only_for_refilling_processes():
    sampling = SamplingSection(interval_s=1.0, fast_interval_s="auto")
    refilling = ProcessesParams(rounds=0, round_wait_s=1.0)
    assert refilling.writes_during_measure and fast_interval_s(sampling, refilling) == pytest.approx(0.05)
    assert fast_interval_s(sampling, ProcessesParams(rounds=1)) == 1.0
    assert fast_interval_s(sampling, ProcessesParams(rounds=0, round_wait_s=0.1)) == 0.05
    assert fast_interval_s(sampling, ProcessesParams(rounds=0, round_wait_s=4.0)) == pytest.approx(0.2)
    assert fast_interval_s(sampling, ProbeParams()) == 0.05
    assert fast_interval_s(SamplingSection(interval_s=1.0, fast_interval_s=0.3), refilling) == 0.3


def test_stored_workload_tables_say_whether_they_write_during_measure():
    """metrics.py asks of trial.json's table, with the model's own defaults (rounds = 1)."""
    assert writes_during_measure({"type": "processes", "rounds": 0, "round_wait_s": 1.0})
    assert not writes_during_measure({"type": "processes"})
    assert writes_during_measure({"type": "sysbench"}) and not writes_during_measure({"type": "idle"})
    assert not writes_during_measure({"type": "probe"}) and not writes_during_measure({})
    assert writes_during_measure({"type": "processes", "rounds": 3, "a_key_of_an_older_version": 1})


def test_keep_across_trials_is_refused_with_its_replacement():
    with pytest.raises(Exception, match="replaced by start"):
        parse_plan(
            BLOCKED.replace(
                '[workload]\ntype = "processes"', '[workload]\ntype = "idle"\n[guests]\nkeep_across_trials = true'
            )
        )


# ----------------------------------------------------------------------------- churn metrics


def sawtooth(
    phase_s: float, tick_s: float, seconds: float = 20, pages: int = 1000
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """ksm.csv measure rows of a workload refilled every second: sharing drops to 0 at each
    refill and climbs linearly back to `pages` within 0.5 s; plus the fills.csv it implies."""
    t = np.arange(0, seconds, tick_s) + 1000.0
    since = (t - phase_s) % 1.0
    sharing = np.round(np.clip(since / 0.5, 0, 1) * pages)
    ksm = pd.DataFrame(
        {
            "t_wall": t,
            "t_s": t - 1000.0,
            "phase": "measure",
            "pages_sharing": sharing,
            "pages_shared": np.minimum(sharing, 1),
            "vmstat_cow_ksm": np.floor((t - phase_s)) * pages,
        }
    )
    starts = np.arange(np.ceil(1000.0 - phase_s), 1000.0 + seconds, 1.0) + phase_s % 1.0
    fills = pd.DataFrame(
        {
            "label": "proc-0",
            "fill": np.arange(2, 2 + starts.size),
            "start_wall": starts - 0.001,
            "end_wall": starts + 0.001,
        }
    )
    return ksm, fills


def test_the_average_of_a_sawtooth_does_not_depend_on_the_sampling_phase():
    means = []
    for phase_s, tick_s in ((0.0, 0.1), (0.37, 0.13), (0.71, 0.09)):
        ksm, fills = sawtooth(phase_s, tick_s)
        out = samplemetrics.ksm_metrics(ksm, {}, 4096)
        means.append(out["saved_mib_steady"])
        # A single end sample is wherever the last tick fell: the reason for the averages.
        refills = samplemetrics.refill_metrics(ksm, fills, {}, 1000)
        assert (
            refills["saved_share_after_refill_pct"]
            < refills["saved_share_mean_pct"]
            < refills["saved_share_before_refill_pct"]
        )
        assert 0.4 <= refills["remerge_s_median"] <= 0.6
    assert max(means) - min(means) <= 0.05 * max(means)
    # The true time average of this sawtooth is 0.75 of the peak (linear half, flat half).
    assert np.mean(means) == pytest.approx(0.75 * 1000 * 4096 / 2**20, rel=0.05)


def test_envelope_keeps_every_trough_of_a_long_sawtooth():
    values = np.tile(np.r_[np.zeros(5), np.full(5, 10.0)], 1000)  # 10,000 samples
    keep = envelope_indices(values, 2000)
    assert keep.size <= 2000 and (np.diff(keep) > 0).all()
    assert values[keep].min() == 0 and values[keep].max() == 10


# ----------------------------------------------------------------------------- outside load


def _host_tree(
    root: Path,
    uptime_s: float,
    idle_ticks: int,
    processes: dict[int, tuple[int, int, int, int]],
    last_pid: int | None = None,
) -> None:
    """A 2-CPU host: /proc/stat (idle ticks), /proc/uptime, /proc/loadavg (with last_pid), and
    /proc/<pid>/stat and task/<pid>/children for {pid: (ppid, cpu ticks, reaped children's ticks,
    start ticks)}. Files are rewritten in place, as procfs regenerates them under a sampler that
    keeps them open; the folder of a process no longer listed is removed."""
    proc = root / "proc"
    proc.mkdir(parents=True, exist_ok=True)
    for folder in proc.iterdir():
        if folder.name.isdigit() and int(folder.name) not in processes:
            shutil.rmtree(folder)
    (proc / "stat").write_text(f"cpu  5000 0 1000 {idle_ticks} 0 0 0 0 0 0\ncpu0 0 0 0 0\ncpu1 0 0 0 0\n")
    (proc / "uptime").write_text(f"{uptime_s:.2f} 0.00\n")
    if last_pid is not None:
        (proc / "loadavg").write_text(f"0.00 0.00 0.00 1/100 {last_pid}\n")
    for pid, (ppid, ticks, child_ticks, start_ticks) in processes.items():
        (proc / str(pid) / "task" / str(pid)).mkdir(parents=True, exist_ok=True)
        fields = ["S", str(ppid)] + ["0"] * 9 + [str(ticks), "0", str(child_ticks), "0"] + ["0"] * 4
        fields += [str(start_ticks)] + ["0"] * 25
        (proc / str(pid) / "stat").write_text(f"{pid} (p{pid}) " + " ".join(fields) + "\n")
        children = [str(child) for child, spec in processes.items() if spec[0] == pid]
        (proc / str(pid) / "task" / str(pid) / "children").write_text(" ".join(children) + " " if children else "")


def test_outside_load_is_host_busy_time_minus_the_study_and_reads_no_other_process(tmp_path, monkeypatch):
    me = os.getpid()
    hz = probes.CLOCK_TICKS_PER_S
    sampler = Sampler(1.0, 1, dict, root=tmp_path)
    clock = iter([100.0, 101.0, 102.0])
    monkeypatch.setattr("orchestrator.host.sampler.time.monotonic", lambda: next(clock))
    # Unrelated processes are not in the tree at all: the reading must not need them.
    _host_tree(tmp_path, 50.0, 100 * hz, {me: (1, 0, 0, 0)})
    with probes.CounterFiles(probes.host_counter_paths(tmp_path)) as sampler._host_files:
        assert np.isnan(sampler._outside_cpu_pct([]))
        # 1 s later, 2 CPUs: 1.6 CPU s busy (idle rose 0.4 s). We used 0.5 s; our child, started
        # since the last tick, 0.3 s: the study. The other 0.8 s is outside: 80% of one core.
        _host_tree(
            tmp_path, 51.0, round(100.4 * hz), {me: (1, hz // 2, 0, 0), 700: (me, hz * 3 // 10, 0, round(50.5 * hz))}
        )
        assert sampler._outside_cpu_pct([]) == pytest.approx(80.0)
        # 1 s later: busy 0.1 s, the child's last 0.1 s; it exited and we reaped it (its 0.4 s
        # total lands in our cutime, of which 0.3 s were counted): nothing outside.
        _host_tree(tmp_path, 52.0, round(102.3 * hz), {me: (1, hz // 2, hz * 4 // 10, 0)})
        assert sampler._outside_cpu_pct([]) == pytest.approx(0.0, abs=1e-6)
    assert sampler.study_walks == 3  # no /proc/loadavg: no way to skip a walk


def test_outside_load_walks_the_study_only_when_a_process_may_have_been_created(tmp_path, monkeypatch):
    """While the host's last pid (/proc/loadavg) stands still no process can have joined the
    study: the processes of the last walk are read again (their stat kept open), no children
    files. A child listed with the last pid unchanged (impossible on a real host) shows it: it is
    not read until the last pid moves."""
    me = os.getpid()
    hz = probes.CLOCK_TICKS_PER_S
    sampler = Sampler(1.0, 1, dict, root=tmp_path)
    clock = iter([100.0, 101.0, 102.0, 103.0])
    monkeypatch.setattr("orchestrator.host.sampler.time.monotonic", lambda: next(clock))
    _host_tree(tmp_path, 50.0, 100 * hz, {me: (1, 0, 0, 0)}, last_pid=1000)
    with probes.CounterFiles(probes.host_counter_paths(tmp_path)) as sampler._host_files:
        assert np.isnan(sampler._outside_cpu_pct([]))
        assert sampler.study_walks == 1
        # busy 1.6 s, we used 0.5 s; the child's 0.3 s is not seen: 1.1 s outside
        _host_tree(
            tmp_path,
            51.0,
            round(100.4 * hz),
            {me: (1, hz // 2, 0, 0), 700: (me, hz * 3 // 10, 0, round(50.5 * hz))},
            last_pid=1000,
        )
        assert sampler._outside_cpu_pct([]) == pytest.approx(110.0)
        assert sampler.study_walks == 1
        # the last pid moved: walked, the child found; it joined (started before the last tick)
        # and counts from the next: busy 1.0 s, we used 0.2 s, 0.8 s outside
        _host_tree(
            tmp_path,
            52.0,
            round(101.4 * hz),
            {me: (1, hz * 7 // 10, 0, 0), 700: (me, hz * 6 // 10, 0, round(50.5 * hz))},
            last_pid=1001,
        )
        assert sampler._outside_cpu_pct([]) == pytest.approx(80.0)
        assert sampler.study_walks == 2
        # still: no walk, the child read through its open stat; busy 0.6 s, we 0.1 s, it 0.3 s
        _host_tree(
            tmp_path,
            53.0,
            round(102.8 * hz),
            {me: (1, hz * 8 // 10, 0, 0), 700: (me, hz * 9 // 10, 0, round(50.5 * hz))},
            last_pid=1001,
        )
        assert sampler._outside_cpu_pct([]) == pytest.approx(20.0)
        assert sampler.study_walks == 2
        assert set(sampler._stat_files) == {me, 700}
    for files in sampler._stat_files.values():
        files.close()


def test_host_cpu_parser_counts_cpus_and_the_time_no_task_ran():
    cpu = probes.parse_host_cpu(
        "cpu  10 1 5 100 7 2 3 4 0 0\ncpu0 5 0 2 50 3 1 1 2 0 0\ncpu1 5 1 3 50 4 1 2 2\nintr 0\n"
    )
    assert cpu.cpus == 2 and cpu.busy_ticks == 10 + 1 + 5 + 2 + 3 + 4
    assert cpu.not_working_ticks == 100 + 7 + 4  # idle, iowait, steal


class _Frames:
    """What wait_steady reads of a sampler: its frames so far (an edge case: a scripted host)."""

    def __init__(self, mem_available_kib, rss_kib) -> None:
        self.mem_available_kib, self.rss_kib, self.t0 = mem_available_kib, rss_kib, time.monotonic()

    def ksm_frame(self) -> pd.DataFrame:
        t = np.arange(0, time.monotonic() - self.t0 + 0.01, 0.25)
        return pd.DataFrame({"t_s": t, "mem_available_kib": [self.mem_available_kib(x) for x in t]})

    def process_frame(self) -> pd.DataFrame:
        t = self.ksm_frame()["t_s"]
        return pd.DataFrame({"t_s": t, "label": "vm", "rss_kib": [self.rss_kib(x) for x in t]})


STEADY = PhasesSection(steady_max_s=4.0, steady_window_s=1.5, steady_slope_mib_per_min=10.0)


def test_steady_wait_ends_once_the_guests_stop_growing():
    flat = _Frames(lambda t: 20_000_000, lambda t: 1_000_000)
    out = wait_steady(STEADY, flat, threading.Event())
    assert out is not None and out.timed_out is False and out.wait_s < 3.5


def test_steady_wait_is_bounded_and_says_it_timed_out():
    # growing 1 GiB a minute: far above 10 MiB/min for the whole bound
    growing = _Frames(lambda t: 20_000_000 - t * 17_476, lambda t: 1_000_000 + t * 17_476)
    started = time.monotonic()
    out = wait_steady(STEADY, growing, threading.Event())
    assert out is not None and out.timed_out is True
    assert 4.0 <= time.monotonic() - started < 7.0
    assert out.slopes_mib_per_min["rss"] > 500


def test_no_steady_wait_unless_the_plan_asks():
    assert wait_steady(PhasesSection(steady_max_s=0), None, threading.Event()) is None


def test_trial_result_gives_trial_json_what_the_runner_set_in_the_usual_order():
    from orchestrator.runners.record import ProvisionRecord, SamplerRecord, TrialRecord

    result = TrialResult()
    empty = TrialRecord(trial_id="t")
    result.fill(empty)
    assert empty.to_json() == TrialRecord(trial_id="t").to_json()  # nothing set: no part written
    result.sampler = SamplerRecord(error_count=0, last_error=None, missed_ticks=0)
    result.converged_by_rule = False  # False is a finding, not "absent"
    result.steady = SteadyWait(3.2, False, {"rss": 0.4})
    result.provision = ProvisionRecord(start="restore")
    result.frames = {"ksm": pd.DataFrame({"t_s": [0.0]})}
    result.extra_json = {"workload_summary": {}}
    record = TrialRecord(trial_id="t")
    result.fill(record)
    parts = {k: v for k, v in record.to_json().items() if k not in TrialRecord(trial_id="t").to_json()}
    assert list(parts) == [
        "provision",
        "steady_wait_s",
        "steady_timed_out",
        "steady_slopes_mib_per_min",
        "converged_by_rule",
        "sampler",
    ]
    assert parts["provision"]["start"] == "restore" and parts["converged_by_rule"] is False
    assert parts["steady_slopes_mib_per_min"] == {"rss": 0.4} and parts["sampler"]["error_count"] == 0


def test_every_guests_field_shapes_the_saved_state_unless_declared_otherwise():
    """The saved state's key takes every [guests] field but the declared few: a field added to
    the model later changes the key (a hand-kept list of the fields that do would not)."""
    from orchestrator.plan import GuestsSection

    assert GuestsSection.NOT_GUEST_SHAPE <= set(GuestsSection.model_fields)
    shaping = set(GuestsSection.model_fields) - GuestsSection.NOT_GUEST_SHAPE
    # The fields that shaped the key before it was derived: the same set, so cached states stay valid.
    assert shaping == {
        "count",
        "memory_mib",
        "vcpus",
        "domain_type",
        "nosharepages",
        "hugepages",
        "vcpu_pins",
        "numa_node",
        "network",
    }


def test_every_sysbench_field_shapes_the_prepared_layer_unless_declared_otherwise():
    """The prepared layer's key takes every sysbench field but those declared not to shape the
    data: a field added later changes the key, so no layer prepared for other data is reused."""
    from pydantic import Field

    from orchestrator.workloads.sysbench import SysbenchWorkload

    assert SysbenchWorkload.NOT_DATA_SHAPE <= set(SysbenchWorkload.model_fields)
    # The fields that shaped the key before it was derived: the same set, so cached layers stay valid.
    assert set(SysbenchWorkload.prepared_data_fields()) == {"test", "tables", "table_size", "rand_seed"}

    class WithCharset(SysbenchWorkload):
        charset: str = Field("utf8mb4")

    assert "charset" in WithCharset.prepared_data_fields()
    assert WithCharset(charset="latin1").prepared_data() != WithCharset().prepared_data()
    # bulk_insert prepares one table per thread: there the thread count shapes the data too
    assert "threads" not in SysbenchWorkload(threads=4).prepared_data()
    bulk = SysbenchWorkload(test="bulk_insert", tables=1)
    assert bulk.prepared_data() != bulk.model_copy(update={"threads": 4}).prepared_data()
