"""`check`: what this host lacks for a study, before anything is touched."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

from orchestrator.errors import OrchestratorError
from orchestrator.guests.hostsetup import CheckResult, check_host, libvirt_uri
from orchestrator.host.ksm import THP_REL, run_dir
from orchestrator.host.probes import live_pids_named
from orchestrator.host.probes import KSM_SYSFS
from orchestrator.units import MIB


# Daemons that drive KSM on their own (the comm the kernel shows: at most 15 characters). The
# sweep refuses ksmtuned (it rewrites the knobs every minute); these are warned about, since they
# may be installed with their KSM handling off.
OTHER_KSM_DRIVERS = {
    "oVirt MOM (momd)": "momd",
    "Kata ksm-throttler": "kata-ksm-thrott",
    "KubeVirt virt-handler (with KSM handling on it drives the knobs)": "virt-handler",
}


def _writable(name: str, path: Path) -> CheckResult:
    if not path.exists():
        return CheckResult(name, False, f"{path} missing")
    writable = os.access(path, os.W_OK)
    return CheckResult(name, writable, "writable" if writable else "not writable (run as root)")


def ksm_checks(root: Path = Path("/")) -> list[CheckResult]:
    ksm_dir = root / KSM_SYSFS
    if not ksm_dir.is_dir():
        return [CheckResult("KSM", False, f"{ksm_dir} missing: kernel without CONFIG_KSM")]
    results = [CheckResult("KSM", True, f"{len(list(ksm_dir.iterdir()))} files in {ksm_dir}")]
    results += [_writable(f"ksm/{knob}", ksm_dir / knob) for knob in ("run", "pages_to_scan", "sleep_millisecs")]
    thp = root / THP_REL / "enabled"
    results.append(CheckResult("THP enabled", thp.exists(), thp.read_text().strip() if thp.exists() else "missing"))
    tuned = live_pids_named("ksmtuned", root)
    results.append(
        CheckResult(
            "ksmtuned not running", not tuned, f"running as pid {tuned}: stop it first" if tuned else "not running"
        )
    )
    others = {what: pids for what, comm in OTHER_KSM_DRIVERS.items() if (pids := live_pids_named(comm, root))}
    results.append(
        CheckResult(
            "no other KSM driver",
            not others,
            "; ".join(
                f"{what} running as pid {pids}: it may write the KSM knobs during the study"
                for what, pids in others.items()
            )
            or "none of " + ", ".join(OTHER_KSM_DRIVERS) + " running",
            blocking=False,
        )
    )
    rd = run_dir()
    try:
        rd.mkdir(parents=True, exist_ok=True)
        results.append(CheckResult("lock folder", os.access(rd, os.W_OK), str(rd)))
    except OSError as exc:
        results.append(CheckResult("lock folder", False, f"{rd}: {exc.strerror}"))
    return results


def run_checks(
    plan_path: Path | None, root: Path = Path("/"), results_dir: Path = Path("results"), connect: str | None = None
) -> list[CheckResult]:
    """Every check; `ready(results)` says whether the host can run the plan.

    libvirt is probed where the sweep would go: `connect` (-c), $LIBVIRT_DEFAULT_URI, the
    plan's [guests] uri, qemu:///system (hostsetup.libvirt_uri)."""
    results = ksm_checks(root)
    needs_vms = False
    plan_uri = None
    if plan_path is not None:
        from orchestrator.plan import check_against_host, expand, load_plan

        try:
            plan, _ = load_plan(plan_path)
            trials = expand(plan)
            check_against_host(trials, root / KSM_SYSFS)
            results.append(CheckResult("plan", True, f"{plan_path}: {len(trials)} trials"))
            needs_vms = plan.guests is not None
            plan_uri = plan.guests.uri if plan.guests is not None else None
            results += space_checks(plan, trials, results_dir)
            if needs_vms:
                results += qemu_reach_checks(plan)
                results += memory_backing_checks(trials)
        except OrchestratorError as exc:
            results.append(CheckResult("plan", False, str(exc)))
    vm_results = check_host(plan_needs_vms=True, uri=libvirt_uri(connect, plan_uri))
    if (kvm_row := kvm_access_check(root)) is not None:
        vm_results.append(kvm_row)
    if not needs_vms:
        # Without a VM plan the VM checks are information: they cannot make the host unready.
        vm_results = [dataclasses.replace(r, blocking=False) for r in vm_results]
    return results + vm_results


# Generous per-row sizes of the CSVs a trial writes, measured on this host's studies (a ksm.csv
# row of every column is ~700 bytes, a processes.csv row ~200) and doubled.
KSM_ROW_BYTES = 1500
PROCESS_ROW_BYTES = 400
TRIAL_FIXED_BYTES = 2 * MIB  # trial.json, workload files, the report's share
OVERLAY_GROWTH_MIB = {"idle": 64, "sysbench": 512, "processes": 0}  # a guest's writes in one trial


