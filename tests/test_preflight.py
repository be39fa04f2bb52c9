"""`check`: ready only when nothing blocking is missing."""

from pathlib import Path

import pytest

from orchestrator.cli.main import main
from orchestrator.preflight import ksm_checks, ready, run_checks

PLANS = Path(__file__).resolve().parent.parent / "plans"


def test_this_host_is_ready_for_the_quick_study():
    results = run_checks(PLANS / "quickstart.toml")
    assert ready(results), [r for r in results if not r.ok]
    assert main(["check", str(PLANS / "quickstart.toml")]) == 0


def test_a_kernel_without_ksm_is_not_ready(tmp_path):
    results = ksm_checks(tmp_path)
    assert not ready(results) and "CONFIG_KSM" in results[0].detail


def test_a_bad_plan_makes_check_fail(tmp_path):
    plan = tmp_path / "bad.toml"
    plan.write_text('[study]\nname = "x"\n[workload]\ntype = "processes"\nprocesses = 0\n')
    results = run_checks(plan)
    assert not ready(results)
    assert "workload.processes" in next(r for r in results if r.name == "plan").detail
    assert main(["check", str(plan)]) == 1


def test_space_check_refuses_a_study_that_cannot_store_what_it_measures(tmp_path):
    from orchestrator.plan import expand, parse_plan
    from orchestrator.preflight import space_checks, space_needs

    plan = parse_plan(
        '[study]\nname = "s"\n[workload]\ntype = "processes"\n[phases]\nmeasure_s = 60\n'
        "[sweep.ksm]\npages_to_scan = [100, 1000]\n"
    )
    trials = expand(plan)
    needs = space_needs(plan, trials, tmp_path / "not-yet" / "results")
    assert list(needs) == [tmp_path]  # measured on the file system that will hold it
    assert 4 * 2**20 < needs[tmp_path] < 100 * 2**20
    assert all(c.ok for c in space_checks(plan, trials, tmp_path))


def test_another_ksm_driver_is_named_without_blocking(tmp_path):
    (tmp_path / "sys/kernel/mm/ksm").mkdir(parents=True)
    for knob in ("run", "pages_to_scan", "sleep_millisecs"):
        (tmp_path / "sys/kernel/mm/ksm" / knob).write_text("0\n")
    (tmp_path / "proc/4242").mkdir(parents=True)
    (tmp_path / "proc/4242/comm").write_text("momd\n")
    (tmp_path / "proc/4242/stat").write_text("4242 (momd) S 1 4242 4242 0 -1 4194560 5 0 0 0 1 1 0 0 20 0 1 0 9 0 0\n")
    results = {r.name: r for r in ksm_checks(tmp_path)}
    other = results["no other KSM driver"]
    assert not other.ok and not other.blocking and "oVirt MOM (momd) running as pid [4242]" in other.detail
    assert results["ksmtuned not running"].ok


def test_a_0700_folder_above_the_guest_disks_is_named_for_qemu_s_user(tmp_path) -> None:
    import os

    from orchestrator.preflight import unreachable_by

    if os.geteuid() != 0:
        pytest.skip("needs root to give a folder to another user")
    # Judged for root (uid 0) with no groups: the folders above tmp_path are root's and searchable
    # by their owner; `top` belongs to nobody, so only its "other" bits speak for root here.
    nobody, nogroup = 65534, 65534
    top = tmp_path / "work"
    (top / "study").mkdir(parents=True)
    os.chown(top, nobody, nogroup)
    top.chmod(0o700)
    assert unreachable_by(top / "study" / "not-yet", 0, set()) == top
    top.chmod(0o711)  # search without listing is enough
    assert unreachable_by(top / "study" / "not-yet", 0, set()) is None
    top.chmod(0o750)
    assert unreachable_by(top / "study", 0, set()) == top
    assert unreachable_by(top / "study", 0, {nogroup}) is None  # through its group


def _vm_plan(guests: str) -> str:
    return (
        '[study]\nname = "b"\n[workload]\ntype = "idle"\n[guests]\ncount = 1\nmemory_mib = 512\n'
        f"{guests}\n[sweep.ksm]\npages_to_scan = [100]\n"
    )


