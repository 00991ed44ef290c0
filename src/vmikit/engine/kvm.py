"""The KVM engine: /dev/kvm behind the engine interface, with the vCPU run loop."""

from __future__ import annotations

import collections
import ctypes
import errno
import signal
import threading
import time
from collections.abc import Callable
from typing import Protocol

from vmikit.engine.base import BootState, ControlState, CrashRun, DescriptorTable, Exit, ExitKind, Segment, StopRun, Vcpu, VcpuOps, WatchdogExpired
from vmikit.errors import HostError
from vmikit.kvm import structs as ks
from vmikit.kvm.api import (
    KVM_RUN, OPTIONAL_CAPS, REQUIRED_CAPS, Kvm, KvmVcpu, KvmVm, _ioctl,
)
from vmikit.kvm.structs import KVM_SYNC_X86_REGS, KvmSegment
from vmikit.memory import Region


class ExitTracer(Protocol):
    """vmikit.observe.trace's per-vCPU recorder, called around every KVM_RUN."""

    def enter(self) -> None: ...

    def leave(self, reason: int) -> None: ...

    def finish(self) -> None: ...


class DebugHook(Protocol):
    """vmikit.observe.gdbstub: called for KVM_EXIT_DEBUG, for an internal error (True: it was the
    debugger's breakpoint, run on) and after interrupt(); it returns when the debugger resumes."""

    def on_exit(self, reason: int) -> bool: ...

KICK_SIGNAL = signal.SIGUSR1
# Guest-physical pages KVM needs for itself on Intel hosts (unused on AMD): just below 4 GiB,
# above any guest RAM the board maps (machine.layout.MAX_MEMORY_MIB).
KVM_TSS_ADDR = 0xFFFBD000
KVM_IDENTITY_MAP_ADDR = 0xFFFBC000
# A page-sized slot deleted and re-created to make KVM drop its cached translations
# (flush_translations); below KVM's own pages, above any guest RAM and the shadow area.
SCRATCH_SLOT_ADDR = 0xFFFA0000

# Above this many distinct stale ranges one full zap is cheaper than a pair of mprotects each.
MAX_TARGETED_RANGES = 8
PROT_READ, PROT_WRITE = 0x1, 0x2
_libc = ctypes.CDLL(None, use_errno=True)


def _coalesce(ranges: list[tuple[int, int]]) -> list[tuple[int, int]] | None:
    """Sorted, merged, page-aligned ranges; None when one is unbounded (a table entry changed)."""
    merged: list[tuple[int, int]] = []
    for gpa, size in sorted(ranges):
        if size >= 1 << 40:
            return None
        start, end = gpa & ~0xFFF, (gpa + size + 0xFFF) & ~0xFFF
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return [(start, end - start) for start, end in merged]


_INTERNAL_SUBERRORS = {
    1: "KVM could not emulate an instruction",
    2: "an exception occurred while delivering another (simultaneous exceptions)",
    3: "an event could not be delivered to the guest",
    4: "an unexpected exit reason",
}


_hard_kicked: KvmVcpuEngine | None = None  # the vCPU a hard kick is for, until its signal lands
_wake_target: KvmVcpuEngine | None = None  # the vCPU whose wake timer is armed (wake_at)

CLOCK_MONOTONIC, TIMER_ABSTIME, SIGEV_THREAD_ID = 1, 1, 4


class _Sigevent(ctypes.Structure):
    _fields_ = [("value", ctypes.c_uint64), ("signo", ctypes.c_int), ("notify", ctypes.c_int),
                ("tid", ctypes.c_int), ("_pad", ctypes.c_int * 11)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("interval_s", ctypes.c_long), ("interval_ns", ctypes.c_long),
                ("value_s", ctypes.c_long), ("value_ns", ctypes.c_long)]


