"""collect: finished studies only, never half-copied in sight, host keys verified.

The unit tests use tests/fake_rsync.py (a local copy standing in for rsync over SSH); the last
test is the real thing, rsync over OpenSSH to an sshd on 127.0.0.1, marked vm (it starts a
daemon) and skipped when sshd, ssh-keygen or rsync is missing."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.analysis.across import history
from orchestrator.cli import main as cli
from orchestrator.store import catalog
from orchestrator.store.collect import SSH_BASE, parse_host
from orchestrator.errors import CollectError
from tests.nightly_studies import write_night

FAKE_RSYNC = f"{sys.executable} {Path(__file__).with_name('fake_rsync.py')}"
REMOTE_ROOT = "/var/lib/ksm-lab/results"


@pytest.fixture()
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Two hosts' results roots under tmp/hosts/<host>/var/lib/ksm-lab/results: lab1 with a
    finished and an unfinished night, lab2 with one finished night."""
    hosts = tmp_path / "hosts"
    root1 = hosts / "lab1" / REMOTE_ROOT.lstrip("/")
    root2 = hosts / "lab2" / REMOTE_ROOT.lstrip("/")
    studies = {
        "lab1-done": write_night(root1 / "nightly" / "20250101-010000", hostname="lab1", created_wall=1_735_700_000),
        "lab1-running": write_night(
            root1 / "nightly" / "20250102-010000", hostname="lab1", created_wall=1_735_790_000, missing=("p1000-r1",)
        ),
        "lab2-done": write_night(root2 / "nightly" / "20250101-010000", hostname="lab2", created_wall=1_735_700_000),
    }
    monkeypatch.setenv("FAKE_RSYNC_HOSTS", str(hosts))
    monkeypatch.setenv("FAKE_RSYNC_LOG", str(tmp_path / "rsync.log"))
    return {"into": tmp_path / "central", "log": tmp_path / "rsync.log", **studies}


