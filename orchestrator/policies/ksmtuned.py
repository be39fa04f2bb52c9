"""ksmtuned: the real daemon (Debian's package, /usr/sbin/ksmtuned), started for one trial.

How the script takes its configuration (read from the shipped script, ksmtuned 4.20150326):
it sources the fixed path /etc/ksmtuned.conf, then uses `KSM_X=${KSM_X:-default}`, so values
in the environment win unless /etc/ksmtuned.conf sets them. We therefore pass the plan's values
as environment variables (and write them to ksmtuned.env in the trial folder for the record),
and refuse to run when /etc/ksmtuned.conf assigns one of them: the plan would silently lose.
DEBUG=1 + LOGFILE put its decisions into the trial folder; PIDFILE is ours, so the daemon's PID
(the forked `loop` subshell, comm "ksmtuned") is known and it is stopped by that PID alone.

Its rule, every KSM_MONITOR_INTERVAL seconds: thres = max(MemTotal * THRES_COEF / 100,
THRES_CONST) KiB; committed = RSS of processes matching '^qemu-system.*-enable-kvm'; when
committed + thres < MemTotal and free (MemFree+Buffers+Cached) > thres, KSM is stopped;
otherwise npages += BOOST if free < thres else DECAY, clamped to [NPAGES_MIN, NPAGES_MAX],
and it writes pages_to_scan=npages, sleep_millisecs=max(10, SLEEP_MSEC * 16 GiB / MemTotal), run=1.
Note: libvirt starts QEMU with `-accel kvm`, not `-enable-kvm`, so on a libvirt host
`committed` is 0 and only low free memory turns KSM on. A trial in which ksmtuned never turned
KSM on says so (summary "ksm_turned_on": false): that is a finding, not a failure.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from orchestrator.host import probes
from orchestrator.errors import HostError
from orchestrator.fsutil import atomic_write_json
from orchestrator.plugins import PolicyPlugin
from orchestrator.policies.params import KsmtunedParams

log = logging.getLogger(__name__)

KSMTUNED = Path("/usr/sbin/ksmtuned")
SYSTEM_CONF = Path("/etc/ksmtuned.conf")
LOG_NAME = "ksmtuned.log"
ENV_NAME = "ksmtuned.env"
# {pid, start_ticks} of the running loop, in the trial folder from start to stop: a sweep killed
# by SIGKILL cannot stop its ksmtuned, and `restore STUDY` finds it here (the start time tells
# the same process from a later one that got its PID).
RUNNING_NAME = "ksmtuned.running.json"
# The knobs ksmtuned writes (KSMCTL in the script): recorded before it starts.
DRIVEN_KNOBS = ("run", "pages_to_scan", "sleep_millisecs")

ENV_BY_PARAM = {
    "monitor_interval_s": "KSM_MONITOR_INTERVAL",
    "npages_boost": "KSM_NPAGES_BOOST",
    "npages_decay": "KSM_NPAGES_DECAY",
    "npages_min": "KSM_NPAGES_MIN",
    "npages_max": "KSM_NPAGES_MAX",
    "thres_coef": "KSM_THRES_COEF",
    "thres_const": "KSM_THRES_CONST",
    "sleep_ms": "KSM_SLEEP_MSEC",
}


def config_env(params: KsmtunedParams, log_path: Path, pid_path: Path) -> dict[str, str]:
    """The variables ksmtuned reads, from the plan (pure; see the module docstring)."""
    env = {ENV_BY_PARAM[k]: str(v) for k, v in params.model_dump().items()}
    env.update({"DEBUG": "1", "LOGFILE": str(log_path), "PIDFILE": str(pid_path)})
    return env


def config_text(env: dict[str, str]) -> str:
    """The same variables as a shell-sourceable file (the record of what ksmtuned was given)."""
    return "".join(f"{k}={v}\n" for k, v in sorted(env.items()))


_ASSIGN = re.compile(r"^\s*(?:export\s+)?([A-Z_]+)=", re.M)


def conf_overrides(conf_text: str) -> list[str]:
    """Variables of ours that a system /etc/ksmtuned.conf assigns (comments ignored)."""
    ours = set(ENV_BY_PARAM.values()) | {"DEBUG", "LOGFILE", "PIDFILE"}
    return sorted({m.group(1) for m in _ASSIGN.finditer(conf_text)} & ours)


_START = re.compile(r"KSMCTL start (\d+) (\d+)")
_STOP = "stop ksm"


def parse_log(text: str) -> list[dict[str, Any]]:
    """ksmtuned's decisions from its DEBUG log, in order: {"action": "start", "pages_to_scan",
    "sleep_millisecs"} for each `KSMCTL start N S`, {"action": "stop"} for each stop."""
    events: list[dict[str, Any]] = []
    for line in text.splitlines():
        if match := _START.search(line):
            events.append(
                {"action": "start", "pages_to_scan": int(match.group(1)), "sleep_millisecs": int(match.group(2))}
            )
        elif _STOP in line:
            events.append({"action": "stop"})
    return events


PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


def _set_subreaper(on: bool) -> bool:
    """Make this process the reaper of orphaned descendants (ksmtuned's loop, once the script
    that forked it exits): otherwise, in a container whose init does not reap, the stopped
    daemon stays a zombie named "ksmtuned" and the next sweep's ksmtuned guard refuses."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1 if on else 0, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _reap(pids: list[int], timeout_s: float = 5.0) -> None:
    """waitpid the given pids (ours only thanks to the subreaper); others are left alone."""
    deadline = time.monotonic() + timeout_s
    pending = set(pids)
    while pending and time.monotonic() < deadline:
        for pid in list(pending):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # not our child (no subreaper) or reaped already
                pending.discard(pid)
                continue
            if done:
                pending.discard(pid)
        if pending:
            time.sleep(0.05)


