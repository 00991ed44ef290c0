"""The hypervisor's model of the guest's page tables, and the rules every update must keep.

``PageTables`` knows which guest pages are page tables (and of which level),
how often each table is referenced, and which frames are mapped writable. The
per-frame state lives in numpy arrays so that a batch of updates is checked and
applied as arrays (``check_many``/``apply_many``) while a single update uses the
same arrays from plain Python (``check``/``apply``); a property test keeps the
two paths equal. Errors are spec error names; the rules are in docs/paging.md.

Within a batch no entry can change what another entry's check depends on (the
set of registered tables and the memory map), so checking every entry against
the state before the batch equals checking each against the state the earlier
entries leave.

FlushQueue batches take a third path first (``check_fast``/``apply_fast``): a few
array operations that classify each entry into an index of a precomputed table
of verdicts. On this machine kind every distinct piece of code the VMM runs after
an exit costs microseconds (the host's caches and TLB are cold after the guest
ran), so that path is built for few, repeated numpy calls: it decides only that
a whole batch is valid, and anything else (an invalid entry, a large leaf,
reserved bits) goes to ``check_many``, which names the error and the index. The
reference and writable-mapping counts it changes are folded in lazily, before
anything reads them (``refs``, ``writable``).

When the C batch kernel is on (``batchkernel.py``, the default), FlushQueue asks it
first: it reads the same verdict and A/D tables and updates ``_refs``/``_writable`` in
place, so these arrays are never replaced, only changed.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from vmikit.memory import GuestMemory, Region

PAGE = 0x1000
ENTRIES = 512
P, RW, US, PWT, PCD, A, D, PS = (1 << b for b in range(8))
ADDR_MASK = 0x000F_FFFF_FFFF_F000
SIZE_OF_LEAF = {1: 1 << 12, 2: 1 << 21, 3: 1 << 30}
LARGE = (2, 3)
MiB2, GiB1 = 1 << 21, 1 << 30

# Error codes of the vectorized check, index = code.
ERRORS: tuple[str | None, ...] = (None, "RESERVED_PTE_BITS", "BAD_ADDRESS", "PERMISSION", "NOT_PAGE_TABLE",
                                  "WRONG_LEVEL")
_RPB, _BAD, _PERM, _NPT, _WL = 1, 2, 3, 4, 5
_KIND_CODES = {"ram": 1, "rom": 2}
U64 = np.uint64
I64 = np.int64
# The fast path's verdict table is indexed by level << 12 | frame facts << 8 | (value & _CLASS_BITS),
# the frame facts being kind * 5 + the level of the table registered at the frame (kind: 0 neither,
# 1 RAM, 2 ROM; both of the entry's 4 KiB frame).
_CLASS_BITS = P | RW | PS
_FACTS = 15
PENDING_MAX = 1 << 10  # queued count changes are folded in at the latest after this many entries
STAMPS = 1 << 13  # the duplicate test's stamps (64 KiB)


EVERYTHING = (0, 1 << 52)  # a stale range that covers all of guest-physical memory


def _mapped(level: int, old: int) -> tuple[int, int]:
    """What a present entry's cached translations point at: its frame (a leaf) or, for a
    table entry, everything below it (EVERYTHING: no cheaper bound is known)."""
    if not is_leaf(level, old):
        return EVERYTHING
    size = PAGE if level == 1 else 1 << (21 if level == 2 else 30)
    return old & ADDR_MASK & ~(size - 1), size


def _add_at(counts: np.ndarray, index: np.ndarray, delta: int | np.ndarray) -> None:
    """``np.add.at(counts, index, delta)`` (one delta for all, or one per entry); for many entries
    as one bincount over the span they touch, a fraction of add.at's per-element price."""
    if len(index) < 256:
        np.add.at(counts, index, delta)
        return
    low = int(index.min())
    if isinstance(delta, np.ndarray):
        span = np.bincount(index - low, weights=delta)
    else:
        span = np.bincount(index - low) * delta
    counts[low:low + len(span)] += span.astype(counts.dtype)


def is_leaf(level: int, value: int) -> bool:
    return level == 1 or (level in LARGE and bool(value & PS))


def small_entry_rule(level: int, rw: bool, kind: int, table_level: int) -> int:
    """The error code of a present entry without reserved bits that is a 4 KiB leaf (level 1)
    or points at a table (level 2-4, no PS), from the kind of memory at its frame (0 neither,
    1 RAM, 2 ROM) and the level of the table registered there (0 none). ``check`` and the fast
    path's verdict table both come from here."""
    if level == 1:
        if kind == 2:
            return _PERM if rw else 0
        if kind != 1:
            return _BAD
        return _PERM if rw and table_level else 0
    if not table_level:
        return _NPT
    return _WL if table_level != level - 1 else 0


