"""The EventChannel family (0x05, since VMI 1.2): per-guest FIFO ports of 64-bit events.

Lives here rather than in vmikit.hypervisor because only the 1.2 spec has it; `install`
adds its routes to a Hypervisor whose spec names the family (and does nothing otherwise),
so Query.HasFamily/QueryCall report it like any built-in family.
"""

from __future__ import annotations

from collections import deque

from vmikit.abi.model import U64_MASK, Spec
from vmikit.hypervisor import Hypervisor
from vmikit.hypervisor.context import CallContext, HypercallError
from vmikit.hypervisor.core import Route
from vmikit.hypervisor.registry import Handler

FAMILY = "EventChannel"


class EventChannel:
    """The state of one guest's ports; every value the guest passes is checked."""

    def __init__(self, spec: Spec) -> None:
        self.ports = spec.constants["EVTCHN_PORTS"].value
        self.depth = spec.constants["EVTCHN_DEPTH"].value
        self.queues: list[deque[int]] = [deque() for _ in range(self.ports)]
        self.sent = 0

    def _queue(self, port: int) -> deque[int]:
        if not 0 <= port < self.ports:
            raise HypercallError("INVALID_ARGUMENT")
        return self.queues[port]

    def send(self, ctx: CallContext, port: int, value: int, _a2: int) -> tuple[int, ...]:
        queue = self._queue(port)
        if len(queue) >= self.depth:
            raise HypercallError("AGAIN")
        queue.append(value & U64_MASK)
        self.sent += 1
        return ()

    def poll(self, ctx: CallContext, port: int, _a1: int, _a2: int) -> tuple[int, ...]:
        queue = self._queue(port)
        if not queue:
            raise HypercallError("AGAIN")
        value = queue.popleft()
        return (value, len(queue))

    def handlers(self) -> dict[str, Handler]:
        return {"Send": self.send, "Poll": self.poll}


def install(hypervisor: Hypervisor) -> EventChannel | None:
    """Route the family's calls on this hypervisor if its spec has the family."""
    spec = hypervisor.spec
    if not any(f.name == FAMILY for f in spec.families.values()):
        return None
    channel = EventChannel(spec)
    for name, handler in channel.handlers().items():
        call = spec.by_name(f"{FAMILY}.{name}")
        honoured = spec.annotation_mask(call) if hypervisor.honour_annotations else 0
        hypervisor.routes[call.call_id()] = Route(call.qualified_name, handler, honoured)
    return channel
