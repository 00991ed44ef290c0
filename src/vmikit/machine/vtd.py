"""An Intel VT-d remapping unit (Intel's VT-d specification, legacy mode) at q35's 0xFED90000.

DMA remapping: root table -> context entry (translation type 0, multi-level, or 2, pass-through)
-> a 3-level second-level table (39-bit address width, 2 MiB super pages), with read/write
permission. Interrupt remapping: MSIs in remappable format and IOAPIC entries in remappable format
through the IRTE table (xAPIC destinations: no EIM). Queued invalidation processes context-cache,
IOTLB, interrupt-entry-cache and wait descriptors; the unit caches nothing, so invalidations
complete at once. Faults go to the fault-recording registers and raise the fault event.

Not modelled (refused, or capability bits clear): scalable and extended modes, device TLBs,
nested/first-level translation, 1 GiB pages, posted interrupts, x2APIC mode (EIM), advanced fault
logging, the write-buffer flush, protected memory regions, page requests, source-ID verification
of requests from KVM's IOAPIC (it is not a requester the VMM sees; see docs/board.md).
"""

from __future__ import annotations

from vmikit.machine import layout
from vmikit.machine.pci import DmaFault
from vmikit.machine.ports import Ports
from vmikit.memory import GuestMemoryError

VER, CAP, ECAP, GCMD, GSTS, RTADDR, CCMD = 0x00, 0x08, 0x10, 0x18, 0x1C, 0x20, 0x28
FSTS, FECTL, FEDATA, FEADDR, FEUADDR = 0x34, 0x38, 0x3C, 0x40, 0x44
IQH, IQT, IQA, ICS, IECTL, IEDATA, IEADDR, IEUADDR, IRTA = 0x80, 0x88, 0x90, 0x9C, 0xA0, 0xA4, 0xA8, 0xAC, 0xB8
IOTLB_OFFSET = 0x200  # ECAP.IRO: IVA_REG here, IOTLB_REG 8 bytes on
FRCD_OFFSET = 0x220  # CAP.FRO: the fault-recording registers, 16 bytes each
FAULT_RECORDS = 4

# GCMD command bits and the GSTS status bits at the same positions.
TE, SRTP, SFL, EAFL, WBF, QIE, IRE, SIRTP, CFI = (1 << b for b in (31, 30, 29, 28, 27, 26, 25, 24, 23))
FSTS_PFO, FSTS_PPF, FSTS_IQE = 1 << 0, 1 << 1, 1 << 4
FSTS_W1C = FSTS_PFO | 1 << 2 | 1 << 3 | FSTS_IQE | 1 << 5 | 1 << 6
EVENT_IM, EVENT_IP = 1 << 31, 1 << 30  # FECTL, IECTL
ICS_IWC = 1

