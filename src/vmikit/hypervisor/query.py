"""Query family (0x04): what this hypervisor supports, so the guest can choose its path."""

from __future__ import annotations

from vmikit.hypervisor.context import CallContext, HypercallError
from vmikit.hypervisor.registry import FamilyHandlers

HANDLERS = FamilyHandlers("Query")

QUERY_SUPPORTED = 0x100


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
    if route is None:
        return (0,)
    return (QUERY_SUPPORTED | route.annotations_honoured,)
