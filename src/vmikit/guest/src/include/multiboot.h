/* Multiboot v1 information structure (only the parts the runtime reads). */
#ifndef VMIKIT_MULTIBOOT_H
#define VMIKIT_MULTIBOOT_H

#include <stdint.h>

#define MULTIBOOT_INFO_MEMORY  (1u << 0) /* mem_lower/mem_upper valid */
#define MULTIBOOT_INFO_CMDLINE (1u << 2)
#define MULTIBOOT_INFO_MODS    (1u << 3)
#define MULTIBOOT_INFO_MMAP    (1u << 6) /* mmap_length/mmap_addr valid */

#define MULTIBOOT_MEMORY_AVAILABLE 1

struct multiboot_info {
	uint32_t flags;
	uint32_t mem_lower; /* KiB below 1 MiB */
	uint32_t mem_upper; /* KiB above 1 MiB */
	uint32_t boot_device;
	uint32_t cmdline;
	uint32_t mods_count;
	uint32_t mods_addr;
	uint32_t syms[4];
	uint32_t mmap_length;
	uint32_t mmap_addr;
} __attribute__((packed));

/* One memory map entry.  `size` does not count itself: next = addr + size + 4. */
struct multiboot_mmap_entry {
	uint32_t size;
	uint64_t base;
	uint64_t len;
	uint32_t type;
} __attribute__((packed));

struct multiboot_module {
	uint32_t start, end, string, reserved;
} __attribute__((packed));

#endif
