"""Read KSM, memory and per-process counters from /proc and /sys.

Pure parsers take the text of one file and return numbers; thin readers take
`root: Path = Path("/")` so tests point them at a fake tree under tmp_path.

Per-process readers return None when the process has gone (or is a zombie
without an address space): a target exiting mid-trial is normal, not an error.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.errors import HostError

KSM_SYSFS = Path("sys/kernel/mm/ksm")

# /proc/vmstat counters that move with KSM (cow_ksm: COW breaks of merged
# pages) or with THP, which competes with KSM for the same anonymous memory.
VMSTAT_OF_INTEREST: tuple[str, ...] = (
    "cow_ksm",
    "ksm_swpin_copy",
    "thp_split_page",
    "thp_split_pmd",
    "thp_fault_alloc",
    "thp_collapse_alloc",
)

CLOCK_TICKS_PER_S: int = os.sysconf("SC_CLK_TCK")
PAGE_KIB: int = os.sysconf("SC_PAGE_SIZE") // 1024

PF_KTHREAD = 0x00200000  # task->flags bit for kernel threads (include/linux/sched.h)

# Errors that mean "this pid no longer has what we want": gone entirely
# (ENOENT) or exiting/zombie (ESRCH from files that need the task's mm).
_GONE_ERRNOS = (errno.ENOENT, errno.ESRCH)


def _read(path: Path) -> str:
    # os.read is ~3x cheaper than open().read() on tiny sysfs/proc files, and the
    # sampler reads ~30 of them per tick. Loop: a seq_file may return in pieces.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode("utf-8", errors="replace")


def _parse_int(text: str) -> int | None:
    try:
        return int(text.strip())
    except ValueError:
        return None


# --- system-wide KSM counters ------------------------------------------------


def parse_ksm_dir(texts: Mapping[str, str]) -> dict[str, int]:
    """Integer-valued files of the KSM sysfs dir, from {file name: file text}.

    Files whose text is not one integer (advisor_mode "[none] scan-time") are
    left out; ksm.read_ksm_knobs reads those.
    """
    values: dict[str, int] = {}
    for name, text in texts.items():
        value = _parse_int(text)
        if value is not None:
            values[name] = value
    return values


# The KSM files that move while ksmd works (the rest are knobs, which only the sweep or a policy
# changes): what the fast sampling tier reads, through CounterFiles.
KSM_COUNTERS: tuple[str, ...] = (
    "pages_shared",
    "pages_sharing",
    "pages_unshared",
    "pages_volatile",
    "pages_scanned",
    "pages_skipped",
    "full_scans",
    "general_profit",
    "ksm_zero_pages",
    "stable_node_chains",
    "stable_node_dups",
)


def read_ksm_files(root: Path = Path("/"), names: tuple[str, ...] | None = None) -> dict[str, str]:
    """Raw text of every readable file in {root}/sys/kernel/mm/ksm (or of `names`), by name."""
    ksm_dir = root / KSM_SYSFS
    try:
        if names is None:
            names = tuple(sorted(entry.name for entry in os.scandir(ksm_dir) if entry.is_file()))
        elif not ksm_dir.is_dir():
            raise FileNotFoundError(ksm_dir)
    except FileNotFoundError:
        raise HostError(f"{ksm_dir} does not exist: this kernel has no KSM (CONFIG_KSM)") from None
    texts: dict[str, str] = {}
    for name in names:
        try:
            texts[name] = _read(ksm_dir / name)
        except OSError:
            # A write-only or vanished attribute is not a counter we can sample.
            continue
    return texts


def _pread_all(fd: int, buf: bytearray) -> tuple[bytearray, str]:
    """The whole text of an open sysfs or /proc file, read at offset 0 in one call (a seq_file
    regenerates its text on a read at 0; two reads could tear it). Into a reused buffer, grown
    until the text fits: /proc/stat's intr line alone runs to tens of KiB on a big host.
    Returns the buffer (maybe grown) and the text."""
    while True:
        size = os.preadv(fd, [buf], 0)
        if size < len(buf):
            return buf, buf[:size].decode("utf-8", errors="replace")
        buf = bytearray(4 * len(buf))


class CounterFiles:
    """Files re-read every tick, opened once: pread at offset 0 makes sysfs and procfs produce
    the value afresh, at about a tenth of the cost of open + read + close (11 KSM counters:
    20 us against 270 us here). The fast sampling tier reads these up to 20 times a second.

    Files that cannot be opened are left out (as read_ksm_files does); a read that fails later
    (the process has gone) leaves that name out of that read. `read(names)` reads only those.
    """

    def __init__(self, paths: Mapping[str, Path]) -> None:
        self._fds: dict[str, int] = {}
        self._buf = bytearray(4096)
        for name, path in paths.items():
            try:
                self._fds[name] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue

    def read(self, names: Iterable[str] | None = None) -> dict[str, str]:
        texts: dict[str, str] = {}
        for name in self._fds if names is None else names:
            fd = self._fds.get(name)
            if fd is None:
                continue
            try:
                self._buf, texts[name] = _pread_all(fd, self._buf)
            except OSError:
                continue
        return texts

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> CounterFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ksm_file_paths(root: Path = Path("/"), names: Iterable[str] = ()) -> dict[str, Path]:
    """{name: path} of those files of the KSM folder, for CounterFiles."""
    return {name: root / KSM_SYSFS / name for name in names}


def ksm_counter_paths(root: Path = Path("/")) -> dict[str, Path]:
    """{name: path} of the KSM counters (KSM_COUNTERS), for CounterFiles."""
    return ksm_file_paths(root, KSM_COUNTERS)


def ksm_knob_names(root: Path = Path("/")) -> tuple[str, ...] | None:
    """The files of the KSM folder that are not KSM_COUNTERS (the knobs, which the sweep or a
    policy changes, and read-only settings); None when this kernel has no KSM folder."""
    try:
        entries = os.scandir(root / KSM_SYSFS)
    except FileNotFoundError:
        return None
    with entries:
        return tuple(sorted(e.name for e in entries if e.is_file() and e.name not in KSM_COUNTERS))


def read_ksm(root: Path = Path("/"), names: tuple[str, ...] | None = None) -> dict[str, int]:
    """Every integer KSM sysfs value, or those of `names` that exist (general_profit in bytes,
    may be negative)."""
    return parse_ksm_dir(read_ksm_files(root, names))


# --- /proc/PID/stat and ksmd ---------------------------------------------------


@dataclass(frozen=True)
class ProcStat:
    pid: int
    comm: str
    state: str
    ppid: int
    flags: int
    utime_ticks: int
    stime_ticks: int
    cutime_ticks: int = 0  # reaped children's user time
    cstime_ticks: int = 0
    start_ticks: int = 0  # start time after boot: with the pid, names one process (pids recur)

    @property
    def is_kernel_thread(self) -> bool:
        return bool(self.flags & PF_KTHREAD)

    @property
    def is_dead(self) -> bool:
        """A zombie (or dying) task: it keeps its comm, and without a reaping init it may stay
        one, but it can no longer write anything (never a live holder of a name)."""
        return self.state in ("Z", "X")

    @property
    def cpu_s(self) -> float:
        return (self.utime_ticks + self.stime_ticks) / CLOCK_TICKS_PER_S

    @property
    def children_cpu_s(self) -> float:
        return (self.cutime_ticks + self.cstime_ticks) / CLOCK_TICKS_PER_S


def parse_proc_stat(text: str) -> ProcStat:
    """Parse /proc/PID/stat. comm may hold spaces and ')', so split at the last ')'."""
    head, sep, tail = text.rpartition(")")
    if not sep:
        raise ValueError(f"not a /proc/PID/stat line: {text[:80]!r}")
    pid_text, _, comm = head.partition(" (")
    # Fields after comm, numbered as in proc(5) minus 3: state=3, ppid=4, flags=9,
    # utime=14, stime=15, cutime=16, cstime=17, starttime=22.
    fields = tail.split()
    return ProcStat(
        pid=int(pid_text),
        comm=comm,
        state=fields[0],
        ppid=int(fields[1]),
        flags=int(fields[6]),
        utime_ticks=int(fields[11]),
        stime_ticks=int(fields[12]),
        cutime_ticks=int(fields[13]),
        cstime_ticks=int(fields[14]),
        start_ticks=int(fields[19]),
    )


def read_proc_stat(pid: int, root: Path = Path("/")) -> ProcStat | None:
    try:
        return parse_proc_stat(_read(root / "proc" / str(pid) / "stat"))
    except OSError as exc:
        if exc.errno in _GONE_ERRNOS:
            return None
        raise


def read_cpu_seconds(pid: int, root: Path = Path("/")) -> float | None:
    """utime+stime of pid in seconds, or None if the process has gone."""
    stat = read_proc_stat(pid, root)
    return None if stat is None else stat.cpu_s


def read_all_proc_stats(root: Path = Path("/")) -> dict[int, ProcStat]:
    """/proc/PID/stat of every process (thread group: its threads are inside), by pid.
    Processes that exit while we read are skipped."""
    stats: dict[int, ProcStat] = {}
    try:
        entries = [entry.name for entry in os.scandir(root / "proc") if entry.name.isdigit()]
    except FileNotFoundError:
        return stats
    for name in entries:
        try:
            stats[int(name)] = parse_proc_stat(_read(root / "proc" / name / "stat"))
        except (OSError, ValueError, IndexError):
            continue
    return stats


def live_comm(pid: int, root: Path = Path("/")) -> str | None:
    """The name of live process pid; None when it is gone, a zombie or unreadable."""
    try:
        stat = read_proc_stat(pid, root)
    except (OSError, ValueError, IndexError):
        return None
    return None if stat is None or stat.is_dead else stat.comm


def live_pids_named(name: str, root: Path = Path("/")) -> list[int]:
    """Live processes (zombies left out) whose comm is exactly `name`, ascending."""
    return sorted(pid for pid, stat in read_all_proc_stats(root).items() if stat.comm == name and not stat.is_dead)


def children_of(pid: int, root: Path = Path("/")) -> list[int]:
    """Direct children of pid (their /proc/PID/stat ppid), ascending."""
    return sorted(child for child, stat in read_all_proc_stats(root).items() if stat.ppid == pid)


def find_ksmd_pid(root: Path = Path("/")) -> int | None:
    """PID of the kernel thread named exactly "ksmd", or None.

    Scans /proc once; callers keep the result (ksmd lives as long as the kernel).
    A user process may call itself ksmd, so the kernel-thread flag must be set.
    """
    try:
        entries = [entry.name for entry in os.scandir(root / "proc") if entry.name.isdigit()]
    except FileNotFoundError:
        return None
    for name in sorted(entries, key=int):
        try:
            stat = parse_proc_stat(_read(root / "proc" / name / "stat"))
        except (OSError, ValueError, IndexError):
            continue
        if stat.comm == "ksmd" and stat.is_kernel_thread:
            return stat.pid
    return None


# --- host CPU ------------------------------------------------------------------


@dataclass(frozen=True)
class HostCpu:
    """The aggregate "cpu" line of /proc/stat, in clock ticks summed over all CPUs, and how many
    CPUs are online (its "cpuN" lines)."""

    busy_ticks: int  # user + nice + system + irq + softirq + steal
    total_ticks: int  # busy + idle + iowait
    not_working_ticks: int = 0  # idle + iowait + steal: time no task of this host ran
    cpus: int = 1

    @property
    def busy_s(self) -> float:
        return self.busy_ticks / CLOCK_TICKS_PER_S

    @property
    def not_working_s(self) -> float:
        return self.not_working_ticks / CLOCK_TICKS_PER_S


def parse_host_cpu(text: str) -> HostCpu:
    """/proc/stat's first line. guest/guest_nice are already inside user/nice (proc(5)), so
    they are not added again; iowait is idle time waiting for I/O, not CPU work.

    The busy fields are sampled at the timer tick and miss work done in short bursts between
    ticks (ksmd's); on a tickless (NO_HZ) kernel idle and iowait are measured at every idle
    entry and exit instead, so wall time x CPUs minus `not_working_s` is the precise busy time."""
    aggregate: HostCpu | None = None
    cpus = 0
    for line in text.splitlines():
        if line.startswith("cpu "):
            values = [int(v) for v in line.split()[1:]]
            values += [0] * (8 - len(values))
            user, nice, system, idle, iowait, irq, softirq, steal = values[:8]
            busy = user + nice + system + irq + softirq + steal
            aggregate = HostCpu(
                busy_ticks=busy, total_ticks=busy + idle + iowait, not_working_ticks=idle + iowait + steal
            )
        elif line.startswith("cpu") and line[3:4].isdigit():
            cpus += 1
    if aggregate is None:
        raise ValueError("no aggregate 'cpu' line in /proc/stat")
    return HostCpu(aggregate.busy_ticks, aggregate.total_ticks, aggregate.not_working_ticks, max(1, cpus))


def parse_uptime_s(text: str) -> float:
    """Seconds since boot from /proc/uptime, the clock of ProcStat.start_ticks."""
    return float(text.split()[0])


def parse_last_pid(text: str) -> int:
    """The pid the kernel handed out last (/proc/loadavg's fifth field, in the reader's pid
    namespace): while it stays the same, no process or thread has been created since."""
    return int(text.split()[4])


def host_counter_paths(root: Path = Path("/")) -> dict[str, Path]:
    """{name: path} of the host-wide /proc files a sampler re-reads, for CounterFiles: meminfo,
    vmstat (parse_meminfo, parse_vmstat), stat (parse_host_cpu), uptime (parse_uptime_s),
    loadavg (parse_last_pid)."""
    return {name: root / "proc" / name for name in ("meminfo", "vmstat", "stat", "uptime", "loadavg")}


def read_children(pid: int, root: Path = Path("/")) -> set[int]:
    """The child processes of pid, from /proc/PID/task/TID/children of each of its threads
    (a child belongs to the thread that forked it); empty if pid has gone."""
    children: set[int] = set()
    try:
        tasks = [entry.name for entry in os.scandir(root / "proc" / str(pid) / "task")]
    except OSError:
        return children
    for tid in tasks:
        try:
            children.update(int(child) for child in _read(root / "proc" / str(pid) / "task" / tid / "children").split())
        except (OSError, ValueError):
            continue
    return children


# --- system memory -------------------------------------------------------------


def _lines_named(text: str, names: Collection[str]) -> list[str]:
    """The lines of a "name: value" or "name value" file that start with one of `names`, found
    by search instead of splitting every line (a sampler wants 6 of /proc/vmstat's ~180)."""
    padded = "\n" + text
    lines = []
    for name in names:
        for sep in (" ", ":"):
            start = padded.find(f"\n{name}{sep}")
            if start >= 0:
                end = padded.find("\n", start + 1)
                lines.append(padded[start + 1 : end if end >= 0 else None])
                break
    return lines


def parse_meminfo(text: str, names: Collection[str] | None = None) -> dict[str, int]:
    """/proc/meminfo (the host's, or a guest's read over SSH) as {field: value}; values are KiB
    except the HugePages_* counts. The one parser of that file in ksm-lab. With `names`, only
    those fields (the ones present): the sampler reads 4 every tick.

    A line that is not `Name: <integer> [kB]` raises ValueError naming it: a wrong unit or a
    truncated number must not become a plausible figure.
    """
    values: dict[str, int] = {}
    for line in text.splitlines() if names is None else _lines_named(text, names):
        key, sep, rest = line.partition(":")
        parts = rest.split()
        if not sep or not parts:
            continue
        if len(parts) > 2 or (len(parts) == 2 and parts[1] != "kB") or not parts[0].isdigit():
            raise ValueError(f"unexpected /proc/meminfo line: {line.strip()!r}")
        values[key.strip()] = int(parts[0])
    return values


def parse_vmstat(text: str, names: Collection[str] | None = None) -> dict[str, int]:
    """/proc/vmstat as {counter: value}; with `names`, only those (the ones present)."""
    values: dict[str, int] = {}
    for line in text.splitlines() if names is None else _lines_named(text, names):
        parts = line.split()
        if len(parts) == 2:
            values[parts[0]] = int(parts[1])
    return values


def read_meminfo(root: Path = Path("/")) -> dict[str, int]:
    return parse_meminfo(_read(root / "proc" / "meminfo"))


def parse_node_meminfo(text: str) -> dict[str, int]:
    """/sys/devices/system/node/nodeN/meminfo ("Node 0 MemFree:  123 kB") as {field: KiB}:
    /proc/meminfo's lines behind a "Node N" prefix, read by the same parser."""
    return parse_meminfo(
        "\n".join(
            line.split(None, 2)[2]
            for line in text.splitlines()
            if line.startswith("Node ") and len(line.split(None, 2)) == 3
        )
    )


def read_node_meminfo(node: int, root: Path = Path("/")) -> dict[str, int] | None:
    try:
        return parse_node_meminfo(_read(root / "sys" / "devices" / "system" / "node" / f"node{node}" / "meminfo"))
    except FileNotFoundError:
        return None


# --- per-process memory --------------------------------------------------------

_SMAPS_FIELDS = {
    "Rss": "rss_kib",
    "Pss": "pss_kib",
    "Swap": "swap_kib",
    "AnonHugePages": "anon_huge_pages_kib",
    "KSM": "ksm_kib",  # 6.x kernels only
}


def parse_smaps_rollup(text: str) -> dict[str, int]:
    """rss/pss/uss/swap/anon_huge_pages (+ksm where present) in KiB.

    USS = Private_Clean + Private_Dirty: what the process alone maps. Fields the
    kernel does not print are absent from the result.
    """
    raw: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        parts = rest.split()
        if sep and len(parts) == 2 and parts[1] == "kB":
            raw[key] = int(parts[0])
    result = {column: raw[field] for field, column in _SMAPS_FIELDS.items() if field in raw}
    if "Private_Clean" in raw and "Private_Dirty" in raw:
        result["uss_kib"] = raw["Private_Clean"] + raw["Private_Dirty"]
    return result


_KSM_STAT_INTS = ("ksm_rmap_items", "ksm_zero_pages", "ksm_merging_pages", "ksm_process_profit")
_KSM_STAT_FLAGS = ("ksm_mergeable", "ksm_merge_any")


def parse_ksm_stat(text: str) -> dict[str, int | bool]:
    """/proc/PID/ksm_stat: counters as int (profit in bytes), mergeable flags as bool.

    Older kernels print fewer lines; missing lines are absent from the result.
    """
    values: dict[str, int | bool] = {}
    for line in text.splitlines():
        parts = line.replace(":", " ").split()
        if len(parts) != 2:
            continue
        key, value = parts
        if key in _KSM_STAT_INTS:
            values[key] = int(value)
        elif key in _KSM_STAT_FLAGS:
            values[key] = value == "yes"
    return values


@dataclass(frozen=True)
class SmapsMapping:
    """One mapping of /proc/PID/smaps: its size, whether it is anonymous, its VmFlags."""

    start: int
    size_kib: int
    anonymous: bool  # no file behind it (no path, or [heap] / [anon:NAME]); never shared memory
    flags: frozenset[str]

    @property
    def mergeable(self) -> bool:
        """VmFlags "mg": madvise(MADV_MERGEABLE) or prctl(PR_SET_MEMORY_MERGE) marked it for KSM."""
        return "mg" in self.flags


def parse_smaps_mappings(text: str) -> list[SmapsMapping]:
    """Every mapping of a /proc/PID/smaps text with its Size and VmFlags (kernels before 3.8
    print no VmFlags: flags are then empty)."""
    mappings: list[SmapsMapping] = []
    header: list[str] | None = None
    size_kib = 0
    flags: frozenset[str] = frozenset()

    def close() -> None:
        if header is not None:
            path = header[5] if len(header) > 5 else ""
            # an inode of 0 with no path (or the kernel's own names) is anonymous memory;
            # shared anonymous memory (rw-s) is shmem, which KSM never merges either
            anonymous = (
                header[4] == "0"
                and (path == "" or path == "[heap]" or path.startswith("[anon:"))
                and header[1][3:4] == "p"
            )
            mappings.append(SmapsMapping(int(header[0].split("-")[0], 16), size_kib, anonymous, flags))

    for line in text.splitlines():
        first = line.split(maxsplit=1)[0] if line.strip() else ""
        if "-" in first and not first.endswith(":"):
            close()
            header, size_kib, flags = line.split(maxsplit=5), 0, frozenset()
        elif line.startswith("Size:"):
            size_kib = int(line.split()[1])
        elif line.startswith("VmFlags:"):
            flags = frozenset(line.split()[1:])
    close()
    return mappings


def guest_ram_mergeable(mappings: list[SmapsMapping], min_kib: int) -> dict[str, Any]:
    """Are a process's big anonymous mappings (>= min_kib: a QEMU's guest RAM) marked for KSM?

    {"big_mappings", "mergeable_mappings", "big_kib", "mergeable_kib", "mergeable": bool | None}:
    mergeable is None when there is no such mapping (nothing to judge)."""
    # Executable ones are left out: TCG's translation buffer (QEMU without KVM) is an anonymous
    # rwx mapping of up to 1 GiB that QEMU never marks, and guest RAM is never executable here.
    big = [m for m in mappings if m.anonymous and "ex" not in m.flags and m.size_kib >= min_kib]
    marked = [m for m in big if m.mergeable]
    return {
        "big_mappings": len(big),
        "mergeable_mappings": len(marked),
        "big_kib": sum(m.size_kib for m in big),
        "mergeable_kib": sum(m.size_kib for m in marked),
        "mergeable": (len(marked) == len(big)) if big else None,
    }


def read_guest_ram_mergeable(pid: int, min_kib: int, root: Path = Path("/")) -> dict[str, Any] | None:
    """guest_ram_mergeable of a live process (None if it has gone); reads /proc/PID/smaps once
    (it walks the page tables: a fraction of a second for a guest of a few GiB)."""
    text = _read_process_file(pid, "smaps", root)
    if not text:
        return None
    return guest_ram_mergeable(parse_smaps_mappings(text), min_kib)


def parse_statm(text: str, page_kib: int = PAGE_KIB) -> dict[str, int]:
    """/proc/PID/statm (pages) as size_kib, rss_kib, shared_kib."""
    size, resident, shared = (int(field) for field in text.split()[:3])
    return {"size_kib": size * page_kib, "rss_kib": resident * page_kib, "shared_kib": shared * page_kib}


def statm_of(text: str | None) -> dict[str, int] | None:
    """parse_statm of a statm text, None when there is none (the process has gone) or its
    address space is empty (a zombie prints zeros)."""
    if text is None:
        return None
    values = parse_statm(text)
    return values if values["size_kib"] > 0 else None


def ksm_stat_of(text: str | None) -> dict[str, int | bool] | None:
    """parse_ksm_stat of a ksm_stat text; None when the process has gone, or is a zombie (it
    still has the file but prints nothing: its memory is gone)."""
    return parse_ksm_stat(text) if text is not None and text.strip() else None


def ksm_merging_pages_of(text: str | None) -> dict[str, int] | None:
    """{"ksm_merging_pages": N} from /proc/PID/ksm_merging_pages (kernels before ksm_stat)."""
    value = None if text is None else _parse_int(text)
    return None if value is None else {"ksm_merging_pages": value}


def _permission_denied(path: Path) -> HostError:
    return HostError(f"cannot read {path}: permission denied (run as root or as the process owner)")


def _read_process_file(pid: int, name: str, root: Path) -> str | None:
    path = root / "proc" / str(pid) / name
    try:
        return _read(path)
    except PermissionError:
        raise _permission_denied(path) from None
    except OSError as exc:
        if exc.errno in _GONE_ERRNOS:
            return None
        raise


def read_smaps_rollup(pid: int, root: Path = Path("/")) -> dict[str, int] | None:
    """PSS tier: walks the page tables of pid, so cost grows with its RSS."""
    text = _read_process_file(pid, "smaps_rollup", root)
    if not text:
        return None
    return parse_smaps_rollup(text)


def read_ksm_stat(pid: int, root: Path = Path("/")) -> dict[str, int | bool] | None:
    """KSM counters of one process.

    {} if the process is alive but the kernel has neither ksm_stat nor
    ksm_merging_pages; None if the process has gone.
    """
    proc_dir = root / "proc" / str(pid)
    text = _read_process_file(pid, "ksm_stat", root)
    if text is not None:
        return ksm_stat_of(text)
    if not proc_dir.is_dir():
        return None
    text = _read_process_file(pid, "ksm_merging_pages", root)
    if text is not None:
        return ksm_merging_pages_of(text)
    return {} if proc_dir.is_dir() else None


# ---- one page's state: /proc/PID/pagemap + /proc/kpageflags (Documentation/admin-guide/mm/pagemap.rst)
# A pagemap entry is 64 bits per virtual page: bit 63 present, bits 0-54 the PFN (zero to a
# reader without CAP_SYS_ADMIN). kpageflags holds 64 flag bits per PFN.
PAGEMAP_PRESENT = 1 << 63
PAGEMAP_PFN_MASK = (1 << 55) - 1
KPF_KSM = 21  # include/uapi/linux/kernel-page-flags.h: a page KSM merged
KPF_ZERO_PAGE = 24  # the zero page (use_zero_pages: KSM maps empty pages to it)


def parse_pagemap_entry(entry: int) -> int | None:
    """The PFN of one pagemap entry; None when the page is not present or its PFN is hidden."""
    if not entry & PAGEMAP_PRESENT:
        return None
    pfn = entry & PAGEMAP_PFN_MASK
    return pfn or None


def page_flags_merged(flags: int) -> bool:
    """A page a write would copy because KSM merged it: a KSM page, or the zero page it maps."""
    return bool(flags & ((1 << KPF_KSM) | (1 << KPF_ZERO_PAGE)))


class PageMergeReader:
    """Per virtual address of process `pid`: is that page merged now? (pagemap -> PFN ->
    kpageflags). Two preads per question, cheap enough to ask right before a timed write.
    `usable` is False where the kernel hides PFNs (not root) or a file is missing: the caller
    falls back to per-process ksm_stat counts."""

    def __init__(self, pid: int | str = "self", root: Path = Path("/")) -> None:
        self._fds: list[int] = []
        try:
            self._pagemap = self._open(root / "proc" / str(pid) / "pagemap")
            self._flags = self._open(root / "proc" / "kpageflags")
        except OSError:
            self.close()
            self._pagemap = self._flags = -1
        self.page_size = os.sysconf("SC_PAGE_SIZE")

    def _open(self, path: Path) -> int:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._fds.append(fd)
        return fd

    @property
    def usable(self) -> bool:
        return self._pagemap >= 0 and self._flags >= 0

    def pfn(self, address: int) -> int | None:
        raw = os.pread(self._pagemap, 8, (address // self.page_size) * 8)
        return parse_pagemap_entry(int.from_bytes(raw, "little")) if len(raw) == 8 else None

    def merged(self, address: int) -> bool | None:
        """True/False for a present page whose PFN the kernel shows; None otherwise."""
        pfn = self.pfn(address)
        if pfn is None:
            return None
        raw = os.pread(self._flags, 8, pfn * 8)
        return page_flags_merged(int.from_bytes(raw, "little")) if len(raw) == 8 else None

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


class ProcessFiles:
    """/proc/PID files of one process, opened once and re-read with pread at offset 0 (as
    CounterFiles): statm 2.5 us against 38 us for open + read + close here, and the sampler
    reads statm and ksm_stat of every target every cheap tick.

    The descriptors hold the process, not its number: once it has exited and been reaped a read
    fails with ESRCH, `gone` turns true and every read returns None, so a later process that
    reuses the pid is never read through them (the caller opens a ProcessFiles for it). A zombie
    still reads (statm zeros, an empty ksm_stat: statm_of and ksm_stat_of say None).
    `names` the kernel lacks are left out: `read` returns None for them, `has` says which.
    """

    def __init__(self, pid: int, names: Iterable[str], root: Path = Path("/")) -> None:
        self.pid = pid
        self.gone = False
        self._fds: dict[str, int] = {}
        self._buf = bytearray(4096)
        self._dir = root / "proc" / str(pid)
        for name in names:
            self._open(name)
        if not self._fds and not self._dir.is_dir():
            self.gone = True

    def _open(self, name: str) -> None:
        path = self._dir / name
        try:
            self._fds[name] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except PermissionError:
            self.close()
            raise _permission_denied(path) from None
        except OSError as exc:
            if exc.errno not in _GONE_ERRNOS:
                self.close()
                raise

    def has(self, name: str) -> bool:
        return name in self._fds

    def read(self, name: str) -> str | None:
        """The file's text now; None if this process has gone or the file is not open."""
        fd = self._fds.get(name)
        if fd is None or self.gone:
            return None
        try:
            self._buf, text = _pread_all(fd, self._buf)
        except OSError as exc:
            if exc.errno in _GONE_ERRNOS:
                self.gone = True
                return None
            raise
        return text

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> ProcessFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ProcessCounters(ProcessFiles):
    """The cheap per-process counters kept open: statm (RSS) and ksm_stat, or
    ksm_merging_pages on kernels without ksm_stat; statm as statm_of and ksm_stat as read_ksm_stat read them."""

    def __init__(self, pid: int, root: Path = Path("/")) -> None:
        super().__init__(pid, ("statm", "ksm_stat"), root)
        if not self.has("ksm_stat") and not self.gone:
            self._open("ksm_merging_pages")

    def statm(self) -> dict[str, int] | None:
        return statm_of(self.read("statm"))

    def ksm_stat(self) -> dict[str, int | bool] | None:
        """As read_ksm_stat: {} when the kernel has neither file, None when the process has gone."""
        if self.has("ksm_stat"):
            return ksm_stat_of(self.read("ksm_stat"))
        if self.has("ksm_merging_pages"):
            return ksm_merging_pages_of(self.read("ksm_merging_pages"))
        return None if self.gone else {}
