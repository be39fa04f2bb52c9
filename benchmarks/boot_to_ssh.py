"""Print boot-to-SSH seconds for N TCG guests, started all at once or one after another.

usage: python boot_to_ssh.py MANIFEST --guests 3 --mode parallel|sequential [--memory-mib 1024]
"""

import argparse
import contextlib
import time
from pathlib import Path

from orchestrator.guests import images
from orchestrator.guests.guest import GuestSession
from orchestrator.guests.hostmemory import check_memory_fits
from orchestrator.guests.provision import GuestRequest, GuestSet, GuestSetOptions

parser = argparse.ArgumentParser()
parser.add_argument("manifest", type=Path)
parser.add_argument("--guests", type=int, default=1)
parser.add_argument("--mode", choices=("parallel", "sequential"), default="parallel")
parser.add_argument("--memory-mib", type=int, default=1024)
args = parser.parse_args()
image = images.load_manifest(args.manifest)
check_memory_fits(args.guests, args.memory_mib)
options = GuestSetOptions(domain_type="qemu")


def connect(guest):
    with GuestSession.for_image(image, guest.ssh_port, connect_deadline_s=1, connect_timeout_s=10) as s:
        s.run(["true"], timeout_s=30, check=True)


started = time.monotonic()
with contextlib.ExitStack() as stack:
    if args.mode == "parallel":
        sets = [
            stack.enter_context(
                GuestSet("qemu:///system", "bench", [GuestRequest(args.memory_mib)] * args.guests, image, options)
            )
        ]
        per_guest = sets[0].wait_ready(connect, timeout_s=900)
    else:
        per_guest = {}
        for i in range(args.guests):
            guest_set = stack.enter_context(
                GuestSet("qemu:///system", f"bench{i}", [GuestRequest(args.memory_mib)], image, options)
            )
            per_guest.update(guest_set.wait_ready(connect, timeout_s=900))
    total_s = time.monotonic() - started
    print(f"mode={args.mode} guests={args.guests} memory_mib={args.memory_mib}")
    for name, seconds in per_guest.items():
        print(f"  {name}: start->SSH {seconds:.1f} s")
    print(f"  all guests answering SSH after {total_s:.1f} s (from before the first define)")
teardown_s = time.monotonic() - started - total_s
print(f"  teardown {teardown_s:.1f} s")
