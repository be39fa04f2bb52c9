"""Guest density: how many guests fit in a memory budget, with KSM off and at chosen settings.

One density trial (a plan with a [density] table; one trial per KSM setting, KSM-off included
with ksm_off_baseline) starts guests one at a time while the workload runs in all of them.
Before each start it lets KSM converge, measures, and asks ``next_guest_allowed``: would the
next guest, at the largest per-guest cost measured so far times a margin, take the guests'
summed QEMU PSS over the budget, or host MemAvailable under the floor? Both are checked
*before* the start, from measurements, so the host is never driven to exhaustion; a floor
crossed anyway (a guest grew more than the margin) stops the run and is reported.

Data integrity: every guest writes a known pattern (half shared by all guests, so KSM merges
it across guests; half its own) into its tmpfs, and at the end the pattern's digest is checked
against the one computed here; any mismatch fails the trial loudly.

Pure parts (the stop rule, the cost estimate, the pattern commands and their check, the
summary) are tested without guests. ``run_density`` drives a ``DensityHost`` adapter: the
calls it needs from the VM side (start one more guest from the saved state, read PSS and
MemAvailable, wait for KSM, run commands in a guest). runners/density.py implements it over the VM
runner (written, never run on this machine: see its docstring). Its known limit: a saved guest
comes back under its saved name and uuid, so the saved state holds max_guests guests, built by
booting them all at once (check_memory_fits guards that build; the density rule cannot).
"""

from __future__ import annotations

import hashlib
import math
import shlex
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

from pydantic import Field

from orchestrator.errors import WorkloadError
from orchestrator.validation import RecordPart, Strict
from orchestrator.units import MIB

PATTERN_PATH = "/dev/shm/ksmlab-density.pattern"
# A line repeated to the size asked: `yes` writes it fast in any guest, and the host computes
# the same bytes to know the digest. Shared lines merge across guests; per-guest ones do not.
SHARED_LINE = "ksmlab density shared pattern 0123456789abcdef"
GUEST_LINE = "ksmlab density guest {index} pattern fedcba9876543210"


@dataclass(frozen=True)
class Step:
    """The host with `guests` guests running, after KSM converged."""

    guests: int
    guests_pss_mib: float  # summed PSS of the guests' QEMU processes
    mem_available_mib: float  # host MemAvailable
    ksmd_cpu_pct: float = math.nan  # over the convergence window, % of one core
    tps_per_guest: float = math.nan  # mean over guests, when the workload reports throughput
    converged: bool = True
    pages_sharing: float = math.nan


class DensitySection(Strict):
    """Guest density (density.py): add guests one by one while the workload runs in all of them,
    until the next guest would pass the memory budget or push MemAvailable under the floor."""

    budget_mib: int = Field(ge=128)  # summed QEMU PSS the guests may take
    mem_available_floor_mib: int = Field(1024, ge=0)  # host MemAvailable never planned below this
    max_guests: int = Field(16, ge=1, le=256)
    # Before each decision: let KSM converge (pages_sharing within converge_tolerance_pct over
    # converge_window_s), at most converge_max_s, so the per-guest cost is the merged one.
    converge_window_s: float = Field(20.0, gt=0)
    converge_tolerance_pct: float = Field(2.0, gt=0, le=100)
    converge_max_s: float = Field(180.0, gt=0)
    # Each guest writes this many MiB of a known pattern and checks it at the end.
    verify_mib: int = Field(64, ge=1)
    # The next guest's cost is planned as the largest per-guest cost measured so far times this.
    cost_margin: float = Field(1.1, ge=1.0, le=4.0)


def per_guest_costs(history: Sequence[Step]) -> tuple[float, float]:
    """(PSS cost, MemAvailable cost) of one more guest, MiB: the largest step-to-step change
    so far, and never less than the mean PSS per guest (the first guests can look cheap when
    later ones merge against them; the largest change is the safe side)."""
    pss_steps, avail_steps = [], []
    for before, after in zip(history, history[1:]):
        added = after.guests - before.guests
        if added > 0:
            pss_steps.append((after.guests_pss_mib - before.guests_pss_mib) / added)
            avail_steps.append((before.mem_available_mib - after.mem_available_mib) / added)
    last = history[-1] if history else None
    mean_pss = last.guests_pss_mib / last.guests if last is not None and last.guests > 0 else math.nan
    candidates = [v for v in (*pss_steps, mean_pss) if math.isfinite(v)]
    pss_cost = max(candidates) if candidates else math.nan
    avail_candidates = [v for v in avail_steps if math.isfinite(v)]
    avail_cost = max(avail_candidates) if avail_candidates else math.nan
    # A guest takes at least its PSS out of MemAvailable, whatever else the host did meanwhile.
    if math.isfinite(pss_cost):
        avail_cost = max(avail_cost, pss_cost) if math.isfinite(avail_cost) else pss_cost
    return pss_cost, avail_cost


