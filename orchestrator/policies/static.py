"""static: the plan's knobs as applied, KSM on for measure (ksm-lab's behaviour before policies)."""

from __future__ import annotations

from typing import Any

from orchestrator.plugins import PolicyPlugin


class StaticRun:
    def __init__(self, settings: Any) -> None:
        self.settings = settings

    def start(self) -> None:
        self.settings.run_ksmd()

    def stop(self) -> None:
        return None

    def summary(self) -> dict[str, Any]:
        return {"name": "static"}


PLUGIN = PolicyPlugin(name="static", start=lambda settings, params, work_dir: StaticRun(settings))
