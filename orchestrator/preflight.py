"""`check`: what this host lacks for a study, before anything is touched."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from orchestrator.errors import OrchestratorError
from orchestrator.hostsetup import CheckResult, check_host, libvirt_uri
from orchestrator.ksm import THP_REL, find_pids_by_comm, run_dir
from orchestrator.probes import KSM_SYSFS


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
    tuned = find_pids_by_comm("ksmtuned", root)
    results.append(CheckResult("ksmtuned not running", not tuned,
                               f"running as pid {tuned}: stop it first" if tuned else "not running"))
    rd = run_dir()
    try:
        rd.mkdir(parents=True, exist_ok=True)
        results.append(CheckResult("lock folder", os.access(rd, os.W_OK), str(rd)))
    except OSError as exc:
        results.append(CheckResult("lock folder", False, f"{rd}: {exc.strerror}"))
    return results


def run_checks(plan_path: Path | None, root: Path = Path("/"), connect: str | None = None) -> list[CheckResult]:
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
        except OrchestratorError as exc:
            results.append(CheckResult("plan", False, str(exc)))
    vm_results = check_host(plan_needs_vms=True, uri=libvirt_uri(connect, plan_uri))
    if not needs_vms:
        # Without a VM plan the VM checks are information: they cannot make the host unready.
        vm_results = [dataclasses.replace(r, blocking=False) for r in vm_results]
    return results + vm_results


def ready(results: list[CheckResult]) -> bool:
    return all(r.ok or not r.blocking for r in results)
