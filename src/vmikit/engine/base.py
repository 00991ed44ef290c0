"""The engine boundary: what the board asks of an execution engine.

The run loop lives in the engine (it is the hot path) and turns port and MMIO
accesses into calls on one ``VcpuOps`` object supplied by the board; only
exits the board must decide on come back as a small ``Exit`` value.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from vmikit.memory import Region


class ExitKind(enum.Enum):
    STOPPED = "stopped"  # an ops callback raised StopRun (the guest asked to exit)
    KICKED = "kicked"  # kick() interrupted the vCPU (watchdog)
    HALT = "halt"  # HLT with nothing to wake the vCPU
    SHUTDOWN = "shutdown"  # triple fault
    FAIL_ENTRY = "fail_entry"  # the hardware refused to enter the guest
    INTERNAL_ERROR = "internal_error"  # the engine could not handle an instruction or event
    UNHANDLED = "unhandled"  # an exit reason the engine does not know


@dataclass(frozen=True)
class Exit:
    kind: ExitKind
    detail: str = ""
    code: int = 0  # STOPPED: the value passed to StopRun; others: engine-specific reason code


class StopRun(Exception):
    """Raised by a VcpuOps callback to end the run loop with ExitKind.STOPPED."""

    def __init__(self, code: int = 0) -> None:
        super().__init__(code)
        self.code = code


class WatchdogExpired(BaseException):
    """Raised by a hard kick in the thread running the guest, wherever the VMM is stuck. Not an
    Exception, so that the handlers' catch-all (a bug in a handler must not kill the VMM) lets
    it through."""


class CrashRun(Exception):
    """Raised by a VcpuOps callback when the guest's own state makes it unable to go on (what
    the CPU would turn into a shutdown): the run loop ends with ExitKind.SHUTDOWN and ``detail``."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class Registers(Protocol):
    """General-purpose registers, readable and writable as attributes (rax ... r15, rip, rflags)."""

    rax: int
    rbx: int
    rcx: int
    rdx: int
    rsi: int
    rdi: int
    rsp: int
    rbp: int
    r8: int
    r9: int
    r10: int
    r11: int
    r12: int
    r13: int
    r14: int
    r15: int
    rip: int
    rflags: int


class VcpuOps(Protocol):
    """Callbacks the engine makes from its run loop. Values are plain ints and bytes."""

    def pio_out(self, port: int, size: int, value: int) -> None: ...

    def pio_in(self, port: int, size: int) -> int: ...

    def mmio_read(self, addr: int, size: int) -> int: ...

    def mmio_write(self, addr: int, size: int, value: int) -> None: ...


@dataclass(frozen=True)
class BootState:
    """32-bit flat protected mode, paging off, interrupts off: the multiboot entry state."""

    entry: int
    rax: int = 0
    rbx: int = 0
    rsp: int = 0


@dataclass(frozen=True)
class DescriptorTable:
    base: int
    limit: int


@dataclass(frozen=True)
class Segment:
    """A loaded segment register (hidden part included), engine-neutral."""

    selector: int
    base: int
    limit: int
    type: int
    present: bool
    dpl: int = 0
    db: bool = False
    s: bool = False
    l: bool = False
    g: bool = False


@dataclass(frozen=True)
class ControlState:
    cr0: int
    cr2: int
    cr3: int
    cr4: int
    efer: int
    gdt: DescriptorTable
    idt: DescriptorTable
    ldt: Segment
    tr: Segment


@dataclass
class ExitCounters:
    by_reason: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())


