"""The PCI bus, QEMU's edu device and the VT-d unit (machine/pci.py, edu.py, vtd.py): devices
against a GuestMemory behind a small board, the two KVM ioctls they need, the DMAR, and
kvm-unit-tests' intel_iommu case end to end when a built tree is at hand."""

from __future__ import annotations

import ctypes
import random
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from helpers import vmikit
from test_board import FakeBoard
from vmikit.errors import UsageError
from vmikit.kut.runner import vmikit_devices
from vmikit.kut.suite import load_cases
from vmikit.kvm import api, ioctl
from vmikit.machine import edu as E, layout, vtd as V
from vmikit.machine.acpi import build_tables, checksum
from vmikit.machine.board import Machine
from vmikit.machine.pci import BAR0, COMMAND, DmaFault, PciBus
from vmikit.memory import GuestMemory, GuestMemoryError, Region

RAM = 0x400000


class Board(FakeBoard):
    """FakeBoard's Ports and what a bus master adds: MSIs, the IOAPIC's entries and 4 MiB of RAM."""

    def __init__(self) -> None:
        super().__init__()
        self.msis: list[tuple[int, int]] = []
        self.rte = [1 << 16] * 24  # masked, as after reset
        self.memory = GuestMemory()
        self.memory.add(Region(0, RAM))
        self.memory.add(Region(RAM, 0x1000, readonly=True, kind="rom", name="rom"))

    def phys_read(self, gpa: int, length: int) -> bytes:
        return self.memory.read(gpa, length)

    def phys_write(self, gpa: int, data: bytes) -> None:
        if not self.memory.writable_by_guest(gpa, len(data)):
            raise GuestMemoryError(gpa, len(data))
        self.memory.write(gpa, data)

    def signal_msi(self, address: int, data: int) -> bool:
        self.msis.append((address, data))
        return True

    def ioapic_entry(self, pin: int) -> int:
        return self.rte[pin]

    # the guest's side
    def config(self, devfn: int, reg: int, size: int, value: int | None = None) -> int:
        self.out[0xCF8](0xCF8, 4, 1 << 31 | devfn << 8 | reg & 0xFC)
        port = 0xCFC + (reg & 3)
        if value is None:
            return self.inp[port](port, size)
        self.out[port](port, size, value)
        return 0

    def mem_read(self, addr: int, size: int = 4) -> int:
        base, length, read, _ = next(m for m in self.mmio if m[0] <= addr < m[0] + m[1])
        return read(addr, size)

    def mem_write(self, addr: int, value: int, size: int = 4) -> None:
        base, length, _, write = next(m for m in self.mmio if m[0] <= addr < m[0] + m[1])
        write(addr, size, value)


def _machine(iommu: bool = False) -> tuple[Board, PciBus, E.Edu, V.VtdUnit | None]:
    board = Board()
    unit = V.VtdUnit() if iommu else None
    bus = PciBus(unit)
    device = bus.add(E.Edu())
    assert isinstance(device, E.Edu)
    bus.attach(board)
    if unit is not None:
        unit.attach(board)
    return board, bus, device, unit


EDU_DEVFN = 0x08
EDU_BAR = layout.PCI_MMIO_BASE


# --- configuration space -------------------------------------------------


def test_config_space_ids_at_every_width_and_offset() -> None:
    board, *_ = _machine()
    assert board.config(0, 0, 4) == 0x29C08086  # q35 MCH
    assert board.config(0, 0x0A, 2) == 0x0600  # host bridge class
    assert board.config(EDU_DEVFN, 0, 2) == 0x1234 and board.config(EDU_DEVFN, 2, 2) == 0x11E8
    assert board.config(EDU_DEVFN, 3, 1) == 0x11 and board.config(EDU_DEVFN, 0x0B, 1) == 0xFF
    assert board.config(EDU_DEVFN, 0x3D, 1) == 1  # INTA#
    # QEMU's decoding that kvm-unit-tests relies on: CF8's bits 1:0 add to the offset.
    board.out[0xCF8](0xCF8, 4, 1 << 31 | EDU_DEVFN << 8 | 2)
    assert board.inp[0xCFC](0xCFC, 2) == 0x11E8
    assert board.config(0x10, 0, 4) == 0xFFFFFFFF  # no device in slot 2
    board.out[0xCF8](0xCF8, 4, EDU_DEVFN << 8)  # enable bit clear: no configuration cycle
    assert board.inp[0xCFC](0xCFC, 4) == 0xFFFFFFFF
    board.out[0xCF8](0xCF8, 4, 1 << 31 | 1 << 16)  # bus 1 does not exist
    assert board.inp[0xCFC](0xCFC, 2) == 0xFFFF


