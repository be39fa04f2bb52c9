"""VM trials: provision (or reuse) guests -> wait for SSH -> prepare (or reuse the prepared
layer) -> [KSM reset + apply, done by the sweep] -> sampler on -> workload in all guests ->
optional tail until KSM converges -> sampler off -> store -> teardown or keep.

A guest set is kept across trials that share it when the plan says so (`keep_across_trials`);
KSM is reset between trials either way. Every failure marks the trial failed with its reason
(a boot failure carries the guest's console tail); the guests are then torn down, never reused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from orchestrator import images
from orchestrator.errors import OrchestratorError, WorkloadError
from orchestrator.fsutil import atomic_copy
from orchestrator.guest import GuestSession
from orchestrator.plan import Trial, sysbench_params
from orchestrator.provision import (
    GuestRequest,
    GuestSet,
    GuestSetOptions,
    check_memory_fits,
    choose_domain_type,
    console_tail,
)
from orchestrator.store import atomic_write_json
from orchestrator.sweep import PhaseClock, StopRequested, TrialRunner, measure, sampler_health, wait_or_stop
from orchestrator.workloads import guestmem, sysbench

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
    """Trials with the same key can share booted guests (same hardware, image and data)."""
    workload = trial.workload
    data = {k: workload.get(k) for k in ("type", "test", "tables", "table_size", "data", "rand_seed", "reuse_prepared")}
    return hashlib.sha256(json.dumps({"guests": trial.guests, "data": data}, sort_keys=True).encode()).hexdigest()[:16]


class VmRunner(TrialRunner):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.active: ActiveGuests | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        if self.active is not None:
            active, self.active = self.active, None
            log.info("tearing down %d guest(s)", len(active.guest_set.guests))
            active.close()

    def run(self, trial: Trial, clock: PhaseClock, result: dict[str, Any]) -> None:
        guests_cfg = trial.guests or {}
        key = guest_set_key(trial)
        if self.active is not None and (self.active.key != key or not guests_cfg.get("keep_across_trials", True)):
            self.close()
        try:
            if self.active is None:
                with clock.phase("provision", None, self.progress):
                    self.active = self._provision(trial, key)
                result["provision"] = dict(self.active.provision_info, reused=False)
            else:
                result["provision"] = dict(self.active.provision_info, reused=True)
            self._measure(trial, clock, result, self.active)
        except BaseException:
            # A guest set that saw a failure is not trusted for the next trial.
            self.close()
            raise
        if not guests_cfg.get("keep_across_trials", True):
            self.close()

    # -- provision -----------------------------------------------------------------------------

    def _image(self, guests_cfg: Mapping[str, Any]) -> images.ImageRef:
        cache = Path(guests_cfg["image_cache_dir"]) if guests_cfg.get("image_cache_dir") else None
        return images.resolve_image(guests_cfg.get("image") or None, cache_dir=cache)

    def _guest_set(self, trial: Trial, image: images.ImageRef, study_suffix: str = "",
                   disks: list[Path] | None = None, count: int | None = None) -> GuestSet:
        g = trial.guests or {}
        count = count or int(g["count"])
        requests = [
            GuestRequest(
                memory_mib=int(g["memory_mib"]),
                vcpus=int(g["vcpus"]),
                nosharepages=bool(g["nosharepages"]),
                hugepages=bool(g["hugepages"]),
                vcpu_pins=tuple(g.get("vcpu_pins") or ()),
                numa_node=g.get("numa_node"),
                disk_path=disks[i] if disks else None,
            )
            for i in range(count)
        ]
        options = GuestSetOptions(
            domain_type=choose_domain_type(g["domain_type"]),
            network=g["network"],
            template_path=Path(g["template"]) if g.get("template") else None,
            **({"work_root": Path(g["workdir"])} if g.get("workdir") else {}),
        )
        return GuestSet(g["uri"], self.plan.study.name + study_suffix, requests, image, options)

    def _boot(self, guest_set: GuestSet, image: images.ImageRef,
              timeout_s: float) -> tuple[dict[str, GuestSession], dict[str, float]]:
        """Enter the set (define + start in parallel), wait for SSH, open one session per guest.
        Returns the sessions and each guest's seconds from start to SSH."""
        guest_set.__enter__()
        try:
            def connect(guest: Any) -> None:
                with GuestSession.for_image(image, guest.ssh_port, connect_deadline_s=5.0):
                    pass

            boot_s = guest_set.wait_ready(connect, timeout_s, cancel=self.stop)
            sessions = {}
            for guest in guest_set.guests:
                session = GuestSession.for_image(image, guest.ssh_port, connect_deadline_s=60.0)
                session.connect()
                sessions[guest.name] = session
            return sessions, boot_s
        except BaseException:
            guest_set.__exit__(None, None, None)
            if self.stop.is_set():
                raise StopRequested("interrupted while booting guests") from None
            raise

    def _provision(self, trial: Trial, key: str) -> ActiveGuests:
        g = trial.guests or {}
        workload = trial.workload
        image = self._image(g)
        check_memory_fits(int(g["count"]), int(g["memory_mib"]))
        info: dict[str, Any] = {"image": image.key or str(image.disk_path), "guests": int(g["count"])}
        disks: list[Path] | None = None
        if workload["type"] == "sysbench":
            info["data"] = workload["data"]
            if workload["reuse_prepared"]:
                disks, layer_info = self._prepared_layers(trial, image)
                info.update(layer_info)
        guest_set = self._guest_set(trial, image, disks=disks)
        started = time.monotonic()
        sessions, boot_s = self._boot(guest_set, image, float(g["boot_timeout_s"]))
        info["boot_to_ssh_s"] = {name: round(seconds, 1) for name, seconds in boot_s.items()}
        info["boot_wall_s"] = round(time.monotonic() - started, 1)
        active = ActiveGuests(key, guest_set, image, sessions, info)
        try:
            if workload["type"] == "sysbench" and disks is None:
                info["prepare_s"] = self._prepare_all(trial, sessions)
            if workload["type"] == "sysbench" and workload.get("warmup_s"):
                info["warmup_s"] = self._warm_up(trial, active)
        except BaseException:
            active.close()
            raise
        return active

    def _prepare_all(self, trial: Trial, sessions: Mapping[str, GuestSession]) -> dict[str, float]:
        params = sysbench.SysbenchParams.from_mapping(sysbench_params(trial.workload))
        names = list(sessions)

        def one(index: int) -> float:
            return sysbench.prepare_guest(sessions[names[index]], params, sysbench.seed_for_guest(params, index),
                                          PREPARE_TIMEOUT_S)

        with ThreadPoolExecutor(max_workers=len(names), thread_name_prefix="ksmlab-prepare") as pool:
            durations = list(pool.map(one, range(len(names))))
        return {name: round(d, 1) for name, d in zip(names, durations)}

    def _warm_up(self, trial: Trial, active: ActiveGuests) -> float:
        params = sysbench.SysbenchParams.from_mapping(sysbench_params(trial.workload))
        params = params.model_copy(update={"duration_s": int(trial.workload["warmup_s"])})
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
        g = trial.guests or {}
        workload = trial.workload
        count = int(g["count"])
        shared = workload["data"] == "shared"
        wanted = 1 if shared else count
        layer_dir = prepared_dir(image)
        spec = {k: workload[k] for k in ("test", "tables", "table_size", "rand_seed")}
        spec["image"] = image.key or str(image.disk_path)
        spec["image_mtime_ns"] = Path(image.disk_path).stat().st_mtime_ns
        digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
        layers = [layer_dir / f"sysbench-{digest}-g{i}.qcow2" for i in range(wanted)]
        meta_path = layer_dir / f"sysbench-{digest}.json"
        missing = [i for i, p in enumerate(layers) if not p.exists()]
        info: dict[str, Any] = {"prepared_layer": digest, "prepared_layer_reused": not missing}
        if missing:
            info["prepared_layer_build_s"] = self._build_layers(trial, image, layers, missing, spec, meta_path)
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        info["prepare_s_saved"] = meta.get("prepare_s")
        disks = [layers[0]] * count if shared else layers
        return disks, info

    def _build_layers(self, trial: Trial, image: images.ImageRef, layers: list[Path], missing: list[int],
                      spec: dict[str, Any], meta_path: Path) -> float:
        started = time.monotonic()
        log.info("preparing sysbench data in %d guest(s) to cache as disk layers", len(missing))
        params = sysbench.SysbenchParams.from_mapping(sysbench_params(trial.workload))
        builder = self._guest_set(trial, image, study_suffix="-prep", count=len(missing))
        sessions, _ = self._boot(builder, image, float((trial.guests or {})["boot_timeout_s"]))
        try:
            names = list(sessions)
            with ThreadPoolExecutor(max_workers=len(names)) as pool:
                prepare_s = list(pool.map(
                    lambda j: sysbench.prepare_guest(sessions[names[j]], params,
                                                     sysbench.seed_for_guest(params, missing[j]), PREPARE_TIMEOUT_S),
                    range(len(names))))
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

    def _measure(self, trial: Trial, clock: PhaseClock, result: dict[str, Any], active: ActiveGuests) -> None:
        phases = trial.phases
        # QEMU pids do not change while guests run: find them once, not on every sampler tick
        # (each lookup reads libvirt's pid file and the process's cmdline per guest).
        qemu_pids = active.guest_set.qemu_pids()
        sampler = self.sampler_for(trial, lambda: qemu_pids)
        memory_rows: list[dict[str, Any]] = []
        runs: dict[str, sysbench.GuestRun] = {}
        is_sysbench = trial.workload["type"] == "sysbench"
        params = sysbench.SysbenchParams.from_mapping(sysbench_params(trial.workload)) if is_sysbench else None
        try:
            with sampler:
                with clock.phase("settle", sampler, self.progress):
                    wait_or_stop(self.stop, phases["settle_s"])
                with clock.phase("baseline", sampler, self.progress):
                    wait_or_stop(self.stop, phases["baseline_s"])
                memory_rows += self._guest_memory(active, "start", params)
                if trial.ksm_off:
                    self.settings.stop()
                else:
                    self.settings.start()
                with clock.phase("measure", sampler, self.progress):
                    if is_sysbench:
                        assert params is not None
                        runs = self._run_workload(active, params)
                    else:
                        result["converged_by_rule"] = measure(phases, sampler, self.stop)
                if is_sysbench and phases["until_converged"] and not trial.ksm_off:
                    # The workload ended; keep sampling until KSM settles (bounded by the cap).
                    with clock.phase("tail", sampler, self.progress):
                        result["converged_by_rule"] = measure(dict(phases, measure_s=0), sampler, self.stop)
                memory_rows += self._guest_memory(active, "end", params)
        finally:
            result["frames"] = {
                "ksm": sampler.ksm_frame(),
                "processes": sampler.process_frame(),
                "guest_memory": pd.DataFrame(memory_rows),
            }
            result["sampler"] = sampler_health(sampler)
            if runs:
                result["frames"]["workload"] = sysbench.intervals_frame(runs)
                result["json"] = {"workload_summary": sysbench.summary_dict(runs)}
        failed = {name: run.error for name, run in runs.items() if not run.ok}
        if failed:
            details = "; ".join(f"{name}: {error}" for name, error in failed.items())
            tails = "\n".join(f"--- {g.name} console ---\n{console_tail(g.console_log_path, 15)}"
                              for g in active.guest_set.guests if g.name in failed)
            raise WorkloadError(f"sysbench failed in {len(failed)} guest(s): {details}\n{tails}")

    def _run_workload(self, active: ActiveGuests, params: sysbench.SysbenchParams) -> dict[str, sysbench.GuestRun]:
        """sysbench in every guest at once; a stop request does not wait for it to finish
        (the guests are torn down, which ends the sessions)."""
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ksmlab-sysbench")
        future = pool.submit(sysbench.run_all, active.sessions, params, params.duration_s + 300)
        try:
            while not future.done():
                if self.stop.wait(0.5):
                    raise StopRequested("interrupted during the workload")
            return future.result()
        finally:
            pool.shutdown(wait=False)

    def _guest_memory(self, active: ActiveGuests, when: str, params: Any) -> list[dict[str, Any]]:
        """What was in the guests' memory that KSM merged: meminfo (+ InnoDB buffer pool)."""
        rows = []
        for name, session in active.sessions.items():
            try:
                rows.append(guestmem.snapshot(session, name, when, params=params, timeout_s=SNAPSHOT_TIMEOUT_S,
                                              with_buffer_pool=params is not None))
            except OrchestratorError as exc:
                log.warning("guest memory snapshot of %s (%s) failed: %s", name, when, exc)
        return rows


def prepared_dir(image: images.ImageRef) -> Path:
    """Prepared layers live beside the cached image they are built on."""
    if image.manifest_path is not None:
        return Path(image.manifest_path).parent / "prepared"
    return images.default_cache_dir() / "prepared" / hashlib.sha256(str(image.disk_path).encode()).hexdigest()[:12]

