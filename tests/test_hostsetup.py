"""Host readiness: KVM decision, checks, and host-setup.sh's own steps."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from orchestrator.guests import hostsetup
from orchestrator.guests.hostsetup import SETUP_SCRIPT, check_host
from orchestrator.guests.kvm import choose_domain_type, kvm_status

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="host-setup.sh runs as root")


def _fake_host(tmp_path: Path, flags: str, dev_kvm: bool) -> Path:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/cpuinfo").write_text(
        f"processor\t: 0\nflags\t\t: fpu vme {flags} sse2\n\nprocessor\t: 1\nflags\t\t: fpu\n"
    )
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
        assert kvm_status() == (False, "no: /dev/kvm present but CPU has no vmx/svm (nested/software KVM) -> use TCG")


@pytest.mark.parametrize(
    ("flags", "dev_kvm", "expected", "reason"),
    [
        ("vmx", True, "kvm", "CPU has vmx"),
        ("svm", True, "kvm", "CPU has svm"),
        ("", True, "qemu", "no vmx/svm (nested/software KVM)"),
        ("vmx", False, "qemu", "/dev/kvm is missing"),
        ("", False, "qemu", "no /dev/kvm"),
    ],
)
def test_domain_type_from_flags_and_device(
    tmp_path: Path, flags: str, dev_kvm: bool, expected: str, reason: str
) -> None:
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
    return subprocess.run(
        ["bash", "-c", f'source "{SETUP_SCRIPT}"; {call}'],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=60,
    )


ROOT_BLOCK = (
    "# >>> ksm-lab (host-setup.sh): run guests as root, no security driver\n"
    'user = "root"\ngroup = "root"\nsecurity_driver = "none"\n# <<< ksm-lab\n'
)


def test_a_bare_host_gets_no_qemu_conf_guests_run_as_libvirt_qemu(tmp_path: Path) -> None:
    """libvirt's defaults are what we want (QEMU as libvirt-qemu, DAC, dynamic ownership):
    set-up writes nothing, and never root or security_driver "none"."""
    conf = tmp_path / "libvirt" / "qemu.conf"
    result = _source_and_call("configure_qemu_conf", {"KSM_LAB_QEMU_CONF": str(conf)})
    assert result.returncode == 1 and "libvirt's defaults" in result.stdout
    assert not conf.exists()
    conf.parent.mkdir()
    conf.write_text('# stock file\nvnc_listen = "0.0.0.0"\n')
    assert _source_and_call("configure_qemu_conf", {"KSM_LAB_QEMU_CONF": str(conf)}).returncode == 1
    assert conf.read_text() == '# stock file\nvnc_listen = "0.0.0.0"\n'


def test_an_earlier_root_block_is_taken_out_with_its_recorded_original(tmp_path: Path) -> None:
    """What earlier versions did (QEMU as root, no security driver) is undone: the original they
    recorded comes back (here: there was none, so the file goes), and qemu.conf 'changed'."""
    conf = tmp_path / "qemu.conf"
    conf.write_text(ROOT_BLOCK)
    (tmp_path / "replaced").write_text("absent\n")
    result = _source_and_call("configure_qemu_conf", {"KSM_LAB_QEMU_CONF": str(conf)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert not conf.exists() and not (tmp_path / "replaced").exists()
    # A recorded backup of the host's own file: that file, byte for byte.
    conf.write_text('# stock\n# (ksm-lab) user = "qemu"\n' + ROOT_BLOCK)
    backup = tmp_path / "qemu.conf.ksm-lab-backup"
    backup.write_text('# stock\nuser = "qemu"\n')
    (tmp_path / "replaced").write_text(f"{backup}\n")
    assert _source_and_call("configure_qemu_conf", {"KSM_LAB_QEMU_CONF": str(conf)}).returncode == 0
    assert conf.read_text() == '# stock\nuser = "qemu"\n' and not backup.exists()


def test_an_earlier_root_block_without_a_record_is_cut_out(tmp_path: Path) -> None:
    conf = tmp_path / "qemu.conf"
    conf.write_text('# stock\n# (ksm-lab) security_driver = "apparmor"\n' + ROOT_BLOCK + "max_files = 4096\n")
    result = _source_and_call("configure_qemu_conf", {"KSM_LAB_QEMU_CONF": str(conf)})
    assert result.returncode == 0 and "removed the block" in result.stdout, result.stdout + result.stderr
    assert conf.read_text() == '# stock\nsecurity_driver = "apparmor"\nmax_files = 4096\n'
    assert _source_and_call("configure_qemu_conf", {"KSM_LAB_QEMU_CONF": str(conf)}).returncode == 1


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


@needs_root
def test_a_kvm_device_only_root_can_open_is_given_to_group_kvm_and_put_back(tmp_path: Path) -> None:
    """/dev/kvm 0600 root (no udev): libvirt re-probes QEMU at every capabilities look-up when its
    QEMU user cannot open it. Set-up gives it to group kvm with libvirt-qemu in it; --stop's
    restore puts back the mode, group, group membership and group exactly as they were."""
    import grp
    import shutil
    import stat
    import tempfile

    if subprocess.run(["getent", "passwd", "libvirt-qemu"], capture_output=True).returncode != 0:
        pytest.skip("needs the libvirt-qemu user (make host)")
    # Where libvirt-qemu can reach it (pytest's tmp folders are 0700): a 0711 folder in /tmp.
    reachable = Path(tempfile.mkdtemp(prefix="ksmlab-kvm-", dir="/tmp"))
    reachable.chmod(0o711)
    device = reachable / "kvm"
    os.mknod(device, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # a char device like /dev/kvm
    os.chown(device, 0, 0)
    groups_before = subprocess.run(["id", "-nG", "libvirt-qemu"], capture_output=True, text=True).stdout.split()
    kvm_before = [g.gr_name for g in grp.getgrall() if g.gr_name == "kvm"]
    env = {"KSM_LAB_KVM_DEVICE": str(device), "KSM_LAB_KVM_RECORD": str(tmp_path / "kvm-record")}
    try:
        opened = _source_and_call("open_kvm_to_qemu_user", env)
        assert opened.returncode == 0, opened.stdout + opened.stderr
        st = device.stat()
        assert (stat.S_IMODE(st.st_mode), grp.getgrgid(st.st_gid).gr_name) == (0o660, "kvm")
        assert (
            subprocess.run(
                ["runuser", "-u", "libvirt-qemu", "--", "test", "-r", str(device), "-a", "-w", str(device)]
            ).returncode
            == 0
        )
        again = _source_and_call("open_kvm_to_qemu_user", env)
        assert "can open it" in again.stdout  # a second run changes nothing
    finally:
        restored = _source_and_call("restore_kvm_device", env)
        st = device.stat()
        shutil.rmtree(reachable)
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o600, 0)
    assert subprocess.run(["id", "-nG", "libvirt-qemu"], capture_output=True, text=True).stdout.split() == groups_before
    assert [g.gr_name for g in grp.getgrall() if g.gr_name == "kvm"] == kvm_before
    assert not (tmp_path / "kvm-record").exists()


def _lock_held_after_a_child_outlives_us(tmp_path: Path, start_child: str) -> bool:
    """Take a flock, hand its descriptor to bash, let bash start `sleep` with `start_child`
    before it, close our own copy: is the lock still held (by the child)?"""
    import fcntl

    lock = tmp_path / "run.lock"
    with lock.open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        child = subprocess.run(
            ["bash", "-c", f'source "{SETUP_SCRIPT}"; ({start_child} exec sleep 30) >/dev/null 2>&1 & echo $!'],
            capture_output=True,
            text=True,
            pass_fds=(held.fileno(),),
            timeout=30,
        )
    pid = int(child.stdout.split()[-1])
    # The subshell runs start_child and then execs sleep in the background: judge the lock only
    # once sleep runs (bounded), or a loaded host reads it before the descriptors were closed.
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}/comm").read_text().strip() != "sleep":
        assert time.monotonic() < deadline, "the child never reached exec sleep"
        time.sleep(0.01)
    try:
        with lock.open("w") as other:
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            return False
    finally:
        os.kill(pid, 9)


def test_a_started_daemon_inherits_no_lock_of_its_caller(tmp_path: Path) -> None:
    """`flock LOCK make demo` ran `make host`: a daemon that inherited the flock's descriptor
    held the shared run lock for as long as it lived, and every later flock waited forever."""
    assert _lock_held_after_a_child_outlives_us(tmp_path, "")  # what an inherited descriptor does
    assert not _lock_held_after_a_child_outlives_us(tmp_path, "close_inherited_fds;")
    assert "close_inherited_fds" in SETUP_SCRIPT.read_text().split("start_daemon() {")[1]


@needs_root
def test_stop_kills_only_recorded_pids_running_the_recorded_binary(tmp_path: Path) -> None:
    ours = subprocess.Popen(["sleep", "60"])
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        # A stale entry, one of ours, and one whose PID now runs a different binary.
        (tmp_path / "host-daemons").write_text(f"sleep 4194999\nsleep {ours.pid}\nvirtlogd {bystander.pid}\n")
        result = subprocess.run(
            [str(SETUP_SCRIPT), "--stop"],
            capture_output=True,
            text=True,
            env={**os.environ, "KSM_LAB_STATE_DIR": str(tmp_path)},
            timeout=60,
        )
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
    return subprocess.run(["virsh", "-c", "qemu:///system", "version"], capture_output=True, timeout=30).returncode == 0


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
        assert "qemu.conf: libvirt's defaults" in second
        assert "started" not in second, second
        if before is not None and "qemu.conf: set" not in first:
            assert qemu_conf.read_bytes() == before
    finally:
        if not was_up:
            hostsetup.setup_host(stop=True)
    assert _libvirt_answers() == was_up