@dataclass
class PageTables:
    memory: GuestMemory
    phys_bits: int = 48
    set_accessed_dirty: bool = False  # store A (and D on leaves): the hardware cannot write read-only tables
    level: dict[int, int] = field(default_factory=dict)  # table gpa -> level 1..4 (also in level_of)

    def __post_init__(self) -> None:
        spans = [(r.gpa, r.end, _KIND_CODES[r.kind]) for r in self.memory.regions if r.kind in _KIND_CODES]
        self._spans = spans
        self.limit = max(end for _, end, _ in spans)
        frames = self.limit >> 12
        self.level_of = np.zeros(frames, np.int8)
        self._refs = np.zeros(frames, np.int32)  # non-leaf entries pointing at each table
        # Writable leaves by their (aligned) frame, per leaf size; registered tables per 2 MiB / 1 GiB.
        self._writable = {PAGE: np.zeros(frames, np.int32), MiB2: np.zeros((frames >> 9) + 1, np.int32),
                          GiB1: np.zeros((frames >> 18) + 1, np.int32)}
        # Count changes of fast-path batches not yet added: (verdict-table indexes, old, stored) each.
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._pending_entries = 0
        self.tables_in = {MiB2: np.zeros((frames >> 9) + 1, np.int32), GiB1: np.zeros((frames >> 18) + 1, np.int32)}
        self.reserved_mask = ((1 << 52) - 1) & ~((1 << self.phys_bits) - 1)
        if self.limit > 1 << self.phys_bits:  # check_fast finds reserved bits as frames beyond the map
            raise ValueError(f"guest memory ends at {self.limit:#x}, beyond {self.phys_bits} physical address bits")
        self._views = [(r.gpa, r.end, r.words.view(U64)) for r in self.memory.regions]
        # Where the last validated value of an entry is read from: guest memory by default; shadow
        # paging answers from its own copy, so a value the guest forged is never believed.
        self.validated: Callable[[np.ndarray], np.ndarray] = self._gather
        # Frames whose cached translations an applied write made stale (a changed present leaf:
        # the frame it mapped; a changed present table entry: EVERYTHING). The hypervisor
        # has them dropped before the guest runs again.
        self.stale: list[tuple[int, int]] = []
        self.validated_one: Callable[[int], int] = self.memory.read_u64
        # The kind of memory (1 RAM, 2 ROM, 0 neither) of every whole 4 KiB, 2 MiB and 1 GiB frame
        # that lies inside one region: a large leaf across a region boundary maps no single kind.
        self._kind4 = np.zeros(frames, np.int8)
        self._kind2 = np.zeros((frames >> 9) + 1, np.int8)
        self._kind1 = np.zeros((frames >> 18) + 1, np.int8)
        for start, end, code in spans:
            for table, size in ((self._kind4, PAGE), (self._kind2, MiB2), (self._kind1, GiB1)):
                table[-(-start // size):end // size] = code
        # Frame bits a large leaf must leave clear, by level (bit 12 is PAT there).
        self._align = np.array([0, 0, (MiB2 - 1) & ~PAGE & ~0xFFF, (GiB1 - 1) & ~PAGE & ~0xFFF, 0], U64)
        # The fast path (check_fast): per 4 KiB frame, level << 12 of the table there and its frame
        # facts << 8, both with a last element of 0 that out-of-range indexes clip to (registered
        # and released with level_of; the auditor checks they agree).
        self.fast_level = np.zeros(frames + 1, I64)
        self.fast_facts = np.zeros(frames + 1, I64)
        self.fast_facts[:frames] = self._kind4.astype(I64) * 5 << 8
        self._verdicts, self._ad_bits = self._fast_tables()
        self._contributes = self._contribution_table()
        self._ptep_bad = I64(7 | -(1 << 52))  # misaligned, or beyond any physical address (sign bit too)
        self._addr = I64(ADDR_MASK)
        # The one region holding every registered table (None: none yet; False: tables in several,
        # and the fast path is off), as the fast path indexes it.
        self._table_region: _TableRegion | bool | None = None

    def _fast_tables(self) -> tuple[np.ndarray, np.ndarray]:
        """The fast path's tables: per index, 1 where the general check must decide (an invalid
        entry, a large leaf, PS in a PML4 entry, an unregistered table), and the A/D bits a valid
        entry is stored with."""
        verdicts = np.ones(5 << 12, np.int8)
        ad_bits = np.zeros(5 << 12, I64)
        for level in (1, 2, 3, 4):
            for facts in range(_FACTS):
                kind, table_level = divmod(facts, 5)
                for bits in (0, P, RW, P | RW, PS, PS | P, PS | RW, PS | P | RW):
                    index = level << 12 | facts << 8 | bits
                    if not bits & P:
                        verdicts[index] = 0
                    elif not (bits & PS and level > 1) and not small_entry_rule(level, bool(bits & RW), kind,
                                                                                 table_level):
                        verdicts[index] = 0
                        ad_bits[index] = self.stored(level, P) & ~P
        return verdicts, ad_bits

    @staticmethod
    def _contribution_table() -> np.ndarray:
        """By level << 12 | (value & (P|RW|PS)): what an entry counts towards (as ``_count``):
        0 nothing, 1 a reference to a table, 2-4 a writable 4 KiB, 2 MiB or 1 GiB leaf."""
        table = np.zeros(5 << 12, np.int8)
        for level in (1, 2, 3, 4):
            for bits in (P, P | RW, P | PS, P | RW | PS):
                if not is_leaf(level, bits):
                    table[level << 12 | bits] = 1
                elif bits & RW:
                    table[level << 12 | bits] = 1 + level
        return table

    # --- the rules, one entry --------------------------------------------------------

    def _kind(self, frame: int, size: int) -> int:
        for start, end, kind in self._spans:
            if start <= frame and frame + size <= end:
                return kind
        return 0

    def check(self, level: int, value: int) -> str | None:
        """The error an entry with ``value`` in a table of ``level`` breaks, or None."""
        if not value & P:
            return None
        if value & self.reserved_mask or (level == 4 and value & PS):
            return "RESERVED_PTE_BITS"
        frame = value & ADDR_MASK
        if level in LARGE and value & PS:
            size = SIZE_OF_LEAF[level]
            if frame & (size - 1) & ~PAGE:  # bit 12 is PAT, the rest must be 0
                return "RESERVED_PTE_BITS"
            frame &= ~(size - 1)
            kind = self._kind(frame, size)
            if kind == 2:
                return "PERMISSION" if value & RW else None
            if kind != 1:
                return "BAD_ADDRESS"
            return "PERMISSION" if value & RW and self.tables_in[size][frame // size] else None
        return ERRORS[small_entry_rule(level, bool(value & RW), self._kind(frame, PAGE), self.level.get(frame, 0))]

    # --- the rules, a batch ------------------------------------------------------------

    def check_many(self, levels: np.ndarray, values: np.ndarray) -> np.ndarray:
        """``check`` for arrays of levels (int) and values (uint64): an error code per entry (0 = valid).

        Every lookup is an array gather (kinds of memory per 4 KiB / 2 MiB / 1 GiB frame were
        precomputed), so a batch costs a fixed few dozen array operations.
        """
        v = values.astype(U64, copy=False)
        lv = np.asarray(levels, np.int64)
        present = (v & U64(P)) != 0
        ps = (v & U64(PS)) != 0
        reserved = present & (((v & U64(self.reserved_mask)) != 0) | ((lv == 4) & ps))
        ok = present & ~reserved
        leaf = ok & ((lv == 1) | ((lv < 4) & ps))
        raw = v & U64(ADDR_MASK)
        inside = raw < U64(self.limit)
        index = np.where(inside, raw >> U64(12), U64(0)).astype(np.int64)
        misaligned = leaf & ((raw & self._align[lv]) != 0)
        kind = np.where(lv == 1, self._kind4[index],
                        np.where(lv == 2, self._kind2[index >> 9], self._kind1[index >> 18])) * inside
        maps_table = np.where(lv == 1, self.level_of[index] != 0,
                              np.where(lv == 2, self.tables_in[MiB2][index >> 9] > 0,
                                       self.tables_in[GiB1][index >> 18] > 0))
        rw = (v & U64(RW)) != 0
        leaf_ok = leaf & ~misaligned
        err = np.zeros(len(v), np.int8)
        err[reserved | misaligned] = _RPB
        err[leaf_ok & (kind == 0)] = _BAD
        err[leaf_ok & rw & ((kind == 2) | ((kind == 1) & maps_table))] = _PERM
        nonleaf = ok & ~leaf
        child = self.level_of[index] * inside
        err[nonleaf & (child == 0)] = _NPT
        err[nonleaf & (child != 0) & (child != lv - 1)] = _WL
        return err

    # --- the fast path of a batch -------------------------------------------------------------

    def _note_table_region(self, table: int) -> None:
        region = self.memory.region_for(table, PAGE)
        known = self._table_region
        if known is None:
            self._table_region = _TableRegion(region)
        elif isinstance(known, _TableRegion) and not known.start <= table < known.end:
            self._table_region = False

    def check_fast(self, pteps: np.ndarray, values: np.ndarray, tags: np.ndarray,
                   tag: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(frame of each entry's table, verdict-table index of each entry) when every entry of a
        batch (int64 arrays) is valid, none is a large leaf and every one of ``tags`` (the entries'
        call IDs) equals ``tag``; None when ``check_many`` must decide.

        Reserved bits need no test of their own: they lie inside the frame bits, so such a frame
        is beyond the memory map, whose facts say "neither RAM nor ROM" (invalid when present)."""
        if not self._table_region or np.count_nonzero((pteps & self._ptep_bad) | (tags ^ tag)):
            return None
        frames = pteps >> 12
        index = (self.fast_level.take(frames, mode="clip") | (values & _CLASS_BITS)
                 | self.fast_facts.take((values & self._addr) >> 12, mode="clip"))
        if np.count_nonzero(self._verdicts.take(index)):
            return None
        return frames, index

    def apply_fast(self, pteps: np.ndarray, values: np.ndarray, index: np.ndarray,
                   old: np.ndarray | None = None) -> np.ndarray | None:
        """Write a batch ``check_fast`` passed (``index`` is its answer) into the tables; the stored
        values, or None (nothing written) when the entries must be applied one by one. ``old``: the
        last validated values when they do not come from the tables themselves (shadow paging)."""
        region = self._table_region
        assert isinstance(region, _TableRegion), "check_fast first"
        slot = region.slots(pteps)
        if region.has_duplicates(slot):
            return None
        view = region.words
        if old is None:
            old = view.take(slot)
        stored = values | self._ad_bits.take(index)
        view[slot] = stored
        if np.count_nonzero(old & P):  # a present entry changed: its translations may be cached
            self._note_stale(self.levels_of(pteps.view(U64)), old.view(U64), stored.view(U64))
        self._pending.append((index, old, stored))
        self._pending_entries += len(index)
        if self._pending_entries > PENDING_MAX:
            self._fold()
        return stored

    def _fold(self) -> None:
        """Add the fast path's queued count changes (the old entries leave, the new ones arrive).
        What an entry counts towards follows from its level and its P, RW and PS bits alone."""
        pending, self._pending, self._pending_entries = self._pending, [], 0
        if not pending:
            return
        levels = np.concatenate([index for index, _, _ in pending]) & I64(7 << 12)
        targets = ((self._refs, 0), (self._writable[PAGE], 0), (self._writable[MiB2], 9), (self._writable[GiB1], 18))
        for part, delta in ((1, -1), (2, 1)):
            values = np.concatenate([entry[part] for entry in pending])
            codes = self._contributes.take(levels | (values & _CLASS_BITS))
            frames = (values & self._addr) >> 12
            codes[frames >= len(self._refs)] = 0  # beyond the counted range: never a validated entry
            for code, (counts, shift) in enumerate(targets, start=1):
                chosen = frames[codes == code] >> shift
                if len(chosen):
                    _add_at(counts, chosen, delta)

    @property
    def refs(self) -> np.ndarray:
        """Per frame: the present non-leaf entries pointing at it (the table there is in use)."""
        self._fold()
        return self._refs

    @property
    def writable(self) -> dict[int, np.ndarray]:
        """Per leaf size, per aligned frame: the writable leaves mapping it."""
        self._fold()
        return self._writable

    def levels_of(self, pteps: np.ndarray) -> np.ndarray:
        """The level of the table holding each entry address (0 = not in a registered table)."""
        index = pteps >> U64(12)
        inside = index < U64(len(self.level_of))
        return np.where(inside, self.level_of[np.minimum(index, U64(len(self.level_of) - 1)).astype(np.int64)], 0)

    # --- registration ----------------------------------------------------------------------

    def can_register(self, table: int, level: int) -> str | None:
        if level not in (1, 2, 3, 4):
            return "INVALID_ARGUMENT"
        if table % PAGE or not self.memory.is_ram(table, PAGE):
            return "BAD_ADDRESS"
        current = self.level.get(table)
        if current is not None:
            return None if current == level else "WRONG_LEVEL"
        frame = table >> 12
        if self.writable[PAGE][frame] or self.writable[MiB2][frame >> 9] or self.writable[GiB1][frame >> 18]:
            return "PERMISSION"  # it would stay writable through that mapping
        errors = self.check_many(np.full(ENTRIES, level), self.entries(table))
        bad = np.flatnonzero(errors)
        return ERRORS[errors[bad[0]]] if len(bad) else None

    def can_release(self, table: int, roots: set[int]) -> str | None:
        if table not in self.level:
            return "NOT_PAGE_TABLE"
        if self.refs[table >> 12] or table in roots:
            return "IN_USE"
        return None

    def register(self, table: int, level: int) -> None:
        if table in self.level:
            return
        if self.set_accessed_dirty:  # entries written before it was a table lack the bits the walker cannot set
            values = self.entries(table)
            stored = with_accessed_dirty(np.full(ENTRIES, level), values)
            if not np.array_equal(stored, values):
                self.memory.write(table, stored.tobytes())
        self.level[table] = level
        self._note_table_region(table)
        frame = table >> 12
        self.level_of[frame] = level
        self.fast_level[frame] = level << 12
        self.fast_facts[frame] += level << 8
        self.tables_in[MiB2][frame >> 9] += 1
        self.tables_in[GiB1][frame >> 18] += 1
        self._count_many(np.full(ENTRIES, level), self.entries(table), +1)

    def release(self, table: int) -> None:
        old = self.validated(np.arange(table, table + PAGE, 8, dtype=U64))  # while it is still a table
        level = self.level.pop(table)
        frame = table >> 12
        self.level_of[frame] = 0
        self.fast_level[frame] = 0
        self.fast_facts[frame] -= level << 8
        self.tables_in[MiB2][frame >> 9] -= 1
        self.tables_in[GiB1][frame >> 18] -= 1
        self._count_many(np.full(ENTRIES, level), old, -1)

    # --- applying checked entries ---------------------------------------------------------------

    def stored(self, level: int, value: int) -> int:
        """The value actually written for a valid entry."""
        if self.set_accessed_dirty and value & P:
            value |= A | (D if is_leaf(level, value) else 0)
        return value

    def apply(self, ptep: int, value: int) -> int:
        """Write a checked entry into the table holding ``ptep``; returns the stored value."""
        level = self.level[ptep & ~(PAGE - 1)]
        old = self.validated_one(ptep)
        self._count(level, old, -1)
        value = self.stored(level, value)
        self._count(level, value, +1)
        self.memory.write_u64(ptep, value)
        if old & P and old != value:
            self.stale.append(_mapped(level, old))
        return value

    def apply_many(self, pteps: np.ndarray, values: np.ndarray) -> np.ndarray:
        """``apply`` for arrays of distinct, checked entries; returns the stored values."""
        levels = self.levels_of(pteps)
        old = self.validated(pteps)
        stored = with_accessed_dirty(levels, values) if self.set_accessed_dirty else values.astype(U64, copy=True)
        # One counting pass: the old entries leave (-1), the new ones arrive (+1).
        n = len(pteps)
        self._count_many(np.concatenate((levels, levels)), np.concatenate((old, stored)),
                         np.concatenate((np.full(n, -1, np.int32), np.ones(n, np.int32))))
        self._scatter(pteps, stored)
        self._note_stale(levels, old, stored)
        return stored

    def _note_stale(self, levels: np.ndarray, old: np.ndarray, stored: np.ndarray) -> None:
        """What ``apply`` adds to ``stale``, for arrays of entries (uint64) replacing ``old``."""
        changed = ((old & U64(P)) != 0) & (old != stored)
        if changed.any():
            was_leaf = (levels == 1) | (((levels == 2) | (levels == 3)) & ((old & U64(PS)) != 0))
            if (changed & ~was_leaf).any():
                self.stale.append(EVERYTHING)
            else:
                sizes = np.where(levels == 1, U64(PAGE), np.where(levels == 2, U64(1 << 21), U64(1 << 30)))
                frames = old[changed] & U64(ADDR_MASK) & ~(sizes[changed] - U64(1))
                self.stale += list(zip(frames.tolist(), sizes[changed].tolist()))

    def _region_views(self, addrs: np.ndarray):
        if not len(addrs):
            return
        low, high = int(addrs.min()), int(addrs.max())
        for start, end, view in self._views:  # the common case: every address in one region
            if start <= low and high < end:
                yield slice(None), view, ((addrs - U64(start)) >> U64(3)).astype(np.int64)
                return
        for start, end, view in self._views:
            mask = (addrs >= U64(start)) & (addrs < U64(end))
            if mask.any():
                yield mask, view, ((addrs[mask] - U64(start)) >> U64(3)).astype(np.int64)

    def _gather(self, addrs: np.ndarray) -> np.ndarray:
        out = np.zeros(len(addrs), U64)
        for mask, view, index in self._region_views(addrs):
            out[mask] = view[index]
        return out

    def _scatter(self, addrs: np.ndarray, values: np.ndarray) -> None:
        for mask, view, index in self._region_views(addrs):
            view[index] = values[mask]

    def _count(self, level: int, value: int, delta: int) -> None:
        if not value & P:
            return
        frame = value & ADDR_MASK
        if frame >= self.limit:
            return  # never for a checked entry; an unvalidated one must not crash the count
        if is_leaf(level, value):
            if value & RW:
                size = SIZE_OF_LEAF[level]
                self._writable[size][frame // size] += delta
        else:
            self._refs[frame >> 12] += delta

    def _count_many(self, levels: np.ndarray, values: np.ndarray, delta: int | np.ndarray) -> None:
        """Add ``delta`` (one for all, or one per entry) to the counts the entries contribute."""
        v = values.astype(U64, copy=False)
        # Entries outside the counted range are never valid ones; skipping them keeps a forged
        # entry (read back from guest memory) from indexing past the arrays.
        present = ((v & U64(P)) != 0) & ((v & U64(ADDR_MASK)) < U64(self.limit))
        if not present.any():
            return
        lv = np.asarray(levels)
        leaf = (lv == 1) | (((lv == 2) | (lv == 3)) & ((v & U64(PS)) != 0))
        frame = v & U64(ADDR_MASK)
        deltas = np.broadcast_to(np.asarray(delta, np.int32), v.shape)
        nonleaf = present & ~leaf
        if nonleaf.any():
            _add_at(self._refs, (frame[nonleaf] >> U64(12)).astype(np.int64), deltas[nonleaf])
        writable = present & leaf & ((v & U64(RW)) != 0)
        for level, size in SIZE_OF_LEAF.items():
            sel = writable & (lv == level)
            if sel.any():
                _add_at(self._writable[size], (frame[sel] // U64(size)).astype(np.int64), deltas[sel])

    def entries(self, table: int) -> np.ndarray:
        return np.frombuffer(self.memory.read(table, PAGE), dtype="<u8")

    def close(self) -> None:
        """Drop the array views of guest memory (they pin its mappings open)."""
        self._views = []
        self._table_region = False

    # --- the auditor ------------------------------------------------------------------------------

    def audit(self) -> list[str]:
        """Every invariant, recomputed from the tables themselves; an empty list when all hold."""
        return Auditor(self).audit()


def with_accessed_dirty(levels: np.ndarray, values: np.ndarray) -> np.ndarray:
    """A copy of entries (at these levels) with A set on present ones and D on present leaves:
    what read-only tables need, since the hardware walker cannot set the bits itself."""
    stored = values.astype(U64, copy=True)
    present = (stored & U64(P)) != 0
    leaf = (levels == 1) | (((levels == 2) | (levels == 3)) & ((stored & U64(PS)) != 0))
    stored[present] |= U64(A)
    stored[present & leaf] |= U64(D)
    return stored


class _TableRegion:
    """The region holding every registered table, as the fast path indexes it."""

    def __init__(self, region: Region) -> None:
        start, size = region.gpa, region.size
        self.start, self.end, self.words = start, region.end, region.words
        # A region aligned to a power of two at least its size indexes with a mask (the page-table
        # pool is), which keeps the fast path to the few array operations it already uses.
        span = 1 << max(size - 1, 1).bit_length()
        self._mask = I64(span // 8 - 1) if start % span == 0 else None
        self._start = I64(start)
        # Stamps for entries, by slot modulo their number: a real duplicate always shares a stamp;
        # two slots that merely share one make a batch go one by one (slower, never wrong). A
        # stamp per slot of the pool would make up to 16 MiB resident (THP faults 2 MiB at a time).
        self._stamps = np.zeros(STAMPS, I64)
        self._stamp_mask = I64(STAMPS - 1)
        self._order = np.arange(4096, dtype=I64)  # positions for batches up to this size

    def slots(self, pteps: np.ndarray) -> np.ndarray:
        """Each entry address (inside the region) as an index into ``words``."""
        if self._mask is not None:
            return (pteps >> 3) & self._mask
        return (pteps - self._start) >> 3

    def has_duplicates(self, slots: np.ndarray) -> bool:
        """Whether an index may repeat: each entry stamps its slot's stamp with its position, and a
        stamp a later entry stamped too reads back another position."""
        order = self._order[:len(slots)] if len(slots) <= len(self._order) else np.arange(len(slots), dtype=I64)
        cells = slots & self._stamp_mask
        self._stamps[cells] = order
        return bool(np.count_nonzero(self._stamps.take(cells) ^ order))


@dataclass
class _Derived:
    """What the auditor derived from one table: its findings and its share of the counts."""

    level: int
    raw: bytes  # the table's bytes when derived
    problems: list[str]
    refs: np.ndarray  # frame numbers its present non-leaf entries point at (int64)
    size: int  # the leaf size of its level (0: a PML4 has no leaves)
    writable: np.ndarray  # its writable leaves, as indexes into writable[size] (int64)


_memcmp = ctypes.CDLL(None).memcmp
_memcmp.restype = ctypes.c_int
_memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)


class _Same:
    """Compares two arrays as bytes with memcmp, without copying them: the auditor compares
    whole count arrays (128 KiB each for 128 MiB of RAM) on every audit, and a copy or an
    element-wise comparison costs several times more. An array's pointer is looked up once
    (a reference to it is kept, so its memory stays valid)."""

    def __init__(self) -> None:
        self._known: dict[int, tuple[np.ndarray, int, int, object]] = {}  # id -> array, pointer, size, layout

    def _info(self, a: np.ndarray) -> tuple[np.ndarray, int, int, object]:
        found = self._known.get(id(a))
        if found is None or found[0] is not a:
            layout = (a.shape, a.dtype.str) if a.flags.c_contiguous else None
            found = self._known[id(a)] = (a, a.ctypes.data, a.nbytes, layout)
        return found

    def __call__(self, a: np.ndarray, b: np.ndarray) -> bool:
        _, pa, size, layout = self._info(a)
        _, pb, _, layout_b = self._info(b)
        if layout is None or layout != layout_b or a.shape != layout[0]:  # type: ignore[index]
            return bool(np.array_equal(a, b))
        return _memcmp(pa, pb, size) == 0


class Auditor:
    """The page-table auditor, incremental: ``audit()`` reports exactly what a full audit of
    the tables as they are now would report, but re-derives only what may have changed.

    It keeps, per registered table, the bytes it last saw, the problems found in them and
    the table's contributions to the reference and writable-mapping counts. An audit reads
    every table (one 4 KiB comparison each) and re-derives a table when its bytes differ,
    whoever wrote them (a validated update, a hypervisor bug, a guest store), or when its
    level changed; it re-checks every table's entries when the registered set changed (the
    dict and the arrays ``check_many`` reads: an entry's verdict depends on them). The counts
    it compares with the validator's are the sums of the kept contributions, compared whole,
    so a miscount anywhere is found. What the checks read besides (the memory map, the
    reserved-bit masks) is fixed when PageTables is made. A fresh Auditor is a full audit.
    """

    def __init__(self, tables: PageTables) -> None:
        self.tables = tables
        self._derived: dict[int, _Derived] = {}
        # The registered set the entry checks last saw: the level dict (and its sorted items)
        # and the bytes of the arrays check_many reads.
        self._registered: tuple[dict[int, int], list[tuple[int, int]], list[bytes]] | None = None
        self._arrays_seen = [a.copy() for a in self._arrays(tables)]  # as the last audit saw them
        self._levels_agree = True
        self._same = _Same()
        self._regions: dict[int, tuple[Region, int]] = {}  # table -> its region and offset in it
        # The counts the kept contributions add up to, and their bytes (redone when they change).
        self._refs = np.zeros_like(tables.refs)
        self._writable = {size: np.zeros_like(counts) for size, counts in tables.writable.items()}
        self.audits = 0
        self.rederived = 0  # tables derived afresh, over all audits (a full audit: every table)

    def audit(self) -> list[str]:
        t = self.tables
        self.audits += 1
        registered = self._registered
        tables_in = [t.tables_in[s].tobytes() for s in sorted(t.tables_in)]  # a few hundred bytes
        seen = self._arrays_seen
        same_set = (registered is not None and registered[0] == t.level and registered[2] == tables_in
                    and all(self._same(copy, now) for copy, now in zip(seen, self._arrays(t))))
        if not same_set:
            registered = self._registered = (dict(t.level), sorted(t.level.items()), tables_in)
            for copy, now in zip(seen, self._arrays(t)):  # into the same buffers: _Same knows their pointers
                np.copyto(copy, now)
            self._levels_agree = self._per_frame_levels_agree()
            for table in [table for table in self._derived if table not in t.level]:  # released
                self._count(self._derived.pop(table), -1)
        assert registered is not None
        recheck: list[tuple[int, int, bytes]] = []  # tables whose entries must be checked again
        for table, level in registered[1]:
            raw = self.read_page(table)
            derived = self._derived.get(table)
            if derived is None or derived.level != level or derived.raw != raw:
                if derived is not None:
                    self._count(derived, -1)
                derived = self._derive(table, level, raw)
                self._derived[table] = derived
                self._count(derived, +1)
                recheck.append((table, level, raw))
            elif not same_set:
                recheck.append((table, level, raw))
        if recheck:
            self._check(recheck)
        problems = [p for table, _ in registered[1] for p in self._derived[table].problems]
        if not self._levels_agree:
            problems.append("per-frame level tables disagree with the registered tables")
        if not self._same(t.refs, self._refs):
            problems.append("reference counts disagree with the tables")
        if any(not self._same(t.writable[s], self._writable[s]) for s in t.writable):
            problems.append("writable-mapping counts disagree with the tables")
        return problems

    def _per_frame_levels_agree(self) -> bool:
        """Whether level_of and the fast path's arrays say what the level dict says."""
        t = self.tables
        level = np.zeros(len(t.level_of) + 1, I64)
        level[[table >> 12 for table in t.level]] = list(t.level.values())
        facts = np.append(t._kind4.astype(I64) * 5, 0) + level
        return (bool(np.array_equal(t.level_of, level[:-1])) and bool(np.array_equal(t.fast_level, level << 12))
                and bool(np.array_equal(t.fast_facts, facts << 8)))

    @staticmethod
    def _arrays(t: PageTables) -> tuple[np.ndarray, ...]:
        """The per-frame arrays the entry checks read besides the level dict."""
        return t.level_of, t.fast_level, t.fast_facts

    def read_page(self, page: int) -> bytes:
        """The page's 4 KiB, as GuestMemory.read gives them (its region looked up once)."""
        found = self._regions.get(page)
        if found is None:
            region = self.tables.memory.region_for(page, PAGE)
            found = self._regions[page] = (region, page - region.gpa)
        region, offset = found
        return bytes(region.view[offset:offset + PAGE])

    def seen(self, table: int) -> bytes:
        """The bytes of a registered table as the last audit read them."""
        return self._derived[table].raw

    def _check(self, tables: list[tuple[int, int, bytes]]) -> None:
        """Every entry of these tables against the rules, in one batch; the first five problems
        of each table become its findings."""
        levels = np.repeat(np.array([level for _, level, _ in tables], np.int64), ENTRIES)
        values = np.frombuffer(b"".join(raw for _, _, raw in tables), dtype="<u8")
        errors = self.tables.check_many(levels, values).reshape(len(tables), ENTRIES)
        lacking = np.zeros(errors.shape, bool)
        if self.tables.set_accessed_dirty:
            lacking = (with_accessed_dirty(levels, values) != values).reshape(errors.shape) & (errors == 0)
        for k, (table, level, _) in enumerate(tables):
            row = values[k * ENTRIES:(k + 1) * ENTRIES]
            self._derived[table].problems = [
                f"table {table:#x} (level {level}) entry {index}: {int(row[index]):#x} "
                + (f"breaks {ERRORS[errors[k, index]]}" if errors[k, index] else "lacks the A/D bits a read-only table needs")
                for index in np.flatnonzero(errors[k] | lacking[k])[:5]]

    def _derive(self, table: int, level: int, raw: bytes) -> _Derived:
        """A table's contributions to the counts (its findings come from _check)."""
        self.rederived += 1
        values = np.frombuffer(raw, dtype="<u8")
        frame = values & U64(ADDR_MASK)
        # Present entries inside the counted range (one outside is reported as an invalid entry).
        counted = ((values & U64(P)) != 0) & (frame < U64(self.tables.limit))
        if level == 1:
            leaf = np.ones(ENTRIES, bool)
        elif level in LARGE:
            leaf = (values & U64(PS)) != 0
        else:
            leaf = np.zeros(ENTRIES, bool)
        size = SIZE_OF_LEAF.get(level, 0)
        refs = (frame[counted & ~leaf] >> U64(12)).astype(np.int64)
        rw = counted & leaf & ((values & U64(RW)) != 0)
        writable = (frame[rw] // U64(size)).astype(np.int64) if size else np.zeros(0, np.int64)
        return _Derived(level, raw, [], refs, size, writable)

    def _count(self, derived: _Derived, delta: int) -> None:
        np.add.at(self._refs, derived.refs, delta)
        if derived.size:
            np.add.at(self._writable[derived.size], derived.writable, delta)
