"""GuestSession against a real SSH server on 127.0.0.1 (tests/sshserver.py)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest

from orchestrator.errors import GuestError
from orchestrator.guests import guest as guest_module
from orchestrator.guests.guest import CommandTimeout, GuestSession, deadline_wrapped
from orchestrator.host import probes
from tests.sshserver import SshServer


def _public_line(key: paramiko.PKey) -> str:
    return f"{key.get_name()} {key.get_base64()} test-host"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    folder = tmp_path_factory.mktemp("keys")
    # paramiko cannot generate ed25519 keys; ssh-keygen writes them as the image build does.
    for name in ("login", "host", "other_host"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / name)], check=True)
    return {
        "login_path": folder / "login",
        "login": paramiko.PKey.from_path(folder / "login"),
        "host": paramiko.PKey.from_path(folder / "host"),
        "other_host": paramiko.PKey.from_path(folder / "other_host"),
    }


@pytest.fixture
def server(keys: dict) -> Iterator[SshServer]:
    srv = SshServer(keys["host"], keys["login"])
    yield srv
    srv.stop()


def _session(keys: dict, port: int, **kwargs: object) -> GuestSession:
    return GuestSession(
        port=port, user="tester", key_path=keys["login_path"], known_host_key=_public_line(keys["host"]), **kwargs
    )  # type: ignore[arg-type]


def test_run_returns_status_stdout_and_stderr(keys: dict, server: SshServer) -> None:
    with _session(keys, server.port) as guest:
        result = guest.run("echo out; echo err >&2; exit 3", timeout_s=10)
    assert result.exit_status == 3
    assert result.stdout == "out\n"
    assert result.stderr == "err\n"
    assert not result.ok
    assert result.duration_s > 0


def test_run_check_raises_naming_the_command(keys: dict, server: SshServer) -> None:
    with _session(keys, server.port) as guest, pytest.raises(GuestError, match="false.*exited 1"):
        guest.run(["false"], timeout_s=10, check=True)


def test_argv_is_quoted_word_by_word(keys: dict, server: SshServer, tmp_path: Path) -> None:
    marker = tmp_path / "injected"
    tricky = f"a b 'c' \"d\" ; touch {marker} $(touch {marker}) `touch {marker}`"
    with _session(keys, server.port) as guest:
        result = guest.run(["printf", "%s|", tricky, "two words"], timeout_s=10, check=True)
    assert result.stdout == f"{tricky}|two words|"
    assert not marker.exists()


def test_large_output_is_read_completely(keys: dict, server: SshServer) -> None:
    with _session(keys, server.port) as guest:
        result = guest.run("head -c 3000000 /dev/zero | tr '\\0' x", timeout_s=30, check=True)
    assert len(result.stdout) == 3_000_000


def test_timeout_raises_guest_error_naming_the_command(keys: dict, server: SshServer) -> None:
    with _session(keys, server.port) as guest:
        started = time.monotonic()
        with pytest.raises(GuestError, match="`sleep 5` timed out after 0.5 s"):
            guest.run(["sleep", "5"], timeout_s=0.5)
        assert time.monotonic() - started < 3
        # The session stays usable after a timed-out command.
        assert guest.run(["echo", "still"], timeout_s=10).stdout == "still\n"


def _gone(pid: int, within_s: float = 3.0) -> bool:
    """True once `pid` no longer exists (a zombie counts as gone: it runs nothing)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if probes.live_comm(pid) is None:
            return True
        time.sleep(0.1)
    return False


