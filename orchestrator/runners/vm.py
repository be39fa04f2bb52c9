"""VM trials: guests -> [KSM reset + apply, done by the sweep] -> sampler on -> workload in all
guests -> optional tail until KSM converges -> sampler off -> store -> teardown (or keep).

How a trial gets its guests is the plan's `[guests] start`:
- restore (default): a saved state of the guest set (booted, prepared, warmed up, then saved:
  see states.py) is restored onto fresh overlays for every trial, so every trial starts from
  the same guest memory and disk; the state is built once and cached for later studies.
- boot: boot (and prepare, warm up) a fresh guest set for every trial.
- keep: boot once and keep the guests across trials that share the guest set.
KSM is reset between trials either way. Every failure marks the trial failed with its reason
(a boot failure carries the guest's console tail); the guests are then torn down, never reused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from orchestrator.guests import images, states
from orchestrator.errors import GuestBootError, OrchestratorError, ProvisionError, WorkloadError
from orchestrator.guests.domains import template_digest
from orchestrator.fsutil import atomic_copy
from orchestrator.guests.guest import GuestSession
from orchestrator.guests.hostmemory import check_memory_fits
from orchestrator.plan import GuestsSection, Trial
from orchestrator.guests.provision import (
    DEFAULT_WORK_ROOT,
    GuestRequest,
    GuestSet,
    GuestSetOptions,
    choose_domain_type,
    study_work_dir,
)
from orchestrator.guests.readiness import console_tail, ssh_pool_size
from orchestrator.host import probes
from orchestrator.fsutil import atomic_write_json
from orchestrator.runners.base import (
    PhaseClock,
    StopRequested,
    TrialResult,
    TrialRunner,
    measure,
    sampler_health,
    wait_or_stop,
)
from orchestrator.runners.record import ProvisionRecord
from orchestrator.workloads import guestmem, sysbench
from orchestrator.units import MIB

log = logging.getLogger(__name__)

# Bounds on every step, so nothing can hang a nightly run.
PREPARE_TIMEOUT_S = 3600.0
SHUTDOWN_TIMEOUT_S = 180.0
SNAPSHOT_TIMEOUT_S = 60.0


@dataclass
class ActiveGuests:
    """A booted guest set and open SSH sessions, possibly shared by several trials."""

    key: str
    guest_set: GuestSet
    image: images.ImageRef
    sessions: dict[str, GuestSession] = field(default_factory=dict)
    provision_info: dict[str, Any] = field(default_factory=dict)

    def close(self) -> None:
        for session in self.sessions.values():
            with contextlib.suppress(Exception):
                session.close()
        self.sessions.clear()
        self.guest_set.__exit__(None, None, None)


def guest_set_key(trial: Trial) -> str:
    """Trials with the same key can share booted guests (same hardware, image and data). The
    key lives for one study (it names no file); the [guests] table is hashed as the plan wrote
    it, the prepared data as the workload's model gives it (sysbench's prepared_data)."""
    model = trial.workload_model
    data: dict[str, Any] = {"type": trial.workload.get("type")}
    if isinstance(model, sysbench.SysbenchWorkload):
        data.update(model.prepared_data(), data=model.data, reuse_prepared=model.reuse_prepared)
    return hashlib.sha256(json.dumps({"guests": trial.guests, "data": data}, sort_keys=True).encode()).hexdigest()[:16]


class VmRunner(TrialRunner):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.active: ActiveGuests | None = None
        self._study_state_roots: set[Path] = set()  # uncached saved states, deleted at the end

    # -- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        if self.active is not None:
            active, self.active = self.active, None
            log.info("tearing down %d guest(s)", len(active.guest_set.guests))
            active.close()

    def finish(self) -> None:
        try:
            self.close()
        finally:
            self.close_study()

    def run(self, trial: Trial, clock: PhaseClock, result: TrialResult) -> None:
        key = guest_set_key(trial)
        start = guests_of(trial).start
        if start == "restore":
            self._run_restored(trial, clock, result, key)
            return
        keep = start == "keep"
        if self.active is not None and (self.active.key != key or not keep):
            self.close()
        try:
            if self.active is None:
                with clock.phase("provision", None, self.progress):
                    self.active = self._provision(trial, key)
                result.provision = ProvisionRecord(**{**self.active.provision_info, "reused": False, "start": start})
            else:
                result.provision = ProvisionRecord(**{**self.active.provision_info, "reused": True, "start": start})
            self._measure(trial, clock, result, self.active)
        except BaseException:
            # A guest set that saw a failure is not trusted for the next trial.
            self.close()
            raise
        if not keep:
            self.close()

    # -- restore: every trial from the same saved guest state ------------------------------------

    def _run_restored(self, trial: Trial, clock: PhaseClock, result: TrialResult, key: str) -> None:
        saved, state_info = self._saved_set(trial, key, clock)
        with clock.phase("restore", None, self.progress):
            self.active = self._restore(trial, key, saved)
        result.provision = ProvisionRecord(**{**self.active.provision_info, **state_info, "start": "restore"})
        try:
            self._measure(trial, clock, result, self.active)
        finally:
            began = time.monotonic()
            self.close()  # the next trial restores afresh; nothing of this one carries over
            result.provision.teardown_s = round(time.monotonic() - began, 3)

    def _states_root(self, trial: Trial, image: images.ImageRef) -> Path:
        g = guests_of(trial)
        if g.cache_states:
            distinct = _distinct(self._guest_images(g))
            if len(distinct) > 1:  # guests of several images: no one image's folder holds them
                return states.mixed_root(images.default_cache_dir(), [image_id(i) for i in distinct])
            image_dir = Path(image.manifest_path).parent if image.manifest_path is not None else None
            return states.states_root(image_dir, images.default_cache_dir(), Path(image.disk_path))
        work_root = Path(g.workdir) if g.workdir else DEFAULT_WORK_ROOT
        return study_work_dir(work_root, self.plan.study.name) / states.UNCACHED_STATES

    def _state_spec(self, trial: Trial, image: images.ImageRef, template: Path | None) -> dict[str, Any]:
        """Everything that shapes a saved guest: the image, the guest hardware and domain
        template, the prepared data and the warm-up. Study name, ports and paths do not."""
        g = trial.guests or {}
        hardware = {k: g.get(k) for k in GuestsSection.model_fields if k not in GuestsSection.NOT_GUEST_SHAPE}
        hardware["domain_type"] = choose_domain_type(guests_of(trial).domain_type)
        workload = {k: v for k, v in trial.workload.items() if k not in ("duration_s", "report_interval_s", "rate")}
        spec = {
            "image": image_id(image),
            "hardware": hardware,
            "workload": workload,
            "template_sha256": template_digest(template),
        }
        g_model = guests_of(trial)
        if g_model.groups is not None:
            # Which image each guest boots, group by group; the disks' mtimes too, since a set
            # of several images is cached apart from them and outlives an `image rm`.
            per_guest = self._guest_images(g_model)
            spec["groups"] = [
                {
                    "count": group.count,
                    "image": image_id(per_guest[first]),
                    "disk_mtime_ns": Path(per_guest[first].disk_path).stat().st_mtime_ns,
                }
                for group, first in zip(g_model.groups, _group_starts(g_model))
            ]
        return spec

    def _saved_set(self, trial: Trial, key: str, clock: PhaseClock) -> tuple[states.SavedSet, dict[str, Any]]:
        g = guests_of(trial)
        image = self._image(g)
        template = Path(g.template) if g.template else None
        spec = self._state_spec(trial, image, template)
        skey = states.state_key(spec)
        root = self._states_root(trial, image)
        if not g.cache_states:
            self._study_state_roots.add(root)
        saved = states.load(root / skey)
        if saved is not None:
            return saved, {"state": skey, "state_reused": True}
        log.info(
            "no saved guest state %s yet: booting, preparing and warming up %d guest(s) to save them", skey, g.count
        )
        started = time.monotonic()
        root.mkdir(parents=True, exist_ok=True)
        states.remove_stale_builds(root)
        with clock.phase("provision", None, self.progress):
            active = self._provision(trial, key, name_stem=f"st{skey[:8]}")
        try:
            with clock.phase("save", None, self.progress):
                markers = [states.new_marker(skey, i) for i in range(len(active.sessions))]
                for marker, session in zip(markers, active.sessions.values()):
                    session.run(["sh", "-c", f"printf %s {marker} > {states.MARKER_PATH}"], timeout_s=30, check=True)
                # Close SSH first, so no guest is saved holding a session whose host end will
                # not exist after a restore; give sshd a moment to end them.
                for session in active.sessions.values():
                    session.close()
                active.sessions.clear()
                wait_or_stop(self.stop, 1.0)
                build = states.build_folder(root, skey)
                active.guest_set.watch(False)  # saving stops the guests: that is not a loss
                try:
                    entries = active.guest_set.save(build, markers)
                except BaseException:
                    shutil.rmtree(build, ignore_errors=True)  # a half-written set is never used
                    raise
                saved = states.commit(build, root, skey, spec, entries, {"provision": active.provision_info})
        finally:
            active.close()
        info = {
            "state": skey,
            "state_reused": False,
            "state_build_s": round(time.monotonic() - started, 1),
            "state_bytes": saved.size_bytes,
        }
        log.info(
            "saved guest state %s (%d guests, %.0f MiB) in %.0f s",
            skey,
            len(saved.guests),
            info["state_bytes"] / MIB,
            info["state_build_s"],
        )
        return saved, info

    def _restore(self, trial: Trial, key: str, saved: states.SavedSet) -> ActiveGuests:
        """Restore every guest of `saved` onto fresh overlays (a bounded pool of libvirt jobs),
        reconnect SSH (one session per guest), set each guest's clock from the host and prove
        each is the saved guest (its marker in /run): all of it within one deadline,
        restore_timeout_s from the start."""
        g = guests_of(trial)
        image = self._image(g)
        check_memory_fits(g.count, g.memory_mib, hugepages=g.hugepages, numa_node=g.numa_node)
        started = time.monotonic()
        deadline = started + g.restore_timeout_s

        def left_s() -> float:
            return max(0.1, deadline - time.monotonic())

        guest_set = self._guest_set(trial, image, restore=saved, deadline=deadline)
        guest_set.__enter__()
        sessions: dict[str, GuestSession] = {}
        try:
            restored_s = time.monotonic() - started
            image_of = guest_set.images_by_name()

            def reconnect(guest: Any) -> GuestSession:
                session = GuestSession.for_image(
                    image_of[guest.name],
                    guest.ssh_port,
                    connect_deadline_s=left_s(),
                    connect_timeout_s=min(5.0, left_s()),
                    retry_min_s=0.05,
                )
                session.connect()
                return session

            guests = guest_set.guests
            pool = ThreadPoolExecutor(max_workers=ssh_pool_size(len(guests)), thread_name_prefix="ksmlab-reconnect")
            futures = {guest.name: pool.submit(reconnect, guest) for guest in guests}
            try:
                for guest in guests:
                    try:
                        sessions[guest.name] = futures[guest.name].result()
                    except OrchestratorError as exc:
                        raise GuestBootError(
                            f"{guest.name} restored but SSH did not answer: {exc}", console_tail(guest.console_log_path)
                        ) from exc
            finally:
                pool.shutdown(wait=True)  # the others end by the deadline
                for name, future in futures.items():  # sessions that opened after one failed: closed below
                    if name not in sessions and future.exception() is None:
                        sessions[name] = future.result()
            ssh_s = time.monotonic() - started
            with ThreadPoolExecutor(max_workers=ssh_pool_size(len(guests)), thread_name_prefix="ksmlab-clock") as pool:
                offsets = dict(
                    zip(
                        sessions,
                        pool.map(
                            lambda item: set_clock_and_check(item[1], item[0].marker, timeout_s=min(30.0, left_s())),
                            zip(saved.guests, sessions.values()),
                        ),
                    )
                )
        except BaseException:
            for session in sessions.values():
                with contextlib.suppress(Exception):
                    session.close()
            guest_set.__exit__(None, None, None)
            if self.stop.is_set():
                raise StopRequested("interrupted while restoring guests") from None
            raise
        info = {
            "image": image_id(image),
            "guests": len(guests),
            **_images_info(image_of),
            "restore_s": guest_set.restore_seconds(),
            "restore_wall_s": round(restored_s, 3),
            "ssh_wall_s": round(ssh_s, 3),
            "start_s": round(time.monotonic() - started, 3),
            "clock_offset_s": offsets,
            "overlays": [str(g.overlay_path) for g in guests],
        }
        log.info(
            "restored %d guest(s) from state %s in %.2f s (SSH back at %.2f s)",
            len(guests),
            saved.key,
            info["start_s"],
            ssh_s,
        )
        return ActiveGuests(key, guest_set, image, sessions, info)

    def close_study(self) -> None:
        """Delete saved states that the plan asked not to cache (cache_states = false)."""
        for root in self._study_state_roots:
            shutil.rmtree(root, ignore_errors=True)
            with contextlib.suppress(OSError):
                root.parent.rmdir()  # the study's work folder, once empty
        self._study_state_roots.clear()

    # -- provision -----------------------------------------------------------------------------

    def _image(self, g: GuestsSection) -> images.ImageRef:
        """The set's image: [guests] image, or with groups the first guest's."""
        return self._guest_images(g)[0]

    def _guest_images(self, g: GuestsSection) -> list[images.ImageRef]:
        """Each guest's image by index ([guests] groups, else [guests] image for all), each
        distinct one resolved (built if not cached) once."""
        cache = Path(g.image_cache_dir) if g.image_cache_dir else None
        resolved: dict[str, images.ImageRef] = {}
        out = []
        for table in g.guest_images():
            text = json.dumps(table, sort_keys=True, default=str)
            if text not in resolved:
                resolved[text] = images.resolve_image(table or None, cache_dir=cache)
            out.append(resolved[text])
        return out

    def _guest_set(
        self,
        trial: Trial,
        image: images.ImageRef,
        study_suffix: str = "",
        disks: list[Path] | None = None,
        count: int | None = None,
        restore: states.SavedSet | None = None,
        name_stem: str | None = None,
        deadline: float | None = None,
    ) -> GuestSet:
        g = guests_of(trial)
        count = count or g.count
        # Guests of several images (groups): each request names its own; the plan refuses
        # groups where a set of other than count guests is made (prepared layers, density).
        per_guest = self._guest_images(g) if g.groups is not None and count == g.count else None
        requests = [
            GuestRequest(
                memory_mib=g.memory_mib,
                vcpus=g.vcpus,
                nosharepages=g.nosharepages,
                hugepages=g.hugepages,
                vcpu_pins=tuple(g.vcpu_pins or ()),
                numa_node=g.numa_node,
                disk_path=disks[i] if disks else None,
                image=per_guest[i] if per_guest else None,
            )
            for i in range(count)
        ]
        options = GuestSetOptions(
            domain_type=choose_domain_type(g.domain_type),
            network=g.network,
            template_path=Path(g.template) if g.template else None,
            restore_timeout_s=g.restore_timeout_s,
            **({"work_root": Path(g.workdir)} if g.workdir else {}),
        )
        return GuestSet(
            g.uri,
            self.plan.study.name + study_suffix,
            requests,
            image,
            options,
            restore=restore,
            name_stem=name_stem,
            deadline=deadline,
        )

    def _boot(
        self, guest_set: GuestSet, image: images.ImageRef, timeout_s: float
    ) -> tuple[dict[str, GuestSession], dict[str, float]]:
        """Enter the set (define + start in parallel), wait for SSH, open one session per guest.
        Returns the sessions and each guest's seconds from start to SSH."""
        guest_set.__enter__()
        sessions: dict[str, GuestSession] = {}
        try:
            image_of = guest_set.images_by_name()

            def connect(guest: Any) -> None:
                # the session that answers is the guest's one session: no second login
                session = GuestSession.for_image(image_of[guest.name], guest.ssh_port, connect_deadline_s=5.0)
                session.connect()
                sessions[guest.name] = session

            boot_s = guest_set.wait_ready(connect, timeout_s, cancel=self.stop)
            return {guest.name: sessions[guest.name] for guest in guest_set.guests}, boot_s
        except BaseException:
            for session in sessions.values():
                with contextlib.suppress(Exception):
                    session.close()
            guest_set.__exit__(None, None, None)
            if self.stop.is_set():
                raise StopRequested("interrupted while booting guests") from None
            raise

    def _provision(self, trial: Trial, key: str, name_stem: str | None = None) -> ActiveGuests:
        g = guests_of(trial)
        workload = trial.workload_model
        image = self._image(g)
        check_memory_fits(g.count, g.memory_mib, hugepages=g.hugepages, numa_node=g.numa_node)
        info: dict[str, Any] = {"image": image_id(image), "guests": g.count}
        disks: list[Path] | None = None
        if isinstance(workload, sysbench.SysbenchWorkload):
            info["data"] = workload.data
            if workload.reuse_prepared:
                disks, layer_info = self._prepared_layers(trial, image)
                info.update(layer_info)
        guest_set = self._guest_set(trial, image, disks=disks, name_stem=name_stem)
        started = time.monotonic()
        sessions, boot_s = self._boot(guest_set, image, g.boot_timeout_s)
        info.update(_images_info(guest_set.images_by_name()))
        info["boot_to_ssh_s"] = {name: round(seconds, 1) for name, seconds in boot_s.items()}
        info["boot_wall_s"] = round(time.monotonic() - started, 1)
        active = ActiveGuests(key, guest_set, image, sessions, info)
        try:
            if isinstance(workload, sysbench.SysbenchWorkload) and disks is None:
                info["prepare_s"] = self._prepare_all(workload, sessions)
            if isinstance(workload, sysbench.SysbenchWorkload) and workload.warmup_s:
                info["warmup_s"] = self._warm_up(workload, active)
        except BaseException:
            active.close()
            raise
        return active

    def _prepare_all(
        self, workload: sysbench.SysbenchWorkload, sessions: Mapping[str, GuestSession]
    ) -> dict[str, float]:
        params = workload.params()
        names = list(sessions)

        def one(index: int) -> float:
            return sysbench.prepare_guest(
                sessions[names[index]], params, sysbench.seed_for_guest(params, index), PREPARE_TIMEOUT_S
            )

        with ThreadPoolExecutor(max_workers=len(names), thread_name_prefix="ksmlab-prepare") as pool:
            durations = list(pool.map(one, range(len(names))))
        return {name: round(d, 1) for name, d in zip(names, durations)}

    def _warm_up(self, workload: sysbench.SysbenchWorkload, active: ActiveGuests) -> float:
        params = workload.params(duration_s=workload.warmup_s)
        log.info("warming up: sysbench for %d s in every guest (not measured)", params.duration_s)
        started = time.monotonic()
        runs = self._run_workload(active, params)
        failed = {name: run.error for name, run in runs.items() if not run.ok}
        if failed:
            raise WorkloadError(f"sysbench warm-up failed: {failed}")
        return round(time.monotonic() - started, 1)

    # -- prepared database layers ----------------------------------------------------------------

    def _prepared_layers(self, trial: Trial, image: images.ImageRef) -> tuple[list[Path], dict[str, Any]]:
        """Per-guest qcow2 layers holding a prepared sysbench database, built once and cached.

        per_guest data: one layer per guest index (sysbench fills tables with random strings,
        so guests prepared separately hold different data). shared: one layer for every guest,
        so all guests hold identical tables (KSM merges far more of them).
        """
        workload = trial.workload_model
        assert isinstance(workload, sysbench.SysbenchWorkload)
        count = guests_of(trial).count
        shared = workload.data == "shared"
        wanted = 1 if shared else count
        layer_dir = prepared_dir(image)
        spec = workload.prepared_data()
        spec["image"] = image.key or str(image.disk_path)
        spec["image_mtime_ns"] = Path(image.disk_path).stat().st_mtime_ns
        digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
        layers = [layer_dir / f"sysbench-{digest}-g{i}.qcow2" for i in range(wanted)]
        meta_path = layer_dir / f"sysbench-{digest}.json"
        missing = [i for i, p in enumerate(layers) if not p.exists()]
        info: dict[str, Any] = {"prepared_layer": digest, "prepared_layer_reused": not missing}
        if missing:
            info["prepared_layer_build_s"] = self._build_layers(
                trial, workload, image, layers, missing, spec, meta_path
            )
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        info["prepare_s_saved"] = meta.get("prepare_s")
        disks = [layers[0]] * count if shared else layers
        return disks, info

    def _build_layers(
        self,
        trial: Trial,
        workload: sysbench.SysbenchWorkload,
        image: images.ImageRef,
        layers: list[Path],
        missing: list[int],
        spec: dict[str, Any],
        meta_path: Path,
    ) -> float:
        started = time.monotonic()
        log.info("preparing sysbench data in %d guest(s) to cache as disk layers", len(missing))
        params = workload.params()
        builder = self._guest_set(trial, image, study_suffix="-prep", count=len(missing))
        sessions, _ = self._boot(builder, image, guests_of(trial).boot_timeout_s)
        try:
            names = list(sessions)
            with ThreadPoolExecutor(max_workers=len(names)) as pool:
                prepare_s = list(
                    pool.map(
                        lambda j: sysbench.prepare_guest(
                            sessions[names[j]], params, sysbench.seed_for_guest(params, missing[j]), PREPARE_TIMEOUT_S
                        ),
                        range(len(names)),
                    )
                )
            # A clean shutdown flushes MariaDB and the guest's page cache into the overlay.
            for name in names:
                with contextlib.suppress(OrchestratorError):
                    sessions[name].run(["systemctl", "poweroff"], timeout_s=15)
                sessions[name].close()
            builder.wait_stopped(SHUTDOWN_TIMEOUT_S)
            layers[0].parent.mkdir(parents=True, exist_ok=True)
            for j, guest in enumerate(builder.guests):
                # Read-only: a backing file is never written again.
                atomic_copy(guest.overlay_path, layers[missing[j]], mode=0o444)
            meta = dict(spec, prepare_s=round(max(prepare_s), 1), built_wall=time.time())
            atomic_write_json(meta_path, meta)
        finally:
            for session in sessions.values():
                with contextlib.suppress(Exception):
                    session.close()
            builder.__exit__(None, None, None)
        return round(time.monotonic() - started, 1)

    # -- measure -------------------------------------------------------------------------------

    def _measure(self, trial: Trial, clock: PhaseClock, result: TrialResult, active: ActiveGuests) -> None:
        phases = trial.phases_model
        # QEMU pids do not change while guests run: find them once, not on every sampler tick
        # (each lookup reads libvirt's pid file and the process's cmdline per guest).
        qemu_pids = active.guest_set.qemu_pids()
        result.mergeable = mergeable_record(qemu_pids, guests_of(trial).memory_mib, self.settings.root)
        if reason := unmergeable_reason(trial, result.mergeable):
            raise ProvisionError(reason)
        if result.provision is None or not result.provision.reused:
            # Started (booted or restored) for this trial: the throttler policy acts on it.
            for name in qemu_pids:
                self.settings.announce_start(f"guest {name}")
        sampler = self.sampler_for(trial, lambda: qemu_pids)
        memory_rows: list[dict[str, Any]] = []
        runs: dict[str, sysbench.GuestRun] = {}
        workload = trial.workload_model
        is_sysbench = isinstance(workload, sysbench.SysbenchWorkload)
        params = workload.params() if isinstance(workload, sysbench.SysbenchWorkload) else None
        alive = active.guest_set.raise_if_lost
        active.guest_set.watch()
        try:
            with sampler:
                self.settle_and_steady(trial, sampler, clock, result, alive)
                with clock.phase("baseline", sampler, self.progress):
                    wait_or_stop(self.stop, phases.baseline_s, alive)
                memory_rows += self._guest_memory(active, "start", params)
                if trial.ksm_off:
                    self.settings.stop()
                else:
                    self.settings.start()
                with clock.phase("measure", sampler, self.progress):
                    if is_sysbench:
                        assert params is not None
                        runs = self._run_workload(active, params, alive)
                    else:
                        result.converged_by_rule = measure(phases, sampler, self.stop, alive)
                if is_sysbench and phases.until_converged and not trial.ksm_off:
                    # The workload ended; keep sampling until KSM settles (bounded by the cap).
                    with clock.phase("tail", sampler, self.progress):
                        tail = phases.model_copy(update={"measure_s": 0})
                        result.converged_by_rule = measure(tail, sampler, self.stop, alive)
                memory_rows += self._guest_memory(active, "end", params)
                alive()  # a guest lost in the last second still fails the trial
        finally:
            result.frames = {
                "ksm": sampler.ksm_frame(),
                "processes": sampler.process_frame(),
                "guest_memory": pd.DataFrame(memory_rows),
            }
            result.sampler = sampler_health(sampler)
            if runs:
                result.frames["workload"] = sysbench.intervals_frame(runs)
                result.extra_json = {"workload_summary": sysbench.summary_dict(runs)}
        failed = {name: run.error for name, run in runs.items() if not run.ok}
        if failed:
            details = "; ".join(f"{name}: {error}" for name, error in failed.items())
            tails = "\n".join(
                f"--- {g.name} console ---\n{console_tail(g.console_log_path, 15)}"
                for g in active.guest_set.guests
                if g.name in failed
            )
            raise WorkloadError(f"sysbench failed in {len(failed)} guest(s): {details}\n{tails}")

    def _run_workload(
        self, active: ActiveGuests, params: sysbench.SysbenchParams, alive: Any = None
    ) -> dict[str, sysbench.GuestRun]:
        """sysbench in every guest at once; a stop request or a lost guest does not wait for it
        to finish (the guests are torn down, which ends the sessions)."""
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ksmlab-sysbench")
        future = pool.submit(sysbench.run_all, active.sessions, params, params.duration_s + 300)
        try:
            while not future.done():
                if self.stop.wait(0.5):
                    raise StopRequested("interrupted during the workload")
                if alive is not None:
                    alive()
            return future.result()
        finally:
            pool.shutdown(wait=False)

    def _guest_memory(self, active: ActiveGuests, when: str, params: Any) -> list[dict[str, Any]]:
        """What was in the guests' memory that KSM merged: meminfo (+ InnoDB buffer pool)."""
        rows = []
        for name, session in active.sessions.items():
            try:
                rows.append(
                    guestmem.snapshot(
                        session,
                        name,
                        when,
                        params=params,
                        timeout_s=SNAPSHOT_TIMEOUT_S,
                        with_buffer_pool=params is not None,
                    )
                )
            except OrchestratorError as exc:
                log.warning("guest memory snapshot of %s (%s) failed: %s", name, when, exc)
        return rows


