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
    execution = ctx.hypervisor.execution
    not_native = QUERY_NOT_NATIVE if execution is not None and execution.deprivileged and route is not None \
        and route.name in PRIVILEGED_NATIVE else 0
    if route is None:
        # Not implemented (RDPMC): a deprivileged kernel still must not fall back to the instruction.
        call = ctx.spec.lookup(call_id & 0xFFFF0000)
        name = call.qualified_name if call is not None else ""
        deprivileged = execution is not None and execution.deprivileged
        return (QUERY_NOT_NATIVE if deprivileged and name in PRIVILEGED_NATIVE else 0,)
    return (QUERY_SUPPORTED | route.annotations_honoured | not_native,)
