"""MMU family (0x03) and the paging styles behind it (docs/paging.md).

One ``Mmu`` object per guest holds the style's state; the family handlers only
decode arguments and call it. Styles:

- ``native``: hypercalls write the guest's tables with address checks only;
- ``direct``: tables are registered, read-only to the guest, every update validated;
- ``shadow``: as direct, and the hypervisor keeps the tables the hardware walks (in a region
  that is read-only to the guest, like the pool);
- ``trap`` (no ROM): ``TrapMmu`` validates and emulates the guest's trapped stores.

A batch (FlushQueue) is checked entry by entry before any entry is applied: first by the C
batch kernel (batchkernel.py) when it is on, which applies a uniform, wholly valid batch in one
call and declines anything else untouched; then by the Python paths, which name the bad entry.
"""

from __future__ import annotations

import struct
from collections import Counter

import numpy as np

from vmikit.hypervisor import batchkernel
from vmikit.hypervisor.batchkernel import BatchKernel, ShadowArrays
from vmikit.hypervisor.context import CallContext, HypercallError
from vmikit.hypervisor.pagetables import ADDR_MASK, ERRORS, EVERYTHING, Auditor, PAGE, PCD, PS, PWT, U64, A, D, P, PageTables, is_leaf
from vmikit.hypervisor.registry import FamilyHandlers
from vmikit.abi.model import BATCH_ENTRY_ARGS
from vmikit.memory import GuestMemory

HANDLERS = FamilyHandlers("MMU")

FLUSH_FLAGS = 0x3  # FLUSH_TLB | FLUSH_GLOBAL
# The spec's vmi_batch_entry: u32 call_id, u32 reserved, u64 args[BATCH_ENTRY_ARGS] (the loader
# refuses a spec whose [batch] max_args differs, so the ROM, the guest header and this agree).
ENTRY_WORDS = 1 + BATCH_ENTRY_ARGS
BATCH_ENTRY = struct.Struct("<II" + "Q" * BATCH_ENTRY_ARGS)
BATCH_DTYPE = np.dtype([("call_id", "<u4"), ("reserved", "<u4")] + [(f"a{i}", "<u8") for i in range(BATCH_ENTRY_ARGS)])
PAGING_STYLES = ("native", "trap", "direct", "shadow")


# Below this many entries a batch is checked and applied entry by entry: the array path costs a
# fixed ~100 µs of numpy calls, one entry in Python ~4 µs (measured on this machine kind).
VECTOR_MIN = 32


def _has_duplicates(values: np.ndarray) -> bool:
    ordered = np.sort(values)
    return bool((ordered[1:] == ordered[:-1]).any())


class Mmu:
    """The ``native`` style: the guest owns its tables; calls only check addresses."""

    style = "native"

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        self.root: int | None = None  # the guest's CR3 as loaded through SetCR3
        self.refused: Counter[str] = Counter()  # trapped or native writes refused, by error
        self._stale: list[tuple[int, int]] = []

    def take_stale(self) -> list[tuple[int, int]]:
        """Guest-physical ranges whose cached translations writes since the last call made
        stale (and forget them); EVERYTHING when no cheaper bound is known."""
        stale, self._stale = self._stale, []
        return stale

    def check_pte(self, ptep: int, value: int) -> str | None:
        if ptep % 8 or not self.memory.is_ram(ptep, 8):
            return "BAD_ADDRESS"
        return None

    def apply_pte(self, ptep: int, value: int) -> None:
        old = self.memory.read_u64(ptep)
        self.memory.write_u64(ptep, value)
        if old & P and old != value:
            self._stale.append(EVERYTHING)  # native style: the level of the entry is not known

    def check_batch(self, pteps: np.ndarray, values: np.ndarray) -> tuple[int, str] | None:
        """(index, error) of the first entry that fails, or None when all pass."""
        for index, (ptep, value) in enumerate(zip(pteps.tolist(), values.tolist())):
            error = self.check_pte(ptep, value)
            if error:
                return index, error
        return None

    def apply_batch(self, pteps: np.ndarray, values: np.ndarray) -> None:
        for ptep, value in zip(pteps.tolist(), values.tolist()):
            self.apply_pte(ptep, value)

    def apply_queued(self, entries: np.ndarray, call_id: int) -> bool:
        """The fast path of a FlushQueue batch (``entries``: its int64 words, one row per entry:
        call ID and reserved word, entry address, value, unused): True when every entry has the
        queueable ``call_id`` (as that word) and is valid, and the batch is applied; False (nothing
        changed) when the general check must decide, which names the first failing entry."""
        return False

    def kernel(self) -> BatchKernel | None:
        """The C batch kernel FlushQueue tries first (batchkernel.py), None when this style has
        none or it is off."""
        return None

    def close(self) -> None:
        pass

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

    def is_table(self, page: int) -> bool:
        """Whether ``page`` is a registered page-table page (the hypervisor must not write it)."""
        return False

    def audit(self) -> list[str]:
        return self.auditor().audit()

    def auditor(self) -> MmuAuditor:
        """An incremental auditor: each ``audit()`` reports what ``audit()`` here would, re-deriving
        only what changed since its previous one (pagetables.Auditor)."""
        return MmuAuditor(self)

    def stats(self) -> dict[str, object]:
        return {"style": self.style, "refused_writes": dict(self.refused)}


