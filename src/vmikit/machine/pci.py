"""PCI bus 0: configuration mechanism #1, a host bridge, a device base class, and the firmware's
resource assignment (the board boots kernels with no BIOS, so it places BARs as SeaBIOS would).

Devices are bus masters through the bus: their DMA and MSIs go upstream through an optional
remapping unit (vtd.py) before they reach guest memory or the LAPICs; their INTx pins reach IOAPIC
pins. What is not modelled: I/O BARs, 64-bit and prefetchable BARs, expansion ROMs, bridges (one
bus), PCIe extended configuration space, the status register's error bits (docs/board.md).
"""

from __future__ import annotations

from typing import Protocol

from vmikit.machine import layout
from vmikit.machine.ports import Ports
from vmikit.memory import GuestMemoryError

BOARD_DEVICES = ("edu", "intel-iommu")  # the names `vmikit run --device` takes

# Configuration-space offsets (PCI Local Bus spec, type 0 header).
VENDOR_ID, DEVICE_ID, COMMAND, STATUS, REVISION = 0x00, 0x02, 0x04, 0x06, 0x08
CLASS_PROG, HEADER_TYPE, BAR0, SUBSYSTEM_VENDOR, CAP_POINTER = 0x09, 0x0E, 0x10, 0x2C, 0x34
INTERRUPT_LINE, INTERRUPT_PIN = 0x3C, 0x3D
CMD_IO, CMD_MEMORY, CMD_MASTER, CMD_INTX_DISABLE = 1 << 0, 1 << 1, 1 << 2, 1 << 10
STATUS_INTERRUPT, STATUS_CAP_LIST = 1 << 3, 1 << 4
CAP_ID_MSI = 0x05
MSI_CAP = 0x40  # where a device's MSI capability sits (QEMU's first free offset too)
MSI_ENABLE, MSI_64BIT = 1 << 0, 1 << 7
CONFIG_SIZE = 256
BAR_COUNT = 6


class DmaFault(Exception):
    """A bus master's access that the remapping unit blocked or that reached no memory."""


class Remapper(Protocol):
    """What the bus asks of a remapping unit (vtd.VtdUnit) on a device's behalf."""

    def translate(self, sid: int, addr: int, write: bool) -> int:
        """The guest-physical address of DMA address ``addr``; raises DmaFault when blocked."""
        ...

    def remap_msi(self, sid: int | None, address: int, data: int) -> tuple[int, int] | None:
        """The compatibility-format (address, data) to deliver, or None when blocked."""
        ...

    def remap_ioapic(self, entry: int) -> tuple[int, int] | None:
        """The message for an IOAPIC redirection entry in remappable format, or None when blocked."""
        ...

    @property
    def remapping_interrupts(self) -> bool: ...


def source_id(bus: int, devfn: int) -> int:
    return bus << 8 | devfn


