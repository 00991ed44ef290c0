"""vmikit: a paravirtualizing hypervisor in Python on Linux KVM implementing VMI."""

__version__ = "0.1.0"
