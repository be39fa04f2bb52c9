"""A small SSH server on 127.0.0.1 for testing guest.py against real SSH, not mocks.

Public-key auth for one key, exec requests run with `sh -c` in a subprocess. Stop it with
stop(), which also kills what it started.
"""

from __future__ import annotations

import socket
import subprocess
import threading

import paramiko


class _Server(paramiko.ServerInterface):
    def __init__(self, owner: SshServer) -> None:
        self.owner = owner

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        if key == self.owner.authorized_key:
            return paramiko.AUTH_SUCCESSFUL
        return paramiko.AUTH_FAILED

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind == "session":
            return paramiko.OPEN_SUCCEEDED
        return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        threading.Thread(target=self.owner._execute, args=(channel, command.decode()), daemon=True).start()
        return True


class SshServer:
    def __init__(self, host_key: paramiko.PKey, authorized_key: paramiko.PKey, port: int = 0) -> None:
        self.host_key = host_key
        self.authorized_key = authorized_key
        self.commands: list[str] = []
        self._processes: list[subprocess.Popen[bytes]] = []
        self._transports: list[paramiko.Transport] = []
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", port))
        self._sock.listen(8)
        self.port: int = self._sock.getsockname()[1]
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            transport = paramiko.Transport(conn)
            transport.add_server_key(self.host_key)
            self._transports.append(transport)
            try:
                transport.start_server(server=_Server(self))
            except (paramiko.SSHException, EOFError, OSError):
                transport.close()

    def _execute(self, channel: paramiko.Channel, command: str) -> None:
        self.commands.append(command)
        proc = subprocess.Popen(
            ["sh", "-c", command], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self._processes.append(proc)
        stdout, stderr = proc.communicate()
        try:
            channel.sendall(stdout)
            channel.sendall_stderr(stderr)
            # A signal death is reported as 128+N, as a shell would.
            channel.send_exit_status(proc.returncode if proc.returncode >= 0 else 128 - proc.returncode)
            channel.shutdown_write()
            channel.close()
        except (OSError, EOFError, paramiko.SSHException):
            pass  # the client gave up on this command (a timeout test)

    def stop(self) -> None:
        self._stopping.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        self._sock.close()
        for proc in self._processes:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for transport in self._transports:
            transport.close()
        self._thread.join(timeout=5)
