"""The libvirt connection when libvirtd does not answer: a real libvirt client against a socket
that accepts and then says nothing, which is what a stopped (SIGSTOP) or wedged libvirtd looks
like from the client side. No daemon needed."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from orchestrator.errors import HostUnresponsive
from orchestrator.guests.libvirtconn import connect, is_alive


@pytest.fixture
def silent_socket(tmp_path: Path):
    path = tmp_path / "libvirt-sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(8)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])  # ... and never answer
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield path
    stop.set()
    thread.join(5)
    for conn in accepted:
        conn.close()
    server.close()


def test_connect_to_a_libvirtd_that_never_answers_gives_up_at_its_deadline(silent_socket: Path) -> None:
    started = time.monotonic()
    with pytest.raises(HostUnresponsive, match=r"did not answer within 1 s \(is libvirtd stopped or wedged\?\)"):
        connect(f"qemu+unix:///system?socket={silent_socket}", timeout_s=1)
    assert time.monotonic() - started < 5


def test_test_driver_connects_and_is_alive() -> None:
    conn = connect("test:///default")
    try:
        assert is_alive(conn)
    finally:
        conn.close()


def test_check_gives_up_on_a_libvirtd_that_never_answers(silent_socket: Path) -> None:
    from orchestrator.guests.hostsetup import _check_libvirt

    started = time.monotonic()
    result = _check_libvirt(f"qemu+unix:///system?socket={silent_socket}", timeout_s=1)
    assert not result.ok and "did not answer within 1 s" in result.detail
    assert time.monotonic() - started < 30
