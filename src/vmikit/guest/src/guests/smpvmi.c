/*
 * smpvmi: the VMI interface on several CPUs (VMI 1.5, docs/smp.md).
 *
 * Needs a ROM with CPU.SetInitialAPState and at least two vCPUs (vmikit run smpvmi --cpus 2
 * --privilege ring0 --paging direct); otherwise it says so on a SKIP line and exits 0.
 *
 *  1. Every AP starts through SetInitialAPState, makes its VMI layer's per-CPU call and reports
 *     its own index through GetCPUInfo; starting one twice is refused.
 *  2. Private queues: CPU 0 and CPU 1 queue SetPTE|queue updates into their own page table at
 *     the same time (released together by a barrier); CPU 1's batch holds one bad entry. Each
 *     flush completes only its own CPU's buffer: CPU 0's applies fully, CPU 1's applies nothing
 *     and names the bad entry's index.
 *  3. Shootdown: CPU 1 keeps reading a page that CPU 0 unmaps with a queued SetPTE. While the
 *     update is queued CPU 1 still reads the old frame; once CPU 0's FlushTLBMulti with CPU 1 in
 *     the set returns, CPU 1's next read faults.
 *
 * With bench=N on the command line it measures shootdowns instead (see bench() below).
 *
 * Steps 2 and 3's queue checks need a hypervisor that honours `queue` (and step 2 one that
 * validates entries: direct or shadow paging); elsewhere they say so (SKIP/INFO lines).
 * PASS lines name no counts or addresses. INFO lines carry the figures the host test checks.
 */
#include "lib.h"
#include "paging.h"
#include "vmi.h"

#define MAX_CPUS     8
#define STACK_SIZE   16384
#define QUEUED       100            /* per CPU in step 2: fewer than the SMP ROM's buffer holds */
#define BAD_INDEX    50             /* CPU 1's bad entry */
#define NOT_RAM      0xF0000000ull  /* a frame no RAM backs: SetPTE says BAD_ADDRESS */
#define TEST_VA      0x10000000000ull /* 1 TiB: PML4 slot 2, unmapped at boot */
#define TAG          0x534D505441470001ull
#define SPIN_LIMIT   200000000ull   /* a bounded wait: a CPU that never answers is a FAIL, not a hang */

static uint8_t stacks[MAX_CPUS][STACK_SIZE] __attribute__((aligned(16)));
static volatile uint32_t online[MAX_CPUS], reported_id[MAX_CPUS];
static volatile uint32_t command[MAX_CPUS]; /* what the AP does next; it zeroes it when done */
static volatile long status_of[MAX_CPUS];
static volatile uint64_t result_of[MAX_CPUS];
static volatile uint32_t go;               /* step 2's barrier */
static uint64_t table_of[MAX_CPUS];        /* step 2: each CPU's own page table */
static uint64_t frame_base;

/* Step 3's shared state. */
static uint64_t pt_test;                   /* the PT that maps TEST_VA */
static volatile uint32_t reading, after_flush, faulted;
static volatile uint64_t reads, stale_reads;

enum { CMD_NONE, CMD_QUEUE, CMD_READ, CMD_FLUSH };

static int wait_for(volatile uint32_t *flag, uint32_t value)
{
	for (uint64_t i = 0; i < SPIN_LIMIT; i++) {
		if (*flag == value)
			return 1;
		__asm__ __volatile__("pause" ::: "memory");
	}
	return 0;
}

static uint64_t data_frame(unsigned cpu, unsigned i) { return frame_base + ((uint64_t)cpu * QUEUED + i) * PAGE_SIZE; }

