"""`check`: what this host lacks for a study, before anything is touched."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import OrchestratorError
from orchestrator.ksm import KSM_REL, THP_REL, find_pids_by_comm, run_dir


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str = ""


def _writable(path: Path) -> CheckResult:
    if not path.exists():
        return CheckResult(str(path), False, "missing")
    return CheckResult(str(path), os.access(path, os.W_OK), "writable" if os.access(path, os.W_OK) else "not writable (run as root)")


def ksm_checks(root: Path = Path("/")) -> list[CheckResult]:
    ksm_dir = root / KSM_REL
    if not ksm_dir.is_dir():
        return [CheckResult("KSM", False, f"{ksm_dir} missing: kernel without CONFIG_KSM")]
    results = [CheckResult("KSM", True, f"{len(list(ksm_dir.iterdir()))} files in {ksm_dir}")]
    for knob in ("run", "pages_to_scan", "sleep_millisecs"):
        r = _writable(ksm_dir / knob)
        results.append(CheckResult(f"ksm/{knob}", r.ok, r.detail))
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


def run_checks(plan_path: Path | None, root: Path = Path("/")) -> list[CheckResult]:
    results = ksm_checks(root)
    needs_vms = False
    if plan_path is not None:
        from orchestrator.plan import check_against_host, expand, load_plan

        try:
            plan, _ = load_plan(plan_path)
            trials = expand(plan)
            check_against_host(trials, root / KSM_REL)
            results.append(CheckResult("plan", True, f"{plan_path}: {len(trials)} trials"))
            needs_vms = plan.guests is not None
        except OrchestratorError as exc:
            results.append(CheckResult("plan", False, str(exc)))
    if needs_vms or plan_path is None:
        try:
            from orchestrator.hostsetup import check_host

            for r in check_host(plan_needs_vms=needs_vms):
                # Informational checks (e.g. "kvm: no -> TCG") do not make the host unready.
                blocking = getattr(r, "blocking", True) and needs_vms
                detail = r.detail if r.ok or blocking else f"(informational) {r.detail}"
                results.append(CheckResult(r.name, r.ok or not blocking, detail))
        except ImportError as exc:
            results.append(CheckResult("VM support", not needs_vms, f"unavailable: {exc}"))
    return results