class DirectMmu(Mmu):
    """Registered, validated tables; the guest cannot store into them (read-only pool)."""

    style = "direct"

    def __init__(self, memory: GuestMemory, phys_bits: int = 48, pool: tuple[int, int] | None = None,
                 batch_kernel: bool | None = None) -> None:
        super().__init__(memory)
        self.tables = PageTables(memory, phys_bits, set_accessed_dirty=True)
        # Tables must come from the pool: only there is a page read-only to the guest whatever its
        # own (unvalidated boot) mappings say. None: any RAM page (the validator's unit tests).
        self.pool = pool
        # The C batch kernel (None: as VMIKIT_BATCH_KERNEL says). Built and loaded now, so that a
        # missing compiler is a setup error; its context is made at the first batch.
        self._use_kernel = batchkernel.enabled_by_default() if batch_kernel is None else batch_kernel
        if self._use_kernel:
            batchkernel.load()
        self._kernel: BatchKernel | None = None

    def check_pte(self, ptep: int, value: int) -> str | None:
        if ptep % 8:
            return "BAD_ADDRESS"
        level = self.tables.level.get(ptep & ~(PAGE - 1))
        if level is None:
            return "NOT_PAGE_TABLE" if self.memory.is_ram(ptep, 8) else "BAD_ADDRESS"
        return self.tables.check(level, value)

    def apply_pte(self, ptep: int, value: int) -> None:
        self.tables.apply(ptep, value)

    def take_stale(self) -> list[tuple[int, int]]:
        stale, self.tables.stale = self.tables.stale, []
        return stale

    def check_batch(self, pteps: np.ndarray, values: np.ndarray) -> tuple[int, str] | None:
        if len(pteps) < VECTOR_MIN:
            return super().check_batch(pteps, values)
        errors = np.zeros(len(pteps), np.int8)
        levels = self.tables.levels_of(pteps)
        errors[:] = self.tables.check_many(np.maximum(levels, 1), values)
        unregistered = levels == 0
        errors[unregistered] = ERRORS.index("NOT_PAGE_TABLE")
        misaligned = (pteps & U64(7)) != 0
        errors[misaligned] = -1  # BAD_ADDRESS below: checked last so it wins, as in check_pte
        bad = np.flatnonzero(errors)
        if not len(bad):
            return None
        index = int(bad[0])
        if errors[index] == -1 or (unregistered[index] and not self.memory.is_ram(int(pteps[index]), 8)):
            return index, "BAD_ADDRESS"
        return index, str(ERRORS[errors[index]])

    def apply_batch(self, pteps: np.ndarray, values: np.ndarray) -> None:
        if len(pteps) < VECTOR_MIN or _has_duplicates(pteps):  # duplicates: order matters, one by one
            super().apply_batch(pteps, values)
        else:
            self.tables.apply_many(pteps, values)

    def apply_queued(self, entries: np.ndarray, call_id: int) -> bool:
        pteps, values = entries[:, 1], entries[:, 2]
        checked = self.tables.check_fast(pteps, values, entries[:, 0], call_id)
        if checked is None:
            return False
        if self.tables.apply_fast(pteps, values, checked[1]) is None:  # duplicates: in order
            Mmu.apply_batch(self, pteps.view(U64), values.view(U64))
        return True

    def kernel(self) -> BatchKernel | None:
        if self._kernel is None and self._use_kernel:
            self._kernel = self._make_kernel()
        return self._kernel

    def _make_kernel(self) -> BatchKernel:
        return BatchKernel(self.tables, ENTRY_WORDS)

    def close(self) -> None:
        if self._kernel is not None:
            self._kernel.close()
        self._use_kernel, self._kernel = False, None
        self.tables.close()

    def allocation_error(self, table: int, level: int) -> str | None:
        """Why ``table`` cannot become a table at ``level``, or None."""
        if self.pool is not None and not self.pool[0] <= table < self.pool[0] + self.pool[1] \
                and level in (1, 2, 3, 4):
            return "BAD_ADDRESS"
        return self.tables.can_register(table, level)

    def allocate(self, table: int, level: int) -> str | None:
        error = self.allocation_error(table, level)
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

    def is_table(self, page: int) -> bool:
        return page in self.tables.level

    def on_guest_store(self, addr: int, size: int, value: int) -> None:
        """A guest store into the read-only pool: refused (the guest must use SetPTE)."""
        self.refused["PERMISSION"] += 1

    def auditor(self) -> MmuAuditor:
        return TablesAuditor(self)