def test_bar_sizing_firmware_assignment_and_memory_decoding() -> None:
    board, _, device, _ = _machine()
    assert board.config(EDU_DEVFN, BAR0, 4) == EDU_BAR  # placed by the board's firmware
    assert board.config(EDU_DEVFN, COMMAND, 2) & 2  # memory decoding on, bus mastering left to the driver
    assert board.config(EDU_DEVFN, 0x3C, 1) == layout.PCI_IRQ_BASE + 1  # slot 1, INTA#: GSI 17
    assert board.mem_read(EDU_BAR) == E.ID
    board.config(EDU_DEVFN, BAR0, 4, 0xFFFFFFFF)
    assert board.config(EDU_DEVFN, BAR0, 4) == 0xFFF00000  # 1 MiB, 32-bit memory
    assert board.config(EDU_DEVFN, BAR0 + 4, 4) == 0  # BAR1 unimplemented: reads 0
    board.config(EDU_DEVFN, BAR0, 4, EDU_BAR)
    board.config(EDU_DEVFN, COMMAND, 2, 0)
    assert board.mem_read(EDU_BAR) == 0xFFFFFFFF  # memory space off: nothing decodes
    board.config(EDU_DEVFN, COMMAND, 2, 2)
    assert board.mem_read(EDU_BAR) == E.ID
    board.config(EDU_DEVFN, 0x00, 4, 0)  # read-only and unimplemented registers drop writes
    board.config(EDU_DEVFN, 0x60, 4, 0x12345678)
    assert board.config(EDU_DEVFN, 0, 2) == 0x1234 and board.config(EDU_DEVFN, 0x60, 4) == 0


def test_msi_capability_is_listed_and_writable() -> None:
    board, *_ = _machine()
    assert board.config(EDU_DEVFN, 0x06, 2) & 0x10  # capability list
    cap = board.config(EDU_DEVFN, 0x34, 1)
    assert board.config(EDU_DEVFN, cap, 1) == 0x05 and board.config(EDU_DEVFN, cap + 1, 1) == 0
    assert board.config(EDU_DEVFN, cap + 2, 2) == 0x80  # 64-bit, one vector, disabled
    board.config(EDU_DEVFN, cap + 4, 4, 0xFEE00003)
    assert board.config(EDU_DEVFN, cap + 4, 4) == 0xFEE00000  # dword aligned


# --- edu ---------------------------------------------------------------------


def test_edu_liveness_and_factorial() -> None:
    board, _, device, _ = _machine()
    board.mem_write(EDU_BAR + E.REG_ALIVE, 0x12345678)
    assert board.mem_read(EDU_BAR + E.REG_ALIVE) == ~0x12345678 & 0xFFFFFFFF
    board.mem_write(EDU_BAR + E.REG_FACTORIAL, 10)
    assert board.mem_read(EDU_BAR + E.REG_FACTORIAL) == 3628800
    assert board.mem_read(EDU_BAR + E.REG_STATUS) & E.STATUS_COMPUTING == 0  # done at once
    assert E.factorial32(13) == 6227020800 & 0xFFFFFFFF and E.factorial32(0) == 1
    assert E.factorial32(0xFFFFFFFF) == 0  # no 4-billion-step loop: 2**32 divides 34!
    board.mem_write(EDU_BAR + E.REG_STATUS, E.STATUS_IRQ_FACTORIAL)
    board.mem_write(EDU_BAR + E.REG_FACTORIAL, 3)
    assert board.irqs == [(17, True)] and board.mem_read(EDU_BAR + E.REG_INTR_STATUS) == E.IRQ_FACTORIAL
    assert board.mem_read(EDU_BAR + E.REG_ID, 2) == 0xFFFF  # 32-bit registers only


def _dma(board: Board, src: int, dst: int, count: int, cmd: int) -> None:
    board.mem_write(EDU_BAR + E.REG_DMA_SRC, src, 8)
    board.mem_write(EDU_BAR + E.REG_DMA_DST, dst, 8)
    board.mem_write(EDU_BAR + E.REG_DMA_COUNT, count, 8)
    board.mem_write(EDU_BAR + E.REG_DMA_CMD, cmd | E.DMA_START)


