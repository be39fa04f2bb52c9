"""trial.json: the one model of a trial's record (TrialRecord), schema-versioned.

The runners fill its parts (provision, probe, density, sampler, steady wait) through
TrialResult, the sweep assembles the whole record (its only author), the store writes it and
reads it back through ``TrialRecord.from_json``, and the analysis reads the typed fields.

Schema versions (``schema_version`` in the file):
  1  studies written before the record had a model: no ``schema_version`` key, and the reset's
     unmerge time under the top-level key ``unmerge_s`` (the probe's own unmerge time has the
     same name inside "probe": two facts, one name). Read as version 2 with that key renamed.
  2  ``schema_version`` written; the reset's unmerge time is ``reset_unmerge_s``; the search's
     reason is the typed field ``search_reason`` (never spread over the record's own fields).
A file of a version not listed here is refused: "older/newer schema N, this ksm-lab reads M".
"""

from __future__ import annotations

import inspect
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from orchestrator.errors import StoreError
from orchestrator.validation import RecordPart, problems
from orchestrator.workloads.density import DensityRecord

TRIAL_SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
STATUSES = ("ok", "failed", "not_run")  # not_run: never written by the sweep, said by readers


class PhaseTiming(RecordPart):
    """`timings.<phase>`: one phase's wall-clock span (runners/base.py PhaseClock)."""

    start_wall: float
    """Unix seconds the phase began."""
    end_wall: float | None = None
    """Unix seconds it ended (None: it never did, a failure inside it)."""
    duration_s: float | None = None
    """Its length by the monotonic clock."""


class ProvisionRecord(RecordPart):
    """provision (VM trials): how the guests were started (runners/vm.py). Further keys: what
    provisioning measured (boot_to_ssh_s, restore_s, clock_offset_s, overlays, prepare_s, ...)."""

    start: Literal["boot", "keep", "restore"] | None = None
    """The plan's [guests] start."""
    reused: bool | None = None
    """start = keep: the guests of an earlier trial, not started again."""
    start_s: float | None = None
    """Restore: "start the guests" to "every guest answers"."""
    boot_wall_s: float | None = None
    """Boot: define + boot to SSH."""
    state: str | None = None
    """Restore: the saved state's key."""
    state_reused: bool | None = None
    """Restore: the saved state existed (False: built for this trial)."""
    teardown_s: float | None = None
    """Restore: seconds the restored set took to tear down after the trial."""


class MergeableRecord(RecordPart):
    """`mergeable.<guest>` (VM trials): is its QEMU's guest RAM marked mergeable (smaps VmFlags
    "mg"; host/probes.py)."""

    pid: int | None = None
    """The QEMU process."""
    big_mappings: int | None = None
    """Mappings as large as guest RAM could be."""
    mergeable_mappings: int | None = None
    """Of those, marked mergeable."""
    big_kib: float | None = None
    """Their size."""
    mergeable_kib: float | None = None
    """The marked ones' size."""
    mergeable: bool | None = None
    """Every big mapping marked (None: no big mapping found)."""


class ProbeRecord(RecordPart):
    """probe (probe trials): the merge window, the timed writes and the unmerge (runners/probe.py;
    analysis/costs.py probe_record_metrics turns it into trials.csv columns)."""

    pages: int | None = None
    """Pages of the probe mapping."""
    fill: str | None = None
    """What they hold."""
    mergeable_pages: int | None = None
    """Pages that can merge."""
    merge_target_pages: int | None = None
    """merge_target_pct of those: the merge window ends there."""
    merged_pages: float | None = None
    """The worker's merged pages when the window ended."""
    merge_target_reached: bool | None = None
    """merged_pages reached the target (else merge_timeout_s ended the window)."""
    merge_wall_s: float | None = None
    """The merge window's wall seconds."""
    merge_ksmd_cpu_s: float | None = None
    """ksmd's CPU seconds over it."""
    cow_rows: int | None = None
    """Timed writes written to cow.csv."""
    pages_before_unmerge: float | None = None
    """Page mappings run=2 had to break."""
    unmerge_s: float | None = None
    """Seconds run=2 took with the worker alive: the unmerge measured (not reset_unmerge_s)."""
    pages_sharing_after_unmerge: float | None = None
    """pages_sharing after it (0 when it unmerged everything)."""