def mergeable_record(qemu_pids: Mapping[str, int], memory_mib: int, root: Path) -> dict[str, Any]:
    """{guest: {"pid", big_mappings, mergeable, ...}}: is each QEMU's guest RAM marked for KSM
    (VmFlags mg in /proc/PID/smaps), read once per trial. Guest RAM is one anonymous mapping of
    the guest's size: mappings of half that or more are judged. A read that fails is recorded."""
    record: dict[str, Any] = {}
    for name, pid in qemu_pids.items():
        try:
            found = probes.read_guest_ram_mergeable(pid, memory_mib * 1024 // 2, root)
            record[name] = {"pid": pid, **(found or {"error": "the process has gone"})}
        except (OrchestratorError, OSError) as exc:
            record[name] = {"pid": pid, "error": str(exc)}
    return record


def unmergeable_reason(trial: Trial, record: Mapping[str, Any]) -> str | None:
    """Why the trial must not measure: KSM is to run, the guests are not opted out
    (nosharepages), yet a QEMU's guest RAM lacks the mg flag: KSM could merge nothing of it."""
    if trial.ksm_off or guests_of(trial).nosharepages:
        return None
    bad = [
        f"{name} (QEMU pid {info['pid']}: {info['big_mappings'] - info['mergeable_mappings']} of "
        f"{info['big_mappings']} guest RAM mappings without mg)"
        for name, info in record.items()
        if info.get("mergeable") is False
    ]
    if not bad:
        return None
    return (
        "guest RAM is not mergeable (no VmFlags mg in /proc/PID/smaps) in "
        + ", ".join(bad)
        + ": KSM cannot merge it, so this trial would measure nothing. Check the domain's "
        "<memoryBacking> (nosharepages, memfd, shared access) and QEMU's mem-merge option"
    )


def prepared_dir(image: images.ImageRef) -> Path:
    """Prepared layers live beside the cached image they are built on."""
    if image.manifest_path is not None:
        return Path(image.manifest_path).parent / "prepared"
    return images.default_cache_dir() / "prepared" / hashlib.sha256(str(image.disk_path).encode()).hexdigest()[:12]


def set_clock_and_check(session: GuestSession, marker: str, timeout_s: float = 30.0) -> float:
    """Prove the restored guest is the saved one (its marker, kept in guest memory), and set its
    clock from the host: a restored guest's clock resumes at the moment it was saved. Returns
    how far behind the host the guest clock was, in seconds."""
    host_now = time.time()
    result = session.run(
        ["sh", "-c", f"cat {states.MARKER_PATH}; echo; date +%s.%N; date -u -s @{host_now:.6f} >/dev/null"],
        timeout_s=timeout_s,
    )
    lines = result.stdout.splitlines()
    if not result.ok or len(lines) < 2:
        raise ProvisionError(
            f"{session.where}: could not check the restored guest: {result.stderr.strip() or result.stdout!r}"
        )
    if lines[0].strip() != marker:
        raise ProvisionError(
            f"{session.where} is not the saved guest: marker {lines[0].strip()!r}, expected {marker!r}"
        )
    try:
        return round(host_now - float(lines[1]), 3)
    except ValueError:
        raise ProvisionError(f"{session.where}: unreadable guest clock {lines[1]!r}") from None


def image_id(image: images.ImageRef) -> str:
    """An image as keys and trial.json name it: its cache key, else (brought) its disk."""
    return image.key or str(image.disk_path)


def _distinct(refs: list[images.ImageRef]) -> list[images.ImageRef]:
    return list({image_id(ref): ref for ref in refs}.values())


def _group_starts(g: GuestsSection) -> list[int]:
    """The index of each group's first guest."""
    starts, at = [], 0
    for group in g.groups or []:
        starts.append(at)
        at += group.count
    return starts


def _images_info(image_of: Mapping[str, Any]) -> dict[str, Any]:
    """trial.json's provision "guest_images" {guest name: image} where a set mixes images."""
    ids = {name: image_id(ref) for name, ref in image_of.items()}
    return {"guest_images": ids} if len(set(ids.values())) > 1 else {}


def guests_of(trial: Trial) -> GuestsSection:
    """The trial's [guests] settings (a VM trial always has them: the plan checks)."""
    guests = trial.guests_model
    if guests is None:
        raise ProvisionError(f"trial {trial.trial_id} runs in guests but has no [guests] table")
    return guests
