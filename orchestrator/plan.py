"""The study plan: one TOML file -> validated model -> list of trials with stable ids.

A plan holds settings for every trial ([ksm], [host], [workload], [guests]) and a [sweep] whose
axes multiply into trials (product - exclude + include, as asv's matrix does). Each trial gets
an id derived from everything that defines it, so `--resume` knows exactly what was run.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import random
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from functools import cached_property
from typing import Annotated, Any, ClassVar, Iterable, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from orchestrator.errors import PlanError
from orchestrator.host.ksm import KSM_INT_KNOBS, KSM_STR_KNOBS, THP_DEFRAG_MODES, THP_MODES
from orchestrator.planpaths import relative_to_plan
from orchestrator.plugins import policy_plugins, workload_plugins
from orchestrator.validation import Strict, problems
from orchestrator.workloads.density import DensitySection
from orchestrator.workloads.probe import ProbeParams
from orchestrator.workloads.processes import ProcessesParams


class StudySection(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    description: str = ""
    repetitions: int = Field(1, ge=1, le=1000)
    # blocked (the default with repetitions > 1): each block runs every setting once, its own
    # KSM-off trial included, in a seeded random order; drift spreads over settings instead of
    # piling on one, and each block gives one paired comparison with KSM off.
    # sequential: plan order, block after block. shuffled: one random order over all trials.
    order: Literal["sequential", "shuffled", "blocked"] | None = None
    seed: int = 0
    # Run a trial again at the end of the study when load outside the study disturbed it
    # (sampling.outside_load_max_pct); the disturbed trial is kept and marked, never dropped.
    rerun_disturbed: bool = False
    # A KSM-off trial for every combination of the non-KSM axes: the reference the workload's
    # throughput/latency and the memory baseline are compared against.
    ksm_off_baseline: bool = False
    # KSM-off trials per block (with ksm_off_baseline): 2 separate the trial-to-trial noise from
    # the block-to-block part (Kalibera & Jones's dimensioning run), which `ksm-lab design` reads.
    ksm_off_per_block: int = Field(1, ge=1, le=5)

    @model_validator(mode="after")
    def _off_per_block(self) -> "StudySection":
        if self.ksm_off_per_block > 1 and not self.ksm_off_baseline:
            raise ValueError("study.ksm_off_per_block needs ksm_off_baseline = true")
        return self


def _usable_policies() -> dict[str, Any]:
    """KSM policies are plugins (orchestrator/plugins.py): [ksm] policy names one, [ksm.<name>]
    holds its parameters (validated by its model). One named like a [ksm] key is left out with a
    warning (its table would be that key)."""
    usable = {}
    for name, plugin in policy_plugins().items():
        if name in KSM_INT_KNOBS or name in KSM_STR_KNOBS or name == "policy":
            logging.getLogger(__name__).warning("policy plugin %r left out: [ksm] has a key of that name", name)
        else:
            usable[name] = plugin
    return usable


POLICY_PLUGINS = _usable_policies()


class _KsmKnobs(Strict):
    """KSM knobs held for every trial (a sweep axis overrides one per trial)."""

    pages_to_scan: int | None = None
    sleep_millisecs: int | None = None
    max_page_sharing: int | None = None
    merge_across_nodes: int | None = None
    use_zero_pages: int | None = None
    stable_node_chains_prune_millisecs: int | None = None
    smart_scan: int | None = None
    advisor_mode: str | None = None
    advisor_max_cpu: int | None = None
    advisor_min_pages_to_scan: int | None = None
    advisor_max_pages_to_scan: int | None = None
    advisor_target_scan_time: int | None = None
    # Who drives the knobs during measure (a registered policy); None means "static".
    policy: str | None = None

    @field_validator("policy")
    @classmethod
    def _registered_policy(cls, value: str | None) -> str | None:
        if value is not None and value not in POLICY_PLUGINS:
            raise ValueError(f"not an installed KSM policy; installed: {', '.join(sorted(POLICY_PLUGINS))}")
        return value

    @model_validator(mode="after")
    def _ranges(self) -> "_KsmKnobs":
        for knob, value in self.model_dump(exclude_none=True).items():
            if knob not in POLICY_KEYS:
                check_ksm_value(knob, value)
        return self


# [ksm]: the knobs, `policy`, and one optional [ksm.<name>] table per policy with parameters.
KsmSection = create_model(  # type: ignore[call-overload]  # fields from the plugins
    "KsmSection",
    __base__=_KsmKnobs,
    __doc__=_KsmKnobs.__doc__,
    **{name: (plugin.params | None, None) for name, plugin in POLICY_PLUGINS.items() if plugin.params is not None},
)
POLICY_KEYS = ("policy", *(name for name, plugin in POLICY_PLUGINS.items() if plugin.params is not None))


class HostSection(Strict):
    thp_enabled: Literal[THP_MODES] | None = None  # type: ignore[valid-type]
    thp_defrag: Literal[THP_DEFRAG_MODES] | None = None  # type: ignore[valid-type]


# The plan's default for converge_tolerance_pct; the analysis uses it for studies whose plan
# cannot be read. pages_sharing_converged is the rule it parametrises.
CONVERGE_TOLERANCE_PCT = 1.0


def pages_sharing_converged(pages_sharing: Iterable[float], tolerance_pct: float) -> bool:
    """The one "KSM has converged" rule, for a window of pages_sharing samples: the spread
    (largest - smallest) is within tolerance_pct of the largest. Used by until_converged
    (runners.base.measure), density's wait before each decision (runners/density.py) and the
    analysis' "converged" column (samplemetrics), each with the plan's tolerance.

    A window in which nothing is merged (largest 0, or no finite sample) is NOT converged:
    ksmd merges nothing during its first full scan (a page enters the unstable tree only after
    its checksum held still between two scans), so a flat zero early in measure means "not
    begun", and calling it converged would end an until_converged measure or a density step's
    wait before KSM merged anything. A trial that never merges runs to its cap and says so."""
    values = [v for v in map(float, pages_sharing) if math.isfinite(v)]
    if not values:
        return False
    high = max(values)
    return high > 0 and high - min(values) <= tolerance_pct / 100 * high


def stored_converge_tolerance_pct(plan_text: str) -> float:
    """converge_tolerance_pct of a stored plan.toml ([phases] is never swept: one per study); the
    default when the study has no readable plan or its [phases] no longer validates."""
    try:
        phases = tomllib.loads(plan_text).get("phases", {})
        return PhasesSection.model_validate(phases).converge_tolerance_pct
    except (tomllib.TOMLDecodeError, ValidationError, AttributeError):
        return CONVERGE_TOLERANCE_PCT


class PhasesSection(Strict):
    settle_s: float = Field(0.0, ge=0, le=3600)
    baseline_s: float = Field(5.0, ge=0, le=3600)
    measure_s: float = Field(30.0, gt=0, le=86400)
    # Keep measuring past measure_s until pages_sharing is stable, at most max_measure_s.
    until_converged: bool = False
    converge_window_s: float = Field(10.0, gt=0)
    converge_tolerance_pct: float = Field(CONVERGE_TOLERANCE_PCT, gt=0, le=100)
    max_measure_s: float = Field(600.0, gt=0, le=86400)
    reset_timeout_s: float = Field(120.0, gt=0, le=3600)
    # Before the baseline, wait until the guests (or workers) stop growing: the summed RSS of
    # the tracked processes and host MemAvailable must each change by less than
    # steady_slope_mib_per_min over steady_window_s, waiting at most steady_max_s (0: no wait).
    # A guest still growing during the trial puts its growth into every delta-based saving.
    steady_max_s: float = Field(0.0, ge=0, le=3600)
    steady_window_s: float = Field(20.0, gt=0, le=600)
    steady_slope_mib_per_min: float = Field(10.0, gt=0)

    @model_validator(mode="after")
    def _cap(self) -> "PhasesSection":
        if self.until_converged and self.max_measure_s < self.measure_s:
            raise ValueError("max_measure_s must be >= measure_s when until_converged is on")
        return self


class SamplingSection(Strict):
    interval_s: float = Field(1.0, ge=0.05, le=600)
    # smaps_rollup walks page tables (about 4-5 ms per GiB resident): each target's PSS is read
    # at most this often, one target at a time (round-robin), and at least once per
    # (targets x pss_interval_s); in between as often as cpu_budget_pct allows (host/sampler.py).
    pss_interval_s: float = Field(5.0, ge=0.05, le=3600)
    # The sampler thread's CPU budget, % of one core over the trial: what PSS reads may use on
    # top of the cheap tiers. trial.json "sampler" records what was used.
    cpu_budget_pct: float = Field(1.0, gt=0, le=100)
    # The KSM counters alone, read this often (~0.3 ms a tick here). "auto": fast enough to
    # resolve a processes workload's refill cycle (10 ticks per round_wait_s, >= 0.05 s);
    # interval_s otherwise. A sampling period near the refill period aliases.
    fast_interval_s: float | Literal["auto"] = "auto"
    # Each tick moves by up to +-jitter_fraction/2 of its interval: no periodic workload can
    # stay in phase with the ticks, so averages over ticks are averages over time.
    jitter_fraction: float = Field(0.2, ge=0, lt=1)
    # A trial whose host CPU use outside the study (/proc/stat busy minus ksmd, the sweep and
    # its workers or QEMU) averages more than this over measure, in % of one core, is flagged.
    outside_load_max_pct: float = Field(5.0, gt=0)

    @field_validator("fast_interval_s")
    @classmethod
    def _fast_range(cls, value: Any) -> Any:
        if value != "auto" and not 0.05 <= value <= 600:
            raise ValueError("must be 'auto' or a number of seconds in [0.05, 600]")
        return value

    @model_validator(mode="after")
    def _fast_not_slower(self) -> "SamplingSection":
        if self.fast_interval_s != "auto" and self.fast_interval_s > self.interval_s:
            raise ValueError("fast_interval_s must be <= interval_s")
        return self


# Each workload's one model is its adapter's (workloads/, registered as plugins): the plan
# validates its [workload] table with it, the runner gets it back from Trial.workload_model.
# "type" tells them apart.
WORKLOAD_PLUGINS = workload_plugins()
WORKLOAD_MODELS: dict[str, type[BaseModel]] = {name: p.model for name, p in WORKLOAD_PLUGINS.items()}
Workload = Union[tuple(WORKLOAD_MODELS.values())]  # type: ignore[valid-type]  # built from the plugins
WorkloadSection = Annotated[Workload, Field(discriminator="type")]


class _WorkloadTable(BaseModel):
    """A [workload] table on its own (a sweep point's, a trial's): errors name workload.<key>."""

    workload: WorkloadSection


class GuestGroup(Strict):
    """guests.groups entry: `count` guests from `image` (a recipe name, or a table as [guests]
    image takes; none: [guests] image). Guests are numbered group after group."""

    count: int = Field(ge=1, le=256)
    image: dict[str, Any] | None = None

    @field_validator("image", mode="before")
    @classmethod
    def _recipe_name(cls, value: Any) -> Any:
        if isinstance(value, str) and value:
            return {"recipe": value}
        if value is not None and not isinstance(value, dict):
            raise ValueError("image must name a recipe or be a table like [guests] image")
        return value


class GuestsSection(Strict):
    # Fields that do not shape a saved guest (where it runs, how it starts, bounds, folders; the
    # image and template are keyed by their own digests, and so is each group's image). Every
    # other field, including one added later, is part of the saved state's key: a new field
    # that shapes a guest changes the key.
    NOT_GUEST_SHAPE: ClassVar[frozenset[str]] = frozenset(
        {
            "uri",
            "template",
            "image",
            "image_cache_dir",
            "start",
            "cache_states",
            "boot_timeout_s",
            "restore_timeout_s",
            "workdir",
            "groups",
        }
    )

    count: int = Field(2, ge=1, le=256)
    memory_mib: int = Field(1024, ge=128)
    vcpus: int = Field(1, ge=1, le=256)
    domain_type: Literal["auto", "kvm", "qemu"] = "auto"
    uri: str = "qemu:///system"
    template: str | None = None
    # {recipe = NAME}, {manifest = PATH} or a brought image {disk, ssh_key, known_host_key, ...};
    # checked by images.resolve_image before anything boots.
    image: dict[str, Any] = Field(default_factory=lambda: {"recipe": "debian-sysbench"})
    image_cache_dir: str | None = None
    network: str = "user"
    nosharepages: bool = False
    hugepages: bool = False
    vcpu_pins: list[str] | None = None
    numa_node: int | None = None
    # How each trial gets its guests. restore (default): boot the set once, prepare, warm up,
    # save every guest (memory + a frozen disk layer), and start every trial by restoring all
    # of them onto fresh overlays: each trial meets identical guest memory and disk, in seconds.
    # boot: a fresh boot per trial (cold caches, every time). keep: one boot, guests kept across
    # trials with the same guest set (each trial inherits the last one's THP splits, warm
    # buffer pools and growth: drift that piles onto run order).
    start: Literal["restore", "boot", "keep"] = "restore"
    # Saved states are cached beside the image (keyed by everything that shaped them) for later
    # studies and nights; false keeps them in the study's work folder and deletes them after.
    cache_states: bool = True
    boot_timeout_s: float = Field(600.0, gt=0)
    restore_timeout_s: float = Field(120.0, gt=0)
    workdir: str | None = None
    # Guests from more than one image: [[guests.groups]] count = 2, image = "debian-web". The
    # groups' counts add up to count (count may be left out then); absent: every guest from image.
    groups: list[GuestGroup] | None = Field(None, min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and "keep_across_trials" in data:
            raise ValueError('keep_across_trials was replaced by start = "keep" | "boot" | "restore"')
        if isinstance(data, dict) and "count" not in data and isinstance(data.get("groups"), list):
            counts = [g.get("count") if isinstance(g, dict) else None for g in data["groups"]]
            if counts and all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in counts):
                data = dict(data, count=sum(counts))  # type: ignore[arg-type]
        return data

    @model_validator(mode="after")
    def _groups_add_up(self) -> "GuestsSection":
        if self.groups is not None and sum(g.count for g in self.groups) != self.count:
            raise ValueError(
                f"groups add up to {sum(g.count for g in self.groups)} guests but "
                f"count = {self.count}: make them agree (or leave count out)"
            )
        return self

    def guest_images(self) -> list[dict[str, Any]]:
        """Each guest's image table, by guest index: group after group, else [guests] image."""
        if self.groups is None:
            return [self.image] * self.count
        return [g.image if g.image is not None else self.image for g in self.groups for _ in range(g.count)]


