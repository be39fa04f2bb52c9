"""The base of every settings model (plan sections, workload parameters) and the one way a
pydantic ValidationError becomes "key: problem" lines of a PlanError.

Below plan.py and the workload adapters alike: both import it, it imports neither.
"""

from __future__ import annotations

from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, ValidationError


class Strict(BaseModel):
    """Unknown keys are refused, a validated model never changes, and no number is inf or nan
    (TOML spells both: `boot_timeout_s = inf` would be a wait without a bound)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def problems(
    exc: ValidationError, drop: Callable[[list[str]], list[str]] | None = None, whole: str = "(plan)"
) -> list[str]:
    """One "key: problem (got value)" line per error. `drop(loc)` may return a shorter
    location (the plan drops a discriminated union's tag: "workload.processes.pages");
    `whole` names what an error of no one key is about ("": the message alone)."""
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"] if not str(p).startswith("function-")]
        if drop is not None:
            loc = drop(loc)
        key = ".".join(loc) or whole
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        got = err.get("input")
        tail = "" if err["type"] in ("missing", "extra_forbidden") or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"{key}: {msg}{tail}" if key else f"{msg}{tail}")
    return lines


class RecordPart(BaseModel):
    """A part of a stored record (trial.json's probe, density, sampler, ... parts): its fields
    typed, and keys it does not name (a policy's own, an older study's) kept as read. Numbers
    may be NaN: a measurement that had nothing to measure is stored as NaN. The attribute
    docstrings are the fields' documentation (docs/results.md is generated from them)."""

    model_config = ConfigDict(extra="allow", use_attribute_docstrings=True)


class Params(Strict):
    """A workload's parameters: the model the plan validates its [workload] table with (a bad
    table is one PlanError naming every bad key) and the adapter runs with. (No __init__ of its
    own: pydantic would call it inside the plan's validation too.)"""