def test_command_is_killed_in_the_guest_at_its_deadline(keys: dict, server: SshServer, tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    with _session(keys, server.port) as guest:
        started = time.monotonic()
        with pytest.raises(
            CommandTimeout,
            match="`sh -c .*sleep 30'` timed out after 1 s "
            r"\(stopped in the guest\)",
        ) as err:
            guest.run(["sh", "-c", f"echo $$ > {pid_file}; echo started; exec sleep 30"], timeout_s=1)
        assert time.monotonic() - started < 4
        assert err.value.partial.stdout == "started\n"  # what it printed before the deadline
        assert err.value.partial.exit_status == 124
    pid = int(pid_file.read_text())
    assert _gone(pid), f"sleep {pid} still runs after its deadline"
    assert server.commands[-1].startswith("timeout --kill-after=5 1.000 sh -c ")


def test_every_command_runs_under_the_guests_timeout(keys: dict, server: SshServer) -> None:
    with _session(keys, server.port) as guest:
        guest.run("echo 'a b' | tr a x", timeout_s=2.5, check=True)
    assert server.commands == [deadline_wrapped("echo 'a b' | tr a x", 2.5)]
    assert server.commands[0] == "timeout --kill-after=5 2.500 sh -c 'echo '\"'\"'a b'\"'\"' | tr a x'"
    assert deadline_wrapped("true", 0.0001).startswith("timeout --kill-after=5 0.001 ")


def test_watchdog_closes_the_channel_when_the_guest_does_not_stop_it(
    keys: dict, server: SshServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A guest whose `timeout` never acts (hung, or a broken one): only the host can end the wait.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "timeout").write_text('#!/bin/sh\nshift 2\nexec "$@"\n')
    (fake_bin / "timeout").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}:{os.environ['PATH']}")
    monkeypatch.setattr(guest_module, "KILL_AFTER_S", 0.5)
    monkeypatch.setattr(guest_module, "WATCHDOG_GRACE_S", 0.5)
    pid_file = tmp_path / "pid"
    try:
        with _session(keys, server.port) as guest:
            started = time.monotonic()
            with pytest.raises(
                CommandTimeout, match="exec sleep 30` timed out after 1 s; the guest did not answer 1 s later either"
            ):
                guest.run(f"echo $$ > {pid_file}; exec sleep 30", timeout_s=1)
            assert 2 <= time.monotonic() - started < 4
            assert guest.run(["echo", "still"], timeout_s=10).stdout == "still\n"
    finally:
        if pid_file.exists():
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_a_guest_without_timeout_is_a_clear_error(
    keys: dict, server: SshServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    only_sh = tmp_path / "bin"
    only_sh.mkdir()
    (only_sh / "sh").symlink_to(shutil.which("sh"))
    monkeypatch.setenv("PATH", str(only_sh))
    with _session(keys, server.port) as guest, pytest.raises(GuestError, match="the guest has no `timeout` command"):
        guest.run(["true"], timeout_s=60)  # a generous deadline: the point is the missing command


def test_wrong_host_key_is_refused(keys: dict) -> None:
    impostor = SshServer(keys["other_host"], keys["login"])
    try:
        with pytest.raises(GuestError, match="host key mismatch"):
            with _session(keys, impostor.port, connect_deadline_s=5):
                pass
        assert impostor.commands == []
    finally:
        impostor.stop()


def test_host_key_of_another_type_is_refused(keys: dict, server: SshServer) -> None:
    rsa_line = _public_line(paramiko.RSAKey.generate(2048))
    session = GuestSession(
        port=server.port, user="tester", key_path=keys["login_path"], known_host_key=rsa_line, connect_deadline_s=5
    )
    with pytest.raises(GuestError, match="host key mismatch"):
        session.connect()


def test_wrong_login_key_fails_auth_without_retrying(keys: dict, server: SshServer, tmp_path: Path) -> None:
    stranger = paramiko.RSAKey.generate(2048)
    stranger.write_private_key_file(str(tmp_path / "stranger"))
    session = GuestSession(
        port=server.port,
        user="tester",
        key_path=tmp_path / "stranger",
        known_host_key=_public_line(keys["host"]),
        connect_deadline_s=30,
    )
    started = time.monotonic()
    with pytest.raises(GuestError, match="authentication failed"):
        session.connect()
    assert time.monotonic() - started < 10


def test_missing_known_host_key_needs_explicit_policy(keys: dict, server: SshServer) -> None:
    with pytest.raises(GuestError, match="no known host key"):
        GuestSession(port=server.port, key_path=keys["login_path"], known_host_key=None)
    with GuestSession(
        port=server.port, user="tester", key_path=keys["login_path"], known_host_key=None, host_key_policy="accept-any"
    ) as guest:
        assert guest.run(["true"], timeout_s=10).ok


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_connect_retries_until_the_server_appears(keys: dict) -> None:
    port = _free_port()
    started_server: list[SshServer] = []
    timer = threading.Timer(2.0, lambda: started_server.append(SshServer(keys["host"], keys["login"], port=port)))
    timer.start()
    try:
        started = time.monotonic()
        with _session(keys, port, connect_deadline_s=30) as guest:
            waited_s = time.monotonic() - started
            assert guest.run(["echo", "up"], timeout_s=10).stdout == "up\n"
        assert waited_s >= 1.5
    finally:
        timer.join()
        for srv in started_server:
            srv.stop()


def test_connect_gives_up_at_the_deadline(keys: dict) -> None:
    port = _free_port()
    started = time.monotonic()
    with pytest.raises(GuestError, match=f"no SSH at tester@127.0.0.1:{port} after"):
        with _session(keys, port, connect_deadline_s=2):
            pass
    assert time.monotonic() - started < 10


def test_run_without_connect_raises(keys: dict) -> None:
    session = _session(keys, 1)
    with pytest.raises(GuestError, match="no open SSH session"):
        session.run(["true"], timeout_s=1)


def test_a_flood_of_output_is_capped_head_and_tail_kept(keys: dict, server: SshServer, monkeypatch) -> None:
    from orchestrator.guests import guest as guest_module

    monkeypatch.setattr(guest_module, "OUTPUT_CAP_BYTES", 1_000_000)
    with _session(keys, server.port) as guest:
        result = guest.run("printf START; head -c 3000000 /dev/zero | tr '\\0' x; printf END", timeout_s=30, check=True)
    assert result.stdout.startswith("START") and result.stdout.endswith("END")
    assert "bytes of output cut here" in result.stdout
    assert len(result.stdout) < 1_100_000
