"""Boot an image with plain qemu-system-x86_64 (no libvirt) for image and guest tests.

TCG always (a nested /dev/kvm without vmx/svm cannot run a stock guest kernel), user
networking with restrict=on so the guest reaches nothing, SSH forwarded to 127.0.0.1 only.
The guest writes to a qcow2 overlay over the base image; stop() kills QEMU by its PID and
deletes the overlay and console log.
"""

from __future__ import annotations

import socket
import subprocess
import tempfile
from pathlib import Path

from orchestrator.guests.images import ImageRef


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class QemuGuest:
    def __init__(self, image: ImageRef, memory_mib: int = 1024, work_dir: Path | None = None) -> None:
        if image.kernel_path is None or image.initrd_path is None:
            raise ValueError("QemuGuest boots images with a kernel and initrd only")
        self.image = image
        self.work_dir = Path(tempfile.mkdtemp(prefix="ksm-lab-qemu-", dir=work_dir))
        self.overlay = self.work_dir / "overlay.qcow2"
        self.console_log = self.work_dir / "console.log"
        self.ssh_port = free_port()
        # The backing path must be absolute: a relative one resolves against the overlay's folder.
        subprocess.run(
            [
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                image.disk_format,
                "-b",
                str(image.disk_path.resolve()),
                str(self.overlay),
            ],
            check=True,
        )
        self.process = subprocess.Popen(
            [
                "qemu-system-x86_64",
                "-accel",
                "tcg",
                "-m",
                str(memory_mib),
                "-smp",
                "1",
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-serial",
                f"file:{self.console_log}",
                "-kernel",
                str(image.kernel_path),
                "-initrd",
                str(image.initrd_path),
                "-append",
                image.cmdline or "",
                "-drive",
                f"file={self.overlay},if=virtio,format=qcow2",
                "-netdev",
                f"user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22",
                "-device",
                "virtio-net-pci,netdev=n0",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def console_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.console_log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)
        if self.process.stderr is not None:
            self.process.stderr.close()
        for path in (self.overlay, self.console_log):
            path.unlink(missing_ok=True)
        self.work_dir.rmdir()

    def __enter__(self) -> QemuGuest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
