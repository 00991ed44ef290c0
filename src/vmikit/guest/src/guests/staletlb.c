/*
 * staletlb: no stale translation survives a page-table change made through VMI.
 *
 * A deprivileged kernel runs on the host KVM's shadow page tables, which never see the
 * hypervisor's own writes into guest tables (docs/execution-model.md): unless the
 * hypervisor flushes them, an unmapped page stays readable, a remapped page shows its old
 * frame and a write-protected page stays writable. Each check below fails then:
 *   - rounds of demand paging: every round unmaps every page (queued, one FlushQueue), and
 *     every page must fault again in the next round;
 *   - remap then read, directly and queued: the read sees the new frame;
 *   - write-protect then write: the write faults (at ring 3 every access is a user access,
 *     so read-only is enforced; a ring-0 kernel without CR0.WP would not fault).
 * No MMU.InvalPage or FlushTLB is made: the interface promises the change is seen at once.
 * Needs a ROM (natively a kernel must invlpg after such a change). Command line: none.
 */
#include "mmu_common.h"

#define NPAGES   64
#define ROUNDS   4
#define TAG(i)   (0x5EED000000000000ull | (uint64_t)(i))
#define FRAME(i) (DATA_POOL_BASE + (uint64_t)(i) * SZ_4K)
#define VA(i)    (WORK_BASE + (uint64_t)(i) * SZ_4K)
#define PF_PRESENT 0x1
#define PF_WRITE   0x2

static uint64_t pt;
static volatile unsigned demand_faults, wp_faults, other_faults;
static volatile unsigned wp_index = ~0u;
static volatile uint64_t wp_frame;

static int on_pf(struct trap_regs *r)
{
	uint64_t va = trap_cr2();
	if (va < WORK_BASE || va >= VA(512))
		return 0;
	unsigned i = (unsigned)((va - WORK_BASE) / SZ_4K);
	if (!(r->error_code & PF_PRESENT) && i < NPAGES) {
		demand_faults++;
		put(pt, i, FRAME(i) | LEAF_RW, 0); /* map it; the access is retried */
		return 1;
	}
	if ((r->error_code & (PF_PRESENT | PF_WRITE)) == (PF_PRESENT | PF_WRITE) && i == wp_index) {
		wp_faults++;
		put(pt, i, wp_frame | LEAF_RW, 0); /* make it writable again */
		return 1;
	}
	other_faults++;
	return 0;
}

static void demand_paging(void)
{
	int all = 1;
	for (unsigned round = 0; round < ROUNDS; round++) {
		unsigned before = demand_faults, bad = 0;
		for (unsigned i = 0; i < NPAGES; i++)
			bad += rd64(VA(i)) != TAG(i);
		all &= bad == 0 && demand_faults - before == NPAGES;
		if (bad || demand_faults - before != NPAGES)
			printf("INFO: round %u: %u faults for %u pages, %u wrong values\n", round,
			       demand_faults - before, NPAGES, bad);
		for (unsigned i = 0; i < NPAGES; i++)
			put(pt, i, 0, 1); /* unmap, queued */
		mmu_check(vmi_flush_queue(), "flush_queue", 0);
	}
	report(all, "demand paging: %u rounds, every unmapped page faults again and reads its own frame", ROUNDS);
}

static void remap(void)
{
	unsigned i = 100;
	put(pt, i, FRAME(1) | LEAF_RW, 0);
	int ok = rd64(VA(i)) == TAG(1);
	put(pt, i, FRAME(2) | LEAF_RW, 0);
	ok &= rd64(VA(i)) == TAG(2);
	report(ok, "remap then read (SetPTE): the read sees the new frame");
	put(pt, i, FRAME(3) | LEAF_RW, 1);
	mmu_check(vmi_flush_queue(), "flush_queue", 0);
	ok = rd64(VA(i)) == TAG(3);
	put(pt, i, FRAME(4) | LEAF_RO, 1);
	mmu_check(vmi_flush_queue(), "flush_queue", 0);
	ok &= rd64(VA(i)) == TAG(4);
	report(ok, "remap then read (SetPTE|queue, FlushQueue): the read sees the new frame");
	put(pt, i, 0, 0);
}

static void write_protect(void)
{
	unsigned i = 200;
	put(pt, i, FRAME(5) | LEAF_RW, 0);
	wr64(VA(i), 0x1111);
	put(pt, i, FRAME(5) | LEAF_RO, 0);
	wp_index = i;
	wp_frame = FRAME(5);
	unsigned before = wp_faults;
	wr64(VA(i), 0x2222); /* faults once; the handler makes the page writable again */
	wp_index = ~0u;
	report(wp_faults == before + 1 && rd64(FRAME(5)) == 0x2222,
	       "write-protect then write: the write faults, and lands once the page is writable again");
	put(pt, i, 0, 0);
}

void kmain(uint32_t magic, uint32_t mbinfo)
{
	(void)magic, (void)mbinfo;
	printf("vmikit staletlb guest\n");
	if (!vmi_rom_present()) {
		printf("INFO: no ROM: a bare kernel must invlpg after changing a present entry; nothing to check\n");
		exit(report_summary());
	}
	for (unsigned i = 0; i < NPAGES; i++)
		wr64(FRAME(i), TAG(i));
	uint64_t kpdpt = 0;
	uint64_t pml4 = build_kernel_space(ram_end_below_4g(), &kpdpt);
	mmu_check(vmi_set_cr3(pml4), "set_cr3", pml4);
	uint64_t pdpt = new_table(VMI_LEVEL_PDPT), pd = new_table(VMI_LEVEL_PD);
	pt = new_table(VMI_LEVEL_PT);
	put(pml4, (unsigned)(WORK_BASE >> 39) & 0x1FF, pdpt | NONLEAF, 0);
	put(pdpt, 0, pd | NONLEAF, 0);
	put(pd, 0, pt | NONLEAF, 0);
	set_trap_hook(14, on_pf);
	demand_paging();
	remap();
	if (vmi_deprivileged())
		write_protect();
	else
		printf("INFO: ring 0 without CR0.WP: a read-only page is writable to the kernel; not checked\n");
	set_trap_hook(14, NULL);
	report(mmu_bad_calls == 0 && other_faults == 0, "every VMI call succeeded and no unexpected #PF came");
	exit(report_summary());
}
