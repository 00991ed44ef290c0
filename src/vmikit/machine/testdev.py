"""QEMU's pc-testdev, which kvm-unit-tests drives: an echo register, interrupt lines, a page
flush, and a window of RAM every access to which exits (for the emulator's tests).

Under ``vmikit bench`` the bench's marker handler takes the echo port (layout.PORT_BENCH).
"""

from __future__ import annotations

from collections.abc import Callable

from vmikit.machine import layout
from vmikit.machine.ports import Ports

IRQ_LINES = 24  # the IOAPIC's pins


class TestDev:
    __test__ = False  # not a pytest class

    def __init__(self, flush_page: Callable[[int], None]) -> None:
        self._flush_page = flush_page
        self._echo = 0
        self._iomem = bytearray(layout.TESTDEV_IOMEM_SIZE)
        self._board: Ports | None = None

    def attach(self, board: Ports) -> None:
        self._board = board
        for offset in range(4):
            board.on_out(layout.PORT_TESTDEV + offset, self._echo_write)
            board.on_in(layout.PORT_TESTDEV + offset, self._echo_read)
        board.on_out(layout.PORT_TESTDEV_FLUSH_PAGE, lambda port, size, value: self._flush_page(value & ~0xFFF))
        for line in range(IRQ_LINES):
            board.on_out(layout.PORT_TESTDEV_IRQ + line, self._irq)
        board.on_mmio(layout.TESTDEV_IOMEM_BASE, layout.TESTDEV_IOMEM_SIZE, self._iomem_read, self._iomem_write)

    def _echo_write(self, port: int, size: int, value: int) -> None:
        shift = 8 * (port - layout.PORT_TESTDEV)
        mask = ((1 << (8 * size)) - 1) << shift
        self._echo = ((self._echo & ~mask) | ((value << shift) & mask)) & 0xFFFFFFFF

    def _echo_read(self, port: int, size: int) -> int:
        return self._echo >> (8 * (port - layout.PORT_TESTDEV))

    def _irq(self, port: int, size: int, value: int) -> None:
        assert self._board is not None
        self._board.irq_line(port - layout.PORT_TESTDEV_IRQ, bool(value & 1))

    def _iomem_read(self, addr: int, size: int) -> int:
        offset = addr - layout.TESTDEV_IOMEM_BASE
        return int.from_bytes(self._iomem[offset:offset + size].ljust(size, b"\0"), "little")

    def _iomem_write(self, addr: int, size: int, value: int) -> None:
        offset = addr - layout.TESTDEV_IOMEM_BASE
        end = min(offset + size, len(self._iomem))
        self._iomem[offset:end] = value.to_bytes(size, "little")[:end - offset]
