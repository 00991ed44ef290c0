"""Time family (0x06, since VMI 1.4): the cycle counter, its frequency, the wallclock and alarms.

Alarms raise events (hypervisor/events.py): bind EVTCHN_SOURCE_ALARM + n to a port.
"""

from __future__ import annotations

import time

from vmikit.hypervisor.context import CallContext, HypercallError
from vmikit.hypervisor.events import Events
from vmikit.hypervisor.registry import FamilyHandlers

HANDLERS = FamilyHandlers("Time")


def events(ctx: CallContext) -> Events:
    found = ctx.hypervisor.events
    if found is None:
        raise HypercallError("NOT_SUPPORTED")  # attach() not called with a 1.4 spec
    return found


@HANDLERS.call("GetCycleFrequency")
def get_cycle_frequency(ctx: CallContext, *_: int) -> tuple[int, ...]:
    return (events(ctx).tsc_hz,)


@HANDLERS.call("GetCycleCounter")
def get_cycle_counter(ctx: CallContext, *_: int) -> tuple[int, ...]:
    return (events(ctx).guest_tsc(),)


@HANDLERS.call("GetWallclockTime")
def get_wallclock_time(ctx: CallContext, *_: int) -> tuple[int, ...]:
    return (time.time_ns(),)


@HANDLERS.call("SetAlarm")
def set_alarm(ctx: CallContext, alarm: int, expiry: int, period: int) -> tuple[int, ...]:
    events(ctx).set_alarm(alarm, expiry, period)
    return ()


@HANDLERS.call("CancelAlarm")
def cancel_alarm(ctx: CallContext, alarm: int, *_: int) -> tuple[int, ...]:
    return (events(ctx).cancel_alarm(alarm),)
