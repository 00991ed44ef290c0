"""Guest-virtual to guest-physical translation by walking the guest's 4-level tables.

Used to check gva arguments (descriptor-table bases, the TSS). Every table read is
bounds-checked; a walk that leaves guest RAM is simply a failed translation.
"""

from __future__ import annotations

from collections.abc import Callable

from vmikit.engine import ControlState
from vmikit.hypervisor.context import HypercallError
from vmikit.memory import GuestMemory, GuestMemoryError

PTE_P = 1 << 0
PTE_PS = 1 << 7
ADDR_MASK = 0x000F_FFFF_FFFF_F000
CR0_PG = 1 << 31


def is_canonical(va: int) -> bool:
    upper = va >> 47
    return upper == 0 or upper == (1 << 17) - 1


def translate(memory: GuestMemory, cr0: int, cr3: int, va: int) -> int | None:
    """The gpa for ``va`` under ``cr3`` (identity when paging is off), or None when unmapped."""
    if not cr0 & CR0_PG:
        return va if va < 1 << 32 else None
    if not is_canonical(va):
        return None  # the CPU would fault on it: bits 63..47 must all equal bit 47
    table = cr3 & ADDR_MASK
    for level, shift in ((4, 39), (3, 30), (2, 21), (1, 12)):
        index = (va >> shift) & 0x1FF
        try:
            entry = memory.read_u64(table + 8 * index)
        except GuestMemoryError:
            return None
        if not entry & PTE_P:
            return None
        if level in (3, 2) and entry & PTE_PS:
            page_mask = (1 << shift) - 1
            return (entry & ADDR_MASK & ~page_mask) | (va & page_mask)
        table = entry & ADDR_MASK
    return table | (va & 0xFFF)


def guest_gpa(memory: GuestMemory, control: ControlState, va: int, length: int,
              is_table: Callable[[int], bool]) -> int:
    """The gpa of [va, va+length) for the hypervisor to read or write on the guest's behalf
    (descriptor tables, the TSS, exception frames): within one page, RAM (BAD_ADDRESS otherwise),
    and memory the guest could write itself, never a page table or a page read-only to it (the
    pool under trap, direct and shadow paging) (PERMISSION). A write there would put values into
    a table, or a page about to become one, that nothing validated (found by fuzzing)."""
    if (va & 0xFFF) + length > 0x1000:
        raise HypercallError("BAD_ADDRESS")
    gpa = translate(memory, control.cr0, control.cr3, va)
    if gpa is None or not memory.is_ram(gpa, length):
        raise HypercallError("BAD_ADDRESS")
    if is_table(gpa & ~0xFFF) or not memory.writable_by_guest(gpa, length):
        raise HypercallError("PERMISSION")
    return gpa