AW_39 = 1  # the context entry's AW value for 39 bits, 3 levels: the only SAGAW bit set
ADDRESS_BITS = 39  # MGAW, and the host address width the DMAR reports (38 + 1)
VERSION = 0x10  # 1.0
CAPABILITY = (6  # ND: 16-bit domain IDs
              | 1 << 8 + AW_39  # SAGAW: 39-bit AGAW
              | (ADDRESS_BITS - 1) << 16  # MGAW
              | (FRCD_OFFSET // 16) << 24  # FRO
              | 1 << 34  # SLLPS: 2 MiB pages only
              | (FAULT_RECORDS - 1) << 40)  # NFR
EXT_CAPABILITY = (1 << 1  # QI
                  | 1 << 3  # IR (EIM, bit 4, clear: xAPIC destinations)
                  | 1 << 6  # PT: pass-through contexts
                  | (IOTLB_OFFSET // 16) << 8)  # IRO

# Fault reasons (the specification's non-recoverable fault encodings).
ROOT_NOT_PRESENT, CONTEXT_NOT_PRESENT, CONTEXT_INVALID, ADDRESS_TOO_WIDE = 0x1, 0x2, 0x3, 0x4
NO_WRITE, NO_READ, PTE_ACCESS, ROOT_ACCESS, CONTEXT_ACCESS = 0x5, 0x6, 0x7, 0x8, 0x9
ROOT_RESERVED, CONTEXT_RESERVED, PTE_RESERVED = 0xA, 0xB, 0xC
IR_REQUEST_RESERVED, IR_INDEX_TOO_BIG, IRTE_NOT_PRESENT, IRTE_ACCESS = 0x20, 0x21, 0x22, 0x23
IRTE_RESERVED, COMPAT_BLOCKED, SID_MISMATCH = 0x24, 0x25, 0x26

REG64 = {CAP, ECAP, RTADDR, CCMD, IQH, IQT, IQA, IRTA, IOTLB_OFFSET, IOTLB_OFFSET + 8} | {
    FRCD_OFFSET + 16 * i + half for i in range(FAULT_RECORDS) for half in (0, 8)}
PAGE_MASK = ~0xFFF & (1 << 64) - 1
ADDR_MASK = (1 << ADDRESS_BITS) - 1 & PAGE_MASK


class Fault(Exception):
    def __init__(self, reason: int, report: bool = True) -> None:
        super().__init__(reason)
        self.reason, self.report = reason, report


class VtdUnit:
    """One DRHD unit covering every PCI device (INCLUDE_PCI_ALL)."""

    def __init__(self) -> None:
        self._board: Ports | None = None
        self.regs: dict[int, int] = {FECTL: EVENT_IM, IECTL: EVENT_IM}
        self.status = 0  # GSTS
        self.root_table = 0  # latched by SRTP
        self.irta = 0  # latched by SIRTP
        self.records: list[tuple[int, int]] = [(0, 0)] * FAULT_RECORDS  # (low, high) qwords
        self.next_record = 0  # where the next fault is recorded
        self.first_pending = 0  # FSTS.FRI: the record the first pending fault went to
        self.faults = 0  # every fault detected, reported or not
        self.unknown_descriptors = 0

    def attach(self, board: Ports) -> None:
        self._board = board
        board.on_mmio(layout.VTD_BASE, layout.VTD_SIZE, self.read, self.write)

    # --- registers ----------------------------------------------------------

    def _reg(self, offset: int) -> int:
        if offset == VER:
            return VERSION
        if offset == CAP:
            return CAPABILITY
        if offset == ECAP:
            return EXT_CAPABILITY
        if offset == GSTS:
            return self.status
        if offset == FSTS:
            ppf = FSTS_PPF if any(high >> 63 for _, high in self.records) else 0
            return self.regs.get(FSTS, 0) | ppf | self.first_pending << 8
        if FRCD_OFFSET <= offset < FRCD_OFFSET + 16 * FAULT_RECORDS:
            low, high = self.records[(offset - FRCD_OFFSET) // 16]
            return high if offset & 8 else low
        return self.regs.get(offset, 0)

    def read(self, addr: int, size: int) -> int:
        offset = addr - layout.VTD_BASE
        base = offset & ~7 if offset & ~7 in REG64 else offset & ~3
        value = self._reg(base) >> 8 * (offset - base)
        return value & (1 << 8 * size) - 1

    def write(self, addr: int, size: int, value: int) -> None:
        offset = addr - layout.VTD_BASE
        if size == 8 and offset & 7 == 0 and offset not in REG64:
            self.write(addr, 4, value & 0xFFFFFFFF)
            self.write(addr + 4, 4, value >> 32)
            return
        base = offset & ~7 if offset & ~7 in REG64 else offset & ~3
        shift, width = 8 * (offset - base), (8 if base in REG64 else 4)
        if shift + 8 * size > 8 * width:
            return  # a misaligned access across registers: dropped
        mask = ((1 << 8 * size) - 1) << shift
        old = self._reg(base) if base not in (FSTS, ICS) else 0  # W1C registers: only what is written
        self._store(base, (old & ~mask) | (value << shift & mask), value << shift & mask)

    def _store(self, reg: int, value: int, written: int) -> None:
        if reg == GCMD:
            self._command(value)
        elif reg == RTADDR:
            self.regs[reg] = value & ADDR_MASK  # legacy root table only: the mode bits are reserved
        elif reg == CCMD:
            # ICC (bit 63) set: invalidate at once; report the granularity asked (CAIG = CIRG).
            self.regs[reg] = value & ~(1 << 63 | 3 << 59) | (value >> 61 & 3) << 59 if value >> 63 else value
        elif reg == IOTLB_OFFSET + 8:
            self.regs[reg] = value & ~(1 << 63 | 3 << 57) | (value >> 60 & 3) << 57 if value >> 63 else value
        elif reg == FSTS:
            self.regs[FSTS] = self.regs.get(FSTS, 0) & ~(written & FSTS_W1C)
        elif reg == ICS:
            self.regs[ICS] = self.regs.get(ICS, 0) & ~(written & ICS_IWC)
        elif FRCD_OFFSET <= reg < FRCD_OFFSET + 16 * FAULT_RECORDS:
            if reg & 8 and written >> 63:  # F is RW1C; the rest of a record is read-only
                index = (reg - FRCD_OFFSET) // 16
                low, high = self.records[index]
                self.records[index] = (low, high & ~(1 << 63))
        elif reg in (FECTL, IECTL):
            pending = self.regs.get(reg, 0) & EVENT_IP
            self.regs[reg] = value & EVENT_IM | pending
            if pending and not value & EVENT_IM:  # unmasked with an event pending: send it now
                self.regs[reg] &= ~EVENT_IP
                self._message(reg)
        elif reg == IQT:
            self.regs[IQT] = value & 0x7FFF0
            self._process_queue()
        elif reg == IQA:
            self.regs[IQA] = value & (PAGE_MASK | 7)  # 128-bit descriptors (DW reserved)
        elif reg == IRTA:
            self.regs[IRTA] = value & (PAGE_MASK | 0xF)  # EIME (bit 11) reserved: no EIM
        elif reg in (FEDATA, FEADDR, FEUADDR, IEDATA, IEADDR, IEUADDR, IOTLB_OFFSET):
            self.regs[reg] = value
        # Everything else is read-only or not implemented: the write is dropped.

    def _command(self, value: int) -> None:
        """GCMD: TE, QIE, IRE and CFI set their status bits; SRTP and SIRTP latch the table
        addresses (one-shot: their status bits say it is done). SFL, EAFL and WBF name features
        the capability registers deny, and do nothing."""
        persistent = TE | QIE | IRE | CFI
        if (value ^ self.status) & QIE:
            self.regs[IQH] = 0  # the queue starts (or is left) at its base
        self.status = self.status & ~persistent | value & persistent
        if value & SRTP:
            self.root_table = self.regs.get(RTADDR, 0)
            self.status |= SRTP
        if value & SIRTP:
            self.irta = self.regs.get(IRTA, 0)
            self.status |= SIRTP

    # --- events and faults --------------------------------------------------

    def _message(self, control: int) -> None:
        assert self._board is not None
        data, addr, upper = (FEDATA, FEADDR, FEUADDR) if control == FECTL else (IEDATA, IEADDR, IEUADDR)
        address = self.regs.get(addr, 0) | self.regs.get(upper, 0) << 32
        if address >> 20 == layout.MSI_ADDRESS_BASE >> 20:
            self._board.signal_msi(address, self.regs.get(data, 0) & 0xFFFF)

    def _event(self, control: int) -> None:
        if self.regs.get(control, 0) & EVENT_IM:
            self.regs[control] = self.regs.get(control, 0) | EVENT_IP
        else:
            self._message(control)

    def _record(self, sid: int, reason: int, info: int, read: bool) -> None:
        """Primary fault logging: the next record if it is free, else the overflow bit."""
        low, high = self.records[self.next_record]
        if high >> 63:
            self.regs[FSTS] = self.regs.get(FSTS, 0) | FSTS_PFO
        else:
            # FRI names the first pending record (spec 10.4.9), set as PPF goes from 0 to 1: a driver
            # reads FSTS.FRI to find the fault (it used to name the next free record instead).
            if not any(h >> 63 for _, h in self.records):
                self.first_pending = self.next_record
            self.records[self.next_record] = (info, 1 << 63 | int(read) << 62 | reason << 32 | sid & 0xFFFF)
            self.next_record = (self.next_record + 1) % FAULT_RECORDS
        self._event(FECTL)

    def _fault(self, fault: Fault, sid: int, info: int, read: bool) -> None:
        self.faults += 1
        if fault.report:
            self._record(sid, fault.reason, info, read)

    def _read(self, gpa: int, length: int, reason: int, report: bool = True) -> bytes:
        assert self._board is not None
        try:
            return self._board.phys_read(gpa, length)
        except GuestMemoryError:
            raise Fault(reason, report) from None

    # --- DMA remapping --------------------------------------------------------

    def translate(self, sid: int, addr: int, write: bool) -> int:
        if not self.status & TE:
            return addr
        try:
            return self._walk(sid, addr, write)
        except Fault as fault:
            self._fault(fault, sid, addr & PAGE_MASK, not write)
            raise DmaFault(f"the IOMMU blocked a DMA {'write' if write else 'read'} of {addr:#x} "
                           f"by {sid >> 8:02x}:{sid >> 3 & 31:02x}.{sid & 7} (fault reason {fault.reason:#x})") from None

    def _walk(self, sid: int, addr: int, write: bool) -> int:
        root = int.from_bytes(self._read(self.root_table + 16 * (sid >> 8), 16, ROOT_ACCESS), "little")
        if not root & 1:
            raise Fault(ROOT_NOT_PRESENT)
        if root & 0xFFE or root >> 64 or root & (1 << 64) - 1 & ~ADDR_MASK & PAGE_MASK:
            raise Fault(ROOT_RESERVED)
        entry = int.from_bytes(self._read((root & ADDR_MASK) + 16 * (sid & 0xFF), 16, CONTEXT_ACCESS), "little")
        if not entry & 1:
            raise Fault(CONTEXT_NOT_PRESENT)
        report = not entry & 2  # FPD: no fault records for this device
        low, high = entry & (1 << 64) - 1, entry >> 64
        if low & 0xFF0 or high & 0x80 or high >> 24:
            raise Fault(CONTEXT_RESERVED, report)
        kind = low >> 2 & 3
        if kind == 2:
            return addr  # pass-through
        if kind != 0 or high & 7 != AW_39:
            raise Fault(CONTEXT_INVALID, report)  # device TLBs, reserved types, widths SAGAW lacks
        if addr >> ADDRESS_BITS:
            raise Fault(ADDRESS_TOO_WIDE, report)
        table = low & ADDR_MASK
        for level in (3, 2, 1):
            shift = 12 + 9 * (level - 1)
            pte = int.from_bytes(self._read(table + 8 * (addr >> shift & 0x1FF), 8, PTE_ACCESS, report), "little")
            if not pte & (2 if write else 1):
                raise Fault(NO_WRITE if write else NO_READ, report)
            if pte & 0x000F_FFFF_FFFF_F000 & ~ADDR_MASK:
                raise Fault(PTE_RESERVED, report)  # beyond the host address width
            if level == 3 and pte & 0x80:
                raise Fault(PTE_RESERVED, report)  # 1 GiB pages: SLLPS does not offer them
            if level == 2 and pte & 0x80:
                if pte & 0x1FF000:
                    raise Fault(PTE_RESERVED, report)
                return (pte & ADDR_MASK & ~0x1FFFFF) | (addr & 0x1FFFFF)
            table = pte & ADDR_MASK
        return table | (addr & 0xFFF)

    # --- interrupt remapping ------------------------------------------------

    @property
    def remapping_interrupts(self) -> bool:
        return bool(self.status & IRE)

    def remap_msi(self, sid: int | None, address: int, data: int) -> tuple[int, int] | None:
        if not self.status & IRE:
            return address, data
        if not address & 1 << 4:  # compatibility format: passes only with CFIS (EIM is never on)
            if self.status & CFI:
                return address, data
            return self._blocked(Fault(COMPAT_BLOCKED), sid, 0)
        handle = (address >> 5 & 0x7FFF) | (address >> 2 & 1) << 15
        index = handle + (data & 0xFFFF) if address & 1 << 3 else handle  # SHV: plus the subhandle
        return self._irte(index, sid)

    def remap_ioapic(self, entry: int) -> tuple[int, int] | None:
        """An IOAPIC redirection entry in remappable format: bits 63:49 and 11 are the index."""
        if not self.status & IRE:
            return None
        if entry >> 17 & (1 << 31) - 1 or entry >> 8 & 7:
            return self._blocked(Fault(IR_REQUEST_RESERVED), None, 0)
        return self._irte((entry >> 49 & 0x7FFF) | (entry >> 11 & 1) << 15, None)

    def _blocked(self, fault: Fault, sid: int | None, index: int) -> tuple[int, int] | None:
        """Record an interrupt-remapping fault (FI[63:48] is the index) and block the request."""
        self._fault(fault, sid or 0, index << 48, False)
        return None

    def _irte(self, index: int, sid: int | None) -> tuple[int, int] | None:
        size = 1 << (self.irta & 0xF) + 1
        if index >= size:
            return self._blocked(Fault(IR_INDEX_TOO_BIG), sid, index & 0xFFFF)
        try:
            irte = int.from_bytes(self._read((self.irta & PAGE_MASK) + 16 * index, 16, IRTE_ACCESS), "little")
            report = not irte & 2  # FPD
            if not irte & 1:
                raise Fault(IRTE_NOT_PRESENT, report)
            svt, sq, expected = irte >> 82 & 3, irte >> 80 & 3, irte >> 64 & 0xFFFF
            # Reserved: bits 14:12, 31:24, 127:84; posted format (IM, bit 15: no PI); the xAPIC
            # destination's bytes other than 15:8; SVT 3.
            if irte & 0x7000 or irte & 0xFF00_0000 or irte >> 84 or irte & 1 << 15 or \
                    irte >> 32 & 0xFFFF00FF or svt == 3:
                raise Fault(IRTE_RESERVED, report)
            if sid is not None and not _source_matches(svt, sq, expected, sid):
                raise Fault(SID_MISMATCH, report)
        except Fault as fault:
            return self._blocked(fault, sid, index)
        dest, vector = irte >> 40 & 0xFF, irte >> 16 & 0xFF
        dm, rh, tm, dlm = irte >> 2 & 1, irte >> 3 & 1, irte >> 4 & 1, irte >> 5 & 7
        address = layout.MSI_ADDRESS_BASE | dest << 12 | rh << 3 | dm << 2
        return address, vector | dlm << 8 | 1 << 14 | tm << 15

    # --- queued invalidation ------------------------------------------------

    def _process_queue(self) -> None:
        """From IQH to IQT. A descriptor the unit does not know, or a queue it cannot read,
        stops the queue there with IQE set (IQH names the descriptor)."""
        if not self.status & QIE or self.regs.get(FSTS, 0) & FSTS_IQE:
            return
        iqa = self.regs.get(IQA, 0)
        entries = 256 << (iqa & 7)
        head, tail = self.regs.get(IQH, 0) >> 4, self.regs.get(IQT, 0) >> 4
        try:
            if tail >= entries:
                raise Fault(0)
            while head != tail:
                self._descriptor(int.from_bytes(self._read((iqa & PAGE_MASK) + 16 * head, 16, 0), "little"))
                head = (head + 1) % entries
        except Fault:
            self.unknown_descriptors += 1
            self.regs[FSTS] = self.regs.get(FSTS, 0) | FSTS_IQE
            self._event(FECTL)
        self.regs[IQH] = head << 4

    def _descriptor(self, desc: int) -> None:
        assert self._board is not None
        kind = desc & 0xF | (desc >> 9 & 7) << 4
        if kind in (0x1, 0x2, 0x4):
            return  # context-cache, IOTLB, interrupt-entry-cache: nothing is cached
        if kind != 0x5:
            raise Fault(0)  # device-TLB, PASID-based and reserved types: not offered
        if desc & 1 << 5:  # SW: write the status data
            try:
                self._board.phys_write(desc >> 64 & ~3 & (1 << 64) - 1, (desc >> 32 & 0xFFFFFFFF).to_bytes(4, "little"))
            except GuestMemoryError:
                raise Fault(0) from None
        if desc & 1 << 4:  # IF: the invalidation completion event
            self.regs[ICS] = self.regs.get(ICS, 0) | ICS_IWC
            self._event(IECTL)


def _source_matches(svt: int, sq: int, expected: int, sid: int) -> bool:
    if svt == 0:
        return True
    if svt == 1:  # SQ: how many low function-number bits to ignore (none, bit 2, bits 2:1, bits 2:0)
        ignore = (0, 0b100, 0b110, 0b111)[sq]
        return (sid & ~ignore) == (expected & ~ignore)
    return expected >> 8 <= sid >> 8 <= expected & 0xFF  # SVT 2: the bus range start..end
