"""A guest run with everything around it: the board, the ROM and the hypervisor.

This is the layer the CLI, the benchmarks and the tests use; it composes
machine/ (the board), rom/ (the image the guest finds) and hypervisor/ (the
hypercall side) without any of them knowing about the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vmikit.errors import UsageError
from vmikit.hypervisor import ExperimentalCalls, Hypervisor
from vmikit.machine import layout
from vmikit.machine.board import ConsoleSink, Machine, RunResult

ROM_CHOICES = ("full", "minimal", "none")
ANNOTATION_CHOICES = ("honour", "ignore")


@dataclass
class SessionResult:
    run: RunResult
    by_call: dict[str, dict[str, int]]
    rom: str
    annotations: str

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
        return {"rom": self.rom, "annotations": self.annotations, **data}


class Session:
    """One guest on one board; use as a context manager."""

    def __init__(self, image: Path, *, rom: str = "full", annotations: str = "honour", memory_mib: int = 128,
                 timeout: float = 30.0, console: ConsoleSink | None = None,
                 experimental: ExperimentalCalls | None = None) -> None:
        if rom not in ROM_CHOICES:
            raise UsageError(f"unknown ROM profile '{rom}'", f"use --rom {'|'.join(ROM_CHOICES)}")
        if annotations not in ANNOTATION_CHOICES:
            raise UsageError(f"unknown annotation mode '{annotations}'", f"use --annotations {'|'.join(ANNOTATION_CHOICES)}")
        self.rom = rom
        self.annotations = annotations
        honour = annotations == "honour"
        rom_bytes = None
        if rom != "none":
            from vmikit.rom import RomProfile, build_rom

            rom_bytes = build_rom(RomProfile(rom), honour_annotations=honour).data
        self.machine = Machine(image, memory_mib=memory_mib, timeout=timeout, console=console, rom=rom_bytes)
        self.hypervisor: Hypervisor | None = None
        if rom != "none":  # a bare machine has no hypervisor to call
            self.hypervisor = Hypervisor(honour_annotations=honour, experimental=experimental)
            self.hypervisor.attach(self.machine.memory, self.machine.vcpu)
            self.machine.on_out(layout.PORT_HYPERCALL, self.hypervisor.on_hypercall)

    def run(self) -> SessionResult:
        result = self.machine.run()
        by_call = self.hypervisor.stats() if self.hypervisor else {}
        return SessionResult(result, by_call, self.rom, self.annotations)

    def close(self) -> None:
        self.machine.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
