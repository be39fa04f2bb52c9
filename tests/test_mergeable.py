"""Is guest RAM mergeable: the VmFlags "mg" of /proc/PID/smaps, on real processes that did and
did not madvise(MADV_MERGEABLE) their mapping, on a crafted smaps text, and the VM runner's
record and refusal built on it (the VM tests exercise the same functions on real QEMUs)."""

from __future__ import annotations

import os

import pytest

from orchestrator.host import probes
from orchestrator.plan import expand, parse_plan
from orchestrator.runners.vm import mergeable_record, unmergeable_reason

SMAPS = """\
55d0c0a00000-55d0c0a21000 rw-p 00000000 00:00 0                          [heap]
Size:                132 kB
Rss:                   8 kB
VmFlags: rd wr mr mw me ac
7f0000000000-7f0040000000 rw-p 00000000 00:00 0 
Size:            1048576 kB
KernelPageSize:        4 kB
Rss:              524288 kB
AnonHugePages:    409600 kB
THPeligible:    1
VmFlags: rd wr mr mw me ac sd hg mg
7f0040000000-7f0080000000 rwxp 00000000 00:00 0 
Size:            1048576 kB
VmFlags: rd wr ex mr mw me ac
7f0080000000-7f0088000000 rw-s 00000000 00:01 4242                       /memfd:pc.ram (deleted)
Size:             131072 kB
VmFlags: rd wr sh mr mw me ms sd
7f00a0000000-7f00a4000000 rw-p 00000000 00:00 0                          [anon:guest-ram]
Size:              65536 kB
VmFlags: rd wr mr mw me ac
7f00b0000000-7f00b0021000 r--p 00000000 fd:01 123                        /usr/lib/x86_64-linux-gnu/libc.so.6
Size:                132 kB
VmFlags: rd mr mw me
"""


def test_crafted_smaps_mappings_and_flags():
    mappings = probes.parse_smaps_mappings(SMAPS)
    assert [(m.size_kib, m.anonymous, m.mergeable) for m in mappings] == [
        (132, True, False),
        (1048576, True, True),
        (1048576, True, False),
        (131072, False, False),
        (65536, True, False),
        (132, False, False),
    ]
    # the 1 GiB guest RAM is judged; TCG's rwx code buffer, shared memfd RAM and files are not
    assert probes.guest_ram_mergeable(mappings, 512 * 1024) == {
        "big_mappings": 1,
        "mergeable_mappings": 1,
        "big_kib": 1048576,
        "mergeable_kib": 1048576,
        "mergeable": True,
    }
    # a named anonymous mapping without mg among the big ones: not all guest RAM is mergeable
    judged = probes.guest_ram_mergeable(mappings, 64 * 1024)
    assert (judged["big_mappings"], judged["mergeable_mappings"], judged["mergeable"]) == (2, 1, False)
    # nothing that big: nothing to judge
    assert probes.guest_ram_mergeable(mappings, 4 * 1024 * 1024)["mergeable"] is None


def test_smaps_of_a_kernel_without_vmflags_reads_as_unmarked():
    text = "\n".join(line for line in SMAPS.splitlines() if not line.startswith("VmFlags"))
    assert not any(m.mergeable for m in probes.parse_smaps_mappings(text))


def test_real_process_that_madvised_its_mapping_carries_mg_and_one_that_did_not_lacks_it(holder):
    marked = holder(64, mergeable=True)
    plain = holder(64, mergeable=False)
    min_kib = 32 * 1024
    yes = probes.read_guest_ram_mergeable(marked.pid, min_kib)
    no = probes.read_guest_ram_mergeable(plain.pid, min_kib)
    assert yes is not None and yes["mergeable"] is True and yes["mergeable_kib"] >= 64 * 1024
    assert no is not None and no["mergeable"] is False and no["big_kib"] >= 64 * 1024
    assert probes.read_guest_ram_mergeable(os.getpid(), 1 << 40)["mergeable"] is None


def test_vm_record_and_refusal_on_real_processes(holder):
    marked, plain = holder(64, mergeable=True), holder(64, mergeable=False)
    record = mergeable_record({"g0": marked.pid, "g1": plain.pid}, 64, probes.Path("/"))
    assert record["g0"]["pid"] == marked.pid and record["g0"]["mergeable"] is True
    assert record["g1"]["mergeable"] is False
    base = (
        '[study]\nname = "t"\n{off}\n[workload]\ntype = "idle"\n[guests]\ncount = 2\nmemory_mib = 128\n{guests}\n'
        "[sweep.ksm]\npages_to_scan = [100]\n"
    )
    (on,) = expand(parse_plan(base.format(off="", guests="")))
    reason = unmergeable_reason(on, record)
    assert reason is not None and "guest RAM is not mergeable" in reason
    assert f"g1 (QEMU pid {plain.pid}: 1 of 1 guest RAM mappings without mg)" in reason and "g0" not in reason
    assert unmergeable_reason(on, {"g0": record["g0"]}) is None
    # KSM off, or guests opted out of KSM on purpose (the on/off control): nothing to refuse
    off, _ = expand(parse_plan(base.format(off="ksm_off_baseline = true", guests="")))
    assert off.ksm_off and unmergeable_reason(off, record) is None
    (opted_out,) = expand(parse_plan(base.format(off="", guests="nosharepages = true")))
    assert unmergeable_reason(opted_out, record) is None
    # a process that has gone is recorded, not judged
    gone = plain.pid
    plain.kill()
    plain.wait()
    assert mergeable_record({"g1": gone}, 64, probes.Path("/"))["g1"] == {"pid": gone, "error": "the process has gone"}


def test_density_trials_record_each_started_guest_and_refuse_an_unmergeable_one(holder):
    """Density restores its guests one by one: each one's mg flags join the trial's record as
    it starts (the same record VM trials write), and a guest KSM cannot merge fails the trial
    after it is recorded; guests opted out of KSM (nosharepages) are recorded, not refused."""
    from orchestrator.errors import ProvisionError
    from orchestrator.runners.density import note_mergeable

    plan = (
        '[study]\nname = "d"\n[workload]\ntype = "idle"\n[guests]\ncount = 1\nmemory_mib = 128\n{guests}\n'
        "[density]\nbudget_mib = 1024\nmem_available_floor_mib = 512\nmax_guests = 3\n"
        "[sweep.ksm]\npages_to_scan = [100]\n"
    )
    (trial,) = expand(parse_plan(plan.format(guests="")))
    marked, other, plain = holder(64, mergeable=True), holder(64, mergeable=True), holder(64, mergeable=False)
    record: dict = {}
    note_mergeable(record, trial, {"g0": marked.pid}, probes.Path("/"))
    note_mergeable(record, trial, {"g1": other.pid}, probes.Path("/"))
    assert [(name, info["pid"], info["mergeable"]) for name, info in record.items()] == [
        ("g0", marked.pid, True),
        ("g1", other.pid, True),
    ]
    with pytest.raises(ProvisionError, match=rf"g2 \(QEMU pid {plain.pid}: 1 of 1 guest RAM mappings without mg\)"):
        note_mergeable(record, trial, {"g2": plain.pid}, probes.Path("/"))
    assert record["g2"]["mergeable"] is False  # recorded before the refusal
    (opted_out,) = expand(parse_plan(plan.format(guests="nosharepages = true")))
    kept: dict = {}
    note_mergeable(kept, opted_out, {"g0": plain.pid}, probes.Path("/"))
    assert kept["g0"]["mergeable"] is False