def test_edu_dma_without_iommu_and_hostile_transfers() -> None:
    board, bus, device, _ = _machine()
    board.memory.write(0x10000, b"vmikit-dma-test!")
    _dma(board, 0x10000, E.DMA_BUFFER + 8, 16, 0)
    assert device.dma_failures == 1 and "bus mastering" in (device.last_dma_error or "")  # not enabled yet
    board.config(EDU_DEVFN, COMMAND, 2, board.config(EDU_DEVFN, COMMAND, 2) | 4)
    _dma(board, 0x10000, E.DMA_BUFFER + 8, 16, 0)
    _dma(board, E.DMA_BUFFER + 8, 0x20FFC, 16, E.DMA_FROM_DEVICE | E.DMA_IRQ)  # across a page boundary
    assert board.memory.read(0x20FFC, 16) == b"vmikit-dma-test!"
    assert board.mem_read(EDU_BAR + E.REG_DMA_CMD) & E.DMA_START == 0
    assert board.irqs[-1] == (17, True) and board.mem_read(EDU_BAR + E.REG_INTR_STATUS) == E.IRQ_DMA
    board.mem_write(EDU_BAR + E.REG_INTR_ACK, E.IRQ_DMA)
    assert board.irqs[-1] == (17, False)
    failures = device.dma_failures
    for src, dst, count, cmd in [(0x10000, E.DMA_BUFFER, 4097, 0),  # more than the buffer
                                 (0x10000, E.DMA_BUFFER + 4090, 16, 0),  # past its end
                                 (0x10000, E.DMA_BUFFER - 1, 4, 0),  # before it
                                 (1 << 63, E.DMA_BUFFER, 16, 0),  # no memory there
                                 (E.DMA_BUFFER, RAM, 16, E.DMA_FROM_DEVICE),  # into ROM
                                 (E.DMA_BUFFER, 1 << 64 - 1, 1 << 64 - 1, E.DMA_FROM_DEVICE)]:
        _dma(board, src, dst, count, cmd)
    assert device.dma_failures == failures + 6 and bus.dma_faults >= 2


def test_edu_msi_when_enabled() -> None:
    board, _, device, _ = _machine()
    board.config(EDU_DEVFN, COMMAND, 2, 6)
    board.config(EDU_DEVFN, 0x44, 4, 0xFEE01000)
    board.config(EDU_DEVFN, 0x4C, 2, 0x4041)
    board.config(EDU_DEVFN, 0x42, 2, 1)
    board.mem_write(EDU_BAR + E.REG_INTR_RAISE, 1)
    assert board.msis == [(0xFEE01000, 0x4041)] and board.irqs == []


# --- VT-d --------------------------------------------------------------------

ROOT, CONTEXT, L3, L2, L1, PAGE = 0x100000, 0x101000, 0x102000, 0x103000, 0x104000, 0x200000


def _tables(board: Board, context_low: int = L3 | 1, context_high: int = V.AW_39) -> None:
    mem = board.memory
    mem.write(ROOT, struct.pack("<QQ", CONTEXT | 1, 0))  # bus 0
    mem.write(CONTEXT + 16 * EDU_DEVFN, struct.pack("<QQ", context_low, context_high))
    mem.write_u64(L3, L2 | 3)
    mem.write_u64(L2, L1 | 3)  # IOVA 0-2 MiB: 4 KiB pages
    mem.write_u64(L2 + 8, 0x200000 | 0x80 | 1)  # IOVA 2-4 MiB: a read-only 2 MiB page at 2 MiB
    mem.write_u64(L1, PAGE | 3)  # IOVA 0 -> PAGE
    mem.write_u64(L1 + 8, (PAGE + 0x1000) | 1)  # IOVA 0x1000: read-only


def _enable(board: Board, unit: V.VtdUnit, *commands: int) -> None:
    for command in commands:
        board.mem_write(layout.VTD_BASE + V.GCMD, unit.status | command)


def _reg(board: Board, offset: int, size: int = 4) -> int:
    return board.mem_read(layout.VTD_BASE + offset, size)


def test_vtd_registers_after_reset() -> None:
    board, _, _, unit = _machine(iommu=True)
    assert _reg(board, V.VER) == 0x10 and _reg(board, V.GSTS) == 0 and _reg(board, V.FSTS) == 0
    cap, ecap = _reg(board, V.CAP, 8), _reg(board, V.ECAP, 8)
    assert cap >> 8 & 0x1F == 0b10 and cap >> 16 & 0x3F == 38 and cap >> 34 & 0xF == 1  # 39 bits, 2 MiB pages
    assert ecap & 0b11010 == 0b01010  # QI and IR, no EIM
    assert (ecap >> 8 & 0x3FF) * 16 == V.IOTLB_OFFSET and (cap >> 24 & 0x3FF) * 16 == V.FRCD_OFFSET
    assert _reg(board, V.CAP + 4) == cap >> 32  # 64-bit registers read as two halves too


