"""The PC board (issue 14): the devices one by one, and the bundled `pc` guest on the board and on QEMU."""

from __future__ import annotations

import os
import resource
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from test_boot import pass_lines, run_qemu
from vmikit.errors import GuestCrash
from vmikit.guest.build import build_guest
from vmikit.machine import layout, uart
from vmikit.machine.acpi import build_tables, checksum
from vmikit.machine.board import Machine
from vmikit.machine.fwcfg import FwCfg
from vmikit.machine.testdev import TestDev
from vmikit.session import Session


class FakeBoard:
    """The Ports a device sees, recording what it registers and the interrupt lines it drives."""

    def __init__(self) -> None:
        self.out: dict[int, Callable[[int, int, int], None]] = {}
        self.inp: dict[int, Callable[[int, int], int]] = {}
        self.mmio: list[tuple[int, int, Callable[[int, int], int], Callable[[int, int, int], None]]] = []
        self.irqs: list[tuple[int, bool]] = []

    def on_out(self, port: int, handler: Callable[[int, int, int], None]) -> None:
        self.out[port] = handler

    def on_in(self, port: int, handler: Callable[[int, int], int]) -> None:
        self.inp[port] = handler

    def on_mmio(self, base: int, size: int, read: Callable[[int, int], int],
                write: Callable[[int, int, int], None]) -> None:
        self.mmio.append((base, size, read, write))

    def irq_line(self, irq: int, level: bool) -> None:
        self.irqs.append((irq, level))

    def outb(self, port: int, value: int) -> None:
        self.out[port](port, 1, value)

    def inb(self, port: int) -> int:
        return self.inp[port](port, 1) & 0xFF


COM1 = layout.PORT_SERIAL


def _uart() -> tuple[uart.Uart16550, FakeBoard, list[int]]:
    sent: list[int] = []
    device = uart.Uart16550(sent.append)
    board = FakeBoard()
    device.attach(board)
    return device, board, sent


def test_uart_transmits_and_reports_an_empty_transmitter() -> None:
    _, board, sent = _uart()
    for byte in b"hi\n":
        board.outb(COM1, byte)
    assert bytes(sent) == b"hi\n"
    assert board.inb(COM1 + uart.LSR) & (uart.LSR_THRE | uart.LSR_TEMT) == uart.LSR_THRE | uart.LSR_TEMT
    assert not board.inb(COM1 + uart.LSR) & uart.LSR_DR


def test_uart_loopback_fifo_order_overrun_and_divisor_latch() -> None:
    _, board, sent = _uart()
    board.outb(COM1 + uart.MCR, uart.MCR_LOOP | uart.MCR_RTS)
    board.outb(COM1 + uart.IIR_FCR, uart.FCR_ENABLE | uart.FCR_CLEAR_RX)
    for byte in range(17):  # one more than the FIFO holds
        board.outb(COM1, byte)
    assert sent == []  # loopback: nothing reaches the line
    lsr = board.inb(COM1 + uart.LSR)
    assert lsr & uart.LSR_DR and lsr & uart.LSR_OE
    assert not board.inb(COM1 + uart.LSR) & uart.LSR_OE  # reading LSR cleared it
    assert [board.inb(COM1) for _ in range(16)] == list(range(16))
    assert not board.inb(COM1 + uart.LSR) & uart.LSR_DR
    assert board.inb(COM1 + uart.MSR) & 0x10  # CTS follows RTS in loopback
    board.outb(COM1 + uart.LCR, uart.LCR_DLAB)
    board.outb(COM1, 0x01)  # divisor 1: 115200 baud, not a byte
    assert board.inb(COM1) == 0x01 and sent == []
    board.outb(COM1 + uart.LCR, 0x03)
    board.outb(COM1 + uart.SCR, 0x5A)
    assert board.inb(COM1 + uart.SCR) == 0x5A


def test_uart_interrupt_causes_priority_and_out2_gate() -> None:
    device, board, _ = _uart()
    board.outb(COM1 + uart.IER_DLM, uart.IER_THRE)
    assert board.irqs == []  # OUT2 low: the PC's gate keeps IRQ 4 quiet
    assert board.inb(COM1 + uart.IIR_FCR) & 0x0F == uart.IIR_THRE  # pending, and now acknowledged
    board.outb(COM1 + uart.MCR, uart.MCR_OUT2)
    assert board.irqs == []  # acknowledged: nothing to raise
    board.outb(COM1, ord("x"))  # the THR empties again at once
    assert board.irqs == [(layout.IRQ_SERIAL, True)]
    assert board.inb(COM1 + uart.IIR_FCR) & 0x0F == uart.IIR_THRE
    assert board.irqs[-1] == (layout.IRQ_SERIAL, False)
    # Received data outranks THR empty.
    board.outb(COM1 + uart.IER_DLM, uart.IER_RDA | uart.IER_THRE)
    device.host_bytes(b"ab")
    assert board.irqs[-1] == (layout.IRQ_SERIAL, True)
    assert board.inb(COM1 + uart.IIR_FCR) & 0x0F in (uart.IIR_RDA, uart.IIR_TIMEOUT)
    assert board.inb(COM1) == ord("a") and board.inb(COM1) == ord("b")
    # THR empty was acknowledged above and IER kept its bit: no cause left, the line drops.
    assert board.inb(COM1 + uart.IIR_FCR) & 0x0F == uart.IIR_NONE
    assert board.irqs[-1] == (layout.IRQ_SERIAL, False)