class Reference(Strict):
    """A published figure to print beside this study's own, on the same definition."""

    metric: str = Field(pattern=r"^[a-z0-9_]+$")  # a trials.csv column, e.g. merged_share_mean_pct
    where: dict[str, Any] = {}  # swept settings the figure is for: {"workload.fill" = "random"}
    low: float
    high: float | None = None  # a range; omit for a single figure
    source: str
    note: str = ""


class ReportSection(Strict):
    references: list[Reference] = []


class NightlySection(Strict):
    """How the nightly job judges and confirms (compare --history, ksm-lab confirm, nights.py).

    min_nights earlier nights of the same plan, host and setting make a band (at most window of
    the latest); the exit status is Holm over the headline metrics of every KSM-on setting at
    alpha; a suspect is re-measured in a confirmation study of at most confirm_blocks blocks that
    must fit in confirm_max_s (sized from tonight's trial time; stopped when it runs over)."""

    min_nights: int = Field(3, ge=2, le=100)
    window: int = Field(10, ge=2, le=1000)
    alpha: float = Field(0.05, gt=0, lt=1)
    headline: list[str] = ["saved_mib", "ksmd_cpu_pct", "tps_vs_off_pct", "latency_p95_ms_vs_off_pct"]
    confirm: bool = True
    confirm_max_s: float = Field(1800.0, gt=0, le=86400)  # finite: a bound
    confirm_blocks: int = Field(3, ge=2, le=50)

    @model_validator(mode="after")
    def _window(self) -> "NightlySection":
        if self.window < self.min_nights:
            raise ValueError(f"nightly.window ({self.window}) must be >= nightly.min_nights ({self.min_nights})")
        return self