class SamplerRecord(RecordPart):
    """sampler: the sampler's health and what its CPU budget bought (runners/base.py
    sampler_health, host/sampler.py budget_record)."""

    error_count: int = 0
    """Ticks whose reads raised."""
    last_error: str | None = None
    """The last of those errors."""
    missed_ticks: int = 0
    """Grid positions skipped because a tick ran late."""
    cpu_budget_pct: float | None = None
    """The plan's budget, % of one core."""
    cpu_s: float | None = None
    """The sampler thread's CPU seconds."""
    cpu_pct: float | None = None
    """The same, % of one core over its run."""
    pss_reads: int | None = None
    """PSS reads (one target each)."""
    pss_floor_reads: int | None = None
    """Of those, forced by the floor."""
    pss_read_cpu_s: float | None = None
    """CPU seconds the PSS reads took."""
    pss_read_max_ms: float | None = None
    """The dearest PSS read."""
    pss_floor_every_pss_ticks: int | None = None
    """k: the floor reads one target every k PSS ticks (the largest k of the run)."""
    pss_floor_share_pct: float | None = None
    """The budget's share left to the floor's reads once the rest of the thread had its own
    (% of one core; never below a quarter of the budget): what k was last sized with."""
    pss_age_bound_ticks: int | None = None
    """The largest age a target's PSS can reach, in ticks."""
    pss_age_bound_s: float | None = None
    """The same in seconds."""
    pss_age_max_s: dict[str, float] = Field(default_factory=dict)
    """{label: the largest age its PSS reached, s}."""


class PolicyRecord(RecordPart):
    """policy: what the trial's KSM policy did (policies/: each Run's summary()). Further keys
    are the policy's own: ksmtuned's adjustments and stopped, kubevirt's steps, the throttler's
    starts and steps (mode, anon_pages, knobs, hold_s), params, error."""

    name: str = "static"
    """static, advisor, ksmtuned, kubevirt or throttler."""
    ksm_turned_on: bool | None = None
    """The policy ever ran KSM during measure (None: it does not say)."""
    stop_error: str | None = None
    """Stopping the policy failed: how."""


class UnknownTrialSchema(StoreError):
    """A trial.json of a schema version this ksm-lab does not read."""


# Keys absent from trial.json when their value is None: a runner that does not produce a part
# leaves it out, as the runners always have.
_OMIT_WHEN_NONE = (
    "search_reason",
    "reset_unmerge_s",
    "ksm_applied",
    "outside_cpu_pct",
    "outside_load_max_pct",
    "policy",
    "provision",
    "mergeable",
    "probe",
    "density",
    "steady_wait_s",
    "steady_timed_out",
    "steady_slopes_mib_per_min",
    "converged_by_rule",
    "rounds_done",
    "sampler",
)