def space_needs(plan: Any, trials: list[Any], results_dir: Path) -> dict[Path, int]:
    """Bytes a study needs on each file system it writes: results, guest overlays, saved states.
    Keyed by an existing folder on that file system (the nearest existing parent)."""
    from orchestrator.plan import fast_interval_s
    from orchestrator.workloads.processes import ProcessesParams

    needs: dict[Path, int] = {}

    def add(path: Path, nbytes: int) -> None:
        folder = Path(path)
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        needs[folder] = needs.get(folder, 0) + int(nbytes)

    for trial in trials:
        phases, guests, workload = trial.phases_model, trial.guests_model, trial.workload_model
        seconds = (
            phases.baseline_s
            + phases.settle_s
            + phases.steady_max_s
            + (phases.max_measure_s if phases.until_converged else phases.measure_s)
        )
        fast = fast_interval_s(trial.sampling_model, workload)
        targets = guests.count if guests else workload.processes if isinstance(workload, ProcessesParams) else 1
        add(
            results_dir,
            TRIAL_FIXED_BYTES
            + seconds / fast * KSM_ROW_BYTES
            + seconds / trial.sampling_model.interval_s * targets * PROCESS_ROW_BYTES,
        )
    if plan.guests is not None:
        from orchestrator.guests.provision import DEFAULT_WORK_ROOT

        g = plan.guests
        work = Path(g.workdir) if g.workdir else DEFAULT_WORK_ROOT
        most = max(t.guests_model.count for t in trials if t.guests_model)
        add(work, most * OVERLAY_GROWTH_MIB.get(plan.workload.type, 512) * MIB)
        if g.start == "restore":
            # A saved state takes at most the guests' RAM (only touched pages are written).
            from orchestrator.guests.images import default_cache_dir

            add(default_cache_dir() if g.cache_states else work, most * g.memory_mib * MIB)
    return needs


def space_checks(plan: Any, trials: list[Any], results_dir: Path) -> list[CheckResult]:
    results = []
    for folder, nbytes in space_needs(plan, trials, results_dir).items():
        free = shutil.disk_usage(folder).free
        results.append(
            CheckResult(
                f"free space in {folder}",
                free >= nbytes,
                f"{free / MIB:.0f} MiB free, the study needs up to {nbytes / MIB:.0f} MiB",
            )
        )
    return results


# The user libvirt's QEMU driver runs guests as, unless qemu.conf says otherwise (Debian's name).
QEMU_USER = "libvirt-qemu"
QEMU_CONF = Path("/etc/libvirt/qemu.conf")


def _qemu_conf_value(name: str, qemu_conf: Path) -> str | None:
    """The value of qemu.conf's last active `name = "..."` line, None when absent."""
    try:
        lines = qemu_conf.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        key, _, value = line.partition("=")
        if key.strip() == name and not line.lstrip().startswith("#"):
            return value.strip().strip('"') or None
    return None


def qemu_user(qemu_conf: Path = QEMU_CONF) -> str:
    """The user= of qemu.conf's active lines, else libvirt's default."""
    return _qemu_conf_value("user", qemu_conf) or QEMU_USER


def _qemu_ids(user: str, qemu_conf: Path) -> tuple[int, set[int]] | None:
    """QEMU's uid and groups: qemu.conf's group= (else the user's own), plus the user's
    supplementary groups, which libvirt gives the QEMU process. None: no such user here."""
    import grp
    import pwd

    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return None
    gids = {entry.pw_gid, *(g.gr_gid for g in grp.getgrall() if user in g.gr_mem)}
    if (group := _qemu_conf_value("group", qemu_conf)) is not None:
        try:
            gids = (gids - {entry.pw_gid}) | {grp.getgrnam(group).gr_gid}
        except KeyError:
            pass  # libvirt refuses to start QEMU then, and says so
    return entry.pw_uid, gids


def _access_bits(st: os.stat_result, uid: int, gids: set[int]) -> int:
    """The rwx bits (0-7) of a file's mode that apply to uid with these groups (owner, else
    group, else other: the first class that matches decides, as the kernel does; ACLs aside)."""
    if st.st_uid == uid:
        return (st.st_mode >> 6) & 7
    if st.st_gid in gids:
        return (st.st_mode >> 3) & 7
    return st.st_mode & 7


def unreachable_by(folder: Path, uid: int, gids: set[int]) -> Path | None:
    """The first folder on the way to `folder` (itself or the nearest existing parent) that
    `uid` cannot search, or None: QEMU opens its disks by path, so every folder above them
    needs x for its user (a 0700 folder anywhere above stops it)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    for step in (*reversed(folder.parents), folder):
        if not _access_bits(step.stat(), uid, gids) & 1:
            return step
    return None


def qemu_reach_checks(plan: Any, qemu_conf: Path = QEMU_CONF) -> list[CheckResult]:
    """Can QEMU's user reach the folders its disks live in (overlays, saved states, the image)?"""
    from orchestrator.guests.images import default_cache_dir
    from orchestrator.guests.provision import DEFAULT_WORK_ROOT

    user = qemu_user(qemu_conf)
    ids = _qemu_ids(user, qemu_conf)
    if ids is None:
        return []  # no such user here: libvirt will say so itself, and `host setup` creates it
    uid, gids = ids
    if uid == 0:
        return []
    g = plan.guests
    folders = {
        "guest work folder": Path(g.workdir) if g.workdir else DEFAULT_WORK_ROOT,
        "image cache": default_cache_dir(),
    }
    results = []
    for name, folder in folders.items():
        blocked = unreachable_by(folder, uid, gids)
        results.append(
            CheckResult(
                f"{name} reachable by {user}",
                blocked is None,
                f"{folder}"
                if blocked is None
                else f"{blocked} (mode {blocked.stat().st_mode & 0o777:o}) lets {user} not search it: QEMU cannot "
                f"open disks under {folder}; give the folders above it x for {user} (e.g. chmod o+x {blocked})",
            )
        )
    return results