class SweepSection(Strict):
    """Axes as nested tables: [sweep.ksm] pages_to_scan = [100, 1000]; [sweep.workload] ..."""

    model_config = ConfigDict(extra="allow", frozen=True)
    exclude: list[dict[str, Any]] = []
    include: list[dict[str, Any]] = []


class SearchSection(Strict):
    """Adaptive search over one KSM knob (orchestrator/analysis/search.py chooses each next setting).

    knee: the setting past which more scanning buys little saving per ksmd CPU (the Kneedle
    point of the saving-vs-CPU curve); budget: the largest saving with ksmd CPU at most
    max_ksmd_cpu_pct of a core (and, for guests, tps loss at most max_tps_loss_pct)."""

    knob: str = "pages_to_scan"
    low: int = Field(ge=0)
    high: int = Field(ge=1)
    scale: Literal["log", "linear"] = "log"
    objective: Literal["knee", "budget"] = "knee"
    max_ksmd_cpu_pct: float | None = Field(None, gt=0)
    max_tps_loss_pct: float | None = Field(None, ge=0)
    max_trials: int = Field(12, ge=3, le=1000)  # the trial budget, repetitions included
    repetitions: int = Field(1, ge=1, le=100)  # trials per chosen setting
    tolerance_pct: float = Field(10.0, gt=0, le=100)  # pinned: bracket within this % of the answer
    metric: str = "saved_mib"  # the saving column of trials.csv

    @model_validator(mode="after")
    def _consistent(self) -> "SearchSection":
        if self.knob not in KSM_INT_KNOBS:
            raise ValueError(f"search.knob must be an integer KSM knob, got {self.knob!r}")
        if self.high <= self.low:
            raise ValueError("search.high must be > search.low")
        if self.scale == "log" and self.low < 1:
            raise ValueError("search.low must be >= 1 on a log scale")
        if self.objective == "budget" and self.max_ksmd_cpu_pct is None and self.max_tps_loss_pct is None:
            raise ValueError('search.objective = "budget" needs max_ksmd_cpu_pct and/or max_tps_loss_pct')
        return self