def test_vtd_translation_permissions_and_super_pages() -> None:
    board, bus, device, unit = _machine(iommu=True)
    assert unit is not None
    _tables(board)
    board.mem_write(layout.VTD_BASE + V.RTADDR, ROOT, 8)
    _enable(board, unit, V.SRTP)
    assert _reg(board, V.GSTS) & V.SRTP and unit.translate(EDU_DEVFN, 0x123, False) == 0x123  # TE off
    _enable(board, unit, V.TE)
    assert unit.translate(EDU_DEVFN, 0x123, True) == PAGE + 0x123
    assert unit.translate(EDU_DEVFN, 0x200000 + 0x54321, False) == 0x254321  # 2 MiB page
    with pytest.raises(DmaFault):
        unit.translate(EDU_DEVFN, 0x1008, True)  # read-only 4 KiB page
    with pytest.raises(DmaFault):
        unit.translate(EDU_DEVFN, 0x200000, True)  # read-only 2 MiB page
    with pytest.raises(DmaFault):
        unit.translate(EDU_DEVFN, 1 << 39, False)  # beyond 39 bits
    low, high = unit.records[0]
    assert high >> 63 and high >> 32 & 0xFF == V.NO_WRITE and high & 0xFFFF == EDU_DEVFN and not high >> 62 & 1
    assert low == 0x1000
    assert unit.records[2][1] >> 32 & 0xFF == V.ADDRESS_TOO_WIDE
    assert _reg(board, V.FSTS) & V.FSTS_PPF
    # The edu's DMA goes through it: IOVA 0 is PAGE.
    board.config(EDU_DEVFN, COMMAND, 2, 6)
    board.memory.write(PAGE, b"\x78\x56\x34\x12")
    _dma(board, 0, E.DMA_BUFFER, 4, 0)
    _dma(board, E.DMA_BUFFER, 4, 4, E.DMA_FROM_DEVICE)
    assert board.memory.read(PAGE + 4, 4) == b"\x78\x56\x34\x12" and device.dma_failures == 0


def test_vtd_faults_for_non_present_entries_and_fpd() -> None:
    board, _, device, unit = _machine(iommu=True)
    assert unit is not None
    board.mem_write(layout.VTD_BASE + V.RTADDR, ROOT, 8)
    _enable(board, unit, V.SRTP, V.TE)
    with pytest.raises(DmaFault):
        unit.translate(EDU_DEVFN, 0, False)  # root table is empty
    assert unit.records[0][1] >> 32 & 0xFF == V.ROOT_NOT_PRESENT and unit.records[0][1] >> 62 & 1  # a read
    _tables(board, context_low=0)
    with pytest.raises(DmaFault):
        unit.translate(EDU_DEVFN, 0, False)
    assert unit.records[1][1] >> 32 & 0xFF == V.CONTEXT_NOT_PRESENT
    board.mem_write(layout.VTD_BASE + V.FRCD_OFFSET + 12, 1 << 31)  # clear record 0's F (RW1C)
    assert not unit.records[0][1] >> 63 and unit.records[1][1] >> 63
    _tables(board, context_low=L3 | 2 | 1)  # present, FPD: blocked but not recorded
    with pytest.raises(DmaFault):
        unit.translate(EDU_DEVFN, 0x1008, True)
    assert unit.next_record == 2 and unit.faults == 3
    _tables(board, context_low=L3 | 1, context_high=2)  # AW 48 bits: not in SAGAW
    with pytest.raises(DmaFault):
        unit.translate(EDU_DEVFN, 0, False)
    assert unit.records[2][1] >> 32 & 0xFF == V.CONTEXT_INVALID
    _tables(board, context_low=L3 | 2 << 2 | 1)  # pass-through
    assert unit.translate(EDU_DEVFN, 0x1008, True) == 0x1008


def test_vtd_fault_event_message_and_overflow() -> None:
    board, _, _, unit = _machine(iommu=True)
    assert unit is not None
    board.mem_write(layout.VTD_BASE + V.FEDATA, 0x55)
    board.mem_write(layout.VTD_BASE + V.FEADDR, 0xFEE00000)
    _enable(board, unit, V.TE)  # root table at 0: every entry zero
    with pytest.raises(DmaFault):
        unit.translate(0, 0, False)
    assert board.msis == [] and _reg(board, V.FECTL) == V.EVENT_IM | V.EVENT_IP  # masked: pending
    board.mem_write(layout.VTD_BASE + V.FECTL, 0)
    assert board.msis == [(0xFEE00000, 0x55)] and _reg(board, V.FECTL) == 0
    for _ in range(V.FAULT_RECORDS):
        with pytest.raises(DmaFault):
            unit.translate(0, 0, False)
    assert _reg(board, V.FSTS) & V.FSTS_PFO
    board.mem_write(layout.VTD_BASE + V.FSTS, V.FSTS_PFO)
    assert not _reg(board, V.FSTS) & V.FSTS_PFO