class WakeTimer:
    """A POSIX timer on CLOCK_MONOTONIC whose expiry sends KICK_SIGNAL to one thread: it ends that
    thread's KVM_RUN with EINTR at a deadline, with no helper thread (and no GIL hand-off)."""

    def __init__(self, tid: int) -> None:
        self._id = ctypes.c_void_p()
        event = _Sigevent(signo=int(KICK_SIGNAL), notify=SIGEV_THREAD_ID, tid=tid)
        if _libc.timer_create(CLOCK_MONOTONIC, ctypes.byref(event), ctypes.byref(self._id)) != 0:
            raise OSError(ctypes.get_errno(), "timer_create failed")
        self.tid = tid

    def set(self, deadline_ns: int) -> None:
        """Fire once at ``deadline_ns`` (time.monotonic_ns); 0 disarms."""
        spec = _Itimerspec(value_s=deadline_ns // 1_000_000_000, value_ns=deadline_ns % 1_000_000_000)
        if _libc.timer_settime(self._id, TIMER_ABSTIME, ctypes.byref(spec), None) != 0:
            raise OSError(ctypes.get_errno(), "timer_settime failed")

    def close(self) -> None:
        _libc.timer_delete(self._id)


def _on_kick(signum: int, frame: object) -> None:
    """The kick signal's handler. Its arrival interrupts KVM_RUN (EINTR); after a hard kick it
    also interrupts whatever the VMM is doing (Python runs signal handlers in the main thread,
    where the run loop runs, and a raising handler ends a blocked write or a long handler)."""
    global _hard_kicked
    target = _wake_target
    if target is not None and target._wake_armed:
        target._woken = True  # (also for other kicks: one more look at the events costs little)
        target._run.immediate_exit = 1  # the signal came between two KVM_RUNs: end the next one
    vcpu = _hard_kicked
    if vcpu is not None and vcpu._armed:
        _hard_kicked = None
        raise WatchdogExpired


def _install_kick_handler() -> None:
    """The kick signal's handler, so that the signal interrupts KVM_RUN with EINTR instead of killing us."""
    if signal.getsignal(KICK_SIGNAL) is _on_kick:
        return
    if threading.current_thread() is not threading.main_thread():
        raise HostError("vmikit must be started from the main thread the first time",
                        "create the first Machine from the main thread (its watchdog needs a signal handler)")
    signal.signal(KICK_SIGNAL, _on_kick)


HALTED_FOR_GOOD = "the guest executed HLT with interrupts disabled, and nothing can wake it"
RFLAGS_IF = 1 << 9
_CPUID_SIGNIFICANT_INDEX = 1 << 0
MSR_MTRR_DEF_TYPE = 0x2FF
MTRR_ENABLE = 1 << 11
MTRR_TYPE_WRITEBACK = 6


CPUID_KVM_FEATURES = 0x40000001
# The KVM paravirtual features the board offers, QEMU's defaults for a KVM guest: kvmclock (both
# MSR sets and the stable bit), no I/O delay, async page faults by #PF, steal time and PV EOI. The
# rest (async PF by interrupt, PV IPIs, TLB flush, unhalt, ...) need a VMM that takes part, and a
# guest that finds them advertised by KVM_GET_SUPPORTED_CPUID would wait for what never comes
# (kvm-unit-tests' asyncpf hangs).
KVM_FEATURES_OFFERED = (1 << 0) | (1 << 1) | (1 << 3) | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 24)


def _offered_features_only(cpuid_buf: ctypes.Array[ctypes.c_char]) -> None:
    nent = ks.KvmCpuid2.from_buffer(cpuid_buf).nent
    for entry in (ks.KvmCpuidEntry2 * nent).from_buffer(cpuid_buf, ctypes.sizeof(ks.KvmCpuid2)):
        if entry.function == CPUID_KVM_FEATURES:
            entry.eax &= KVM_FEATURES_OFFERED


def _segment_from_kvm(seg: KvmSegment) -> Segment:
    return Segment(selector=seg.selector, base=seg.base, limit=seg.limit, type=seg.type, present=bool(seg.present),
                   dpl=seg.dpl, db=bool(seg.db), s=bool(seg.s), l=bool(seg.l), g=bool(seg.g))


def _segment_to_kvm(seg: Segment) -> KvmSegment:
    return KvmSegment(base=seg.base, limit=seg.limit, selector=seg.selector, type=seg.type, present=int(seg.present),
                      dpl=seg.dpl, db=int(seg.db), s=int(seg.s), l=int(seg.l), g=int(seg.g), avl=0,
                      unusable=0 if seg.present else 1)