class TrialRecord(BaseModel):
    """trial.json: one trial's record. The field names are the file's keys (trial ids,
    trials.csv and every reader depend on them); the field order is the file's order."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    schema_version: int = TRIAL_SCHEMA_VERSION
    """The record's schema (absent in studies written before it: version 1)."""
    trial_id: str
    """The trial's stable id (its folder's name)."""
    index: int | None = None
    """Its position in the plan's grid."""
    repetition: int | None = None
    """Its block (repetition)."""
    label: str = ""
    """The swept settings as one line."""
    settings: dict[str, Any] = Field(default_factory=dict)
    """{swept axis: value}."""
    ksm: dict[str, Any] = Field(default_factory=dict)
    """{KSM knob: value} the trial applies."""
    host: dict[str, Any] = Field(default_factory=dict)
    """THP and other host knobs the trial applies."""
    workload: dict[str, Any] = Field(default_factory=dict)
    """The resolved [workload] table."""
    guests: dict[str, Any] | None = None
    """The resolved [guests] table (VM trials)."""
    kind: str | None = None
    """The workload type: processes, probe, idle, sysbench, ..."""
    ksm_off: bool = False
    """A KSM-off baseline trial."""
    rerun_of: str | None = None
    """A rerun of a disturbed trial: that trial's id."""
    rerun_in_block: bool = False
    """The rerun ran right after that trial, inside its block."""
    search_reason: str | None = None
    """[search] plans: why the search chose this trial."""
    status: Literal["ok", "failed", "not_run"] = "failed"
    """ok or failed (not_run: said by readers of a trial with no trial.json)."""
    reason: str | None = None
    """Why it failed."""
    started_wall: float | None = None
    """Unix seconds the sweep began the trial."""
    reset_unmerge_s: float | None = None
    """Seconds the reset before the trial took to unmerge what was left (run=2): housekeeping,
    not a measurement (version 1: top-level unmerge_s; the probe's is probe.unmerge_s)."""
    ksm_applied: dict[str, str] | None = None
    """Every settable KSM knob as read once the trial's were applied."""
    outside_cpu_pct: float | None = None
    """Mean CPU use outside the study over measure, % of one core."""
    outside_load_max_pct: float | None = None
    """The plan's limit for it."""
    disturbed: bool = False
    """outside_cpu_pct exceeded the limit (the trial is rerun when the plan says so)."""
    policy: PolicyRecord | None = None
    """What the KSM policy did."""
    timings: dict[str, PhaseTiming] = Field(default_factory=dict)
    """{phase: its span}."""
    ended_wall: float | None = None
    """Unix seconds the trial's teardown ended."""
    provision: ProvisionRecord | None = None
    """VM trials: how the guests were started."""
    mergeable: dict[str, MergeableRecord] | None = None
    """VM trials: {guest: is its RAM marked mergeable}."""
    probe: ProbeRecord | None = None
    """Probe trials: merge, copy-on-write and unmerge."""
    density: DensityRecord | None = None
    """[density] trials: steps, stop_reason, floor_crossed, mismatches (density.csv has the steps)."""
    steady_wait_s: float | None = None
    """How long the steady phase waited."""
    steady_timed_out: bool | None = None
    """It ended at steady_max_s, not steady."""
    steady_slopes_mib_per_min: dict[str, float] | None = None
    """The last slopes it saw (rss, mem_available)."""
    converged_by_rule: bool | None = None
    """Measure ended by the until_converged rule."""
    rounds_done: int | None = None
    """Processes: fills done by the slowest worker."""
    sampler: SamplerRecord | None = None
    """The sampler's health and budget."""

    def to_json(self) -> dict[str, Any]:
        """The record as trial.json holds it (parts a runner did not produce left out)."""
        data = self.model_dump(mode="python")
        for key in _OMIT_WHEN_NONE:
            if data.get(key) is None:
                data.pop(key, None)
        # A part's unset keys stay absent, as the runners always wrote them ({"name": "static"})
        for key, value in data.items():
            if isinstance(getattr(self, key, None), RecordPart) and isinstance(value, dict):
                data[key] = {k: v for k, v in value.items() if v is not None}
        return data

    @classmethod
    def from_json(cls, data: Any, source: str = "trial.json") -> "TrialRecord":
        """A stored trial.json read into the model. StoreError naming the file: a version this
        ksm-lab does not read (one line: "older/newer schema N, this ksm-lab reads M"), or a
        shape the model does not match (the first problems)."""
        if not isinstance(data, dict):
            raise StoreError(f"{source}: not a trial record (a JSON object expected)")
        version = data.get("schema_version", 1)  # written before the model: version 1
        if isinstance(version, bool) or version not in READABLE_VERSIONS:
            if not isinstance(version, int) or isinstance(version, bool):
                age = "unknown"
            else:
                age = "newer" if version > TRIAL_SCHEMA_VERSION else "older"
            raise UnknownTrialSchema(f"{source}: {age} schema {version!r}, this ksm-lab reads {TRIAL_SCHEMA_VERSION}")
        if version == 1:
            data = _from_version_1(data)
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            lines = problems(exc, whole="")
            more = f" (+{len(lines) - 3} more)" if len(lines) > 3 else ""
            raise StoreError(
                f"{source}: schema {version} in a shape this ksm-lab does not read: {'; '.join(lines[:3])}{more}"
            ) from None


