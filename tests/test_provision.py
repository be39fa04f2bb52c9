"""Provisioning on libvirt's test:///default driver (real libvirt, real qcow2 overlays), plus
`vm` tests that boot real TCG guests through qemu:///system."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pytest

from orchestrator.guests.domains import METADATA_NS
from orchestrator.errors import GuestBootError, HostError, HostUnresponsive, ProvisionError
from orchestrator.guests.libvirtconn import unwatch_close, unwatch_lifecycle
from orchestrator.guests.cleanup import cleanup
from orchestrator.guests.hostmemory import MemoryMargin, check_memory_fits
from orchestrator.guests.ports import PortRegistry
from orchestrator.preflight import qemu_user
from orchestrator.guests.provision import (
    Guest,
    GuestRequest,
    GuestSet,
    GuestSetOptions,
    choose_domain_type,
    create_overlay,
    find_qemu_pid,
)

TEST_URI = "test:///default"
NASTY = "s&<>'\""


@dataclass(frozen=True)
class FakeImage:
    """The fields of images.ImageRef that provisioning reads."""

    disk_path: Path
    disk_format: str = "qcow2"
    kernel_path: Path | None = None
    initrd_path: Path | None = None
    cmdline: str | None = None


@pytest.fixture
def pristine_conn():
    # test:///default keeps its state only while a connection is open: hold one for the test,
    # so every test starts from the driver's pristine state (one domain, "test").
    conn = libvirt.open(TEST_URI)
    yield conn
    conn.close()


@pytest.fixture
def image(tmp_path: Path) -> FakeImage:
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "4M"], check=True)
    return FakeImage(disk_path=base, kernel_path=tmp_path / "vmlinuz", cmdline="console=ttyS0")


@pytest.fixture
def options(tmp_path: Path) -> GuestSetOptions:
    return GuestSetOptions(
        domain_type="test", arch="i686", work_root=tmp_path / "work", port_state_dir=tmp_path / "run"
    )


def names(conn: libvirt.virConnect) -> set[str]:
    return {dom.name() for dom in conn.listAllDomains(0)}


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def qemu_img_info(path: Path) -> dict:
    out = subprocess.run(["qemu-img", "info", "--output=json", str(path)], capture_output=True, check=True)
    return json.loads(out.stdout)


# --- GuestSet on the test driver -----------------------------------------------------------


def test_guest_set_defines_starts_and_tears_down_everything(pristine_conn, image, options, tmp_path) -> None:
    requests = [GuestRequest(memory_mib=256), GuestRequest(memory_mib=256, nosharepages=True)]
    with GuestSet(TEST_URI, "idle", requests, image, options) as guests:
        assert [g.name for g in guests.guests] == ["ksmlab-idle-0", "ksmlab-idle-1"]
        assert names(pristine_conn) == {"test", "ksmlab-idle-0", "ksmlab-idle-1"}
        for guest in guests.guests:
            dom = pristine_conn.lookupByName(guest.name)
            assert dom.isActive() and dom.UUIDString() == guest.uuid
            assert guest.ssh_host == "127.0.0.1" and guest.ssh_port > 0
            info = qemu_img_info(guest.overlay_path)
            assert info["format"] == "qcow2"
            assert info["backing-filename"] == str(image.disk_path)  # absolute
            meta = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS)
            assert str(guest.overlay_path) in meta and "<study>idle</study>" in meta
        assert "<nosharepages/>" in pristine_conn.lookupByName("ksmlab-idle-1").XMLDesc()
        ports = {g.ssh_port for g in guests.guests}
        assert len(ports) == 2 and set(guests.ports.held()) == ports
    assert names(pristine_conn) == {"test"}
    assert files_under(tmp_path / "work") == []
    assert PortRegistry(tmp_path / "run").held() == {}


def test_a_dropped_libvirt_connection_is_the_host_not_a_lost_guest(pristine_conn, image, options, tmp_path) -> None:
    """libvirt dropping our connection (keepalive: libvirtd stopped) fails the trial as the host's
    problem, with what to do; teardown then reconnects once and removes everything."""
    with GuestSet(TEST_URI, "drop", [GuestRequest(memory_mib=128)], image, options) as guests:
        guests.watch()
        guests.raise_if_lost()  # all well
        guests._on_connection_lost("no keepalive answer for 15 s: libvirtd is stopped or wedged")
        with pytest.raises(HostUnresponsive, match="stopped answering .no keepalive answer") as caught:
            guests.raise_if_lost()
        assert "ksmlab-drop-0" in str(caught.value) and "cleanup --study drop" in caught.value.advice
        # What libvirt did to it; the teardown must open a new one. (Registrations left on a
        # closed connection would keep the test driver's state for the next tests.)
        unwatch_close(guests._conn)
        unwatch_lifecycle(guests._conn, guests._event_id)
        guests._conn.close()
    assert names(pristine_conn) == {"test"}
    assert files_under(tmp_path / "work") == []


def test_libvirt_dropping_the_connection_while_guests_start_is_the_host(
    pristine_conn, image, options, tmp_path, monkeypatch
) -> None:
    """libvirtd stopped while a guest is defined, started or restored: keepalive drops the
    connection and the call fails. That is HostUnresponsive (the sweep ends the study with what
    to do), not "a guest failed to start" (every later trial would wait on the dead daemon);
    the teardown still removes what was made."""
    real = GuestSet._bring_up

    def bring_up_then_lose(self, slot, lib_version):
        real(self, slot, lib_version)
        self._on_connection_lost("no keepalive answer for 15 s: libvirtd is stopped or wedged")
        raise libvirt.libvirtError("internal error: connection closed due to keepalive timeout")

    monkeypatch.setattr(GuestSet, "_bring_up", bring_up_then_lose)
    with pytest.raises(
        HostUnresponsive, match=r"starting guests \(1 of 1 guests failed to start: .*keepalive"
    ) as caught:
        GuestSet(TEST_URI, "gone", [GuestRequest(memory_mib=128)], image, options).__enter__()
    assert "stopped answering (no keepalive answer for 15 s" in str(caught.value)
    assert "cleanup --study gone" in caught.value.advice
    assert names(pristine_conn) == {"test"}
    assert files_under(tmp_path / "work") == []
    monkeypatch.setattr(
        GuestSet, "_bring_up", lambda self, slot, v: (_ for _ in ()).throw(libvirt.libvirtError("define refused"))
    )
    with pytest.raises(ProvisionError) as plain:  # a connection that still answers: a guest's failure
        GuestSet(TEST_URI, "gone", [GuestRequest(memory_mib=128)], image, options).__enter__()
    assert not isinstance(plain.value, HostUnresponsive)


def test_study_name_with_xml_special_characters(pristine_conn, image, options, tmp_path) -> None:
    with GuestSet(TEST_URI, NASTY, [GuestRequest(memory_mib=128)], image, options) as guests:
        assert names(pristine_conn) == {"test", f"ksmlab-{NASTY}-0"}
        assert guests.guests[0].overlay_path.is_file()
        assert cleanup(TEST_URI, study="other") == []
    assert names(pristine_conn) == {"test"}
    assert files_under(tmp_path / "work") == []


def test_failure_midway_leaves_nothing_and_spares_the_squatter(pristine_conn, image, options, tmp_path) -> None:
    # Someone else's domain already has the name our guest 1 wants: its define fails.
    squatter = pristine_conn.defineXML(
        "<domain type='test'><name>ksmlab-clash-1</name><memory>131072</memory>"
        "<os><type arch='i686'>hvm</type></os></domain>"
    )
    requests = [GuestRequest(memory_mib=128) for _ in range(3)]
    with pytest.raises(ProvisionError, match="1 of 3 guests failed to start: ksmlab-clash-1"):
        with GuestSet(TEST_URI, "clash", requests, image, options):
            pytest.fail("entered a half-made guest set")
    assert names(pristine_conn) == {"test", "ksmlab-clash-1"}
    assert squatter.UUIDString() == pristine_conn.lookupByName("ksmlab-clash-1").UUIDString()
    assert files_under(tmp_path / "work") == []
    assert PortRegistry(tmp_path / "run").held() == {}


def test_missing_base_image_fails_after_define_and_is_undone(pristine_conn, options, tmp_path) -> None:
    image = FakeImage(disk_path=tmp_path / "absent.qcow2")
    with pytest.raises(ProvisionError, match="absent.qcow2 does not exist"):
        with GuestSet(TEST_URI, "nobase", [GuestRequest(memory_mib=128)] * 2, image, options):
            pass
    assert names(pristine_conn) == {"test"}
    assert not (tmp_path / "work" / "nobase").exists()


def test_teardown_is_idempotent_and_survives_outside_cleanup(pristine_conn, image, options, tmp_path) -> None:
    guests = GuestSet(TEST_URI, "twice", [GuestRequest(memory_mib=128)] * 2, image, options).__enter__()
    # Someone (the `cleanup` command) already removed one guest behind our back.
    pristine_conn.lookupByName("ksmlab-twice-0").destroy()
    guests.teardown()
    guests.teardown()
    guests.__exit__(None, None, None)
    assert names(pristine_conn) == {"test"}
    assert files_under(tmp_path / "work") == []


def test_guest_set_can_be_kept_across_trials(pristine_conn, image, options) -> None:
    with GuestSet(TEST_URI, "keep", [GuestRequest(memory_mib=128)] * 2, image, options) as guests:
        first = guests.guests
        for _trial in range(3):
            guests.wait_ready(lambda guest: None, timeout_s=5)
            assert guests.guests == first


def test_guest_set_can_be_exited_and_entered_again(pristine_conn, image, options, tmp_path) -> None:
    guest_set = GuestSet(TEST_URI, "reboot", [GuestRequest(memory_mib=128)], image, options)
    with guest_set:
        first_uuid = guest_set.guests[0].uuid
    with guest_set:
        assert guest_set.guests[0].uuid != first_uuid
        assert pristine_conn.lookupByName("ksmlab-reboot-0").isActive()
    assert names(pristine_conn) == {"test"}
    assert files_under(tmp_path / "work") == []


def test_second_interrupt_during_teardown_does_not_cut_it_short(pristine_conn, image, options, tmp_path) -> None:
    class SlowTeardown(GuestSet):
        def _teardown_slot(self, slot) -> None:
            if slot.index == 0:
                os.kill(os.getpid(), signal.SIGINT)  # the impatient second Ctrl-C
                time.sleep(0.1)
            super()._teardown_slot(slot)

    with pytest.raises(KeyboardInterrupt):
        with SlowTeardown(TEST_URI, "sigint", [GuestRequest(memory_mib=128)] * 3, image, options):
            pass
    assert names(pristine_conn) == {"test"}
    assert files_under(tmp_path / "work") == []
    assert PortRegistry(tmp_path / "run").held() == {}


def test_sigterm_handler_runs_after_the_teardown_not_during_it(pristine_conn, image, options) -> None:
    calls: list[set[str]] = []
    previous = signal.signal(signal.SIGTERM, lambda _n, _f: calls.append(names(pristine_conn)))

    class TermDuringTeardown(GuestSet):
        def _teardown_slot(self, slot) -> None:
            if slot.index == 0:
                signal.raise_signal(signal.SIGTERM)
            super()._teardown_slot(slot)

    try:
        with TermDuringTeardown(TEST_URI, "term", [GuestRequest(memory_mib=128)] * 2, image, options):
            pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert calls == [{"test"}]  # once, and only when our domains were already gone


def test_interrupt_in_body_still_tears_down(pristine_conn, image, options, tmp_path) -> None:
    with pytest.raises(KeyboardInterrupt):
        with GuestSet(TEST_URI, "ctrlc", [GuestRequest(memory_mib=128)], image, options):
            raise KeyboardInterrupt
    assert names(pristine_conn) == {"test"}
    assert files_under(tmp_path / "work") == []


# --- cleanup -----------------------------------------------------------------------------------


def _crafted_domain(conn: libvirt.virConnect, name: str, overlay: Path, console: Path) -> None:
    conn.defineXML(
        f"<domain type='test'><name>{name}</name><memory>131072</memory>"
        "<os><type arch='i686'>hvm</type></os>"
        f"<metadata><k:guest xmlns:k='{METADATA_NS}'><k:study>evil</k:study>"
        f"<k:overlay>{overlay}</k:overlay><k:console>{console}</k:console></k:guest></metadata></domain>"
    )


def test_cleanup_removes_only_files_named_like_ours(pristine_conn, tmp_path) -> None:
    # Metadata anyone with libvirt access can write names files outside our work: a domain
    # named like ours whose metadata points at a config file, a link and a folder.
    victim = tmp_path / "etc" / "important.conf"
    victim.parent.mkdir()
    victim.write_text("keep me")
    link = tmp_path / "w" / "evil-0-0123abcd.qcow2"
    link.parent.mkdir()
    link.symlink_to(victim)
    folder = tmp_path / "w" / "evil-1-0123abcd.console.log"
    folder.mkdir()
    ours = tmp_path / "w2" / "evil-2-89abcdef.qcow2"
    ours.parent.mkdir()
    ours.write_bytes(b"overlay")
    # Its console log as virtlogd leaves it: the log and two rotated copies; a third "copy" is a link.
    console = tmp_path / "w2" / "evil-2-89abcdef.console.log"
    for path in (console, console.with_name(console.name + ".0"), console.with_name(console.name + ".1")):
        path.write_text("boot")
    console.with_name(console.name + ".2").symlink_to(victim)
    _crafted_domain(pristine_conn, "ksmlab-evil-0", victim, tmp_path / "w" / "evil-0-0123abcd.console.log")
    _crafted_domain(pristine_conn, "ksmlab-evil-1", link, folder)
    _crafted_domain(pristine_conn, "ksmlab-evil-2", ours, console)

    assert sorted(cleanup(TEST_URI, study="evil")) == ["ksmlab-evil-0", "ksmlab-evil-1", "ksmlab-evil-2"]
    assert victim.read_text() == "keep me"
    assert link.is_symlink() and folder.is_dir()
    assert not ours.exists()  # named like ours, a regular file: removed, with its rotated logs
    assert [p.name for p in ours.parent.iterdir()] == [console.name + ".2"]  # the link stays


def test_a_job_whose_call_never_returns_is_given_up_with_what_was_done(monkeypatch) -> None:
    """The edge a real guest cannot show on demand: libvirt's call still hangs after the job was
    stopped (a wedged libvirtd). run_job returns at deadline + grace, saying so."""
    from orchestrator.guests import provision

    monkeypatch.setattr(provision, "STOP_JOB_GRACE_S", 0.5)
    never = threading.Event()
    started = time.monotonic()
    with pytest.raises(ProvisionError) as caught:
        provision.run_job("restore g0 from /s", never.wait, 0.2, lambda: ["destroy did not return within 15 s"])
    took_s = time.monotonic() - started
    assert str(caught.value) == (
        "restore g0 from /s did not finish within 0.2 s: destroy did not return within "
        "15 s; the restore call had not returned 0.5 s later"
    )
    assert took_s < 0.2 + 0.5 + 2
    never.set()


def test_cleanup_removes_only_our_domains(pristine_conn, image, options, tmp_path) -> None:
    # An unrelated domain, and one with our prefix but without our metadata: neither is ours.
    for name in ("someone-elses-vm", "ksmlab-handmade-0"):
        pristine_conn.defineXML(
            f"<domain type='test'><name>{name}</name><memory>131072</memory>"
            "<os><type arch='i686'>hvm</type></os></domain>"
        )
    # Two studies "crash": entered, never exited.
    alpha = GuestSet(TEST_URI, "alpha", [GuestRequest(memory_mib=128)] * 2, image, options).__enter__()
    beta = GuestSet(TEST_URI, "beta", [GuestRequest(memory_mib=128)], image, options).__enter__()
    alpha_files = [g.overlay_path for g in alpha.guests]
    assert all(p.is_file() for p in alpha_files)

    assert sorted(cleanup(TEST_URI, study="alpha")) == ["ksmlab-alpha-0", "ksmlab-alpha-1"]
    assert not any(p.exists() for p in alpha_files)
    assert beta.guests[0].overlay_path.is_file()
    assert cleanup(TEST_URI) == ["ksmlab-beta-0"]
    assert cleanup(TEST_URI) == []
    assert names(pristine_conn) == {"test", "someone-elses-vm", "ksmlab-handmade-0"}
    assert files_under(tmp_path / "work") == []
    for guest_set in (alpha, beta):
        guest_set.teardown()  # releases ports and the connection; nothing else left to do


# --- readiness ------------------------------------------------------------------------------------


def test_wait_ready_retries_until_connect_succeeds(pristine_conn, image, options) -> None:
    attempts: dict[str, int] = {}

    def flaky(guest: Guest) -> None:
        attempts[guest.name] = attempts.get(guest.name, 0) + 1
        if attempts[guest.name] < 3:
            raise ConnectionRefusedError("not yet")

    with GuestSet(TEST_URI, "flaky", [GuestRequest(memory_mib=128)] * 2, image, options) as guests:
        ready_s = guests.wait_ready(flaky, timeout_s=30)
    assert attempts == {"ksmlab-flaky-0": 3, "ksmlab-flaky-1": 3}
    assert set(ready_s) == set(attempts) and all(s > 0 for s in ready_s.values())


def test_wait_ready_timeout_carries_the_console_tail(pristine_conn, image, options) -> None:
    def never(guest: Guest) -> None:
        raise ConnectionRefusedError("refused")

    with GuestSet(TEST_URI, "slow", [GuestRequest(memory_mib=128)], image, options) as guests:
        # The test driver runs no QEMU; write what a guest's serial console would have said.
        guests.guests[0].console_log_path.write_text("".join(f"boot line {i}\n" for i in range(100)))
        started = time.monotonic()
        with pytest.raises(GuestBootError) as caught:
            guests.wait_ready(never, timeout_s=2)
        assert time.monotonic() - started < 15
    message = str(caught.value)
    assert "ksmlab-slow-0 not reachable" in message and "refused" in message
    assert "boot line 99" in caught.value.console_tail and "boot line 10\n" not in caught.value.console_tail


def test_wait_ready_gives_up_at_once_when_the_guest_died(pristine_conn, image, options) -> None:
    with GuestSet(TEST_URI, "died", [GuestRequest(memory_mib=128)], image, options) as guests:
        pristine_conn.lookupByName("ksmlab-died-0").destroy()
        started = time.monotonic()
        with pytest.raises(GuestBootError, match="no longer running"):
            guests.wait_ready(lambda guest: None, timeout_s=120)
        assert time.monotonic() - started < 10


def test_ports_are_unique_across_threads_and_released(tmp_path: Path) -> None:
    registry = PortRegistry(tmp_path)
    got: list[int] = []
    lock = threading.Lock()

    def grab() -> None:
        for _ in range(10):
            port = registry.allocate("t")
            with lock:
                got.append(port)

    threads = [threading.Thread(target=grab) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 80 and len(set(got)) == 80
    assert set(registry.held()) == set(got)
    for port in got:
        registry.release(port)
    assert registry.held() == {}


_HOLDER = """
import sys
from pathlib import Path
from orchestrator.guests.ports import PortRegistry
registry = PortRegistry(Path(sys.argv[1]))
print(" ".join(str(registry.allocate("holder")) for _ in range(30)), flush=True)
sys.stdin.read()
"""


def test_ports_are_unique_across_processes_and_dead_holders_are_pruned(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    holders = [
        subprocess.Popen(
            [sys.executable, "-c", _HOLDER, str(tmp_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(3)
    ]
    try:
        port_sets = [set(map(int, h.stdout.readline().split())) for h in holders]
        assert [len(s) for s in port_sets] == [30, 30, 30]
        assert len(set.union(*port_sets)) == 90
        assert set(PortRegistry(tmp_path).held()) == set.union(*port_sets)
    finally:
        for holder in holders:
            holder.kill()  # no release: like a SIGKILLed sweep
            holder.wait()
    assert PortRegistry(tmp_path).held() == {}


# --- overlays, memory, domain type, pids ---------------------------------------------------------


def test_overlay_records_an_absolute_backing_path_even_from_a_relative_base(tmp_path, monkeypatch) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "base.qcow2"), "1M"], check=True)
    (tmp_path / "overlays").mkdir()
    monkeypatch.chdir(tmp_path)
    create_overlay(Path("base.qcow2"), tmp_path / "overlays" / "o.qcow2")
    info = qemu_img_info(tmp_path / "overlays" / "o.qcow2")
    assert info["backing-filename"] == str(tmp_path / "base.qcow2")
    assert info["backing-filename-format"] == "qcow2"


def test_overlay_failure_is_a_provision_error(tmp_path: Path) -> None:
    (tmp_path / "base.qcow2").write_bytes(b"not an image")
    with pytest.raises(ProvisionError, match="qemu-img create .* failed"):
        create_overlay(tmp_path / "base.qcow2", tmp_path / "o.qcow2")


def _meminfo_root(tmp_path: Path, mem_available_kib: int) -> Path:
    (tmp_path / "proc").mkdir(exist_ok=True)
    (tmp_path / "proc" / "meminfo").write_text(
        f"MemTotal:       25165824 kB\nMemFree:        1000000 kB\nMemAvailable:   {mem_available_kib} kB\n"
    )
    return tmp_path


def test_memory_check_refuses_with_the_numbers(tmp_path: Path) -> None:
    root = _meminfo_root(tmp_path, 3 * 1024 * 1024)  # 3072 MiB available
    # 3 x 1024 = 3072 MiB; with 10% + 512 MiB -> 3892 MiB needed
    with pytest.raises(HostError) as caught:
        check_memory_fits(3, 1024, root=root)
    for number in ("3 guests x 1024 MiB", "3072 MiB need 3892 MiB", "10% + 512 MiB", "MemAvailable is 3072 MiB"):
        assert number in str(caught.value)
    assert check_memory_fits(2, 1024, root=root) == 3072 - (2253 + 512)
    assert check_memory_fits(3, 1024, MemoryMargin(fraction=0.0, fixed_mib=0), root=root) == 0


def test_memory_check_counts_hugepages_and_the_pinned_node(tmp_path: Path) -> None:
    root = _meminfo_root(tmp_path, 20 * 1024 * 1024)
    meminfo = root / "proc" / "meminfo"
    meminfo.write_text(meminfo.read_text() + "HugePages_Free:      512\nHugepagesize:       2048 kB\n")
    assert check_memory_fits(1, 1024, root=root, hugepages=True) == 20 * 1024  # 1 GiB of 2 MiB pages free
    with pytest.raises(HostError, match="free hugepages, but only 1024 MiB"):
        check_memory_fits(2, 1024, root=root, hugepages=True)
    node = root / "sys" / "devices" / "system" / "node" / "node1"
    node.mkdir(parents=True)
    node.joinpath("meminfo").write_text("Node 1 MemTotal:  4194304 kB\nNode 1 MemFree:   2097152 kB\n")
    with pytest.raises(HostError, match="node 1 MemFree is 2048 MiB"):
        check_memory_fits(2, 1024, root=root, numa_node=1)
    with pytest.raises(HostError, match="NUMA node 3"):
        check_memory_fits(1, 512, root=root, numa_node=3)


def test_memory_check_on_this_host_accepts_one_small_guest() -> None:
    assert check_memory_fits(1, 128) > 0


def test_auto_domain_type_needs_hardware_virtualisation(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "kvm").touch()
    (tmp_path / "proc" / "cpuinfo").write_text("processor\t: 0\nflags\t\t: fpu sse2 hypervisor\n")
    assert choose_domain_type("auto", tmp_path) == "qemu"  # /dev/kvm alone is a nested software KVM
    (tmp_path / "proc" / "cpuinfo").write_text("processor\t: 0\nflags\t\t: fpu vmx sse2\n")
    assert choose_domain_type("auto", tmp_path) == "kvm"
    assert choose_domain_type("qemu", tmp_path) == "qemu"
    with pytest.raises(ProvisionError):
        choose_domain_type("xen", tmp_path)


def test_qemu_pid_ignores_a_stale_pid_file_and_matches_the_uuid(tmp_path: Path) -> None:
    proc, run = tmp_path / "proc", tmp_path / "run"
    for pid, guest_uuid in ((100, "aaaa"), (200, "bbbb")):
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "cmdline").write_bytes(
            b"\0".join([b"/usr/bin/qemu-system-x86_64", b"-name", b"guest=x", b"-uuid", guest_uuid.encode(), b""])
        )
    run.mkdir()
    (run / "ksmlab-s-0.pid").write_text("100\n")
    assert find_qemu_pid("ksmlab-s-0", "aaaa", run, proc) == 100
    (run / "ksmlab-s-0.pid").write_text("100\n")  # stale: pid 100 now runs another guest
    assert find_qemu_pid("ksmlab-s-0", "bbbb", run, proc) == 200
    assert find_qemu_pid("ksmlab-s-0", "cccc", run, proc) is None


# --- real guests: qemu:///system, TCG --------------------------------------------------------------

SYSTEM_URI = "qemu:///system"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
IMAGE_READY = PROJECT_ROOT / ".image-ready"
VM_BOOT_TIMEOUT_S = 600


def _vm_image():
    """The base image: KSM_LAB_IMAGE_MANIFEST, the image helper's .image-ready, or the cache."""
    import shutil

    from orchestrator.guests import images

    if shutil.which("qemu-system-x86_64") is None or shutil.which("qemu-img") is None:
        pytest.skip("this host cannot run QEMU (qemu-system-x86_64/qemu-img missing; run `make host`)")
    manifest = os.environ.get("KSM_LAB_IMAGE_MANIFEST")
    if not manifest and IMAGE_READY.is_file():
        manifest = IMAGE_READY.read_text().strip()
    if manifest:
        return images.load_manifest(Path(manifest))
    cached = images.find_cached(images.DEFAULT_RECIPE)
    if cached is None:
        pytest.fail("no guest image: build it with `ksm-lab image build` (or set KSM_LAB_IMAGE_MANIFEST)")
    return cached