def next_guest_allowed(
    history: Sequence[Step],
    budget_mib: float,
    floor_mib: float,
    *,
    margin: float = 1.1,
    first_guest_mib: float = math.inf,
    max_guests: int | None = None,
) -> tuple[bool, str]:
    """May one more guest start? history: the measured steps so far, the first one with no
    guests (the host before any started). With no guest measured yet the next guest is planned
    at first_guest_mib (its RAM plus QEMU's overhead: what it can take at most)."""
    if not history:
        return False, "no measurement of the host yet"
    last = history[-1]
    if max_guests is not None and last.guests >= max_guests:
        return False, f"max_guests ({max_guests}) reached"
    if last.mem_available_mib < floor_mib:
        return False, f"MemAvailable {last.mem_available_mib:.0f} MiB is already under the floor {floor_mib:.0f} MiB"
    pss_cost, avail_cost = per_guest_costs(history)
    if not math.isfinite(pss_cost):
        pss_cost = avail_cost = first_guest_mib
        basis = "first guest, planned at its maximum"
    else:
        basis = "largest measured per-guest cost"
    if not math.isfinite(pss_cost):
        return False, "no per-guest cost measured and no maximum given"
    planned_pss = last.guests_pss_mib + margin * pss_cost
    planned_avail = last.mem_available_mib - margin * avail_cost
    if planned_pss > budget_mib:
        return False, (
            f"guest {last.guests + 1} would bring the guests' PSS to {planned_pss:.0f} MiB, over the "
            f"budget {budget_mib:.0f} MiB ({basis} {pss_cost:.0f} MiB x {margin})"
        )
    if planned_avail < floor_mib:
        return False, (
            f"guest {last.guests + 1} would bring MemAvailable to {planned_avail:.0f} MiB, under the "
            f"floor {floor_mib:.0f} MiB ({basis} {avail_cost:.0f} MiB x {margin})"
        )
    return True, (
        f"guest {last.guests + 1}: planned PSS {planned_pss:.0f} of {budget_mib:.0f} MiB, "
        f"MemAvailable {planned_avail:.0f} MiB >= floor {floor_mib:.0f} MiB"
    )


# ----------------------------------------------------------------------------- patterns


def _line(index: int | None) -> str:
    return SHARED_LINE if index is None else GUEST_LINE.format(index=index)


