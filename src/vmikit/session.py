"""A guest run with everything around it: the board, the ROM and the hypervisor.

This is the layer the CLI, the benchmarks and the tests use; it composes
machine/ (the board), rom/ (the image the guest finds) and hypervisor/ (the
hypercall side) without any of them knowing about the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from vmikit.abi.model import Spec
from vmikit.errors import UsageError
from vmikit.hypervisor import ExperimentalCalls, Hypervisor
from vmikit.hypervisor.core import FAILURES_KEPT, keep_first
from vmikit.hypervisor.execution import PRIVILEGES
from vmikit.hypervisor.mmu import PAGING_STYLES, DirectMmu, Mmu, ShadowMmu, TrapMmu
from vmikit.machine import layout
from vmikit.machine.board import ConsoleSink, Machine, RunResult, release_frames
from vmikit.observe import trace

ROM_CHOICES = ("full", "minimal", "none")
AUDIT_PROBLEMS_KEPT = FAILURES_KEPT  # audit findings kept for the summary (all are counted)
ANNOTATION_CHOICES = ("honour", "ignore")


@dataclass
class SessionResult:
    run: RunResult
    by_call: dict[str, dict[str, int | None]]
    rom: str
    annotations: str
    paging: dict[str, object]
    privilege: str = "ring0"
    execution: dict[str, object] | None = None
    handler_failures: int = 0  # exceptions in hypercall handlers (each answered INVALID_ARGUMENT)

    @property
    def exit_status(self) -> int:
        return self.run.exit_status

    @property
    def console(self) -> str:
        return self.run.console

    def summary(self) -> dict[str, object]:
        data = self.run.summary()
        exits = data["exits"]
        assert isinstance(exits, dict)
        exits["by_call"] = self.by_call
        return {"rom": self.rom, "annotations": self.annotations, "privilege": self.privilege,
                "execution": self.execution, "paging": self.paging, "handler_failures": self.handler_failures, **data}


class Session:
    """One guest on one board; use as a context manager."""

    def __init__(self, image: Path, *, rom: str | None = None, annotations: str = "honour", paging: str = "native",
                 memory_mib: int = 128, timeout: float = 30.0, console: ConsoleSink | None = None,
                 experimental: ExperimentalCalls | None = None, audit: bool = False, cmdline: str = "",
                 spec: Spec | None = None, privilege: str | None = None, console_input: int | None = None,
                 cpus: int = 1, devices: tuple[str, ...] = ()) -> None:
        # devices: PCI devices and the IOMMU on the board ("edu", "intel-iommu"; docs/board.md).
        # console_input: a host file descriptor whose bytes COM1 receives (machine/uart.py).
        # spec: the interface version the ROM and hypervisor implement (default: the packaged one);
        # an older spec stands for an older hypervisor (vmikit compat).
        if paging not in PAGING_STYLES:
            raise UsageError(f"unknown paging style '{paging}'", f"use --paging {'|'.join(PAGING_STYLES)}")
        if rom is None:
            rom = "none" if paging == "trap" else "full"
        if paging == "trap" and rom != "none":
            raise UsageError("trap paging emulates an unmodified guest, which has no ROM", "use --rom none with --paging trap")
        if paging in ("direct", "shadow") and rom == "none":
            raise UsageError(f"{paging} paging works through VMI calls, which need the ROM",
                             f"use --rom full or --rom minimal with --paging {paging}")
        pool_end_mib = (layout.PT_POOL_BASE + layout.PT_POOL_SIZE) >> 20
        if paging != "native" and memory_mib <= pool_end_mib:
            raise UsageError(f"{paging} paging needs the page-table pool, which ends at {pool_end_mib} MiB",
                             f"give the guest more memory (--memory {2 * pool_end_mib} or more)")
        if rom not in ROM_CHOICES:
            raise UsageError(f"unknown ROM profile '{rom}'", f"use --rom {'|'.join(ROM_CHOICES)}")
        if annotations not in ANNOTATION_CHOICES:
            raise UsageError(f"unknown annotation mode '{annotations}'", f"use --annotations {'|'.join(ANNOTATION_CHOICES)}")
        if privilege is None:
            privilege = "ring0" if rom == "none" else "deprivileged"
        if privilege not in PRIVILEGES:
            raise UsageError(f"unknown privilege '{privilege}'", f"use --privilege {'|'.join(PRIVILEGES)}")
        if privilege == "deprivileged" and rom == "none":
            raise UsageError("a deprivileged kernel needs the hypervisor's ROM (without it the machine is bare)",
                             "use --rom full or --rom minimal, or --privilege ring0")
        if privilege == "deprivileged" and spec is not None and spec.shared is None:
            privilege = "ring0"  # an interface before 1.3 has no execution model: its kernels keep ring 0
        if cpus > 1 and rom != "none" and spec is not None and spec.shared is None:
            raise UsageError(f"--cpus {cpus} under a ROM needs the per-vCPU shared page, which VMI {spec.version} lacks",
                             "use --spec 1.3 or later, or --cpus 1")
        self.privilege = privilege
        self.rom = rom
        self.annotations = annotations
        honour = annotations == "honour"
        rom_bytes = None
        if rom != "none":
            from vmikit.rom import RomProfile, build_rom

            rom_bytes = build_rom(RomProfile(rom), honour_annotations=honour, spec=spec,
                                  deprivileged=privilege == "deprivileged", smp=cpus > 1).data
        self.machine = Machine(image, memory_mib=memory_mib, timeout=timeout, console=console, rom=rom_bytes,
                               cmdline=cmdline, pool_readonly=paging != "native",
                               private=(layout.SHADOW_BASE, layout.SHADOW_SIZE) if paging == "shadow" else None,
                               console_input=console_input, cpus=cpus, devices=devices)
        self.mmu = self._make_mmu(paging)
        self.hypervisor: Hypervisor | None = None
        if rom != "none":  # a bare machine has no hypervisor to call
            self.hypervisor = Hypervisor(spec, honour_annotations=honour, experimental=experimental, mmu=self.mmu,
                                         audit=audit, privilege=privilege)
            machine = self.machine
            self.hypervisor.attach(machine.memory, machine.vcpu, machine.vm.flush_translations, vcpus=machine.vcpus,
                                   current=lambda: machine.current_cpu)
            self.hypervisor.release_exit_lock = machine.exit_lock_released
            machine.on_out(layout.PORT_HYPERCALL, self.hypervisor.on_hypercall)
            assert self.hypervisor.execution is not None
            # One vCPU: its model takes the event port directly (the hot path of every exception).
            machine.on_out(layout.PORT_EVENT, self.hypervisor.execution.on_event if cpus == 1
                           else self.hypervisor.on_event)
            self.machine.uart.on_host_input = self.hypervisor.console_input  # the console event source (1.4)
        self.audit = audit
        self.audits = 0
        self.audit_problems: list[str] = []  # the first AUDIT_PROBLEMS_KEPT (trap paging: one audit per store)
        self.audit_problem_count = 0
        if isinstance(self.mmu, DirectMmu):  # trap, direct, shadow: stores into the read-only pool exit here
            self.machine.on_mmio_write(layout.PT_POOL_BASE, layout.PT_POOL_SIZE, self._guest_store)
        trace.attach_active(self, f"{image.name} paging={paging} privilege={privilege} rom={rom}")  # --trace

    def _make_mmu(self, paging: str) -> Mmu:
        memory = self.machine.memory
        if paging == "native":
            return Mmu(memory)
        phys_bits = self.machine.vcpu.cpuid(0x80000008, 0)[0] & 0xFF or 48
        if paging == "trap":
            return TrapMmu(memory, (layout.PT_POOL_BASE, layout.PT_POOL_SIZE), phys_bits)
        pool = (layout.PT_POOL_BASE, layout.PT_POOL_SIZE)
        if paging == "direct":
            return DirectMmu(memory, phys_bits, pool)
        return ShadowMmu(memory, layout.SHADOW_BASE, layout.SHADOW_SIZE, phys_bits, pool)

    def _guest_store(self, addr: int, size: int, value: int) -> None:
        assert isinstance(self.mmu, DirectMmu)
        self.mmu.on_guest_store(addr, size, value)
        if self.audit and self.hypervisor is None:  # trap: audit after every emulated store
            self.audits += 1
            self._note_problems(self.mmu.audit())

    def _note_problems(self, problems: list[str]) -> None:
        # One store can break an invariant that every later audit reports again: keep a bounded few.
        self.audit_problem_count += len(problems)
        keep_first(self.audit_problems, problems, AUDIT_PROBLEMS_KEPT)

    def run(self) -> SessionResult:
        result = self.machine.run()
        by_call = self.hypervisor.stats() if self.hypervisor else {}
        paging: dict[str, object] = dict(self.mmu.stats())
        if self.audit:
            hv = self.hypervisor
            if hv is not None:
                self._note_problems(hv.audit_problems)
                self.audit_problem_count += hv.audit_problem_count - len(hv.audit_problems)
            self._note_problems(self.mmu.audit())
            paging["audit"] = {"runs": (hv.audits if hv else 0) + self.audits + 1, "problems": self.audit_problems,
                               "problems_total": self.audit_problem_count}
        # vCPU 0's model (with several vCPUs the current one is whichever made the last exit).
        models = self.hypervisor.executions() if self.hypervisor else []
        execution = models[0].summary() if models else None
        if execution is not None and self.hypervisor is not None and self.hypervisor.events is not None:
            execution["events"] = self.hypervisor.events.summary()
        failures = self.hypervisor.handler_failure_count if self.hypervisor else 0
        return SessionResult(result, by_call, self.rom, self.annotations, paging, self.privilege, execution, failures)

    def close(self) -> None:
        if self.hypervisor is not None:
            self.hypervisor.close()  # its alarm clock thread
        try:
            self.mmu.close()  # its array views pin guest memory
        finally:
            self.machine.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: TracebackType | None) -> None:
        release_frames(exc)
        self.close()
