/*
 * mmuviolate: every page-table validation rule of docs/paging.md, broken on
 * purpose, once with the direct call and once queued.
 *
 * Meant for --paging direct / shadow / trap, where each attempt is refused and
 * changes nothing; under --paging native (no validation) every attempt is simply
 * accepted -- the guest undoes what it can and carries on either way.
 *
 * Setup: the kernel map of mmu_common.h in registered pool tables, plus a
 * workload skeleton PML4[2] -> pdpt -> pd -> pt (VA WORK_BASE), then SetCR3.
 * Violations target entries of the workload skeleton (or of unused PML4 slots):
 * nothing ever accesses those VAs, so an accepted violation cannot crash us.
 *
 * Output, per rule:
 *   VIOLATION <rule> direct status=<s>
 *   VIOLATION <rule> queued status=<s> index=<i> cause=<c>
 *   UNCHANGED <rule> yes|no
 * For entry rules, "queued" = vmi_set_pte_queued + the ROM's MMU.FlushQueue entry
 * called with (0, 0) (flush the ROM's own buffer): status is the flush's, and on
 * BATCH_INVALID index/cause are its result slots 1 and 2; otherwise index=-1 and
 * cause=0 (or, if the queued call itself failed -- annotations not honoured --
 * status and cause are that call's, index=-1).  For the call rules (cr3-*,
 * release-*, allocate-*) "queued" means: the violation needs a queued update the
 * call must see first (the ROM completes the queue before any other hypercall):
 * status is the call's, index=-1, cause=status.  UNCHANGED: the affected entry
 * (or CR3, via GetCR3) reads as before after both attempts, and with a ROM the
 * call did not succeed.
 * Rules: leaf-non-ram, leaf-writable-table, leaf-writable-rom,
 * nonleaf-unregistered (an unregistered pool page: trap paging infers it is a
 * table, by design), nonleaf-non-pool (a RAM page outside the pool),
 * nonleaf-wrong-level, reserved-pml4-ps, reserved-2m-frame (a 2 MiB leaf with
 * frame bits 13-20 set), entry-not-in-table, cr3-unregistered, release-in-use,
 * allocate-mapped-writable.
 * Then: BATCH (5 queued updates, the 3rd bad), applied=<entries that changed>,
 * and PASS lines for the setup and for a valid update after all the rejections.
 */
#include "mmu_common.h"

#define PML4_WORK ((unsigned)((WORK_BASE >> 39) & 511))

static uint64_t pml4, kpdpt, pdpt, pd, pt;
static uint64_t ram_end;

struct attempt {
	long status, index, cause;
};

/* The ROM's FlushQueue entry with (0, 0): completes its buffer; no ROM: nothing queued. */
static struct attempt flush_rom_queue(void)
{
	struct attempt a = { 0, -1, 0 };
	vmi_entry_t e = vmi_entry(VMI_CALL_MMU_FLUSHQUEUE);
	if (e) {
		uint64_t res[4] = { 0 };
		a.status = e(0, 0, 0, res);
		if (a.status == VMI_ERR_BATCH_INVALID) {
			a.index = (long)res[0];
			a.cause = (long)res[1];
		}
	}
	return a;
}

static struct attempt queued_pte(uint64_t *p, uint64_t v)
{
	long s = vmi_set_pte_queued(p, v);
	if (s != VMI_ERR_OK) {
		flush_rom_queue();
		return (struct attempt){ s, -1, s };
	}
	return flush_rom_queue();
}

static void print_direct(const char *rule, long status)
{
	printf("VIOLATION %s direct status=%ld\n", rule, status);
}

static void print_queued(const char *rule, struct attempt a)
{
	printf("VIOLATION %s queued status=%ld index=%ld cause=%ld\n", rule, a.status, a.index, a.cause);
}

static void print_unchanged(const char *rule, int same)
{
	printf("UNCHANGED %s %s\n", rule, same ? "yes" : "no");
}

/* An entry rule: write `bad` into table[index] directly, then queued; restore after each. */
static void entry_rule(const char *rule, uint64_t table, unsigned index, uint64_t bad)
{
	uint64_t *p = entry_ptr(table, index);
	uint64_t orig = *(volatile uint64_t *)p;
	int same = 1;

	long s = vmi_set_pte(p, bad);
	print_direct(rule, s);
	if (*(volatile uint64_t *)p != orig) {
		same = 0;
		vmi_set_pte(p, orig); /* accepted (no validation): undo */
	}

	struct attempt a = queued_pte(p, bad);
	print_queued(rule, a);
	if (*(volatile uint64_t *)p != orig) {
		same = 0;
		vmi_set_pte(p, orig);
	}
	print_unchanged(rule, same);
}

