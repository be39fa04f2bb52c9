"""Bounds a guest cannot break. libvirt's save and restore of a guest end at their deadline: a
QEMU that stops answering (here really stopped, with SIGSTOP) makes libvirt's call wait forever;
GuestSet stops the job (abortJob where libvirt can abort it, then destroy), fails with an error
naming the bound, and leaves no domain, QEMU process or file. A guest flooding its console fills
no more than virtlogd's cap.

Marked vm (needs `make host` and the image)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import libvirt
import pytest

from orchestrator.errors import ProvisionError
from orchestrator.guests import states
from orchestrator.guests.kvm import choose_domain_type
from orchestrator.guests.provision import STOP_JOB_GRACE_S, GuestRequest, GuestSet, GuestSetOptions
from tests.vmhost import need_vm_host

pytestmark = [pytest.mark.vm]
URI = "qemu:///system"
DEADLINE_S = 5.0


class QemuFreezer:
    """SIGSTOP the QEMU process of domain `name` the moment it exists (a wedged QEMU: libvirt's
    monitor calls to it never return), SIGCONT it when done if it is still there."""

    def __init__(self, name: str) -> None:
        self.needle = f"guest={name},".encode()
        self.frozen: list[int] = []
        self._done = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _cmdline(self, pid: str) -> bytes | None:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None

    def _watch(self) -> None:
        # Processes of before are not it (an earlier QEMU of that name may still be exiting),
        # except libvirtd's children: one may be about to exec QEMU.
        others = {
            pid
            for pid in os.listdir("/proc")
            if pid.isdigit() and b"libvirtd" not in (self._cmdline(pid) or b"libvirtd")
        }
        self._ready.set()
        while not self._done.is_set():
            for pid in os.listdir("/proc"):
                if not pid.isdigit() or pid in others:
                    continue
                argv = self._cmdline(pid)
                if argv is None:
                    continue
                if self.needle in argv:
                    os.kill(int(pid), signal.SIGSTOP)
                    self.frozen.append(int(pid))
                    return
                # libvirtd's child becomes QEMU at exec (and shows no cmdline while it does): look again
                if argv and b"libvirtd" not in argv:
                    others.add(pid)
            time.sleep(0.002)

    def __enter__(self) -> QemuFreezer:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(5)
        for pid in self.frozen:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


def caught_nothing(guests: GuestSet) -> bool:
    """Did the set come up (so nothing tore it down)?"""
    with libvirt.open(URI) as conn:
        return any(d.name() in {g.name for g in guests.guests} for d in conn.listAllDomains(0))


def _options(tmp_path: Path, **deadlines: float) -> GuestSetOptions:
    return GuestSetOptions(
        domain_type=choose_domain_type("auto"), network="none", work_root=tmp_path / "work", **deadlines
    )


def _left(study: str, frozen: list[int]) -> dict[str, list]:
    with libvirt.open(URI) as conn:
        domains = [d.name() for d in conn.listAllDomains(0) if study in d.name()]
    return {"domains": domains, "qemu": [pid for pid in frozen if Path(f"/proc/{pid}").exists()]}


def test_a_save_that_hangs_is_aborted_at_its_deadline(tmp_path):
    image = need_vm_host()
    study = f"pyt-sdead-{os.getpid()}"
    guests = GuestSet(URI, study, [GuestRequest(memory_mib=512)], image, _options(tmp_path, save_timeout_s=DEADLINE_S))
    with guests:
        (pid,) = guests.qemu_pids().values()
        os.kill(pid, signal.SIGSTOP)  # a wedged QEMU: the migration to the save file never ends
        try:
            folder = states.build_folder(tmp_path / "states", "k")
            started = time.monotonic()
            with pytest.raises(ProvisionError) as caught:
                guests.save(folder, ["marker"])
            took_s = time.monotonic() - started
        finally:
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGCONT)
    message = str(caught.value)
    print(f"{took_s:.1f} s: {message}")
    assert f"save {guests.guests[0].name} did not finish within {DEADLINE_S:g} s" in message, message
    assert "guest destroyed" in message, message
    assert took_s < DEADLINE_S + 3 * STOP_JOB_GRACE_S
    assert _left(study, [pid]) == {"domains": [], "qemu": []}
    assert not list((tmp_path / "work").rglob("*"))


def test_a_restore_that_hangs_is_destroyed_at_its_deadline(tmp_path):
    image = need_vm_host()
    study = f"pyt-rdead-{os.getpid()}"
    root = tmp_path / "states"
    # A saved guest: started and saved at once (what it runs does not matter here).
    with GuestSet(URI, study, [GuestRequest(memory_mib=512)], image, _options(tmp_path)) as guests:
        folder = states.build_folder(root, "k")
        saved = states.commit(folder, root, "k", {}, guests.save(folder, ["marker"]), {})
    restoring = GuestSet(
        URI,
        study,
        [GuestRequest(memory_mib=512)],
        image,
        _options(tmp_path, restore_timeout_s=DEADLINE_S),
        restore=saved,
    )
    with QemuFreezer(saved.guests[0].name) as freezer:
        started = time.monotonic()
        try:
            with pytest.raises(ProvisionError) as caught:
                restoring.__enter__()
        finally:
            if restoring.guests and caught_nothing(restoring):
                restoring.__exit__(None, None, None)  # the restore won the race: leave nothing
        took_s = time.monotonic() - started
        frozen = list(freezer.frozen)
    assert frozen, "the restored QEMU was never stopped: the restore did not hang"
    message = str(caught.value)
    print(f"{took_s:.1f} s: {message}")
    assert (
        f"restore {saved.guests[0].name} from {saved.guests[0].save_path} did not finish within "
        f"{DEADLINE_S:g} s" in message
    ), message
    assert "guest destroyed" in message, message
    assert took_s < DEADLINE_S + 3 * STOP_JOB_GRACE_S
    assert _left(study, frozen) == {"domains": [], "qemu": []}
    assert not list((tmp_path / "work").rglob("*"))


def _virtlogd_caps() -> tuple[int, int]:
    """(max_size bytes, max_backups) virtlogd applies: its config's, else its defaults."""
    values = {"max_size": 2 * 1024 * 1024, "max_backups": 3}
    conf = Path("/etc/libvirt/virtlogd.conf")
    for line in conf.read_text().splitlines() if conf.exists() else []:
        key, _, value = line.partition("=")
        if key.strip() in values and value.strip().isdigit():
            values[key.strip()] = int(value.strip())
    return values["max_size"], values["max_backups"]