def test_guest_memory_that_ksm_can_never_merge_is_refused_naming_the_key(tmp_path):
    from orchestrator.guests.domains import DEFAULT_TEMPLATE
    from orchestrator.plan import expand, parse_plan
    from orchestrator.preflight import memory_backing_checks

    (ok,) = memory_backing_checks(expand(parse_plan(_vm_plan(""))))
    assert ok.ok and ok.name == "guest RAM mergeable backing"
    (opted_out,) = memory_backing_checks(expand(parse_plan(_vm_plan("nosharepages = true"))))
    assert opted_out.ok  # <nosharepages/> is the on/off control, not a backing that never merges
    (huge,) = memory_backing_checks(expand(parse_plan(_vm_plan("hugepages = true"))))
    assert not huge.ok and huge.blocking
    assert huge.detail.startswith("[guests] hugepages = true (hugetlbfs): KSM never merges that memory")
    template = tmp_path / "memfd.xml.j2"
    template.write_text(
        DEFAULT_TEMPLATE.read_text().replace(
            "<vcpu placement='static'>",
            "<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>\n  <vcpu placement='static'>",
        )
    )
    (memfd,) = memory_backing_checks(expand(parse_plan(_vm_plan(f'template = "{template}"'))))
    assert not memfd.ok
    assert f"[guests] template = '{template}' renders <source type='memfd'/> <access mode='shared'/>" in memfd.detail
    # a processes plan has no guests: no row
    assert memory_backing_checks(expand(parse_plan('[study]\nname = "p"\n[workload]\ntype = "processes"\n'))) == []


def test_check_shows_the_refused_backing(tmp_path):
    plan = tmp_path / "huge.toml"
    plan.write_text(_vm_plan("hugepages = true"))
    results = {r.name: r for r in run_checks(plan)}
    assert not results["guest RAM mergeable backing"].ok and not ready(list(results.values()))


def test_a_dev_kvm_qemu_s_user_cannot_open_is_a_warning_row(tmp_path):
    """A crafted /dev/kvm (a file with the device's owner and mode) and qemu.conf: the row warns
    when QEMU's user may not open it read-write, and never blocks (TCG guests do not need it)."""
    import os

    from orchestrator.preflight import kvm_access_check, qemu_user

    if os.geteuid() != 0:
        pytest.skip("needs root to give a file to root:root")
    conf = tmp_path / "qemu.conf"
    assert kvm_access_check(tmp_path, conf) is None  # no /dev/kvm: the kvm row speaks for it
    kvm = tmp_path / "dev" / "kvm"
    kvm.parent.mkdir()
    kvm.write_text("")
    os.chown(kvm, 0, 0)
    kvm.chmod(0o600)
    conf.write_text('# user = "root"\nuser = "nobody"\n')
    row = kvm_access_check(tmp_path, conf)
    assert row is not None and not row.ok and not row.blocking and row.name == "/dev/kvm usable by nobody"
    assert f"{kvm} is 600 root:root: QEMU runs as nobody" in row.detail and 'domain_type = "qemu"' in row.detail
    os.chown(kvm, 0, 65534)
    kvm.chmod(0o660)
    assert kvm_access_check(tmp_path, conf).ok  # through nobody's own group
    conf.write_text('user = "nobody"\ngroup = "root"\n')
    assert not kvm_access_check(tmp_path, conf).ok  # QEMU runs with group root, not nobody's nogroup
    kvm.chmod(0o640)
    conf.write_text('user = "nobody"\n')
    assert not kvm_access_check(tmp_path, conf).ok  # read-only for the group is not enough
    kvm.chmod(0o606)  # group nogroup (nobody's) may not, though others may: the group class decides
    assert not kvm_access_check(tmp_path, conf).ok
    os.chown(kvm, 0, 0)
    assert kvm_access_check(tmp_path, conf).ok and "606 root:root" in kvm_access_check(tmp_path, conf).detail
    kvm.chmod(0o600)
    conf.write_text('user = "root"\n')
    assert kvm_access_check(tmp_path, conf).ok
    # `check` shows it among the VM rows, for the host's own qemu.conf (libvirt's default user here)
    rows = {r.name: r for r in run_checks(None, root=tmp_path)}
    row = rows[f"/dev/kvm usable by {qemu_user()}"]
    assert row.ok == (qemu_user() == "root") and not row.blocking
