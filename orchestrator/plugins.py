"""Workloads are plugins: each registers one WorkloadPlugin under the entry-point group
`ksm_lab.workloads`, the shipped ones exactly like a third party's (pyproject.toml), so adding a
workload is one module (its model, runner and parsers) plus its tests, with no edit elsewhere.

The plan validates [workload] with the union of the registered models ("type" tells them
apart); the sweep runs a trial with the registered runner. The runner is named by a
"module:Class" string and loaded only by the sweep, so nothing below the runners imports them.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import logging
from dataclasses import dataclass
from typing import Any, Literal

from orchestrator.errors import PlanError

log = logging.getLogger(__name__)

WORKLOAD_GROUP = "ksm_lab.workloads"
SHIPPED_PREFIX = "orchestrator."  # entry points into our own package: the shipped workloads


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


def load_object(ref: str) -> Any:  # a runner named by a plugin
    """The object a "package.module:attribute" reference names."""
    module_name, _, attribute = ref.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attribute.split(".") if attribute else []:
        obj = getattr(obj, part)
    return obj


def _check(name: str, plugin: Any) -> WorkloadPlugin:
    if not isinstance(plugin, WorkloadPlugin):
        raise PlanError(f"workload plugin {name!r} is a {type(plugin).__name__}, not a WorkloadPlugin")
    field = getattr(plugin.model, "model_fields", {}).get("type")
    if field is None or field.default != plugin.type:
        raise PlanError(f"workload plugin {name!r}: its model needs `type: Literal[{plugin.type!r}] = {plugin.type!r}`")
    if plugin.where not in ("host", "guests") or ":" not in plugin.runner:
        raise PlanError(f"workload plugin {name!r}: where must be 'host' or 'guests' and runner 'module:Class'")
    return plugin


@functools.cache
def workload_plugins() -> dict[str, WorkloadPlugin]:
    """Every registered workload by type, the shipped ones first. A third-party plugin that
    fails to load is left out with a warning naming it (a broken package must not stop the
    shipped workloads); one claiming a type already registered is left out too."""
    entries = sorted(importlib.metadata.entry_points(group=WORKLOAD_GROUP),
                     key=lambda e: (not e.value.startswith(SHIPPED_PREFIX), e.name, e.value))
    plugins: dict[str, WorkloadPlugin] = {}
    for entry in entries:
        shipped = entry.value.startswith(SHIPPED_PREFIX)
        if entry.name in plugins:
            if not shipped:
                log.warning("workload plugin %r (%s) left out: that type is already registered", entry.name, entry.value)
            continue
        try:
            plugins[entry.name] = _check(entry.name, entry.load())
        except Exception as exc:  # noqa: BLE001 - a third party's import error of any kind
            if shipped:
                raise
            log.warning("workload plugin %r (%s) left out: %s: %s", entry.name, entry.value, type(exc).__name__, exc)
    if not any(e.value.startswith(SHIPPED_PREFIX) for e in entries):
        raise PlanError("no workloads registered: ksm-lab is not installed as a package here "
                        "(pip install -e . in a checkout, or `make venv`)")
    return plugins