def test_queued_invalidation_wait_writes_its_status_and_unknown_descriptors_stop_the_queue() -> None:
    board, _, _, unit = _machine(iommu=True)
    assert unit is not None
    queue, status = 0x300000, 0x301000
    board.mem_write(layout.VTD_BASE + V.IQA, queue, 8)
    _enable(board, unit, V.QIE)
    assert _reg(board, V.GSTS) & V.QIE and _reg(board, V.IQH, 8) == 0
    board.memory.write(queue, struct.pack("<QQ", 0x1 | 1 << 4, 0))  # context-cache, global
    board.memory.write(queue + 16, struct.pack("<QQ", 0x2 | 1 << 4, 0))  # IOTLB, global
    board.memory.write(queue + 32, struct.pack("<QQ", 0x4, 0))  # interrupt entry cache, global
    board.memory.write(queue + 48, struct.pack("<QQ", 0x5 | 1 << 5 | 1 << 4 | 0xC0FFEE << 32, status))
    board.mem_write(layout.VTD_BASE + V.IQT, 4 << 4, 8)
    assert board.memory.read(status, 4) == (0xC0FFEE).to_bytes(4, "little")
    assert _reg(board, V.IQH, 8) == 4 << 4 and _reg(board, V.ICS) == 1 and _reg(board, V.FSTS) == 0
    board.mem_write(layout.VTD_BASE + V.ICS, 1)
    assert _reg(board, V.ICS) == 0
    board.memory.write(queue + 64, struct.pack("<QQ", 0x3, 0))  # device-TLB: not offered
    board.memory.write(queue + 80, struct.pack("<QQ", 0x5 | 1 << 5, status))
    board.mem_write(layout.VTD_BASE + V.IQT, 6 << 4, 8)
    assert _reg(board, V.FSTS) & V.FSTS_IQE and _reg(board, V.IQH, 8) == 4 << 4  # stopped at the bad one
    board.memory.write(queue + 48, struct.pack("<QQ", 0x5 | 1 << 5, RAM))  # status into ROM: refused
    board.mem_write(layout.VTD_BASE + V.FSTS, V.FSTS_IQE)
    board.memory.write(queue + 64, struct.pack("<QQ", 0x5 | 1 << 5 | 7 << 32, RAM))
    board.mem_write(layout.VTD_BASE + V.IQT, 5 << 4, 8)
    assert _reg(board, V.FSTS) & V.FSTS_IQE and unit.unknown_descriptors == 2


def _irte(vector: int, dest: int, sid: int, svt: int = 1, present: int = 1, fpd: int = 0) -> bytes:
    low = present | fpd << 1 | vector << 16 | (dest << 8) << 32
    return struct.pack("<QQ", low, sid | svt << 18)


def test_interrupt_remapping_of_msis_and_ioapic_entries() -> None:
    board, _, device, unit = _machine(iommu=True)
    assert unit is not None
    table = 0x310000
    board.memory.write(table + 16, _irte(0xEE, 2, EDU_DEVFN))
    board.memory.write(table + 32, _irte(0xED, 0, 0x1234))  # another requester's entry
    board.memory.write(table + 48, _irte(0xEC, 0, EDU_DEVFN, present=0, fpd=1))
    board.mem_write(layout.VTD_BASE + V.IRTA, table | 3, 8)  # 16 entries
    _enable(board, unit, V.SIRTP, V.IRE)
    assert _reg(board, V.GSTS) & (V.SIRTP | V.IRE) == V.SIRTP | V.IRE

    def msi(index: int, sid: int = EDU_DEVFN) -> tuple[int, int] | None:
        return unit.remap_msi(sid, 0xFEE00000 | index << 5 | 1 << 4, 0)

    assert msi(1) == (0xFEE02000, 0xEE | 1 << 14)  # vector and destination from the IRTE
    assert msi(2) is None and unit.records[0][1] >> 32 & 0xFF == V.SID_MISMATCH
    assert msi(3) is None and unit.next_record == 1  # not present, FPD: blocked silently
    assert msi(16) is None and unit.records[1][1] >> 32 & 0xFF == V.IR_INDEX_TOO_BIG
    assert unit.records[1][0] >> 48 == 16  # the index is the fault information
    assert msi(0) is None and unit.records[2][1] >> 32 & 0xFF == V.IRTE_NOT_PRESENT
    assert unit.remap_msi(EDU_DEVFN, 0xFEE00000, 0x31) is None  # compatibility format, CFI off
    _enable(board, unit, V.CFI)
    assert unit.remap_msi(EDU_DEVFN, 0xFEE00000, 0x31) == (0xFEE00000, 0x31)
    # SHV: the handle plus the subhandle in the data.
    assert unit.remap_msi(EDU_DEVFN, 0xFEE00000 | 1 << 4 | 1 << 3, 1) == (0xFEE02000, 0xEE | 1 << 14)
    # The edu's MSI goes through it, and so does its INTx through a remappable IOAPIC entry.
    board.config(EDU_DEVFN, COMMAND, 2, 6)
    board.config(EDU_DEVFN, 0x44, 4, 0xFEE00000 | 1 << 5 | 1 << 4)
    board.config(EDU_DEVFN, 0x42, 2, 1)
    board.mem_write(EDU_BAR + E.REG_INTR_RAISE, 1)
    assert board.msis[-1] == (0xFEE02000, 0xEE | 1 << 14)
    board.config(EDU_DEVFN, 0x42, 2, 0)
    board.mem_write(EDU_BAR + E.REG_INTR_ACK, 1)
    board.rte[17] = 1 << 49 | 1 << 48 | 0xEE  # index 1, remappable, unmasked, edge
    board.mem_write(EDU_BAR + E.REG_INTR_RAISE, 1)
    assert board.msis[-1] == (0xFEE02000, 0xEE | 1 << 14) and board.irqs == []  # source not verified
    board.mem_write(EDU_BAR + E.REG_INTR_ACK, 1)
    board.rte[17] = 1 << 16 | 1 << 49 | 1 << 48 | 0xEE  # masked: nothing
    count = len(board.msis)
    board.mem_write(EDU_BAR + E.REG_INTR_RAISE, 1)
    board.mem_write(EDU_BAR + E.REG_INTR_ACK, 1)
    board.rte[17] = 0xEE  # compatibility format: the in-kernel IOAPIC's line
    board.mem_write(EDU_BAR + E.REG_INTR_RAISE, 1)
    assert len(board.msis) == count and board.irqs == [(17, True)]