def _calls(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _collect(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(["collect", *args, "--rsync", FAKE_RSYNC])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_collects_finished_studies_per_host_and_skips_unfinished(lab, capsys) -> None:
    code, out, _ = _collect(capsys, "lab1", "root@lab2", "--into", str(lab["into"]))
    assert code == 0
    got = {(e.host, e.state) for e in catalog.scan(lab["into"])}
    assert got == {("lab1", catalog.GOOD), ("lab2", catalog.GOOD)}
    landed = lab["into"] / "lab1" / "nightly" / "20250101-010000" / "nightly"
    assert (landed / "trials" / "p1000-r0" / "ksm.csv").exists() and (landed / "plan.toml").exists()
    assert "skipped nightly/20250102-010000/nightly (unfinished on the host)" in out
    index = history.build_index(lab["into"]).index
    assert set(index["host"]) == {"lab1", "lab2"}  # history can group by host


def test_ssh_verifies_host_keys_and_the_user_cannot_turn_that_off(lab, capsys) -> None:
    _collect(
        capsys, "lab1", "--into", str(lab["into"]), "--ssh-option=-oStrictHostKeyChecking=no", "--ssh-option=-p2222"
    )
    calls = _calls(lab["log"])
    assert len(calls) == 2  # metadata + one study: the checks below ran on every rsync
    for call in calls:
        ssh = call[call.index("-e") + 1].split()
        assert ssh[: len(SSH_BASE)] == list(SSH_BASE)  # ssh takes the first value of an option
        assert ssh[len(SSH_BASE) :] == ["-oStrictHostKeyChecking=no", "-p2222"]
        assert "-rt" in call and "-a" not in call  # no symlinks, owners or devices from the host


def test_a_second_collect_copies_nothing_new(lab, capsys) -> None:
    _collect(capsys, "lab1", "lab2", "--into", str(lab["into"]))
    first = len(_calls(lab["log"]))
    assert first == 4  # per host: metadata + one study
    code, out, _ = _collect(capsys, "lab1", "lab2", "--into", str(lab["into"]))
    assert code == 0 and "lab2: nothing new" in out
    assert len(_calls(lab["log"])) == first + 2  # metadata only


def test_a_half_copied_study_is_never_visible_and_is_finished_next_time(lab, capsys, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_RSYNC_FAIL_ON", "20250101-010000/nightly")
    code, _, err = _collect(capsys, "lab1", "--into", str(lab["into"]))
    assert code == 1 and "lab1: FAILED: rsync exited 23" in err
    assert catalog.scan(lab["into"]) == []
    assert not (lab["into"] / "lab1").exists()
    hidden = lab["into"] / ".collect" / "lab1" / "partial" / "nightly" / "20250101-010000" / "nightly"
    assert hidden.is_dir()  # kept for an incremental retry, out of discovery's sight
    monkeypatch.delenv("FAKE_RSYNC_FAIL_ON")
    code, out, _ = _collect(capsys, "lab1", "--into", str(lab["into"]))
    assert code == 0 and "collected" in out
    assert [e.state for e in catalog.scan(lab["into"])] == [catalog.GOOD]
    assert not hidden.exists()


def test_an_unreachable_host_fails_alone(lab, capsys) -> None:
    code, out, err = _collect(capsys, "nosuchhost", "lab2", "--into", str(lab["into"]))
    assert code == 1 and "nosuchhost: FAILED" in err and "Could not resolve" in err
    assert "lab2: collected" in out


def test_host_specs() -> None:
    assert parse_host("lab1") == parse_host("lab1:" + REMOTE_ROOT)
    spec = parse_host("ops@lab3:/srv/ksm/")
    assert (spec.label, spec.remote, spec.root) == ("lab3", "ops@lab3", "/srv/ksm")
    for bad in ("", "../x", "-oProxyCommand=x", "a b", "-oProxyCommand=x@lab1", "@lab1"):
        with pytest.raises(CollectError):
            parse_host(bad)


def test_bad_host_spec_is_a_clear_error(tmp_path: Path, capsys) -> None:
    code, _, err = _collect(capsys, "--into", str(tmp_path / "c"), "--", "-oProxyCommand=x@lab1")
    assert code == 2 and "expected [user@]host[:path]" in err
    assert not (tmp_path / "c").exists()  # refused before anything was made


# ----------------------------------------------------------------------------- real SSH


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def sshd(tmp_path: Path):
    """An OpenSSH sshd on 127.0.0.1 for this user's new key; yields (port, key, known_hosts)."""
    sshd_bin = shutil.which("sshd") or ("/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else None)
    if not (sshd_bin and shutil.which("ssh") and shutil.which("ssh-keygen") and shutil.which("rsync")):
        pytest.skip("needs OpenSSH (sshd, ssh, ssh-keygen) and rsync")
    if os.geteuid() != 0:
        pytest.skip("sshd needs root for its privilege separation here")
    os.makedirs("/run/sshd", exist_ok=True)  # privilege separation directory, normally made at boot
    d = tmp_path / "ssh"
    d.mkdir()
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    port = _free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\nAuthorizedKeysFile {d / 'authorized_keys'}\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nPermitRootLogin prohibit-password\n"
        f"StrictModes no\nPidFile {d / 'sshd.pid'}\n"
    )
    proc = subprocess.Popen([sshd_bin, "-D", "-e", "-f", str(d / "sshd_config")], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        else:
            pytest.skip("sshd did not start")
        host_pub = (d / "host_key.pub").read_text().split()
        (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
        yield port, d / "client_key", d / "known_hosts"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.vm
def test_collect_over_real_ssh_from_this_host(tmp_path: Path, sshd, capsys) -> None:
    port, key, known_hosts = sshd
    remote = tmp_path / "remote-results"
    done = write_night(remote / "nightly" / "20250101-010000", hostname="lab-local")
    write_night(remote / "nightly" / "20250102-010000", hostname="lab-local", missing=("p100-r0",))
    options = [f"--ssh-option=-p{port}", f"--ssh-option=-i{key}", "--ssh-option=-oIdentitiesOnly=yes"]
    into = tmp_path / "central"
    code = cli.main(
        [
            "collect",
            f"127.0.0.1:{remote}",
            "--into",
            str(into),
            f"--ssh-option=-oUserKnownHostsFile={known_hosts}",
            *options,
        ]
    )
    assert code == 0, capsys.readouterr()
    entries = catalog.scan(into)
    assert [(e.host, e.state) for e in entries] == [("lab-local", catalog.GOOD)]
    rel = done.relative_to(remote)
    assert (into / "127.0.0.1" / rel / "trials.csv").read_bytes() == (done / "trials.csv").read_bytes()

    # an unknown host key is refused, not added
    empty_known = tmp_path / "empty_known_hosts"
    empty_known.write_text("")
    code = cli.main(
        [
            "collect",
            f"127.0.0.1:{remote}",
            "--into",
            str(tmp_path / "other"),
            f"--ssh-option=-oUserKnownHostsFile={empty_known}",
            *options,
        ]
    )
    assert code == 1
    assert "Host key verification failed" in capsys.readouterr().err
    assert empty_known.read_text() == ""
