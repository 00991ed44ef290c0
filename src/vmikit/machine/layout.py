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
ROM_BASE = 0xC0000  # option-ROM window scanned by the guest VMI layer (docs/rom-abi.md)
ROM_END = 0xE0000
ROM_IMAGE_MAX = 0x8000  # the ROM image: read-only to the guest
ROM_DATA_BASE = 0xD0000  # the VMI layer's private RAM (per-CPU batch buffers)
ROM_DATA_SIZE = 0x10000
ROM_BSS_MAX = 0xF000  # the ROM's own .bss (queue buffers); the last page is the shared page
SHARED_PAGE = ROM_DATA_BASE + ROM_BSS_MAX  # per-vCPU page shared by guest and hypervisor (spec [shared])
MONITOR_BASE = 0xC8000  # the hypervisor's hardware GDT, IDTs, TSS and trap stubs (docs/execution-model.md)
MONITOR_SIZE = 0x8000  # read-only to the guest, like the ROM; present only with a ROM
ROM_SIGNATURE = b"VMIK"
PT_POOL_BASE = 0x0200_0000  # page-table pool (docs/paging.md): read-only slot under trap/direct
PT_POOL_SIZE = 0x0100_0000
DATA_POOL_BASE = 0x0400_0000  # frames the mmu workload maps (a workload convention)
DATA_POOL_SIZE = 0x0200_0000
SHADOW_BASE = 0xE000_0000  # shadow paging: the hypervisor's tables, above any guest RAM, not in the memory map
SHADOW_SIZE = 0x0100_0000
HIGH_RAM_BASE = 0x100000  # kernels are linked here (1 MiB)
MAX_CMDLINE_BYTES = 255  # the multiboot command line's room in the info block, without its NUL
MAX_TIMEOUT_S = 86400.0  # a day: the watchdog's limit is a bound, not a way to switch it off
MIN_MEMORY_MIB = 4
MAX_MEMORY_MIB = 3072  # stay below the 32-bit PCI hole: one flat high RAM slot

# KVM's own pages on Intel hosts sit at 0xFFFBC000-0xFFFBFFFF (engine/kvm.py), above any RAM here.

# I/O ports.
PORT_SERIAL = 0x3F8  # COM1 transmit holding register
PORT_SERIAL_LSR = 0x3FD  # line status: always "transmitter empty"
PORT_EXIT = 0xF4  # QEMU isa-debug-exit convention: outl(code)
PORT_PANIC = 0xF9  # outl(gpa of a struct exception_frame); clear of isa-debug-exit at 0xF4-0xF7 (iosize=4)
PORT_BENCH = 0xE0  # vmikit bench: the guest marks the start and end of a timed section
PORT_HYPERCALL = 0xF8  # VMI hypercalls from the ROM (see hypervisor/)
PORT_EVENT = 0xFA  # the hypervisor's trap and syscall stubs (deprivileged kernels): never a guest's port

# Guest exit codes the runtime uses (written to PORT_EXIT).
EXIT_OK = 0
EXIT_FAILED_TESTS = 1
EXIT_EXCEPTION = 3