static void queue_updates(unsigned cpu)
{
	uint64_t *pt = (uint64_t *)(uintptr_t)table_of[cpu];
	long st = VMI_ERR_OK;

	while (!go)
		__asm__ __volatile__("pause" ::: "memory");
	for (unsigned i = 0; i < QUEUED && st == VMI_ERR_OK; i++) {
		uint64_t frame = cpu == 1 && i == BAD_INDEX ? NOT_RAM : data_frame(cpu, i);
		st = vmi_set_pte_queued(&pt[i], frame | LEAF_RW);
	}
	uint64_t r[4] = { 0 };
	status_of[cpu] = st != VMI_ERR_OK ? st : vmi_raw_call(VMI_CALL_MMU_FLUSHQUEUE, 0, 0, 0, r);
	result_of[cpu] = r[0];
}

/* Step 3, CPU 1: read TEST_VA until CPU 0 says its shootdown returned, then once more. The read
 * is one instruction with a known end, so the #PF hook can resume after it. */
static __attribute__((noinline)) uint64_t read_test_va(void)
{
	uint64_t v = 0;
	__asm__ __volatile__("1: movq (%1), %0\n2:\n"
			     ".pushsection .data\n.globl smpvmi_read_at, smpvmi_read_end\n"
			     "smpvmi_read_at: .quad 1b\nsmpvmi_read_end: .quad 2b\n.popsection"
			     : "=r"(v) : "r"(TEST_VA) : "memory");
	return v;
}
extern uint64_t smpvmi_read_at, smpvmi_read_end;

static int pf_hook(struct trap_regs *r)
{
	if (r->rip != smpvmi_read_at)
		return 0;
	faulted = 1;
	r->rax = 0;
	r->rip = smpvmi_read_end;
	return 1;
}

static void reader(void)
{
	reading = 1;
	while (!after_flush && !faulted) {
		if (read_test_va() == TAG)
			reads++;
		else if (!faulted)
			stale_reads++;
	}
	if (!faulted)
		read_test_va();
}

static void ap_main(uint64_t cpu)
{
	uint32_t me = 0, n = 0;
	long st = vmi_cpu_init();

	if (st == VMI_ERR_OK)
		st = vmi_cpu_info(&me, &n);
	status_of[cpu] = st;
	reported_id[cpu] = me;
	online[cpu] = 1;
	for (;;) {
		uint32_t c = command[cpu];
		if (c == CMD_QUEUE)
			queue_updates((unsigned)cpu);
		else if (c == CMD_READ)
			reader();
		else if (c == CMD_FLUSH)
			vmi_flush_tlb(VMI_FLUSH_TLB);
		if (c != CMD_NONE)
			command[cpu] = CMD_NONE;
		__asm__ __volatile__("pause" ::: "memory");
	}
}

static unsigned start_cpus(uint32_t cpus)
{
	unsigned up = 1;
	for (uint32_t c = 1; c < cpus && c < MAX_CPUS; c++) {
		uint64_t top = (uint64_t)(uintptr_t)(stacks[c] + STACK_SIZE) - 8; /* as after a call */
		long st = vmi_start_ap(c, (uint64_t)(uintptr_t)ap_main, top, c);
		if (st != VMI_ERR_OK)
			printf("  start_ap(%u): status %ld\n", c, st);
		else if (wait_for(&online[c], 1))
			up++;
	}
	return up;
}

/* Whether the hypervisor queues (honours `queue`) and validates entries (direct, shadow): step 2's
 * checks need both; elsewhere the batch is applied entry by entry and nothing is refused. */
static int queues_and_validates(void)
{
	uint64_t info = 0;
	uint64_t *scratch = alloc_pt_page();

	if (vmi_query_call(VMI_CALL_MMU_SETPTE, &info) != VMI_ERR_OK || !(info & VMI_ANN_QUEUE) || !scratch)
		return 0;
	vmi_allocate_page((uint64_t)(uintptr_t)scratch, VMI_LEVEL_PT);
	return vmi_set_pte(scratch, NOT_RAM | LEAF_RW) == VMI_ERR_BAD_ADDRESS;
}

