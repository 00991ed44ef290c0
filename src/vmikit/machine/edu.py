"""QEMU's `edu` educational PCI device (QEMU's docs/specs/edu.rst), the device kvm-unit-tests'
intel_iommu case drives: an ID, a liveness check, a factorial unit, an interrupt raise/acknowledge
pair and a DMA engine with a 4 KiB buffer.

Differences from QEMU's, by design: the factorial and the DMA complete when their command is
written (QEMU computes in a thread and runs DMA from a 100 ms timer; the status and command bits
that say "busy" are therefore clear by the time the guest can read them), DMA addresses are not
clamped to 28 bits, and a transfer outside the buffer is refused and counted (QEMU aborts).
"""

from __future__ import annotations

from vmikit.machine import layout
from vmikit.machine.pci import DmaFault, PciDevice

ID = 0x010000ED  # version 1.0, "ed"
REG_ID, REG_ALIVE, REG_FACTORIAL, REG_STATUS, REG_INTR_STATUS = 0x00, 0x04, 0x08, 0x20, 0x24
REG_INTR_RAISE, REG_INTR_ACK = 0x60, 0x64
REG_DMA_SRC, REG_DMA_DST, REG_DMA_COUNT, REG_DMA_CMD = 0x80, 0x88, 0x90, 0x98
STATUS_COMPUTING, STATUS_IRQ_FACTORIAL = 0x01, 0x80
DMA_START, DMA_FROM_DEVICE, DMA_IRQ = 0x01, 0x02, 0x04
IRQ_FACTORIAL, IRQ_DMA = 0x00000001, 0x00000100
DMA_BUFFER, DMA_BUFFER_SIZE = 0x40000, 4096  # the buffer's device address and size


def factorial32(n: int) -> int:
    """n! modulo 2**32, as the device's 32-bit multiplier computes it (0 from 34! on: 2**32 divides it)."""
    if n >= 34:
        return 0
    result = 1
    for i in range(2, n + 1):
        result = result * i & 0xFFFFFFFF
    return result


class Edu(PciDevice):
    vendor, device, class_code, revision = 0x1234, 0x11E8, 0xFF0000, 0x10
    subsystem = (0x1AF4, 0x1100)  # QEMU's defaults
    bar_sizes = (layout.MiB,)
    interrupt_pin = 1
    msi = True

    def __init__(self) -> None:
        super().__init__()
        self.alive = 0  # what reading REG_ALIVE returns (the inverse of the last write)
        self.fact = 0
        self.status = 0
        self.irq_status = 0
        self.dma_src = self.dma_dst = self.dma_count = self.dma_cmd = 0
        self.buffer = bytearray(DMA_BUFFER_SIZE)
        self.dma_failures = 0
        self.last_dma_error: str | None = None

    def mmio_read(self, bar: int, offset: int, size: int) -> int:
        ones = (1 << 8 * size) - 1
        if size != 4 and not (offset >= REG_DMA_SRC and size == 8):
            return ones  # registers below 0x80 are 32-bit, the DMA ones 32- or 64-bit
        value = {REG_ID: ID, REG_ALIVE: self.alive, REG_FACTORIAL: self.fact, REG_STATUS: self.status,
                 REG_INTR_STATUS: self.irq_status, REG_DMA_SRC: self.dma_src, REG_DMA_DST: self.dma_dst,
                 REG_DMA_COUNT: self.dma_count, REG_DMA_CMD: self.dma_cmd}.get(offset)
        return ones if value is None else value & ones

    def mmio_write(self, bar: int, offset: int, size: int, value: int) -> None:
        if size != 4 and not (offset >= REG_DMA_SRC and size == 8):
            return
        if offset == REG_ALIVE:
            self.alive = ~value & 0xFFFFFFFF
        elif offset == REG_FACTORIAL:
            self.fact = factorial32(value & 0xFFFFFFFF)
            if self.status & STATUS_IRQ_FACTORIAL:
                self.raise_irq(IRQ_FACTORIAL)
        elif offset == REG_STATUS:
            self.status = value & STATUS_IRQ_FACTORIAL
        elif offset == REG_INTR_RAISE:
            self.raise_irq(value & 0xFFFFFFFF)
        elif offset == REG_INTR_ACK:
            self.lower_irq(value & 0xFFFFFFFF)
        elif offset == REG_DMA_SRC:
            self.dma_src = value
        elif offset == REG_DMA_DST:
            self.dma_dst = value
        elif offset == REG_DMA_COUNT:
            self.dma_count = value
        elif offset == REG_DMA_CMD and value & DMA_START:
            self.dma_cmd = value & (DMA_START | DMA_FROM_DEVICE | DMA_IRQ)
            self._dma()

    def _dma(self) -> None:
        """One transfer between the buffer and DMA space; the guest's addresses and count are checked
        against the buffer, and a blocked or failed transfer is recorded, never raised."""
        to_ram = bool(self.dma_cmd & DMA_FROM_DEVICE)
        device_addr, ram_addr = (self.dma_src, self.dma_dst) if to_ram else (self.dma_dst, self.dma_src)
        count = self.dma_count
        start = device_addr - DMA_BUFFER
        try:
            if not (0 <= start and count <= DMA_BUFFER_SIZE and start + count <= DMA_BUFFER_SIZE):
                raise DmaFault(f"[{device_addr:#x}, +{count:#x}) is outside the device's buffer "
                               f"[{DMA_BUFFER:#x}, +{DMA_BUFFER_SIZE:#x})")
            if to_ram:
                self.dma_write(ram_addr, bytes(self.buffer[start:start + count]))
            else:
                self.buffer[start:start + count] = self.dma_read(ram_addr, count)
        except DmaFault as exc:
            self.dma_failures += 1
            self.last_dma_error = str(exc)
        self.dma_cmd &= ~DMA_START
        if self.dma_cmd & DMA_IRQ:
            self.raise_irq(IRQ_DMA)

    def raise_irq(self, bits: int) -> None:
        """QEMU's rule: every raise with a status left sends a message (MSI on) or asserts INTx."""
        self.irq_status |= bits
        if self.irq_status:
            if self.msi_enabled:
                self.send_msi()
            else:
                self.set_intx(True)

    def lower_irq(self, bits: int) -> None:
        self.irq_status &= ~bits
        if not self.irq_status and not self.msi_enabled:
            self.set_intx(False)
