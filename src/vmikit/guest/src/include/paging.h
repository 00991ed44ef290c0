/* x86-64 page-table entry bits and page sizes, for guests that build their own tables. */
#ifndef VMIKIT_PAGING_H
#define VMIKIT_PAGING_H

#define PTE_P     0x001ull
#define PTE_RW    0x002ull
#define PTE_US    0x004ull
#define PTE_A     0x020ull
#define PTE_D     0x040ull
#define PTE_PS    0x080ull
#define PTE_ADDR  0x000FFFFFFFFFF000ull
/* docs/paging.md: every entry carries Accessed, leaves also Dirty (the hardware never writes a table).
 * U/S is set everywhere: under VMI the kernel runs at ring 3 (docs/execution-model.md), where
 * every access is a user access, as in Xen's x86-64 PV; at ring 0 the bit changes nothing. */
#define NONLEAF   (PTE_P | PTE_RW | PTE_US | PTE_A)
#define LEAF_RW   (PTE_P | PTE_RW | PTE_US | PTE_A | PTE_D)
#define LEAF_RO   (PTE_P | PTE_US | PTE_A | PTE_D)

#define SZ_4K     0x1000ull
#define SZ_2M     0x200000ull
#define SZ_1G     0x40000000ull
#define MEM_4G    0x100000000ull

#ifndef __ASSEMBLER__
#include <stdint.h>

/* Whether the 4-level tables at `root` map `va` to physical `pa` (1 GiB, 2 MiB or 4 KiB leaves).
 * Tables are read through the identity map of the first 4 GiB; a table above it fails the walk. */
static inline int pt_translates(uint64_t root, uint64_t va, uint64_t pa)
{
	uint64_t table = root & PTE_ADDR;
	for (unsigned level = 4; level >= 1 && table < MEM_4G; level--) {
		unsigned shift = 12 + 9 * (level - 1);
		uint64_t e = ((const volatile uint64_t *)(uintptr_t)table)[(va >> shift) & 0x1FF];
		if (!(e & PTE_P))
			return 0;
		if (level == 1 || ((level == 2 || level == 3) && (e & PTE_PS))) {
			uint64_t mask = (1ull << shift) - 1;
			return ((e & PTE_ADDR & ~mask) | (va & mask)) == pa;
		}
		table = e & PTE_ADDR;
	}
	return 0;
}
#endif

#endif