def _flat_segment(selector: int, type_: int) -> KvmSegment:
    return KvmSegment(base=0, limit=0xFFFFFFFF, selector=selector, type=type_,
                      present=1, dpl=0, db=1, s=1, l=0, g=1, avl=0, unusable=0)


class KvmVcpuEngine:
    """One vCPU and its run loop."""

    def __init__(self, vcpu: KvmVcpu) -> None:
        self._vcpu = vcpu
        self._run = vcpu.run_struct
        # Only the GPRs travel through sync_regs: copying sregs and events out on every
        # exit would cost on the hot path, and the board needs them only in crash reports.
        self._run.kvm_valid_regs = KVM_SYNC_X86_REGS
        self._io = self._run.exit.io
        self._mmio = self._run.exit.mmio
        self._run_base = vcpu.run_addr
        self._fd = vcpu.fd
        self._counts: dict[int, int] = {}
        self._kicked = False
        self._probing = False  # a halt probe's kick: not the guest's exit, not the watchdog's
        self._probe_total = -1  # exits seen at the last probe
        self._armed = False  # run() is running: a hard kick may raise WatchdogExpired
        self._thread_id: int | None = None
        # The VMM's own time (bench): from each KVM_RUN return to the next call, when asked for.
        self.time_outside = False
        self.outside_ns = 0
        # vmikit.observe hooks, read once per run(): None (the default) costs one test per exit.
        self.tracer: ExitTracer | None = None
        self.debugger: DebugHook | None = None
        self._debug_interrupt = False  # interrupt() asked for the debugger, not the watchdog
        self._woken = False  # wake() asked for on_wake
        self.on_wake: Callable[[], None] | None = None  # the hypervisor's event delivery
        self.wakeups = 0
        self._wake_timer: WakeTimer | None = None
        self._wake_armed = False
        # A vCPU of several: one halted for good does not end the run (an AP parked with cli; hlt,
        # or one no SIPI started yet); it says so here, and the board ends the run when all do.
        self.stop_on_halt = True
        self.halted_for_good = False
        self._soon: collections.deque[Callable[[], None]] = collections.deque()  # start_at's work, for the run loop's thread

    @property
    def regs(self) -> ks.KvmRegs:
        return self._vcpu.regs

    def cpl(self) -> int:
        """The hardware privilege level the guest ran at when it exited (SS.DPL, as the CPU keeps it).
        One KVM_GET_SREGS: having KVM copy the segment registers out on every exit instead (sync_regs)
        cost about as much per exit here, and most exits do not ask."""
        return int(self._vcpu.get_sregs().ss.dpl)

    def mark_regs_dirty(self) -> None:
        self._run.kvm_dirty_regs |= KVM_SYNC_X86_REGS

    def setup_boot(self, boot: BootState | None, cpuid_buf: ctypes.Array[ctypes.c_char]) -> None:
        """The multiboot entry state; with ``boot`` None, an AP: KVM's reset state, waiting in
        KVM_RUN for INIT and SIPI from another CPU's LAPIC (or the hypervisor's start_at)."""
        _offered_features_only(cpuid_buf)
        self._vcpu.set_cpuid(cpuid_buf)
        nent = ks.KvmCpuid2.from_buffer(cpuid_buf).nent
        self._cpuid_entries = list((ks.KvmCpuidEntry2 * nent).from_buffer_copy(cpuid_buf, ctypes.sizeof(ks.KvmCpuid2)))
        if boot is None:
            self._vcpu.set_msrs({MSR_MTRR_DEF_TYPE: MTRR_ENABLE | MTRR_TYPE_WRITEBACK})
            return
        sregs = self._vcpu.get_sregs()
        sregs.cs = _flat_segment(0x08, 0xB)
        for name in ("ds", "es", "fs", "gs", "ss"):
            setattr(sregs, name, _flat_segment(0x10, 0x3))
        sregs.cr0 = 0x11  # PE | ET: protected mode, paging and caches-disable off
        sregs.cr4 = 0
        sregs.efer = 0
        self._vcpu.set_sregs(sregs)
        regs = ks.KvmRegs(rip=boot.entry, rax=boot.rax, rbx=boot.rbx, rsp=boot.rsp, rflags=0x2)
        self._vcpu.set_regs(regs)
        # Firmware's job: MTRRs enabled with write-back as the default memory type. At reset they
        # are off, which makes all of RAM uncacheable (each guest memory access then crawls).
        self._vcpu.set_msrs({MSR_MTRR_DEF_TYPE: MTRR_ENABLE | MTRR_TYPE_WRITEBACK})

    def run(self, ops: VcpuOps) -> Exit:
        global _hard_kicked
        run = self._run
        io = self._io
        mmio = self._mmio
        base = self._run_base
        fd = self._fd
        counts = self._counts
        self._thread_id = threading.get_ident()
        timing, returned = self.time_outside, 0
        tracer, debugger = self.tracer, self.debugger
        self._armed = True
        try:
            if self._soon:
                self._run_soon()
            while True:
                if returned:
                    self.outside_ns += time.perf_counter_ns() - returned
                if tracer is not None:
                    tracer.enter()
                ran = _ioctl(fd, KVM_RUN, None) >= 0
                if tracer is not None:
                    tracer.leave(run.exit_reason if ran else ks.KVM_EXIT_INTR)
                if timing:
                    returned = time.perf_counter_ns() if ran else 0
                if not ran:
                    err = ctypes.get_errno()
                    if err in (errno.EINTR, errno.EAGAIN):
                        if self._kicked:
                            return Exit(ExitKind.KICKED, "stopped by the watchdog")
                        if self._debug_interrupt and debugger is not None:
                            self._debug_interrupt = False
                            run.immediate_exit = 0
                            debugger.on_exit(ks.KVM_EXIT_INTR)
                            continue
                        if self._woken:
                            self._wake_up()
                        if self._soon:
                            self._run_soon()
                        if self._probing:
                            if self._halted_for_good() and self.stop_on_halt:
                                return Exit(ExitKind.HALT, HALTED_FOR_GOOD)
                            continue
                        counts[ks.KVM_EXIT_INTR] = counts.get(ks.KVM_EXIT_INTR, 0) + 1
                        continue
                    return Exit(ExitKind.INTERNAL_ERROR, f"KVM_RUN failed: {errno.errorcode.get(err, err)}", err)
                reason = run.exit_reason
                counts[reason] = counts.get(reason, 0) + 1
                if reason == ks.KVM_EXIT_IO:
                    size = io.size
                    addr = base + io.data_offset
                    port = io.port
                    for _ in range(io.count):
                        if io.direction == ks.KVM_EXIT_IO_OUT:
                            ops.pio_out(port, size, int.from_bytes(ctypes.string_at(addr, size), "little"))
                        else:
                            value = ops.pio_in(port, size) & ((1 << (8 * size)) - 1)
                            ctypes.memmove(addr, value.to_bytes(size, "little"), size)
                        addr += size
                elif reason == ks.KVM_EXIT_MMIO:
                    length = min(mmio.len, 8)
                    if mmio.is_write:
                        ops.mmio_write(mmio.phys_addr, length, int.from_bytes(bytes(mmio.data)[:length], "little"))
                    else:
                        value = ops.mmio_read(mmio.phys_addr, length) & ((1 << (8 * length)) - 1)
                        ctypes.memmove(ctypes.addressof(mmio.data), value.to_bytes(length, "little"), length)
                elif reason == ks.KVM_EXIT_HLT:
                    return Exit(ExitKind.HALT, "the guest executed HLT and nothing can wake it")
                elif reason == ks.KVM_EXIT_SHUTDOWN:
                    return Exit(ExitKind.SHUTDOWN, "triple fault")
                elif reason == ks.KVM_EXIT_FAIL_ENTRY:
                    code = run.exit.fail_entry.hardware_entry_failure_reason
                    return Exit(ExitKind.FAIL_ENTRY, f"hardware entry failure reason {code:#x}", code)
                elif reason == ks.KVM_EXIT_DEBUG and debugger is not None:
                    debugger.on_exit(reason)
                elif reason == ks.KVM_EXIT_INTERNAL_ERROR and debugger is not None and debugger.on_exit(reason):
                    pass  # the debugger's breakpoint: int3 at ring 0, which KVM here cannot emulate
                elif reason == ks.KVM_EXIT_INTERNAL_ERROR:
                    sub = run.exit.internal.suberror
                    what = _INTERNAL_SUBERRORS.get(sub, f"suberror {sub}")
                    return Exit(ExitKind.INTERNAL_ERROR, what, sub)
                elif reason == ks.KVM_EXIT_INTR:
                    if self._kicked:
                        return Exit(ExitKind.KICKED, "stopped by the watchdog")
                    if self._woken:
                        self._wake_up()
                    if self._probing and self._halted_for_good() and self.stop_on_halt:
                        return Exit(ExitKind.HALT, HALTED_FOR_GOOD)
                else:
                    name = ks.EXIT_REASON_NAMES.get(reason, str(reason))
                    return Exit(ExitKind.UNHANDLED, f"unhandled KVM exit reason {name}", reason)
        except StopRun as stop:
            return Exit(ExitKind.STOPPED, "", stop.code)
        except CrashRun as crash:
            return Exit(ExitKind.SHUTDOWN, crash.detail)
        except WatchdogExpired:
            return Exit(ExitKind.KICKED, "stopped by the watchdog while the VMM was busy outside the guest")
        finally:
            self._armed = False  # first: a hard kick landing after this raises nothing
            if tracer is not None:
                tracer.finish()
            if _hard_kicked is self:
                _hard_kicked = None
            run.immediate_exit = 0
            self._thread_id = None

    def _signal_run_thread(self) -> None:
        """Interrupt the thread in KVM_RUN (EINTR), if one is running; the caller's flag says why."""
        tid = self._thread_id
        if tid is not None:
            try:
                signal.pthread_kill(tid, KICK_SIGNAL)
            except ProcessLookupError:
                pass

    def _run_soon(self) -> None:
        if not self._kicked:
            self._run.immediate_exit = 0
        while self._soon:
            self._soon.popleft()()

    def start_at(self, source: Vcpu, rip: int, rsp: int, rdi: int, cr3: int, *, tr: Segment | None = None,
                 msrs: dict[int, int] | None = None) -> None:
        """Start this AP (waiting for INIT/SIPI) at ``rip`` in ``source``'s control state (its
        control registers, EFER, descriptor tables, segments; CR3 replaced unless 0): what
        VMI's SetInitialAPState asks. Called from ``source``'s thread; the AP's own ioctls run in
        its run loop's thread (a vCPU waiting in KVM_RUN holds its mutex), before its next
        KVM_RUN. An AP already running (a SIPI came first) is left alone."""
        assert isinstance(source, KvmVcpuEngine), "vCPUs of one engine"
        sregs = source._vcpu.get_sregs()
        if cr3:
            sregs.cr3 = cr3
        if tr is not None:
            sregs.tr = _segment_to_kvm(tr)
        mtrr = source._vcpu.get_msrs([MSR_MTRR_DEF_TYPE]).get(MSR_MTRR_DEF_TYPE, 0)
        values = {MSR_MTRR_DEF_TYPE: mtrr, **(msrs or {})}
        # A kernel at ring 3 keeps the hardware IF set (its own flag is virtual): rflags as the source's.
        rflags = 0x2 | (source._vcpu.regs.rflags & RFLAGS_IF if sregs.cs.dpl == 3 else 0)

        def start() -> None:
            if self._vcpu.mp_state() not in (ks.KVM_MP_STATE_UNINITIALIZED, ks.KVM_MP_STATE_INIT_RECEIVED):
                return
            self._vcpu.set_sregs(sregs)
            self._vcpu.set_regs(ks.KvmRegs(rip=rip, rsp=rsp, rdi=rdi, rflags=rflags))
            self._vcpu.set_msrs(values)
            self._vcpu.set_mp_state(ks.KVM_MP_STATE_RUNNABLE)
            self.halted_for_good = False

        self._soon.append(start)
        self._run.immediate_exit = 1  # a start that lands between two KVM_RUNs
        self._signal_run_thread()

    def kick(self, hard: bool = False) -> None:
        global _hard_kicked
        if hard and self._thread_id == threading.main_thread().ident:
            _hard_kicked = self
        self._kicked = True
        self._run.immediate_exit = 1  # covers a kick that lands between two KVM_RUNs
        self._signal_run_thread()

    def interrupt(self) -> None:
        """Thread-safe (the debugger's Ctrl-C): end the current KVM_RUN and call debugger.on_exit
        with KVM_EXIT_INTR; unlike kick(), the run goes on afterwards."""
        self._debug_interrupt = True
        self._run.immediate_exit = 1  # covers an interrupt that lands between two KVM_RUNs
        self._signal_run_thread()

    def wake(self) -> None:
        """Thread-safe: end the current KVM_RUN (or the next, if it lands between two) and call
        on_wake from the run loop's thread; unlike kick(), the run goes on afterwards."""
        self._woken = True
        self._run.immediate_exit = 1
        self._signal_run_thread()

    def _wake_up(self) -> None:
        self._woken = False
        if not self._kicked:  # a watchdog kick keeps immediate_exit: the run must end
            self._run.immediate_exit = 0
        self.wakeups += 1
        hook = self.on_wake
        if hook is not None:
            hook()

    def wake_at(self, deadline_ns: int | None) -> None:
        """From the run loop's thread: arm (or with None disarm) a timer that wakes this vCPU at
        ``deadline_ns`` (time.monotonic_ns) as wake() would."""
        global _wake_target
        if deadline_ns is None:
            if self._wake_armed and self._wake_timer is not None:
                self._wake_timer.set(0)
            self._wake_armed = False
            return
        tid = threading.get_native_id()
        if self._wake_timer is None or self._wake_timer.tid != tid:
            if self._wake_timer is not None:
                self._wake_timer.close()
            self._wake_timer = WakeTimer(tid)
        _wake_target = self
        self._wake_armed = True
        self._wake_timer.set(max(deadline_ns, 1))

    @property
    def kicked(self) -> bool:
        return self._kicked

    @property
    def kvm_vcpu(self) -> KvmVcpu:
        """The KVM vCPU itself (the gdb stub: KVM_SET_GUEST_DEBUG, the exit's debug fields)."""
        return self._vcpu

    def probe_halt(self) -> None:
        """Thread-safe, called a few times a second: with the in-kernel LAPIC, KVM sleeps a halted
        vCPU inside KVM_RUN, so a guest that halts with interrupts off (nothing can wake it: this
        board sends no NMI) would sleep until the watchdog. If the vCPU made no exit since the last
        probe, interrupt KVM_RUN and look."""
        total = sum(self._counts.values())
        if total != self._probe_total:
            self._probe_total = total
            self.halted_for_good = False
            return
        if self._thread_id is not None:
            self._probing = True
            self._signal_run_thread()

    def _halted_for_good(self) -> bool:
        self._probing = False
        state = self._vcpu.mp_state()
        if state in (ks.KVM_MP_STATE_UNINITIALIZED, ks.KVM_MP_STATE_INIT_RECEIVED):
            self.halted_for_good = True  # an AP no one started: only another CPU's SIPI can
        else:
            self.halted_for_good = state == ks.KVM_MP_STATE_HALTED and not self._vcpu.get_regs().rflags & RFLAGS_IF
        return self.halted_for_good

    def mp_state(self) -> int:
        return self._vcpu.mp_state()

    def lapic_registers(self) -> bytes:
        """The in-kernel LAPIC's register page (1 KiB), as the guest would read it at 0xFEE00000."""
        return self._vcpu.get_lapic()

    def exit_counts(self) -> dict[str, int]:
        return {ks.EXIT_REASON_NAMES.get(r, str(r)): n for r, n in sorted(self._counts.items())}

    def dump_state(self) -> dict[str, int]:
        state: dict[str, int] = {}
        regs = self._vcpu.get_regs()
        for field in ks.KvmRegs._fields_:
            state[field[0]] = getattr(regs, field[0])
        sregs = self._vcpu.get_sregs()
        for name in ("cr0", "cr2", "cr3", "cr4", "efer"):
            state[name] = getattr(sregs, name)
        for name in ("cs", "ss", "ds"):
            state[name] = getattr(sregs, name).selector
        state["gdt_base"], state["gdt_limit"] = sregs.gdt.base, sregs.gdt.limit
        state["idt_base"], state["idt_limit"] = sregs.idt.base, sregs.idt.limit
        return state

    def tsc_khz(self) -> int | None:
        try:
            return self._vcpu.tsc_khz()
        except OSError:
            return None

    def get_control(self) -> ControlState:
        sr = self._vcpu.get_sregs()
        return ControlState(cr0=sr.cr0, cr2=sr.cr2, cr3=sr.cr3, cr4=sr.cr4, efer=sr.efer,
                            gdt=DescriptorTable(sr.gdt.base, sr.gdt.limit), idt=DescriptorTable(sr.idt.base, sr.idt.limit),
                            ldt=_segment_from_kvm(sr.ldt), tr=_segment_from_kvm(sr.tr))

    def set_control(self, *, cr0: int | None = None, cr2: int | None = None, cr3: int | None = None,
                    cr4: int | None = None, gdt: DescriptorTable | None = None, idt: DescriptorTable | None = None,
                    ldt: Segment | None = None, tr: Segment | None = None, cs: Segment | None = None,
                    ss: Segment | None = None, data: Segment | None = None) -> None:
        sr = self._vcpu.get_sregs()
        if cs is not None:
            sr.cs = _segment_to_kvm(cs)
        if ss is not None:
            sr.ss = _segment_to_kvm(ss)
        if data is not None:  # ds, es, fs, gs; fs and gs keep their bases (the FS/GS_BASE MSRs)
            for name in ("ds", "es", "fs", "gs"):
                base = getattr(sr, name).base if name in ("fs", "gs") else data.base
                setattr(sr, name, _segment_to_kvm(Segment(**{**data.__dict__, "base": base})))
        for name, value in (("cr0", cr0), ("cr2", cr2), ("cr3", cr3), ("cr4", cr4)):
            if value is not None:
                setattr(sr, name, value)
        for name, table in (("gdt", gdt), ("idt", idt)):
            if table is not None:
                getattr(sr, name).base, getattr(sr, name).limit = table.base, table.limit
        if ldt is not None:
            sr.ldt = _segment_to_kvm(ldt)
        if tr is not None:
            sr.tr = _segment_to_kvm(tr)
        try:
            self._vcpu.set_sregs(sr)
        except OSError as exc:  # KVM refuses invalid control-register combinations with EINVAL
            raise ValueError(f"the CPU refuses this state ({exc.strerror})") from None

    def get_msr(self, index: int) -> int | None:
        try:
            values = self._vcpu.get_msrs([index])
        except OSError:
            return None
        return values.get(index)

    def set_msr(self, index: int, value: int) -> bool:
        try:
            return self._vcpu.set_msrs({index: value}) == 1
        except OSError:
            return False

    def get_debugreg(self, number: int) -> int:
        dregs = self._vcpu.get_debugregs()
        return dregs.db[number] if number < 4 else dregs.dr6 if number == 6 else dregs.dr7

    def set_debugreg(self, number: int, value: int) -> None:
        dregs = self._vcpu.get_debugregs()
        if number < 4:
            dregs.db[number] = value
        elif number == 6:
            dregs.dr6 = value
        else:
            dregs.dr7 = value
        try:
            self._vcpu.set_debugregs(dregs)
        except OSError as exc:
            raise ValueError(f"the CPU refuses this debug-register value ({exc.strerror})") from None

    def cpuid(self, leaf: int, subleaf: int) -> tuple[int, int, int, int]:
        for entry in self._cpuid_entries:
            if entry.function == leaf and (not entry.flags & _CPUID_SIGNIFICANT_INDEX or entry.index == subleaf):
                return entry.eax, entry.ebx, entry.ecx, entry.edx
        return 0, 0, 0, 0

    def close(self) -> None:
        global _wake_target
        if _wake_target is self:
            _wake_target = None
        self._wake_armed = False
        if self._wake_timer is not None:
            self._wake_timer.close()
            self._wake_timer = None
        self._io = self._mmio = None
        del self._run
        self._vcpu.close()


