/*
 * mmu: the page-table workload of docs/paging.md.
 *
 * Command line (multiboot, e.g. QEMU -append): pages=N (default 2048, clamped
 * to 64..262144), switches=M (default 64).
 *
 *  1. Address space A: a kernel map (mmu_common.h) in registered pool tables,
 *     built top-down (each table linked before it is filled).
 *  2. N pages at WORK_BASE -> data frames DATA_POOL_BASE + (i % frames) * 4 KiB,
 *     RW, queued; SetCR3(A); a tag through each VA reads back through the frame.
 *     Without a ROM, on a machine with more than one CPU (docs/smp.md), the page tables are
 *     taken from the pool in order first, then every CPU links and fills a disjoint slice of
 *     them: the tables and so the DIGEST are the same for any CPU count by construction. Under
 *     a ROM the VMI layer's queue is one buffer, not one per CPU, so one CPU does it all.
 *  3. RW cleared on odd pages (queued) + FlushTLB; every 4th page (i % 4 == 0)
 *     unmapped (queued) + FlushTLB.
 *  4. Clone B: shares A's kernel PDPT; its own workload tables with every present
 *     leaf copied read-only; A's leaves made read-only too.  M switches A<->B,
 *     each reading a tag through a VA.  COW break in B for pages i % 16 == 1:
 *     a fresh frame (from the top of the data pool; only as many pages as there
 *     are frames no mapping uses), the contents copied, mapped RW in B only; a
 *     write through B leaves A's view unchanged.
 *  5. Ordering: a pending queued update is visible after FlushTLB, after
 *     InvalPage, and (an update of B queued while in A) right after SetCR3(B).
 *  6. Teardown: A's last workload PT emptied, unlinked and released (status 0);
 *     releasing A's still-linked workload PDPT: INFO line (IN_USE with a
 *     validating ROM; natively nothing checks).
 *  7. DIGEST: FNV-1a over (space, VA, frame, flags without A/D) of every present
 *     leaf >= WORK_BASE in A (space 0) then B (space 1), walked in the guest's own
 *     tables from its own record of the roots (never CR3: a shadowing hypervisor
 *     puts its own root there).
 *
 * PASS lines name no sizes or addresses: they read the same in every mode.
 */
#include "mmu_common.h"
#include "smp.h"

#define MAX_PAGES   (512u * 512u) /* one PD per space */
#define MIN_PAGES   64u
#define TAG(i)      (0x5441470000000000ull | (uint64_t)(i))
#define COW_TAG(i)  (0x434F570000000000ull | (uint64_t)(i))

struct space {
	uint64_t pml4, pdpt, pd;     /* workload PDPT/PD */
	uint64_t pt[MAX_PAGES / 512];
};

static struct space A, B;
static uint64_t kpdpt;           /* A's kernel PDPT, shared by B */
static unsigned npages, nswitches, npts;
static unsigned ncow;            /* COW-broken pages: 1, 17, 33, ... (as many as free frames allow) */
static unsigned next_spare;      /* spare data frames, taken from the top of the pool */

static inline uint64_t va_of(unsigned i) { return WORK_BASE + (uint64_t)i * SZ_4K; }
static inline uint64_t data_frame(unsigned i) { return DATA_POOL_BASE + (uint64_t)(i % DATA_FRAMES) * SZ_4K; }
static inline uint64_t leaf_get(const struct space *s, unsigned i) { return entry_get(s->pt[i / 512], i % 512); }
static inline void leaf_put(const struct space *s, unsigned i, uint64_t v, int queued) { put(s->pt[i / 512], i % 512, v, queued); }

/* A data frame none of the first-pass mappings' frames `avoid` uses (unless the pool wraps). */
static uint64_t spare_frame(uint64_t avoid)
{
	for (;;) {
		uint64_t f = DATA_POOL_BASE + DATA_POOL_SIZE - (1 + (uint64_t)(next_spare++ % DATA_FRAMES)) * SZ_4K;
		if (f != avoid)
			return f;
	}
}

static void switch_to(const struct space *s)
{
	mmu_check(vmi_set_cr3(s->pml4), "set_cr3", s->pml4);
}

