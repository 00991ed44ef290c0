"""What a hypercall handler sees: the guest's memory and vCPU, and how it reports an error."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from vmikit.abi.model import Spec
from vmikit.engine import Vcpu
from vmikit.memory import GuestMemory

if TYPE_CHECKING:
    from vmikit.hypervisor.core import Hypervisor


class HypercallError(Exception):
    """Raised by a handler: the guest gets the named spec error in RAX (and optional results)."""

    def __init__(self, error: str, *results: int) -> None:
        super().__init__(error)
        self.error = error
        self.results = results


@dataclass
class CallContext:
    spec: Spec
    memory: GuestMemory
    vcpu: Vcpu
    hypervisor: Hypervisor
    call_id: int = 0  # the full ID of the call being handled, annotation included

    @property
    def annotation(self) -> int:
        return self.call_id & 0xFF

