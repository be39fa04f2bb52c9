"""The libvirt connection: its errors translated into ProvisionError, its event loop with
keepalive, and the domain lifecycle events that tell a guest died mid-trial.

provision.py and cleanup.py translate libvirt's errors with ``libvirt_errors``; nothing above
them imports libvirt.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import libvirt

from orchestrator.errors import HostUnresponsive, ProvisionError

# libvirt prints every error to stderr by default; we translate them instead.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


def error_code(exc: libvirt.libvirtError) -> int:
    return exc.get_error_code() or 0


@contextlib.contextmanager
def libvirt_errors(action: str) -> Iterator[None]:
    try:
        yield
    except libvirt.libvirtError as exc:
        raise ProvisionError(f"{action}: {exc}") from exc


# libvirt's own event loop, run by one daemon thread for the whole process: it delivers domain
# lifecycle events (a guest that dies or is paused mid-trial) and drives keepalive, which turns
# a wedged libvirtd into an error instead of a call that never returns.
_EVENT_LOOP_LOCK = threading.Lock()
_event_loop: threading.Thread | None = None
KEEPALIVE_INTERVAL_S = 5
KEEPALIVE_COUNT = 3  # unanswered probes before libvirt closes the connection: ~20 s


def ensure_event_loop() -> None:
    global _event_loop
    with _EVENT_LOOP_LOCK:
        if _event_loop is not None:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        _event_loop = threading.Thread(target=run, name="libvirt-events", daemon=True)
        _event_loop.start()


CONNECT_TIMEOUT_S = 30.0  # libvirt.open() against a stopped libvirtd waits forever, not for an error


def connect(uri: str, timeout_s: float = CONNECT_TIMEOUT_S) -> libvirt.virConnect:
    """A libvirt connection with keepalive (where the driver has it: test:/// does not).

    The socket of a stopped (SIGSTOP) or wedged libvirtd still accepts; the handshake then
    never gets an answer, and keepalive only starts once a connection exists. So the open runs
    in a daemon thread and HostUnresponsive is raised at ``timeout_s``; the thread is left to
    finish or hang on its own.
    """
    ensure_event_loop()
    box: dict[str, object] = {}

    def open_it() -> None:
        try:
            box["conn"] = libvirt.open(uri)
        except libvirt.libvirtError as exc:
            box["error"] = exc

    opener = threading.Thread(target=open_it, name="libvirt-open", daemon=True)
    opener.start()
    opener.join(timeout_s)
    if opener.is_alive():
        raise HostUnresponsive(
            f"libvirt at {uri} did not answer within {timeout_s:g} s (is libvirtd stopped or wedged?)"
        )
    if "error" in box:
        raise ProvisionError(f"cannot connect to libvirt at {uri}: {box['error']}") from box["error"]  # type: ignore[misc]
    conn = box["conn"]
    assert isinstance(conn, libvirt.virConnect)
    try:
        conn.setKeepAlive(KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT)
    except libvirt.libvirtError:
        pass  # local drivers without a daemon: nothing to keep alive
    return conn


_CLOSE_REASONS = {
    libvirt.VIR_CONNECT_CLOSE_REASON_ERROR: "a socket error",
    libvirt.VIR_CONNECT_CLOSE_REASON_EOF: "libvirtd closed the connection",
    libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: (
        f"no keepalive answer for {KEEPALIVE_INTERVAL_S * KEEPALIVE_COUNT} s: libvirtd is stopped or wedged"
    ),
}


def watch_close(conn: libvirt.virConnect, on_close: Callable[[str], None]) -> None:
    """Call ``on_close(why)`` when libvirt drops the connection on its own (keepalive timeout,
    EOF, socket error); our own close() is not reported. Drivers without it: nothing."""

    def closed(_conn: object, reason: int, _opaque: object) -> None:
        if reason != libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT:
            on_close(_CLOSE_REASONS.get(reason, f"close reason {reason}"))

    with contextlib.suppress(libvirt.libvirtError):
        conn.registerCloseCallback(closed, None)


def unwatch_close(conn: libvirt.virConnect) -> None:
    """Undo watch_close: the registration holds a reference that would keep the connection
    (and a test:/// driver's state) alive after close()."""
    with contextlib.suppress(libvirt.libvirtError):
        conn.unregisterCloseCallback()


def is_alive(conn: libvirt.virConnect) -> bool:
    try:
        return bool(conn.isAlive())
    except (libvirt.libvirtError, TypeError):  # TypeError: a connection already closed here
        return False


@contextlib.contextmanager
def open_connection(uri: str) -> Iterator[libvirt.virConnect]:
    conn = connect(uri)
    try:
        yield conn
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()


# --- lifecycle events ---------------------------------------------------------------------------


def watch_lifecycle(conn: libvirt.virConnect, on_lost: Callable[[str, str], None]) -> int | None:
    """Call ``on_lost(domain uuid, what happened)``, from the event loop's thread, whenever a domain
    stops, crashes or is paused. Returns the callback id for ``unwatch_lifecycle``, or None for a
    driver without events (then only a domain's state can tell)."""

    def on_event(_conn: object, dom: libvirt.virDomain, event: int, detail: int, _opaque: object) -> None:
        guest_uuid = dom.UUIDString()
        reason = lost_reason(event, detail)
        if reason is not None:
            on_lost(guest_uuid, reason)

    try:
        return conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, on_event, None)
    except libvirt.libvirtError:
        return None


def unwatch_lifecycle(conn: libvirt.virConnect, event_id: int) -> None:
    with contextlib.suppress(libvirt.libvirtError):
        conn.domainEventDeregisterAny(event_id)


def lost_reason(event: int, detail: int) -> str | None:
    """What a lifecycle event means for a trial; None for events that do not end a guest."""
    if event == libvirt.VIR_DOMAIN_EVENT_STOPPED:
        names = {
            libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED: "was destroyed",
            libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED: "crashed",
            libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED: "failed (QEMU exited)",
            libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN: "shut down",
            libvirt.VIR_DOMAIN_EVENT_STOPPED_SAVED: "was saved",
        }
        return names.get(detail, "stopped")
    if event == libvirt.VIR_DOMAIN_EVENT_CRASHED:
        return "crashed (guest panic)"
    if event == libvirt.VIR_DOMAIN_EVENT_SUSPENDED:
        if detail == libvirt.VIR_DOMAIN_EVENT_SUSPENDED_IOERROR:
            return "was paused by QEMU on an I/O error (disk full?)"
        return "was paused"
    return None


def state_reason(state: int, reason: int) -> str:
    if state == libvirt.VIR_DOMAIN_PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_IOERROR:
        return "is paused on an I/O error (disk full?)"
    names = {
        libvirt.VIR_DOMAIN_PAUSED: "is paused",
        libvirt.VIR_DOMAIN_SHUTOFF: "is shut off",
        libvirt.VIR_DOMAIN_CRASHED: "crashed",
        libvirt.VIR_DOMAIN_SHUTDOWN: "is shutting down",
    }
    return names.get(state, f"is in state {state}")