/* Step 2: the workload tables of A and its N mappings. */
static unsigned fill_cpus = 1; /* CPUs sharing step 2 (smp_init's count; 1 under an older ROM) */

/* Link page table k into A's PD, then fill its leaves (a table is linked before it is filled). */
static void fill_pt(unsigned k)
{
	put(A.pd, k, A.pt[k] | NONLEAF, k & 1); /* links both direct and queued */
	for (unsigned j = 0; j < 512 && k * 512 + j < npages; j++)
		leaf_put(&A, k * 512 + j, data_frame(k * 512 + j) | LEAF_RW, 1);
}

/* On every CPU: its own contiguous slice of A's page tables. */
static void fill_slice(void *arg)
{
	(void)arg;
	unsigned id = smp_cpu_id();
	for (unsigned k = npts * id / fill_cpus; k < npts * (id + 1) / fill_cpus; k++)
		fill_pt(k);
	mmu_check(vmi_flush_queue(), "flush_queue", id); /* this CPU's queue: complete before the barrier */
}

static void map_workload(void)
{
	A.pdpt = new_table(VMI_LEVEL_PDPT);
	put(A.pml4, (unsigned)((WORK_BASE >> 39) & 511), A.pdpt | NONLEAF, 0);
	A.pd = new_table(VMI_LEVEL_PD);
	put(A.pdpt, 0, A.pd | NONLEAF, 0);
	if (fill_cpus > 1) {
		/* The pool's bump allocator is one CPU's: every table is taken here, in the order one
		 * CPU takes them below, so each table lands on the same frame for any CPU count. */
		for (unsigned k = 0; k < npts; k++)
			A.pt[k] = new_table(VMI_LEVEL_PT);
		/* Returns when every CPU has filled its slice: the barrier before A is used. */
		if (smp_run_all(fill_slice, NULL))
			report(0, "step 2 on every CPU: each CPU finished its slice");
		return;
	}
	for (unsigned k = 0; k < npts; k++) {
		A.pt[k] = new_table(VMI_LEVEL_PT);
		fill_pt(k);
	}
}

static void step_map_and_tag(void)
{
	map_workload();
	switch_to(&A);
	unsigned bad = 0;
	for (unsigned i = 0; i < npages; i++) {
		wr64(va_of(i), TAG(i));
		bad += rd64(data_frame(i)) != TAG(i);
	}
	report(bad == 0, "workload mapped in A: a tag written through each page reads back through its frame");
}

static void step_protect(void)
{
	for (unsigned i = 1; i < npages; i += 2)
		leaf_put(&A, i, data_frame(i) | LEAF_RO, 1);
	mmu_check(vmi_flush_tlb(VMI_FLUSH_TLB), "flush_tlb", 0);
	for (unsigned i = 0; i < npages; i += 4)
		leaf_put(&A, i, 0, 1);
	mmu_check(vmi_flush_tlb(VMI_FLUSH_TLB), "flush_tlb", 0);

	unsigned bad = 0;
	for (unsigned i = 0; i < npages; i++) {
		uint64_t want = i % 4 == 0 ? 0 : data_frame(i) | (i & 1 ? LEAF_RO : LEAF_RW);
		uint64_t got = leaf_get(&A, i);
		bad += (got & ~(PTE_A | PTE_D)) != (want & ~(PTE_A | PTE_D));
		if (want)
			bad += rd64(va_of(i)) != rd64(data_frame(i));
	}
	report(bad == 0, "protections changed, every fourth page unmapped: tables and reads agree");
}