static void step_queues(void)
{
	if (!queues_and_validates()) {
		printf("SKIP: private queues: this hypervisor does not queue and validate SetPTE\n");
		return;
	}
	frame_base = DATA_POOL_BASE;
	for (unsigned c = 0; c < 2; c++) {
		table_of[c] = (uint64_t)(uintptr_t)alloc_pt_page();
		vmi_allocate_page(table_of[c], VMI_LEVEL_PT);
	}
	command[1] = CMD_QUEUE;
	go = 1;
	queue_updates(0);
	int answered = wait_for(&command[1], CMD_NONE);
	const uint64_t *p0 = (const uint64_t *)(uintptr_t)table_of[0], *p1 = (const uint64_t *)(uintptr_t)table_of[1];
	unsigned set0 = 0, set1 = 0;
	for (unsigned i = 0; i < 512; i++) {
		set0 += p0[i] != 0 && i < QUEUED && (p0[i] & ~0xFFFull) == data_frame(0, i);
		set1 += p1[i] != 0;
	}
	printf("INFO: CPU 0 flush status %ld, %u entries applied; CPU 1 flush status %ld (index %lu), %u applied\n",
	       status_of[0], set0, status_of[1], (unsigned long)result_of[1], set1);
	report(answered && status_of[0] == VMI_ERR_OK && set0 == QUEUED,
	       "two CPUs queue at once: CPU 0's flush applies all of its own entries and none of CPU 1's");
	report(answered && status_of[1] == VMI_ERR_BATCH_INVALID && result_of[1] == BAD_INDEX && set1 == 0,
	       "CPU 1's batch with one bad entry applies nothing and names that entry");
}

static void step_shootdown(void)
{
	uint64_t *pml4 = (uint64_t *)(uintptr_t)(vmi_get_cr3() & ~0xFFFull);
	uint64_t pdpt = (uint64_t)(uintptr_t)alloc_pt_page(), pd = (uint64_t)(uintptr_t)alloc_pt_page();
	uint64_t frame = DATA_POOL_BASE + 2 * QUEUED * PAGE_SIZE;
	uint32_t flushed = 0;

	uint64_t info = 0;
	int queued = vmi_query_call(VMI_CALL_MMU_SETPTE, &info) == VMI_ERR_OK && (info & VMI_ANN_QUEUE);

	pt_test = (uint64_t)(uintptr_t)alloc_pt_page();
	vmi_allocate_page(pdpt, VMI_LEVEL_PDPT);
	vmi_allocate_page(pd, VMI_LEVEL_PD);
	vmi_allocate_page(pt_test, VMI_LEVEL_PT);
	vmi_set_pte((uint64_t *)(uintptr_t)pdpt, pd | NONLEAF);
	vmi_set_pte((uint64_t *)(uintptr_t)pd, pt_test | NONLEAF);
	vmi_set_pte((uint64_t *)(uintptr_t)pt_test, frame | LEAF_RW);
	*(volatile uint64_t *)(uintptr_t)frame = TAG;
	/* The boot tables are the guest's own (no hypervisor checks them): link the new tree natively. */
	pml4[(TEST_VA >> 39) & 511] = pdpt | NONLEAF;
	vmi_flush_tlb(VMI_FLUSH_TLB);

	set_trap_hook(14, pf_hook);
	command[1] = CMD_READ;
	int started = wait_for(&reading, 1);
	vmi_set_pte_queued((uint64_t *)(uintptr_t)pt_test, 0);
	uint64_t before = reads;
	while (started && reads < before + 1000 && !faulted)
		__asm__ __volatile__("pause" ::: "memory");
	int still = started && !faulted && stale_reads == 0;
	long st = vmi_flush_tlb_multi(VMI_FLUSH_TLB, 1u << 0 | 1u << 1, &flushed);
	after_flush = 1;
	int done = wait_for(&command[1], CMD_NONE);
	printf("INFO: shootdown status %ld, %u CPUs flushed; CPU 1 read the page %lu times, then %s\n",
	       st, flushed, (unsigned long)reads, faulted ? "faulted" : "read it again");
	if (queued)
		report(still, "while CPU 0's unmap is queued, CPU 1 still reads the old frame");
	else
		printf("INFO: the unmap was not queued (the hypervisor does not honour `queue`)\n");
	report(st == VMI_ERR_OK && flushed == 2 && done && faulted,
	       "after CPU 0's FlushTLBMulti with CPU 1 in the set returns, CPU 1 can no longer read the page");
	set_trap_hook(14, NULL);
}