class Plan(Strict):
    study: StudySection
    ksm: KsmSection = KsmSection()
    host: HostSection = HostSection()
    phases: PhasesSection = PhasesSection()
    sampling: SamplingSection = SamplingSection()
    workload: WorkloadSection
    guests: GuestsSection | None = None
    sweep: SweepSection = SweepSection()
    report: ReportSection = ReportSection()
    search: SearchSection | None = None
    density: DensitySection | None = None
    nightly: NightlySection = NightlySection()

    @field_validator("sweep", mode="before")
    @classmethod
    def _sweep_is_table(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            raise ValueError("[sweep] must be a table of axes")
        return value

    @model_validator(mode="after")
    def _vm_workloads_need_guests(self) -> "Plan":
        where = WORKLOAD_PLUGINS[self.workload.type].where
        if where == "guests" and self.guests is None:
            raise ValueError(f"workload type '{self.workload.type}' runs in guests: add a [guests] table")
        if where == "host" and self.guests is not None:
            raise ValueError(f"workload type '{self.workload.type}' runs on the host: remove [guests]")
        if self.density is not None and self.guests is None:
            raise ValueError("[density] adds guests: add a [guests] table (count = the first step)")
        return self


def check_ksm_value(knob: str, value: Any) -> None:
    if knob in KSM_INT_KNOBS:
        low, high = KSM_INT_KNOBS[knob]
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"ksm.{knob} must be an integer, got {value!r}")
        if not low <= value <= high:
            raise ValueError(f"ksm.{knob} = {value} is out of range [{low}, {high}]")
    elif knob in KSM_STR_KNOBS:
        if value not in KSM_STR_KNOBS[knob]:
            raise ValueError(f"ksm.{knob} must be one of {list(KSM_STR_KNOBS[knob])}, got {value!r}")
    else:
        raise ValueError(f"ksm.{knob} is not a KSM knob a plan can set")


