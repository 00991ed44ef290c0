"""CPU family (0x01): CPUID, MSRs, control and debug registers, halt and shutdown."""

from __future__ import annotations

from vmikit.engine import StopRun
from vmikit.hypervisor.execution import MSR_GS_BASE
from vmikit.hypervisor.context import CallContext, HypercallError
from vmikit.hypervisor.registry import FamilyHandlers
from vmikit.hypervisor.walk import is_canonical

HANDLERS = FamilyHandlers("CPU")

# Spec calls this hypervisor leaves out (QueryCall says so; the dispatcher answers NOT_SUPPORTED):
# Reboot (the board has no reset) and RDPMC (no virtual PMU).
UNIMPLEMENTED = frozenset({"CPU.Reboot", "CPU.RDPMC"})

CR0_PE, CR0_TS, CR0_PG = 1 << 0, 1 << 3, 1 << 31
CR4_PAE = 1 << 5
RFLAGS_IF = 1 << 9
MSR_TSC = 0x10
MSR_EFER = 0xC0000080
ADDR_MASK_CR3 = 0x000F_FFFF_FFFF_FFFF  # bits 63-52 of CR3 are reserved (no PCID here)
EFER_SCE, EFER_LME, EFER_LMA, EFER_NXE = 1 << 0, 1 << 8, 1 << 10, 1 << 11

# MSRs a guest kernel may write through WRMSR: its own syscall, segment-base and PAT state.
# Everything else (EFER's mode bits, APIC base, hypervisor-owned MSRs) is PERMISSION.
WRITABLE_MSRS = frozenset({
    0x174, 0x175, 0x176,  # SYSENTER_CS/ESP/EIP
    0x277,  # PAT
    0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084,  # STAR, LSTAR, CSTAR, SFMASK
    0xC0000100, 0xC0000101, 0xC0000102, 0xC0000103,  # FS_BASE, GS_BASE, KERNEL_GS_BASE, TSC_AUX
})
DEBUG_REGISTERS = frozenset({0, 1, 2, 3, 6, 7})


@HANDLERS.call("CPUID")
def cpuid(ctx: CallContext, leaf: int, subleaf: int, _: int) -> tuple[int, ...]:
    return ctx.vcpu.cpuid(leaf & 0xFFFFFFFF, subleaf & 0xFFFFFFFF)


@HANDLERS.call("RDTSC")
def rdtsc(ctx: CallContext, *_: int) -> tuple[int, ...]:
    value = ctx.vcpu.get_msr(MSR_TSC)
    if value is None:
        raise HypercallError("NOT_SUPPORTED")
    return (value,)


@HANDLERS.call("RDMSR")
def rdmsr(ctx: CallContext, msr: int, *_: int) -> tuple[int, ...]:
    execution = ctx.hypervisor.deprivileged
    virtual = execution.read_msr(msr) if execution is not None and msr <= 0xFFFFFFFF else None
    if virtual is not None:
        return (virtual,)
    value = ctx.vcpu.get_msr(msr & 0xFFFFFFFF) if msr <= 0xFFFFFFFF else None
    if value is None:
        raise HypercallError("INVALID_ARGUMENT")
    return (value,)


@HANDLERS.call("WRMSR")
def wrmsr(ctx: CallContext, msr: int, value: int, _: int) -> tuple[int, ...]:
    if msr == MSR_EFER:
        current = ctx.vcpu.get_msr(MSR_EFER) or 0
        if (value ^ current) & ~(EFER_SCE | EFER_NXE):  # LME/LMA and reserved bits are the hypervisor's
            raise HypercallError("PERMISSION")
    elif msr not in WRITABLE_MSRS or (msr == MSR_GS_BASE and ctx.hypervisor.percpu):
        raise HypercallError("PERMISSION")  # under an SMP ROM the GS base leads it to its per-CPU area
    execution = ctx.hypervisor.deprivileged
    if execution is not None and execution.write_msr(msr, value):
        return ()
    if not ctx.vcpu.set_msr(msr, value):
        raise HypercallError("INVALID_ARGUMENT")  # e.g. a non-canonical base address
    return ()


