"""EventChannel family (0x05, since VMI 1.2): per-guest FIFO ports of 64-bit events.

Routed only when the hypervisor's spec names the family (a 1.1 hypervisor has none), so
Query.HasFamily/QueryCall report it like any other family. The ports' state belongs to
one Hypervisor (``Hypervisor.state``), created on first use.
"""

from __future__ import annotations

from collections import deque

from vmikit.abi.model import U64_MASK, Spec
from vmikit.hypervisor.context import CallContext, HypercallError
from vmikit.hypervisor.registry import FamilyHandlers

HANDLERS = FamilyHandlers("EventChannel")


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

    def send(self, port: int, value: int) -> tuple[int, ...]:
        queue = self._queue(port)
        if len(queue) >= self.depth:
            raise HypercallError("AGAIN")
        queue.append(value & U64_MASK)
        self.sent += 1
        return ()

    def poll(self, port: int) -> tuple[int, ...]:
        queue = self._queue(port)
        if not queue:
            raise HypercallError("AGAIN")
        value = queue.popleft()
        return (value, len(queue))


def channel(ctx: CallContext) -> EventChannel:
    state = ctx.hypervisor.state
    if "EventChannel" not in state:
        state["EventChannel"] = EventChannel(ctx.spec)
    found = state["EventChannel"]
    assert isinstance(found, EventChannel)
    return found


@HANDLERS.call("Send")
def send(ctx: CallContext, port: int, value: int, _: int) -> tuple[int, ...]:
    return channel(ctx).send(port, value)


@HANDLERS.call("Poll")
def poll(ctx: CallContext, port: int, *_: int) -> tuple[int, ...]:
    return channel(ctx).poll(port)