def stop_loop(pid: int, root: Path = Path("/")) -> tuple[str, list[int]]:
    """Stop ksmtuned's loop by its PID: SIGTERM, SIGKILL after 5 s, then the `sleep` it was
    waiting on. Returns (how, the pids signalled). A PID that is no longer ksmtuned is left alone."""

    def comm(p: int) -> str | None:
        return probes.live_comm(p, root)

    if comm(pid) != "ksmtuned":  # gone already, or the PID was reused: never signal a stranger
        return "already gone", []
    kids = [k for k in probes.children_of(pid, root) if comm(k) == "sleep"]
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while comm(pid) == "ksmtuned" and time.monotonic() < deadline:
        time.sleep(0.05)
    how = "SIGTERM"
    if comm(pid) == "ksmtuned":
        os.kill(pid, signal.SIGKILL)
        how = "SIGKILL"
    for kid in kids:
        if comm(kid) == "sleep":  # its loop's pending `sleep`, orphaned by the kill
            os.kill(kid, signal.SIGTERM)
    return how, [pid, *kids]


def stop_left_behind(study_dir: Path) -> list[str]:
    """Stop every ksmtuned a killed sweep of this study left running (its trials' RUNNING_NAME
    records), before `restore` puts the knobs back: otherwise the daemon rewrites them at its
    next interval. Only a process with the recorded PID *and* start time is signalled."""
    stopped = []
    for record in sorted(study_dir.glob(f"trials/*/{RUNNING_NAME}")):
        try:
            info = json.loads(record.read_text())
            pid, start_ticks = int(info["pid"]), info.get("start_ticks")
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("%s is not a ksmtuned record; left alone", record)
            continue
        stat = probes.read_proc_stat(pid)
        if stat is not None and (start_ticks is None or stat.start_ticks == start_ticks):
            how, _ = stop_loop(pid)
            if how != "already gone":
                stopped.append(f"ksmtuned pid {pid} of trial {record.parent.name} ({how})")
        record.unlink(missing_ok=True)
    return stopped


