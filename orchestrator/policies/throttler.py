"""throttler: an EMULATION of Kata Containers' ksm-throttler ("auto" mode), not the daemon itself.

Source read: kata-containers/ksm-throttler, ksm.go (ksmSettings, ksm.throttle, ksm.tune,
restoreSysFS, anonPages) and throttler.go (ksmThrottleIntervals and the 30/120/120 s intervals);
stored copy of ksm.go at commit 26d5a610. What we reproduce:
- a kick (Kata: the runtime's gRPC Kick, or the virtcontainers trigger seeing a new pod) goes to
  "aggressive": pages_to_scan = AnonPages/10 every 1 ms, for aggressive_s (30 s);
- then "standard": AnonPages/100 every 10 ms for standard_s (120 s), then "slow": AnonPages/500
  every 100 ms for slow_s (120 s), then the initial settings (pages_to_scan, sleep_millisecs and
  run as the throttler found them), where it stays until the next kick;
- a kick in any step starts the sequence again at aggressive; AnonPages is re-read from
  /proc/meminfo at each step, in pages, as anonPages() does;
- each tune writes run=0, pages_to_scan, sleep_millisecs, run=1, in ksm.tune's order.
What differs:
- the kick is a guest (VM runner) or worker (processes workload) start in the trial, announced
  through HostSettings.announce_start. Every policy holds KSM off until measure starts, so starts
  announced before then (the guests' boot, the workers' fill) are delivered together, as one
  kick, when measure starts; starts during measure (density's guests) kick at once;
- the initial settings are the trial's: the plan's pages_to_scan and sleep_millisecs (applied
  before measure) and run = [ksm.throttler] initial_run (the reset leaves run=2, which would
  unmerge: the throttler never finds that on a host);
- the step durations are plan keys, so a trial (or a test) can see the whole sequence.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from orchestrator.host import probes
from orchestrator.plugins import PolicyPlugin
from orchestrator.policies.params import ThrottlerParams

log = logging.getLogger(__name__)

# ksm.go ksmSettings: (1 page scanned per this many anonymous pages, sleep_millisecs).
SETTINGS = {"aggressive": (10, 1), "standard": (100, 10), "slow": (500, 100)}
# ksmThrottleIntervals: where a step's timer leads.
NEXT = {"aggressive": "standard", "standard": "slow", "slow": "initial"}

Event = Literal["start", "timer"]


@dataclass(frozen=True)
class Step:
    mode: str  # aggressive | standard | slow | initial
    pages_to_scan: int | None  # None: the initial settings
    sleep_millisecs: int | None
    hold_s: float | None  # until the timer moves on; None: until the next start


def hold_for(mode: str, params: ThrottlerParams) -> float | None:
    return {"aggressive": params.aggressive_s, "standard": params.standard_s, "slow": params.slow_s}.get(mode)


def throttler_step(mode: str, event: Event, anon_pages: int, params: ThrottlerParams) -> Step:
    """One transition of the throttler (pure): from its current mode, on a start (kick) or its
    timer, the mode to enter, the knobs to write and how long to hold them."""
    if event == "start":
        new = "aggressive"
    elif mode in NEXT:
        new = NEXT[mode]
    else:  # the timer never runs in "initial" (interval 0: wait for a kick)
        return Step("initial", None, None, None)
    if new == "initial":
        return Step("initial", None, None, None)
    divisor, sleep_ms = SETTINGS[new]
    return Step(new, anon_pages // divisor, sleep_ms, hold_for(new, params))


def read_anon_pages(root: Path, page_size_bytes: int) -> int:
    """AnonPages of /proc/meminfo in pages, as the throttler's anonPages() computes it."""
    return probes.read_meminfo(root)["AnonPages"] * 1024 // page_size_bytes


