"""One exception tree for the whole tool.

OrchestratorError            anything the CLI reports as a clear one-line message (exit 2)
 ├─ PlanError                the plan file is wrong: names the key and the problem
 ├─ HostError                the host cannot run this: missing file, knob, daemon, memory
 │   └─ LockError            another sweep holds the per-host lock
 ├─ KsmError                 a KSM/THP sysfs write was refused or did not take effect
 ├─ ProvisionError           image, overlay, libvirt define/start/teardown failed
 │   └─ GuestBootError       a guest did not become reachable (carries the console tail)
 ├─ GuestError               SSH to a guest failed (connect, auth, host key, timeout)
 ├─ WorkloadError            a workload failed to start, run or parse
 ├─ StoreError               the results folder is unusable (exists, wrong schema, ...)
 ├─ CompareError             two studies cannot be compared (other plans, nothing in common)
 ├─ DesignError              a pilot study cannot size a design (one block, no KSM-off trials, bad target)
 ├─ CollectError             rsync/SSH from a lab host failed, or a host name is malformed
 └─ FleetError               no fleet to summarise: no studies, an unknown plan, a single host

libvirt.libvirtError and paramiko.SSHException are translated into this tree at the boundary
(libvirtconn.py, provision.py, cleanup.py, guest.py), so nothing above those modules imports
libvirt or paramiko errors.
"""


class OrchestratorError(Exception):
    """Base of every error the tool reports without a traceback."""


class PlanError(OrchestratorError):
    pass


class HostError(OrchestratorError):
    pass


class LockError(HostError):
    pass


class HostUnresponsive(HostError):
    """A host service the study needs (libvirtd) stopped answering. No later trial could run,
    so the sweep fails the trial it happened in and ends the study there; ``advice`` says what
    to do once the service answers again."""

    def __init__(self, message: str, advice: str = "") -> None:
        super().__init__(message)
        self.advice = advice


class KsmError(OrchestratorError):
    pass


class ProvisionError(OrchestratorError):
    pass


class GuestBootError(ProvisionError):
    def __init__(self, message: str, console_tail: str = "") -> None:
        if console_tail:
            message = f"{message}\n--- console tail ---\n{console_tail}"
        super().__init__(message)
        self.console_tail = console_tail


class GuestLostError(GuestBootError):
    """A guest stopped, crashed or was paused mid-trial; carries the console tails."""


class GuestError(OrchestratorError):
    pass


class WorkloadError(OrchestratorError):
    pass


class StoreError(OrchestratorError):
    pass


class CompareError(OrchestratorError):
    pass


class DesignError(OrchestratorError):
    pass


class CollectError(OrchestratorError):
    pass


class FleetError(OrchestratorError):
    pass