# --- the rest of the board -------------------------------------------------------


def test_dmar_only_with_the_iommu() -> None:
    image = build_tables(cpus=1, iommu=True, base=0)
    assert b"DMAR" not in build_tables(cpus=1, base=0)
    at = image.index(b"DMAR")
    length = int.from_bytes(image[at + 4:at + 8], "little")
    dmar = image[at:at + length]
    assert checksum(dmar) == 0 and dmar[36] == 38 and dmar[37] & 1  # width 39 bits, INTR_REMAP
    kind, size, flags, _, segment, base = struct.unpack_from("<HHBBHQ", dmar, 48)
    assert (kind, size, flags, segment, base) == (0, 24, 1, 0, layout.VTD_BASE)
    assert dmar[64:72] == bytes([3, 8, 0, 0, 0, 0xFF, 0, 0])  # the IOAPIC's scope
    rsdt_addr = int.from_bytes(image[16:20], "little")
    rsdt_len = int.from_bytes(image[rsdt_addr + 4:rsdt_addr + 8], "little")
    assert at in struct.unpack_from(f"<{(rsdt_len - 36) // 4}I", image, rsdt_addr + 36)


def test_unknown_device_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="unknown --device 'e1000'"):
        Machine(Path("/nonexistent"), devices=("edu", "e1000"))
    with pytest.raises(UsageError, match="twice"):
        Machine(Path("/nonexistent"), devices=("intel-iommu", "intel-iommu"))


def test_kut_runner_translates_the_cases_devices(tmp_path: Path) -> None:
    assert vmikit_devices(["-M", "q35,kernel-irqchip=split", "-device", "intel-iommu,intremap=on,eim=off",
                           "-device", "edu"]) == ["intel-iommu", "edu"]
    assert vmikit_devices(["-device", "intel-iommu,eim=on", "-device", "virtio-net"]) == []  # not this board's
    (tmp_path / "x86").mkdir()
    (tmp_path / "x86" / "i.flat").write_bytes(b"")
    (tmp_path / "x86" / "unittests.cfg").write_text(
        "[intel_iommu]\nfile = i.flat\nsmp = 4\nqemu_params = -M q35 -device intel-iommu,intremap=on,eim=off -device edu\n")
    from vmikit.kut.runner import vmikit_command
    cmd = vmikit_command(load_cases(tmp_path)[0], 30)
    assert cmd[cmd.index("--cpus") + 1] == "4" and cmd.count("--device") == 2


# --- KVM structures --------------------------------------------------------------


def test_msi_and_irqchip_structs_match_their_ioctl_numbers() -> None:
    assert ctypes.sizeof(api.KvmMsi) == 32 and ctypes.sizeof(api.KvmIrqchip) == 520
    assert api.KVM_SIGNAL_MSI == 0x4020AEA5 and api.KVM_GET_IRQCHIP == 0xC208AE62
    assert ioctl.ioc_size(api.KVM_GET_IRQCHIP) == ctypes.sizeof(api.KvmIrqchip)
    assert api.KvmIrqchip.chip.offset == 8 and api.KvmIoapicState.redirtbl.offset == 24


def test_msi_and_irqchip_structs_match_the_kernel_header(tmp_path: Path) -> None:
    gcc = shutil.which("gcc")
    if gcc is None or not Path("/usr/include/linux/kvm.h").exists():
        pytest.skip("gcc or <linux/kvm.h> missing (apt-get install gcc linux-libc-dev)")
    (tmp_path / "f.c").write_text(
        "#include <linux/kvm.h>\n#include <stdio.h>\n#include <stddef.h>\nint main(void){printf(\"%zu %zu %zu %lu %lu\\n\","
        "sizeof(struct kvm_msi), sizeof(struct kvm_irqchip), offsetof(struct kvm_irqchip, chip.ioapic.redirtbl),"
        "(unsigned long)KVM_SIGNAL_MSI, (unsigned long)KVM_GET_IRQCHIP); return 0;}\n")
    subprocess.run([gcc, "-o", str(tmp_path / "f"), str(tmp_path / "f.c")], check=True)
    out = subprocess.run([str(tmp_path / "f")], check=True, capture_output=True, text=True).stdout.split()
    assert [int(x) for x in out] == [32, 520, 8 + api.KvmIoapicState.redirtbl.offset,
                                     api.KVM_SIGNAL_MSI, api.KVM_GET_IRQCHIP]


