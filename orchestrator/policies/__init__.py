"""KSM policies: who drives the knobs during a trial's measure phase.

static    the plan's knobs, run=1 (what ksm-lab always did)
advisor   the kernel's scan-time advisor (Linux 6.8+) drives pages_to_scan
ksmtuned  the distribution's ksmtuned daemon, started for the trial and stopped by PID
kubevirt  an emulation of KubeVirt's virt-handler node rule, as a controller thread
throttler an emulation of Kata's ksm-throttler: bursts of scanning after each guest/worker start

Each policy is one small module with a pure rule (tested without sysfs) and a `Run` object the
sweep holds for one trial: `start()` replaces "write run=1" at the start of measure, `stop()`
runs before the sweep resets KSM, `summary()` goes into trial.json under "policy". A Run with
an `on_start(source)` method hears each guest or worker start the runner announces
(HostSettings.announce_start): the throttler acts on them.
Before a policy writes a knob behind HostSettings' back (ksmtuned, the advisor), the knob's
current value is recorded (HostSettings.remember), so restore() puts it back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from orchestrator.policies.params import POLICY_NAMES


class PolicyRun(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def summary(self) -> dict[str, Any]: ...


def run_for(policy: dict[str, Any], settings: Any, work_dir: Path) -> PolicyRun:
    """The Run of a trial's policy ({"name", <name>: params}); work_dir holds its files
    (the trial's folder: ksmtuned's log and configuration land there)."""
    name = policy.get("name", "static")
    if name == "static":
        from orchestrator.policies.static import StaticRun

        return StaticRun(settings)
    if name == "advisor":
        from orchestrator.policies.advisor import AdvisorRun

        return AdvisorRun(settings)
    if name == "ksmtuned":
        from orchestrator.policies.ksmtuned import KsmtunedRun, params_from

        return KsmtunedRun(settings, params_from(policy), work_dir)
    if name == "kubevirt":
        from orchestrator.policies.kubevirt import KubevirtRun, params_from as kv_params

        return KubevirtRun(settings, kv_params(policy))
    if name == "throttler":
        from orchestrator.policies.throttler import ThrottlerRun, params_from as th_params

        return ThrottlerRun(settings, th_params(policy))
    raise ValueError(f"unknown KSM policy {name!r} (known: {', '.join(POLICY_NAMES)})")


def check_host(trials: list[Any], root: Path = Path("/")) -> None:
    """Before the sweep touches anything: the policies its trials use can run here (ksmtuned
    installed, /etc/ksmtuned.conf not overriding the plan). The advisor's kernel check is
    plan.check_against_host's."""
    if any(t.policy.get("name") == "ksmtuned" for t in trials):
        from orchestrator.policies.ksmtuned import KSMTUNED, SYSTEM_CONF, KsmtunedRun
        from orchestrator.policies.params import KsmtunedParams

        KsmtunedRun(None, KsmtunedParams(), root, executable=root / KSMTUNED.relative_to("/"),
                    system_conf=root / SYSTEM_CONF.relative_to("/")).check()
