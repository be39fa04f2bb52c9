"""Worker side of the probe's exposure mode: a victim or an observer, two unrelated processes.

Run as ``python -m orchestrator.workloads._exposer '<spec json>'`` (spec "role": victim or
observer) by workloads/exposure.py. Each is a fresh interpreter of its own (fork + exec, no
mapping shared with the other), dying with its parent like _filler.py: what the observer learns
of the victim goes through KSM alone.

Secret r is one page of bytes drawn from the seed (secret_page); the victim writes it, the
observer stands for a co-tenant who guesses that content and holds it as its candidate r.

victim
    maps background_pages + secrets pages MADV_MERGEABLE, all of content no one else has, says
    "filled"; on "go" writes secret r over its page r at go + warmup_s + r * write_gap_s
    (CLOCK_MONOTONIC, which every process on the host shares), then writes its CSV (secret,
    t_mono) and says "done <rows>".
observer
    maps one candidate page per secret (holding it from the start) and `decoys` pages of content
    no one else has, MADV_MERGEABLE, plus calibration pages without MADV_MERGEABLE (never
    merged); says "filled". On "go": tests calibration_writes of its calibration pages, one every
    test_interval_s exactly as it tests the others, and sets the threshold from those
    (merge_threshold_ns); then every test_interval_s tests the next page of a shuffled rotation
    over candidates and decoys: the kernel's truth for that page
    read right before (host/probes.PageMergeReader: pagemap PFN -> kpageflags KPF_KSM), the
    timed write, "merged" if it took longer than the threshold (called_merged). Until go +
    duration_s; then its CSV and "done <rows> <threshold_ns> <truth source>".

The timed write stores the byte the page already holds. On an unmerged page that is a plain
store and the content (so KSM's checksum of it) stays as it was; on a merged page the write
faults and the kernel copies the page, which merges again at ksmd's next visit (the victim's
copy is still there). A write that changed the content would consume the candidate: its
replacement would need two more scans (a stable checksum) before it could merge again, so an
observer testing faster than that would keep the merge from ever happening. The observer holds
one candidate per secret: two copies in one process would merge with each other, victim or not.

Truth: where PFNs are hidden or pagemap/kpageflags cannot be read, truth_source is "ksm_stat":
each test records the observer's ksm_merging_pages (a count, not which page) and the per-page
truth column stays empty.
"""

from __future__ import annotations

import csv
import json
import mmap
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from orchestrator.host import probes
from orchestrator.workloads._filler import _report, die_with_parent, map_pages

SECRET_STREAM, VICTIM_STREAM, DECOY_STREAM, CALIBRATION_STREAM, ORDER_STREAM = 1, 2, 3, 4, 5
TRUTH_PAGEMAP, TRUTH_KSM_STAT = "pagemap", "ksm_stat"
_KEEP: list[Any] = []  # the mappings live until the process ends (the victim's secrets above all)


def secret_page(seed: int, index: int, page_size: int) -> np.ndarray:
    """Secret `index`: one page of bytes from the seed (the same in both roles)."""
    return np.random.default_rng([seed, SECRET_STREAM, index]).integers(0, 256, page_size, dtype=np.uint8)


def fill_unique(view: np.ndarray, seed: int, stream: int) -> None:
    """Random bytes in every page: content no other page on the host holds."""
    rng = np.random.default_rng([seed, stream])
    flat = view.reshape(-1)
    chunk = 1 << 24
    for start in range(0, flat.size, chunk):
        part = flat[start : start + chunk]
        part[:] = np.frombuffer(rng.bytes(part.size), dtype=np.uint8)