class PciDevice:
    """A type 0 function: configuration space with write masks (a BAR's mask is what sizing reads
    back), 32-bit memory BARs, an interrupt pin and optionally a 64-bit MSI capability."""

    vendor = 0xFFFF
    device = 0xFFFF
    class_code = 0  # class << 16 | subclass << 8 | prog-if
    revision = 0
    subsystem = (0, 0)  # subsystem vendor, subsystem ID
    bar_sizes: tuple[int, ...] = ()  # memory BARs, powers of two of at least 16 bytes
    interrupt_pin = 0  # 1 = INTA#
    msi = False

    def __init__(self) -> None:
        self.config = bytearray(CONFIG_SIZE)
        self.wmask = bytearray(CONFIG_SIZE)
        self.bus: PciBus | None = None
        self.devfn = 0
        self.intx = False  # the device's own interrupt condition (before INTx disable)
        self._set(VENDOR_ID, 2, self.vendor)
        self._set(DEVICE_ID, 2, self.device)
        self._set(REVISION, 4, self.class_code << 8 | self.revision)
        self._set(SUBSYSTEM_VENDOR, 4, self.subsystem[1] << 16 | self.subsystem[0])
        self._set(INTERRUPT_PIN, 1, self.interrupt_pin)
        self._mask(COMMAND, 2, CMD_MEMORY | CMD_MASTER | CMD_INTX_DISABLE)
        self._mask(INTERRUPT_LINE, 1, 0xFF)
        for i, size in enumerate(self.bar_sizes):
            assert size >= 16 and size & (size - 1) == 0
            self._mask(BAR0 + 4 * i, 4, ~(size - 1) & 0xFFFFFFF0)
        if self.msi:
            self._set(STATUS, 2, STATUS_CAP_LIST)
            self._set(CAP_POINTER, 1, MSI_CAP)
            self._set(MSI_CAP, 4, MSI_64BIT << 16 | CAP_ID_MSI)  # next = 0, one vector, no masking
            self._mask(MSI_CAP + 2, 2, MSI_ENABLE)
            self._mask(MSI_CAP + 4, 4, 0xFFFFFFFC)
            self._mask(MSI_CAP + 8, 4, 0xFFFFFFFF)
            self._mask(MSI_CAP + 12, 2, 0xFFFF)

    # --- configuration space ------------------------------------------

    def _set(self, offset: int, size: int, value: int) -> None:
        self.config[offset:offset + size] = (value & ((1 << 8 * size) - 1)).to_bytes(size, "little")

    def _mask(self, offset: int, size: int, value: int) -> None:
        self.wmask[offset:offset + size] = (value & ((1 << 8 * size) - 1)).to_bytes(size, "little")

    def get(self, offset: int, size: int) -> int:
        return int.from_bytes(self.config[offset:offset + size], "little")

    def config_read(self, offset: int, size: int) -> int:
        return self.get(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        """Bits outside the write mask keep their value: read-only and unimplemented registers
        (which read 0) drop what is written."""
        for i in range(size):
            byte = value >> 8 * i & 0xFF
            mask = self.wmask[offset + i]
            self.config[offset + i] = (self.config[offset + i] & ~mask & 0xFF) | (byte & mask)
        if offset <= COMMAND + 1 and offset + size > COMMAND:
            self._update_intx()

    @property
    def command(self) -> int:
        return self.get(COMMAND, 2)

    def bar_address(self, index: int) -> int:
        return self.get(BAR0 + 4 * index, 4) & 0xFFFFFFF0

    # --- the device's side: register accesses and bus mastering --------

    def mmio_read(self, bar: int, offset: int, size: int) -> int:
        return (1 << 8 * size) - 1

    def mmio_write(self, bar: int, offset: int, size: int, value: int) -> None:
        pass

    @property
    def sid(self) -> int:
        return source_id(0, self.devfn)

    def _master(self) -> PciBus | None:
        """The bus, if this function may master it (on a bus, the command register's bit set)."""
        return self.bus if self.command & CMD_MASTER else None

    def dma_read(self, addr: int, length: int) -> bytes:
        bus = self._master()
        if bus is None:
            raise DmaFault("bus mastering is disabled in the command register")
        return bus.dma_read(self.sid, addr, length)

    def dma_write(self, addr: int, data: bytes) -> None:
        bus = self._master()
        if bus is None:
            raise DmaFault("bus mastering is disabled in the command register")
        bus.dma_write(self.sid, addr, data)

    @property
    def msi_enabled(self) -> bool:
        return self.msi and bool(self.get(MSI_CAP + 2, 2) & MSI_ENABLE)

    def send_msi(self) -> None:
        """The MSI capability's message, as a posted write from this device (needs bus mastering)."""
        bus = self._master()
        if bus is None:
            return  # a function that may not master the bus cannot send a message
        address = self.get(MSI_CAP + 4, 4) | self.get(MSI_CAP + 8, 4) << 32
        bus.msi(self.sid, address, self.get(MSI_CAP + 12, 2))

    def set_intx(self, level: bool) -> None:
        self.intx = level
        self._update_intx()

    def _update_intx(self) -> None:
        status = self.get(STATUS, 2) & ~STATUS_INTERRUPT
        self._set(STATUS, 2, status | (STATUS_INTERRUPT if self.intx else 0))
        if self.bus is not None and self.interrupt_pin:
            self.bus.intx(self, self.intx and not self.command & CMD_INTX_DISABLE)


class HostBridge(PciDevice):
    """00.0: Intel's q35 MCH IDs, no BARs (the remapping unit's registers are a fixed address)."""

    vendor, device, class_code, revision = 0x8086, 0x29C0, 0x060000, 0x02


class PciBus:
    """Bus 0 behind configuration mechanism #1, with the host bridge at 00.0."""

    def __init__(self, remapper: Remapper | None = None) -> None:
        self.devices: dict[int, PciDevice] = {}
        self.remapper = remapper
        self._address = 0
        self._board: Ports | None = None
        self._asserting: dict[int, set[int]] = {}  # GSI -> devfns driving it
        self._gsi_of: dict[int, int] = {}
        self.dma_faults = 0  # bus-master accesses blocked or reaching no memory
        self.add(HostBridge())

    def add(self, device: PciDevice) -> PciDevice:
        """Into the next free slot (function 0)."""
        slot = next(s for s in range(32) if s << 3 not in self.devices)
        device.devfn, device.bus = slot << 3, self
        self.devices[device.devfn] = device
        return device

    def attach(self, board: Ports) -> None:
        self._board = board
        board.on_out(layout.PORT_PCI_CONFIG_ADDRESS, self._address_out)
        board.on_in(layout.PORT_PCI_CONFIG_ADDRESS, self._address_in)
        for port in range(layout.PORT_PCI_CONFIG_DATA, layout.PORT_PCI_CONFIG_DATA + 4):
            board.on_out(port, self._data_out)
            board.on_in(port, self._data_in)
        board.on_mmio(layout.PCI_MMIO_BASE, layout.PCI_MMIO_SIZE, self._mmio_read, self._mmio_write)
        self.assign_resources()

    def assign_resources(self) -> None:
        """What SeaBIOS does before a kernel runs: BARs placed in the window (naturally aligned,
        in slot order), memory decoding on, and the interrupt line register set to the GSI the
        function's pin reaches (swizzled by slot as on a PC: IOAPIC pins 16-19)."""
        next_free = layout.PCI_MMIO_BASE
        for devfn, device in sorted(self.devices.items()):
            for i, size in enumerate(device.bar_sizes):
                next_free = -(-next_free // size) * size
                assert next_free + size <= layout.PCI_MMIO_BASE + layout.PCI_MMIO_SIZE
                device.config_write(BAR0 + 4 * i, 4, next_free)
                next_free += size
            if device.bar_sizes:
                device.config_write(COMMAND, 2, device.command | CMD_MEMORY)
            if device.interrupt_pin:
                gsi = layout.PCI_IRQ_BASE + ((devfn >> 3) + device.interrupt_pin - 1) % 4
                self._gsi_of[devfn] = gsi
                device.config_write(INTERRUPT_LINE, 1, gsi)

    # --- configuration mechanism #1 ---------------------------------------

    def _address_out(self, port: int, size: int, value: int) -> None:
        if size == 4:  # narrower accesses to 0xCF8 are not the address register
            # Bits 1:0 are reserved on Intel's chipsets, but QEMU's host bridge adds them to the
            # register offset and kvm-unit-tests' lib relies on it (outl(reg 2), inw(0xCFC)): so here too.
            self._address = value & 0x80FFFFFF

    def _address_in(self, port: int, size: int) -> int:
        return self._address if size == 4 else (1 << 8 * size) - 1

    def _target(self, port: int, size: int) -> tuple[PciDevice, int] | None:
        offset = (self._address & 0xFF) + (port - layout.PORT_PCI_CONFIG_DATA)
        if not self._address & 1 << 31:
            return None
        bus, devfn = self._address >> 16 & 0xFF, self._address >> 8 & 0xFF
        device = self.devices.get(devfn) if bus == 0 else None
        return (device, offset) if device is not None and offset + size <= CONFIG_SIZE else None

    def _data_in(self, port: int, size: int) -> int:
        target = self._target(port, size)
        return target[0].config_read(target[1], size) if target else (1 << 8 * size) - 1

    def _data_out(self, port: int, size: int, value: int) -> None:
        target = self._target(port, size)
        if target:
            target[0].config_write(target[1], size, value)

    # --- memory decoding ---------------------------------------------------

    def _decode(self, addr: int, size: int) -> tuple[PciDevice, int, int] | None:
        for device in self.devices.values():
            if not device.command & CMD_MEMORY:
                continue
            for i, bar_size in enumerate(device.bar_sizes):
                base = device.bar_address(i)
                if base <= addr and addr + size <= base + bar_size:
                    return device, i, addr - base
        return None

    def _mmio_read(self, addr: int, size: int) -> int:
        hit = self._decode(addr, size)
        return hit[0].mmio_read(hit[1], hit[2], size) if hit else (1 << 8 * size) - 1

    def _mmio_write(self, addr: int, size: int, value: int) -> None:
        hit = self._decode(addr, size)
        if hit:
            hit[0].mmio_write(hit[1], hit[2], size, value)

    # --- upstream: DMA, MSI, INTx -------------------------------------------

    def _pages(self, sid: int, addr: int, length: int, write: bool) -> list[tuple[int, int, int]]:
        """(gpa, offset into the transfer, length) per 4 KiB page, every page translated before any
        byte moves (a transfer the remapping unit blocks anywhere moves nothing)."""
        out = []
        done = 0
        while done < length:
            here = addr + done
            chunk = min(length - done, layout.PAGE_SIZE - (here & (layout.PAGE_SIZE - 1)))
            gpa = self.remapper.translate(sid, here, write) if self.remapper is not None else here
            out.append((gpa, done, chunk))
            done += chunk
        return out

    def dma_read(self, sid: int, addr: int, length: int) -> bytes:
        assert self._board is not None
        try:
            return b"".join(self._board.phys_read(gpa, n) for gpa, _, n in self._pages(sid, addr, length, False))
        except (DmaFault, GuestMemoryError) as exc:
            self.dma_faults += 1
            raise DmaFault(str(exc)) from None

    def dma_write(self, sid: int, addr: int, data: bytes) -> None:
        assert self._board is not None
        try:
            # Pages that reach no writable RAM fail as they come (earlier pages are written, as
            # a bus transfer's other transactions would be); the remapping unit checked them all.
            for gpa, start, n in self._pages(sid, addr, len(data), True):
                self._board.phys_write(gpa, data[start:start + n])
        except (DmaFault, GuestMemoryError) as exc:
            self.dma_faults += 1
            raise DmaFault(str(exc)) from None

    def msi(self, sid: int, address: int, data: int) -> None:
        """A posted write: to the LAPIC range an interrupt message (remapped if the unit says so),
        elsewhere a DMA write of the data."""
        assert self._board is not None
        if address >> 20 != layout.MSI_ADDRESS_BASE >> 20:
            try:
                self.dma_write(sid, address, (data & 0xFFFFFFFF).to_bytes(4, "little"))
            except DmaFault:
                pass  # recorded; a posted write has no one to report to
            return
        message: tuple[int, int] | None = (address, data)
        if self.remapper is not None:
            message = self.remapper.remap_msi(sid, address, data)
        if message is not None:
            self._board.signal_msi(*message)

    def intx(self, device: PciDevice, level: bool) -> None:
        """Wired-OR per IOAPIC pin. With interrupt remapping on and the pin's entry in remappable
        format, a rising edge becomes the remapped message (edge semantics: see docs/board.md);
        otherwise the in-kernel IOAPIC gets the line."""
        assert self._board is not None
        gsi = self._gsi_of.get(device.devfn)
        if gsi is None:
            return
        drivers = self._asserting.setdefault(gsi, set())
        before = bool(drivers)
        (drivers.add if level else drivers.discard)(device.devfn)
        after = bool(drivers)
        if before == after:
            return
        if self.remapper is not None and self.remapper.remapping_interrupts:
            entry = self._board.ioapic_entry(gsi)
            if entry >> 48 & 1:  # remappable format
                if after and not entry >> 16 & 1:
                    remapped = self.remapper.remap_ioapic(entry)
                    if remapped is not None:
                        self._board.signal_msi(*remapped)
                return
        self._board.irq_line(gsi, after)