class ThrottlerRun:
    """The throttler as a controller thread woken by starts and its own timer; writes go through
    HostSettings (recorded, restorable)."""

    def __init__(
        self, settings: Any, params: ThrottlerParams, page_size_bytes: int = os.sysconf("SC_PAGE_SIZE")
    ) -> None:
        self.settings = settings
        self.params = params
        self.page_size_bytes = page_size_bytes
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None
        self.mode = "initial"
        self.original: dict[str, str] = {}
        self.pending: list[dict[str, Any]] = []  # starts not yet delivered
        self.starts: list[dict[str, Any]] = []
        self.steps: list[dict[str, Any]] = []
        self.error: str | None = None

    # -- what the runners and the sweep call ------------------------------------------------

    def on_start(self, source: str) -> None:
        """A guest or worker started (HostSettings.announce_start): a kick."""
        with self.lock:
            self.pending.append({"t_wall": round(time.time(), 3), "source": source})
        self.wake.set()

    def start(self) -> None:
        for knob in ("run", "pages_to_scan", "sleep_millisecs"):
            self.settings.remember(knob)
        # What the throttler finds (newKSM reads it) and goes back to after the slow step.
        self.original = {
            "pages_to_scan": str(self.settings.read_counter("pages_to_scan")),
            "sleep_millisecs": str(self.settings.read_counter("sleep_millisecs")),
            "run": str(self.params.initial_run),
        }
        self._write_initial()
        self.steps.append(self._record("measure start", Step("initial", None, None, None), None))
        self.thread = threading.Thread(target=self._loop, name="ksm-throttler", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.wake.set()
        if self.thread is not None:
            self.thread.join(timeout=10)

    def summary(self) -> dict[str, Any]:
        return {
            "name": "throttler",
            "emulation_of": "kata-containers/ksm-throttler ksm.go + throttler.go",
            "params": self.params.model_dump(),
            "original": self.original,
            "starts": self.starts,
            "steps": self.steps,
            "ksm_turned_on": any(s["run"] == 1 for s in self.steps),
            "error": self.error,
        }

    # -- the controller ---------------------------------------------------------------------

    def _loop(self) -> None:
        deadline: float | None = None
        while True:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            woken = self.wake.wait(timeout)
            if self.stop_event.is_set():
                return
            with self.lock:
                kicks, self.pending = self.pending, []
                self.wake.clear()
            if woken and not kicks:
                continue
            event: Event = "start" if kicks else "timer"
            try:
                step = self.transition(event, kicks)
                deadline = None if step.hold_s is None else time.monotonic() + step.hold_s
            except Exception as exc:  # one failed step must not kill the trial; it is recorded
                self.error = f"{type(exc).__name__}: {exc}"
                log.error("ksm-throttler emulation: %s", self.error)
                deadline = None

    def transition(self, event: Event, kicks: list[dict[str, Any]]) -> Step:
        delivered = round(time.time(), 3)
        self.starts += [{**kick, "delivered_wall": delivered} for kick in kicks]
        anon = read_anon_pages(self.settings.root, self.page_size_bytes)
        step = throttler_step(self.mode, event, anon, self.params)
        if step.mode == "initial":
            self._write_initial()
        else:
            # ksm.tune: stop, set both knobs, start.
            self.settings.write_knob("run", 0)
            self.settings.write_knob("pages_to_scan", step.pages_to_scan)
            self.settings.write_knob("sleep_millisecs", step.sleep_millisecs)
            self.settings.write_knob("run", 1)
        self.mode = step.mode
        self.steps.append(self._record(event if not kicks else f"start x{len(kicks)}", step, anon))
        return step

    def _write_initial(self) -> None:
        self.settings.write_knob("pages_to_scan", self.original["pages_to_scan"])
        self.settings.write_knob("sleep_millisecs", self.original["sleep_millisecs"])
        self.settings.write_knob("run", self.original["run"])
        self.mode = "initial"

    def _record(self, event: str, step: Step, anon_pages: int | None) -> dict[str, Any]:
        initial = step.mode == "initial"
        return {
            "t_wall": round(time.time(), 3),
            "event": event,
            "mode": step.mode,
            "anon_pages": anon_pages,
            "pages_to_scan": int(self.original["pages_to_scan"]) if initial else step.pages_to_scan,
            "sleep_millisecs": int(self.original["sleep_millisecs"]) if initial else step.sleep_millisecs,
            "run": int(self.original["run"]) if initial else 1,
            "hold_s": step.hold_s,
        }


PLUGIN = PolicyPlugin(
    name="throttler", params=ThrottlerParams, start=lambda settings, params, work_dir: ThrottlerRun(settings, params)
)
