/*
 * Physical page allocator.
 *
 * Usable RAM comes from the multiboot memory map, clipped to
 * [__kernel_end, 4 GiB) -- everything below 1 MiB, the kernel image (incl.
 * .bss, page tables, boot stack) and anything the boot loader handed us
 * (info block, memory map, command line, modules) is never returned.
 *
 * Fresh pages are carved lazily from the free ranges with a bump pointer, so
 * initialisation touches no guest memory (a 3 GiB guest stays cheap for the
 * host).  Freed pages go on a LIFO list threaded through the pages themselves
 * and are handed out first.
 */
#include "lib.h"
#include "paging.h"

#define MAX_RANGES    32
#define MAX_RESERVED  9
#define MEM_LIMIT     0x100000000ull /* end of boot.S's identity map */
#define ONE_MIB       0x100000ull

struct range {
	uint64_t start, end; /* [start, end) */
};

static struct range ranges[MAX_RANGES]; /* free RAM not yet carved */
static unsigned nranges, cur_range;
static struct range reserved[MAX_RESERVED]; /* loader data to step around */
static unsigned nreserved;

struct free_page {
	struct free_page *next;
};
static struct free_page *free_list;

static uint64_t align_up(uint64_t v) { return (v + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1); }
static uint64_t align_down(uint64_t v) { return v & ~(PAGE_SIZE - 1); }

static void reserve(uint64_t start, uint64_t len)
{
	if (len && nreserved < MAX_RESERVED)
		reserved[nreserved++] = (struct range){ align_down(start), align_up(start + len) };
}

static void add_range(uint64_t base, uint64_t len)
{
	uint64_t lo = align_up(base), hi = align_down(base + len);
	uint64_t floor = align_up((uintptr_t)__kernel_end);

	if (floor < ONE_MIB)
		floor = ONE_MIB;
	if (lo < floor)
		lo = floor;
	if (hi > MEM_LIMIT)
		hi = MEM_LIMIT;
	if (lo < hi && nranges < MAX_RANGES)
		ranges[nranges++] = (struct range){ lo, hi };
}

/* The page-table pool: fresh (zero) pages only, never reused, never written by this allocator
 * (under trap and direct paging the pool is read-only to the guest). */
static uint64_t pt_next = PT_POOL_BASE, pt_end = PT_POOL_BASE;

void *alloc_pt_page(void)
{
	if (pt_next >= pt_end)
		return NULL;
	uint64_t page = pt_next;
	pt_next += PAGE_SIZE;
	return (void *)(uintptr_t)page;
}

void alloc_init(const struct multiboot_info *mbi)
{
	if (!mbi)
		return; /* no boot information: no memory to hand out */
	/* The pools are for page tables and the workloads' data frames: not general allocation. */
	reserve(PT_POOL_BASE, DATA_POOL_BASE + DATA_POOL_SIZE - PT_POOL_BASE);

	reserve((uintptr_t)mbi, sizeof(*mbi));
	if (mbi->flags & MULTIBOOT_INFO_CMDLINE)
		reserve(mbi->cmdline, strlen((const char *)(uintptr_t)mbi->cmdline) + 1);
	if (mbi->flags & MULTIBOOT_INFO_MODS) {
		const struct multiboot_module *m = (const void *)(uintptr_t)mbi->mods_addr;
		reserve(mbi->mods_addr, mbi->mods_count * sizeof(*m));
		for (uint32_t i = 0; i < mbi->mods_count; i++)
			reserve(m[i].start, m[i].end - m[i].start);
	}

	if (mbi->flags & MULTIBOOT_INFO_MMAP) {
		reserve(mbi->mmap_addr, mbi->mmap_length);
		uint64_t p = mbi->mmap_addr, end = p + mbi->mmap_length;
		while (p + sizeof(struct multiboot_mmap_entry) <= end) {
			const struct multiboot_mmap_entry *e = (const void *)(uintptr_t)p;
			if (e->type == MULTIBOOT_MEMORY_AVAILABLE) {
				add_range(e->base, e->len);
				if (e->base <= PT_POOL_BASE && e->base + e->len >= PT_POOL_BASE + PT_POOL_SIZE)
					pt_end = PT_POOL_BASE + PT_POOL_SIZE;
			}
			p += (uint64_t)e->size + sizeof(e->size);
		}
	} else if (mbi->flags & MULTIBOOT_INFO_MEMORY) {
		add_range(ONE_MIB, (uint64_t)mbi->mem_upper * 1024);
	}
}

static int is_reserved(uint64_t page)
{
	for (unsigned i = 0; i < nreserved; i++)
		if (page >= reserved[i].start && page < reserved[i].end)
			return 1;
	return 0;
}

void *alloc_page(void)
{
	void *page = NULL;

	if (free_list) {
		page = free_list;
		free_list = free_list->next;
	} else {
		while (cur_range < nranges && !page) {
			struct range *r = &ranges[cur_range];
			if (r->start >= r->end) {
				cur_range++;
				continue;
			}
			uint64_t p = r->start;
			r->start += PAGE_SIZE;
			if (!is_reserved(p))
				page = (void *)(uintptr_t)p;
		}
	}
	if (page)
		memset(page, 0, PAGE_SIZE);
	return page;
}

void free_page(void *page)
{
	if (!page)
		return;
	struct free_page *f = page;
	f->next = free_list;
	free_list = f;
}

/* End of usable RAM below 4 GiB from the multiboot memory map (page-aligned down). */
uint64_t ram_end_below_4g(void)
{
	const struct multiboot_info *mbi = boot_info;
	uint64_t end = 0;

	if (mbi && (mbi->flags & MULTIBOOT_INFO_MMAP)) {
		uint64_t p = mbi->mmap_addr, stop = p + mbi->mmap_length;
		while (p + sizeof(struct multiboot_mmap_entry) <= stop) {
			const struct multiboot_mmap_entry *e = (const void *)(uintptr_t)p;
			if (e->type == MULTIBOOT_MEMORY_AVAILABLE && e->base < MEM_4G) {
				uint64_t top = e->base + e->len;
				if (top > MEM_4G)
					top = MEM_4G;
				if (top > end)
					end = top;
			}
			p += (uint64_t)e->size + sizeof(e->size);
		}
	} else if (mbi && (mbi->flags & MULTIBOOT_INFO_MEMORY)) {
		end = 0x100000ull + (uint64_t)mbi->mem_upper * 1024;
	}
	return end & ~(SZ_4K - 1);
}