static inline uint64_t tsc(void)
{
	uint32_t lo, hi;
	__asm__ __volatile__("rdtsc" : "=a"(lo), "=d"(hi));
	return (uint64_t)hi << 32 | lo;
}

/* bench=N: the cost of flushing the TLB of CPUs 0..n-1 (n = 1, 2, 4, ... up to the machine's),
 * N samples each, printed one per line for the host (vmikit bench, bench/shootdown.py):
 *  vmi:     one MMU.FlushTLBMulti for the whole set (one exit);
 *  percpu:  each target flushes itself with MMU.FlushTLB when CPU 0 asks through its mailbox,
 *           CPU 0 waits for every acknowledgement (one exit per CPU, unbatched). */
static void bench(unsigned samples, unsigned cpus)
{
	for (unsigned n = 1; n <= cpus; n *= 2) {
		uint64_t mask = (1ull << n) - 1;
		for (unsigned i = 0; i < samples; i++) {
			uint64_t t0 = tsc();
			long st = vmi_flush_tlb_multi(VMI_FLUSH_TLB, mask, NULL);
			uint64_t t1 = tsc();
			for (unsigned c = 1; c < n; c++)
				command[c] = CMD_FLUSH;
			vmi_flush_tlb(VMI_FLUSH_TLB);
			int acked = 1;
			for (unsigned c = 1; c < n; c++)
				acked &= wait_for(&command[c], CMD_NONE);
			uint64_t t2 = tsc();
			if (st != VMI_ERR_OK || !acked) {
				report(0, "shootdown bench on %u CPUs (status %ld)", n, st);
				return;
			}
			printf("BENCH shootdown cpus=%u vmi_cycles=%lu percpu_cycles=%lu\n", n,
			       (unsigned long)(t1 - t0), (unsigned long)(t2 - t1));
		}
	}
}

void kmain(uint32_t magic, uint32_t mbinfo)
{
	uint32_t me = 0, cpus = 0;

	(void)magic;
	(void)mbinfo;
	printf("vmikit smpvmi guest\n");
	if (!vmi_rom_present() || vmi_cpu_info(&me, &cpus) != VMI_ERR_OK || cpus < 2) {
		printf("SKIP: needs a VMI 1.5 ROM and at least two vCPUs\n");
		exit(report_summary());
	}
	unsigned up = start_cpus(cpus);
	unsigned samples = (unsigned)cmdline_u64("bench", 0);
	if (samples) {
		bench(samples > 10000 ? 10000 : samples, up);
		exit(report_summary());
	}
	printf("INFO: %u of %u CPUs online\n", up, cpus);
	report(me == 0 && up == cpus, "every CPU started through SetInitialAPState");
	int ids = 1;
	for (uint32_t c = 1; c < cpus && c < MAX_CPUS; c++)
		ids &= status_of[c] == VMI_ERR_OK && reported_id[c] == c;
	report(ids, "each AP made its per-CPU VMI call and GetCPUInfo names it");
	report(vmi_start_ap(1, (uint64_t)(uintptr_t)ap_main, (uint64_t)(uintptr_t)stacks[1], 1) == VMI_ERR_INVALID_ARGUMENT,
	       "starting a CPU twice is refused");
	step_queues();
	step_shootdown();
	exit(report_summary());
}