def test_uart_host_input_is_bounded_while_the_guest_does_not_read() -> None:
    device, board, _ = _uart()
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    written = 0
    with uart.HostInput(read_fd, device):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                written += os.write(write_fd, b"x" * 65536)
            except BlockingIOError:
                time.sleep(0.05)
            if written > 4 * uart.HOST_INPUT_MAX and not device.room_for_host_input():
                break
        held = len(device._host)  # noqa: SLF001 - the bound under test
    os.close(write_fd)
    os.close(read_fd)
    assert written > 2 * uart.HOST_INPUT_MAX  # the guest was offered more than the bound
    assert held <= uart.HOST_INPUT_MAX + 4096  # one read past the check at most
    assert board.inb(COM1) == ord("x")


def test_fw_cfg_items_rewind_and_unknown_items() -> None:
    device = FwCfg(128 << 20, cpus=1)
    board = FakeBoard()
    device.attach(board)

    def read(item: int, n: int) -> bytes:
        board.out[layout.PORT_FW_CFG](layout.PORT_FW_CFG, 2, item)
        return bytes(board.inb(layout.PORT_FW_CFG + 1) for _ in range(n))

    assert read(0x00, 4) == b"QEMU"
    assert read(0x00, 6) == b"QEMU\0\0"  # selecting rewinds; past the end reads zero
    assert struct.unpack("<Q", read(0x03, 8))[0] == 128 << 20
    assert struct.unpack("<H", read(0x05, 2))[0] == 1
    assert read(0x1234, 4) == b"\0\0\0\0"


def _tables() -> tuple[bytes, dict[bytes, int]]:
    image = build_tables(cpus=1)
    base = layout.BIOS_BASE

    def at(addr: int, n: int) -> bytes:
        return image[addr - base:addr - base + n]

    rsdp = image[:36]
    assert rsdp[:8] == b"RSD PTR " and checksum(rsdp[:20]) == 0 and checksum(rsdp) == 0
    rsdt_addr, xsdt_addr = struct.unpack_from("<I", rsdp, 16)[0], struct.unpack_from("<Q", rsdp, 24)[0]
    rsdt_len = struct.unpack("<I", at(rsdt_addr + 4, 4))[0]
    rsdt = at(rsdt_addr, rsdt_len)
    xsdt = at(xsdt_addr, struct.unpack("<I", at(xsdt_addr + 4, 4))[0])
    assert checksum(rsdt) == 0 and checksum(xsdt) == 0
    entries = struct.unpack_from(f"<{(len(rsdt) - 36) // 4}I", rsdt, 36)
    assert list(entries) == list(struct.unpack_from(f"<{(len(xsdt) - 36) // 8}Q", xsdt, 36))
    found = {}
    for addr in entries:
        table = at(addr, struct.unpack("<I", at(addr + 4, 4))[0])
        assert checksum(table) == 0, table[:4]
        found[table[:4]] = addr
    return image, found


def test_acpi_tables_checksums_madt_and_fadt() -> None:
    image, found = _tables()
    assert set(found) == {b"APIC", b"FACP"}
    madt_off = found[b"APIC"] - layout.BIOS_BASE
    madt = image[madt_off:madt_off + struct.unpack_from("<I", image, madt_off + 4)[0]]
    assert struct.unpack_from("<I", madt, 36)[0] == layout.LAPIC_BASE
    kinds, pos = [], 44
    while pos < len(madt):
        kinds.append(madt[pos])
        if madt[pos] == 1:
            assert struct.unpack_from("<II", madt, pos + 4) == (layout.IOAPIC_BASE, 0)
        pos += madt[pos + 1]
    assert kinds.count(0) == 1 and kinds.count(1) == 1
    fadt_off = found[b"FACP"] - layout.BIOS_BASE
    assert struct.unpack_from("<I", image, fadt_off + 76)[0] == layout.PORT_PM_TIMER
    assert struct.unpack_from("<Q", image, fadt_off + 116 + 4)[0] == layout.PORT_RESET_CONTROL


