"""The ACPI tables of the board, built into the read-only firmware area (layout.BIOS_BASE).

RSDP (revision 2, at the start of the area, where guests scan for it) -> RSDT and XSDT ->
FADT (the PM timer port, the reset register 0xCF9, pointers to a FACS and an empty DSDT) and
MADT (one local APIC per CPU, the IOAPIC with its 24 pins from GSI 0, the dual 8259s, LINT1 as
NMI). KVM's in-kernel routing sends ISA IRQ n to GSI n, so no interrupt source overrides.
With the VT-d unit (``iommu``) a DMAR too (Intel's VT-d specification, chapter 8).

Layouts are those of the ACPI specification (6.x, section 5.2); written here from it.
"""

from __future__ import annotations

import struct

from vmikit.machine import layout
from vmikit.machine.vtd import ADDRESS_BITS

OEM_ID = b"VMIKIT"
OEM_TABLE_ID = b"VMIKITPC"
HEADER = struct.Struct("<4sIBB6s8sI4sI")  # signature, length, revision, checksum, OEM, table, rev, creator, rev
MADT_PCAT_COMPAT = 1  # the board also has the two 8259 PICs
FADT_TMR_VAL_EXT = 1 << 8  # the PM timer counts 32 bits
FADT_RESET_REG_SUP = 1 << 10
GAS_SYSTEM_IO = 1
RESET_VALUE = 0x06
FADT_SIZE = 244  # revision 3 (ACPI 2.0) layout
SCI_IRQ = 9
TABLE_ALIGN = 16


def checksum(data: bytes | bytearray) -> int:
    """The byte that makes ``data`` sum to zero modulo 256."""
    return (-sum(data)) & 0xFF


def _table(signature: bytes, revision: int, body: bytes) -> bytes:
    header = HEADER.pack(signature, HEADER.size + len(body), revision, 0, OEM_ID, OEM_TABLE_ID, 1, b"VMIK", 1)
    table = bytearray(header + body)
    table[9] = checksum(table)
    return bytes(table)


def _gas(space: int, width: int, address: int) -> bytes:
    return struct.pack("<BBBBQ", space, width, 0, 1 if width == 8 else 3, address)


def _madt(cpus: int) -> bytes:
    body = bytearray(struct.pack("<II", layout.LAPIC_BASE, MADT_PCAT_COMPAT))
    for cpu in range(cpus):
        body += struct.pack("<BBBBI", 0, 8, cpu, cpu, 1)  # processor local APIC, enabled
    body += struct.pack("<BBBBII", 1, 12, 0, 0, layout.IOAPIC_BASE, 0)  # IOAPIC id 0 (its register's reset value), GSI 0
    body += struct.pack("<BBBHB", 4, 6, 0xFF, 0, 1)  # every CPU's LINT1 is NMI
    return _table(b"APIC", 3, bytes(body))


DMAR_INTR_REMAP = 1
DRHD_INCLUDE_PCI_ALL = 1
SCOPE_IOAPIC = 3
IOAPIC_SOURCE_ID = (0xFF, 0, 0)  # bus, device, function: the platform pseudo-bus QEMU's q35 uses too


def _dmar() -> bytes:
    """One DRHD unit for every PCI device, with interrupt remapping; its scope names the IOAPIC
    (an INCLUDE_PCI_ALL unit must list the IOAPICs it remaps)."""
    bus, dev, fn = IOAPIC_SOURCE_ID
    scope = struct.pack("<BBHBBBB", SCOPE_IOAPIC, 8, 0, 0, bus, dev, fn)  # enumeration ID = IOAPIC ID 0
    drhd = struct.pack("<HHBBHQ", 0, 16 + len(scope), DRHD_INCLUDE_PCI_ALL, 0, 0, layout.VTD_BASE) + scope
    body = struct.pack("<BB10s", ADDRESS_BITS - 1, DMAR_INTR_REMAP, b"") + drhd  # host address width N-1
    return _table(b"DMAR", 1, body)


def _fadt(facs: int, dsdt: int) -> bytes:
    body = bytearray(FADT_SIZE - HEADER.size)

    def put(offset: int, fmt: str, *values: int | bytes) -> None:
        struct.pack_into(fmt, body, offset - HEADER.size, *values)

    put(36, "<II", facs, dsdt)
    put(46, "<H", SCI_IRQ)
    put(76, "<I", layout.PORT_PM_TIMER)
    put(91, "<B", 4)  # PM_TMR_LEN
    put(112, "<I", FADT_TMR_VAL_EXT | FADT_RESET_REG_SUP)
    put(116, "<12s", _gas(GAS_SYSTEM_IO, 8, layout.PORT_RESET_CONTROL))
    put(128, "<B", RESET_VALUE)
    put(132, "<QQ", facs, dsdt)  # X_FIRMWARE_CTRL, X_DSDT
    put(208, "<12s", _gas(GAS_SYSTEM_IO, 32, layout.PORT_PM_TIMER))  # X_PM_TMR_BLK
    return _table(b"FACP", 3, bytes(body))


def _facs() -> bytes:
    facs = bytearray(64)
    struct.pack_into("<4sI", facs, 0, b"FACS", 64)
    facs[32] = 1  # version
    return bytes(facs)


class Layout:
    """Places tables one after another from ``base``, 16-byte aligned."""

    def __init__(self, base: int) -> None:
        self.base = base
        self.image = bytearray()

    def reserve(self, size: int) -> int:
        self.image += bytes(-len(self.image) % TABLE_ALIGN)
        addr = self.base + len(self.image)
        self.image += bytes(size)
        return addr

    def put(self, addr: int, data: bytes) -> None:
        offset = addr - self.base
        self.image[offset:offset + len(data)] = data


def build_tables(cpus: int = 1, base: int = layout.BIOS_BASE, iommu: bool = False) -> bytes:
    """The firmware area's ACPI image, to be written at ``base`` (the RSDP is its first 36 bytes);
    ``iommu``: list the VT-d unit in a DMAR."""
    out = Layout(base)
    rsdp_addr = out.reserve(36)
    facs_addr = out.reserve(64)
    out.put(facs_addr, _facs())
    dsdt = _table(b"DSDT", 2, b"")  # no AML: the board has no devices to describe
    dsdt_addr = out.reserve(len(dsdt))
    out.put(dsdt_addr, dsdt)
    tables = [_fadt(facs_addr, dsdt_addr), _madt(cpus)] + ([_dmar()] if iommu else [])
    addrs = []
    for table in tables:
        addrs.append(out.reserve(len(table)))
        out.put(addrs[-1], table)
    rsdt = _table(b"RSDT", 1, struct.pack(f"<{len(addrs)}I", *addrs))
    rsdt_addr = out.reserve(len(rsdt))
    out.put(rsdt_addr, rsdt)
    xsdt = _table(b"XSDT", 1, struct.pack(f"<{len(addrs)}Q", *addrs))
    xsdt_addr = out.reserve(len(xsdt))
    out.put(xsdt_addr, xsdt)
    rsdp = bytearray(struct.pack("<8sB6sBIIQB3s", b"RSD PTR ", 0, OEM_ID, 2, rsdt_addr, 36, xsdt_addr, 0, b""))
    rsdp[8] = checksum(rsdp[:20])
    rsdp[32] = checksum(rsdp)
    out.put(rsdp_addr, bytes(rsdp))
    assert len(out.image) <= layout.BIOS_SIZE
    return bytes(out.image)