# ---------------------------------------------------------------------------------------------
# Trials


@dataclass(frozen=True)
class Trial:
    """One point of the sweep, fully resolved: what ksm.py applies and the workload runs.

    The section fields are the resolved tables as the plan wrote them (values as typed in the
    TOML): trial ids, trial.json and cache keys are made of them. Runners read the settings
    typed, from the *_model properties (validated once, then cached)."""

    trial_id: str
    index: int
    repetition: int
    settings: dict[str, Any]  # swept axis ("ksm.pages_to_scan") -> value, for tables and labels
    ksm: dict[str, Any]  # every KSM knob to apply (run excluded)
    host: dict[str, Any]
    workload: dict[str, Any]
    guests: dict[str, Any] | None
    phases: dict[str, Any] = field(default_factory=dict)
    sampling: dict[str, Any] = field(default_factory=dict)
    ksm_off: bool = False
    label: str = field(default="")
    rerun_of: str | None = None  # a rerun of a disturbed trial: that trial's id
    # The rerun ran right after the trial it replaces, inside its block (pairable with the
    # block's KSM-off trial); False for reruns run after the study (a resumed one's leftovers).
    rerun_in_block: bool = False
    # {"name": "static"|"advisor"|"ksmtuned"|"kubevirt", "<name>": {params}} (policies/)
    policy: dict[str, Any] = field(default_factory=lambda: {"name": "static"})
    search_reason: str | None = None  # [search] plans: why the search chose this trial (trial.json)

    @cached_property
    def workload_model(self) -> Workload:
        return workload_model(self.workload)

    @cached_property
    def guests_model(self) -> GuestsSection | None:
        return None if self.guests is None else GuestsSection.model_validate(self.guests)

    @cached_property
    def phases_model(self) -> PhasesSection:
        return PhasesSection.model_validate(self.phases)

    @cached_property
    def sampling_model(self) -> SamplingSection:
        return SamplingSection.model_validate(self.sampling)


def workload_model(workload: dict[str, Any]) -> Workload:
    """A resolved [workload] table as its workload's model; PlanError naming the key if invalid."""
    try:
        return _WorkloadTable.model_validate({"workload": workload}).workload
    except ValidationError as exc:
        raise PlanError(_describe(exc)) from None


SECTIONS_SWEPT = ("ksm", "host", "workload", "guests")


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def sweep_axes(plan: Plan) -> dict[str, list[Any]]:
    raw = plan.sweep.model_extra or {}
    axes: dict[str, list[Any]] = {}
    for name, values in _flatten(raw).items():
        section = name.split(".", 1)[0]
        if section not in SECTIONS_SWEPT or "." not in name:
            raise PlanError(
                f"[sweep] axis '{name}': axes live in [sweep.ksm], [sweep.host], [sweep.workload] or [sweep.guests]"
            )
        if not isinstance(values, list) or not values:
            raise PlanError(f"[sweep] axis '{name}' must be a non-empty list of values")
        if len(set(map(_canonical, values))) != len(values):
            raise PlanError(f"[sweep] axis '{name}' lists a value twice")
        axes[name] = values
    return axes


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _matches(point: dict[str, Any], pattern: dict[str, Any]) -> bool:
    return all(point.get(k) == v for k, v in pattern.items())


