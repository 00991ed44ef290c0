/*
 * mmu_common.h: helpers shared by the mmu and mmuviolate guests (docs/paging.md).
 *
 * Not a guest itself (every .c in guests/ is one): static functions only.
 *
 * Every page-table page comes from the pool (alloc_pt_page: fresh, zero), is
 * registered with its level before anything points to it, is linked into its
 * parent before it is filled (top-down: without a ROM, trap paging learns a
 * table's level from the entry that links it), and is only ever
 * written through vmi_set_pte / vmi_set_pte_queued.  Every entry has Accessed
 * set, leaves also Dirty, so the hardware never writes a table page.
 * Table memory is read (never written) through the identity map.
 */
#ifndef VMIKIT_MMU_COMMON_H
#define VMIKIT_MMU_COMMON_H

#include "lib.h"
#include "vmi.h"

#include "paging.h"

#define WORK_BASE       0x0000010000000000ull /* PML4 index 2 */
#define LOW_RAM_END     0x9F000ull
#define ROM_IMAGE_BASE  0xC0000ull
#define ROM_IMAGE_END   0xC8000ull
#define ROM_DATA_BASE   0xD0000ull
#define ROM_DATA_END    0xE0000ull
/* Under a deprivileged kernel (docs/execution-model.md) the hardware uses the hypervisor's GDT,
 * IDTs, TSS (with its I/O bitmap: every `out`) and trap stubs, which live here: every address
 * space the kernel loads must map them, read-only, as it maps the ROM. */
#define MONITOR_BASE    0xC8000ull
#define MONITOR_END     0xD0000ull
#define DATA_FRAMES     (DATA_POOL_SIZE / SZ_4K)

/* Valid calls that did not return 0 (each one is printed once, as a diagnostic). */
static unsigned mmu_bad_calls;

static void mmu_check(long status, const char *what, uint64_t arg)
{
	if (status != VMI_ERR_OK) {
		if (mmu_bad_calls < 4)
			printf("  %s(%lx): status %ld\n", what, (unsigned long)arg, status);
		mmu_bad_calls++;
	}
}

static inline uint64_t *entry_ptr(uint64_t table, unsigned index)
{
	return (uint64_t *)(uintptr_t)(table + 8ull * index);
}

static inline uint64_t entry_get(uint64_t table, unsigned index)
{
	return *(volatile uint64_t *)entry_ptr(table, index);
}

static inline uint64_t rd64(uint64_t addr) { return *(volatile uint64_t *)(uintptr_t)addr; }
static inline void wr64(uint64_t addr, uint64_t v) { *(volatile uint64_t *)(uintptr_t)addr = v; }

/* Write one entry of a registered table: directly or queued. */
static void put(uint64_t table, unsigned index, uint64_t value, int queued)
{
	uint64_t *p = entry_ptr(table, index);
	long s = queued ? vmi_set_pte_queued(p, value) : vmi_set_pte(p, value);
	mmu_check(s, queued ? "set_pte_queued" : "set_pte", (uintptr_t)p);
}

/* A fresh pool page registered as a table of `level` (0 on exhaustion, counted). */
static uint64_t new_table(uint32_t level)
{
	uint64_t t = (uintptr_t)alloc_pt_page();
	if (!t) {
		mmu_check(VMI_ERR_BAD_ADDRESS, "alloc_pt_page", level);
		return 0;
	}
	mmu_check(vmi_allocate_page(t, level), "allocate_page", t);
	return t;
}

/* --- boot information ------------------------------------------------------ */


/* --- the kernel map ----------------------------------------------------------- */

/*
 * A new PML4 whose entry 0 maps what keeps the guest running after the switch:
 * the first 2 MiB through a 4 KiB PT (0..LOW_RAM_END RW; with a ROM, its image
 * read-only and its data area RW (the shared page is its last page); deprivileged, the
 * hypervisor's monitor area read-only; 1 MiB..2 MiB RW), then 2 MiB pages RW up to
 * the page-table pool, the pool read-only, the rest of usable RAM RW (a tail
 * that is not 2 MiB-aligned through a second 4 KiB PT).  Returns the PML4;
 * *kpdpt gets the kernel PDPT (the one a clone shares).
 */
