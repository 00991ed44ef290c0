"""The hypervisor side of VMI: dispatch by call ID, one module per family."""

from vmikit.hypervisor.context import CallContext, HypercallError
from vmikit.hypervisor.core import Hypervisor
from vmikit.hypervisor.experimental import ExperimentalCalls

__all__ = ["CallContext", "ExperimentalCalls", "HypercallError", "Hypervisor"]
