"""Guests for one study: overlays, domains, loopback ports, readiness, and teardown that never leaks.

A `GuestSet` is a context manager. On enter it defines and starts every guest in parallel; on
exit (any path: error, Ctrl-C, the sweep's SIGTERM exception) it destroys and undefines the
domains, deletes overlays and console logs and releases the ports. SIGINT/SIGTERM are held
while it does, so a second Ctrl-C cannot cut the teardown short; they are delivered after.

Order matters for crash safety: a domain is defined (with our metadata naming its overlay and
console log) before the overlay file is created, and undefined only after those files are gone.
So after a SIGKILL every file we made is recorded on a domain `cleanup()` (cleanup.py) can find.

Its parts live beside it: the libvirt connection, event loop and lifecycle events in
libvirtconn.py, the port registry in ports.py, the wait for SSH in readiness.py, the memory check
made before any guest starts in hostmemory.py. libvirt.libvirtError becomes ProvisionError in
this module and those; nothing above them imports libvirt.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import signal
import subprocess
import threading
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import libvirt

from orchestrator.guests.domains import (
    DiskBoot,
    DomainSpec,
    DomainType,
    KernelBoot,
    NamedNet,
    NoNet,
    UserNet,
    mac_for_uuid,
    render_domain_xml,
    restore_xml,
    user_net_backend,
)
from orchestrator.guests import states
from orchestrator.guests.cleanup import NAME_PREFIX, destroy, undefine, unlink, unlink_console_log
from orchestrator.errors import GuestLostError, HostError, HostUnresponsive, ProvisionError
from orchestrator.guests.kvm import choose_domain_type  # noqa: F401 - the plan's domain_type, decided once
from orchestrator.guests.libvirtconn import (
    connect,
    error_code,
    is_alive,
    libvirt_errors,
    state_reason,
    unwatch_close,
    unwatch_lifecycle,
    watch_close,
    watch_lifecycle,
)
from orchestrator.guests.ports import DEFAULT_PORT_STATE_DIR, PortRegistry
from orchestrator.guests.readiness import GuestDied, ReadyWait, console_tail, wait_all_ready
from orchestrator.guests.states import SavedSet

log = logging.getLogger(__name__)

DEFAULT_WORK_ROOT = Path("/var/lib/ksm-lab/work")


# --- overlays ----------------------------------------------------------------------------------


def create_overlay(base: Path, overlay: Path, base_format: str = "qcow2") -> None:
    """A qcow2 overlay on `base`; the backing path must be absolute (a relative one is resolved
    against the overlay's folder and fails at start)."""
    base = Path(base).resolve()
    if not base.is_file():
        raise ProvisionError(f"base image {base} does not exist")
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", base_format, "-b", str(base), str(overlay)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ProvisionError(f"qemu-img create {overlay}: {exc}") from exc
    if done.returncode != 0:
        raise ProvisionError(f"qemu-img create {overlay} failed: {done.stderr.strip()}")


def chain_owners(image: Path) -> dict[Path, tuple[int, int]]:
    """(uid, gid) of `image` and every file below it in its backing chain, as they are now.

    libvirt's DAC driver gives every disk of a starting guest to QEMU's user, backing files
    included, and never gives a read-only backing file back (other guests may still use it).
    Recorded before our guests start and put back after the last is gone, so a cached base
    image or saved-state layer stays root's: a later QEMU cannot chmod and write it."""
    argv = ["qemu-img", "info", "-U", "--backing-chain", "--output=json", str(image)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        chain = json.loads(done.stdout) if done.returncode == 0 else []
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError):
        chain = []
    files = [Path(entry["filename"]) for entry in chain if isinstance(entry, dict) and "filename" in entry] or [
        Path(image)
    ]
    owners = {}
    for path in files:
        with contextlib.suppress(OSError):
            st = path.stat()
            owners[path.resolve()] = (st.st_uid, st.st_gid)
    return owners


def give_back(owners: dict[Path, tuple[int, int]]) -> list[Path]:
    """Put each file's recorded owner back where it changed; the files changed."""
    changed = []
    for path, (uid, gid) in owners.items():
        with contextlib.suppress(OSError):
            st = path.stat()
            if (st.st_uid, st.st_gid) != (uid, gid) and not path.is_symlink():
                os.chown(path, uid, gid)
                changed.append(path)
    return changed


# --- libvirt jobs with a deadline ------------------------------------------------------------

# How long each step of stopping a job past its deadline may take: abortJob (it waits for
# libvirt's job lock, held while a monitor call to a wedged QEMU waits), destroy (it kills QEMU
# first, so it returns even then), and the job's own call returning after that.
STOP_JOB_GRACE_S = 15.0


class _Call:
    """A blocking call in a daemon thread, waited for within a bound and otherwise left behind
    (a libvirt call on a wedged libvirtd returns when keepalive closes the connection)."""

    def __init__(self, call: Callable[[], object], name: str) -> None:
        self._value: object = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(call,), name=name, daemon=True)
        self._thread.start()

    def _run(self, call: Callable[[], object]) -> None:
        try:
            self._value = call()
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits
            self._error = exc

    def wait(self, timeout_s: float) -> bool:
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def value(self) -> object:
        if self._error is not None:
            raise self._error
        return self._value