class ShadowMmu(DirectMmu):
    """The guest's tables are plain memory; the hardware walks shadow copies the hypervisor keeps."""

    style = "shadow"

    def __init__(self, memory: GuestMemory, shadow_base: int, shadow_size: int, phys_bits: int = 48,
                 pool: tuple[int, int] | None = None, batch_kernel: bool | None = None) -> None:
        super().__init__(memory, phys_bits, pool, batch_kernel)
        self.shadow_size = shadow_size
        self.shadow: dict[int, int] = {}  # guest table -> shadow page
        self.shadow_of = np.zeros(len(self.tables.level_of), U64)  # by guest frame: its shadow page
        self.shadow_base = shadow_base
        self.guest_of = np.zeros(shadow_size >> 12, U64)  # by shadow page: the guest table it shadows
        self.tables.validated = self._validated
        self.tables.validated_one = self._validated_one
        # The fast path's view of the shadow area and, per guest frame, its shadow page's first
        # slot in that view (only registered tables have one; 0 otherwise, never read for them).
        region = memory.region_for(shadow_base, shadow_size)
        self._shadow_view = region.words[(shadow_base - region.gpa) >> 3:]
        self._shadow_slot = np.zeros(len(self.tables.level_of) + 1, np.int64)
        self._free = list(range(shadow_base + shadow_size - PAGE, shadow_base - 1, -PAGE))

    def _shadow_value(self, level: int, value: int) -> int:
        if not value & P:
            return 0
        if is_leaf(level, value):
            return value | A | D  # shadow pages are the walker's: spare it the A/D writes
        return (value & ~ADDR_MASK) | self.shadow.get(value & ADDR_MASK, 0) | A  # 0: an unvalidated entry

    def allocate(self, table: int, level: int) -> str | None:
        error = self.allocation_error(table, level)  # the arguments first: the same answers as direct
        if error is None and table not in self.tables.level and not self._free:
            return "INVALID_ARGUMENT"  # out of shadow pages
        if error is None:
            self.tables.register(table, level)
        if error is None and table not in self.shadow:
            page = self._free.pop()
            self.shadow[table] = page
            self.shadow_of[table >> 12] = page
            self._shadow_slot[table >> 12] = (page - self.shadow_base) >> 3
            self.guest_of[(page - self.shadow_base) >> 12] = table
            values = self.tables.entries(table)
            self.memory.write(page, b"".join(
                self._shadow_value(level, int(v)).to_bytes(8, "little") for v in values))
        return error

    def release(self, table: int) -> str | None:
        error = super().release(table)
        if error is None:
            page = self.shadow.pop(table)
            self.shadow_of[table >> 12] = 0
            self._shadow_slot[table >> 12] = 0
            self.guest_of[(page - self.shadow_base) >> 12] = 0
            self.memory.zero(page, PAGE)
            self._free.append(page)
        return error

    def apply_pte(self, ptep: int, value: int) -> None:
        table = ptep & ~(PAGE - 1)
        super().apply_pte(ptep, value)
        level = self.tables.level[table]
        self.memory.write_u64(self.shadow[table] + (ptep & (PAGE - 1)), self._shadow_value(level, value))

    def _validated_one(self, ptep: int) -> int:
        table = ptep & ~(PAGE - 1)
        s = self.memory.read_u64(self.shadow[table] + (ptep & (PAGE - 1)))
        if not s & P:
            return 0
        if is_leaf(self.tables.level[table], s):
            return s
        return (s & ~ADDR_MASK) | int(self.guest_of[((s & ADDR_MASK) - self.shadow_base) >> 12])

    def _validated(self, pteps: np.ndarray) -> np.ndarray:
        """The guest values last validated for these entries, recovered from their shadows (the
        guest's own copy is not believed: only what passed the checks counts)."""
        levels = self.tables.levels_of(pteps).astype(np.int64)
        where = self.shadow_of[(pteps >> U64(12)).astype(np.int64)] + (pteps & U64(PAGE - 1))
        s = self.tables._gather(where)
        present = (s & U64(P)) != 0
        leaf = (levels == 1) | ((levels < 4) & ((s & U64(PS)) != 0))
        page = ((s & U64(ADDR_MASK)) - U64(self.shadow_base)) >> U64(12)
        guest = self.guest_of[np.minimum(page, U64(len(self.guest_of) - 1)).astype(np.int64)]
        return np.where(present, np.where(leaf, s, (s & ~U64(ADDR_MASK)) | guest), U64(0))

    def apply_batch(self, pteps: np.ndarray, values: np.ndarray) -> None:
        if len(pteps) < VECTOR_MIN or _has_duplicates(pteps):
            Mmu.apply_batch(self, pteps, values)
            return
        self.tables.apply_many(pteps, values)
        where = self.shadow_of[(pteps >> U64(12)).astype(np.int64)] + (pteps & U64(PAGE - 1))
        self.tables._scatter(where, self._shadow_values(pteps, values))

    def _shadow_values(self, pteps: np.ndarray, values: np.ndarray) -> np.ndarray:
        """``_shadow_value`` for arrays of checked entries (uint64)."""
        levels = self.tables.levels_of(pteps).astype(np.int64)
        v = values.astype(U64)
        present = (v & U64(P)) != 0
        leaf = (levels == 1) | (((levels == 2) | (levels == 3)) & ((v & U64(PS)) != 0))
        child = self.shadow_of[np.minimum((v & U64(ADDR_MASK)) >> U64(12), U64(len(self.shadow_of) - 1)).astype(np.int64)]
        shadow = np.where(leaf, v | U64(A | D), (v & ~U64(ADDR_MASK)) | child | U64(A))
        shadow[~present] = 0
        return shadow

    def apply_queued(self, entries: np.ndarray, call_id: int) -> bool:
        pteps, values = entries[:, 1], entries[:, 2]
        checked = self.tables.check_fast(pteps, values, entries[:, 0], call_id)
        if checked is None:
            return False
        frames, index = checked
        # The shadow entries: a guest table's shadow page holds its entry at the same offset.
        where = self._shadow_slot.take(frames) + ((pteps >> 3) & (PAGE // 8 - 1))
        shadows = self._shadow_view
        before = shadows.take(where)
        old = (self._validated(pteps.view(U64)).view(np.int64) if np.count_nonzero(before & P)
               else np.zeros(len(pteps), np.int64))  # every entry was empty (mapping fresh pages)
        stored = self.tables.apply_fast(pteps, values, index, old)
        if stored is None:  # duplicates: in order
            Mmu.apply_batch(self, pteps.view(U64), values.view(U64))
        elif np.count_nonzero(index >= 2 << 12):  # entries pointing at tables: their shadows
            shadows[where] = self._shadow_values(pteps.view(U64), values.view(U64)).view(np.int64)
        else:  # 4 KiB leaves: stored with A and D, as a shadow is; an empty entry shadows as 0
            shadows[where] = stored * (values & P)
        return True

    def _make_kernel(self) -> BatchKernel:
        region = self.memory.region_for(self.shadow_base, self.shadow_size)
        return BatchKernel(self.tables, ENTRY_WORDS, ShadowArrays(
            region.host_addr + self.shadow_base - region.gpa, self.shadow_size >> 3, self.shadow_base,
            self._shadow_slot, self.shadow_of, self.guest_of))

    def close(self) -> None:
        super().close()
        self._shadow_view = np.zeros(0, np.int64)  # it pins the shadow area's mapping open

    def load_cr3(self, root: int) -> int:
        super().load_cr3(root)
        return self.shadow[root & ADDR_MASK] | (root & (PWT | PCD))

    def guest_cr3(self, hardware: int) -> int:
        return self.root if self.root is not None else hardware

    def auditor(self) -> MmuAuditor:
        return ShadowAuditor(self)

    def shadow_disagrees(self, level: int, values: np.ndarray, shadow: np.ndarray) -> bool:
        """Whether a shadow page is not what ``_shadow_value`` makes of the table's entries."""
        present = np.flatnonzero(values & U64(P))
        absent = np.ones(len(values), bool)
        absent[present] = False
        if shadow[absent].any():  # a non-present entry shadows as 0
            return True
        return any(self._shadow_value(level, int(values[i])) != int(shadow[i]) for i in present)


class MmuAuditor:
    """The auditor of a style without invariants (native): nothing to find."""

    def __init__(self, mmu: Mmu) -> None:
        self.mmu = mmu

    def audit(self) -> list[str]:
        return []


class TablesAuditor(MmuAuditor):
    """direct and trap: the page-table invariants (pagetables.Auditor)."""

    def __init__(self, mmu: DirectMmu) -> None:
        super().__init__(mmu)
        self.tables = Auditor(mmu.tables)

    def audit(self) -> list[str]:
        return self.tables.audit()


class ShadowAuditor(TablesAuditor):
    """shadow: also every shadow page against its table. A shadow page is compared again when
    its bytes, its table's bytes or level, or the table-to-shadow map (which non-leaf shadow
    entries name) changed since the previous audit."""

    def __init__(self, mmu: ShadowMmu) -> None:
        super().__init__(mmu)
        self.shadow_mmu = mmu
        self._map: dict[int, int] | None = None
        self._seen: dict[int, tuple[int, int, bytes, bytes, bool]] = {}  # table -> page, level, bytes, verdict

    def audit(self) -> list[str]:
        problems = super().audit()
        mmu = self.shadow_mmu
        same_map = self._map == mmu.shadow
        if not same_map:
            self._map = dict(mmu.shadow)
        seen: dict[int, tuple[int, int, bytes, bytes, bool]] = {}
        for table, page in mmu.shadow.items():
            level = mmu.tables.level[table]
            raw, shadow = self.tables.seen(table), self.tables.read_page(page)
            last = self._seen.get(table)
            if same_map and last is not None and last[:4] == (page, level, raw, shadow):
                bad = last[4]
            else:
                bad = mmu.shadow_disagrees(level, np.frombuffer(raw, dtype="<u8"), np.frombuffer(shadow, dtype="<u8"))
            seen[table] = (page, level, raw, shadow, bad)
            if bad:
                problems.append(f"shadow of table {table:#x} disagrees with it")
        self._seen = seen
        return problems


class TrapMmu(DirectMmu):
    """No ROM: the guest stores into its tables natively; each store traps and is checked here.

    Without registration calls, table levels are learnt from the structure: a pool page
    first written without being linked is taken as a root (level 4) if its contents are a
    valid root (a store into a page pre-filled with anything else is refused), and a non-leaf
    entry types the page it points to one level down. Guests build their tables top-down.
    """

    style = "trap"

    def __init__(self, memory: GuestMemory, pool: tuple[int, int], phys_bits: int = 48) -> None:
        super().__init__(memory, phys_bits, pool)
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
        if table not in self.tables.level:  # an unlinked table being filled: a root, if what it holds is one
            error = self.tables.can_register(table, 4)
            if error:
                self.refused[error] += 1
                return
            self.tables.register(table, 4)
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


@HANDLERS.call("FlushTLBMulti")
def flush_tlb_multi(ctx: CallContext, flags: int, cpus: int, _: int) -> tuple[int, ...]:
    if flags & ~FLUSH_FLAGS:
        raise HypercallError("INVALID_ARGUMENT")
    return (ctx.hypervisor.shootdown(cpus),)


@HANDLERS.call("InvalPageMulti")
def inval_page_multi(ctx: CallContext, va: int, cpus: int, _: int) -> tuple[int, ...]:
    return (ctx.hypervisor.shootdown(cpus),)


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
    if count > ctx.spec.batch.max_entries:
        raise HypercallError("INVALID_ARGUMENT")
    if count == 0:
        return (0,)
    kernel = hv.mmu.kernel()
    if kernel is not None:  # C: one call checks and applies a uniform, wholly valid batch
        call_id = kernel.flush(hv.queueable_keys(), batch, count)
        if call_id is not None:
            hv.calls[call_id] += count
            if hv.audit:
                hv.run_audit()
            return (count,)
        # Declined, nothing written: the general path decides and names the first bad entry.
    words = ctx.memory.ram_words(batch, count * ENTRY_WORDS)  # a copy: what is checked is what is applied
    if words is None:
        raise HypercallError("BAD_ADDRESS")
    entries = words.reshape(count, ENTRY_WORDS)  # call_id | reserved << 32, a0, a1, a2
    # The numpy fast path accepts no batch the C kernel declines: tried only without it.
    if kernel is None and count >= VECTOR_MIN and _apply_uniform(ctx, entries):
        return (count,)
    raw = words.tobytes()
    # Check every entry before applying any; the first failing index is reported.
    if count < VECTOR_MIN:
        ids, pteps, values = _check_entries(ctx, raw)
    else:
        ids, pteps, values = _check_entries_as_arrays(ctx, raw, count)
    _mmu(ctx).apply_batch(pteps, values)  # every entry passed: nothing can fail now
    for call_id, n in Counter(ids).items():
        hv.calls[call_id] += n
    if hv.audit:
        hv.run_audit()
    return (count,)


def _apply_uniform(ctx: CallContext, entries: np.ndarray) -> bool:
    """The fast path: a batch whose entries all carry the same queueable call ID, applied when
    the MMU's fast check finds every entry valid. False (nothing changed): the general path."""
    hv = ctx.hypervisor
    count = len(entries)
    first = int(entries[0, 0])
    if _entry_id_error(ctx, first & 0xFFFF_FFFF, first >> 32) or not _mmu(ctx).apply_queued(entries, first):
        return False
    hv.calls[first] += count
    if hv.audit:
        hv.run_audit()
    return True


def _entry_id_error(ctx: CallContext, call_id: int, reserved: int) -> str | None:
    if reserved or call_id & 0xFF00:
        return "RESERVED_BITS"
    route = ctx.hypervisor.route_for(call_id)
    return None if route is not None and route.handler is set_pte else "NOT_SUPPORTED"


def _check_entries(ctx: CallContext, raw: bytes) -> tuple[list[int], np.ndarray, np.ndarray]:
    """A small batch, entry by entry in Python (cheaper than a few dozen array calls)."""
    mmu = _mmu(ctx)
    entries = list(BATCH_ENTRY.iter_unpack(raw))
    for index, (call_id, reserved, ptep, value, _a2) in enumerate(entries):
        error = _entry_id_error(ctx, call_id, reserved) or mmu.check_pte(ptep, value)
        if error:
            raise HypercallError("BATCH_INVALID", index, ctx.spec.error(error))
    return ([e[0] for e in entries], np.array([e[2] for e in entries], U64),
            np.array([e[3] for e in entries], U64))


def _check_entries_as_arrays(ctx: CallContext, raw: bytes, count: int) -> tuple[list[int], np.ndarray, np.ndarray]:
    """A large batch, checked as arrays; the same errors as ``_check_entries`` (a property test)."""
    entries = np.frombuffer(raw, dtype=BATCH_DTYPE)
    ids = entries["call_id"]
    bad_id = (entries["reserved"] != 0) | ((ids & 0xFF00) != 0)
    keys = ids & np.uint32(0xFFFFFF00)
    queueable = np.zeros(count, bool)
    for key in ctx.hypervisor.queueable_keys():  # a handful of IDs: cheaper than np.isin
        queueable |= keys == key
    pteps, values = entries["a0"], entries["a1"]
    first_bad_id = int(np.argmax(bad_id | ~queueable)) if (bad_id | ~queueable).any() else count
    failure = _mmu(ctx).check_batch(pteps[:first_bad_id], values[:first_bad_id]) if first_bad_id else None
    if failure is not None:
        index, error = failure
        raise HypercallError("BATCH_INVALID", index, ctx.spec.error(error))
    if first_bad_id < count:
        error = "RESERVED_BITS" if bad_id[first_bad_id] else "NOT_SUPPORTED"
        raise HypercallError("BATCH_INVALID", first_bad_id, ctx.spec.error(error))
    return ids.tolist(), pteps, values
