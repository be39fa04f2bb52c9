"""What a study's guests leave behind, removed: the teardown pieces GuestSet shares (each
tolerates what is already gone) and ``cleanup()``, which finds what a killed sweep left.

A domain is ours only if its name starts with NAME_PREFIX and it carries our metadata element
(domains.METADATA_NS), which names its overlay and console log. GuestSet defines a domain before
it creates those files and undefines it only after they are gone, so after a SIGKILL every file
we made is recorded on a domain ``cleanup()`` can find.
"""

from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path

import libvirt

from orchestrator.guests import states
from orchestrator.guests.domains import METADATA_NS, parse_metadata
from orchestrator.guests.libvirtconn import connect, error_code, libvirt_errors, open_connection
from orchestrator.guests.ports import PortRegistry

# Every domain GuestSet defines is named so: ksmlab-<study>-<i>, restored ones ksmlab-st<key>-<i>.
NAME_PREFIX = "ksmlab-"
# The files GuestSet makes for a guest (provision._Slot): <study slug>-<index>-<8 hex>.qcow2 and
# .console.log. Metadata is data on a domain anyone with libvirt access can define: it names which
# of OUR files to remove, never which file to remove.
OUR_FILE = re.compile(r"[A-Za-z0-9_.-]+-[0-9]+-[0-9a-f]{8}\.(qcow2|console\.log)")

log = logging.getLogger(__name__)

# --- domain teardown pieces (shared by GuestSet and cleanup) -----------------------------------

_NOT_RUNNING = (libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_ERR_NO_DOMAIN)
# Strongest first; older drivers (and the test driver) refuse some flags with INVALID_ARG.
_UNDEFINE_FLAGS = (
    libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
    | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
    | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
    | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM,
    libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA,
    0,
)


def destroy(dom: libvirt.virDomain) -> None:
    try:
        dom.destroy()
    except libvirt.libvirtError as exc:
        if error_code(exc) not in _NOT_RUNNING:
            raise


def undefine(dom: libvirt.virDomain) -> None:
    for flags in _UNDEFINE_FLAGS:
        try:
            dom.undefineFlags(flags)
            return
        except libvirt.libvirtError as exc:
            if error_code(exc) == libvirt.VIR_ERR_NO_DOMAIN:
                return
            if error_code(exc) not in (libvirt.VIR_ERR_INVALID_ARG, libvirt.VIR_ERR_NO_SUPPORT) or flags == 0:
                raise


def unlink(path: Path | None) -> None:
    if path is not None:
        path.unlink(missing_ok=True)


# virtlogd rotates a capped console log to <log>.0, <log>.1, ... (max_backups, 3 by default).
ROTATED_LOGS = 10


def unlink_console_log(path: Path | None) -> None:
    """A console log and the copies virtlogd rotated it to (regular files only)."""
    if path is None:
        return
    unlink(path)
    for n in range(ROTATED_LOGS):
        rotated = path.with_name(f"{path.name}.{n}")
        if rotated.is_file() and not rotated.is_symlink():
            rotated.unlink()


def our_files(overlay: Path | None, console: Path | None) -> list[Path]:
    """The metadata's paths that are files GuestSet made: an absolute path named like ours, a
    regular file or absent (not a link, not a folder), overlay and console log in one folder.
    Anything else is refused with a warning and left where it is."""
    named = [p for p in (overlay, console) if p is not None]
    folders = {p.parent for p in named}
    out = []
    for path in named:
        why = None
        if not path.is_absolute() or ".." in path.parts:
            why = "not an absolute path"
        elif not OUR_FILE.fullmatch(path.name):
            why = "not named like a ksm-lab overlay or console log"
        elif len(folders) > 1:
            why = "overlay and console log in different folders"
        elif path.is_symlink() or (path.exists() and not path.is_file()):
            why = "not a regular file"
        if why:
            log.warning("cleanup: leaving %s alone (%s)", path, why)
        else:
            out.append(path)
    return out


def _our_metadata(dom: libvirt.virDomain):
    """Our metadata on `dom`, or None when the domain is not ours."""
    try:
        text = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS)
    except libvirt.libvirtError as exc:
        if error_code(exc) in (libvirt.VIR_ERR_NO_DOMAIN_METADATA, libvirt.VIR_ERR_NO_DOMAIN):
            return None
        raise
    return parse_metadata(text)


def cleanup(uri: str, study: str | None = None) -> list[str]:
    """Remove every ksm-lab domain (of `study`, or of any study) with its overlay and console log.

    A domain is ours only if its name starts with `ksmlab-` AND it carries our metadata element;
    anything else is left alone. Returns the names removed.
    """
    removed: list[str] = []
    with open_connection(uri) as conn, libvirt_errors(f"cleanup on {uri}"):
        for dom in conn.listAllDomains(0):
            name = dom.name()
            if not name.startswith(NAME_PREFIX):
                continue
            meta = _our_metadata(dom)
            if meta is None or (study is not None and meta.study != study):
                continue
            destroy(dom)
            files = our_files(meta.overlay_path, meta.console_log_path)
            for path in files:
                if path == meta.console_log_path:
                    unlink_console_log(path)
                else:
                    unlink(path)
            undefine(dom)
            for folder in {p.parent for p in files}:
                states.remove_uncached_states(folder / states.UNCACHED_STATES)
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only when empty: other studies' files stay
            removed.append(name)
    # A killed sweep never released its forwarded ports; its entries go with its guests.
    PortRegistry().prune()
    return removed


def leftover(uri: str, studies: tuple[str, ...], timeout_s: float) -> list[str]:
    """Names of our domains (by metadata) of any of `studies` still defined at `uri`; libvirt
    is given timeout_s to answer the open (HostUnresponsive / ProvisionError otherwise)."""
    conn = connect(uri, timeout_s=timeout_s)
    try:
        with libvirt_errors(f"listing domains on {uri}"):
            return [
                dom.name()
                for dom in conn.listAllDomains(0)
                if dom.name().startswith(NAME_PREFIX)
                and (meta := _our_metadata(dom)) is not None
                and meta.study in studies
            ]
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()


def remove_study_states(work_dir: Path) -> bool:
    """A killed study's uncached saved states in its work folder (cache_states = false), which no
    domain names once its guests are gone (killed between saving and restoring): half-built ones
    whose sweep is dead, then the saved ones (only folders of nothing but state files), then the
    folder itself if empty. True if anything was removed."""
    folder = work_dir / states.UNCACHED_STATES
    if not folder.is_dir() or folder.is_symlink():
        return False
    removed = bool(states.remove_stale_builds(folder))
    states.remove_uncached_states(folder)
    removed |= not folder.exists()
    with contextlib.suppress(OSError):
        work_dir.rmdir()  # only when empty
    return removed