/* A RAM page outside the pool holding a copy of our PML4 (so that loading it by mistake is harmless). */
static uint64_t unregistered_root(void)
{
	uint64_t page = (uintptr_t)alloc_page();
	if (page)
		memcpy((void *)(uintptr_t)page, (const void *)(uintptr_t)pml4, SZ_4K);
	return page;
}

static void rule_cr3(void)
{
	const char *rule = "cr3-unregistered";
	uint64_t before = vmi_get_cr3();
	int same = 1;

	uint64_t root = unregistered_root();
	long s = vmi_set_cr3(root);
	print_direct(rule, s);
	same &= vmi_get_cr3() == before && (!vmi_rom_present() || s != VMI_ERR_OK);
	vmi_set_cr3(pml4);

	/* With a valid update pending: the ROM completes it, then refuses the load. */
	uint64_t *p = entry_ptr(pt, 40);
	vmi_set_pte_queued(p, (DATA_POOL_BASE + 40 * SZ_4K) | LEAF_RO);
	s = vmi_set_cr3(root);
	print_queued(rule, (struct attempt){ s, -1, s });
	same &= vmi_get_cr3() == before && (!vmi_rom_present() || s != VMI_ERR_OK);
	vmi_set_cr3(pml4);
	same &= *(volatile uint64_t *)p == ((DATA_POOL_BASE + 40 * SZ_4K) | LEAF_RO); /* the queued update landed */
	print_unchanged(rule, same);
}

static void rule_release_in_use(void)
{
	const char *rule = "release-in-use";
	int same = 1;

	/* pt is linked from pd[0]. */
	uint64_t link = entry_get(pd, 0);
	long s = vmi_release_page(pt);
	print_direct(rule, s);
	if (s == VMI_ERR_OK && vmi_rom_present()) {
		same = 0;
		vmi_allocate_page(pt, VMI_LEVEL_PT); /* accepted: register it again */
	}
	same &= entry_get(pd, 0) == link;

	/* A fresh table whose link to it is still queued when the release comes. */
	uint64_t pt2 = new_table(VMI_LEVEL_PT);
	vmi_set_pte_queued(entry_ptr(pd, 4), pt2 | NONLEAF);
	s = vmi_release_page(pt2);
	print_queued(rule, (struct attempt){ s, -1, s });
	if (s == VMI_ERR_OK && vmi_rom_present()) {
		same = 0;
		vmi_allocate_page(pt2, VMI_LEVEL_PT);
	}
	same &= entry_get(pd, 4) == (pt2 | NONLEAF);
	/* Both are still tables: an entry written into each is accepted. */
	same &= vmi_set_pte(entry_ptr(pt, 41), entry_get(pt, 41)) == VMI_ERR_OK;
	same &= vmi_set_pte(entry_ptr(pt2, 0), 0) == VMI_ERR_OK;
	print_unchanged(rule, same);
}

static void rule_allocate_writable(void)
{
	const char *rule = "allocate-mapped-writable";
	int same = 1;

	/* A pool page that is no table yet may be mapped writable; registering it then is refused. */
	uint64_t page = (uintptr_t)alloc_pt_page();
	put(pt, 50, page | LEAF_RW, 0);
	long s = vmi_allocate_page(page, VMI_LEVEL_PT);
	print_direct(rule, s);
	if (s == VMI_ERR_OK && vmi_rom_present()) {
		same = 0;
		vmi_release_page(page);
	}
	same &= entry_get(pt, 50) == (page | LEAF_RW);

	/* The writable mapping is still queued when the registration comes. */
	uint64_t page2 = (uintptr_t)alloc_pt_page();
	vmi_set_pte_queued(entry_ptr(pt, 51), page2 | LEAF_RW);
	s = vmi_allocate_page(page2, VMI_LEVEL_PT);
	print_queued(rule, (struct attempt){ s, -1, s });
	if (s == VMI_ERR_OK && vmi_rom_present()) {
		same = 0;
		vmi_release_page(page2);
	}
	same &= entry_get(pt, 51) == (page2 | LEAF_RW);
	print_unchanged(rule, same);
}