class Vcpu(Protocol):
    @property
    def regs(self) -> Registers:
        """Live registers as of the last exit; write, then call mark_regs_dirty()."""
        ...

    def mark_regs_dirty(self) -> None: ...

    def run(self, ops: VcpuOps) -> Exit: ...

    def kick(self, hard: bool = False) -> None:
        """Thread-safe: make run() return ExitKind.KICKED as soon as possible. A plain kick takes
        effect at the next KVM_RUN; a hard one also interrupts a VMM stuck outside the guest (a
        handler that does not return, console output that blocks)."""
        ...

    def probe_halt(self) -> None:
        """Thread-safe, a few times a second: if the vCPU sleeps in HLT with interrupts disabled,
        make run() return ExitKind.HALT (nothing could ever wake it)."""
        ...

    def wake(self) -> None:
        """Thread-safe: end the current (or next) KVM_RUN early and call ``on_wake`` from the run
        loop's thread, then go on running (the hypervisor's alarms and console events)."""
        ...

    def wake_at(self, deadline_ns: int | None) -> None:
        """From the run loop's thread: wake the vCPU (as wake()) at ``deadline_ns`` of
        time.monotonic_ns; None disarms. One timer per vCPU: a new deadline replaces the old."""
        ...

    def start_at(self, source: Vcpu, rip: int, rsp: int, rdi: int, cr3: int, *, tr: Segment | None = None,
                 msrs: dict[int, int] | None = None) -> None:
        """From ``source``'s run loop: start this AP (one waiting for INIT/SIPI) at ``rip`` with
        ``source``'s control state, CR3 replaced unless 0, TR replaced and MSRs written if given
        (VMI's SetInitialAPState)."""
        ...

    on_wake: Callable[[], None] | None
    stop_on_halt: bool  # False: a probe finding it halted for good sets halted_for_good instead
    halted_for_good: bool  # as of the last probe_halt (only kept up when stop_on_halt is False)

    @property
    def kicked(self) -> bool:
        """Whether kick() asked the run to end (a VMM wait inside a handler must give up)."""
        ...

    def exit_counts(self) -> dict[str, int]: ...

    def dump_state(self) -> dict[str, int]:
        """All registers worth printing in a crash report (GPRs, control registers, segments)."""
        ...

    def tsc_khz(self) -> int | None: ...

    def get_control(self) -> ControlState: ...

    def set_control(self, *, cr0: int | None = None, cr2: int | None = None, cr3: int | None = None,
                    cr4: int | None = None, gdt: DescriptorTable | None = None, idt: DescriptorTable | None = None,
                    ldt: Segment | None = None, tr: Segment | None = None, cs: Segment | None = None,
                    ss: Segment | None = None, data: Segment | None = None) -> None:
        """Change the named parts of the control state (``data``: DS, ES, FS and GS, the last two
        keeping their bases); raises ValueError if the CPU refuses."""
        ...

    def cpl(self) -> int:
        """The hardware privilege level (0-3) the guest ran at when it last exited (an ioctl:
        the hypervisor asks only for calls guest user mode may not make)."""
        ...

    def get_msr(self, index: int) -> int | None:
        """The MSR's value, or None when the engine does not let the guest have it."""
        ...

    def set_msr(self, index: int, value: int) -> bool: ...

    def get_debugreg(self, number: int) -> int:
        """DR0-3, DR6 or DR7."""
        ...

    def set_debugreg(self, number: int, value: int) -> None:
        """Raises ValueError if the CPU refuses the value."""
        ...

    def cpuid(self, leaf: int, subleaf: int) -> tuple[int, int, int, int]:
        """CPUID as the engine presents it to this vCPU (static table, without per-state bits)."""
        ...

    def close(self) -> None: ...


class Vm(Protocol):
    def add_memory(self, region: Region) -> None: ...

    def flush_translations(self, stale: list[tuple[int, int]] | None = None) -> str:
        """Drop the guest-virtual translations the engine caches to the ``stale`` guest-physical
        (gpa, size) ranges (None: all of them), after the VMM wrote page tables. Returns how:
        "frames" (just those) or "all"."""
        ...

    def create_vcpu(self, boot: BootState | None) -> Vcpu:
        """The next vCPU (ids from 0). ``boot``: its entry state; None for an application
        processor, which waits in run() for INIT/SIPI from another CPU's LAPIC."""
        ...

    def irq_line(self, irq: int, level: bool) -> None:
        """Drive interrupt line ``irq`` (a GSI: PIC and IOAPIC pin for 0-15, IOAPIC only for 16-23)."""
        ...

    def signal_msi(self, address: int, data: int) -> bool:
        """Deliver a compatibility-format MSI (address 0xFEExxxxx, data) to the LAPICs; False if none took it."""
        ...

    def ioapic_redirection(self) -> list[int]:
        """The IOAPIC's redirection table entries (24 of them), as the guest programmed them."""
        ...

    def close(self) -> None: ...


class Engine(Protocol):
    name: str

    def create_vm(self) -> Vm: ...

    def describe(self) -> dict[str, object]:
        """Facts about the engine for reports (API version, capabilities)."""
        ...