def stop_job(lookup: Callable[[], libvirt.virDomain], abortable: bool) -> list[str]:
    """Stop a guest's libvirt job that ran past its deadline: abortJob where libvirt can abort it
    (a save; never a start, which a restore is: libvirt says to destroy instead), then destroy
    the guest. Each step is bounded. Returns what happened, for the error message."""
    said = []
    steps = [("abortJob", lambda: lookup().abortJob())] if abortable else []
    steps.append(("destroy", lambda: destroy(lookup())))
    for step, call in steps:
        done = _Call(call, f"ksmlab-{step}")
        if not done.wait(STOP_JOB_GRACE_S):
            said.append(f"{step} did not return within {STOP_JOB_GRACE_S:g} s")
            continue
        try:
            done.value()
            said.append("job aborted" if step == "abortJob" else "guest destroyed")
        except (libvirt.libvirtError, ProvisionError) as exc:
            said.append(f"{step} refused: {exc}")
    return said


def run_job(action: str, call: Callable[[], object], timeout_s: float, stop: Callable[[], list[str]]) -> object:
    """libvirt's blocking `call` (a save or restore of one guest) within timeout_s. Past the
    deadline `stop` ends it (stop_job) and ProvisionError says what ran over and what was done;
    libvirt's own errors become ProvisionError naming `action`."""
    job = _Call(call, "ksmlab-job")
    if job.wait(timeout_s):
        with libvirt_errors(action):
            return job.value()
    said = stop()
    if not job.wait(STOP_JOB_GRACE_S):
        said.append(f"the {action.split()[0]} call had not returned {STOP_JOB_GRACE_S:g} s later")
    raise ProvisionError(f"{action} did not finish within {timeout_s:g} s: {'; '.join(said)}")


# --- the guest set ---------------------------------------------------------------------------

JOBS_PER_CPU = 2
MAX_PARALLEL_JOBS = 16


def job_pool_size(jobs: int, bound: int = 0) -> int:
    """Workers for `jobs` libvirt jobs of one guest set: `bound` if given, else 2 per host CPU
    (at most 16); never more than there are jobs, never fewer than one."""
    limit = bound if bound > 0 else min(MAX_PARALLEL_JOBS, JOBS_PER_CPU * (os.cpu_count() or 1))
    return max(1, min(jobs, limit))


class BootImage(Protocol):
    """What provisioning needs from orchestrator.guests.images.ImageRef."""

    disk_path: Path
    disk_format: str
    kernel_path: Path | None
    initrd_path: Path | None
    cmdline: str | None


@dataclass(frozen=True)
class GuestRequest:
    """One guest's hardware; GuestSet names it `ksmlab-<study>-<index>`."""

    memory_mib: int = 1024
    vcpus: int = 1
    nosharepages: bool = False
    hugepages: bool = False
    vcpu_pins: tuple[str, ...] = ()
    numa_node: int | None = None
    # This guest's overlay backs onto this qcow2 instead of the image's disk (e.g. a cached
    # layer holding a prepared database, itself backed by the image).
    disk_path: Path | None = None
    # This guest's own image (disk, kernel, initrd, cmdline) in a set of mixed images
    # ([guests] groups); None: the set's image.
    image: BootImage | None = None


