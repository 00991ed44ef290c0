"""MMU family (0x03) and the paging styles behind it (docs/paging.md).

One ``Mmu`` object per guest holds the style's state; the family handlers only
decode arguments and call it. Styles:

- ``native``: hypercalls write the guest's tables with address checks only;
- ``direct``: tables are registered, read-only to the guest, every update validated;
- ``shadow``: as direct, and the hypervisor keeps the tables the hardware walks;
- ``trap`` (no ROM): ``TrapMmu`` validates and emulates the guest's trapped stores.

A batch (FlushQueue) is checked entry by entry before any entry is applied.
"""

from __future__ import annotations

import struct
from collections import Counter

from vmikit.hypervisor.context import CallContext, HypercallError, check_range
from vmikit.hypervisor.pagetables import ADDR_MASK, PAGE, PCD, PWT, PageTables, is_leaf, A, D, P
from vmikit.hypervisor.registry import FamilyHandlers
from vmikit.memory import GuestMemory

HANDLERS = FamilyHandlers("MMU")

FLUSH_FLAGS = 0x3  # FLUSH_TLB | FLUSH_GLOBAL
BATCH_ENTRY = struct.Struct("<IIQQQ")  # call_id, reserved, a0, a1, a2 (the spec's vmi_batch_entry)
PAGING_STYLES = ("native", "trap", "direct", "shadow")


class Mmu:
    """The ``native`` style: the guest owns its tables; calls only check addresses."""

    style = "native"

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        self.root: int | None = None  # the guest's CR3 as loaded through SetCR3
        self.refused: Counter[str] = Counter()  # trapped or native writes refused, by error

    def check_pte(self, ptep: int, value: int) -> str | None:
        if ptep % 8 or not self.memory.is_ram(ptep, 8):
            return "BAD_ADDRESS"
        return None

    def apply_pte(self, ptep: int, value: int) -> None:
        self.memory.write_u64(ptep, value)

    def allocate(self, table: int, level: int) -> str | None:
        if level not in (1, 2, 3, 4):
            return "INVALID_ARGUMENT"
        if table % PAGE or not self.memory.is_ram(table, PAGE):
            return "BAD_ADDRESS"
        return None

    def release(self, table: int) -> str | None:
        return None if table % PAGE == 0 and self.memory.is_ram(table, PAGE) else "BAD_ADDRESS"

    def load_cr3(self, root: int) -> int:
        """Check a CR3 load; returns the value the hardware CR3 gets (raises HypercallError)."""
        if not self.memory.is_ram(root & ADDR_MASK, PAGE):
            raise HypercallError("BAD_ADDRESS")
        self.root = root & ADDR_MASK
        return root

    def guest_cr3(self, hardware: int) -> int:
        return hardware

    def audit(self) -> list[str]:
        return []

    def stats(self) -> dict[str, object]:
        return {"style": self.style, "refused_writes": dict(self.refused)}


class DirectMmu(Mmu):
    """Registered, validated tables; the guest cannot store into them (read-only pool)."""

    style = "direct"

    def __init__(self, memory: GuestMemory, phys_bits: int = 48) -> None:
        super().__init__(memory)
        self.tables = PageTables(memory, phys_bits, set_accessed_dirty=self._hardware_cannot_write())

    def _hardware_cannot_write(self) -> bool:
        return True  # the pool is a read-only slot: the walker could not set A/D itself

    def check_pte(self, ptep: int, value: int) -> str | None:
        if ptep % 8:
            return "BAD_ADDRESS"
        level = self.tables.level.get(ptep & ~(PAGE - 1))
        if level is None:
            return "NOT_PAGE_TABLE" if self.memory.is_ram(ptep, 8) else "BAD_ADDRESS"
        return self.tables.check(level, value)

    def apply_pte(self, ptep: int, value: int) -> None:
        self.tables.apply(ptep, value)

    def allocate(self, table: int, level: int) -> str | None:
        error = self.tables.can_register(table, level)
        if error is None:
            self.tables.register(table, level)
        return error

    def release(self, table: int) -> str | None:
        error = self.tables.can_release(table, {self.root} if self.root is not None else set())
        if error is None:
            self.tables.release(table)
        return error

    def load_cr3(self, root: int) -> int:
        level = self.tables.level.get(root & ADDR_MASK)
        if level is None:
            raise HypercallError("NOT_PAGE_TABLE" if self.memory.is_ram(root & ADDR_MASK, PAGE) else "BAD_ADDRESS")
        if level != 4:
            raise HypercallError("WRONG_LEVEL")
        self.root = root & ADDR_MASK
        return root

    def on_guest_store(self, addr: int, size: int, value: int) -> None:
        """A guest store into the read-only pool: refused (the guest must use SetPTE)."""
        self.refused["PERMISSION"] += 1

    def audit(self) -> list[str]:
        return self.tables.audit()


