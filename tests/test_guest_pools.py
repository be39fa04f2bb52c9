"""Many guests: libvirt's jobs of a guest set run in a bounded pool, SSH steps one thread per
guest up to a cap, and a restore that waited past the set's one deadline never starts. Real
libvirt (test:///default), real qemu-img overlays; the jobs are only counted as they run."""

from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from orchestrator.errors import ProvisionError
from orchestrator.guests import provision, readiness, states
from orchestrator.guests.provision import GuestRequest, GuestSet, GuestSetOptions, create_overlay, job_pool_size


@dataclass(frozen=True)
class _Image:
    disk_path: Path
    disk_format: str = "qcow2"
    kernel_path: Path | None = None
    initrd_path: Path | None = None
    cmdline: str | None = None


def _image(tmp_path: Path) -> _Image:
    base = tmp_path / "base.qcow2"
    if not base.exists():
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "16M"], check=True, timeout=60)
    return _Image(base)


def _options(tmp_path: Path, **kwargs: object) -> GuestSetOptions:
    return GuestSetOptions(
        domain_type="test",
        arch="i686",
        network="none",
        work_root=tmp_path / "work",
        port_state_dir=tmp_path / "ports",
        **kwargs,
    )  # type: ignore[arg-type]


class _Concurrency:
    """Wraps a method so that each call is counted while it runs (and lasts at least 50 ms)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        self.running = 0
        self.most = 0
        self.calls = 0
        self._lock = threading.Lock()
        original = getattr(GuestSet, name)

        def counted(guest_set: GuestSet, *args: object) -> object:
            with self._lock:
                self.running += 1
                self.calls += 1
                self.most = max(self.most, self.running)
            try:
                time.sleep(0.05)
                return original(guest_set, *args)
            finally:
                with self._lock:
                    self.running -= 1

        monkeypatch.setattr(GuestSet, name, counted)


def test_job_pool_size_is_two_per_cpu_capped_and_never_more_than_the_jobs(monkeypatch):
    monkeypatch.setattr(provision.os, "cpu_count", lambda: 2)
    assert job_pool_size(16) == 4
    assert job_pool_size(3) == 3
    assert job_pool_size(0) == 1
    assert job_pool_size(16, bound=6) == 6
    monkeypatch.setattr(provision.os, "cpu_count", lambda: 64)
    assert job_pool_size(100) == provision.MAX_PARALLEL_JOBS == 16
    assert readiness.ssh_pool_size(16) == 16 and readiness.ssh_pool_size(500) == readiness.MAX_SSH_THREADS


def test_starts_and_teardowns_of_many_guests_run_at_most_the_bound_at_once(tmp_path, monkeypatch):
    """10 guests with parallel_jobs = 3: never more than 3 define + start jobs or teardowns at a
    time, yet more than one (a pool, not a loop); every domain and overlay is gone after."""
    starts = _Concurrency(monkeypatch, "_bring_up")
    teardowns = _Concurrency(monkeypatch, "_teardown_slot")
    requests = [GuestRequest(memory_mib=128) for _ in range(10)]
    guests = GuestSet("test:///default", "pool", requests, _image(tmp_path), _options(tmp_path, parallel_jobs=3))
    with guests:
        conn = guests._conn
        assert conn is not None
        assert {d.name() for d in conn.listAllDomains(0)} >= {g.name for g in guests.guests}
        overlays = [g.overlay_path for g in guests.guests]
        assert all(p.is_file() for p in overlays)
    assert starts.calls == teardowns.calls == 10
    assert starts.most == 3 and teardowns.most == 3
    assert not any(p.exists() for p in overlays)
    assert not (tmp_path / "work" / "pool").exists()


def test_a_restore_whose_turn_comes_after_the_sets_deadline_never_starts(tmp_path):
    """The set's one deadline covers restores still queued in the pool: past it, a guest is not
    restored at all (its overlay was made first and is removed by the teardown)."""
    folder = tmp_path / "state"
    folder.mkdir()
    save_path, disk_path, xml_path = states.guest_files(folder, 0)
    create_overlay(_image(tmp_path).disk_path, disk_path)
    save_path.write_bytes(b"not a save image: never read")
    xml_path.write_text(
        "<domain type='test'><name>ksmlab-stpool-0</name><uuid>8f2d3c1e-7a44-4c59-9d9e-0f1a2b3c4d5e</uuid>"
        "<devices><disk type='file' device='disk'><source file='/nowhere.qcow2'/></disk></devices>"
        "</domain>"
    )
    saved = states.SavedSet(
        "k",
        folder,
        (
            states.SavedGuest(
                0, "ksmlab-stpool-0", "8f2d3c1e-7a44-4c59-9d9e-0f1a2b3c4d5e", "m", save_path, disk_path, xml_path
            ),
        ),
        {},
    )
    guests = GuestSet(
        "test:///default",
        "pool",
        [GuestRequest(memory_mib=128)],
        _image(tmp_path),
        _options(tmp_path),
        restore=saved,
        deadline=time.monotonic() - 1,
    )
    with pytest.raises(ProvisionError, match="deadline passed before its turn"):
        guests.__enter__()
    assert not (tmp_path / "work" / "pool").exists()  # overlay and folder gone