def _get(name: str):
    def handler(ctx: CallContext, *_: int) -> tuple[int, ...]:
        return (getattr(ctx.vcpu.get_control(), name),)

    return handler


for _reg in ("cr0", "cr2", "cr4"):
    HANDLERS.call(f"Get{_reg.upper()}")(_get(_reg))


@HANDLERS.call("GetCR3")
def get_cr3(ctx: CallContext, *_: int) -> tuple[int, ...]:
    return (ctx.hypervisor.mmu.guest_cr3(ctx.vcpu.get_control().cr3),)  # shadow: the guest's root


def _set_control(ctx: CallContext, *, cr0: int | None = None, cr2: int | None = None, cr3: int | None = None,
                 cr4: int | None = None) -> tuple[int, ...]:
    try:
        ctx.vcpu.set_control(cr0=cr0, cr2=cr2, cr3=cr3, cr4=cr4)
    except ValueError:
        raise HypercallError("INVALID_ARGUMENT") from None
    return ()


@HANDLERS.call("SetCR0")
def set_cr0(ctx: CallContext, value: int, *_: int) -> tuple[int, ...]:
    current = ctx.vcpu.get_control().cr0
    if value >> 32:
        raise HypercallError("INVALID_ARGUMENT")
    if (current & CR0_PG) and not (value & CR0_PG and value & CR0_PE):
        raise HypercallError("PERMISSION")  # leaving paging/protected mode would drop long mode under us
    return _set_control(ctx, cr0=value)


@HANDLERS.call("SetCR2")
def set_cr2(ctx: CallContext, value: int, *_: int) -> tuple[int, ...]:
    _set_control(ctx, cr2=value)
    execution = ctx.hypervisor.deprivileged
    if execution is not None:
        execution.put_cr2(value)  # what the guest reads without an exit
    return ()


@HANDLERS.call("SetCR3")
def set_cr3(ctx: CallContext, root: int, *_: int) -> tuple[int, ...]:
    if root >> 52:
        raise HypercallError("INVALID_ARGUMENT")
    return _set_control(ctx, cr3=ctx.hypervisor.mmu.load_cr3(root))


@HANDLERS.call("SetCR4")
def set_cr4(ctx: CallContext, value: int, *_: int) -> tuple[int, ...]:
    if value >> 32:
        raise HypercallError("INVALID_ARGUMENT")
    if ctx.vcpu.get_control().efer & EFER_LMA and not value & CR4_PAE:
        raise HypercallError("PERMISSION")  # long mode requires PAE
    return _set_control(ctx, cr4=value)


@HANDLERS.call("CLTS")
def clts(ctx: CallContext, *_: int) -> tuple[int, ...]:
    return _set_control(ctx, cr0=ctx.vcpu.get_control().cr0 & ~CR0_TS)


@HANDLERS.call("WBINVD")
def wbinvd(ctx: CallContext, *_: int) -> tuple[int, ...]:
    return ()  # the host keeps guest memory coherent: nothing to write back


@HANDLERS.call("Halt")
def halt(ctx: CallContext, *_: int) -> tuple[int, ...]:
    # Since 1.4: sleep until an event can be delivered (hypervisor/events.py). With nothing armed
    # that could wake it (or before 1.4) Halt returns at once: callers loop on their condition,
    # as after a spurious wake-up.
    # Several vCPUs: events go to vCPU 0, whose sleep lets the others' exits be handled; an AP's
    # Halt returns at once (nothing is delivered to it).
    hv = ctx.hypervisor
    if hv.events is not None and hv.cpu_index == 0:
        with hv.others_may_run():
            hv.events.halt()
    return ()


@HANDLERS.call("Shutdown")
def shutdown(ctx: CallContext, code: int, *_: int) -> tuple[int, ...]:
    raise StopRun(code & 0xFFFFFFFF)


@HANDLERS.call("GetDR")
def get_dr(ctx: CallContext, reg: int, *_: int) -> tuple[int, ...]:
    if reg not in DEBUG_REGISTERS:
        raise HypercallError("INVALID_ARGUMENT")
    return (ctx.vcpu.get_debugreg(reg),)