class KvmVmEngine:
    def __init__(self, kvm: Kvm, vm: KvmVm) -> None:
        self._kvm = kvm
        self._vm = vm
        self._vcpus: list[KvmVcpuEngine] = []
        self._regions: list[Region] = []
        vm.set_tss_addr(KVM_TSS_ADDR)
        vm.set_identity_map_addr(KVM_IDENTITY_MAP_ADDR)
        # The PC's interrupt controllers and timer, in the kernel as QEMU's default PC has them:
        # the guest programs them with no exit to Python, and a halted vCPU sleeps in the kernel.
        vm.create_irqchip()
        vm.create_pit()

    def irq_line(self, irq: int, level: bool) -> None:
        self._vm.irq_line(irq, level)

    def signal_msi(self, address: int, data: int) -> bool:
        return self._vm.signal_msi(address, data)

    def ioapic_redirection(self) -> list[int]:
        return self._vm.ioapic_redirection()

    def add_memory(self, region: Region) -> None:
        self._vm.set_memory_region(region.gpa, region.size, region.host_addr, region.readonly)
        self._regions.append(region)

    def flush_translations(self, stale: list[tuple[int, int]] | None = None) -> str:
        """Drop KVM's cached translations to the ``stale`` (gpa, size) ranges, or all of them.

        A few ranges of RAM: the host mapping of each is write-protected and restored, whose
        MMU-notifier invalidation makes KVM zap exactly the shadow entries that map it (~20 µs
        a range here). Anything else (a table entry changed, a range outside RAM, many
        ranges): the whole shadow MMU goes (scratch-slot deletion). Returns "frames" or "all".
        """
        ranges = _coalesce(stale) if stale else None
        if ranges is None or len(ranges) > MAX_TARGETED_RANGES:
            self._vm.zap_translations(SCRATCH_SLOT_ADDR)
            return "all"
        spans = []
        for gpa, size in ranges:
            region = next((r for r in self._regions if r.gpa <= gpa and gpa + size <= r.gpa + r.size), None)
            if region is None:
                self._vm.zap_translations(SCRATCH_SLOT_ADDR)
                return "all"
            spans.append((region.host_addr + gpa - region.gpa, size))
        for addr, size in spans:
            if _libc.mprotect(ctypes.c_void_p(addr), ctypes.c_size_t(size), PROT_READ) != 0 or \
                    _libc.mprotect(ctypes.c_void_p(addr), ctypes.c_size_t(size), PROT_READ | PROT_WRITE) != 0:
                raise OSError(ctypes.get_errno(), "mprotect of guest memory failed")
        return "frames"

    def create_vcpu(self, boot: BootState | None) -> KvmVcpuEngine:
        _install_kick_handler()
        vcpu = KvmVcpuEngine(self._vm.create_vcpu(len(self._vcpus)))
        cpuid_buf, _ = self._kvm.supported_cpuid()
        vcpu.setup_boot(boot, cpuid_buf)
        self._vcpus.append(vcpu)
        return vcpu

    def close(self) -> None:
        for vcpu in self._vcpus:
            vcpu.close()
        self._vcpus.clear()
        self._vm.close()


class KvmEngine:
    name = "kvm"

    def __init__(self, device: str = "/dev/kvm") -> None:
        self._kvm = Kvm(device)
        missing = self._kvm.missing_caps()
        if missing:
            raise HostError(f"KVM on this host lacks {', '.join(missing)}",
                            "use a newer Linux kernel (vmikit needs KVM with sync_regs and read-only memory)")

    def create_vm(self) -> KvmVmEngine:
        return KvmVmEngine(self._kvm, self._kvm.create_vm())

    def describe(self) -> dict[str, object]:
        caps = {name: self._kvm.check_extension(cap) for name, cap in {**REQUIRED_CAPS, **OPTIONAL_CAPS}.items()}
        return {"engine": "kvm", "device": self._kvm.device, "api_version": self._kvm.api_version,
                "capabilities": caps}

    def close(self) -> None:
        self._kvm.close()
