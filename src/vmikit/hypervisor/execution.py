"""The VMI execution model: who owns ring 0 (docs/execution-model.md).

``ring0``: the guest kernel keeps hardware ring 0 (vmikit before 1.3); the hardware CPL tells
kernel from user, and user mode may make only the spec's user-safe calls.

``deprivileged`` (the default under a ROM): from CPU.Deprivilege on the kernel runs at
hardware ring 3 and the hypervisor owns what ring 0 owns. The hardware uses the monitor's
GDT, IDTs and TSS (a read-only area at ``layout.MONITOR_BASE``); the guest's own tables,
TR, LDT and syscall MSRs become virtual state kept here. Every exception lands on a monitor
stub (``out`` to ``layout.PORT_EVENT``), so the hypervisor sees it, and is reflected to the
gate of the guest's own IDT with the frame the CPU pushed; ``syscall`` lands on a ring-0
stub and is reflected to the guest's LSTAR. The hypervisor keeps a virtual privilege level:
the kernel enters user mode through CPU.ReturnToUser and comes back by an exception or
``syscall``, both of which it sees. State the guest reads often (CR2, the virtual interrupt
flag) lives in the shared page (spec ``[shared]``) at ``layout.SHARED_PAGE``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from vmikit.abi.model import Spec
from vmikit.engine import ControlState, DescriptorTable, Segment, Vcpu
from vmikit.engine.base import CrashRun
from vmikit.hypervisor.context import HypercallError
from vmikit.hypervisor.walk import guest_gpa, is_canonical
from vmikit.machine import layout
from vmikit.memory import GuestMemory, GuestMemoryError

PRIVILEGES = ("deprivileged", "ring0")
KERNEL, USER = 0, 3

# The monitor GDT, laid out as a 64-bit Linux kernel lays out its own (syscall/sysret order).
KERNEL_CS, KERNEL_SS = 0x08 | 3, 0x10 | 3  # the guest kernel's 0x08/0x10, ring-compressed to DPL 3
MONITOR_CS, MONITOR_SS = 0x18, 0x20  # ring 0: only the syscall stub ever runs there
USER_SS, USER_CS = 0x28 | 3, 0x30 | 3
TSS_SELECTOR = 0x38
GDT_LIMIT = 0x47

# Offsets in the monitor area.
GDT_OFFSET, KERNEL_IDT_OFFSET, USER_IDT_OFFSET, TSS_OFFSET = 0x0000, 0x1000, 0x2000, 0x3000
STUBS_OFFSET, SYSCALL_STUB_OFFSET, LDT_OFFSET = 0x6000, 0x6800, 0x7000
LDT_MAX = 0x1000  # the hardware LDT: a ring-compressed copy of (the first 512 entries of) the guest's
STUB_SIZE = 8
# One TSS per vCPU (its own IST1 stack), 0x80 apart from TSS_OFFSET, all sharing one all-zero I/O
# bitmap (which lets every port exit to the VMM) at IOBITMAP_OFFSET: each TSS's I/O map base is
# the bitmap's distance from it, its limit the byte after the bitmap (0xFF), inside the area.
TSS_STRIDE = 0x80
IOBITMAP_OFFSET = TSS_OFFSET + TSS_STRIDE * layout.MAX_CPUS
IOBITMAP_SIZE = 8192
TSS_IST1 = 0x24


def tss_offset(cpu: int) -> int:
    return TSS_OFFSET + cpu * TSS_STRIDE


def tss_limit(cpu: int) -> int:
    return IOBITMAP_OFFSET - tss_offset(cpu) + IOBITMAP_SIZE

# `out %al, $PORT_EVENT; ud2`: the hypervisor always moves RIP on; ud2 only if it could not.
_STUB = bytes([0xE6, layout.PORT_EVENT, 0x0F, 0x0B]) + bytes([0x90] * (STUB_SIZE - 4))
ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})
VECTOR_GP, VECTOR_UD, VECTOR_PF = 13, 6, 14
GATE_INTERRUPT, GATE_TRAP = 0xE, 0xF

MSR_EFER, MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_SFMASK = 0xC0000080, 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084
MSR_SYSENTER_CS, MSR_SYSENTER_ESP, MSR_SYSENTER_EIP = 0x174, 0x175, 0x176
MSR_GS_BASE = 0xC0000101
# The syscall MSRs are the hypervisor's under a deprivileged kernel: the guest's are virtual.
VIRTUAL_MSRS = frozenset({MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_SFMASK, MSR_SYSENTER_CS, MSR_SYSENTER_ESP,
                          MSR_SYSENTER_EIP})
EFER_SCE = 1 << 0
RFLAGS_IF, RFLAGS_TF = 1 << 9, 1 << 8
RFLAGS_USER = 0xCD5  # CF PF AF ZF SF DF OF: what ReturnToUser keeps besides IF
RFLAGS_FIXED = 0x2
MONITOR_SFMASK = 0x44700  # TF DF IF NT AC: the ring-0 stub runs with nothing of the caller's


def _code64(dpl: int) -> int:
    return 0x00AF9B000000FFFF | dpl << 45  # present, accessed (the CPU never writes the GDT)


def _data(dpl: int) -> int:
    return 0x00CF93000000FFFF | dpl << 45


def _gate(handler: int, ist: int) -> tuple[int, int]:
    # Trap gates: delivery must not clear IF, which a ring-3 iretq could never set again.
    low = (handler & 0xFFFF) | KERNEL_CS << 16 | ist << 32 | (0x80 | GATE_TRAP) << 40 | ((handler >> 16) & 0xFFFF) << 48
    return low, handler >> 32


def _monitor_msrs(efer: int) -> dict[int, int]:
    """The syscall MSRs a deprivileged kernel's vCPU runs with: syscall lands on the monitor's stub."""
    base = layout.MONITOR_BASE
    return {MSR_STAR: MONITOR_CS << 32 | (USER_SS - 8 - 3) << 48,
            MSR_LSTAR: base + SYSCALL_STUB_OFFSET, MSR_CSTAR: base + SYSCALL_STUB_OFFSET,
            MSR_SFMASK: MONITOR_SFMASK, MSR_SYSENTER_CS: 0, MSR_EFER: efer | EFER_SCE}


def _segment(selector: int, code: bool, dpl: int) -> Segment:
    return Segment(selector=selector, base=0, limit=0xFFFFFFFF, type=0xB if code else 0x3, present=True,
                   dpl=dpl, db=not code, s=True, l=code, g=True)


@dataclass
class ExecutionStats:
    exceptions: int = 0  # reflected to the guest kernel
    syscalls: int = 0
    user_entries: int = 0  # ReturnToUser
    user_refused: int = 0  # calls from user mode answered PERMISSION
    flushes: int = 0  # translation flushes (engine.flush_translations)
    flush_seconds: float = 0.0
    by_vector: dict[int, int] = field(default_factory=dict)
    by_kind: dict[str, int] = field(default_factory=dict)  # flushes: "frames" (targeted) or "all"

    def summary(self) -> dict[str, object]:
        return {"exceptions": self.exceptions, "by_vector": {str(v): n for v, n in sorted(self.by_vector.items())},
                "syscalls": self.syscalls, "user_entries": self.user_entries, "user_refused": self.user_refused,
                "flushes": self.flushes, "flushes_by_kind": dict(self.by_kind),
                "flush_us_mean": round(self.flush_seconds / self.flushes * 1e6, 1) if self.flushes else None}


class ExecutionModel:
    """One vCPU's privilege state: the hardware ring of its kernel and the virtual level."""

    def __init__(self, privilege: str, spec: Spec, memory: GuestMemory, vcpu: Vcpu,
                 flush_translations: Callable[[list[tuple[int, int]]], str],
                 is_table: Callable[[int], bool] = lambda page: False, *, cpu: int = 0,
                 percpu: bool = False) -> None:
        # percpu: an SMP ROM, whose per-CPU areas (layout.PERCPU_*) hold this vCPU's shared page
        # and which finds its area through the GS base this model loads (docs/smp.md).
        if privilege not in PRIVILEGES:
            raise ValueError(f"unknown privilege {privilege!r}")
        self.privilege = privilege
        self.memory = memory
        self.vcpu = vcpu
        self.cpu = cpu
        self.percpu = percpu
        self._flush = flush_translations
        self._is_table = is_table  # the MMU's: frames and stacks the hypervisor writes are never tables
        self.shared = spec.shared
        self.shared_page = layout.percpu_area(cpu) + layout.PERCPU_SHARED if percpu else layout.SHARED_PAGE
        self._tss = layout.MONITOR_BASE + tss_offset(cpu)
        # Shared-page fields by name: (gpa, size), looked up once (exceptions write them).
        self._fields = {f.name: (self.shared_page + f.offset, 8 if f.type == "u64" else 4)
                        for f in (spec.shared.fields if spec.shared is not None else ())}
        self.deprivileged = False  # True from a successful Deprivilege on
        self.vpl = KERNEL
        self.stats = ExecutionStats()
        # The guest's own state, virtual while deprivileged (the hardware has the monitor's).
        self.gdt = DescriptorTable(0, 0)
        self.idt = DescriptorTable(0, 0)
        self.ldt = Segment(selector=0, base=0, limit=0, type=2, present=False)
        self.tr = Segment(selector=0, base=0, limit=0, type=0xB, present=False)
        self.msrs: dict[int, int] = {}
        self.sce = False
        self._ist1 = 0

    # --- the shared page ------------------------------------------------------

    def _put(self, name: str, value: int) -> None:
        where = self._fields.get(name)
        if where is None:
            return
        gpa, size = where
        self.memory.write(gpa, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))

    def _get(self, name: str) -> int:
        gpa, size = self._fields[name]
        return int.from_bytes(self.memory.read(gpa, size), "little")

    @property
    def vif(self) -> bool:
        return bool(self._get("vif")) if self.shared is not None else False

    def set_vif(self, enabled: bool) -> None:
        self._put("vif", int(enabled))

    def set_pending(self, pending: bool) -> None:
        self._put("pending", int(pending))

    def put_cr2(self, value: int) -> None:
        self._put("cr2", value)

    # --- who is calling ---------------------------------------------------------

    def user_mode(self) -> bool:
        """Whether the guest is in its user mode: the virtual level, or (ring0) the hardware CPL."""
        if self.deprivileged:
            return self.vpl == USER
        return self.privilege == "ring0" and self.vcpu.cpl() == 3

    # --- translations -----------------------------------------------------------

    def flush(self, stale: list[tuple[int, int]]) -> None:
        """After the VMM changed present page-table entries: KVM's cached translations to
        the ``stale`` ranges must go (a deprivileged kernel runs on KVM's shadow tables, which
        never see the VMM's writes). The engine drops just those, or everything."""
        start = time.perf_counter()
        how = self._flush(stale)
        self.stats.flush_seconds += time.perf_counter() - start
        self.stats.flushes += 1
        self.stats.by_kind[how] = self.stats.by_kind.get(how, 0) + 1

    def flush_all(self) -> None:
        """Drop every cached translation, for every vCPU (a cross-CPU TLB flush)."""
        self.flush([(0, 1 << 40)])  # an unbounded range: the engine drops them all

    # --- entering the model -----------------------------------------------------

    def _write_monitor(self) -> None:
        """The monitor's shared tables (the same bytes whichever vCPU writes them first) and this
        vCPU's own TSS; the GDT's TSS descriptor is CPU 0's (each TR holds its own base and limit,
        loaded through the engine: no vCPU ever runs ltr)."""
        base = layout.MONITOR_BASE
        gdt = [0, _code64(3), _data(3), _code64(0), _data(0), _data(3), _code64(3)]
        tss_base, limit = base + tss_offset(0), tss_limit(0)
        tss_low = (limit & 0xFFFF) | (tss_base & 0xFFFFFF) << 16 | 0x8B << 40 | ((limit >> 16) & 0xF) << 48 \
            | ((tss_base >> 24) & 0xFF) << 56
        gdt += [tss_low, tss_base >> 32]
        self.memory.write(base + GDT_OFFSET, b"".join(v.to_bytes(8, "little") for v in gdt))
        for offset, ist in ((KERNEL_IDT_OFFSET, 0), (USER_IDT_OFFSET, 1)):
            gates = [_gate(base + STUBS_OFFSET + v * STUB_SIZE, ist) for v in range(256)]
            self.memory.write(base + offset, b"".join(lo.to_bytes(8, "little") + hi.to_bytes(8, "little")
                                                      for lo, hi in gates))
        self.memory.write(base + IOBITMAP_OFFSET, bytes(IOBITMAP_SIZE) + b"\xff")  # 0xFF ends the bitmap
        tss = bytearray(0x68)
        tss[0x66:0x68] = (IOBITMAP_OFFSET - tss_offset(self.cpu)).to_bytes(2, "little")
        self.memory.write(self._tss, bytes(tss))
        self.memory.write(base + STUBS_OFFSET, _STUB * 256)
        self.memory.write(base + SYSCALL_STUB_OFFSET, _STUB)

    def setup_percpu(self) -> None:
        """An SMP ROM's per-CPU area for this vCPU: its header (own address, magic, index) and the
        GS base that leads the ROM to it; the ROM checks the magic, so a kernel that reloaded GS
        gets unqueued calls, never another CPU's buffer."""
        if self.percpu and not self.vcpu.set_msr(MSR_GS_BASE, self.write_percpu_header()):
            raise HypercallError("NOT_SUPPORTED")

    def write_percpu_header(self) -> int:
        """The first words of this vCPU's area (its address, the magic, its index): the area."""
        area = layout.percpu_area(self.cpu)
        self.memory.write_u64(area + layout.PERCPU_SELF, area)
        self.memory.write(area + layout.PERCPU_MAGIC, layout.PERCPU_MAGIC_VALUE.to_bytes(4, "little"))
        self.memory.write(area + layout.PERCPU_CPU, self.cpu.to_bytes(4, "little"))
        return area

    def deprivilege(self) -> tuple[int, int]:
        """CPU.Deprivilege: (privilege, shared page)."""
        if self.shared is None:
            raise HypercallError("NOT_SUPPORTED")
        self.setup_percpu()  # every CPU's VMI layer makes this call first, at either privilege
        if self.privilege == "ring0" or self.deprivileged:
            self._put("privilege", 3 if self.deprivileged else 0)
            if not self.deprivileged:  # the events' mask starts as the kernel's own IF
                self._put("vif", int(bool(self.vcpu.regs.rflags & RFLAGS_IF)))
            return (3 if self.deprivileged else 0), self.shared_page
        if self.vcpu.cpl() != 0:
            raise HypercallError("PERMISSION")  # only a ring-0 kernel has anything to give up
        control = self.vcpu.get_control()
        self.gdt, self.idt, self.ldt, self.tr = control.gdt, control.idt, control.ldt, control.tr
        for msr in VIRTUAL_MSRS:
            self.msrs[msr] = self.vcpu.get_msr(msr) or 0
        efer = self.vcpu.get_msr(MSR_EFER) or 0
        self.sce = bool(efer & EFER_SCE)
        self._write_monitor()
        base = layout.MONITOR_BASE
        for msr, value in _monitor_msrs(efer).items():
            if not self.vcpu.set_msr(msr, value):
                raise HypercallError("NOT_SUPPORTED")
        try:
            self.vcpu.set_control(
                gdt=DescriptorTable(base + GDT_OFFSET, GDT_LIMIT), idt=DescriptorTable(base + KERNEL_IDT_OFFSET, 0xFFF),
                tr=self._tr(), ldt=Segment(selector=0, base=0, limit=0, type=2, present=False),
                cs=_segment(KERNEL_CS, True, 3), ss=_segment(KERNEL_SS, False, 3), data=_segment(KERNEL_SS, False, 3))
        except ValueError:
            raise HypercallError("NOT_SUPPORTED") from None
        regs = self.vcpu.regs
        self._put("vif", int(bool(regs.rflags & RFLAGS_IF)))
        regs.rflags = (regs.rflags & ~(3 << 12)) | RFLAGS_IF  # IOPL 0; the hardware IF stays set
        self._enter_deprivileged(control.cr2)
        return 3, self.shared_page

    def _tr(self) -> Segment:
        return Segment(selector=TSS_SELECTOR, base=self._tss, limit=tss_limit(self.cpu), type=0xB, present=True)

    def _enter_deprivileged(self, cr2: int) -> None:
        for name, value in (("privilege", 3), ("vpl", KERNEL), ("kernel_cs", KERNEL_CS), ("kernel_ss", KERNEL_SS),
                            ("user_cs", USER_CS), ("user_ss", USER_SS), ("cr2", cr2)):
            self._put(name, value)
        self.deprivileged = True
        self.vpl = KERNEL

    def adopt(self, source: ExecutionModel) -> tuple[Segment, dict[int, int]]:
        """SetInitialAPState from a deprivileged kernel: this AP's kernel starts deprivileged too,
        with the caller's virtual tables and syscall MSRs. Returns what the AP's vCPU itself must
        be given (its TR and MSRs; the engine applies them on the AP's own thread), its
        interrupt flag (vif) clear."""
        self.gdt, self.idt, self.ldt, self.tr = source.gdt, source.idt, source.ldt, source.tr
        self.msrs, self.sce = dict(source.msrs), source.sce
        self._write_monitor()
        msrs = _monitor_msrs(source.vcpu.get_msr(MSR_EFER) or 0)
        if self.percpu:
            msrs[MSR_GS_BASE] = self.write_percpu_header()
        self._put("vif", 0)
        self._enter_deprivileged(0)
        return self._tr(), msrs

    # --- kernel <-> user ---------------------------------------------------------

    def _enter(self, level: int) -> None:
        base = layout.MONITOR_BASE
        if level == USER:
            cs, ss, idt = _segment(USER_CS, True, 3), _segment(USER_SS, False, 3), USER_IDT_OFFSET
        else:
            cs, ss, idt = _segment(KERNEL_CS, True, 3), _segment(KERNEL_SS, False, 3), KERNEL_IDT_OFFSET
        self.vcpu.set_control(cs=cs, ss=ss, idt=DescriptorTable(base + idt, 0xFFF))
        self.vpl = level
        self._put("vpl", level)

    def _translate(self, va: int, length: int, control: ControlState | None = None) -> int:
        return guest_gpa(self.memory, control or self.vcpu.get_control(), va, length, self._is_table)

    def _kernel_stack(self) -> int:
        """RSP0 of the guest's own TSS: the stack a user-to-kernel transition lands on."""
        if not self.tr.present or self.tr.limit < 11:
            raise HypercallError("INVALID_ARGUMENT")  # no TSS loaded: nowhere to take an exception
        return self.memory.read_u64(self._translate(self.tr.base + 4, 8))

    def return_to_user(self, rip: int, rsp: int, rflags: int) -> tuple[int, ...]:
        """CPU.ReturnToUser: does not return to the caller on success."""
        if not (is_canonical(rip) and is_canonical(rsp)):
            raise HypercallError("INVALID_ARGUMENT")
        if self.user_mode():
            raise HypercallError("PERMISSION")
        regs = self.vcpu.regs
        if self.deprivileged:
            stack = self._kernel_stack() & ~0xF
            if not is_canonical(stack):
                raise HypercallError("INVALID_ARGUMENT")
            self.memory.write_u64(self._tss + TSS_IST1, stack)
            self._ist1 = stack
            self._enter(USER)
            regs.rflags = (rflags & RFLAGS_USER) | RFLAGS_IF | RFLAGS_FIXED
        else:
            cs, ss = self._native_user_segments()
            self.vcpu.set_control(cs=cs, ss=ss)
            regs.rflags = (rflags & (RFLAGS_USER | RFLAGS_IF)) | RFLAGS_FIXED
        regs.rip, regs.rsp = rip, rsp
        self.stats.user_entries += 1
        return ()

    def _native_user_segments(self) -> tuple[Segment, Segment]:
        """ring0: the user selectors sysretq would load (STAR[63:48] + 16 / + 8), checked in the guest's GDT."""
        star = self.vcpu.get_msr(MSR_STAR) or 0
        base = (star >> 48) & 0xFFF8
        control = self.vcpu.get_control()
        segments = []
        for selector, code in ((base + 16, True), (base + 8, False)):
            if selector + 7 > control.gdt.limit or selector < 8:
                raise HypercallError("INVALID_ARGUMENT")
            gpa = self._translate(control.gdt.base + selector, 8)
            d = self.memory.read_u64(gpa)
            present, dpl, s, kind = d >> 47 & 1, d >> 45 & 3, d >> 44 & 1, d >> 40 & 0xF
            long_mode = d >> 53 & 1
            if not (present and dpl == 3 and s and bool(kind & 8) == code and (long_mode or not code)
                    and (code or kind & 2)):
                raise HypercallError("INVALID_ARGUMENT")  # not a present DPL-3 64-bit code / writable data
            segments.append(_segment(selector | 3, code, 3))
        return segments[0], segments[1]

    # --- the event port: exceptions and syscalls ---------------------------------

    def on_event(self, port: int, size: int, value: int) -> None:
        if not self.deprivileged:
            return  # nothing routes here before Deprivilege: an ordinary unused port
        rip = self.vcpu.regs.rip
        # The RIP of the `out` or just past it (engines differ): either names the stub.
        offset = rip - (layout.MONITOR_BASE + STUBS_OFFSET)
        try:
            if 0 <= offset < 256 * STUB_SIZE:
                self._exception(offset // STUB_SIZE)
            elif 0 <= rip - (layout.MONITOR_BASE + SYSCALL_STUB_OFFSET) < STUB_SIZE:
                self._syscall()
        except (HypercallError, ValueError, GuestMemoryError) as exc:  # the guest's state, not ours
            raise CrashRun(f"cannot deliver an exception or syscall to the kernel ({exc})") from None
        # Any other `out` to this port is a guest writing to a port nothing decodes: dropped.
        self.vcpu.mark_regs_dirty()

    def _gate(self, vector: int, control: ControlState | None = None) -> int:
        """The handler of the guest's own IDT gate for ``vector`` (its virtual IDTR)."""
        if vector * 16 + 15 > self.idt.limit:
            raise CrashRun(f"the guest's IDT has no gate for vector {vector} (limit {self.idt.limit:#x})")
        try:
            gpa = self._translate(self.idt.base + vector * 16, 16, control)
        except HypercallError:
            raise CrashRun(f"the guest's IDT gate for vector {vector} is not mapped") from None
        low, high = self.memory.read_u64(gpa), self.memory.read_u64(gpa + 8)
        handler = (low & 0xFFFF) | ((low >> 48) & 0xFFFF) << 16 | (high & 0xFFFFFFFF) << 32
        kind = low >> 40 & 0xF
        if not low >> 47 & 1 or kind not in (GATE_INTERRUPT, GATE_TRAP) or not is_canonical(handler):
            raise CrashRun(f"the guest's IDT gate for vector {vector} is not a present interrupt or trap gate "
                           f"(delivering it would shut the CPU down)")
        return handler

    def _exception(self, vector: int) -> None:
        regs = self.vcpu.regs
        frame = 8 * (6 if vector in ERROR_CODE_VECTORS else 5)
        if self.vpl == USER:
            if regs.rsp != self._ist1 - frame:
                # Not a CPU delivery (user code jumped to a stub): the kernel gets a #GP instead.
                self._enter(KERNEL)
                self._deliver_built(VECTOR_GP, rip=regs.rip, cs=USER_CS, rsp=regs.rsp, ss=USER_SS)
                return
            self._enter(KERNEL)
        control = self.vcpu.get_control()  # one ioctl: CR2 and the tables to find the gate
        if vector == VECTOR_PF:
            self._put("cr2", control.cr2)
        self._count(vector)
        regs.rip = self._gate(vector, control)

    def _count(self, vector: int) -> None:
        self.stats.exceptions += 1
        self.stats.by_vector[vector] = self.stats.by_vector.get(vector, 0) + 1
        self._put("exceptions", self.stats.exceptions)

    def _deliver_built(self, vector: int, *, rip: int, cs: int, rsp: int, ss: int, error: int = 0) -> None:
        """Deliver ``vector`` with a frame the hypervisor builds on the kernel stack."""
        regs = self.vcpu.regs
        stack = self._ist1 if self._ist1 else (regs.rsp & ~0xF)
        values = [rip, cs, regs.rflags, rsp, ss]
        if vector in ERROR_CODE_VECTORS:
            values.insert(0, error)
        top = stack - 8 * len(values)
        try:
            for i, v in enumerate(values):
                self.memory.write_u64(self._translate(top + 8 * i, 8), v)
        except (HypercallError, GuestMemoryError):
            raise CrashRun(f"cannot deliver vector {vector}: the kernel stack at {top:#x} is not writable RAM") from None
        self._count(vector)
        regs.rsp = top
        regs.rip = self._gate(vector)

    def _syscall(self) -> None:
        regs = self.vcpu.regs
        self._enter(KERNEL)  # from user mode or (a kernel calling syscall itself) from the stub's ring 0
        lstar = self.msrs.get(MSR_LSTAR, 0)
        if not self.sce or not is_canonical(lstar) or lstar == 0:
            # Natively: #UD without EFER.SCE; a zero LSTAR would fault at 0 in the kernel.
            self._deliver_built(VECTOR_UD, rip=(regs.rcx - 2) & ((1 << 64) - 1), cs=USER_CS,
                                rsp=regs.rsp, ss=USER_SS)
            return
        self.stats.syscalls += 1
        sfmask = self.msrs.get(MSR_SFMASK, 0)
        if sfmask & RFLAGS_IF:
            self.set_vif(False)
        regs.rflags = (regs.r11 & ~sfmask & ~RFLAGS_TF) | RFLAGS_IF | RFLAGS_FIXED
        regs.rip = lstar

    # --- virtual state the CPU and Segmentation families read and write ----------

    def mirror_ldt(self) -> None:
        """Load the hardware LDT with a ring-compressed copy of the guest's: code and data
        descriptors get DPL 3 (and the accessed bit, so the CPU never writes the copy); system
        descriptors, which could hand out ring 0, become not present."""
        if not self.ldt.present or not self.ldt.selector:
            self.vcpu.set_control(ldt=Segment(selector=0, base=0, limit=0, type=2, present=False))
            return
        size = min(self.ldt.limit + 1, LDT_MAX) & ~7
        copy = bytearray(LDT_MAX)
        for offset in range(0, size, 8):
            try:
                d = self.memory.read_u64(self._translate(self.ldt.base + offset, 8))
            except (HypercallError, GuestMemoryError):
                d = 0
            if d >> 44 & 1 and d >> 47 & 1:  # a present code or data descriptor
                d = d | 3 << 45 | 1 << 40
            else:
                d = 0
            copy[offset:offset + 8] = d.to_bytes(8, "little")
        self.memory.write(layout.MONITOR_BASE + LDT_OFFSET, bytes(copy))
        self.vcpu.set_control(ldt=Segment(selector=self.ldt.selector, base=layout.MONITOR_BASE + LDT_OFFSET,
                                          limit=max(size - 1, 0), type=2, present=True))

    def read_msr(self, msr: int) -> int | None:
        if not self.deprivileged:
            return None
        if msr in VIRTUAL_MSRS:
            return self.msrs.get(msr, 0)
        if msr == MSR_EFER:
            efer = self.vcpu.get_msr(MSR_EFER) or 0
            return (efer & ~EFER_SCE) | (EFER_SCE if self.sce else 0)
        return None

    def write_msr(self, msr: int, value: int) -> bool:
        """True when the write was the virtual state's to take."""
        if not self.deprivileged:
            return False
        if msr in VIRTUAL_MSRS:
            self.msrs[msr] = value
            return True
        if msr == MSR_EFER:
            if not self.vcpu.set_msr(MSR_EFER, value | EFER_SCE):  # syscall must keep reaching the stub
                raise HypercallError("INVALID_ARGUMENT")
            self.sce = bool(value & EFER_SCE)
            return True
        return False

    def summary(self) -> dict[str, object]:
        return {"privilege": self.privilege, "deprivileged": self.deprivileged, **self.stats.summary()}