@dataclass(frozen=True)
class GuestSetOptions:
    domain_type: DomainType = "qemu"
    arch: str = "x86_64"
    machine: str | None = None
    emulator: Path | None = None
    # "user": QEMU user net with a loopback SSH forward; any other value: a libvirt network name.
    network: str = "user"
    # Use passt's <portForward> when libvirt is new enough (>= 9.2); else qemu:commandline.
    want_passt: bool = False
    template_path: Path | None = None
    work_root: Path = DEFAULT_WORK_ROOT
    port_state_dir: Path = DEFAULT_PORT_STATE_DIR
    # libvirt jobs (define + start or restore, save, teardown) run at most this many at once;
    # 0: job_pool_size's default, 2 per host CPU (16 guests restored at once on 2 cores only
    # queue in libvirtd and fight for the CPUs, and every one's deadline runs meanwhile).
    parallel_jobs: int = 0
    # Deadlines of libvirt's save and restore of one guest (both are blocking calls that wait on
    # QEMU and, without a bound, wait forever on a wedged one). A 1 GiB guest takes seconds.
    save_timeout_s: float = 600.0
    restore_timeout_s: float = 120.0


@dataclass(frozen=True)
class Guest:
    name: str
    uuid: str
    ssh_host: str | None  # None until a named network's DHCP lease is known
    ssh_port: int
    console_log_path: Path
    overlay_path: Path


@dataclass
class _Slot:
    """What has been made for one guest so far; teardown undoes exactly that."""

    index: int
    name: str
    uuid: str
    overlay_path: Path
    console_log_path: Path
    request: GuestRequest
    port: int | None = None
    mac: str | None = None
    ssh_host: str | None = None
    started_monotonic: float | None = None
    restore_s: float | None = None
    torn_down: bool = False


def _file_slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "study"


def study_work_dir(work_root: Path, study: str) -> Path:
    """Where a study's overlays, console logs and uncached saved states live."""
    return Path(work_root) / _file_slug(study)


DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def signals_deferred(signums: Sequence[int] = DEFERRED_SIGNALS) -> Iterator[list[int]]:
    """Hold SIGINT/SIGTERM while the block runs, then deliver them to the handlers in place.

    A second Ctrl-C (or the sweep's SIGTERM handler raising) must not cut a teardown short, or
    QEMU processes and overlays leak. Whatever the handlers do (raise KeyboardInterrupt, set
    the sweep's stop flag, terminate) happens once the block is done. Handlers can only be
    swapped in the main thread; elsewhere no signal interrupts us anyway.
    """
    if threading.current_thread() is not threading.main_thread():
        yield []
        return
    pending: list[int] = []
    previous = {signum: signal.signal(signum, lambda n, _f: pending.append(n)) for signum in signums}
    try:
        yield pending
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    for signum in dict.fromkeys(pending):
        log.warning("signal %d arrived during guest teardown; delivering it now", signum)
        signal.raise_signal(signum)


TEARDOWN_CONNECT_TIMEOUT_S = 10.0  # a libvirtd that was restarted answers at once; a stopped one never