def test_testdev_echo_irq_lines_and_iomem() -> None:
    flushed: list[int] = []
    device = TestDev(flushed.append)
    board = FakeBoard()
    device.attach(board)
    board.out[layout.PORT_TESTDEV](layout.PORT_TESTDEV, 4, 0x12345678)
    assert board.inp[layout.PORT_TESTDEV](layout.PORT_TESTDEV, 4) == 0x12345678
    assert board.inp[layout.PORT_TESTDEV + 2](layout.PORT_TESTDEV + 2, 1) & 0xFF == 0x34
    board.outb(layout.PORT_TESTDEV_IRQ + 10, 1)
    assert board.irqs == [(10, True)]
    board.out[layout.PORT_TESTDEV_FLUSH_PAGE](layout.PORT_TESTDEV_FLUSH_PAGE, 4, 0x123456)
    assert flushed == [0x123000]
    (base, size, read, write), = board.mmio
    write(base + size - 2, 4, 0xAABBCCDD)  # straddles the end: cut, not grown
    assert read(base + size - 2, 2) == 0xCCDD
    assert read(base, 4) == 0


# --- the pc guest ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pc_image(kvm: str) -> Path:
    return build_guest("pc")


def test_pc_guest_passes_on_the_board_and_matches_qemu(pc_image: Path, qemu: str) -> None:
    with Machine(pc_image, memory_mib=128, timeout=60) as machine:
        ours = machine.run()
    assert ours.exit_status == 0, ours.console
    lines = pass_lines(ours.console)
    assert len(lines) >= 20 and not [l for l in ours.console.splitlines() if l.startswith("FAIL")]
    bare = run_qemu(qemu, pc_image)
    assert bare.returncode == (0 << 1) | 1, bare.stdout + bare.stderr
    assert pass_lines(bare.stdout) == lines


def test_pc_guest_at_ring0_under_the_rom(pc_image: Path) -> None:
    with Session(pc_image, rom="full", privilege="ring0", timeout=60) as session:
        result = session.run()
    assert result.exit_status == 0, result.console


def test_pc_guest_refuses_to_run_deprivileged(pc_image: Path) -> None:
    with Session(pc_image, rom="full", timeout=60) as session:
        result = session.run()
    assert result.exit_status == 2 and "PC-SETUP failed" in result.console


@pytest.mark.parametrize("how, said", [("cf9", "port 0xcf9"), ("kbc", "keyboard controller"), ("92", "port 0x92")])
def test_reset_ends_the_run_and_says_how(pc_image: Path, how: str, said: str) -> None:
    with Machine(pc_image, timeout=60, cmdline=f"reset={how}") as machine:
        result = machine.run()
    assert result.reset == said and result.summary()["reset"] == said
    assert "still running after the reset" not in result.console


def test_halt_with_interrupts_disabled_is_still_a_crash(pc_image: Path) -> None:
    start = time.monotonic()
    with Machine(pc_image, timeout=60, cmdline="halt") as machine:
        with pytest.raises(GuestCrash, match="halted"):
            machine.run()
    assert time.monotonic() - start < 30  # found by the halt probe, not by the watchdog


def _vmikit(*args: str, **kwargs: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "vmikit", "run", *args], capture_output=True, timeout=120,
                          **kwargs)  # type: ignore[call-overload, no-any-return]


def test_console_input_from_a_pipe_reaches_the_guest(pc_image: Path) -> None:
    proc = _vmikit(str(pc_image), "--rom", "none", "--cmdline", "echo", input=b"hello board\n")
    assert proc.returncode == 0, proc.stderr
    assert b"ECHO: hello board\n" in proc.stdout


def test_cli_says_the_guest_reset_the_machine(pc_image: Path) -> None:
    proc = _vmikit(str(pc_image), "--rom", "none", "--cmdline", "reset=kbc", stdin=subprocess.DEVNULL)
    assert proc.returncode == 0
    assert proc.stderr.decode().strip().splitlines()[-1].startswith(
        "vmikit: the guest reset the machine (keyboard controller)")


def test_a_halted_guest_waiting_for_its_timer_leaves_the_host_cpu_idle(pc_image: Path) -> None:
    """3 s of HLT between LAPIC ticks: the process's own CPU time stays far below the wall time
    (in-kernel HLT sleeps; a busy-waiting VMM would use all of it)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    proc = _vmikit(str(pc_image), "--rom", "none", "--cmdline", "sleep=3000", stdin=subprocess.DEVNULL)
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert proc.returncode == 0 and b"SLEPT: 3000 ms in 300 ticks" in proc.stdout, proc.stdout[-500:]
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert wall > 3.0
    assert cpu < wall - 2.0, (cpu, wall)  # at least 2 of the 3 halted seconds cost no CPU