# --- kvm-unit-tests' intel_iommu, end to end --------------------------------------

# --- the bundled iommu guest: the same PASS lines on vmikit and on QEMU --------------------

QEMU_IOMMU = ("-M", "q35,kernel-irqchip=split", "-device", "intel-iommu,intremap=on,eim=off", "-device", "edu")
# What only vmikit's unit does (QEMU 7.2 records no interrupt-remapping fault): an INFO line.
VMIKIT_IR_FAULT = "INFO: the blocked MSI recorded fault reason 0x22, index 2, source 0008"


def _iommu_on_qemu(qemu: str, image: Path, *machine: str) -> subprocess.CompletedProcess[str]:
    """The guest on QEMU-KVM as a q35 with the IOMMU and an edu (or the machine given), exiting
    through isa-debug-exit: status (code << 1) | 1."""
    return subprocess.run(
        [qemu, "-accel", "kvm", "-nodefaults", *(machine or QEMU_IOMMU), "-m", "128", "-kernel", str(image),
         "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-serial", "stdio", "-display", "none", "-no-reboot"],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def _checks(console: str) -> list[str]:
    return [line for line in console.splitlines() if line.startswith(("PASS:", "FAIL:", "SKIP:"))]


@pytest.fixture(scope="module")
def iommu_image(kvm: str) -> Path:
    from vmikit.guest.build import build_guest
    return build_guest("iommu")


@pytest.fixture(scope="module")
def iommu_on_vmikit(iommu_image: Path) -> tuple[str, Machine]:
    with Machine(iommu_image, devices=("edu", "intel-iommu"), timeout=60) as machine:
        result = machine.run()
    assert result.exit_status == 0, result.console
    return result.console, machine


@pytest.fixture(scope="module")
def iommu_on_qemu(iommu_image: Path, qemu: str) -> str:
    proc = _iommu_on_qemu(qemu, iommu_image)
    assert proc.returncode == (0 << 1) | 1, proc.stdout + proc.stderr
    return proc.stdout


def test_iommu_guest_passes_on_the_board(iommu_on_vmikit: tuple[str, Machine]) -> None:
    console, machine = iommu_on_vmikit
    checks = _checks(console)
    assert len(checks) >= 30 and all(line.startswith("PASS:") for line in checks), console
    assert f"DONE pass={len(checks)} fail=0" in console
    assert VMIKIT_IR_FAULT in console, console
    # What the guest saw blocked, the board counted: two DMA writes, then the not-present IRTE.
    assert machine.iommu is not None and machine.iommu.faults == 3
    assert machine.pci is not None
    edu = next(d for d in machine.pci.devices.values() if isinstance(d, E.Edu))
    assert edu.dma_failures == 2 and "blocked a DMA write" in (edu.last_dma_error or "")


def test_iommu_guest_passes_on_qemu(iommu_on_qemu: str) -> None:
    checks = _checks(iommu_on_qemu)
    assert len(checks) >= 30 and all(line.startswith("PASS:") for line in checks), iommu_on_qemu
    assert "INFO: the blocked MSI recorded no fault" in iommu_on_qemu  # QEMU 7.2's model; later ones may record


def test_iommu_guest_prints_the_same_pass_lines_on_both(iommu_on_vmikit: tuple[str, Machine],
                                                         iommu_on_qemu: str) -> None:
    assert _checks(iommu_on_vmikit[0]) == _checks(iommu_on_qemu)


def test_iommu_guest_without_the_devices_says_skip(iommu_image: Path, qemu: str) -> None:
    """No PCI bus (vmikit without --device), an edu without an IOMMU, and QEMU's plain PC: each
    ends at once with status 0 and a SKIP line, never a hang or a FAIL."""
    with Machine(iommu_image, timeout=30) as machine:
        bare = machine.run()
    assert bare.exit_status == 0 and _checks(bare.console) == ["SKIP: no edu device (1234:11e8) on PCI bus 0"]
    assert "DONE pass=0 fail=0" in bare.console
    with Machine(iommu_image, devices=("edu",), timeout=30) as machine:
        edu_only = machine.run()
    checks = _checks(edu_only.console)
    assert edu_only.exit_status == 0 and checks[-1] == "SKIP: no ACPI DMAR: no IOMMU to check", edu_only.console
    assert len(checks) > 5 and all(line.startswith("PASS:") for line in checks[:-1])
    plain = _iommu_on_qemu(qemu, iommu_image, "-M", "pc")
    assert plain.returncode == (0 << 1) | 1 and _checks(plain.stdout) == _checks(bare.console), plain.stdout


def test_iommu_guest_refuses_to_run_deprivileged(iommu_image: Path) -> None:
    proc = vmikit("run", str(iommu_image), "--device", "edu,intel-iommu", "--timeout", "60")
    assert proc.returncode == 2 and "IOMMU-SETUP failed" in proc.stdout, proc.stdout + proc.stderr


def test_vtd_fsts_fri_names_the_first_pending_record() -> None:
    """FRI is where a driver finds the fault (the iommu guest reads it): the first pending record,
    set as PPF goes from 0 to 1, not the next free one."""
    board, _, _, unit = _machine(iommu=True)
    assert unit is not None
    _enable(board, unit, V.TE)  # root table at 0: every entry zero
    for _ in range(2):
        with pytest.raises(DmaFault):
            unit.translate(0, 0, False)
    assert _reg(board, V.FSTS) >> 8 & 0xFF == 0 and _reg(board, V.FSTS) & V.FSTS_PPF  # records 0 and 1 pending
    for index in (0, 1):  # both cleared: the next fault goes to record 2, and FRI names it
        board.mem_write(layout.VTD_BASE + V.FRCD_OFFSET + 16 * index + 12, 1 << 31)
    with pytest.raises(DmaFault):
        unit.translate(0, 0, False)
    assert _reg(board, V.FSTS) >> 8 & 0xFF == 2 and unit.records[2][1] >> 63


# --- hostile programming: nothing a guest writes makes a device raise ----------------------

REG_CHOICES = [V.RTADDR, V.IRTA, V.IQA, V.IQT, V.GCMD, V.CCMD, V.FSTS, V.FECTL, V.ICS,
               V.IOTLB_OFFSET + 8, V.FRCD_OFFSET + 8]
ANY_U64 = st.one_of(st.integers(0, (1 << 64) - 1), st.integers(0, 0x7FFF).map(lambda v: v & ~0xFFF | 7),
                    st.sampled_from([0, 1, 4096, 5000, (1 << 64) - 1]))
STEP = st.one_of(
    st.tuples(st.just("reg"), st.sampled_from(REG_CHOICES), ANY_U64),
    st.tuples(st.just("gcmd"), st.sampled_from([V.TE, V.SRTP, V.QIE, V.IRE, V.SIRTP, V.CFI, V.WBF]), st.just(0)),
    st.tuples(st.just("dma"), ANY_U64, ANY_U64),
    st.tuples(st.just("irq"), st.integers(0, (1 << 64) - 1), st.integers(0, 0xFFFFFFFF)))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 1 << 32), msi=st.booleans(), steps=st.lists(STEP, max_size=60))
