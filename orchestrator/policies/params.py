"""Plan tables of the KSM policies ([ksm.ksmtuned], [ksm.kubevirt], [ksm.throttler]): pydantic only, so that
plan.py can import them without pulling in the policies' runtime (threads, subprocesses)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from orchestrator.validation import Strict as _Strict


class KsmtunedParams(_Strict):
    """ksmtuned's settings (its KSM_* variables); defaults are the script's own except the
    monitor interval: its 60 s would adjust less than once in a minute-long trial."""

    monitor_interval_s: int = Field(10, ge=1, le=3600)  # KSM_MONITOR_INTERVAL
    npages_boost: int = Field(300, ge=0)  # KSM_NPAGES_BOOST
    npages_decay: int = Field(-50, le=0)  # KSM_NPAGES_DECAY
    npages_min: int = Field(64, ge=0)  # KSM_NPAGES_MIN
    npages_max: int = Field(1250, ge=1)  # KSM_NPAGES_MAX
    thres_coef: int = Field(20, ge=0, le=100)  # KSM_THRES_COEF: % of MemTotal
    thres_const: int = Field(2048, ge=0)  # KSM_THRES_CONST: KiB
    sleep_ms: int = Field(10, ge=1)  # KSM_SLEEP_MSEC: sleep for a 16 GiB host, scaled by size


class KubevirtParams(_Strict):
    """KubeVirt's virt-handler KSM rule; defaults are KubeVirt's constants (and the node
    annotations that override them), except the period: KubeVirt spins every 3 minutes."""

    period_s: float = Field(10.0, gt=0, le=3600)
    pages_boost: int = Field(300, ge=0)
    pages_decay: int = Field(-50, le=0)
    pages_min: int = Field(64, ge=0)
    pages_max: int = Field(1250, ge=1)
    pages_init: int = Field(100, ge=0)
    sleep_ms_baseline: int = Field(100, ge=1)
    free_percent: float = Field(0.2, ge=0, le=1)  # a fraction of MemTotal, as in KubeVirt


class ThrottlerParams(_Strict):
    """Kata's ksm-throttler: how long each step lasts after a guest (or worker) start. Defaults
    are its ksmAggressiveInterval, ksmStandardInterval and ksmSlowInterval; shorter ones let a
    trial (or a test) see the whole sequence."""

    aggressive_s: float = Field(30.0, gt=0, le=3600)  # AnonPages/10 every 1 ms
    standard_s: float = Field(120.0, gt=0, le=3600)  # AnonPages/100 every 10 ms
    slow_s: float = Field(120.0, gt=0, le=3600)  # AnonPages/500 every 100 ms
    # The run state the throttler finds and returns to after the slow step (its "initial"
    # settings, with the plan's pages_to_scan and sleep_millisecs): 1, a host that runs KSM
    # between starts (what static measures); 0, KSM stopped between starts (merged pages stay).
    initial_run: Literal[0, 1] = 1
