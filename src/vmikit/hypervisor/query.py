"""Query family (0x04): what this hypervisor supports, so the guest can choose its path."""

from __future__ import annotations

from vmikit.hypervisor.context import CallContext, HypercallError
from vmikit.hypervisor.registry import FamilyHandlers

HANDLERS = FamilyHandlers("Query")

QUERY_SUPPORTED = 0x100
QUERY_NOT_NATIVE = 0x200
# Optional calls whose native fallback is a privileged instruction (ring 0 only).
PRIVILEGED_NATIVE = frozenset({"CPU.RDPMC", "CPU.EnableInterrupts", "CPU.DisableInterrupts",
                               "CPU.GetInterruptMask", "CPU.SetInterruptMask"})


@HANDLERS.call("GetVersion")
def get_version(ctx: CallContext, *_: int) -> tuple[int, ...]:
    return (ctx.spec.version.packed,)


@HANDLERS.call("HasFamily")
def has_family(ctx: CallContext, family: int, *_: int) -> tuple[int, ...]:
    if family > 0xFF:
        raise HypercallError("INVALID_ARGUMENT")
    return (int(ctx.hypervisor.has_family(family)),)


@HANDLERS.call("QueryCall")
def query_call(ctx: CallContext, call_id: int, *_: int) -> tuple[int, ...]:
    if call_id > 0xFFFFFFFF or call_id & 0xFF00:
        raise HypercallError("RESERVED_BITS")
    route = ctx.hypervisor.route_for(call_id)
    info = QUERY_SUPPORTED | route.annotations_honoured if route is not None else 0
    if ctx.hypervisor.deprivileged is not None:
        # Implemented or not (RDPMC), a deprivileged kernel must not fall back to the instruction.
        call = ctx.spec.lookup(call_id & 0xFFFF0000)
        if call is not None and call.qualified_name in PRIVILEGED_NATIVE:
            info |= QUERY_NOT_NATIVE
    return (info,)
