"""KSM policies: who drives the knobs during a trial's measure phase.

static    the plan's knobs, run=1 (what ksm-lab always did)
advisor   the kernel's scan-time advisor (Linux 6.8+) drives pages_to_scan
ksmtuned  the distribution's ksmtuned daemon, started for the trial and stopped by PID
kubevirt  an emulation of KubeVirt's virt-handler node rule, as a controller thread
throttler an emulation of Kata's ksm-throttler: bursts of scanning after each guest/worker start

Each policy is one small module, a plugin registered under the entry-point group
`ksm_lab.policies` (orchestrator/plugins.py, PolicyPlugin; the shipped ones in pyproject.toml like a
third party's), with a pure rule (tested without sysfs) and a `Run` object the sweep holds for one
trial: `start()` replaces "write run=1" at the start of measure, `stop()`
runs before the sweep resets KSM, `summary()` goes into trial.json under "policy". A Run with
an `on_start(source)` method hears each guest or worker start the runner announces
(HostSettings.announce_start): the throttler acts on them.
Before a policy writes a knob behind HostSettings' back (ksmtuned, the advisor), the knob's
current value is recorded (HostSettings.remember), so restore() puts it back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from orchestrator.plugins import policy_plugins


class PolicyRun(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def summary(self) -> dict[str, Any]: ...


def run_for(policy: dict[str, Any], settings: Any, work_dir: Path) -> PolicyRun:
    """The Run of a trial's policy ({"name", <name>: params}); work_dir holds its files
    (the trial's folder: ksmtuned's log and configuration land there)."""
    name = policy.get("name", "static")
    plugins = policy_plugins()
    if name not in plugins:
        raise ValueError(f"unknown KSM policy {name!r} (installed: {', '.join(sorted(plugins))})")
    plugin = plugins[name]
    params = plugin.params.model_validate(policy.get(name) or {}) if plugin.params is not None else None
    return plugin.start(settings, params, work_dir)


def check_host(trials: list[Any], root: Path = Path("/")) -> None:
    """Before the sweep touches anything: the policies its trials use can run here (ksmtuned
    installed, /etc/ksmtuned.conf not overriding the plan). A kernel's refusal (the advisor's)
    is plan.check_against_host's."""
    plugins = policy_plugins()
    for name in sorted({t.policy.get("name", "static") for t in trials}):
        check = plugins[name].check_host
        if check is not None:
            check(root)
