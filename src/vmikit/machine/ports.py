"""What a device sees of the board: port and MMIO handler registration and interrupt lines.

Devices (uart, fwcfg, chipset, testdev) depend on this and nothing else of the board, and the
board (board.py) attaches them; the dependency goes one way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

OutHandler = Callable[[int, int, int], None]  # (port or address, size, value)
InHandler = Callable[[int, int], int]  # (port or address, size) -> value


class Ports(Protocol):
    def on_out(self, port: int, handler: OutHandler) -> None: ...

    def on_in(self, port: int, handler: InHandler) -> None: ...

    def on_mmio(self, base: int, size: int, read: InHandler, write: OutHandler) -> None:
        """Accesses to [base, base+size) of guest-physical space nothing else maps."""
        ...

    def irq_line(self, irq: int, level: bool) -> None: ...


class Device(Protocol):
    def attach(self, board: Ports) -> None: ...
