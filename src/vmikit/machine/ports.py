"""What a device sees of the board: port and MMIO handler registration, interrupt lines, and, for
bus masters (machine/pci.py, vtd.py), guest-physical memory, MSI delivery and the IOAPIC's entries.

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

    def phys_read(self, gpa: int, length: int) -> bytes:
        """A bus master's read of guest-physical memory (RAM or ROM; never the hypervisor's own).
        Raises GuestMemoryError where nothing is."""
        ...

    def phys_write(self, gpa: int, data: bytes) -> None:
        """A bus master's write: only RAM the guest itself may write. Raises GuestMemoryError otherwise."""
        ...

    def signal_msi(self, address: int, data: int) -> bool:
        """Deliver a compatibility-format MSI to the LAPICs; False if no LAPIC took it."""
        ...

    def ioapic_entry(self, pin: int) -> int:
        """The IOAPIC redirection entry of ``pin`` as the guest last wrote it."""
        ...


class Device(Protocol):
    def attach(self, board: Ports) -> None: ...