def _from_version_1(data: dict[str, Any]) -> dict[str, Any]:
    """A version-1 record in version 2's shape: the reset's unmerge time renamed."""
    data = dict(data, schema_version=TRIAL_SCHEMA_VERSION)
    if "unmerge_s" in data:
        data["reset_unmerge_s"] = data.pop("unmerge_s")
    return data


def not_run_record(trial_id: str, reason: str | None = None) -> TrialRecord:
    """What a reader says of a trial with no (readable) trial.json."""
    return TrialRecord(trial_id=trial_id, status="not_run", reason=reason)


# -- docs/results.md's trial.json section is generated from the models above -------------------

DOC_BEGIN = "<!-- trial.json schema: generated from orchestrator/runners/record.py; do not edit -->"
DOC_END = "<!-- end of the generated trial.json schema -->"
_DOC_MODELS: tuple[type[BaseModel], ...] = (
    TrialRecord,
    PhaseTiming,
    PolicyRecord,
    ProvisionRecord,
    MergeableRecord,
    ProbeRecord,
    DensityRecord,
    SamplerRecord,
)


def _type_name(annotation: Any) -> str:
    text = str(getattr(annotation, "__name__", None) if isinstance(annotation, type) else annotation)
    text = re.sub(r"\b(?:typing|__main__|orchestrator(?:\.\w+)*)\.", "", text)
    text = re.sub(r"Optional\[(.*)\]$", r"\1 | None", text)
    text = re.sub(r"Literal\[([^\]]*)\]", lambda m: m.group(1).replace(", ", " | "), text)
    return text.replace("'", '"').replace(" | ", " or ").replace("NoneType", "null").replace("None", "null")


def schema_markdown() -> str:
    """The trial.json schema as markdown: one table per model (key, type, meaning), from the
    models' fields and their docstrings. docs/results.md holds it between DOC_BEGIN and DOC_END
    (tests/test_docs.py checks that copy; `python -m orchestrator.runners.record FILE` rewrites it)."""
    blocks = [
        f"trial.json schema version {TRIAL_SCHEMA_VERSION} (this ksm-lab also reads version"
        f"{'s' if len(READABLE_VERSIONS) > 2 else ''} "
        f"{', '.join(str(v) for v in READABLE_VERSIONS if v != TRIAL_SCHEMA_VERSION)}; "
        "a part's further keys are kept as written)."
    ]
    for model in _DOC_MODELS:
        about = " ".join(inspect.cleandoc(model.__doc__ or "").split())
        rows = ["| key | type | meaning |", "|---|---|---|"]
        for name, info in model.model_fields.items():
            meaning = " ".join((info.description or "").split()).replace("|", "/")
            rows.append(f"| `{name}` | {_type_name(info.annotation)} | {meaning} |")
        blocks.append(f"`{model.__name__}`: {about}\n\n" + "\n".join(rows))
    return "\n\n".join(blocks) + "\n"


def doc_with_schema(text: str) -> str:
    """`text` (docs/results.md) with the generated schema between the markers."""
    head, begin, rest = text.partition(DOC_BEGIN)
    _, end, tail = rest.partition(DOC_END)
    if not begin or not end:
        raise ValueError(f"the markers {DOC_BEGIN!r} ... {DOC_END!r} are missing")
    return f"{head}{DOC_BEGIN}\n\n{schema_markdown()}\n{DOC_END}{tail}"


if __name__ == "__main__":  # python -m orchestrator.runners.record docs/results.md
    import sys
    from pathlib import Path

    for name in sys.argv[1:]:
        path = Path(name)
        path.write_text(doc_with_schema(path.read_text()))