static uint64_t build_kernel_space(uint64_t ram_end, uint64_t *kpdpt)
{
	uint64_t pml4 = new_table(VMI_LEVEL_PML4);
	uint64_t pdpt = new_table(VMI_LEVEL_PDPT);
	uint64_t pd[4] = { 0 };
	uint64_t big_end = ram_end & ~(SZ_2M - 1);

	/* Top-down: every table is linked before it is filled (trap paging infers levels from links). */
	put(pml4, 0, pdpt | NONLEAF, 0);
	for (unsigned g = 0; g < 4 && (uint64_t)g * SZ_1G < ram_end; g++) {
		pd[g] = new_table(VMI_LEVEL_PD);
		put(pdpt, g, pd[g] | NONLEAF, 0);
	}

	/* The first 2 MiB, 4 KiB pages. */
	uint64_t pt_low = new_table(VMI_LEVEL_PT);
	put(pd[0], 0, pt_low | NONLEAF, 1);
	for (uint64_t a = 0; a < SZ_2M; a += SZ_4K) {
		uint64_t flags = 0;
		if (a < LOW_RAM_END || (a >= 0x100000ull && a < ram_end))
			flags = LEAF_RW;
		else if (vmi_rom_present() && a >= ROM_IMAGE_BASE && a < ROM_IMAGE_END)
			flags = LEAF_RO;
		else if (vmi_rom_present() && a >= ROM_DATA_BASE && a < ROM_DATA_END)
			flags = LEAF_RW;
		else if (vmi_deprivileged() && a >= MONITOR_BASE && a < MONITOR_END)
			flags = LEAF_RO;
		if (flags)
			put(pt_low, (unsigned)(a / SZ_4K), a | flags, 1);
	}

	/* 2 MiB pages up to the last whole 2 MiB of RAM; the pool read-only. */
	for (uint64_t a = SZ_2M; a < big_end; a += SZ_2M) {
		int pool = a >= PT_POOL_BASE && a < PT_POOL_BASE + PT_POOL_SIZE;
		put(pd[a / SZ_1G], (unsigned)((a % SZ_1G) / SZ_2M), a | (pool ? LEAF_RO : LEAF_RW) | PTE_PS, 1);
	}
	/* A tail that is not a whole 2 MiB (QEMU keeps the top 128 KiB of -m for itself). */
	if (big_end < ram_end && big_end >= SZ_2M) {
		uint64_t pt_tail = new_table(VMI_LEVEL_PT);
		put(pd[big_end / SZ_1G], (unsigned)((big_end % SZ_1G) / SZ_2M), pt_tail | NONLEAF, 1);
		for (uint64_t a = big_end; a < ram_end; a += SZ_4K)
			put(pt_tail, (unsigned)((a - big_end) / SZ_4K), a | LEAF_RW, 1);
	}
	*kpdpt = pdpt;
	return pml4;
}

/* --- the digest --------------------------------------------------------------- */

#define FNV_OFFSET 0xcbf29ce484222325ull
#define FNV_PRIME  0x100000001b3ull

static __attribute__((unused)) uint64_t fnv_u64(uint64_t h, uint64_t v)
{
	for (int b = 0; b < 8; b++) {
		h ^= (v >> (8 * b)) & 0xFF;
		h *= FNV_PRIME;
	}
	return h;
}

static __attribute__((unused)) uint64_t canonical(uint64_t va)
{
	return (va & (1ull << 47)) ? (va | 0xFFFF000000000000ull) : va;
}

/* Hash every present leaf with VA >= WORK_BASE under `table` (level `level`, covering `base`). */
static __attribute__((unused)) uint64_t digest_walk(uint64_t h, uint64_t space, uint64_t table, unsigned level, uint64_t base)
{
	unsigned shift = 12 + 9 * (level - 1);
	uint64_t span = 1ull << shift;

	for (unsigned i = 0; i < 512; i++) {
		uint64_t va = canonical(base + i * span);
		if (va + span <= WORK_BASE && !(va >> 63))
			continue; /* wholly below the workload region (the kernel map) */
		uint64_t e = entry_get(table, i);
		if (!(e & PTE_P))
			continue;
		int leaf = level == 1 || ((level == 2 || level == 3) && (e & PTE_PS));
		if (!leaf) {
			h = digest_walk(h, space, e & PTE_ADDR, level - 1, base + i * span);
			continue;
		}
		if (va < WORK_BASE)
			continue;
		uint64_t frame_mask = PTE_ADDR & ~(span - 1);
		h = fnv_u64(h, space);
		h = fnv_u64(h, va);
		h = fnv_u64(h, e & frame_mask);
		h = fnv_u64(h, e & ~frame_mask & ~(PTE_A | PTE_D));
	}
	return h;
}

#endif