def _short(name: str) -> str:
    abbreviations = {
        "pages_to_scan": "pts",
        "sleep_millisecs": "sleep",
        "pages_per_process": "pages",
        "processes": "procs",
        "count": "guests",
        "thp_enabled": "thp",
    }
    leaf = name.rsplit(".", 1)[-1]
    return abbreviations.get(leaf, leaf)


def axis_value_text(name: str, value: Any) -> str:
    """An axis value as labels and trial ids show it: guests.groups as "2xdebian-sysbench+2xdebian-web"."""
    if name == "guests.groups" and isinstance(value, list):
        return "+".join(
            f"{g.get('count')}x{group_image_name(g.get('image'))}" if isinstance(g, dict) else str(g) for g in value
        )
    return f"{value}"


def group_image_name(image: Any) -> str:
    """A short name of a group's image for labels: the recipe's name, else the file's stem."""
    if image is None:
        return "image"
    if isinstance(image, str):
        return Path(image).stem if "/" in image else image
    if isinstance(image, dict):
        for key in ("recipe", "manifest", "disk"):
            if isinstance(image.get(key), str):
                return group_image_name(image[key]) if key == "recipe" else Path(image[key]).stem
        if isinstance(image.get("name"), str):
            return image["name"]
    return "image"


def _trial_id(point: dict[str, Any], resolved: dict[str, Any], repetition: int, ksm_off: bool, copy: int = 0) -> str:
    """Stable across runs of one plan (resume finds its trials by id); a second KSM-off trial of
    a block (copy 1, ...) gets its own id, the first keeps the id it always had."""
    key: dict[str, Any] = {"resolved": resolved, "rep": repetition}
    if copy:
        key["copy"] = copy
    digest = hashlib.sha256(_canonical(key).encode()).hexdigest()
    parts = ["ksmoff"] if ksm_off else []
    if copy:
        parts.append(f"c{copy}")
    parts += [f"{_short(k)}{axis_value_text(k, v)}" for k, v in point.items() if not (ksm_off and k.startswith("ksm."))]
    slug = re.sub(r"[^A-Za-z0-9.=-]+", "-", "_".join(parts))[:60].strip("-_") or "trial"
    return f"{slug}_r{repetition}_{digest[:8]}"


def expand(plan: Plan) -> list[Trial]:
    """The plan's trials: axis product, minus excludes, plus includes, x repetitions."""
    axes = sweep_axes(plan)
    names = list(axes)
    points = [dict(zip(names, combo)) for combo in itertools.product(*axes.values())] if names else [{}]
    for pattern in plan.sweep.exclude:
        flat = _flatten(pattern)
        unknown = set(flat) - set(names)
        if unknown:
            raise PlanError(f"[sweep] exclude names {sorted(unknown)}, which are not sweep axes")
        points = [p for p in points if not _matches(p, flat)]
    for extra in plan.sweep.include:
        flat = _flatten(extra)
        if flat not in points:
            points.append(flat)
    if not points:
        raise PlanError("[sweep] excludes every trial: nothing to run")

    base = _base(plan)
    # KSM-off trials first (one group per combination of the non-KSM axes, in order of first
    # appearance, ksm_off_per_block copies each), then the plan's points.
    off_points: list[tuple[dict[str, Any], bool, int]] = []
    if plan.study.ksm_off_baseline:
        seen: set[str] = set()
        for p in points:
            non_ksm = {k: v for k, v in p.items() if not k.startswith("ksm.")}
            key = _canonical(non_ksm)
            if key not in seen:
                seen.add(key)
                off_points += [(non_ksm, True, off_copy) for off_copy in range(plan.study.ksm_off_per_block)]
    resolved_points = off_points + [(p, False, 0) for p in points]

    trials: list[Trial] = []
    for repetition in range(plan.study.repetitions):
        for point, ksm_off, off_copy in resolved_points:
            resolved = _resolve(plan, base, point, ksm_off)
            trial_id = _trial_id(point, resolved, repetition, ksm_off, off_copy)
            label = (
                "KSM off" if ksm_off else ", ".join(f"{_short(k)}={axis_value_text(k, v)}" for k, v in point.items())
            )
            if ksm_off and point:
                label += " (" + ", ".join(f"{_short(k)}={axis_value_text(k, v)}" for k, v in point.items()) + ")"
            trials.append(
                Trial(
                    trial_id=trial_id,
                    index=0,
                    repetition=repetition,
                    settings=dict(point),
                    ksm={} if ksm_off else resolved["ksm"],
                    host=resolved["host"],
                    workload=resolved["workload"],
                    guests=resolved["guests"],
                    phases=resolved["phases"],
                    sampling=resolved["sampling"],
                    ksm_off=ksm_off,
                    label=label or "default",
                    policy=resolved.get("policy") or {"name": "static"},
                )
            )
    order = run_order(plan)
    if order == "shuffled":
        random.Random(plan.study.seed).shuffle(trials)
    elif order == "blocked":
        blocks = [[t for t in trials if t.repetition == r] for r in range(plan.study.repetitions)]
        for block_index, block in enumerate(blocks):
            random.Random(f"{plan.study.seed}:{block_index}").shuffle(block)
        trials = [t for block in blocks for t in block]
    return [dataclasses.replace(t, index=i) for i, t in enumerate(trials)]


