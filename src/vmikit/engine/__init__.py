"""One interface over execution engines. KVM is the first; nothing KVM-specific leaks above here."""

from vmikit.engine.base import (
    BootState, ControlState, DescriptorTable, Engine, Exit, ExitKind, Registers, Segment, StopRun, Vcpu,
    VcpuOps, Vm, WatchdogExpired,
)

__all__ = ["BootState", "ControlState", "DescriptorTable", "Segment", "Engine", "Exit", "ExitKind", "Registers", "StopRun", "Vcpu", "VcpuOps", "Vm", "WatchdogExpired", "open_engine"]


def open_engine(name: str = "kvm", device: str | None = None) -> Engine:
    """The engine by name; raises HostError when it cannot run here."""
    from vmikit.errors import UsageError

    if name == "kvm":
        from vmikit.engine.kvm import KvmEngine

        return KvmEngine(device) if device else KvmEngine()
    raise UsageError(f"unknown engine '{name}'", "use --engine kvm")