def test_a_guest_flooding_its_console_and_stdout_cannot_fill_the_disk_or_memory(tmp_path, monkeypatch):
    """The console is virtlogd's capped log: 12 MiB written to the guest's serial port leave at
    most max_size in the log and max_backups rotated copies, and teardown removes them all. A
    command flooding its stdout keeps the head and tail the cap allows (cut here to 1 MB, so
    the test reads 24 MB of flood, not 16 MiB of kept text), marked where it was cut."""
    from orchestrator.guests import guest as guest_module
    from orchestrator.guests.guest import GuestSession

    monkeypatch.setattr(guest_module, "OUTPUT_CAP_BYTES", 1_000_000)

    image = need_vm_host()
    study = f"pyt-flood-{os.getpid()}"
    max_size, max_backups = _virtlogd_caps()
    options = GuestSetOptions(domain_type=choose_domain_type("auto"), work_root=tmp_path / "work")
    with GuestSet(URI, study, [GuestRequest(memory_mib=512)], image, options) as guests:

        def connect(guest) -> None:
            with GuestSession.for_image(image, guest.ssh_port, connect_deadline_s=1, connect_timeout_s=10) as s:
                s.run(["true"], timeout_s=30, check=True)

        guests.wait_ready(connect, timeout_s=600)
        guest = guests.guests[0]
        with GuestSession.for_image(image, guest.ssh_port, connect_deadline_s=30, connect_timeout_s=10) as session:
            started = time.monotonic()
            session.run(["sh", "-c", "head -c 12582912 /dev/zero | tr '\\0' x > /dev/ttyS0"], timeout_s=600, check=True)
            print(f"12 MiB to the serial port in {time.monotonic() - started:.1f} s")
            flood = session.run(
                "printf START; head -c 24000000 /dev/zero | tr '\\0' y; printf END", timeout_s=300, check=True
            )
        time.sleep(2)  # virtlogd writes what QEMU handed it
        logs = {
            p.name: p.stat().st_size
            for p in guest.console_log_path.parent.iterdir()
            if p.name.startswith(guest.console_log_path.name)
        }
        rotated = sorted(set(logs) - {guest.console_log_path.name})
    print(f"console log files after a 12 MiB flood: {logs}")
    assert max(logs.values()) <= max_size, logs
    assert len(rotated) == max_backups, logs  # it did rotate, and kept no more than max_backups
    assert sum(logs.values()) <= (1 + max_backups) * max_size
    assert flood.stdout.startswith("START") and flood.stdout.endswith("END"), flood.stdout[:80]
    assert "bytes of output cut here" in flood.stdout and len(flood.stdout) < 1_100_000
    assert not (tmp_path / "work").exists() or not list((tmp_path / "work").rglob("*"))