def run_order(plan: Plan) -> str:
    """The order the sweep runs the trials in (study.json records it: the analysis pairs by block
    only when blocked). A [search] runs each setting's repetitions as it chooses them, with no
    blocks: sequential."""
    if plan.search is not None:
        return "sequential"
    return plan.study.order or ("blocked" if plan.study.repetitions > 1 else "sequential")


def _base(plan: Plan) -> dict[str, Any]:
    return {
        "ksm": plan.ksm.model_dump(exclude_none=True),
        "host": plan.host.model_dump(exclude_none=True),
        "workload": plan.workload.model_dump(mode="json"),  # as TOML has it: cpu_pin a list
        "guests": _guests_table(plan.guests) if plan.guests else None,
    }


def _guests_table(guests: GuestsSection) -> dict[str, Any]:
    """[guests] as trials hold it. A plan without groups has no groups key, so its trial ids
    (and cache keys) stay what they were before groups existed."""
    table = guests.model_dump()
    if table.get("groups") is None:
        table.pop("groups", None)
    else:
        table["groups"] = [{k: v for k, v in g.items() if v is not None} for g in table["groups"]]
    return table


def search_trial(plan: Plan, value: int | None, repetition: int, index: int, ksm_off: bool = False) -> Trial:
    """One trial of a [search] (search.py chooses the value): the plan with ksm.<knob> = value."""
    assert plan.search is not None
    point = {} if ksm_off else {f"ksm.{plan.search.knob}": value}
    resolved = _resolve(plan, _base(plan), point, ksm_off)
    label = "KSM off" if ksm_off else f"{_short(plan.search.knob)}={value}"
    return Trial(
        trial_id=_trial_id(point, resolved, repetition, ksm_off),
        index=index,
        repetition=repetition,
        settings=dict(point),
        ksm={} if ksm_off else resolved["ksm"],
        host=resolved["host"],
        workload=resolved["workload"],
        guests=resolved["guests"],
        phases=resolved["phases"],
        sampling=resolved["sampling"],
        ksm_off=ksm_off,
        label=label,
        policy=resolved.get("policy") or {"name": "static"},
    )


def _resolve(plan: Plan, base: dict[str, Any], point: dict[str, Any], ksm_off: bool) -> dict[str, Any]:
    """Apply a sweep point to the held settings and validate the result as a whole."""
    merged = copy.deepcopy(base)
    for name, value in point.items():
        section, key = name.split(".", 1)
        if merged.get(section) is None:
            raise PlanError(f"[sweep] axis '{name}' sweeps [{section}], which this plan does not have")
        target = merged[section]
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    try:
        KsmSection.model_validate(merged["ksm"])
        HostSection.model_validate(merged["host"])
        if merged["guests"] is not None:
            guests = GuestsSection.model_validate(merged["guests"])
            if guests.groups is not None:
                _check_groups_fit(plan, merged["workload"], point)
        _WorkloadTable.model_validate({"workload": merged["workload"]})
    except ValidationError as exc:
        raise PlanError(_describe(exc, prefix=f"[sweep] point {point}: ")) from None
    _split_policy(merged)
    merged["ksm_off"] = ksm_off
    merged["phases"] = plan.phases.model_dump()
    merged["sampling"] = plan.sampling.model_dump()
    if merged["sampling"]["cpu_budget_pct"] == SamplingSection().cpu_budget_pct:
        # the default budget keeps trial ids from before the budget (resume finds its trials)
        del merged["sampling"]["cpu_budget_pct"]
    return merged


def _check_groups_fit(plan: Plan, workload: dict[str, Any], point: dict[str, Any]) -> None:
    """What guests.groups cannot be combined with (yet), as one line naming both."""
    where = f"[sweep] point {point}: " if point else ""
    if plan.density is not None:
        raise PlanError(
            f"{where}guests.groups: [density] restores guests of one image one by one; use one image with [density]"
        )
    if workload.get("type") == "sysbench" and workload.get("reuse_prepared"):
        raise PlanError(
            f"{where}guests.groups: workload.reuse_prepared = true caches database layers "
            "of one image; set reuse_prepared = false with groups"
        )


