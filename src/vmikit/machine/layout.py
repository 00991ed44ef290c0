"""Every guest-physical address and I/O port the board uses, in one place.

The guest C runtime (``vmikit/guest/src/include/board.h``) mirrors these values; a
test checks that the two agree.
"""

from __future__ import annotations

MiB = 1 << 20
KiB = 1 << 10
PAGE_SIZE = 4096

# Guest-physical memory map (what the multiboot memory map reports).
LOW_RAM_END = 0x9F000  # conventional memory, below the EBDA/VGA hole
MULTIBOOT_INFO_ADDR = 0x8000  # multiboot info block + memory map, written by the loader
MULTIBOOT_INFO_MAX = 0x1000
MULTIBOOT_INFO_PLACES = (MULTIBOOT_INFO_ADDR, LOW_RAM_END - MULTIBOOT_INFO_MAX)  # the first the kernel leaves free
ROM_BASE = 0xC0000  # option-ROM window scanned by the guest VMI layer (docs/rom-abi.md)
ROM_END = 0xE0000
ROM_IMAGE_MAX = 0x8000  # the ROM image: read-only to the guest
ROM_DATA_BASE = 0xD0000  # the VMI layer's private RAM (per-CPU batch buffers)
ROM_DATA_SIZE = 0x10000
ROM_BSS_MAX = 0xF000  # the ROM's own .bss (queue buffers); the last page is the shared page
SHARED_PAGE = ROM_DATA_BASE + ROM_BSS_MAX  # per-vCPU page shared by guest and hypervisor (spec [shared])
# A ROM built for several vCPUs keeps its per-CPU state (queue buffer, shared page) in one area per
# vCPU carved out of the ROM data area, found through the GS base (docs/smp.md): the same ROM code
# at the same address serves every CPU. The hypervisor loads GS and writes an area's first words.
PERCPU_SIZE = 0x2000  # 8 areas of 8 KiB fill the ROM data area
PERCPU_SELF = 0x00  # u64: the area's own address (guest-physical = linear: the area is identity mapped)
PERCPU_MAGIC = 0x08  # u32: PERCPU_MAGIC_VALUE once the hypervisor has set the area up for this vCPU
PERCPU_CPU = 0x0C  # u32: the vCPU's index
PERCPU_SHARED = 0x1000  # the vCPU's shared page (spec [shared]) is the area's second page
PERCPU_MAGIC_VALUE = 0x55504D56  # "VMPU"


def percpu_area(cpu: int) -> int:
    return ROM_DATA_BASE + cpu * PERCPU_SIZE


MONITOR_BASE = 0xC8000  # the hypervisor's hardware GDT, IDTs, TSS and trap stubs (docs/execution-model.md)
MONITOR_SIZE = 0x8000  # read-only to the guest, like the ROM; present only with a ROM
ROM_SIGNATURE = b"VMIK"
PT_POOL_BASE = 0x0200_0000  # page-table pool (docs/paging.md): read-only slot under trap/direct
PT_POOL_SIZE = 0x0100_0000
DATA_POOL_BASE = 0x0400_0000  # frames the mmu workload maps (a workload convention)
DATA_POOL_SIZE = 0x0200_0000
SHADOW_BASE = 0xE000_0000  # shadow paging: the hypervisor's tables, above any guest RAM, not in the memory map
SHADOW_SIZE = 0x0100_0000
BIOS_BASE = 0xE0000  # the firmware area: ACPI tables (guests scan 0xE0000-0xFFFFF for the RSDP), read-only
BIOS_SIZE = 0x20000
HIGH_RAM_BASE = 0x100000  # kernels are linked here (1 MiB)
IOAPIC_BASE = 0xFEC00000  # KVM's in-kernel IOAPIC (24 pins; the MADT says so)
LAPIC_BASE = 0xFEE00000  # KVM's in-kernel local APIC, the architectural default base
TESTDEV_IOMEM_BASE = 0xFF000000  # pc-testdev's MMIO RAM (kvm-unit-tests' IORAM_BASE_PHYS): every access exits
TESTDEV_IOMEM_SIZE = 0x10000
# PCI (only with --device: docs/board.md). The host bridge forwards this window to PCI; the board's
# "firmware" places BARs in it. Above the most RAM the board has, below the shadow-paging area.
PCI_MMIO_BASE = 0xC000_0000
PCI_MMIO_SIZE = 0x1000_0000
PCI_IRQ_BASE = 16  # INTA# of slot 0 after the swizzle: PCI pins reach IOAPIC pins 16-19 (GSIs no PIC shares)
VTD_BASE = 0xFED90000  # the Intel VT-d remapping unit's registers (--device intel-iommu; q35's address)
VTD_SIZE = 0x1000
MSI_ADDRESS_BASE = LAPIC_BASE  # MSI writes land in the LAPIC range (address bits 31:20 = 0xFEE)
MAX_CMDLINE_BYTES = 1023  # the multiboot command line's room in the info block, without its NUL (kvm-unit-tests' vmx passes 403)
MAX_IMAGE_NAME_BYTES = 255  # the kernel's file name, which starts the guest's command line (NAME_MAX)
MAX_TIMEOUT_S = 86400.0  # a day: the watchdog's limit is a bound, not a way to switch it off
MIN_MEMORY_MIB = 4
MAX_CPUS = 8  # vCPUs (--cpus): APIC IDs 0..7 in the MADT, one host thread each
MAX_MEMORY_MIB = 3072  # stay below the 32-bit PCI hole: one flat high RAM slot