def test_hostile_tables_and_registers_never_make_a_device_raise(seed: int, msi: bool,
                                                                 steps: list[tuple[str, int, int]]) -> None:
    """Random root/context/page/IRTE tables and invalidation queues in RAM, random register writes,
    DMA with any addresses and counts, interrupts through any IOAPIC entry: every access returns
    (blocked ones are counted as faults), and device writes land only in RAM."""
    board, bus, edu, unit = _machine(iommu=True)
    assert unit is not None
    board.memory.write(0, random.Random(seed).randbytes(0x4000))  # tables and queues of any content
    board.config(EDU_DEVFN, 4, 2, 0x6)  # memory decoding and bus mastering
    if msi:
        board.config(EDU_DEVFN, 0x44, 4, 0xFEE00010)  # remappable format, handle 0
        board.config(EDU_DEVFN, 0x42, 2, 1)
    rom_before = board.memory.read(RAM, 0x1000)
    for kind, a, b in steps:
        if kind == "reg":
            size = 8 if a in V.REG64 else 4
            board.mem_write(layout.VTD_BASE + a, b & ((1 << 8 * size) - 1), size)
        elif kind == "gcmd":
            board.mem_write(layout.VTD_BASE + V.GCMD, a | _reg(board, V.GSTS))
        elif kind == "dma":
            board.mem_write(EDU_BAR + E.REG_DMA_SRC, a, 8)
            board.mem_write(EDU_BAR + E.REG_DMA_DST, b, 8)
            board.mem_write(EDU_BAR + E.REG_DMA_COUNT, (a ^ b) & 0x1FFF, 8)
            board.mem_write(EDU_BAR + E.REG_DMA_CMD, 1 | (b & 6))
        else:
            board.rte = [a] * 24
            board.mem_write(EDU_BAR + E.REG_INTR_RAISE, b or 1)
            board.mem_write(EDU_BAR + E.REG_INTR_ACK, 0xFFFFFFFF)
    assert board.memory.read(RAM, 0x1000) == rom_before
