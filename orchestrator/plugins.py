"""Workloads and KSM policies are plugins: each registers one WorkloadPlugin under the entry-point
group `ksm_lab.workloads`, or one PolicyPlugin under `ksm_lab.policies`, the shipped ones exactly
like a third party's (pyproject.toml). Adding a workload is one module (its model, runner and
parsers) plus its tests, adding a policy one module (its Run, its [ksm.<name>] model and hooks)
plus its tests, with no edit elsewhere.

The plan validates [workload] with the union of the registered models ("type" tells them
apart); the sweep runs a trial with the registered runner. The runner is named by a
"module:Class" string and loaded only by the sweep, so nothing below the runners imports them.
The plan validates [ksm] policy against the registered policies and [ksm.<name>] with each
one's model; the sweep starts a trial's policy with its plugin's `start`. Policies sit below the
plan (they import only the host layer), so a PolicyPlugin holds its callables directly.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import logging
from dataclasses import dataclass
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from orchestrator.errors import PlanError

log = logging.getLogger(__name__)

WORKLOAD_GROUP = "ksm_lab.workloads"
POLICY_GROUP = "ksm_lab.policies"
SHIPPED_PREFIX = "orchestrator."  # entry points into our own package: the shipped plugins


@dataclass(frozen=True)
class WorkloadPlugin:
    """What the plan and the sweep need of a workload.

    type:   the [workload] table's `type`; also the model's `type: Literal[...]` default
    model:  its pydantic model (orchestrator.validation.Strict), the only place its keys and
            defaults live; a ClassVar `writes_during_measure` says whether it rewrites memory
            while KSM measures (then savings are averaged over time)
    runner: "module:Class" of its TrialRunner (orchestrator.runners.base.TrialRunner)
    where:  "host" (no [guests] table allowed) or "guests" (a [guests] table required)
    """

    type: str
    model: type
    runner: str
    where: Literal["host", "guests"]


@dataclass(frozen=True)
class PolicyPlugin:
    """What the plan and the sweep need of a KSM policy (who drives the knobs during measure).

    name:       [ksm] policy = "<name>"; its parameter table, if any, is [ksm.<name>]
    start:      start(settings, params, work_dir) -> the trial's Run (start/stop/summary, see
                orchestrator.policies.PolicyRun): settings the trial's HostSettings, params the
                validated [ksm.<name>] (None without a model), work_dir the trial's folder
    params:     the pydantic model of [ksm.<name>] (orchestrator.validation.Strict), or None
    knobs:      knobs(ksm) adjusts a trial's knob dict when the plan is expanded (the advisor
                sets advisor_mode); raises PlanError for knobs the policy cannot run with
    refusal:    refusal(ksm_dir) -> why this kernel cannot run the policy, None when it can
                (checked by the sweep and `check` before anything is touched)
    check_host: check_host(root) raises HostError when the host lacks what the policy runs
                (ksmtuned's script), before the sweep touches anything
    """

    name: str
    start: Callable[[Any, Any, Path], Any]
    params: type | None = None
    knobs: Callable[[dict[str, Any]], None] | None = None
    refusal: Callable[[Path], str | None] | None = None
    check_host: Callable[[Path], None] | None = None


def load_object(ref: str) -> Any:  # a runner named by a plugin
    """The object a "package.module:attribute" reference names."""
    module_name, _, attribute = ref.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attribute.split(".") if attribute else []:
        obj = getattr(obj, part)
    return obj


def _check_workload(name: str, plugin: Any) -> WorkloadPlugin:
    if not isinstance(plugin, WorkloadPlugin):
        raise PlanError(f"workload plugin {name!r} is a {type(plugin).__name__}, not a WorkloadPlugin")
    field = getattr(plugin.model, "model_fields", {}).get("type")
    if field is None or field.default != plugin.type:
        raise PlanError(f"workload plugin {name!r}: its model needs `type: Literal[{plugin.type!r}] = {plugin.type!r}`")
    if plugin.where not in ("host", "guests") or ":" not in plugin.runner:
        raise PlanError(f"workload plugin {name!r}: where must be 'host' or 'guests' and runner 'module:Class'")
    return plugin


def _check_policy(name: str, plugin: Any) -> PolicyPlugin:
    if not isinstance(plugin, PolicyPlugin):
        raise PlanError(f"policy plugin {name!r} is a {type(plugin).__name__}, not a PolicyPlugin")
    if plugin.name != name or not name.isidentifier():
        raise PlanError(
            f"policy plugin {name!r}: its entry point's name and PolicyPlugin.name ({plugin.name!r}) "
            "must be the same identifier"
        )
    if plugin.params is not None and not hasattr(plugin.params, "model_fields"):
        raise PlanError(f"policy plugin {name!r}: params must be a pydantic model or None")
    hooks = {"start": plugin.start, "knobs": plugin.knobs, "refusal": plugin.refusal, "check_host": plugin.check_host}
    for hook, value in hooks.items():
        if not callable(value) and not (hook != "start" and value is None):
            raise PlanError(f"policy plugin {name!r}: {hook} must be callable")
    return plugin


def _registered(group: str, kind: str, check: Callable[[str, Any], Any]) -> dict[str, Any]:
    """Every plugin registered under `group` by name, the shipped ones first. A third-party
    plugin that fails to load is left out with a warning naming it (a broken package must not
    stop the shipped ones); one claiming a name already registered is left out too."""
    entries = sorted(
        importlib.metadata.entry_points(group=group),
        key=lambda e: (not e.value.startswith(SHIPPED_PREFIX), e.name, e.value),
    )
    plugins: dict[str, Any] = {}
    for entry in entries:
        shipped = entry.value.startswith(SHIPPED_PREFIX)
        if entry.name in plugins:
            if not shipped:
                log.warning(
                    "%s plugin %r (%s) left out: that name is already registered", kind, entry.name, entry.value
                )
            continue
        try:
            plugins[entry.name] = check(entry.name, entry.load())
        except Exception as exc:  # noqa: BLE001 - a third party's import error of any kind
            if shipped:
                raise
            log.warning("%s plugin %r (%s) left out: %s: %s", kind, entry.name, entry.value, type(exc).__name__, exc)
    if not any(e.value.startswith(SHIPPED_PREFIX) for e in entries):
        raise PlanError(
            f"no {kind} plugins registered: ksm-lab is not installed as a package here "
            "(pip install -e . in a checkout, or `make venv`)"
        )
    return plugins


@functools.cache
def workload_plugins() -> dict[str, WorkloadPlugin]:
    """Every registered workload by type, the shipped ones first (see _registered)."""
    return _registered(WORKLOAD_GROUP, "workload", _check_workload)


@functools.cache
def policy_plugins() -> dict[str, PolicyPlugin]:
    """Every registered KSM policy by name, the shipped ones first (see _registered)."""
    return _registered(POLICY_GROUP, "policy", _check_policy)
