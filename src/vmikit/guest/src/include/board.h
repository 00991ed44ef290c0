/*
 * The board contract between guest and VMM: I/O ports and exit codes.
 *
 * Mirrors vmikit/machine/layout.py (tests/test_guest_build.py checks that the
 * values agree).  Only plain #defines so that assembly files may include it.
 */
#ifndef VMIKIT_BOARD_H
#define VMIKIT_BOARD_H

#define KERNEL_BASE         0x100000 /* kernels are linked and loaded at 1 MiB */

#define PORT_SERIAL         0x3F8 /* COM1 THR: outb, no need to poll the LSR */
#define PORT_EXIT           0xF4  /* outl(code): QEMU isa-debug-exit / VMM exit */
/* Page-table pool and workload data pool (docs/paging.md); alloc_page never returns them. */
#define PT_POOL_BASE        0x02000000ull
#define PT_POOL_SIZE        0x01000000ull
#define DATA_POOL_BASE      0x04000000ull
#define DATA_POOL_SIZE      0x02000000ull
#define PORT_BENCH          0xE0  /* vmikit bench: markers around a timed section */
#define PORT_PANIC          0xF9  /* outl(phys addr of struct exception_frame); outside QEMU isa-debug-exit 0xF4-0xF7 */

#define EXIT_OK             0 /* every test passed */
#define EXIT_FAILED_TESTS   1 /* at least one report() said FAIL */
#define EXIT_EXCEPTION      3 /* an unhandled CPU exception */

#define MULTIBOOT_BOOTLOADER_MAGIC 0x2BADB002

#endif
