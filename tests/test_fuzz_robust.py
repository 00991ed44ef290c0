"""Robustness beyond hypercalls: console floods, ROM writes, unmapped MMIO, hangs, handler bugs."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmikit.errors import GuestHang
from vmikit.guest import build as gb
from vmikit.hypervisor import ExperimentalCalls
from vmikit.machine.board import CONSOLE_CAPTURE_LIMIT, Console
from vmikit.session import Session


def test_console_flood_keeps_memory_bounded() -> None:
    """A guest printing far more than the capture limit: bounded capture, the rest counted."""
    seen = [0]
    console = Console(lambda data: seen.__setitem__(0, seen[0] + len(data)))
    line = b"x" * 4095 + b"\n"
    total = CONSOLE_CAPTURE_LIMIT + 3 * (1 << 20)
    for _ in range(total // len(line)):
        for byte in line:
            console.put(byte)
    console.flush()
    assert len(console.captured) == CONSOLE_CAPTURE_LIMIT
    assert console.dropped == total - CONSOLE_CAPTURE_LIMIT
    assert seen[0] == total  # the live sink still sees everything


def test_console_line_without_newline_is_bounded() -> None:
    console = Console(None)
    for _ in range(3 * 4096 + 7):
        console.put(0x41)
    assert len(console._line) < 4096  # a line is cut at 4 KiB, never grows without bound


def test_rom_writes_refused_and_unmapped_mmio_reported(kvm: str) -> None:
    image = gb.build_guest("robust_rom")
    with Session(image, rom="full") as session:
        result = session.run()
    assert "RESULT rom=unchanged mmio=all-ones rom-still-works=yes" in result.console.splitlines(), result.console
    summary = result.summary()
    assert summary["rom_writes_refused"] == 10
    assert summary["mmio_unmapped"] == 10
    assert result.exit_status == 0


def test_guest_that_never_exits_is_stopped_by_the_watchdog(kvm: str) -> None:
    with Session(gb.build_guest("hang"), rom="none", timeout=1.5) as session:
        with pytest.raises(GuestHang) as info:
            session.run()
    assert "watchdog" in str(info.value)


def test_a_raising_handler_is_contained(kvm: str) -> None:
    """A VMM exception in a (user's) handler: the guest gets INVALID_ARGUMENT and the run goes on."""
    calls = ExperimentalCalls()

    @calls.register(0x07, "Broken")
    def broken(ctx: object, a: int, b: int, c: int) -> tuple[int, ...]:
        raise RuntimeError("bug in an extension")

    with Session(gb.build_guest("experiment"), rom="full", experimental=calls) as session:
        result = session.run()
        assert session.hypervisor is not None
        failures = session.hypervisor.handler_failures
    assert "RESULT status=-3 r0=0x0 r1=0x0" in result.console.splitlines(), result.console
    assert result.exit_status == 0
    assert failures and "RuntimeError" in failures[0]


def test_guest_paths_exist() -> None:
    assert "robust_rom" in gb.available_guests() and "fuzz" in gb.available_guests()
    assert isinstance(gb.build_guest("fuzz"), Path)