class KsmtunedRun:
    def __init__(
        self,
        settings: Any,
        params: KsmtunedParams,
        work_dir: Path,
        executable: Path = KSMTUNED,
        system_conf: Path = SYSTEM_CONF,
    ) -> None:
        self.settings = settings
        self.params = params
        self.work_dir = work_dir
        self.executable = executable
        self.system_conf = system_conf
        self.pid: int | None = None
        self.subreaper = False
        self.started_wall: float | None = None
        self.stopped_how: str | None = None

    @property
    def log_path(self) -> Path:
        return self.work_dir / LOG_NAME

    def check(self) -> None:
        if not self.executable.exists():
            raise HostError(f"policy 'ksmtuned' needs {self.executable} (apt-get install ksmtuned)")
        if self.system_conf.exists():
            clash = conf_overrides(self.system_conf.read_text())
            if clash:
                raise HostError(
                    f"{self.system_conf} sets {', '.join(clash)}, which would override the plan's "
                    "[ksm.ksmtuned] values (the script sources it after reading the environment): "
                    "comment them out and rerun"
                )

    def start(self) -> None:
        self.check()
        # ksmtuned writes these straight to sysfs: their values now are what restore puts back.
        for knob in DRIVEN_KNOBS:
            self.settings.remember(knob)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        pid_path = self.work_dir / "ksmtuned.pid"
        pid_path.unlink(missing_ok=True)
        env = config_env(self.params, self.log_path, pid_path)
        (self.work_dir / ENV_NAME).write_text(config_text(env))
        # The script forks its loop and exits; the loop's PID lands in PIDFILE.
        self.subreaper = _set_subreaper(True)
        subprocess.run(
            [str(self.executable)],
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **env},
            check=True,
            timeout=30,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            text = pid_path.read_text().strip() if pid_path.exists() else ""
            if text.isdigit():
                self.pid = int(text)
                break
            time.sleep(0.05)
        if self.pid is None:
            raise HostError("ksmtuned started but wrote no PID file within 10 s")
        stat = probes.read_proc_stat(self.pid)
        atomic_write_json(
            self.work_dir / RUNNING_NAME, {"pid": self.pid, "start_ticks": stat.start_ticks if stat else None}
        )
        self.started_wall = time.time()
        log.info("ksmtuned running as pid %d (interval %d s)", self.pid, self.params.monitor_interval_s)

    def stop(self) -> None:
        """SIGTERM the loop by its PID (and its waiting `sleep`), SIGKILL after 5 s."""
        if self.pid is None:
            return
        pid, self.pid = self.pid, None
        try:
            self.stopped_how, stopped = stop_loop(pid)
            _reap(stopped)
            (self.work_dir / RUNNING_NAME).unlink(missing_ok=True)
        finally:
            if self.subreaper:
                _set_subreaper(False)
                self.subreaper = False

    def summary(self) -> dict[str, Any]:
        text = self.log_path.read_text() if self.log_path.exists() else ""
        events = parse_log(text)
        starts = [e for e in events if e["action"] == "start"]
        return {
            "name": "ksmtuned",
            "params": self.params.model_dump(),
            "log": LOG_NAME,
            "config": ENV_NAME,
            "adjustments": len(events),
            "ksm_turned_on": bool(starts),
            "last_pages_to_scan": starts[-1]["pages_to_scan"] if starts else None,
            "last_sleep_millisecs": starts[-1]["sleep_millisecs"] if starts else None,
            "stopped": self.stopped_how,
        }


def check_host(root: Path) -> None:
    """ksmtuned can run under `root`: its script installed, /etc/ksmtuned.conf not overriding the plan."""
    KsmtunedRun(
        None,
        KsmtunedParams(),
        root,
        executable=root / KSMTUNED.relative_to("/"),
        system_conf=root / SYSTEM_CONF.relative_to("/"),
    ).check()


PLUGIN = PolicyPlugin(
    name="ksmtuned",
    params=KsmtunedParams,
    check_host=check_host,
    start=lambda settings, params, work_dir: KsmtunedRun(settings, params, work_dir),
)
