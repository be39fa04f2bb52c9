"""Fill rate of the processes workload's numpy filler against a plain C memset loop.

Both fill the same kind of mapping (anonymous, private, MADV_MERGEABLE before the first touch) and
are timed twice: the first touch (page-fault bound) and a refill of pages already present.
Targets: Python first touch >= 0.8x C, refill >= 0.5x C, for fill=same and fill=zero.

    .venv/bin/python benchmarks/fill_rate.py [--size-mib 1024] [--repeats 3]

KSM is left alone; if /sys/kernel/mm/ksm/run is not 0 the figures include ksmd's interference
and the script says so.
"""

from __future__ import annotations

import argparse
import mmap
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.workloads._filler import SAME_BYTE, Filler, first_touch_populator, map_pages  # noqa: E402
from orchestrator.units import MIB

TARGET_FIRST_TOUCH = 0.8
TARGET_REFILL = 0.5

C_SOURCE = r"""
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void fill(unsigned char *p, size_t pages, size_t page_size, int byte) {
    for (size_t i = 0; i < pages; i++)
        memset(p + i * page_size, byte, page_size);
}

int main(int argc, char **argv) {
    size_t size = strtoull(argv[1], NULL, 10);
    int byte = atoi(argv[2]);
    size_t page_size = sysconf(_SC_PAGESIZE);
    size_t pages = size / page_size;
    unsigned char *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED || madvise(p, size, MADV_MERGEABLE) != 0) { perror("mmap/madvise"); return 1; }
    double t0 = now_s();
    fill(p, pages, page_size, byte);
    double t1 = now_s();
    fill(p, pages, page_size, byte);
    double t2 = now_s();
    /* Read one byte back so the compiler cannot drop the fills. */
    printf("%.9f %.9f %d\n", t1 - t0, t2 - t1, p[size - 1]);
    return 0;
}
"""


def build_c(workdir: Path) -> Path:
    if shutil.which("gcc") is None:
        sys.exit("gcc not found; it is needed for the C reference")
    source, binary = workdir / "fill.c", workdir / "fill"
    source.write_text(C_SOURCE)
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(source)], check=True)
    return binary


def time_c(binary: Path, size_bytes: int, byte: int) -> tuple[float, float]:
    out = subprocess.run([str(binary), str(size_bytes), str(byte)], check=True, capture_output=True, text=True)
    first_s, refill_s, _ = out.stdout.split()
    return float(first_s), float(refill_s)


def time_python(fill: str, size_bytes: int) -> tuple[float, float]:
    page_size = mmap.PAGESIZE
    mapping, pages = map_pages(size_bytes // page_size, page_size, madvise_mergeable=True)
    filler = Filler(fill, page_size, seed=1, duplicate_fraction=0.5)
    populate = first_touch_populator(mapping, page_size)
    t0 = time.perf_counter()
    filler(pages, 0, populate=populate)  # exactly as a worker does its first fill
    t1 = time.perf_counter()
    filler(pages, 1)
    t2 = time.perf_counter()
    del pages  # the view holds an export on the mapping; drop it before unmapping
    mapping.close()
    return t1 - t0, t2 - t1


def ksm_run_state() -> str:
    try:
        return Path("/sys/kernel/mm/ksm/run").read_text().strip()
    except OSError:
        return "unreadable"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure; the median is printed")
    args = parser.parse_args()
    size_bytes = args.size_mib * MIB
    gib = size_bytes / 2**30

    run = ksm_run_state()
    print(f"KSM run = {run}" + ("" if run == "0" else "  (NOT 0: ksmd may interfere with these figures)"))
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists():
        print(f"THP enabled: {thp.read_text().strip()}")
    print(f"mapping {args.size_mib} MiB, page size {mmap.PAGESIZE}, median of {args.repeats} runs\n")

    refs = {"C memset 0x41": SAME_BYTE, "C memset 0": 0}
    modes = ("same", "zero", "fixed_random", "random", "duplicate_fraction")
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in [*refs, *modes]}
    with tempfile.TemporaryDirectory(prefix="fill-rate-") as tmp:
        binary = build_c(Path(tmp))
        # Interleaved, so drift in the host's free-page state affects C and Python alike.
        for _ in range(args.repeats):
            for name, byte in refs.items():
                results[name].append(time_c(binary, size_bytes, byte))
            for mode in modes:
                results[mode].append(time_python(mode, size_bytes))

    rates = {}
    for name, runs in results.items():
        rates[name] = (gib / statistics.median(r[0] for r in runs), gib / statistics.median(r[1] for r in runs))

    print(f"{'filler':26s} {'first touch GiB/s':>18s} {'refill GiB/s':>13s}")
    for name, (first, refill) in rates.items():
        label = name if name.startswith("C ") else f"numpy {name}"
        print(f"{label:26s} {first:18.2f} {refill:13.2f}")

    print(f"\nratio to C (targets: first touch >= {TARGET_FIRST_TOUCH}x, refill >= {TARGET_REFILL}x)")
    ok = True
    for mode, ref in (("same", "C memset 0x41"), ("zero", "C memset 0")):
        first = rates[mode][0] / rates[ref][0]
        refill = rates[mode][1] / rates[ref][1]
        meets = first >= TARGET_FIRST_TOUCH and refill >= TARGET_REFILL
        ok &= meets
        print(
            f"  {mode:5s} vs {ref:14s} first touch {first:5.2f}x  refill {refill:5.2f}x  "
            f"{'meets targets' if meets else 'BELOW TARGET'}"
        )
    for mode in ("fixed_random", "random", "duplicate_fraction"):
        first = rates[mode][0] / rates["C memset 0x41"][0]
        refill = rates[mode][1] / rates["C memset 0x41"][1]
        print(f"  {mode:18s} vs C memset 0x41 first touch {first:5.2f}x  refill {refill:5.2f}x  (information)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
