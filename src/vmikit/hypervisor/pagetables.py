"""The hypervisor's model of the guest's page tables, and the rules every update must keep.

``PageTables`` knows which guest pages are page tables (and of which level),
how often each table is referenced, and which frames are mapped writable. It
validates one entry at a time against that state (``check``) and applies it
(``apply``), so a batch can be checked entry by entry against the state the
earlier entries leave, and applied only if all pass (see ``check_batch``).

Errors are spec error names; see docs/paging.md for the rules.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from vmikit.memory import GuestMemory

PAGE = 0x1000
ENTRIES = 512
P, RW, US, PWT, PCD, A, D, PS = (1 << b for b in range(8))
ADDR_MASK = 0x000F_FFFF_FFFF_F000
SIZE_OF_LEAF = {1: 1 << 12, 2: 1 << 21, 3: 1 << 30}
LARGE = (2, 3)
MiB2, GiB1 = 1 << 21, 1 << 30


def is_leaf(level: int, value: int) -> bool:
    return level == 1 or (level in LARGE and bool(value & PS))


@dataclass
class PageTables:
    memory: GuestMemory
    phys_bits: int = 48
    set_accessed_dirty: bool = False  # store A (and D on leaves): the hardware cannot write read-only tables
    level: dict[int, int] = field(default_factory=dict)  # table gpa -> level 1..4
    refs: Counter[int] = field(default_factory=Counter)  # table gpa -> non-leaf entries pointing at it
    writable: Counter[int] = field(default_factory=Counter)  # (leaf size, frame) key -> writable leaves
    tables_in: Counter[int] = field(default_factory=Counter)  # 2 MiB / 1 GiB region -> registered tables in it

    @property
    def reserved_mask(self) -> int:
        return ((1 << 52) - 1) & ~((1 << self.phys_bits) - 1)

    # --- the rules -----------------------------------------------------------------

    def check(self, level: int, value: int, staged: dict[int, int] | None = None) -> str | None:
        """The error an entry with ``value`` in a table of ``level`` breaks, or None.

        ``staged`` are tables registered by earlier entries of the same batch (none today).
        """
        if not value & P:
            return None
        if value & self.reserved_mask or (level == 4 and value & PS):
            return "RESERVED_PTE_BITS"
        frame = value & ADDR_MASK
        if is_leaf(level, value):
            size = SIZE_OF_LEAF[level]
            if level in LARGE and frame & (size - 1) & ~PAGE:  # bit 12 is PAT, the rest must be 0
                return "RESERVED_PTE_BITS"
            frame &= ~(size - 1)
            kind = self.memory.kind_of(frame, size)
            if kind == "rom":
                return "PERMISSION" if value & RW else None
            if kind != "ram":
                return "BAD_ADDRESS"
            if value & RW and self._maps_a_table(frame, size):
                return "PERMISSION"
            return None
        child = self.level.get(frame)
        if child is None:
            return "NOT_PAGE_TABLE"
        if child != level - 1:
            return "WRONG_LEVEL"
        return None

    def _maps_a_table(self, frame: int, size: int) -> bool:
        if size == PAGE:
            return frame in self.level
        return self.tables_in[(size, frame)] > 0

    def can_register(self, table: int, level: int) -> str | None:
        if table % PAGE or level not in (1, 2, 3, 4):
            return "INVALID_ARGUMENT" if level not in (1, 2, 3, 4) else "BAD_ADDRESS"
        if not self.memory.is_ram(table, PAGE):
            return "BAD_ADDRESS"
        current = self.level.get(table)
        if current is not None:
            return None if current == level else "WRONG_LEVEL"
        if self.writable[(PAGE, table)] or self.writable[(MiB2, table & ~(MiB2 - 1))] or \
                self.writable[(GiB1, table & ~(GiB1 - 1))]:
            return "PERMISSION"  # it would stay writable through that mapping
        for value in self.entries(table):
            error = self.check(level, int(value))
            if error:
                return error
        return None

    def can_release(self, table: int, roots: set[int]) -> str | None:
        if table not in self.level:
            return "NOT_PAGE_TABLE"
        if self.refs[table] or table in roots:
            return "IN_USE"
        return None

    # --- state changes (only after the matching check passed) ---------------------

    def register(self, table: int, level: int) -> None:
        if table in self.level:
            return
        self.level[table] = level
        self.tables_in[(MiB2, table & ~(MiB2 - 1))] += 1
        self.tables_in[(GiB1, table & ~(GiB1 - 1))] += 1
        for value in self.entries(table):
            self._count(level, int(value), +1)

    def release(self, table: int) -> None:
        level = self.level.pop(table)
        self.tables_in[(MiB2, table & ~(MiB2 - 1))] -= 1
        self.tables_in[(GiB1, table & ~(GiB1 - 1))] -= 1
        for value in self.entries(table):
            self._count(level, int(value), -1)

    def stored(self, level: int, value: int) -> int:
        """The value actually written for a valid entry."""
        if self.set_accessed_dirty and value & P:
            value |= A | (D if is_leaf(level, value) else 0)
        return value

    def apply(self, ptep: int, value: int) -> int:
        """Write a checked entry into the table holding ``ptep``; returns the old value."""
        level = self.level[ptep & ~(PAGE - 1)]
        old = self.memory.read_u64(ptep)
        self._count(level, old, -1)
        value = self.stored(level, value)
        self._count(level, value, +1)
        self.memory.write_u64(ptep, value)
        return old

    def _count(self, level: int, value: int, delta: int) -> None:
        if not value & P:
            return
        frame = value & ADDR_MASK
        if is_leaf(level, value):
            if value & RW:
                size = SIZE_OF_LEAF[level]
                self.writable[(size, frame & ~(size - 1))] += delta
        else:
            self.refs[frame] += delta

    def entries(self, table: int) -> np.ndarray:
        return np.frombuffer(self.memory.read(table, PAGE), dtype="<u8")

    # --- the auditor ------------------------------------------------------------------

    def audit(self) -> list[str]:
        """Every invariant, recomputed from the tables themselves; an empty list when all hold."""
        problems: list[str] = []
        refs: Counter[int] = Counter()
        writable: Counter[int] = Counter()
        for table, level in sorted(self.level.items()):
            values = self.entries(table)
            for index in np.flatnonzero(values & P):
                value = int(values[index])
                error = self.check(level, value)
                if error:
                    problems.append(f"table {table:#x} (level {level}) entry {index}: {value:#x} breaks {error}")
                if is_leaf(level, value):
                    if value & RW:
                        size = SIZE_OF_LEAF[level]
                        writable[(size, value & ADDR_MASK & ~(size - 1))] += 1
                else:
                    refs[value & ADDR_MASK] += 1
        if +refs != +self.refs:
            problems.append("reference counts disagree with the tables")
        if +writable != +self.writable:
            problems.append("writable-mapping counts disagree with the tables")
        return problems