@HANDLERS.call("SetDR")
def set_dr(ctx: CallContext, reg: int, value: int, _: int) -> tuple[int, ...]:
    if reg not in DEBUG_REGISTERS or (reg in (6, 7) and value >> 32):
        raise HypercallError("INVALID_ARGUMENT")
    try:
        ctx.vcpu.set_debugreg(reg, value)
    except ValueError:
        raise HypercallError("INVALID_ARGUMENT") from None
    return ()


def _set_if(ctx: CallContext, enabled: bool) -> tuple[int, ...]:
    events = ctx.hypervisor.events
    if events is not None and ctx.hypervisor.cpu_index == 0:  # events go to vCPU 0
        ctx.hypervisor.execution_model().set_vif(enabled)  # the events' mask, at either privilege
        events.signal = enabled  # unmasking with an event pending: the return delivers it
    execution = ctx.hypervisor.deprivileged
    if execution is not None:  # the interrupt flag is virtual: the shared page's
        execution.set_vif(enabled)
        return ()
    regs = ctx.vcpu.regs
    regs.rflags = (regs.rflags | RFLAGS_IF) if enabled else (regs.rflags & ~RFLAGS_IF)
    return ()  # the dispatcher marks the registers dirty


@HANDLERS.call("EnableInterrupts")
def enable_interrupts(ctx: CallContext, *_: int) -> tuple[int, ...]:
    return _set_if(ctx, True)


@HANDLERS.call("DisableInterrupts")
def disable_interrupts(ctx: CallContext, *_: int) -> tuple[int, ...]:
    return _set_if(ctx, False)


@HANDLERS.call("GetInterruptMask")
def get_interrupt_mask(ctx: CallContext, *_: int) -> tuple[int, ...]:
    execution = ctx.hypervisor.deprivileged
    if execution is not None:
        return (RFLAGS_IF if execution.vif else 0,)
    return (ctx.vcpu.regs.rflags & RFLAGS_IF,)


@HANDLERS.call("SetInterruptMask")
def set_interrupt_mask(ctx: CallContext, flags: int, *_: int) -> tuple[int, ...]:
    return _set_if(ctx, bool(flags & RFLAGS_IF))


@HANDLERS.call("Deprivilege")
def deprivilege(ctx: CallContext, *_: int) -> tuple[int, ...]:
    execution = ctx.hypervisor.execution
    if execution is None:
        raise HypercallError("NOT_SUPPORTED")
    return execution.deprivilege()


@HANDLERS.call("ReturnToUser")
def return_to_user(ctx: CallContext, rip: int, rsp: int, rflags: int) -> tuple[int, ...]:
    execution = ctx.hypervisor.execution
    if execution is None:
        raise HypercallError("NOT_SUPPORTED")
    return execution.return_to_user(rip, rsp, rflags)


AP_STATE_SIZE = 32  # SetInitialAPState: u64 rip, rsp, arg, cr3


@HANDLERS.call("SetInitialAPState")
def set_initial_ap_state(ctx: CallContext, cpu: int, state: int, _: int) -> tuple[int, ...]:
    if not ctx.memory.is_ram(state, AP_STATE_SIZE):
        raise HypercallError("BAD_ADDRESS")
    rip, rsp, arg, cr3 = (ctx.memory.read_u64(state + 8 * i) for i in range(4))
    if not (is_canonical(rip) and is_canonical(rsp)) or cr3 & ~ADDR_MASK_CR3:
        raise HypercallError("INVALID_ARGUMENT")
    if cr3 and not ctx.memory.is_ram(cr3 & ~0xFFF, 4096):
        raise HypercallError("BAD_ADDRESS")
    ctx.hypervisor.start_ap(cpu, rip, rsp, arg, cr3)
    return ()


@HANDLERS.call("GetCPUInfo")
def get_cpu_info(ctx: CallContext, *_: int) -> tuple[int, ...]:
    return ctx.hypervisor.cpu_index, ctx.hypervisor.cpu_count


@HANDLERS.call("IODelay")
def io_delay(ctx: CallContext, *_: int) -> tuple[int, ...]:
    return ()  # the exit itself is delay enough
