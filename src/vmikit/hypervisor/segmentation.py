"""Segmentation family (0x02): descriptor tables, task register, kernel stack.

Table bases are guest-virtual: they are translated through the guest's page
tables and every byte written must land in guest RAM.
"""

from __future__ import annotations

from vmikit.engine import ControlState, DescriptorTable, Segment
from vmikit.hypervisor.context import CallContext, HypercallError
from vmikit.hypervisor.execution import ExecutionModel
from vmikit.hypervisor.registry import FamilyHandlers
from vmikit.hypervisor.walk import guest_gpa

HANDLERS = FamilyHandlers("Segmentation")

SYS_LDT, SYS_TSS_AVAILABLE, SYS_TSS_BUSY = 0x2, 0x9, 0xB
SYS_CALL_GATE, SYS_INTERRUPT_GATE, SYS_TRAP_GATE = 0xC, 0xE, 0xF
LONG_MODE_SYSTEM_TYPES = frozenset({SYS_LDT, SYS_TSS_AVAILABLE, SYS_TSS_BUSY, SYS_CALL_GATE,
                                    SYS_INTERRUPT_GATE, SYS_TRAP_GATE})
TSS_RSP0_OFFSET = 4


def _gva_to_gpa(ctx: CallContext, va: int, length: int) -> int:
    """The gpa of [va, va+length): one page of RAM the guest could write itself (walk.guest_gpa)."""
    return guest_gpa(ctx.memory, ctx.vcpu.get_control(), va, length, ctx.hypervisor.mmu.is_table)


def _check_table(ctx: CallContext, base: int, limit: int) -> DescriptorTable:
    if limit > 0xFFFF:
        raise HypercallError("INVALID_ARGUMENT")
    for page in range(base & ~0xFFF, base + limit + 1, 0x1000):  # every page of the table must be RAM
        _gva_to_gpa(ctx, page, 1)
    return DescriptorTable(base, limit)


def _state(ctx: CallContext) -> ControlState | ExecutionModel:
    """Where the guest's GDTR, IDTR, LDTR and TR live: the CPU's, or (a deprivileged kernel,
    which runs on the hypervisor's tables) the execution model's virtual copies."""
    return ctx.hypervisor.deprivileged or ctx.vcpu.get_control()


def _set_tables(ctx: CallContext, **tables: DescriptorTable | Segment) -> tuple[int, ...]:
    execution = ctx.hypervisor.deprivileged
    if execution is not None:
        for name, value in tables.items():
            setattr(execution, name, value)
        if "ldt" in tables:
            execution.mirror_ldt()
        return ()
    try:
        ctx.vcpu.set_control(**tables)  # type: ignore[arg-type]
    except ValueError:
        raise HypercallError("INVALID_ARGUMENT") from None
    return ()


@HANDLERS.call("SetGDT")
def set_gdt(ctx: CallContext, base: int, limit: int, _: int) -> tuple[int, ...]:
    return _set_tables(ctx, gdt=_check_table(ctx, base, limit))


@HANDLERS.call("SetIDT")
def set_idt(ctx: CallContext, base: int, limit: int, _: int) -> tuple[int, ...]:
    return _set_tables(ctx, idt=_check_table(ctx, base, limit))


@HANDLERS.call("GetGDT")
def get_gdt(ctx: CallContext, *_: int) -> tuple[int, ...]:
    gdt = _state(ctx).gdt
    return gdt.base, gdt.limit


@HANDLERS.call("GetIDT")
def get_idt(ctx: CallContext, *_: int) -> tuple[int, ...]:
    idt = _state(ctx).idt
    return idt.base, idt.limit


def _entry_gpa(ctx: CallContext, table: DescriptorTable, index: int, size: int) -> int:
    if index > 0x1FFF or index * 8 + size - 1 > table.limit:
        raise HypercallError("INVALID_ARGUMENT")
    return _gva_to_gpa(ctx, table.base + index * 8, size)


def _system_descriptor(ctx: CallContext, selector: int, want: set[int]) -> tuple[Segment, int]:
    """The 16-byte system descriptor a selector names in the GDT, and its gpa."""
    if selector & 0x4 or selector > 0xFFFF or selector < 8:  # must be a non-null GDT selector
        raise HypercallError("INVALID_ARGUMENT")
    gpa = _entry_gpa(ctx, _state(ctx).gdt, selector >> 3, 16)
    low, high = ctx.memory.read_u64(gpa), ctx.memory.read_u64(gpa + 8)
    type_ = (low >> 40) & 0xF
    present = bool(low >> 47 & 1)
    if (low >> 44) & 1 or type_ not in want or not present:
        raise HypercallError("INVALID_ARGUMENT")
    base = ((low >> 16) & 0xFFFFFF) | (((low >> 56) & 0xFF) << 24) | ((high & 0xFFFFFFFF) << 32)
    limit = (low & 0xFFFF) | (((low >> 48) & 0xF) << 16)
    granular = bool(low >> 55 & 1)
    if granular:
        limit = (limit << 12) | 0xFFF
    return Segment(selector=selector, base=base, limit=limit, type=type_, present=True,
                   dpl=(low >> 45) & 3, g=granular), gpa


