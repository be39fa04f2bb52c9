"""When guests are up: every guest's check retried in parallel under one deadline, with backoff;
a guest that died ends its wait at once (retrying cannot help), and the tail of its console log
says why one did not come up. The check itself is the caller's: ``ssh_banner_check`` needs no
credentials, a real SSH session proves more.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import tenacity

from orchestrator.errors import GuestBootError

CONSOLE_TAIL_LINES = 40
MAX_SSH_THREADS = 64


def ssh_pool_size(guests: int) -> int:
    """Threads for one SSH step over every guest (readiness, connect, a command): one per guest,
    as the work is waiting on the guests, not the host's CPUs, up to 64."""
    return max(1, min(guests, MAX_SSH_THREADS))


class SshTarget(Protocol):
    """What the banner check needs from provision.Guest."""

    name: str
    ssh_host: str | None
    ssh_port: int


def console_tail(path: Path, lines: int = CONSOLE_TAIL_LINES) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 64 * 1024))
            text = handle.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"(console log {path} unreadable: {exc})"
    return "\n".join(text.replace("\r", "").splitlines()[-lines:])


class GuestDied(Exception):
    """Raised by an attempt whose guest is gone, or when the waits are stopped: no retry."""


@dataclass(frozen=True)
class ReadyWait:
    """One guest's wait. ``attempt`` raises until the guest is ready; ``started`` is when its
    domain started (monotonic clock, None if unknown), read once the guest is ready."""

    name: str
    attempt: Callable[[], None]
    console_log_path: Path
    started: Callable[[], float | None]


def wait_all_ready(
    waits: Sequence[ReadyWait], timeout_s: float, cancel: threading.Event | None = None
) -> dict[str, float]:
    """Retry every wait's attempt until it returns, all in parallel, within timeout_s overall.

    Returns {name: seconds from start to ready}. Raises GuestBootError with the console tail of
    the first guest that died or did not answer in time.
    """
    stop = threading.Event()
    deadline = time.monotonic() + timeout_s

    def stopping() -> bool:
        # `cancel` (the sweep's stop flag) ends every wait at its next attempt.
        if cancel is not None and cancel.is_set():
            stop.set()
        return stop.is_set()

    def backoff_sleep(seconds: float) -> None:
        end = time.monotonic() + seconds
        while not stopping() and (left := end - time.monotonic()) > 0:
            stop.wait(min(left, 0.5))

    def wait_one(wait: ReadyWait) -> float:
        def attempt() -> None:
            if stopping():
                raise GuestDied("stopped")
            wait.attempt()

        retrying = tenacity.Retrying(
            stop=tenacity.stop_before_delay(max(0.0, deadline - time.monotonic())),
            wait=tenacity.wait_exponential(multiplier=0.5, min=1, max=5),
            retry=tenacity.retry_if_not_exception_type(GuestDied),
            sleep=backoff_sleep,
            reraise=True,
        )
        try:
            retrying(attempt)
        except GuestDied as exc:
            raise GuestBootError(f"{exc} (waiting for SSH)", console_tail(wait.console_log_path)) from exc
        except Exception as exc:  # noqa: BLE001 - every failure becomes a boot error
            raise GuestBootError(
                f"{wait.name} not reachable over SSH within {timeout_s:.0f} s: {exc}",
                console_tail(wait.console_log_path),
            ) from exc
        return time.monotonic() - (wait.started() or time.monotonic())

    with ThreadPoolExecutor(max_workers=ssh_pool_size(len(waits)), thread_name_prefix="ksmlab-ready") as pool:
        futures = {wait.name: pool.submit(wait_one, wait) for wait in waits}
        try:
            return {name: future.result() for name, future in futures.items()}
        finally:
            stop.set()  # on error or Ctrl-C the other waits end at their next attempt
