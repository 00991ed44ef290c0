"""MMU family (0x03): page-table updates, TLB flushes, table registration, batches.

``Mmu`` holds the hypervisor's view of the guest's page tables (which pages are
registered as tables, at which level). The handlers validate every guest value
before changing anything; a batch is validated whole before any entry is applied.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from vmikit.hypervisor.context import CallContext, HypercallError, check_range
from vmikit.hypervisor.registry import FamilyHandlers

HANDLERS = FamilyHandlers("MMU")

PAGE = 0x1000
FLUSH_FLAGS = 0x3  # FLUSH_TLB | FLUSH_GLOBAL
LEVELS = (1, 2, 3, 4)
BATCH_ENTRY = struct.Struct("<IIQQQ")  # call_id, reserved, a0, a1, a2 (the spec's vmi_batch_entry)


@dataclass
class Mmu:
    tables: dict[int, int] = field(default_factory=dict)  # gpa -> level
    cr3: int | None = None

    def check_cr3(self, ctx: CallContext, root: int) -> None:
        check_range(ctx, root & ~0xFFF, PAGE, align=PAGE)
        if self.tables.get(root & ~0xFFF, 4) != 4:
            raise HypercallError("WRONG_LEVEL")

    def cr3_loaded(self, ctx: CallContext, root: int) -> None:
        self.cr3 = root & ~0xFFF


def _mmu(ctx: CallContext) -> Mmu:
    return ctx.hypervisor.mmu


def set_pte(ctx: CallContext, ptep: int, pte: int, _: int = 0) -> tuple[int, ...]:
    check_range(ctx, ptep, 8, align=8)
    if pte >> 64:
        raise HypercallError("INVALID_ARGUMENT")
    ctx.memory.write_u64(ptep, pte)
    return ()


HANDLERS.call("SetPTE")(set_pte)
HANDLERS.call("SetLongPTE")(set_pte)


@HANDLERS.call("FlushTLB")
def flush_tlb(ctx: CallContext, flags: int, *_: int) -> tuple[int, ...]:
    if flags & ~FLUSH_FLAGS:
        raise HypercallError("INVALID_ARGUMENT")
    return ()  # the ROM completes the flush in the guest after this exit (docs/rom-abi.md)


@HANDLERS.call("InvalPage")
def inval_page(ctx: CallContext, va: int, *_: int) -> tuple[int, ...]:
    return ()  # as FlushTLB: the ROM executes invlpg after the exit


@HANDLERS.call("AllocatePage")
def allocate_page(ctx: CallContext, table: int, level: int, _: int) -> tuple[int, ...]:
    if level not in LEVELS:
        raise HypercallError("INVALID_ARGUMENT")
    check_range(ctx, table, PAGE, align=PAGE)
    mmu = _mmu(ctx)
    if mmu.tables.get(table, level) != level:
        raise HypercallError("WRONG_LEVEL")
    mmu.tables[table] = level
    return ()


@HANDLERS.call("ReleasePage")
def release_page(ctx: CallContext, table: int, *_: int) -> tuple[int, ...]:
    mmu = _mmu(ctx)
    if table not in mmu.tables:
        raise HypercallError("NOT_PAGE_TABLE")
    if mmu.cr3 == table:
        raise HypercallError("IN_USE")
    del mmu.tables[table]
    return ()


@HANDLERS.call("FlushQueue")
def flush_queue(ctx: CallContext, batch: int, count: int, _: int) -> tuple[int, ...]:
    hv = ctx.hypervisor
    limit = ctx.spec.batch.max_entries
    if count > limit:
        raise HypercallError("INVALID_ARGUMENT")
    if count == 0:
        return (0,)
    check_range(ctx, batch, count * BATCH_ENTRY.size, align=8)
    raw = ctx.memory.read(batch, count * BATCH_ENTRY.size)
    entries = [BATCH_ENTRY.unpack_from(raw, i * BATCH_ENTRY.size) for i in range(count)]
    routes = []
    for index, (call_id, reserved, a0, a1, a2) in enumerate(entries):  # validate everything first
        route = hv.route_for(call_id)
        if reserved or call_id & 0xFF00:
            raise HypercallError("BATCH_INVALID", index, ctx.spec.error("RESERVED_BITS"))
        if route is None or route.handler not in QUEUEABLE:
            raise HypercallError("BATCH_INVALID", index, ctx.spec.error("NOT_SUPPORTED"))
        error = QUEUEABLE[route.handler](ctx, a0, a1, a2)
        if error:
            raise HypercallError("BATCH_INVALID", index, ctx.spec.error(error))
        routes.append(route)
    for route, (call_id, _r, a0, a1, a2) in zip(routes, entries):  # then apply: nothing can fail now
        route.handler(ctx, a0, a1, a2)
        hv.calls[call_id] += 1
    return (count,)


def _check_set_pte(ctx: CallContext, ptep: int, pte: int, _: int) -> str | None:
    if ptep % 8 or not ctx.memory.is_ram(ptep, 8):
        return "BAD_ADDRESS"
    return None


# Calls that may appear in a batch, with a side-effect-free validator that returns an error name.
QUEUEABLE = {set_pte: _check_set_pte}