@HANDLERS.call("SetLDT")
def set_ldt(ctx: CallContext, selector: int, *_: int) -> tuple[int, ...]:
    if selector == 0:
        return _set_tables(ctx, ldt=Segment(selector=0, base=0, limit=0, type=SYS_LDT, present=False))
    segment, _gpa = _system_descriptor(ctx, selector, {SYS_LDT})
    return _set_tables(ctx, ldt=segment)


@HANDLERS.call("SetTR")
def set_tr(ctx: CallContext, selector: int, *_: int) -> tuple[int, ...]:
    segment, gpa = _system_descriptor(ctx, selector, {SYS_TSS_AVAILABLE})
    if segment.limit < 0x67:  # a long-mode TSS is at least 104 bytes
        raise HypercallError("INVALID_ARGUMENT")
    busy = Segment(**{**segment.__dict__, "type": SYS_TSS_BUSY})
    _set_tables(ctx, tr=busy)
    low = ctx.memory.read_u64(gpa)
    ctx.memory.write_u64(gpa, low | (0x2 << 40))  # mark the descriptor busy, as LTR does
    return ()


@HANDLERS.call("GetLDT")
def get_ldt(ctx: CallContext, *_: int) -> tuple[int, ...]:
    return (_state(ctx).ldt.selector,)


@HANDLERS.call("GetTR")
def get_tr(ctx: CallContext, *_: int) -> tuple[int, ...]:
    return (_state(ctx).tr.selector,)


def _check_descriptor(low: int, high: int, *, gate_only: bool) -> int:
    """Size in bytes (8 or 16) of a valid descriptor; INVALID_ARGUMENT otherwise."""
    present = low >> 47 & 1
    system = not (low >> 44 & 1)
    type_ = (low >> 40) & 0xF
    if gate_only:
        if present and type_ not in (SYS_INTERRUPT_GATE, SYS_TRAP_GATE):
            raise HypercallError("INVALID_ARGUMENT")
        if high >> 32 or (present and system is False):
            raise HypercallError("INVALID_ARGUMENT")
        if present and ((low >> 16) & 0xFFFF) < 8:  # a gate must name a non-null code selector
            raise HypercallError("INVALID_ARGUMENT")
        return 16
    if system and present:
        if type_ not in LONG_MODE_SYSTEM_TYPES or high >> 32:
            raise HypercallError("INVALID_ARGUMENT")
        return 16
    if high:
        raise HypercallError("INVALID_ARGUMENT")  # code/data descriptors are 8 bytes
    return 8


def _write_entry(ctx: CallContext, table: DescriptorTable, index: int, low: int, high: int, gate: bool) -> tuple[int, ...]:
    if index == 0 and not gate:
        raise HypercallError("INVALID_ARGUMENT")  # the null descriptor stays null
    size = _check_descriptor(low, high, gate_only=gate)
    gpa = _entry_gpa(ctx, table, index * (2 if gate else 1), size)
    ctx.memory.write_u64(gpa, low)
    if size == 16:
        ctx.memory.write_u64(gpa + 8, high)
    return ()


@HANDLERS.call("WriteGDTEntry")
def write_gdt_entry(ctx: CallContext, index: int, low: int, high: int) -> tuple[int, ...]:
    return _write_entry(ctx, _state(ctx).gdt, index, low, high, gate=False)


@HANDLERS.call("WriteIDTEntry")
def write_idt_entry(ctx: CallContext, index: int, low: int, high: int) -> tuple[int, ...]:
    if index > 0xFF:
        raise HypercallError("INVALID_ARGUMENT")
    return _write_entry(ctx, _state(ctx).idt, index, low, high, gate=True)


@HANDLERS.call("WriteLDTEntry")
def write_ldt_entry(ctx: CallContext, index: int, low: int, high: int) -> tuple[int, ...]:
    ldt = _state(ctx).ldt
    if not ldt.present:
        raise HypercallError("INVALID_ARGUMENT")
    result = _write_entry(ctx, DescriptorTable(ldt.base, ldt.limit), index, low, high, gate=False)
    execution = ctx.hypervisor.deprivileged
    if execution is not None:
        execution.mirror_ldt()  # the hardware's copy follows the guest's table
    return result


@HANDLERS.call("UpdateKernelStack")
def update_kernel_stack(ctx: CallContext, stack: int, *_: int) -> tuple[int, ...]:
    tr = _state(ctx).tr
    if not tr.present or tr.limit < TSS_RSP0_OFFSET + 7:
        raise HypercallError("INVALID_ARGUMENT")
    ctx.memory.write_u64(_gva_to_gpa(ctx, tr.base + TSS_RSP0_OFFSET, 8), stack)
    return ()
