"""The SSH session to one guest: connect while it boots, run commands, move small files.

    with GuestSession(port=2222, user="root", key_path=image.ssh_key_path,
                      known_host_key=image.known_host_key) as guest:
        result = guest.run(["sysbench", "--version"], timeout_s=30, check=True)

The guest's host key is always checked against the one recorded when the image was built:
the port forward on 127.0.0.1 answers for whatever QEMU is behind it, so a session must not
trust the first key it sees. Only an explicit host_key_policy="accept-any" (for images a user
brought without a known key) skips the check.

Every command has a deadline, enforced twice: the guest runs it under coreutils' `timeout`
(so it is stopped there too, not left loading the guest), and a host-side watchdog closes the
channel if the guest stays silent past the deadline plus a grace; a timed-out run raises
CommandTimeout, naming the command and carrying its output so far.

Every paramiko and socket error is translated to GuestError here.
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
import re
import select
import shlex
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Literal

import paramiko
import tenacity

from orchestrator.errors import GuestError
from orchestrator.units import MIB

if TYPE_CHECKING:
    from orchestrator.guests.images import ImageRef

log = logging.getLogger(__name__)

_READ_CHUNK_BYTES = 65536
# A command's output kept per stream: its first and last half of this (a long sysbench run prints
# ~150 bytes a second, 0.5 MiB an hour). A guest that floods its output cannot exhaust the
# sweep's memory; what was cut is marked in the text.
OUTPUT_CAP_BYTES = 16 * MIB


class CappedOutput:
    """A stream's bytes, keeping the head and the tail once more than `cap` arrived."""

    def __init__(self, cap: int | None = None) -> None:
        self.cap = OUTPUT_CAP_BYTES if cap is None else cap
        self.head = bytearray()
        self.tail = bytearray()
        self.cut = 0  # bytes dropped between head and tail

    def __iadd__(self, data: bytes) -> "CappedOutput":
        half = self.cap // 2
        room = half - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail += data
            if len(self.tail) > half:
                drop = len(self.tail) - half
                self.cut += drop
                del self.tail[:drop]
        return self

    def __len__(self) -> int:
        return len(self.head) + len(self.tail)

    def text(self) -> str:
        if not self.cut:
            return (bytes(self.head) + bytes(self.tail)).decode(errors="replace")
        marker = f"\n[ksm-lab: {self.cut} bytes of output cut here (kept the first and last {self.cap // 2} bytes)]\n"
        return self.head.decode(errors="replace") + marker + self.tail.decode(errors="replace")


# Longest pause between two looks at a running command's channel; the channel's own fd wakes
# us sooner when output arrives.
_POLL_S = 0.5
# Every command runs under the guest's coreutils `timeout`: TERM at its deadline, KILL this
# much later if TERM did not end it. Closing the SSH channel alone would leave the command
# running in the guest (sshd sends no signal without a pty), still loading the guest.
KILL_AFTER_S = 5.0
# The host's own watchdog closes the channel this long after the guest's KILL should have
# landed: the guest is hung or unreachable, and nothing will arrive any more.
WATCHDOG_GRACE_S = 5.0
# GNU timeout's exit status when it stopped the command (TERM) or had to KILL it (128 + 9).
_TIMEOUT_STATUSES = (124, 137)
_NO_TIMEOUT_COMMAND = re.compile(r"(^|: )timeout: (command )?not found", re.MULTILINE)


@dataclass(frozen=True)
class CommandResult:
    command: str
    exit_status: int  # -1 when the guest closed the channel without sending one
    stdout: str
    stderr: str
    duration_s: float

    @property
    def ok(self) -> bool:
        return self.exit_status == 0


class CommandTimeout(GuestError):
    """A command passed its deadline. `partial` holds what it printed until it was stopped."""

    def __init__(self, message: str, partial: CommandResult) -> None:
        super().__init__(message)
        self.partial = partial