def _split_policy(merged: dict[str, Any]) -> None:
    """Move [ksm] policy keys out of the knobs ksm.py writes into merged["policy"]. A static
    plan gets no "policy" key, so its trial ids stay what they were before policies existed."""
    ksm = merged["ksm"]
    name = ksm.pop("policy", None) or "static"
    params = {key: ksm.pop(key) for key in POLICY_KEYS[1:] if key in ksm}
    if name == "static" and not params:
        return
    policy: dict[str, Any] = {"name": name}
    if name in params:
        policy[name] = params[name]
    adjust = POLICY_PLUGINS[name].knobs
    if adjust is not None:
        adjust(ksm)  # the advisor sets advisor_mode, drops pages_to_scan
    merged["policy"] = policy


def writes_during_measure(workload: dict[str, Any]) -> bool:
    """Does the workload rewrite memory while KSM measures? Then merged pages keep breaking by
    copy-on-write and any single sample of the saving is a phase-lucky snapshot: report
    averages over time. processes with rounds other than 1 refill; sysbench writes always.

    For a stored trial's workload table (trial.json): its model's rule and defaults, without
    refusing a table an older version wrote."""
    model = WORKLOAD_MODELS.get(str(workload.get("type")))
    return bool(model is not None and model.model_construct(**workload).writes_during_measure)


def fast_interval_s(sampling: SamplingSection, workload: BaseModel) -> float:
    """The KSM tier's tick: the plan's, or for "auto" 20 ticks per refill of a refilling
    processes workload (never below 0.05 s, about 0.6% of a core), 0.05 s for the probe
    workload, else the cheap tier's interval.

    Why 20: ksmd re-merges a refilled set in steps of one full scan, and a tick slower than
    those steps misplaces them. Re-sampling a 0.01 s record of a 1 s refill cycle (pages_to_scan
    1000, sleep 10 ms) at random phases, the whole-cycle average of 0.05 s ticks had a 0.5%
    standard deviation, of 0.1 s ticks 0.9%, of 0.13 s ticks 5%."""
    if sampling.fast_interval_s != "auto":
        return float(sampling.fast_interval_s)
    if isinstance(workload, ProcessesParams) and workload.writes_during_measure:
        return min(sampling.interval_s, max(0.05, workload.round_wait_s / 20))
    if isinstance(workload, ProbeParams):
        # a probe's merge window can last under a second: 20 KSM ticks a second resolve it
        return min(sampling.interval_s, 0.05)
    return sampling.interval_s


# ---------------------------------------------------------------------------------------------
# Loading


def _describe(exc: ValidationError, prefix: str = "") -> str:
    def drop_tag(loc: list[str]) -> list[str]:
        # A discriminated union adds the tag to the path ("workload.processes.pages"): drop it.
        if len(loc) > 1 and loc[0] == "workload" and loc[1] in WORKLOAD_MODELS:
            return loc[:1] + loc[2:]
        return loc

    return "invalid plan:\n  " + "\n  ".join(prefix + line for line in problems(exc, drop_tag))


def parse_plan(text: str, source: str = "<plan>") -> Plan:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PlanError(f"{source}: not valid TOML: {exc}") from None
    try:
        plan = Plan.model_validate(data)
    except ValidationError as exc:
        raise PlanError(f"{source}: " + _describe(exc)) from None
    expand(plan)  # validates every sweep point; raises PlanError naming the axis
    return plan


def load_plan(path: Path | str) -> tuple[Plan, str]:
    """Return the validated plan and its exact text (stored in the study folder as run)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise PlanError(f"cannot read plan {path}: {exc.strerror}") from None
    # Paths in the plan (templates, recipes, images, folders) are relative to its own folder.
    return relative_to_plan(parse_plan(text, source=str(path)), path.parent), text


def knobs_used(trials: list[Trial]) -> set[str]:
    return {knob for trial in trials for knob in trial.ksm}


def check_against_host(trials: list[Trial], ksm_dir: Path) -> None:
    """Refuse a plan that sets a knob this kernel lacks (older kernels have fewer files)."""
    for name in sorted({t.policy.get("name", "static") for t in trials}):
        refusal = POLICY_PLUGINS[name].refusal
        if refusal is not None and (reason := refusal(ksm_dir)):
            raise PlanError(reason)
    missing = sorted(k for k in knobs_used(trials) if not (ksm_dir / k).exists())
    if missing:
        raise PlanError(
            f"this kernel has no KSM knob(s) {', '.join(missing)} under {ksm_dir}; remove them from the plan"
        )
