"""Worker side of the probe workload: a mergeable mapping and a control mapping, timed writes.

Run as ``python -m orchestrator.workloads._prober '<spec json>'`` by probe.py. Like _filler.py it
is a fresh interpreter that dies with its parent (PR_SET_PDEATHSIG + parent check + stdin EOF).

The kernel's tools/testing/selftests/mm/ksm_tests.c -C times one loop of single-byte memsets
to every other page of a '*'-filled area before merging (unmerged pages) and again after (the
COW breaks), and reports the totals. This worker times every write on its own (a distribution,
not a total) and takes its unmerged writes from a separate control mapping, alternated with
the merged ones. -P (merge time) and -D (unmerge time, by MADV_UNMERGEABLE) are the models of
the merge window and the unmerge; the unmerge here is host-wide run=2, what the sweep uses.

What it does:
  1. maps `pages` pages MADV_MERGEABLE (the probe) and `pages` more without it (the control),
     and fills both with the same content (fill = same | zero | duplicate_fraction);
  2. says "filled" and waits for the controller's "measure" line on stdin: the controller
     starts KSM and watches this process's ksm_merging_pages until its target is merged;
  3. times single-byte writes, alternating one page of the probe that held mergeable content
     and one control page (alternating: drift in CPU frequency or load hits both alike), plus
     the same loop writing to one hot page (the timer + interpreter overhead, see cowstats.py);
  4. writes cow.csv rows to `samples_path` and says "measured".

Protocol (one ASCII line per event on stdout):
    mapped <start address> <length bytes>     the probe mapping
    filled <unix time>
    measured <rows> <unix time>
    error <message>                           then exit status 1
stdin: "measure" lines; EOF means exit.
"""

from __future__ import annotations

import csv
import json
import mmap
import os
import signal
import sys
import threading
import time

import numpy as np

from orchestrator.workloads._filler import (
    Filler,
    _report,
    die_with_parent,
    duplicate_page_count,
    first_touch_populator,
    map_pages,
)

PROBE_FILLS = ("same", "zero", "duplicate_fraction")
WRITE_BYTE = 0x5A  # differs from every fill's first byte ('A' = 0x41, 0): the write changes the page


def mergeable_indices(fill: str, pages: int, duplicate_fraction: float) -> np.ndarray:
    """Pages whose content has a twin: all for same/zero, the duplicated head for duplicate_fraction."""
    if fill == "duplicate_fraction":
        return np.arange(duplicate_page_count(pages, duplicate_fraction))
    return np.arange(pages)


def sample_offsets(indices: np.ndarray, count: int, page_size: int, seed: int) -> np.ndarray:
    """Byte offsets of `count` distinct pages drawn from `indices` (all of them if fewer), in a
    random order: a sequential walk would let the hardware prefetcher hide part of the cost."""
    rng = np.random.default_rng(seed)
    chosen = rng.choice(indices, size=min(count, indices.size), replace=False) if indices.size else indices
    return chosen.astype(np.int64) * page_size


def time_writes(mapping: mmap.mmap, offsets: np.ndarray) -> list[int]:
    """perf_counter_ns around one single-byte store per offset. Kept minimal: locals only, so
    the loop overhead is the same here as in the overhead loop."""
    clock = time.perf_counter_ns
    out = []
    append = out.append
    for offset in offsets.tolist():
        start = clock()
        mapping[offset] = WRITE_BYTE
        append(clock() - start)
    return out


def timed_rows(
    probe: mmap.mmap, control: mmap.mmap, merged_offsets: np.ndarray, control_offsets: np.ndarray, overhead_writes: int
) -> list[tuple[str, int, int]]:
    """(region, order, latency_ns) rows: overhead first (warm the loop), then merged and
    unmerged writes alternating one by one, then overhead again."""
    hot = np.zeros(max(1, overhead_writes // 2), dtype=np.int64)
    control[0] = WRITE_BYTE  # the hot page: faulted in and dirty before it is timed
    rows: list[tuple[str, int, int]] = []
    for i, ns in enumerate(time_writes(control, hot)):
        rows.append(("overhead", i, ns))
    pairs = min(merged_offsets.size, control_offsets.size)
    for i in range(pairs):
        rows.append(("merged", i, time_writes(probe, merged_offsets[i : i + 1])[0]))
        rows.append(("unmerged", i, time_writes(control, control_offsets[i : i + 1])[0]))
    for i, ns in enumerate(time_writes(control, hot), start=hot.size):
        rows.append(("overhead", i, ns))
    return rows


def write_samples(path: str, rows: list[tuple[str, int, int]]) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("region", "order", "latency_ns"))
        writer.writerows(rows)
    os.replace(tmp, path)


def _commands(measure_requested: threading.Event) -> None:
    """stdin: 'measure' lines set the event; EOF (controller gone or done) ends the process."""
    buffer = b""
    try:
        while chunk := os.read(0, 4096):
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            if any(line.strip() == b"measure" for line in lines):
                measure_requested.set()
    finally:
        os._exit(0)


def run(spec: dict) -> int:
    die_with_parent(spec["parent_pid"])
    measure_requested = threading.Event()
    threading.Thread(target=_commands, args=(measure_requested,), name="commands", daemon=True).start()
    try:
        page_size = mmap.PAGESIZE
        pages = int(spec["pages"])
        probe, probe_view = map_pages(pages, page_size, madvise_mergeable=bool(spec.get("mergeable", True)))
        control, control_view = map_pages(pages, page_size, madvise_mergeable=False)
        _report(f"mapped {probe_view.ctypes.data:#x} {len(probe)}")
        filler = Filler(spec["fill"], page_size, spec.get("seed", 0), 0, 1, spec.get("duplicate_fraction", 0.0))
        filler(probe_view, 0, populate=first_touch_populator(probe, page_size))
        filler(control_view, 0, populate=first_touch_populator(control, page_size))
        _report(f"filled {time.time():.6f}")
        measure_requested.wait()
        indices = mergeable_indices(spec["fill"], pages, spec.get("duplicate_fraction", 0.0))
        sample = int(spec["sample_pages"])
        merged_offsets = sample_offsets(indices, sample, page_size, spec.get("seed", 0))
        # Control pages: the same page numbers, so both regions' pages sit at the same place in
        # their mapping (and in a THP the same way); page 0 is the hot page, left out.
        control_offsets = merged_offsets[merged_offsets != 0]
        rows = timed_rows(probe, control, merged_offsets, control_offsets, int(spec.get("overhead_writes", 2000)))
        write_samples(spec["samples_path"], rows)
        _report(f"measured {len(rows)} {time.time():.6f}")
    except Exception as exc:  # MemoryError, OSError from mmap/madvise, ...
        _report(f"error {type(exc).__name__}: {exc}")
        return 1
    while True:  # keep the mappings until the controller has unmerged and stops us
        signal.pause()


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m orchestrator.workloads._prober '<spec json>'", file=sys.stderr)
        return 2
    return run(json.loads(argv[1]))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