/* Step 4: B shares A's kernel map and frames; both read-only. */
static void clone_b(void)
{
	B.pml4 = new_table(VMI_LEVEL_PML4);
	put(B.pml4, 0, kpdpt | NONLEAF, 0);
	B.pdpt = new_table(VMI_LEVEL_PDPT);
	put(B.pml4, (unsigned)((WORK_BASE >> 39) & 511), B.pdpt | NONLEAF, 0);
	B.pd = new_table(VMI_LEVEL_PD);
	put(B.pdpt, 0, B.pd | NONLEAF, 0);
	for (unsigned k = 0; k < npts; k++) {
		B.pt[k] = new_table(VMI_LEVEL_PT);
		put(B.pd, k, B.pt[k] | NONLEAF, k & 1);
		for (unsigned j = 0; j < 512; j++) {
			uint64_t e = entry_get(A.pt[k], j);
			if (!(e & PTE_P))
				continue;
			put(B.pt[k], j, e & ~PTE_RW, 1);
			if (e & PTE_RW)
				put(A.pt[k], j, e & ~PTE_RW, 1);
		}
	}
	mmu_check(vmi_flush_tlb(VMI_FLUSH_TLB), "flush_tlb", 0);
}

static void step_switches(void)
{
	unsigned bad = 0;
	for (unsigned s = 0; s < nswitches; s++) {
		const struct space *sp = s & 1 ? &A : &B;
		switch_to(sp);
		unsigned p = (s * 37u) % npages;
		if (p % 4 == 0)
			p++;
		if (p >= npages)
			p = 1;
		uint64_t fa = leaf_get(&A, p) & PTE_ADDR, fb = leaf_get(&B, p) & PTE_ADDR;
		bad += fa != fb || rd64(va_of(p)) != rd64(fa);
	}
	report(bad == 0, "clone B shares A's frames read-only: reads agree across SetCR3 switches");
}

static void step_cow(void)
{
	unsigned bad = 0;
	for (unsigned c = 0, i = 1; c < ncow; c++, i += 16) {
		uint64_t old = leaf_get(&B, i) & PTE_ADDR;
		uint64_t f = spare_frame(old);
		memcpy((void *)(uintptr_t)f, (const void *)(uintptr_t)old, SZ_4K);
		leaf_put(&B, i, f | LEAF_RW, 1);
	}
	mmu_check(vmi_flush_tlb(VMI_FLUSH_TLB), "flush_tlb", 0);

	switch_to(&B);
	for (unsigned c = 0, i = 1; c < ncow; c++, i += 16) {
		uint64_t fa = leaf_get(&A, i) & PTE_ADDR, fb = leaf_get(&B, i) & PTE_ADDR;
		uint64_t before = rd64(fa + 8);
		bad += rd64(va_of(i)) != rd64(fa); /* the copy */
		wr64(va_of(i) + 8, COW_TAG(i));
		bad += rd64(va_of(i) + 8) != COW_TAG(i) || rd64(fb + 8) != COW_TAG(i);
		bad += fa == fb || rd64(fa + 8) != before;
	}
	switch_to(&A);
	for (unsigned c = 0, i = 1; c < ncow; c++, i += 16)
		bad += rd64(va_of(i) + 8) == COW_TAG(i) || rd64(va_of(i) + 8) != rd64((leaf_get(&A, i) & PTE_ADDR) + 8);
	report(bad == 0, "COW break in B: writes through B leave A's view unchanged");
}

/* Point page i of space s at a fresh frame holding `tag`, queued; returns the VA. */
static uint64_t queue_retarget(const struct space *s, unsigned i, uint64_t tag)
{
	uint64_t f = spare_frame(leaf_get(s, i) & PTE_ADDR);
	wr64(f, tag);
	leaf_put(s, i, f | LEAF_RO, 1);
	return va_of(i);
}

static void step_ordering(void)
{
	/* In A. (a) FlushTLB completes the queue before flushing. */
	uint64_t va = va_of(2);
	(void)rd64(va); /* a cached translation to go stale */
	queue_retarget(&A, 2, 0x4F52444552410000ull);
	mmu_check(vmi_flush_tlb(VMI_FLUSH_TLB), "flush_tlb", 0);
	report(rd64(va) == 0x4F52444552410000ull, "ordering: a queued update then FlushTLB: the read sees the new frame");

	/* (b) InvalPage likewise. */
	va = va_of(3);
	(void)rd64(va);
	queue_retarget(&A, 3, 0x4F52444552420000ull);
	mmu_check(vmi_inval_page(va), "inval_page", va);
	report(rd64(va) == 0x4F52444552420000ull, "ordering: a queued update then InvalPage: the read sees the new frame");

	/* (c) An update of B queued while in A is in place when SetCR3(B) returns. */
	va = va_of(5);
	(void)rd64(va);
	queue_retarget(&B, 5, 0x4F52444552430000ull);
	switch_to(&B);
	report(rd64(va) == 0x4F52444552430000ull, "ordering: a queued update in B then SetCR3(B): visible right after the switch");
}

