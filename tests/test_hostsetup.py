"""Host readiness: KVM decision, checks, and host-setup.sh's own steps."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from orchestrator.guests import hostsetup
from orchestrator.guests.hostsetup import SETUP_SCRIPT, check_host
from orchestrator.guests.kvm import choose_domain_type, kvm_status

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="host-setup.sh runs as root")


def _fake_host(tmp_path: Path, flags: str, dev_kvm: bool) -> Path:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/cpuinfo").write_text(
        f"processor\t: 0\nflags\t\t: fpu vme {flags} sse2\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    if dev_kvm:
        (tmp_path / "dev").mkdir()
        (tmp_path / "dev/kvm").touch()
    return tmp_path


def test_this_host_decides_from_cpu_flags_and_dev_kvm() -> None:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    has_virt = " vmx" in cpuinfo or " svm" in cpuinfo
    usable = has_virt and os.access("/dev/kvm", os.R_OK | os.W_OK)
    assert choose_domain_type("auto") == ("kvm" if usable else "qemu")
    if not has_virt and Path("/dev/kvm").exists():  # a nested/software KVM host
        assert kvm_status() == (False, "no: /dev/kvm present but CPU has no vmx/svm "
                                       "(nested/software KVM) -> use TCG")


@pytest.mark.parametrize(("flags", "dev_kvm", "expected", "reason"), [
    ("vmx", True, "kvm", "CPU has vmx"),
    ("svm", True, "kvm", "CPU has svm"),
    ("", True, "qemu", "no vmx/svm (nested/software KVM)"),
    ("vmx", False, "qemu", "/dev/kvm is missing"),
    ("", False, "qemu", "no /dev/kvm"),
])
def test_domain_type_from_flags_and_device(tmp_path: Path, flags: str, dev_kvm: bool,
                                           expected: str, reason: str) -> None:
    root = _fake_host(tmp_path, flags, dev_kvm)
    assert choose_domain_type("auto", root) == expected
    assert reason in kvm_status(root)[1]


def test_a_plan_without_vms_needs_no_host_checks() -> None:
    assert check_host(plan_needs_vms=False) == []


def test_checks_for_vm_plans_name_what_is_missing(tmp_path: Path) -> None:
    results = {r.name: r for r in check_host(plan_needs_vms=True, image_cache_dir=tmp_path)}
    assert set(results) == {"libvirt", "kvm", "tools", "image", "image cache room"}
    # An empty cache has no image, and says how to build one.
    assert not results["image"].ok
    assert "image build" in results["image"].detail
    assert results["image cache room"].detail.endswith("(need 4)")
    assert results["kvm"].blocking is False
    assert results["kvm"].detail == kvm_status()[1]
    virsh = subprocess.run(["virsh", "-c", "qemu:///system", "version"], capture_output=True)
    assert results["libvirt"].ok == (virsh.returncode == 0), results["libvirt"].detail


def test_cache_room_is_measured_on_the_nearest_existing_folder(tmp_path: Path) -> None:
    results = {r.name: r for r in check_host(True, image_cache_dir=tmp_path / "not" / "yet")}
    assert f"free at {tmp_path} " in results["image cache room"].detail


def _source_and_call(call: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # Never the host's own record of a replaced qemu.conf: a scratch one beside the test's file.
    conf = Path(env.get("KSM_LAB_QEMU_CONF", "/nonexistent/qemu.conf"))
    env = {"KSM_LAB_QEMU_CONF_RECORD": str(conf.parent / "replaced"), **env}
    return subprocess.run(["bash", "-c", f'source "{SETUP_SCRIPT}"; {call}'],
                          capture_output=True, text=True, env={**os.environ, **env}, timeout=60)


def test_qemu_conf_is_edited_once_with_a_backup(tmp_path: Path) -> None:
    conf = tmp_path / "qemu.conf"
    original = '# stock file\n#user = "root"\nuser = "libvirt-qemu"\nvnc_listen = "0.0.0.0"\n'
    conf.write_text(original)
    env = {"KSM_LAB_QEMU_CONF": str(conf)}
    first = _source_and_call("configure_qemu_conf", env)
    assert first.returncode == 0, first.stderr
    edited = conf.read_text()
    assert (tmp_path / "qemu.conf.ksm-lab-backup").read_text() == original
    assert '# (ksm-lab) user = "libvirt-qemu"' in edited
    assert 'vnc_listen = "0.0.0.0"' in edited
    assert edited.count('user = "root"\n') == 2  # the stock comment and our block
    assert 'security_driver = "none"' in edited
    second = _source_and_call("configure_qemu_conf", env)
    assert second.returncode == 1  # nothing to change
    assert "already runs guests as root" in second.stdout
    assert conf.read_text() == edited


def test_a_block_written_by_an_earlier_version_is_replaced_not_doubled(tmp_path: Path) -> None:
    conf = tmp_path / "qemu.conf"
    conf.write_text('# stock\n# >>> ksm-lab (scripts/host-setup.sh): run guests as root, no security driver\n'
                    'user = "root"\ngroup = "root"\n# <<< ksm-lab\n')
    result = _source_and_call("configure_qemu_conf", {"KSM_LAB_QEMU_CONF": str(conf)})
    assert result.returncode == 0, result.stderr
    edited = conf.read_text()
    assert edited.count("# >>> ksm-lab") == 1 and "scripts/host-setup.sh" not in edited
    assert edited.startswith("# stock\n") and 'security_driver = "none"' in edited


def test_stop_puts_back_the_qemu_conf_it_replaced(tmp_path: Path) -> None:
    conf = tmp_path / "qemu.conf"
    conf.write_text('user = "libvirt-qemu"\n')
    env = {"KSM_LAB_QEMU_CONF": str(conf)}
    assert _source_and_call("configure_qemu_conf", env).returncode == 0
    assert 'security_driver = "none"' in conf.read_text()
    result = _source_and_call("restore_qemu_conf", env)
    assert result.returncode == 0, result.stderr
    assert conf.read_text() == 'user = "libvirt-qemu"\n'
    assert not (tmp_path / "replaced").exists() and not (tmp_path / "qemu.conf.ksm-lab-backup").exists()
    # Created from nothing: removed again.
    conf.unlink()
    assert _source_and_call("configure_qemu_conf", env).returncode == 0
    _source_and_call("restore_qemu_conf", env)
    assert not conf.exists()


def test_a_host_with_its_own_libvirt_keeps_its_qemu_conf(tmp_path: Path) -> None:
    """A libvirtd answering that this script did not start (empty record of started daemons):
    the host set libvirt up its own way, and its security set-up is not ours to change."""
    if subprocess.run(["virsh", "-c", "qemu:///system", "version"], capture_output=True).returncode != 0:
        pytest.skip("needs a libvirtd answering at qemu:///system")
    conf = tmp_path / "qemu.conf"
    conf.write_text('user = "libvirt-qemu"\nsecurity_driver = "apparmor"\n')
    state = tmp_path / "state"
    state.mkdir()
    result = _source_and_call("configure_qemu_conf", {"KSM_LAB_QEMU_CONF": str(conf), "KSM_LAB_STATE_DIR": str(state)})
    assert result.returncode == 1 and "own libvirt set-up" in result.stdout
    assert conf.read_text() == 'user = "libvirt-qemu"\nsecurity_driver = "apparmor"\n'


def test_qemu_conf_is_created_when_absent(tmp_path: Path) -> None:
    conf = tmp_path / "libvirt" / "qemu.conf"
    result = _source_and_call("configure_qemu_conf", {"KSM_LAB_QEMU_CONF": str(conf)})
    assert result.returncode == 0, result.stderr
    assert 'group = "root"' in conf.read_text()
    assert not (conf.parent / "qemu.conf.ksm-lab-backup").exists()


@needs_root
def test_stop_kills_only_recorded_pids_running_the_recorded_binary(tmp_path: Path) -> None:
    ours = subprocess.Popen(["sleep", "60"])
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        # A stale entry, one of ours, and one whose PID now runs a different binary.
        (tmp_path / "host-daemons").write_text(
            f"sleep 4194999\nsleep {ours.pid}\nvirtlogd {bystander.pid}\n")
        result = subprocess.run([str(SETUP_SCRIPT), "--stop"], capture_output=True, text=True,
                                env={**os.environ, "KSM_LAB_STATE_DIR": str(tmp_path)}, timeout=60)
        assert result.returncode == 0, result.stderr
        assert ours.wait(timeout=10) is not None
        assert bystander.poll() is None
        assert f"stopped sleep (pid {ours.pid})" in result.stdout
        assert f"virtlogd (pid {bystander.pid}) already gone" in result.stdout
        assert not (tmp_path / "host-daemons").exists()
    finally:
        for proc in (ours, bystander):
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def _libvirt_answers() -> bool:
    return subprocess.run(["virsh", "-c", "qemu:///system", "version"], capture_output=True,
                          timeout=30).returncode == 0


@needs_root
def test_setup_reaches_libvirt_and_a_second_run_changes_nothing() -> None:
    """The real script. Daemons it starts here are stopped again, so the host stays as found."""
    was_up = _libvirt_answers()
    qemu_conf = Path("/etc/libvirt/qemu.conf")
    before = qemu_conf.read_bytes() if qemu_conf.exists() else None
    try:
        first = hostsetup.setup_host()
        assert "libvirt answers at qemu:///system" in first
        assert ("started" in first) != was_up, first
        # A daemon that inherited the script's lock fd would block every later set-up.
        for pidfile in ("/run/libvirtd.pid", "/run/virtlogd.pid"):
            pid = Path(pidfile).read_text().strip()
            fds = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
            assert not [f for f in fds if f.endswith("host-setup.lock")], (pidfile, fds)
        second = hostsetup.setup_host()
        assert "packages: all" in second and "present" in second
        assert "qemu.conf: already runs guests as root" in second
        assert "started" not in second, second
        if before is not None and "qemu.conf: set" not in first:
            assert qemu_conf.read_bytes() == before
    finally:
        if not was_up:
            hostsetup.setup_host(stop=True)
    assert _libvirt_answers() == was_up