class _Watchdog:
    """Closes a channel when its deadline passes, from a timer thread.

    Whatever the caller is blocked in then (exec_command's wait, a select, a stalled
    transport) wakes up: paramiko's close sets every event a reader can wait on.
    """

    def __init__(self, channel: paramiko.Channel, after_s: float) -> None:
        self.fired = threading.Event()
        self._timer = threading.Timer(after_s, self._fire, args=(channel,))
        self._timer.daemon = True

    def __enter__(self) -> _Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._timer.cancel()

    def _fire(self, channel: paramiko.Channel) -> None:
        self.fired.set()
        channel.close()


def deadline_wrapped(command: str, timeout_s: float) -> str:
    """`command` as the guest runs it: under coreutils' timeout, so the guest stops it too.

    The deadline is rounded up to the millisecond (never 0, which means "no limit" to timeout);
    the command goes to `sh -c` as one quoted word, so a string keeps its shell meaning.
    """
    deadline_s = max(math.ceil(timeout_s * 1000) / 1000, 0.001)
    return f"timeout --kill-after={KILL_AFTER_S:g} {deadline_s:.3f} sh -c {shlex.quote(command)}"


class _HostKeyRejected(paramiko.SSHException):
    """The guest offered a host key type we have no recorded key for."""


class _RejectUnknownHostKey(paramiko.MissingHostKeyPolicy):
    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        raise _HostKeyRejected(
            f"{hostname} offered a {key.get_name()} host key "
            f"(SHA256:{_fingerprint(key)}) that does not match the recorded one"
        )


class _AcceptAnyHostKey(paramiko.MissingHostKeyPolicy):
    """Used only when a plan says host_key_policy = "accept-any"; remembers nothing."""

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        log.warning(
            "accepting unverified host key SHA256:%s from %s (host_key_policy accept-any)", _fingerprint(key), hostname
        )


class _Transient(Exception):
    """A connect attempt failed in a way that goes away once the guest has booted."""


