"""Shared fixtures. Tests that change the real KSM take `ksm_guard`: it snapshots every knob
and THP mode, and after the test asserts they are back (and forces them back if not, so a
failing test never leaves the host changed)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from orchestrator.host.probes import KSM_SYSFS
from tests.guest_sessions import have_mariadb
from tests.hoststate import force as _force
from tests.hoststate import snapshot

ROOT = Path("/")


@pytest.fixture
def ksm_guard():
    if not os.access(ROOT / KSM_SYSFS / "run", os.W_OK):
        pytest.skip("needs root and a writable /sys/kernel/mm/ksm")
    # Never change KSM under a running sweep (a `make demo` in another shell): its lock says so.
    from orchestrator.host.ksm import host_lock

    with host_lock():
        pass
    before = snapshot()
    yield before
    after = snapshot()
    if after != before:
        _force(before)
    assert after == before, f"KSM/THP knobs not restored: {set(before.items()) ^ set(after.items())}"


@pytest.fixture(autouse=True)
def _qemu_can_reach_tmp_path(request: pytest.FixtureRequest) -> None:
    """VM tests put overlays and saved states under tmp_path, which pytest makes 0700 (with its
    parents). QEMU runs as libvirt's unprivileged user and needs search permission on every
    folder above its disks, as on a real host's /var/lib/ksm-lab: give exactly that (x, not r)."""
    if request.node.get_closest_marker("vm") is None:
        return
    tmp = request.getfixturevalue("tmp_path")
    base = request.config._tmp_path_factory.getbasetemp()  # type: ignore[attr-defined]
    for folder in (tmp, *tmp.parents):
        if folder == base.parent.parent:  # /tmp (or what --basetemp names): the host's own
            break
        folder.chmod(folder.stat().st_mode | 0o011)


@pytest.fixture
def results_dir(tmp_path: Path) -> Path:
    path = tmp_path / "results"
    path.mkdir()
    return path


# A child that maps `mib` MiB of private anonymous memory, touches every page,
# optionally marks it MADV_MERGEABLE, says "ready" and waits for stdin to close.
HOLDER = """
import mmap, sys
size = int(sys.argv[1]) << 20
buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
if sys.argv[2] == "1":
    buf.madvise(mmap.MADV_MERGEABLE)
for off in range(0, size, 4096):
    buf[off:off + 8] = off.to_bytes(8, "little")  # unique pages: nothing for KSM to merge
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def holder():
    started = []

    def spawn(mib: int = 64, mergeable: bool = False) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(mib), "1" if mergeable else "0"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        started.append(proc)
        assert proc.stdout.readline().strip() == "ready"
        return proc

    yield spawn
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def mariadb_socket():
    """A throwaway mariadbd in a temp datadir, no networking; stopped by its PID afterwards."""
    reason = have_mariadb()
    if reason:
        pytest.skip(reason)
    tmp = Path(tempfile.mkdtemp(prefix="ksmlab-mariadb-"))
    socket = tmp / "sock"
    server = None
    try:
        subprocess.run(
            [
                "mariadb-install-db",
                f"--datadir={tmp / 'data'}",
                "--skip-test-db",
                "--user=root",
                "--auth-root-authentication-method=socket",
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        server = subprocess.Popen(
            [
                "mariadbd",
                f"--datadir={tmp / 'data'}",
                f"--socket={socket}",
                "--skip-networking",
                f"--pid-file={tmp / 'pid'}",
                "--user=root",
                f"--log-error={tmp / 'error.log'}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while not socket.exists():
            if server.poll() is not None or time.monotonic() > deadline:
                log = (tmp / "error.log").read_text() if (tmp / "error.log").exists() else ""
                pytest.fail(f"mariadbd did not start:\n{log[-2000:]}")
            time.sleep(0.2)
        yield str(socket)
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
