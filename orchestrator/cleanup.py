"""What a study's guests leave behind, removed: the teardown pieces GuestSet shares (each
tolerates what is already gone) and ``cleanup()``, which finds what a killed sweep left.

A domain is ours only if its name starts with NAME_PREFIX and it carries our metadata element
(domains.METADATA_NS), which names its overlay and console log. GuestSet defines a domain before
it creates those files and undefines it only after they are gone, so after a SIGKILL every file
we made is recorded on a domain ``cleanup()`` can find.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import libvirt

from orchestrator import states
from orchestrator.domains import METADATA_NS, parse_metadata
from orchestrator.libvirtconn import error_code, libvirt_errors, open_connection
from orchestrator.ports import PortRegistry

# Every domain GuestSet defines is named so: ksmlab-<study>-<i>, restored ones ksmlab-st<key>-<i>.
NAME_PREFIX = "ksmlab-"

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
            unlink(meta.overlay_path)
            unlink(meta.console_log_path)
            undefine(dom)
            for folder in {p.parent for p in (meta.overlay_path, meta.console_log_path) if p}:
                states.remove_uncached_states(folder / states.UNCACHED_STATES)
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only when empty: other studies' files stay
            removed.append(name)
    # A killed sweep never released its forwarded ports; its entries go with its guests.
    PortRegistry().prune()
    return removed