def kvm_access_check(root: Path = Path("/"), qemu_conf: Path = QEMU_CONF) -> CheckResult | None:
    """Can QEMU's user (qemu.conf, else libvirt's default) open /dev/kvm read-write? This user
    (root) can, so domain_type "auto" picks kvm wherever the CPU has vmx/svm; a /dev/kvm only
    root may open (0600 root:root, a host without udev's kvm rule) then fails every guest start.
    A warning, not a refusal: TCG guests (domain_type "qemu") do not need it. None: no /dev/kvm,
    or no such user (libvirt says so itself)."""
    import grp
    import pwd

    dev_kvm = root / "dev/kvm"
    try:
        st = dev_kvm.stat()
    except OSError:
        return None
    user = qemu_user(qemu_conf)
    ids = _qemu_ids(user, qemu_conf)
    if ids is None:
        return None
    uid, gids = ids
    name = f"/dev/kvm usable by {user}"
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    mode = f"{st.st_mode & 0o777:o} {owner}:{group}"
    if uid == 0 or _access_bits(st, uid, gids) & 6 == 6:
        return CheckResult(name, True, f"{dev_kvm} is {mode}", blocking=False)
    return CheckResult(
        name,
        False,
        (
            f"{dev_kvm} is {mode}: QEMU runs as {user} (qemu.conf, else libvirt's default) and cannot open it "
            f'read-write, so guests of domain type kvm fail to start (domain_type = "auto" picks kvm when the CPU '
            f"has vmx/svm); give it to a group {user} is in (chgrp kvm {dev_kvm}; chmod 660 {dev_kvm}, as udev's "
            f'kvm rule does) or set [guests] domain_type = "qemu"'
        ),
        blocking=False,
    )


def memory_backing_checks(trials: list[Any]) -> list[CheckResult]:
    """Guest RAM that KSM can never merge (hugepages, memfd or file backing, shared access) makes
    every KSM-on trial measure nothing: refused, naming the [guests] key that asks for it. The
    domain XML is rendered as provisioning would (same template, same [guests] values)."""
    import platform

    from orchestrator.guests import domains

    problems: set[str] = set()
    judged: set[tuple[bool, str | None]] = set()
    for trial in trials:
        g = trial.guests_model
        if g is None or (g.hugepages, g.template) in judged:
            continue
        judged.add((g.hugepages, g.template))
        if g.hugepages:
            problems.add("[guests] hugepages = true (hugetlbfs)")
        try:
            spec = domains.DomainSpec(
                name="ksmlab-check",
                uuid="00000000-0000-4000-8000-000000000000",
                study="check",
                domain_type="qemu",
                arch=platform.machine(),
                memory_mib=g.memory_mib,
                vcpus=g.vcpus,
                overlay_path=Path("/nonexistent/check.qcow2"),
                console_log_path=Path("/nonexistent/console.log"),
                boot=domains.DiskBoot(),
                network=domains.UserNet(host_port=2222),
                nosharepages=g.nosharepages,
                hugepages=g.hugepages,
                vcpu_pins=tuple(g.vcpu_pins or ()),
                numa_node=g.numa_node,
            )
            xml = domains.render_domain_xml(spec, Path(g.template) if g.template else None)
        except OrchestratorError:
            continue  # provisioning names a template (or pins) it cannot use
        rest = [found for found in domains.unmergeable_backing(xml) if not (g.hugepages and found == "<hugepages/>")]
        if rest:
            problems.add(
                f"[guests] template = {g.template!r} renders {' '.join(rest)}"
                if g.template
                else f"the default template renders {' '.join(rest)}"
            )
    if not judged:
        return []
    return [
        CheckResult(
            "guest RAM mergeable backing",
            not problems,
            (
                "; ".join(sorted(problems)) + ": KSM never merges that memory (only private anonymous pages), so "
                "every KSM-on trial would measure nothing; drop it (to measure guests opted out of KSM, use "
                "[guests] nosharepages = true)"
            )
            if problems
            else "private anonymous guest RAM (no hugepages, memfd, file or shared backing)",
        )
    ]


def ready(results: list[CheckResult]) -> bool:
    return all(r.ok or not r.blocking for r in results)