# KVM's own pages on Intel hosts sit at 0xFFFBC000-0xFFFBFFFF (engine/kvm.py), above any RAM here.

# I/O ports. KVM decodes the PICs (0x20-0x21, 0xA0-0xA1, ELCR 0x4D0-0x4D1) and the PIT (0x40-0x43, 0x61)
# itself; these are the board's own.
PORT_SERIAL = 0x3F8  # COM1: a 16550A, registers 0x3F8-0x3FF (machine/uart.py)
PORT_SERIAL_LSR = 0x3FD  # its line status register
IRQ_SERIAL = 4  # COM1's ISA interrupt line
PORT_KBC_STATUS = 0x64  # keyboard controller: status (read), command (write; 0xFE pulses reset)
PORT_PCI_CONFIG_ADDRESS = 0xCF8  # PCI configuration mechanism #1: 32-bit address at 0xCF8 (dword accesses only)
PORT_PCI_CONFIG_DATA = 0xCFC  # ... and its data at 0xCFC-0xCFF (byte, word or dword)
PORT_RESET_CONTROL = 0xCF9  # the PCI reset control register: write 0x06 (or 0x0E) to reset
PORT_FW_CFG = 0x510  # QEMU's fw_cfg: selector (16-bit write) at 0x510, data (byte reads) at 0x511
PORT_PM_TIMER = 0x608  # the ACPI PM timer (32-bit, 3.579545 MHz), where the FADT says
PORT_TESTDEV = 0xE0  # QEMU's pc-testdev: a 4-byte register that reads back what was written (not under bench)
PORT_TESTDEV_FLUSH_PAGE = 0xE4  # pc-testdev: outl(gpa) drops cached translations of that page
PORT_TESTDEV_IRQ = 0x2000  # pc-testdev: outb(level, 0x2000 + line) drives interrupt line 0-23
PORT_EXIT = 0xF4  # QEMU isa-debug-exit convention: outl(code)
PORT_PANIC = 0xF9  # outl(gpa of a struct exception_frame); clear of isa-debug-exit at 0xF4-0xF7 (iosize=4)
PORT_BENCH = 0xE0  # vmikit bench: the guest marks the start and end of a timed section (replaces pc-testdev's)
PORT_HYPERCALL = 0xF8  # VMI hypercalls from the ROM (see hypervisor/)
PORT_EVENT = 0xFA  # the hypervisor's trap and syscall stubs (deprivileged kernels): never a guest's port

# Guest exit codes the runtime uses (written to PORT_EXIT).
EXIT_OK = 0
EXIT_FAILED_TESTS = 1
EXIT_EXCEPTION = 3
