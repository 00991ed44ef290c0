"""EventChannel family (0x05, since VMI 1.2): per-guest FIFO ports of 64-bit events; since 1.4
also sources bound to ports, port masks and the upcall callback (hypervisor/events.py).

Routed only when the hypervisor's spec names the family (a 1.1 hypervisor has none), so
Query.HasFamily/QueryCall report it like any other family. The ports' state belongs to
one Hypervisor (``Hypervisor.state``), created on first use.
"""

from __future__ import annotations

from collections import deque

from vmikit.abi.model import U64_MASK, Spec
from vmikit.hypervisor.context import CallContext, HypercallError
from vmikit.hypervisor.events import Events
from vmikit.hypervisor.registry import FamilyHandlers

HANDLERS = FamilyHandlers("EventChannel")


class EventChannel:
    """The state of one guest's ports; every value the guest passes is checked.

    A port's queue exists only while it holds events, so memory follows the events held
    (at most EVTCHN_PORTS x EVTCHN_DEPTH, both bounded by the spec loader), never the port count.
    """

    def __init__(self, spec: Spec) -> None:
        self.ports = spec.constants["EVTCHN_PORTS"].value
        self.depth = spec.constants["EVTCHN_DEPTH"].value
        self.queues: dict[int, deque[int]] = {}  # port -> its events, only non-empty ports
        self.sent = 0

    def _check(self, port: int) -> None:
        if not 0 <= port < self.ports:
            raise HypercallError("INVALID_ARGUMENT")

    def send(self, port: int, value: int) -> tuple[int, ...]:
        self._check(port)
        queue = self.queues.get(port)
        if queue is None:
            queue = self.queues[port] = deque()
        if len(queue) >= self.depth:
            raise HypercallError("AGAIN")
        queue.append(value & U64_MASK)
        self.sent += 1
        return ()

    def poll(self, port: int) -> tuple[int, ...]:
        self._check(port)
        queue = self.queues.get(port)
        if not queue:
            raise HypercallError("AGAIN")
        value = queue.popleft()
        if not queue:
            del self.queues[port]
        return (value, len(queue))

    def pending(self, port: int) -> int:
        """Events port PORT holds (0 for an unused or out-of-range port)."""
        queue = self.queues.get(port)
        return len(queue) if queue else 0


def channel(ctx: CallContext) -> EventChannel:
    state = ctx.hypervisor.state
    if "EventChannel" not in state:
        state["EventChannel"] = EventChannel(ctx.spec)
    found = state["EventChannel"]
    assert isinstance(found, EventChannel)
    return found


@HANDLERS.call("Send")
def send(ctx: CallContext, port: int, value: int, _: int) -> tuple[int, ...]:
    result = channel(ctx).send(port, value)
    events = ctx.hypervisor.events
    if events is not None:
        events.send(port)  # a guest in upcall mode (1.4) also gets the port's bit
    return result


@HANDLERS.call("Poll")
def poll(ctx: CallContext, port: int, *_: int) -> tuple[int, ...]:
    return channel(ctx).poll(port)


def _events(ctx: CallContext) -> Events:
    found = ctx.hypervisor.events
    if found is None:
        raise HypercallError("NOT_SUPPORTED")
    return found


@HANDLERS.call("Bind")
def bind(ctx: CallContext, source: int, port: int, _: int) -> tuple[int, ...]:
    _events(ctx).bind(source, port)
    return ()


@HANDLERS.call("Mask")
def mask(ctx: CallContext, port: int, *_: int) -> tuple[int, ...]:
    _events(ctx).set_mask(port, True)
    return ()


@HANDLERS.call("Unmask")
def unmask(ctx: CallContext, port: int, *_: int) -> tuple[int, ...]:
    _events(ctx).set_mask(port, False)  # the hypercall's return delivers a pending bit
    return ()


@HANDLERS.call("SetCallback")
def set_callback(ctx: CallContext, entry: int, *_: int) -> tuple[int, ...]:
    _events(ctx).set_callback(entry)
    return ()