class ShadowMmu(DirectMmu):
    """The guest's tables are plain memory; the hardware walks shadow copies the hypervisor keeps."""

    style = "shadow"

    def __init__(self, memory: GuestMemory, shadow_base: int, shadow_size: int, phys_bits: int = 48) -> None:
        super().__init__(memory, phys_bits)
        self.shadow: dict[int, int] = {}  # guest table -> shadow page
        self._free = list(range(shadow_base + shadow_size - PAGE, shadow_base - 1, -PAGE))

    def _hardware_cannot_write(self) -> bool:
        return False  # the guest's tables are RAM and the hardware never walks them

    def _shadow_value(self, level: int, value: int) -> int:
        if not value & P:
            return 0
        if is_leaf(level, value):
            return value | A | D  # shadow pages are the walker's: spare it the A/D writes
        return (value & ~ADDR_MASK) | self.shadow[value & ADDR_MASK] | A

    def allocate(self, table: int, level: int) -> str | None:
        if table not in self.tables.level and not self._free:
            return "INVALID_ARGUMENT"  # out of shadow pages
        error = super().allocate(table, level)
        if error is None and table not in self.shadow:
            page = self._free.pop()
            self.shadow[table] = page
            values = self.tables.entries(table)
            self.memory.write(page, b"".join(
                self._shadow_value(level, int(v)).to_bytes(8, "little") for v in values))
        return error

    def release(self, table: int) -> str | None:
        error = super().release(table)
        if error is None:
            page = self.shadow.pop(table)
            self.memory.zero(page, PAGE)
            self._free.append(page)
        return error

    def apply_pte(self, ptep: int, value: int) -> None:
        table = ptep & ~(PAGE - 1)
        super().apply_pte(ptep, value)
        level = self.tables.level[table]
        self.memory.write_u64(self.shadow[table] + (ptep & (PAGE - 1)), self._shadow_value(level, value))

    def load_cr3(self, root: int) -> int:
        super().load_cr3(root)
        return self.shadow[root & ADDR_MASK] | (root & (PWT | PCD))

    def guest_cr3(self, hardware: int) -> int:
        return self.root if self.root is not None else hardware

    def audit(self) -> list[str]:
        problems = super().audit()
        for table, page in self.shadow.items():
            level = self.tables.level[table]
            want = [self._shadow_value(level, int(v)) for v in self.tables.entries(table)]
            if want != [int(v) for v in self.tables.entries(page)]:
                problems.append(f"shadow of table {table:#x} disagrees with it")
        return problems


class TrapMmu(DirectMmu):
    """No ROM: the guest stores into its tables natively; each store traps and is checked here.

    Without registration calls, table levels are learnt from the structure: a pool page
    first written without being linked is taken as a root (level 4), and a non-leaf entry
    types the page it points to one level down. Guests build their tables top-down.
    """

    style = "trap"

    def __init__(self, memory: GuestMemory, pool: tuple[int, int], phys_bits: int = 48) -> None:
        super().__init__(memory, phys_bits)
        self.pool_base, self.pool_end = pool[0], pool[0] + pool[1]
        self.emulated = 0

    def _in_pool(self, gpa: int) -> bool:
        return self.pool_base <= gpa < self.pool_end

    def on_guest_store(self, addr: int, size: int, value: int) -> None:
        ptep = addr & ~7
        shift = (addr & 7) * 8
        if size not in (1, 2, 4, 8) or (addr & 7) + size > 8:
            self.refused["INVALID_ARGUMENT"] += 1
            return
        old = self.memory.read_u64(ptep)
        mask = ((1 << (8 * size)) - 1) << shift
        new = (old & ~mask) | ((value << shift) & mask)
        table = ptep & ~(PAGE - 1)
        if table not in self.tables.level:
            self.tables.register(table, 4)  # an unlinked table being filled: a root
        level = self.tables.level[table]
        child = new & ADDR_MASK
        if new & P and not is_leaf(level, new) and child not in self.tables.level and self._in_pool(child):
            if self.tables.can_register(child, level - 1) is None:
                self.tables.register(child, level - 1)
        error = self.tables.check(level, new)
        if error:
            self.refused[error] += 1
            return
        self.tables.apply(ptep, new)
        self.emulated += 1

    def stats(self) -> dict[str, object]:
        return {**super().stats(), "emulated_writes": self.emulated}


# --- the family's handlers -------------------------------------------------------------


def _mmu(ctx: CallContext) -> Mmu:
    return ctx.hypervisor.mmu


def set_pte(ctx: CallContext, ptep: int, pte: int, _: int = 0) -> tuple[int, ...]:
    mmu = _mmu(ctx)
    error = mmu.check_pte(ptep, pte)
    if error:
        raise HypercallError(error)
    mmu.apply_pte(ptep, pte)
    if ctx.hypervisor.audit:
        ctx.hypervisor.run_audit()
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
    error = _mmu(ctx).allocate(table, level)
    if error:
        raise HypercallError(error)
    return ()


@HANDLERS.call("ReleasePage")
def release_page(ctx: CallContext, table: int, *_: int) -> tuple[int, ...]:
    error = _mmu(ctx).release(table)
    if error:
        raise HypercallError(error)
    return ()


@HANDLERS.call("FlushQueue")
def flush_queue(ctx: CallContext, batch: int, count: int, _: int) -> tuple[int, ...]:
    hv = ctx.hypervisor
    mmu = _mmu(ctx)
    if count > ctx.spec.batch.max_entries:
        raise HypercallError("INVALID_ARGUMENT")
    if count == 0:
        return (0,)
    check_range(ctx, batch, count * BATCH_ENTRY.size, align=8)
    raw = ctx.memory.read(batch, count * BATCH_ENTRY.size)
    entries = list(BATCH_ENTRY.iter_unpack(raw))
    for index, (call_id, reserved, a0, a1, _a2) in enumerate(entries):  # check everything first
        if reserved or call_id & 0xFF00:
            raise HypercallError("BATCH_INVALID", index, ctx.spec.error("RESERVED_BITS"))
        route = hv.route_for(call_id)
        if route is None or route.handler is not set_pte:
            raise HypercallError("BATCH_INVALID", index, ctx.spec.error("NOT_SUPPORTED"))
        error = mmu.check_pte(a0, a1)
        if error:
            raise HypercallError("BATCH_INVALID", index, ctx.spec.error(error))
    for call_id, _r, a0, a1, _a2 in entries:  # then apply: nothing can fail now
        mmu.apply_pte(a0, a1)
        hv.calls[call_id] += 1
    if hv.audit:
        hv.run_audit()
    return (count,)
