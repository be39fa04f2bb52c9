"""Host readiness: KVM decision, checks, and host-setup.sh's own steps."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from orchestrator import hostsetup
from orchestrator.hostsetup import SETUP_SCRIPT, check_host
from orchestrator.kvm import choose_domain_type, kvm_status

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


def test_setup_leaves_qemu_conf_to_libvirt_and_warns_about_a_root_one(tmp_path: Path) -> None:
    conf = tmp_path / "qemu.conf"
    stock = '# stock file\n#user = "root"\nvnc_listen = "0.0.0.0"\n'
    conf.write_text(stock)
    env = {"KSM_LAB_QEMU_CONF": str(conf)}
    result = _source_and_call("if restore_qemu_conf; then echo rc=0; else echo rc=1; fi; warn_root_guests", env)
    assert "rc=1" in result.stdout and "warning" not in result.stdout  # nothing to undo, nothing said
    assert conf.read_text() == stock and sorted(p.name for p in tmp_path.iterdir()) == ["qemu.conf"]
    # The host's own file runs QEMU as root: kept as the host has it, and said.
    conf.write_text('user = "root"\n')
    result = _source_and_call("restore_qemu_conf || true; warn_root_guests", env)
    assert "runs QEMU as root" in result.stdout and conf.read_text() == 'user = "root"\n'


def test_the_root_block_an_earlier_version_wrote_is_removed_and_its_edits_undone(tmp_path: Path) -> None:
    conf = tmp_path / "qemu.conf"
    conf.write_text('# stock\n# (ksm-lab) user = "libvirt-qemu"\n'
                    '# >>> ksm-lab (host-setup.sh): run guests as root, no security driver\n'
                    'user = "root"\ngroup = "root"\nsecurity_driver = "none"\n# <<< ksm-lab\nvnc_tls = 0\n')
    result = _source_and_call("restore_qemu_conf", {"KSM_LAB_QEMU_CONF": str(conf)})
    assert result.returncode == 0, result.stderr
    assert conf.read_text() == '# stock\nuser = "libvirt-qemu"\nvnc_tls = 0\n'


def test_the_original_an_earlier_version_replaced_is_put_back(tmp_path: Path) -> None:
    conf = tmp_path / "qemu.conf"
    backup = tmp_path / "qemu.conf.ksm-lab-backup"
    backup.write_text('user = "libvirt-qemu"\n')
    conf.write_text('# >>> ksm-lab\nuser = "root"\n# <<< ksm-lab\n')
    (tmp_path / "replaced").write_text(f"{backup}\n")
    env = {"KSM_LAB_QEMU_CONF": str(conf)}
    assert _source_and_call("restore_qemu_conf", env).returncode == 0
    assert conf.read_text() == 'user = "libvirt-qemu"\n'
    assert not backup.exists() and not (tmp_path / "replaced").exists()
    # There was none before: removed.
    conf.write_text('# >>> ksm-lab\nuser = "root"\n# <<< ksm-lab\n')
    (tmp_path / "replaced").write_text("absent\n")
    assert _source_and_call("restore_qemu_conf", env).returncode == 0
    assert not conf.exists()


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
        assert "started" not in second, second
        # Guests run as libvirt-qemu with libvirt's defaults: the file is never written (an
        # earlier ksm-lab's root block would be removed, and said).
        if "earlier ksm-lab" not in first:
            assert (qemu_conf.read_bytes() if qemu_conf.exists() else None) == before
    finally:
        if not was_up:
            hostsetup.setup_host(stop=True)
    assert _libvirt_answers() == was_up
