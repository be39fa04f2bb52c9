"""The idle workload: guests that only run. What they hold in memory after boot is what KSM merges."""

from __future__ import annotations

from typing import ClassVar, Literal

from orchestrator.plugins import WorkloadPlugin
from orchestrator.validation import Strict


class IdleWorkload(Strict):
    """[workload] type = "idle": no keys."""

    type: Literal["idle"] = "idle"

    writes_during_measure: ClassVar[bool] = False


PLUGIN = WorkloadPlugin(type="idle", model=IdleWorkload, runner="orchestrator.runners.vm:VmRunner", where="guests")