def _system_conn() -> libvirt.virConnect:
    try:
        return libvirt.open(SYSTEM_URI)
    except libvirt.libvirtError as exc:
        pytest.fail(f"libvirtd is not answering on {SYSTEM_URI} ({exc}); run `make host`")


def _ssh_connect(image):
    from orchestrator.guests.guest import GuestSession

    def connect(guest: Guest) -> None:
        # One short attempt per call; wait_ready does the retrying and owns the deadline.
        with GuestSession.for_image(image, guest.ssh_port, connect_deadline_s=1, connect_timeout_s=10) as session:
            result = session.run(["cat", "/proc/sys/kernel/hostname"], timeout_s=30, check=True)
            assert result.stdout.strip()

    return connect


def _ours_left(conn: libvirt.virConnect, study: str) -> list[str]:
    return [d.name() for d in conn.listAllDomains(0) if d.name().startswith(f"ksmlab-{study}-")]


@pytest.fixture
def vm_study(request):
    """A study name unique to this test run; anything left of it is cleaned even on failure."""
    study = f"pytest-{request.node.name.split('_')[1]}-{os.getpid()}"
    yield study
    with contextlib.suppress(ProvisionError):
        cleanup(SYSTEM_URI, study)


@pytest.mark.vm
def test_two_tcg_guests_answer_ssh_and_leave_nothing(vm_study: str, tmp_path: Path) -> None:
    import psutil

    image = _vm_image()
    conn = _system_conn()
    check_memory_fits(2, 1024)
    options = GuestSetOptions(domain_type="qemu", work_root=tmp_path / "work")
    base = Path(image.disk_path).stat()
    try:
        with GuestSet(SYSTEM_URI, vm_study, [GuestRequest(memory_mib=1024)] * 2, image, options) as guests:
            ready_s = guests.wait_ready(_ssh_connect(image), timeout_s=VM_BOOT_TIMEOUT_S)
            pids = guests.qemu_pids()
            overlays = [g.overlay_path for g in guests.guests]
            for guest in guests.guests:
                process = psutil.Process(pids[guest.name])
                assert guest.uuid in process.cmdline() and process.is_running()
                # The user qemu.conf names (libvirt's unprivileged libvirt-qemu by default).
                assert process.username() == qemu_user()
                # The forward listens on loopback only.
                listening = {c.laddr for c in process.net_connections("tcp") if c.status == "LISTEN"}
                assert ("127.0.0.1", guest.ssh_port) in listening
            assert all(p.is_file() for p in overlays)
            print(f"boot to SSH (2 guests at once): {ready_s}")
        assert _ours_left(conn, vm_study) == []
        assert not any(psutil.pid_exists(pid) for pid in pids.values())
        assert not any(p.exists() for p in overlays)
        assert files_under(tmp_path / "work") == []
        # libvirt gave the shared base to QEMU's user while the guests ran; it is given back.
        after = Path(image.disk_path).stat()
        assert (after.st_uid, after.st_gid, after.st_mode) == (base.st_uid, base.st_gid, base.st_mode)
    finally:
        conn.close()


