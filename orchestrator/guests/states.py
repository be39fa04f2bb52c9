"""Saved guest states: a booted, prepared, warmed-up guest set frozen once, restored per trial.

Each guest of the set is saved with libvirt's save of the running domain (its memory and
device state) and, at the same moment, its disk overlay becomes a read-only layer: every trial
then restores all guests from those files onto fresh overlays backed by the frozen layers, so
every trial starts from the same guest memory and disk (no THP splits, warm pools, or growth
carried over from the trial before) in seconds instead of a boot.

Layout of one saved set (a folder named by its key, which hashes everything that shaped it:
image, prepared layers, guest hardware, workload preparation, warm-up):

    <states root>/<key>/state.json     key, spec, guests (index, name, uuid, marker), sizes
                        /g<i>.save     libvirt save image of guest i
                        /g<i>.qcow2    guest i's disk at the moment it was saved (read-only)
                        /g<i>.xml      the domain XML stored in the save image

A set is built in `.<key>.build-<pid>` beside the final folder and renamed when complete, so
a half-written set is never used; `remove_stale_builds` deletes those of dead processes. The
saved domain name and uuid are part of the save image (libvirt refuses a restore under another
name), so the guests of a set are always restored under the names they were saved with.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.errors import ProvisionError

STATE_FILE = "state.json"
STATE_FORMAT = 1
# Where, inside each guest, the marker proving "this is the saved guest" lives: /run is tmpfs,
# so the marker is in guest memory only and a rebooted or wrong guest cannot show it.
MARKER_PATH = "/run/ksmlab-state"
UNCACHED_STATES = "states"  # subfolder of a study's work folder (cache_states = false)


def states_root(image_dir: Path | None, cache_dir: Path, disk_path: Path) -> Path:
    """Cached saved states live beside the image they were built on (`image rm` takes them
    along); states of a brought image, which has no cache folder, under the cache's states/."""
    if image_dir is not None:
        return Path(image_dir) / "states"
    return Path(cache_dir) / "states" / hashlib.sha256(str(disk_path).encode()).hexdigest()[:12]


def mixed_root(cache_dir: Path, image_ids: list[str]) -> Path:
    """Cached saved states of guest sets that mix images ([guests] groups): under the cache's
    states/, named by the images, since no one image's folder holds them."""
    digest = hashlib.sha256(json.dumps(sorted(image_ids)).encode()).hexdigest()[:12]
    return Path(cache_dir) / "states" / f"mixed-{digest}"


def all_roots(cache_dir: Path) -> list[Path]:
    """Every folder under an image cache that may hold saved states."""
    cache_dir = Path(cache_dir)
    roots = [p / "states" for p in sorted(cache_dir.iterdir()) if (p / "states").is_dir()] if cache_dir.is_dir() else []
    brought = cache_dir / "states"
    if brought.is_dir():
        roots += [p for p in sorted(brought.iterdir()) if p.is_dir()]
    return roots


def state_key(spec: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()
    return digest[:16]


def new_marker(key: str, index: int) -> str:
    return f"{key}:{index}:{secrets.token_hex(8)}"


@dataclass(frozen=True)
class SavedGuest:
    index: int
    name: str
    uuid: str
    marker: str
    save_path: Path
    disk_path: Path
    xml_path: Path

    @property
    def saved_xml(self) -> str:
        return self.xml_path.read_text()


@dataclass(frozen=True)
class SavedSet:
    key: str
    folder: Path
    guests: tuple[SavedGuest, ...]
    info: dict[str, Any]

    @property
    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.iterdir() if p.is_file())


def is_state_file(name: str) -> bool:
    """A file name a saved set's folder may hold (what cleanup may delete there)."""
    return name == STATE_FILE or re.fullmatch(r"g\d+\.(save|qcow2|xml)", name) is not None


def guest_files(folder: Path, index: int) -> tuple[Path, Path, Path]:
    """(save image, frozen disk, domain XML) of guest `index` in a set's folder."""
    return folder / f"g{index}.save", folder / f"g{index}.qcow2", folder / f"g{index}.xml"


def load(folder: Path) -> SavedSet | None:
    """The saved set in `folder`, or None when there is none or it is incomplete."""
    try:
        meta = json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    if meta.get("format") != STATE_FORMAT:
        return None
    guests = []
    for entry in meta.get("guests", []):
        save_path, disk_path, xml_path = guest_files(folder, int(entry["index"]))
        if not (save_path.is_file() and disk_path.is_file() and xml_path.is_file()):
            return None
        guests.append(
            SavedGuest(
                int(entry["index"]), entry["name"], entry["uuid"], entry["marker"], save_path, disk_path, xml_path
            )
        )
    if not guests:
        return None
    return SavedSet(str(meta["key"]), folder, tuple(sorted(guests, key=lambda g: g.index)), meta)


def build_folder(root: Path, key: str) -> Path:
    folder = root / f".{key}.build-{os.getpid()}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    # Search, no read: QEMU runs as libvirt's unprivileged user and must reach each guest's disk
    # layer by name (a backing file); the saved memory files in it stay 0600 root (libvirt opens
    # them and hands QEMU the descriptor), and the folder cannot be listed.
    folder.chmod(0o711)
    return folder


def commit(
    build: Path, root: Path, key: str, spec: dict[str, Any], guests: list[dict[str, Any]], extra: dict[str, Any]
) -> SavedSet:
    """Write state.json into the build folder and rename it into place (atomic on one fs)."""
    meta = {"format": STATE_FORMAT, "key": key, "spec": spec, "guests": guests, "created_wall": time.time(), **extra}
    (build / STATE_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    final = root / key
    if final.exists():  # another build won; ours is identical by key, keep theirs
        shutil.rmtree(build)
    else:
        os.replace(build, final)
    loaded = load(final)
    if loaded is None:
        raise ProvisionError(f"saved guest state {final} is incomplete after writing it")
    return loaded


def list_states(root: Path) -> list[SavedSet]:
    if not root.is_dir():
        return []
    found = (load(p) for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith("."))
    return [s for s in found if s is not None]


def remove(root: Path, key: str) -> None:
    folder = root / key
    if not key or "/" in key or key.startswith(".") or not (folder / STATE_FILE).is_file():
        raise ProvisionError(f"no saved guest state {key!r} under {root}")
    shutil.rmtree(folder)


def remove_stale_builds(root: Path) -> list[Path]:
    """Delete `.<key>.build-<pid>` folders whose process is gone (a sweep killed mid-save)."""
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for path in root.iterdir():
        name = path.name
        if not (path.is_dir() and name.startswith(".") and ".build-" in name):
            continue
        pid_text = name.rpartition(".build-")[2]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and not Path(f"/proc/{pid_text}").exists():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def remove_uncached_states(folder: Path) -> None:
    """A killed study's uncached saved states, beside its overlays. Only folders that hold
    nothing but saved-state files are removed: metadata names the folder, it does not get to
    name what is deleted."""
    if not folder.is_dir() or folder.is_symlink():
        return
    for entry in folder.iterdir():
        if entry.is_symlink() or not entry.is_dir():
            return
        if any(f.is_symlink() or not f.is_file() or not is_state_file(f.name) for f in entry.iterdir()):
            return
    for entry in folder.iterdir():
        for f in entry.iterdir():
            f.unlink()
        entry.rmdir()
    folder.rmdir()