def merge_threshold_ns(calibration_ns: Any, quantile: float, factor: float) -> float:
    """The observer's decision threshold: factor x the quantile of its writes to pages it knows
    are not merged (the copy-on-write of a merged page is some microseconds, a plain store some
    hundred nanoseconds here)."""
    values = np.asarray(calibration_ns, dtype=float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise ValueError("no calibration latencies")
    return factor * float(np.quantile(values, quantile))


def called_merged(latency_ns: Any, threshold_ns: float) -> Any:
    """The observer's call: "merged" when the write took longer than the threshold."""
    return np.asarray(latency_ns, dtype=float) > threshold_ns


def timed_write(mapping: mmap.mmap, offset: int, value: int, clock: Callable[[], int] = time.perf_counter_ns) -> int:
    """Nanoseconds around one single-byte store (locals only: the same loop for every page)."""
    start = clock()
    mapping[offset] = value
    return clock() - start


def _wait_for_go(go: threading.Event) -> None:
    """stdin: a "go" line sets the event; EOF (controller gone or done) ends the process."""

    def read() -> None:
        buffer = b""
        try:
            while chunk := os.read(0, 4096):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                if any(line.strip() == b"go" for line in lines):
                    go.set()
        finally:
            os._exit(0)

    threading.Thread(target=read, name="commands", daemon=True).start()


def _write_csv(path: str, header: tuple[str, ...], rows: list[tuple]) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(tmp, path)


def _sleep_until(t_mono: float) -> None:
    while (left := t_mono - time.monotonic()) > 0:
        time.sleep(left)


def run_victim(spec: dict, go: threading.Event) -> int:
    page_size = mmap.PAGESIZE
    secrets, background = int(spec["secrets"]), int(spec["background_pages"])
    mapping, view = map_pages(secrets + background, page_size, madvise_mergeable=True)
    _KEEP.extend((mapping, view))
    fill_unique(view, spec["seed"], VICTIM_STREAM)
    _report(f"filled {time.time():.6f}")
    go.wait()
    start = time.monotonic()
    rows = []
    for r in range(secrets):
        _sleep_until(start + spec["warmup_s"] + r * spec["write_gap_s"])
        view[r] = secret_page(spec["seed"], r, page_size)
        rows.append((r, f"{time.monotonic():.6f}"))
    _write_csv(spec["samples_path"], ("secret", "t_mono"), rows)
    _report(f"done {len(rows)}")
    return 0


def _truth_reader(spec: dict, mapping: mmap.mmap, view: np.ndarray) -> probes.PageMergeReader | None:
    if spec.get("truth") == TRUTH_KSM_STAT:
        return None
    reader = probes.PageMergeReader("self")
    if reader.usable and reader.merged(view.ctypes.data) is not None:
        return reader
    reader.close()
    return None


def run_observer(spec: dict, go: threading.Event) -> int:
    page_size = mmap.PAGESIZE
    secrets, decoys = int(spec["secrets"]), int(spec["decoys"])
    calibration_pages = int(spec["calibration_writes"])
    mapping, view = map_pages(secrets + decoys, page_size, madvise_mergeable=True)
    calibration, calibration_view = map_pages(calibration_pages, page_size, madvise_mergeable=False)
    _KEEP.extend((mapping, view, calibration, calibration_view))
    fill_unique(view, spec["seed"], DECOY_STREAM)  # decoys keep this; candidates get their secret
    fill_unique(calibration_view, spec["seed"], CALIBRATION_STREAM)
    rng = np.random.default_rng([spec["seed"], ORDER_STREAM])
    # slot -> page: candidates and decoys mixed through the mapping, so address order tells nothing
    pages = rng.permutation(secrets + decoys)
    for r in range(secrets):
        view[pages[r]] = secret_page(spec["seed"], r, page_size)
    kinds = ["candidate"] * secrets + ["decoy"] * decoys
    secret_of = list(range(secrets)) + [-1] * decoys
    reader = _truth_reader(spec, mapping, view)
    truth_source = TRUTH_PAGEMAP if reader is not None else TRUTH_KSM_STAT
    interval = float(spec["test_interval_s"])
    pid = os.getpid()

    def test(target: mmap.mmap, target_view: np.ndarray, page: int) -> tuple[Any, Any, int]:
        """(truth, ksm_merging_pages, latency_ns) of one test: the same steps for every page,
        calibration included (a syscall or a sleep before a write costs it a cold TLB and
        cache: the threshold must be calibrated on writes made exactly like the tests)."""
        if reader is not None:
            truth = reader.merged(target_view.ctypes.data + page * page_size)
            truth_text, merging = ("" if truth is None else int(truth)), ""
        else:
            truth_text, merging = "", (probes.read_ksm_stat(pid) or {}).get("ksm_merging_pages", "")
        return truth_text, merging, timed_write(target, page * page_size, int(target_view[page, 0]))

    _report(f"filled {time.time():.6f}")
    go.wait()
    start = time.monotonic()
    next_t = start
    rows: list[tuple] = []
    for page in rng.permutation(calibration_pages).tolist():
        _sleep_until(next_t)
        truth_text, merging, ns = test(calibration, calibration_view, page)
        rows.append(("calibration", -1, f"{time.monotonic():.6f}", ns, truth_text, 0, merging))
        next_t = max(next_t + interval, time.monotonic())
    threshold = merge_threshold_ns([row[3] for row in rows], spec["threshold_quantile"], spec["threshold_factor"])
    rows = [row[:5] + (int(called_merged(row[3], threshold)),) + row[6:] for row in rows]
    rotation = rng.permutation(secrets + decoys).tolist()
    end = start + float(spec["duration_s"])
    i = 0
    while next_t < end:
        _sleep_until(next_t)
        slot = rotation[i % len(rotation)]
        truth_text, merging, ns = test(mapping, view, int(pages[slot]))
        rows.append(
            (
                kinds[slot],
                secret_of[slot],
                f"{time.monotonic():.6f}",
                ns,
                truth_text,
                int(called_merged(ns, threshold)),
                merging,
            )
        )
        i += 1
        next_t = max(next_t + interval, time.monotonic())
    _write_csv(
        spec["samples_path"],
        ("kind", "secret", "t_mono", "latency_ns", "truth_merged", "called_merged", "ksm_merging_pages"),
        rows,
    )
    _report(f"done {len(rows)} {threshold:.1f} {truth_source}")
    if reader is not None:
        reader.close()
    return 0


def run(spec: dict) -> int:
    die_with_parent(spec["parent_pid"])
    go = threading.Event()
    _wait_for_go(go)
    try:
        code = (run_victim if spec["role"] == "victim" else run_observer)(spec, go)
    except Exception as exc:  # MemoryError, OSError from mmap/madvise/pagemap, ...
        _report(f"error {type(exc).__name__}: {exc}")
        return 1
    threading.Event().wait()  # keep the mappings until the controller has unmerged and stops us
    return code


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m orchestrator.workloads._exposer '<spec json>'", file=sys.stderr)
        return 2
    return run(json.loads(argv[1]))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