_KILLED_PROVISIONER = """
import sys, time
from pathlib import Path
from orchestrator.guests import images
from orchestrator.guests.provision import GuestRequest, GuestSet, GuestSetOptions
image = images.load_manifest(Path(sys.argv[1]))
options = GuestSetOptions(domain_type="qemu", work_root=Path(sys.argv[3]))
guests = GuestSet("qemu:///system", sys.argv[2], [GuestRequest(memory_mib=512)], image, options)
with guests:
    g = guests.guests[0]
    print(g.name, g.overlay_path, g.console_log_path, flush=True)
    time.sleep(3600)
"""


@pytest.mark.vm
def test_cleanup_after_the_provisioner_was_killed(vm_study: str, tmp_path: Path) -> None:
    import psutil

    image = _vm_image()
    conn = _system_conn()
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    provisioner = subprocess.Popen(
        [sys.executable, "-c", _KILLED_PROVISIONER, str(image.manifest_path), vm_study, str(tmp_path / "work")],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = provisioner.stdout.readline().split()
        assert len(line) == 3, f"provisioner said {line!r} (exit {provisioner.poll()})"
        name, overlay, console = line[0], Path(line[1]), Path(line[2])
    finally:
        provisioner.kill()  # SIGKILL: no __exit__, no finally
        provisioner.wait()
    try:
        dom = conn.lookupByName(name)
        assert dom.isActive() and overlay.is_file()  # the kill really left a running guest behind
        qemu_pid = find_qemu_pid(name, dom.UUIDString(), Path("/run/libvirt/qemu"))
        assert qemu_pid is not None

        assert cleanup(SYSTEM_URI, vm_study) == [name]
        assert _ours_left(conn, vm_study) == []
        assert not psutil.pid_exists(qemu_pid)
        assert not overlay.exists() and not console.exists()
        assert files_under(tmp_path / "work") == []
    finally:
        conn.close()


def test_the_port_table_lock_is_given_up_at_its_deadline(tmp_path: Path) -> None:
    import fcntl as _fcntl
    import os as _os

    from orchestrator.errors import HostError as _HostError

    registry = PortRegistry(tmp_path, lock_timeout_s=0.3)
    tmp_path.mkdir(exist_ok=True)
    holder = _os.open(registry.lock_path, _os.O_RDWR | _os.O_CREAT, 0o644)
    try:
        _fcntl.flock(holder, _fcntl.LOCK_EX)  # another process (a stuck sweep) holds the table
        with pytest.raises(_HostError, match="not free within 0.3 s"):
            registry.allocate("test")
    finally:
        _os.close(holder)
    port = registry.allocate("test")  # free again: it works
    registry.release(port)


def test_next_sweep_heal_removes_only_the_killed_studys_guests(
    pristine_conn, image, options, tmp_path, monkeypatch
) -> None:
    """A killed sweep's marker names its study and URI: the heal removes that study's guests
    (and its saved-state build's, "<name>-prep") and leaves another study's running."""
    from orchestrator import sweep as sweep_module

    monkeypatch.setenv("KSM_LAB_RUN_DIR", str(tmp_path / "run"))
    killed = GuestSet(TEST_URI, "night", [GuestRequest(memory_mib=128)], image, options).__enter__()
    prep = GuestSet(TEST_URI, "night-prep", [GuestRequest(memory_mib=128)], image, options).__enter__()
    other = GuestSet(TEST_URI, "nightly-2", [GuestRequest(memory_mib=128)], image, options).__enter__()
    marker = sweep_module.running_marker()
    marker.parent.mkdir(parents=True, exist_ok=True)  # the guest sets keep their ports there
    marker.write_text(json.dumps({"study": str(tmp_path / "night"), "pid": 999999, "name": "night", "uri": TEST_URI}))
    done = sweep_module.heal_killed_sweep()
    assert sorted(done) == ["removed guest ksmlab-night-0", "removed guest ksmlab-night-prep-0"]
    assert not killed.guests[0].overlay_path.exists() and not prep.guests[0].overlay_path.exists()
    assert [d.name() for d in pristine_conn.listAllDomains(0) if d.name().startswith("ksmlab-")] == [
        "ksmlab-nightly-2-0"
    ]
    assert other.guests[0].overlay_path.is_file()
    assert not marker.exists()
    for guest_set in (killed, prep, other):
        guest_set.teardown()  # releases this process's ports and connections


def test_a_sweep_that_could_not_tear_down_keeps_its_marker_for_the_next_one(
    pristine_conn, image, options, tmp_path, monkeypatch, caplog
) -> None:
    """A sweep that ends with its guests still defined (libvirtd stopped answering, and a restore
    it finished later started one) keeps its marker, marked "settings restored": the next sweep
    removes the guests, with the study's uncached saved states, and leaves the knobs alone. A
    sweep whose guests are all gone removes its marker."""
    from orchestrator import sweep as sweep_module
    from orchestrator.guests import states
    from orchestrator.plan import parse_plan

    monkeypatch.setenv("KSM_LAB_RUN_DIR", str(tmp_path / "run"))
    work = tmp_path / "plan-work"  # not the guest set's (options): only the heal's own step can clear it
    plan = parse_plan(
        f'[study]\nname = "night"\n[workload]\ntype = "idle"\n[guests]\nuri = "{TEST_URI}"\nworkdir = "{work}"\n'
    )
    left = GuestSet(TEST_URI, "night", [GuestRequest(memory_mib=128)], image, options).__enter__()
    marker = sweep_module.running_marker()
    marker.parent.mkdir(parents=True, exist_ok=True)
    record = sweep_module._marker_record(plan, tmp_path / "results" / "night")
    assert record["work_dir"] == str(work / "night") and record["uri"] == TEST_URI
    marker.write_text(json.dumps(record))
    sweep_module._close_marker(marker, plan)
    kept = json.loads(marker.read_text())
    assert kept["settings_restored"] is True and kept["guests_left"] == ["ksmlab-night-0"]
    # Uncached saved states no domain names (killed between saving and restoring), and a
    # half-built set whose sweep is dead; a file that is not a state file keeps its folder.
    saved = work / "night" / states.UNCACHED_STATES / "0123456789abcdef"
    build = work / "night" / states.UNCACHED_STATES / ".0123456789abcdef.build-999999"
    for folder in (saved, build):
        folder.mkdir(parents=True)
        (folder / "g0.save").write_text("memory")
    (tmp_path / "results" / "night").mkdir(parents=True)
    (tmp_path / "results" / "night" / "settings-record.json").write_text("[]")
    with monkeypatch.context() as m:
        m.setattr(sweep_module.HostSettings, "restore", lambda self: pytest.fail("knobs restored twice"))
        done = sweep_module.heal_killed_sweep()
    assert done == ["removed guest ksmlab-night-0", f"removed the uncached saved states in {work / 'night'}"]
    assert "ended leaving guests" in caplog.text
    assert not (work / "night").exists() and not marker.exists()
    assert not {name for name in names(pristine_conn) if name.startswith("ksmlab-")}
    left.teardown()  # releases this process's ports and connections
    marker.write_text(json.dumps(record))
    sweep_module._close_marker(marker, plan)  # nothing left: the marker goes
    assert not marker.exists()
    other = work / "other" / states.UNCACHED_STATES / "0123456789abcdef"
    other.mkdir(parents=True)
    (other / "notes.txt").write_text("not ours")
    from orchestrator.guests.cleanup import remove_study_states

    assert remove_study_states(work / "other") is False and (other / "notes.txt").exists()


def test_heal_with_libvirt_unreachable_names_cleanup_and_goes_on(tmp_path, monkeypatch, caplog) -> None:
    from orchestrator import sweep as sweep_module

    monkeypatch.setenv("KSM_LAB_RUN_DIR", str(tmp_path / "run"))
    marker = sweep_module.running_marker()
    marker.parent.mkdir(parents=True, exist_ok=True)  # the guest sets keep their ports there
    marker.write_text(
        json.dumps(
            {
                "study": str(tmp_path / "night"),
                "pid": 999999,
                "name": "night",
                "uri": "qemu+unix:///system?socket=" + str(tmp_path / "no-such-socket"),
            }
        )
    )
    assert sweep_module.heal_killed_sweep() == []
    assert "ksm-lab cleanup" in caplog.text
    assert not marker.exists()
