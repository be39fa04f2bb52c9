"""Worker side of the synthetic processes workload: one mergeable mapping, refilled each round.

Run as ``python -m orchestrator.workloads._filler '<spec json>'`` by processes.py; the pure fill
functions at the top are also used by benchmarks/fill_rate.py and the tests.

Protocol with the controller (one ASCII line per event on stdout):
    mapped <start address> <length bytes>
    fill <n> <unix time>      fill n starts (the first fill is fill 1; later ones are refills)
    round <n> <unix time>     n fills completed
    error <message>           the worker failed; it exits with status 1 right after
stdin is the lifeline: when it reaches EOF (the controller closed it or died) the worker exits.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

FILLS = ("zero", "same", "fixed_random", "random", "duplicate_fraction")

# 'A', the letter the original study's FIXED mode wrote everywhere.
SAME_BYTE = 0x41

PR_SET_PDEATHSIG = 1
PR_SET_MEMORY_MERGE = 67
PR_GET_MEMORY_MERGE = 68

# Random fills go through a 1 MiB scratch chunk so no full-size temporary is ever allocated.
_RANDOM_CHUNK_WORDS = 1 << 17
# Pages filled per step: 512 x 4 KiB = 2 MiB, about what stays in this host's L2.
CHUNK_PAGES = 512
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)


def round_rng(seed: int, worker_index: int, round_index: int) -> np.random.Generator:
    """The generator for one worker's one round: reproducible from the seed alone.

    SFC64 because it produces raw words about 60% faster than the default PCG64.
    """
    return np.random.Generator(np.random.SFC64(np.random.SeedSequence([seed, worker_index, round_index])))


def distinct_patterns(count: int, page_size: int, seed: int) -> np.ndarray:
    """`count` random pages, guaranteed pairwise different (each starts with its own index).

    Depends on the seed only, so every worker holds the same set and pages merge across processes.
    """
    rng = np.random.Generator(np.random.SFC64(np.random.SeedSequence([seed, 0xFA77E2])))
    patterns = rng.integers(0, 256, size=(count, page_size), dtype=np.uint8)
    patterns[:, :8] = np.arange(count, dtype="<u8").view(np.uint8).reshape(count, 8)
    return patterns


def shuffled_pattern_index(page_count: int, pattern_count: int, rng: np.random.Generator) -> np.ndarray:
    """Which pattern each page gets: every pattern is used when there are enough pages.

    A shuffled `arange % K` rather than independent draws, so the number of distinct pages (and
    so the best possible merge) is exactly min(M, K) instead of depending on luck.
    """
    return rng.permutation(np.arange(page_count, dtype=np.intp) % pattern_count)


def duplicate_page_count(page_count: int, duplicate_fraction: float) -> int:
    return round(page_count * duplicate_fraction)


def fill_zero(pages: np.ndarray) -> None:
    pages.fill(0)


def fill_same(pages: np.ndarray) -> None:
    pages.fill(SAME_BYTE)


def fill_fixed_random(pages: np.ndarray, patterns: np.ndarray, index: np.ndarray) -> None:
    # mode="clip" because the default mode="raise" buffers `out`, i.e. a full-size temporary.
    np.take(patterns, index, axis=0, out=pages, mode="clip")


def fill_random(pages: np.ndarray, rng: np.random.Generator) -> None:
    words = pages.reshape(-1).view(np.uint64)
    for start in range(0, words.size, _RANDOM_CHUNK_WORDS):
        stop = min(start + _RANDOM_CHUNK_WORDS, words.size)
        words[start:stop] = rng.bit_generator.random_raw(stop - start)


Populate = Callable[[int, int], None]


@dataclass(frozen=True)
class Filler:
    """Fills a (pages, page_size) uint8 view for a given round, per the fill mode.

    zero: all bytes 0. same: every page all 'A' (identical across workers too).
    fixed_random: each page one of `distinct_pages` patterns shared by all workers, reshuffled
    each round. random: fresh random bytes each round (nothing merges). duplicate_fraction: the
    first round(M * fraction) pages as in `same`, the rest random.
    Content depends only on (seed, worker_index, round_index).
    """

    fill: str
    page_size: int
    seed: int = 0
    worker_index: int = 0
    distinct_pages: int = 26
    duplicate_fraction: float = 0.0

    def __post_init__(self) -> None:
        if self.fill not in FILLS:
            raise ValueError(f"unknown fill {self.fill!r}; expected one of {', '.join(FILLS)}")
        if self.fill == "fixed_random":
            # Built once per worker, not per round: K pages is small next to the mapping.
            patterns = distinct_patterns(self.distinct_pages, self.page_size, self.seed)
            object.__setattr__(self, "_patterns", patterns)

    def __call__(self, pages: np.ndarray, round_index: int, populate: Populate | None = None) -> None:
        """Fill `pages` in chunks; `populate(first_page, page_count)` runs before each chunk.

        Chunks keep what was just faulted in (or populated) in cache while it is written.
        """
        page_count = pages.shape[0]
        rng = round_rng(self.seed, self.worker_index, round_index)
        if self.fill == "fixed_random":
            index = shuffled_pattern_index(page_count, self.distinct_pages, rng)
        duplicates = duplicate_page_count(page_count, self.duplicate_fraction)
        for start in range(0, page_count, CHUNK_PAGES):
            stop = min(start + CHUNK_PAGES, page_count)
            if populate is not None:
                populate(start, stop - start)
            chunk = pages[start:stop]
            if self.fill == "zero":
                fill_zero(chunk)
            elif self.fill == "same":
                fill_same(chunk)
            elif self.fill == "fixed_random":
                fill_fixed_random(chunk, self._patterns, index[start:stop])  # type: ignore[attr-defined]
            elif self.fill == "random":
                fill_random(chunk, rng)
            else:
                split = min(max(duplicates - start, 0), stop - start)
                fill_same(chunk[:split])
                fill_random(chunk[split:], rng)


def first_touch_populator(mapping: mmap.mmap, page_size: int) -> Populate:
    """Pre-fault pages with MADV_POPULATE_WRITE, one chunk at a time, before they are written.

    One madvise per chunk costs far less than a page fault per page: it lifts the first fill
    from below a C memset loop's rate to above it. Where the kernel lacks it (< 5.14) or refuses,
    the writes simply fault the pages in.
    """
    supported = True

    def populate(first_page: int, page_count: int) -> None:
        nonlocal supported
        if supported:
            try:
                mapping.madvise(MADV_POPULATE_WRITE, first_page * page_size, page_count * page_size)
            except OSError:
                supported = False

    return populate


def map_pages(pages_total: int, page_size: int, madvise_mergeable: bool) -> tuple[mmap.mmap, np.ndarray]:
    """An anonymous private mapping and a (pages, page_size) view over it, nothing touched yet.

    MADV_MERGEABLE goes on before the first write, as in the original study, so KSM sees the
    pages from their first fill.
    """
    mapping = mmap.mmap(
        -1,
        pages_total * page_size,
        flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
        prot=mmap.PROT_READ | mmap.PROT_WRITE,
    )
    if madvise_mergeable:
        mapping.madvise(mmap.MADV_MERGEABLE)
    return mapping, np.frombuffer(mapping, dtype=np.uint8).reshape(pages_total, page_size)


def _prctl(option: int, arg2: int = 0) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    result = libc.prctl(option, arg2, 0, 0, 0)
    if result == -1:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


def memory_merge_supported() -> bool:
    """True when the kernel knows PR_SET_MEMORY_MERGE (Linux >= 6.4 with CONFIG_KSM)."""
    try:
        _prctl(PR_GET_MEMORY_MERGE)
    except OSError:
        return False
    return True


def enable_memory_merge() -> None:
    """Mark this whole process mergeable (every present and future mapping)."""
    try:
        _prctl(PR_SET_MEMORY_MERGE, 1)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            raise OSError(
                exc.errno,
                "prctl(PR_SET_MEMORY_MERGE) is not supported by this kernel "
                f"({os.uname().release}; needs Linux >= 6.4 with CONFIG_KSM)",
            ) from None
        if exc.errno == errno.EPERM:
            raise OSError(exc.errno, "prctl(PR_SET_MEMORY_MERGE) was refused: it needs CAP_SYS_RESOURCE") from None
        raise


def die_with_parent(expected_parent_pid: int) -> None:
    """Get SIGKILLed when the parent dies; exit now if it already died before we asked."""
    _prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
    if os.getppid() != expected_parent_pid:
        os._exit(3)


def _exit_on_stdin_eof() -> None:
    try:
        while os.read(0, 4096):
            pass
    finally:
        os._exit(0)


def _report(line: str) -> None:
    # One write per line, unbuffered: the controller reads lines as they come.
    os.write(1, (line.replace("\n", " ") + "\n").encode())


def run(spec: dict) -> int:
    die_with_parent(spec["parent_pid"])
    threading.Thread(target=_exit_on_stdin_eof, name="lifeline", daemon=True).start()
    try:
        if spec["cpu"] is not None:
            os.sched_setaffinity(0, {spec["cpu"]})
        if spec["merge_mode"] == "prctl":
            enable_memory_merge()
        page_size = mmap.PAGESIZE
        mapping, pages = map_pages(spec["pages"], page_size, madvise_mergeable=spec["merge_mode"] == "madvise")
        _report(f"mapped {pages.ctypes.data:#x} {len(mapping)}")
        populate = first_touch_populator(mapping, page_size)
        filler = Filler(
            spec["fill"], page_size, spec["seed"], spec["index"], spec["distinct_pages"], spec["duplicate_fraction"]
        )
        rounds = spec["rounds"]
        done = 0
        while rounds == 0 or done < rounds:
            if done:
                time.sleep(spec["round_wait_s"])
            # Wall-clock times, the sampler's t_wall clock: metrics align refills with ticks.
            _report(f"fill {done + 1} {time.time():.6f}")
            filler(pages, done, populate=populate if done == 0 else None)
            done += 1
            _report(f"round {done} {time.time():.6f}")
    except Exception as exc:  # MemoryError, OSError from mmap/prctl/affinity, ...
        _report(f"error {type(exc).__name__}: {exc}")
        return 1
    # All rounds done: keep the pages, unchanged, until the controller stops us.
    while True:
        signal.pause()


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m orchestrator.workloads._filler '<spec json>'", file=sys.stderr)
        return 2
    return run(json.loads(argv[1]))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
