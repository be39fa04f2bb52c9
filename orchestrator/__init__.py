"""ksm-lab: characterize Linux KSM on processes and libvirt/QEMU guests.

Data flows one way: plan -> provision -> workload -> collect -> store -> report.
"""

__version__ = "0.1.0"