def pattern_bytes(line: str, nbytes: int) -> bytes:
    """What `yes LINE | head -c N` writes."""
    unit = (line + "\n").encode()
    return (unit * (nbytes // len(unit) + 1))[:nbytes]


def expected_digest(index: int, mib: int) -> str:
    """sha256 of the pattern file guest `index` writes: shared half, then its own half."""
    half = mib * MIB // 2
    digest = hashlib.sha256()
    digest.update(pattern_bytes(_line(None), half))
    digest.update(pattern_bytes(_line(index), mib * MIB - half))
    return digest.hexdigest()


def write_command(index: int, mib: int, path: str = PATTERN_PATH) -> str:
    """Shell for the guest: write the pattern into tmpfs (guest RAM, which KSM sees)."""
    half = mib * MIB // 2
    return (
        f"set -e; {{ yes {shlex.quote(_line(None))} | head -c {half}; "
        f"yes {shlex.quote(_line(index))} | head -c {mib * MIB - half}; }} > {shlex.quote(path + '.tmp')} && "
        f"mv {shlex.quote(path + '.tmp')} {shlex.quote(path)}"
    )


def verify_command(path: str = PATTERN_PATH) -> str:
    """Shell for the guest: the digest of the pattern as it is in guest memory now (tmpfs has
    no disk copy to read back instead)."""
    return f"sha256sum {shlex.quote(path)}"


def check_verify_output(index: int, mib: int, output: str) -> str | None:
    """None when the guest's digest matches; else what went wrong (for a loud failure)."""
    got = output.strip().split()[0] if output.strip() else ""
    want = expected_digest(index, mib)
    if got == want:
        return None
    return f"guest {index}: pattern digest {got or '(none)'} != expected {want}"


# ----------------------------------------------------------------------------- the run


class DensityHost(Protocol):
    """What run_density needs from the VM side; vmrunner/provision implement it."""

    def start_guest(self, index: int) -> None: ...
    def run_in_guest(self, index: int, command: str, timeout_s: float) -> str: ...
    def wait_converged(self, window_s: float, tolerance_pct: float, max_s: float) -> bool: ...
    def measure(self, guests: int, converged: bool) -> Step: ...


@dataclass
class DensityResult:
    steps: list[Step] = field(default_factory=list)
    stop_reason: str = ""
    floor_crossed: bool = False
    mismatches: list[str] = field(default_factory=list)

    def record(self) -> "DensityRecord":
        return DensityRecord(
            steps=list(self.steps),
            stop_reason=self.stop_reason,
            floor_crossed=self.floor_crossed,
            mismatches=list(self.mismatches),
        )


class DensityRecord(RecordPart):
    """density ([density] trials): how guest density went (run_density)."""

    steps: list[Step] = Field(default_factory=list)
    """Each step, the host with N guests after KSM converged: guests, guests_pss_mib,
    mem_available_mib, ksmd_cpu_pct, tps_per_guest, converged, pages_sharing (density.csv)."""
    stop_reason: str = ""
    """Why no further guest was added."""
    floor_crossed: bool = False
    """MemAvailable fell under the floor."""
    mismatches: list[str] = Field(default_factory=list)
    """The guests whose pattern did not verify."""


def run_density(
    host: DensityHost, cfg: DensitySection, first_guest_mib: float, result: DensityResult | None = None
) -> DensityResult:
    """Add guests until next_guest_allowed says no; then verify every guest's pattern.

    Fills `result` as it goes (pass one in to keep what was measured when this raises).
    Raises WorkloadError when a pattern does not verify (after recording everything)."""
    result = result if result is not None else DensityResult()
    result.steps.append(host.measure(0, True))
    floor = float(cfg.mem_available_floor_mib)
    while True:
        allowed, reason = next_guest_allowed(
            result.steps,
            float(cfg.budget_mib),
            floor,
            margin=cfg.cost_margin,
            first_guest_mib=first_guest_mib,
            max_guests=cfg.max_guests,
        )
        if not allowed:
            result.stop_reason = reason
            break
        index = result.steps[-1].guests
        host.start_guest(index)
        host.run_in_guest(index, write_command(index, cfg.verify_mib), timeout_s=120)
        converged = host.wait_converged(cfg.converge_window_s, cfg.converge_tolerance_pct, cfg.converge_max_s)
        step = host.measure(index + 1, converged)
        result.steps.append(step)
        if step.mem_available_mib < floor:
            result.floor_crossed = True
            result.stop_reason = (
                f"MemAvailable fell to {step.mem_available_mib:.0f} MiB, under the floor, "
                f"after guest {index + 1} started: it grew more than the margin planned"
            )
            break
    for index in range(result.steps[-1].guests):
        output = host.run_in_guest(index, verify_command(), timeout_s=120)
        problem = check_verify_output(index, cfg.verify_mib, output)
        if problem:
            result.mismatches.append(problem)
    if result.mismatches:
        raise WorkloadError("DATA INTEGRITY FAILURE under merging: " + "; ".join(result.mismatches))
    return result


def density_summary(record: DensityRecord) -> dict[str, Any]:
    """trials.csv columns from trial.json's "density" record."""
    if not record.steps:
        return {}
    final = record.steps[-1]
    guests = int(final.guests)
    return {
        "density_guests": guests,
        "density_stop_reason": record.stop_reason,
        "density_floor_crossed": record.floor_crossed,
        "density_guests_pss_mib": final.guests_pss_mib,
        "density_pss_per_guest_mib": final.guests_pss_mib / guests if guests else math.nan,
        "density_ksmd_cpu_pct": final.ksmd_cpu_pct,
        "density_tps_per_guest": final.tps_per_guest,
        "density_mismatches": len(record.mismatches),
    }