class GuestSession:
    """One SSH connection to a guest, opened on enter and closed on exit."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 22,
        user: str = "root",
        key_path: Path | str = "",
        known_host_key: str | None = None,
        *,
        host_key_policy: Literal["verify", "accept-any"] = "verify",
        connect_timeout_s: float = 10.0,
        connect_deadline_s: float = 240.0,
        keepalive_s: int = 30,
        retry_min_s: float = 0.5,
    ) -> None:
        if host_key_policy == "verify" and not known_host_key:
            raise GuestError(f"{host}:{port}: no known host key to verify the guest against")
        self.host = host
        self.port = port
        self.user = user
        self.key_path = Path(key_path)
        self.known_host_key = known_host_key
        self.host_key_policy = host_key_policy
        self.connect_timeout_s = connect_timeout_s
        self.connect_deadline_s = connect_deadline_s
        self.keepalive_s = keepalive_s
        # First wait between attempts; a restored guest answers within a second, a booting one
        # takes a minute, so callers that restore ask for short waits.
        self.retry_min_s = retry_min_s
        self._client: paramiko.SSHClient | None = None
        self._ssh_logger = logging.getLogger(f"{__name__}.ssh.{host}:{port}")

    @classmethod
    def for_image(cls, image: ImageRef, port: int, **kwargs: object) -> GuestSession:
        """A session to a guest booted from `image` whose port 22 is forwarded to `port`."""
        return cls(
            port=port,
            user=image.ssh_user,
            key_path=image.ssh_key_path,
            known_host_key=image.known_host_key,
            host_key_policy=image.host_key_policy,
            **kwargs,
        )  # type: ignore[arg-type]

    @property
    def where(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    # --- connection ------------------------------------------------------------------------

    def __enter__(self) -> GuestSession:
        self.connect()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def connect(self) -> None:
        """Connect, retrying with backoff until connect_deadline_s while the guest boots."""
        pkey = self._load_login_key()
        started = time.monotonic()
        # paramiko logs a traceback for every refused banner while the guest boots, from its
        # transport thread, possibly after connect() returned; those attempts are expected, so
        # this session's transport logger stays quiet. Real failures surface as GuestError.
        self._ssh_logger.setLevel(logging.CRITICAL)
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(_Transient),
            wait=tenacity.wait_exponential(multiplier=self.retry_min_s, min=self.retry_min_s, max=5),
            stop=tenacity.stop_after_delay(self.connect_deadline_s),
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    self._client = self._connect_once(pkey)
        except _Transient as exc:
            raise GuestError(
                f"no SSH at {self.where} after {time.monotonic() - started:.0f} s "
                f"({retrying.statistics.get('attempt_number', 0)} attempts): "
                f"{exc}"
            ) from None
        log.debug("connected to %s after %.1f s", self.where, time.monotonic() - started)

    def _connect_once(self, pkey: paramiko.PKey) -> paramiko.SSHClient:
        client = paramiko.SSHClient()
        client.set_log_channel(self._ssh_logger.name)
        if self.host_key_policy == "verify":
            key_type, key = _parse_public_key(self.known_host_key or "")
            # paramiko looks non-22 ports up as "[host]:port", like OpenSSH's known_hosts.
            entry = self.host if self.port == 22 else f"[{self.host}]:{self.port}"
            client.get_host_keys().add(entry, key_type, key)
            client.set_missing_host_key_policy(_RejectUnknownHostKey())
        else:
            client.set_missing_host_key_policy(_AcceptAnyHostKey())
        try:
            client.connect(
                self.host,
                port=self.port,
                username=self.user,
                pkey=pkey,
                timeout=self.connect_timeout_s,
                banner_timeout=self.connect_timeout_s,
                auth_timeout=self.connect_timeout_s,
                look_for_keys=False,
                allow_agent=False,
            )
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise GuestError(
                f"host key mismatch at {self.where}: expected SHA256:{_fingerprint(exc.expected_key)}"
                f", got {exc.key.get_name()} SHA256:{_fingerprint(exc.key)}; refusing to connect"
            ) from None
        except _HostKeyRejected as exc:
            client.close()
            raise GuestError(f"host key mismatch at {self.where}: {exc}; refusing to connect") from None
        except paramiko.AuthenticationException as exc:
            client.close()
            raise GuestError(f"authentication failed for {self.where} with key {self.key_path}: {exc}") from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            # Refused, reset, or no banner yet: QEMU's port forward accepts TCP before the
            # guest's sshd runs, so these all mean "not booted yet".
            client.close()
            log.debug("%s not up yet: %s: %s", self.where, type(exc).__name__, exc)
            raise _Transient(f"{type(exc).__name__}: {exc}") from None
        transport = client.get_transport()
        if transport is not None and self.keepalive_s:
            transport.set_keepalive(self.keepalive_s)
        return client

    def _load_login_key(self) -> paramiko.PKey:
        try:
            return paramiko.PKey.from_path(self.key_path)
        except (OSError, paramiko.SSHException, ValueError) as exc:
            raise GuestError(f"cannot load SSH key {self.key_path}: {exc}") from None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _transport(self) -> paramiko.Transport:
        transport = self._client.get_transport() if self._client else None
        if transport is None or not transport.is_active():
            raise GuestError(f"no open SSH session to {self.where}")
        return transport

    # --- commands --------------------------------------------------------------------------

    def run(self, cmd: Sequence[str] | str, timeout_s: float, check: bool = False) -> CommandResult:
        """Run a command in the guest and wait for it, at most timeout_s.

        A list is quoted word by word (so no plan value reaches the guest's shell unquoted);
        a string is run by the guest's `sh -c` as is. The guest's `timeout` stops the command
        at timeout_s, and a host-side watchdog closes the channel if the guest has not answered
        KILL_AFTER_S + WATCHDOG_GRACE_S later; either way CommandTimeout names the command and
        carries the output so far. With check=True a non-zero exit raises GuestError too.
        """
        command = cmd if isinstance(cmd, str) else " ".join(shlex.quote(str(a)) for a in cmd)
        if not timeout_s > 0:
            raise GuestError(f"{self.where}: `{command}` needs a timeout > 0 s, got {timeout_s}")
        started = time.monotonic()
        try:
            channel = self._transport().open_session(timeout=min(timeout_s, self.connect_timeout_s))
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise GuestError(f"{self.where}: cannot open a channel for `{command}`: {exc}") from None
        stdout, stderr = CappedOutput(), CappedOutput()
        exit_status = -1
        watchdog = _Watchdog(channel, timeout_s + KILL_AFTER_S + WATCHDOG_GRACE_S)
        try:
            with watchdog:
                channel.exec_command(deadline_wrapped(command, timeout_s))
                self._collect(channel, stdout, stderr)
                # recv_exit_status() would block; _collect ends only once the status is in.
                exit_status = channel.recv_exit_status()
        except (paramiko.SSHException, OSError, EOFError) as exc:
            if not watchdog.fired.is_set():
                raise GuestError(f"{self.where}: `{command}` failed in transit: {exc}") from None
        finally:
            channel.close()
        result = CommandResult(command, exit_status, stdout.text(), stderr.text(), time.monotonic() - started)
        self._raise_if_timed_out(result, timeout_s, watchdog.fired.is_set())
        if exit_status == 127 and _NO_TIMEOUT_COMMAND.search(result.stderr):
            raise GuestError(
                f"{self.where}: the guest has no `timeout` command (coreutils), "
                f"which every command runs under; cannot run `{command}`"
            )
        if check and not result.ok:
            tail = "\n".join(result.stderr.strip().splitlines()[-10:])
            raise GuestError(f"{self.where}: `{command}` exited {exit_status}:\n{tail}")
        return result

    def _raise_if_timed_out(self, result: CommandResult, timeout_s: float, watchdog_fired: bool) -> None:
        what = f"{self.where}: `{result.command}` timed out after {timeout_s:g} s"
        if watchdog_fired:
            raise CommandTimeout(
                f"{what}; the guest did not answer {KILL_AFTER_S + WATCHDOG_GRACE_S:g} s later "
                "either, so the channel was closed",
                result,
            )
        # The guest's timer starts after the host's, so a real timeout is never early here;
        # a command that exits 124 on its own before its deadline is not taken for one.
        if result.exit_status in _TIMEOUT_STATUSES and result.duration_s >= timeout_s:
            raise CommandTimeout(f"{what} (stopped in the guest)", result)

    def _collect(self, channel: paramiko.Channel, stdout: CappedOutput, stderr: CappedOutput) -> None:
        """Read both streams into the buffers until the command's status and EOF are in.

        The buffers are the caller's so a command cut off by the watchdog keeps its output.
        """
        while True:
            drained = False
            while channel.recv_ready():
                stdout += channel.recv(_READ_CHUNK_BYTES)
                drained = True
            while channel.recv_stderr_ready():
                stderr += channel.recv_stderr(_READ_CHUNK_BYTES)
                drained = True
            if (
                channel.exit_status_ready()
                and not drained
                and not channel.recv_ready()
                and not channel.recv_stderr_ready()
            ):
                # The status can arrive before the last output; read until EOF on stdout.
                # A channel the watchdog closed counts as ended too.
                if channel.eof_received or channel.closed:
                    return
            # The channel's fd is readable when stdout or stderr has data or the channel ends.
            select.select([channel], [], [], _POLL_S)


def _parse_public_key(line: str) -> tuple[str, paramiko.PKey]:
    """ "ssh-ed25519 AAAA... [comment]" -> (type, key)."""
    fields = line.split()
    if len(fields) < 2:
        raise GuestError(f"known host key {line!r} is not '<type> <base64>'")
    try:
        return fields[0], paramiko.PKey.from_type_string(fields[0], base64.b64decode(fields[1]))
    except (binascii.Error, paramiko.SSHException, ValueError) as exc:
        raise GuestError(f"known host key {line[:40]!r}...: {exc}") from None


def _fingerprint(key: paramiko.PKey) -> str:
    return key.fingerprint.removeprefix("SHA256:")