/* Five queued updates, the third bad: nothing applied, the third reported. */
static void batch(void)
{
	uint64_t vals[5];
	uint64_t before[5];
	for (unsigned k = 0; k < 5; k++) {
		vals[k] = (DATA_POOL_BASE + (60 + k) * SZ_4K) | LEAF_RW;
		before[k] = entry_get(pt, 60 + k);
	}
	vals[2] = (ram_end + SZ_1G) & ~(SZ_1G - 1); /* beyond RAM */
	vals[2] |= LEAF_RO;

	long qs = VMI_ERR_OK;
	for (unsigned k = 0; k < 5; k++) {
		long s = vmi_set_pte_queued(entry_ptr(pt, 60 + k), vals[k]);
		if (s != VMI_ERR_OK && qs == VMI_ERR_OK)
			qs = s; /* annotations not honoured: the bad one fails on its own */
	}
	struct attempt a = flush_rom_queue();
	if (qs != VMI_ERR_OK && a.status == VMI_ERR_OK)
		a = (struct attempt){ qs, -1, qs };
	printf("BATCH status=%ld index=%ld cause=%ld\n", a.status, a.index, a.cause);
	unsigned applied = 0;
	for (unsigned k = 0; k < 5; k++) {
		if (entry_get(pt, 60 + k) != before[k]) {
			applied++;
			vmi_set_pte(entry_ptr(pt, 60 + k), before[k]); /* accepted: undo */
		}
	}
	printf("BATCH applied=%u\n", applied);
}

void kmain(uint32_t magic, uint32_t mbinfo)
{
	(void)magic, (void)mbinfo;
	printf("mmuviolate\n");
	ram_end = ram_end_below_4g();

	pml4 = build_kernel_space(ram_end, &kpdpt);
	pdpt = new_table(VMI_LEVEL_PDPT);
	put(pml4, PML4_WORK, pdpt | NONLEAF, 0);
	pd = new_table(VMI_LEVEL_PD);
	put(pdpt, 0, pd | NONLEAF, 0);
	pt = new_table(VMI_LEVEL_PT);
	put(pd, 0, pt | NONLEAF, 0);
	for (unsigned j = 0; j < 8; j++)
		put(pt, j, (DATA_POOL_BASE + j * SZ_4K) | LEAF_RW, 1);
	/* A registered but unlinked table, target of the PS rule. */
	uint64_t pdpt_spare = new_table(VMI_LEVEL_PDPT);
	mmu_check(vmi_set_cr3(pml4), "set_cr3", pml4);
	report(mmu_bad_calls == 0, "setup: a registered address space, loaded with SetCR3");
	unsigned setup_bad = mmu_bad_calls;

	uint64_t beyond = (ram_end + SZ_1G) & ~(SZ_1G - 1); /* the next GiB boundary past RAM */
	uint64_t unregistered = (uintptr_t)alloc_pt_page(); /* a pool page, never registered */
	uint64_t ordinary = (uintptr_t)alloc_page();         /* RAM, no table */

	entry_rule("leaf-non-ram", pt, 8, beyond | LEAF_RO);
	entry_rule("leaf-writable-table", pt, 9, pt | LEAF_RW);
	entry_rule("leaf-writable-rom", pt, 10, ROM_IMAGE_BASE | LEAF_RW);
	entry_rule("nonleaf-unregistered", pd, 1, unregistered | NONLEAF);
	entry_rule("nonleaf-non-pool", pd, 5, ordinary | NONLEAF);
	entry_rule("nonleaf-wrong-level", pd, 2, pdpt | NONLEAF); /* a linked level-3 table (known to trap too) */
	entry_rule("reserved-pml4-ps", pml4, PML4_WORK + 1, pdpt_spare | NONLEAF | PTE_PS);
	entry_rule("reserved-2m-frame", pd, 3, (4 * SZ_2M + 0x1FE000ull) | LEAF_RO | PTE_PS);
	entry_rule("entry-not-in-table", ordinary, 0, (DATA_POOL_BASE + 32 * SZ_4K) | LEAF_RW);
	rule_cr3();
	rule_release_in_use();
	rule_allocate_writable();
	batch();

	/* Everything still works. */
	mmu_bad_calls = setup_bad;
	uint64_t v = (DATA_POOL_BASE + 70 * SZ_4K) | LEAF_RW;
	long s = vmi_set_pte(entry_ptr(pt, 70), v);
	mmu_check(vmi_flush_tlb(VMI_FLUSH_TLB), "flush_tlb", 0);
	wr64(DATA_POOL_BASE + 70 * SZ_4K, 0x56414C4944ull);
	report(s == VMI_ERR_OK && entry_get(pt, 70) == v && rd64(WORK_BASE + 70 * SZ_4K) == 0x56414C4944ull &&
		       mmu_bad_calls == setup_bad,
	       "valid update after rejections");
	report_summary();
	vmi_shutdown(0);
}