class GuestSet:
    """Guests `ksmlab-<study>-<i>` for one study, torn down on every exit path.

    The set has no per-trial state: a sweep may keep it across trials with the same guests
    and call wait_ready/qemu_pids as often as it likes.
    """

    def __init__(
        self,
        uri: str,
        study: str,
        requests: Sequence[GuestRequest],
        image: BootImage,
        options: GuestSetOptions = GuestSetOptions(),
        work_dir: Path | None = None,
        restore: SavedSet | None = None,
        name_stem: str | None = None,
        deadline: float | None = None,
    ) -> None:
        if not requests:
            raise ProvisionError("a guest set needs at least one guest")
        if "/" in study or not study:
            raise ProvisionError(f"study name {study!r} cannot name a domain (empty or has '/')")
        if restore is not None and len(restore.guests) != len(requests):
            raise ProvisionError(
                f"saved state {restore.key} holds {len(restore.guests)} guests, {len(requests)} were asked for"
            )
        self.uri = uri
        self.study = study
        self.image = image
        self.options = options
        self.lost: dict[str, str] = {}  # guest name -> what happened to it (lifecycle events)
        self._watching = False
        self._event_id: int | None = None
        # Restore: each guest comes back from its saved state, under its saved name and uuid
        # (libvirt refuses another name for a save image).
        self.restore = restore
        # One deadline (monotonic s) for every restore of the set, queued ones included: a job
        # gets what is left of it (at most restore_timeout_s), none starts after it.
        self.deadline = deadline
        self.name_stem = name_stem or study
        self.work_dir = Path(work_dir) if work_dir else study_work_dir(options.work_root, study)
        self.ports = PortRegistry(options.port_state_dir)
        self._conn: libvirt.virConnect | None = None
        self.connection_lost: str | None = None  # why libvirt dropped our connection, if it did
        self._lock = threading.Lock()
        self._slots = [self._plan_slot(i, request) for i, request in enumerate(requests)]
        self._owners: dict[Path, tuple[int, int]] = {}  # backing files' owners before our guests started

    def _plan_slot(self, index: int, request: GuestRequest) -> _Slot:
        saved = self.restore.guests[index] if self.restore is not None else None
        guest_uuid = saved.uuid if saved else str(uuidlib.uuid4())
        # A fresh token in the file names keeps a crashed run's files from colliding with ours
        # (a restored guest keeps its uuid from trial to trial, so the uuid alone would not).
        stem = f"{_file_slug(self.study)}-{index}-{uuidlib.uuid4().hex[:8]}"
        return _Slot(
            index=index,
            name=saved.name if saved else f"{NAME_PREFIX}{self.name_stem}-{index}",
            uuid=guest_uuid,
            overlay_path=self.work_dir / f"{stem}.qcow2",
            console_log_path=self.work_dir / f"{stem}.console.log",
            request=request,
        )

    # -- building --------------------------------------------------------------------------

    def image_of(self, slot: _Slot) -> BootImage:
        return slot.request.image or self.image

    def images_by_name(self) -> dict[str, BootImage]:
        """{guest name: its image} (the set's image unless a request names its own)."""
        return {slot.name: self.image_of(slot) for slot in self._slots}

    def _domain_spec(self, slot: _Slot, lib_version: int) -> DomainSpec:
        image = self.image_of(slot)
        boot: KernelBoot | DiskBoot
        if image.kernel_path is not None:
            boot = KernelBoot(
                Path(image.kernel_path), image.initrd_path and Path(image.initrd_path), image.cmdline or ""
            )
        else:
            boot = DiskBoot()
        network: UserNet | NamedNet | NoNet
        if self.options.network == "user":
            assert slot.port is not None
            network = UserNet(
                host_port=slot.port,
                backend=user_net_backend(lib_version, self.options.want_passt),
            )
        elif self.options.network == "none":
            network = NoNet()
        else:
            slot.mac = mac_for_uuid(slot.uuid)
            network = NamedNet(network=self.options.network, mac=slot.mac)
        request = slot.request
        return DomainSpec(
            name=slot.name,
            uuid=slot.uuid,
            study=self.study,
            domain_type=self.options.domain_type,
            arch=self.options.arch,
            machine=self.options.machine,
            emulator=self.options.emulator,
            memory_mib=request.memory_mib,
            vcpus=request.vcpus,
            overlay_path=slot.overlay_path,
            console_log_path=slot.console_log_path,
            boot=boot,
            network=network,
            nosharepages=request.nosharepages,
            hugepages=request.hugepages,
            vcpu_pins=tuple(request.vcpu_pins),
            numa_node=request.numa_node,
        )

    def _bring_up(self, slot: _Slot, lib_version: int) -> None:
        assert self._conn is not None
        if self.options.network == "user":
            slot.port = self.ports.allocate(owner=slot.name)
        else:
            slot.ssh_host = None
        xml = render_domain_xml(self._domain_spec(slot, lib_version), self.options.template_path)
        with libvirt_errors(f"define {slot.name}"):
            dom = self._conn.defineXML(xml)
        # Defined first, so the overlay we now create is recorded on a domain cleanup() finds.
        if self.restore is not None:
            self._restore_slot(slot)
            return
        image = self.image_of(slot)
        base = slot.request.disk_path or Path(image.disk_path)
        create_overlay(Path(base), slot.overlay_path, "qcow2" if slot.request.disk_path else image.disk_format)
        with libvirt_errors(f"start {slot.name}"):
            dom.create()
        slot.started_monotonic = time.monotonic()

    def _restore_slot(self, slot: _Slot) -> None:
        """A fresh overlay on the frozen disk, then libvirt's restore of the saved memory into
        the defined domain, with the XML stored in the save image changed only where a trial
        differs (overlay, console log, SSH port, metadata)."""
        assert self._conn is not None and self.restore is not None
        saved = self.restore.guests[slot.index]
        create_overlay(saved.disk_path, slot.overlay_path, "qcow2")
        dxml = restore_xml(
            saved.saved_xml,
            study=self.study,
            overlay_path=slot.overlay_path,
            console_log_path=slot.console_log_path,
            host_port=slot.port,
        )
        slot.started_monotonic = time.monotonic()
        timeout_s = self.options.restore_timeout_s
        if self.deadline is not None:
            timeout_s = min(timeout_s, self.deadline - slot.started_monotonic)
            if timeout_s <= 0:
                raise ProvisionError(
                    f"restore {slot.name}: the set's deadline passed before its turn "
                    f"({job_pool_size(len(self._slots), self.options.parallel_jobs)} at a time)"
                )
        conn = self._conn
        run_job(
            f"restore {slot.name} from {saved.save_path}",
            lambda: conn.restoreFlags(str(saved.save_path), dxml, libvirt.VIR_DOMAIN_SAVE_RUNNING),
            timeout_s,
            lambda: stop_job(lambda: self._domain(slot), abortable=False),
        )
        slot.restore_s = time.monotonic() - slot.started_monotonic

    def restore_seconds(self) -> dict[str, float]:
        """{guest name: seconds libvirt took to restore it} (restored sets only)."""
        return {slot.name: round(slot.restore_s, 3) for slot in self._slots if slot.restore_s is not None}

    def save(self, folder: Path, markers: Sequence[str]) -> list[dict[str, object]]:
        """Save every running guest into `folder` (in parallel): libvirt's save of the domain
        (memory and devices; the domain stops), then its overlay, consistent with that memory,
        moves into the folder as the read-only disk layer. Returns state.json's guest entries.
        The set is then only good for teardown."""
        if self._conn is None:
            raise ProvisionError(f"guest set of study {self.study!r} is not running")

        def save_one(slot: _Slot) -> dict[str, object]:
            save_path, disk_path, xml_path = states.guest_files(folder, slot.index)
            dom = self._domain(slot)
            run_job(
                f"save {slot.name}",
                lambda: dom.save(str(save_path)),
                self.options.save_timeout_s,
                lambda: stop_job(lambda: dom, abortable=True),
            )
            with libvirt_errors(f"saved XML of {slot.name}"):
                xml_path.write_text(self._conn.saveImageGetXMLDesc(str(save_path), libvirt.VIR_DOMAIN_XML_SECURE))
            os.replace(slot.overlay_path, disk_path)
            disk_path.chmod(0o440)  # a backing file from now on: never written again
            save_path.chmod(0o600)  # guest memory: the guest's secrets are in it
            return {"index": slot.index, "name": slot.name, "uuid": slot.uuid, "marker": markers[slot.index]}

        workers = job_pool_size(len(self._slots), self.options.parallel_jobs)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ksmlab-save") as pool:
            return list(pool.map(save_one, self._slots))

    def __enter__(self) -> GuestSet:
        # Fresh uuids and files on every enter, so a set can be exited and entered again
        # (a "reboot" between trials) without meeting its own previous guests.
        self._slots = [self._plan_slot(slot.index, slot.request) for slot in self._slots]
        try:
            self.work_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ProvisionError(f"cannot create work dir {self.work_dir}: {exc}") from exc
        try:
            self._conn = connect(self.uri)
            self.connection_lost = None
            watch_close(self._conn, self._on_connection_lost)
            self._watch_lifecycle()
        except (ProvisionError, HostUnresponsive):
            with contextlib.suppress(OSError):
                self.work_dir.rmdir()
            raise
        # Before any guest starts: libvirt relabels the shared backing files at the first start.
        backings = {
            Path(self.restore.guests[slot.index].disk_path)
            if self.restore is not None
            else Path(slot.request.disk_path or self.image_of(slot).disk_path)
            for slot in self._slots
        }
        self._owners = {}
        for backing in backings:  # guests share a base: one qemu-img call per distinct chain top
            self._owners.update({p: o for p, o in chain_owners(backing).items() if p not in self._owners})
        workers = job_pool_size(len(self._slots), self.options.parallel_jobs)
        executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ksmlab-start")
        try:
            with libvirt_errors(f"libvirt version of {self.uri}"):
                lib_version = self._conn.getLibVersion()
            futures = [executor.submit(self._bring_up, slot, lib_version) for slot in self._slots]
            errors = [f.exception() for f in futures]
            failed = [(slot, e) for slot, e in zip(self._slots, errors) if e is not None]
            if failed:
                detail = "; ".join(f"{slot.name}: {e}" for slot, e in failed)
                raise ProvisionError(f"{len(failed)} of {len(self._slots)} guests failed to start: {detail}")
        except BaseException as exc:
            # Read before the teardown reconnects (which forgets why the old connection died).
            lost = self.connection_lost or (None if self._conn is None or is_alive(self._conn) else "connection dead")

            def finish() -> None:
                # Threads still defining/starting must finish before we undo their work.
                executor.shutdown(wait=True, cancel_futures=True)
                self.teardown()

            self._teardown_after(exc, finish)
            if lost is not None and isinstance(exc, Exception) and not isinstance(exc, HostUnresponsive):
                # libvirtd stopped answering while the guests were defined, started or restored:
                # the host's problem (the study ends there), not a guest that failed to start.
                raise self._unresponsive(f"starting guests ({exc})", why=lost) from exc
            raise
        executor.shutdown(wait=True)
        return self

    # -- guests that die or stop mid-trial ---------------------------------------------------

    def _watch_lifecycle(self) -> None:
        """Note every guest of ours that stops, crashes or is paused while the set is up
        (libvirt lifecycle events, not polling): a trial must fail, not measure N-1 guests."""
        assert self._conn is not None
        self.lost = {}
        self._watching = False
        uuids = {slot.uuid: slot.name for slot in self._slots}

        def on_lost(guest_uuid: str, reason: str) -> None:
            name = uuids.get(guest_uuid)
            if name is None or not self._watching:
                return
            self.lost.setdefault(name, reason)
            log.error("guest %s %s", name, reason)

        # None: a driver without events; raise_if_lost still checks states
        self._event_id = watch_lifecycle(self._conn, on_lost)

    def _on_connection_lost(self, why: str) -> None:
        self.connection_lost = why
        log.error("lost the libvirt connection to %s: %s", self.uri, why)

    def _unresponsive(self, what: str, why: str | None = None) -> HostUnresponsive:
        names = ", ".join(slot.name for slot in self._slots if not slot.torn_down) or "none"
        return HostUnresponsive(
            f"{what}: libvirt at {self.uri} stopped answering ({why or self.connection_lost or 'connection dead'}); "
            f"guests left as they were: {names}",
            advice=f"Once libvirtd answers again, run `ksm-lab cleanup --study {self.study}` to remove "
            "them, then the same sweep with --resume.",
        )

    def watch(self, on: bool = True) -> None:
        """Guests stopping from here on are failures (off again before a save or teardown)."""
        self._watching = on

    def raise_if_lost(self) -> None:
        """GuestLostError naming every guest that stopped, crashed or was paused, with its
        console tail; also checks each domain's state, in case an event was missed."""
        if self.connection_lost is not None:
            raise self._unresponsive("guests unknown mid-trial")
        lost = dict(self.lost)
        if self._conn is not None:
            for slot in self._slots:
                if slot.name in lost:
                    continue
                try:
                    state, reason = self._domain(slot).state()
                except ProvisionError as exc:
                    # a state call cut off by keepalive: it is libvirtd that is gone, not the guest
                    if self.connection_lost is not None or not is_alive(self._conn):
                        raise self._unresponsive("guests unknown mid-trial") from None
                    lost[slot.name] = f"is gone ({exc})"
                    continue
                if state != libvirt.VIR_DOMAIN_RUNNING:
                    lost[slot.name] = state_reason(state, reason)
        if lost:
            tails = "\n".join(
                f"--- {slot.name} console ---\n{console_tail(slot.console_log_path, 15)}"
                for slot in self._slots
                if slot.name in lost
            )
            detail = "; ".join(f"{name} {why}" for name, why in lost.items())
            raise GuestLostError(f"{len(lost)} of {len(self._slots)} guest(s) lost mid-trial: {detail}", tails)

    # -- using -----------------------------------------------------------------------------

    @property
    def guests(self) -> list[Guest]:
        return [
            Guest(
                name=slot.name,
                uuid=slot.uuid,
                ssh_host="127.0.0.1" if slot.port is not None else slot.ssh_host,
                ssh_port=slot.port if slot.port is not None else 22,
                console_log_path=slot.console_log_path,
                overlay_path=slot.overlay_path,
            )
            for slot in self._slots
        ]

    def _domain(self, slot: _Slot) -> libvirt.virDomain:
        if self._conn is None:
            raise ProvisionError(f"guest set of study {self.study!r} is not running")
        with libvirt_errors(f"look up {slot.name}"):
            return self._conn.lookupByUUIDString(slot.uuid)

    def _pid_dir(self) -> Path | None:
        if self.uri.startswith("qemu:///system"):
            return Path("/run/libvirt/qemu")
        if self.uri.startswith("qemu:///session"):
            runtime = os.environ.get("XDG_RUNTIME_DIR")
            return Path(runtime) / "libvirt" / "qemu" / "run" if runtime else None
        return None

    def qemu_pids(self, proc_root: Path = Path("/proc")) -> dict[str, int]:
        """{guest name: QEMU pid} from libvirt's pid file, checked against the process's -uuid."""
        pids: dict[str, int] = {}
        for slot in self._slots:
            pid = find_qemu_pid(slot.name, slot.uuid, self._pid_dir(), proc_root)
            if pid is None:
                raise ProvisionError(f"no QEMU process found for {slot.name} (uuid {slot.uuid})")
            pids[slot.name] = pid
        return pids

    def _lease_address(self, slot: _Slot) -> str | None:
        assert self._conn is not None
        with libvirt_errors(f"DHCP leases of network {self.options.network}"):
            leases = self._conn.networkLookupByName(self.options.network).DHCPLeases(slot.mac)
        addresses = [lease["ipaddr"] for lease in leases if lease.get("type") == libvirt.VIR_IP_ADDR_TYPE_IPV4]
        return addresses[0] if addresses else None

    def wait_stopped(self, timeout_s: float) -> None:
        """Wait until every guest has shut itself down (e.g. after `systemctl poweroff`)."""
        deadline = time.monotonic() + timeout_s
        for slot in self._slots:
            while True:
                with libvirt_errors(f"state of {slot.name}"):
                    if not self._domain(slot).isActive():
                        break
                if time.monotonic() > deadline:
                    raise ProvisionError(f"{slot.name} did not shut down within {timeout_s:.0f} s")
                time.sleep(0.5)

    def wait_ready(
        self, connect: Callable[[Guest], None], timeout_s: float, cancel: threading.Event | None = None
    ) -> dict[str, float]:
        """Retry `connect(guest)` for every guest until it returns, within timeout_s overall.

        Returns {guest name: seconds from domain start to ready}. Raises GuestBootError with
        the console tail of the first guest that died or did not answer in time.
        """
        if self._conn is None:
            raise ProvisionError(f"guest set of study {self.study!r} is not running")

        def attempt(slot: _Slot) -> None:
            with libvirt_errors(f"state of {slot.name}"):
                active = self._domain(slot).isActive()
            if not active:
                raise GuestDied(f"{slot.name} is no longer running")
            if self.options.network not in ("user", "none") and slot.ssh_host is None:
                slot.ssh_host = self._lease_address(slot)
                if slot.ssh_host is None:
                    raise ConnectionError(f"{slot.name}: no DHCP lease yet")
            connect(self.guests[slot.index])

        waits = [
            ReadyWait(
                slot.name,
                functools.partial(attempt, slot),
                slot.console_log_path,
                lambda slot=slot: slot.started_monotonic,
            )
            for slot in self._slots
        ]
        return wait_all_ready(waits, timeout_s, cancel)

    # -- tearing down ----------------------------------------------------------------------

    def _teardown_slot(self, slot: _Slot) -> None:
        dom: libvirt.virDomain | None = None
        if self._conn is not None:
            try:
                dom = self._conn.lookupByUUIDString(slot.uuid)
            except libvirt.libvirtError as exc:
                if error_code(exc) != libvirt.VIR_ERR_NO_DOMAIN:
                    raise
                dom = None
        if dom is not None:
            destroy(dom)
        # Files before the definition: the metadata must outlive what it records.
        unlink(slot.overlay_path)
        unlink_console_log(slot.console_log_path)
        if dom is not None:
            undefine(dom)
        if slot.port is not None:
            self.ports.release(slot.port)
            slot.port = None

    def teardown(self) -> None:
        """Destroy, delete and undefine everything made so far. Idempotent; tries every guest."""
        self._watching = False
        if self._conn is not None and self._event_id is not None:
            unwatch_lifecycle(self._conn, self._event_id)
            self._event_id = None
        with self._lock:
            if self._conn is not None and (self.connection_lost is not None or not is_alive(self._conn)):
                self._reconnect_for_teardown()
            problems: list[str] = []

            def down(slot: _Slot) -> None:
                try:
                    self._teardown_slot(slot)
                    slot.torn_down = True
                except (libvirt.libvirtError, OSError, HostError) as exc:
                    problems.append(f"{slot.name}: {exc}")

            # In a bounded pool: destroy waits for QEMU to exit (up to seconds each), and 16
            # guests one after another would hold the next trial back for that much longer.
            left = [slot for slot in self._slots if not slot.torn_down]
            if left:
                workers = job_pool_size(len(left), self.options.parallel_jobs)
                with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ksmlab-teardown") as pool:
                    list(pool.map(down, left))
            if not problems and all(slot.torn_down for slot in self._slots):
                for path in give_back(self._owners):
                    log.info("gave %s back to its owner (libvirt had given it to QEMU's user)", path)
            if self._conn is not None and not problems:
                unwatch_close(self._conn)
                with contextlib.suppress(libvirt.libvirtError):
                    self._conn.close()
                self._conn = None
            with contextlib.suppress(OSError):
                self.work_dir.rmdir()  # only when empty
            if problems:
                raise ProvisionError("teardown incomplete: " + "; ".join(problems))

    def _reconnect_for_teardown(self) -> None:
        """The connection died (libvirtd was stopped or restarted): one bounded attempt at a
        new one, or HostUnresponsive naming what is left for `cleanup`."""
        dead, self._conn = self._conn, None
        unwatch_close(dead)
        with contextlib.suppress(libvirt.libvirtError):
            dead.close()
        try:
            self._conn = connect(self.uri, timeout_s=TEARDOWN_CONNECT_TIMEOUT_S)
        except (HostUnresponsive, ProvisionError):
            raise self._unresponsive("teardown incomplete") from None
        self.connection_lost = None

    def _teardown_after(self, exc: BaseException | None, work: Callable[[], None]) -> None:
        """Teardown with signals deferred. With an error in flight, a teardown failure or a
        signal's exception is noted on that error instead of hiding it."""
        try:
            with signals_deferred():
                work()
        except BaseException as failure:  # noqa: BLE001 - re-raised unless something is in flight
            if exc is None:
                raise
            exc.add_note(f"during guest teardown: {failure!r}")

    def __exit__(self, exc_type, exc, tb) -> None:
        self._teardown_after(exc, self.teardown)


def find_qemu_pid(name: str, guest_uuid: str, pid_dir: Path | None, proc_root: Path = Path("/proc")) -> int | None:
    """The QEMU process of one domain: libvirt's pid file, else the process started with its -uuid.

    The -uuid check keeps a stale pid file (or a recycled pid) from naming another process.
    """

    def runs_domain(pid: int) -> bool:
        try:
            argv = (proc_root / str(pid) / "cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return any(a == b"-uuid" and b == guest_uuid.encode() for a, b in zip(argv, argv[1:]))

    if pid_dir is not None:
        with contextlib.suppress(OSError, ValueError):
            pid = int((pid_dir / f"{name}.pid").read_text().strip())
            if runs_domain(pid):
                return pid
    for entry in proc_root.iterdir():
        if entry.name.isdigit() and runs_domain(int(entry.name)):
            return int(entry.name)
    return None