static void step_teardown(void)
{
	unsigned t = npts - 1;
	for (unsigned j = 0; j < 512; j++)
		if (entry_get(A.pt[t], j) & PTE_P)
			put(A.pt[t], j, 0, 1);
	put(A.pd, t, 0, 0);
	mmu_check(vmi_flush_tlb(VMI_FLUSH_TLB), "flush_tlb", 0);
	long s = vmi_release_page(A.pt[t]);
	report(s == VMI_ERR_OK, "teardown: an emptied, unlinked page table is released");
	A.pt[t] = 0;

	/* Still linked from A's PML4: IN_USE under a validating ROM; natively nothing checks. */
	s = vmi_release_page(A.pdpt);
	printf("INFO: release of a linked table: status=%ld (%s)\n", s,
	       s == VMI_ERR_IN_USE ? "IN_USE" : !vmi_rom_present() ? "native: unchecked" : s ? "unexpected error" : "accepted: not validated");
	if (s == VMI_ERR_OK && vmi_rom_present())
		mmu_check(vmi_allocate_page(A.pdpt, VMI_LEVEL_PDPT), "allocate_page", A.pdpt); /* undo */
}

void kmain(uint32_t magic, uint32_t mbinfo)
{
	(void)magic, (void)mbinfo;
	uint64_t n = cmdline_u64("pages", 2048), m = cmdline_u64("switches", 64);
	npages = (unsigned)(n < MIN_PAGES ? MIN_PAGES : n > MAX_PAGES ? MAX_PAGES : n);
	nswitches = (unsigned)(m > 1000000 ? 1000000 : m);
	npts = (npages + 511) / 512;
	/* Fresh frames are the data frames no mapping uses (the pool wraps at DATA_FRAMES pages);
	 * keep 3 for the ordering checks. */
	unsigned free_frames = npages < DATA_FRAMES ? DATA_FRAMES - npages : 0;
	ncow = (npages + 14) / 16;
	if (ncow > (free_frames > 3 ? free_frames - 3 : 0))
		ncow = free_frames > 3 ? free_frames - 3 : 0;
	printf("mmu: pages=%u switches=%u\n", npages, nswitches);

	uint64_t ram_end = ram_end_below_4g();
	if (ram_end < DATA_POOL_BASE + DATA_POOL_SIZE) {
		report(0, "the mmu workload needs RAM up to the end of the data pool (96 MiB; run with -m 128)");
		vmi_shutdown((uint32_t)report_summary());
		return;
	}

	/* Several CPUs natively, or under a ROM whose queue is per CPU (VMI 1.5: GetCPUInfo exists
	 * and the ROM keeps one buffer per CPU); an older ROM's one buffer would mix CPUs' updates. */
	uint32_t me = 0, cpus = 0;
	if (!vmi_rom_present() || vmi_cpu_info(&me, &cpus) == VMI_ERR_OK) {
		fill_cpus = smp_init();
		if (fill_cpus > 1)
			printf("INFO: step 2 on %u CPUs\n", fill_cpus);
	}
	A.pml4 = build_kernel_space(ram_end, &kpdpt);
	step_map_and_tag();
	step_protect();
	clone_b();
	step_switches();
	step_cow();
	step_ordering();
	step_teardown();
	report(mmu_bad_calls == 0, "every valid MMU call returned status 0");

	mmu_check(vmi_flush_queue(), "flush_queue", 0);
	uint64_t h = FNV_OFFSET;
	h = digest_walk(h, 0, A.pml4, 4, 0);
	h = digest_walk(h, 1, B.pml4, 4, 0);
	printf("DIGEST %016lx\n", (unsigned long)h);
	vmi_shutdown((uint32_t)report_summary());
}
