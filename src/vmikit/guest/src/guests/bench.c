/*
 * bench: the workloads of `vmikit bench` (docs/bench.md), one guest for all.
 *
 * Selected and sized by the multiboot command line:
 *
 *   workload=null,map,...   workloads to run, in order (default: all)
 *   reps=R                  repetitions of each (default 5)
 *   calls=C                 iterations of null / rdtsc-* / cpuid-* (default 1000)
 *   n=N                     pages of map / setpte / unmap / mprotect / fork / demand (default 1024)
 *   m=M                     address-space switches of switch (default 1000)
 *
 * Every repetition is timed by the guest itself with the TSC, between two
 * markers written to PORT_BENCH (outl(tag), outl(tag | END)) so that the VMM can
 * count the exits and calls of exactly that section, and reported on the
 * console as one line:
 *
 *   BENCH <workload> ops=<operations> cycles=<TSC cycles>
 *
 * Nothing is printed inside a timed section (each console byte is an exit).
 * The MMU workloads run in an address space built here by the rules of
 * docs/paging.md (pool tables registered before use, top-down so trap paging
 * can infer levels, A/D preset), with a work region at WORK_BASE whose page
 * tables exist but are empty between workloads.  Data frames are reused (64 of
 * them) so that first touches of guest memory stay out of the timings.
 *
 * After each repetition (untimed) the guest checks what the workload left: every
 * mapped page reads its own frame with the flags asked for, and demand paging took
 * exactly one fault per page (so the unmap before it was seen).
 *
 * The same binary runs with a full ROM, without one (native and trap paging)
 * and on a bare machine, where the markers go to an undecoded port.  Under a ROM
 * the kernel may be deprivileged (docs/execution-model.md): nothing here then
 * runs a privileged instruction -- the address spaces map the hypervisor's
 * monitor area (mmu_common.h's kernel map), the #PF gate goes into the IDT
 * vmi_get_idt() names (the guest's own; sidt would name the hypervisor's), and
 * the handler reads CR2 from the shared page (trap_cr2()).  rdtsc, cpuid and
 * lfence are allowed at ring 3.
 */
#include "mmu_common.h"

#define MARK_END    0x80000000u

#define NFRAMES       64            /* data frames, reused round-robin */
#define MAX_PAGES     (64 * 512)    /* n at most: 64 page tables */
#define MAX_PT        (MAX_PAGES / 512)

enum {
	W_NULL, W_RDTSC_VMI, W_RDTSC_NATIVE, W_CPUID_VMI, W_CPUID_NATIVE,
	W_SETPTE, W_MAP, W_UNMAP, W_MPROTECT, W_FORK, W_SWITCH, W_DEMAND, W_SPIN, W_COUNT
};

static const char *const names[W_COUNT] = {
	"null", "rdtsc-vmi", "rdtsc-native", "cpuid-vmi", "cpuid-native",
	"setpte", "map", "unmap", "mprotect", "fork", "switch", "demand", "spin",
};

static unsigned bad_calls;

static void check(long status, const char *what)
{
	if (status != VMI_ERR_OK) {
		if (bad_calls < 4)
			printf("BENCH error %s status=%ld\n", what, status);
		bad_calls++;
	}
}

static inline uint64_t tsc(void)
{
	uint32_t lo, hi;
	__asm__ __volatile__("lfence; rdtsc; lfence" : "=a"(lo), "=d"(hi) : : "memory");
	return ((uint64_t)hi << 32) | lo;
}

/* --- the command line -------------------------------------------------------- */

/* --- page tables ------------------------------------------------------------- */

static inline uint64_t *slot(uint64_t table, unsigned index)
{
	return entry_ptr(table, index);
}

static inline void put_q(uint64_t table, unsigned index, uint64_t value)
{
	check(vmi_set_pte_queued(slot(table, index), value), "set_pte_queued");
}

static uint64_t bench_table(uint32_t level)
{
	uint64_t t = new_table(level);
	if (!t) {
		printf("BENCH error page-table pool exhausted\n");
		exit(EXIT_FAILED_TESTS);
	}
	return t;
}

static uint64_t space_a, space_b;  /* the bench address spaces (b shares everything with a) */
static uint64_t kpdpt, work_pdpt, work_pd;
static uint64_t work_pt[MAX_PT];
static unsigned npages, npt;

/* Space A: mmu_common.h's kernel map (whole 2 MiB pages of RAM; with a ROM its image and
 * data area; deprivileged, the hypervisor's monitor area), then the work region's tables
 * for `pages` pages, empty.  Top-down (trap paging learns levels from links). */
static void build_space(unsigned pages)
{
	space_a = build_kernel_space(ram_end_below_4g() & ~(SZ_2M - 1), &kpdpt);
	if (!space_a || !kpdpt) {
		printf("BENCH error page-table pool exhausted\n");
		exit(EXIT_FAILED_TESTS);
	}
	work_pdpt = bench_table(VMI_LEVEL_PDPT);
	put_q(space_a, 2, work_pdpt | NONLEAF);
	work_pd = bench_table(VMI_LEVEL_PD);
	put_q(work_pdpt, 0, work_pd | NONLEAF);
	npages = pages;
	npt = (pages + 511) / 512;
	for (unsigned j = 0; j < npt; j++) {
		work_pt[j] = bench_table(VMI_LEVEL_PT);
		put_q(work_pd, j, work_pt[j] | NONLEAF);
	}
	check(vmi_flush_queue(), "flush_queue");
	check(vmi_set_cr3(space_a), "set_cr3");
	/* Touch the data frames once, so no timed section pays a first touch. */
	for (unsigned f = 0; f < NFRAMES; f++)
		*(volatile uint64_t *)(uintptr_t)(DATA_POOL_BASE + f * SZ_4K) = f;
}

static inline uint64_t frame(unsigned i) { return DATA_POOL_BASE + (uint64_t)(i % NFRAMES) * SZ_4K; }
static inline uint64_t *work_slot(unsigned i) { return slot(work_pt[i / 512], i % 512); }

static void map_all(uint64_t flags)
{
	for (unsigned i = 0; i < npages; i++)
		check(vmi_set_pte_queued(work_slot(i), frame(i) | flags), "set_pte_queued");
	check(vmi_flush_queue(), "flush_queue");
}

static void unmap_all(void)
{
	for (unsigned i = 0; i < npages; i++)
		check(vmi_set_pte_queued(work_slot(i), 0), "set_pte_queued");
	check(vmi_flush_queue(), "flush_queue");
	check(vmi_flush_tlb(VMI_FLUSH_TLB), "flush_tlb");
}

/* Fork: a new space sharing the kernel PDPT whose work region maps the parent's
 * pages read-only, and the parent's pages made read-only too (copy-on-write). */
static void fork_space(void)
{
	uint64_t pml4 = bench_table(VMI_LEVEL_PML4);
	put_q(pml4, 0, kpdpt | NONLEAF);
	uint64_t pdpt = bench_table(VMI_LEVEL_PDPT);
	put_q(pml4, 2, pdpt | NONLEAF);
	uint64_t pd = bench_table(VMI_LEVEL_PD);
	put_q(pdpt, 0, pd | NONLEAF);
	for (unsigned j = 0; j < npt; j++) {
		uint64_t pt = bench_table(VMI_LEVEL_PT);
		put_q(pd, j, pt | NONLEAF);
		unsigned count = npages - j * 512 < 512 ? npages - j * 512 : 512;
		for (unsigned k = 0; k < count; k++) {
			uint64_t e = entry_get(work_pt[j], k);
			if (!(e & PTE_P))
				continue;
			put_q(pt, k, e & ~PTE_RW);
			if (e & PTE_RW)
				put_q(work_pt[j], k, e & ~PTE_RW);
		}
	}
	check(vmi_flush_tlb(VMI_FLUSH_TLB), "flush_tlb"); /* completes the queue first */
}

/* --- demand paging: our own #PF gate ---------------------------------------- */

extern char pf_stub[];
void pf_handler(uint64_t error_code);
static uint64_t demand_faults;

__asm__(
	".text\n"
	".globl pf_stub\n"
	"pf_stub:\n"
	"	pushq %rax\n	pushq %rcx\n	pushq %rdx\n	pushq %rsi\n	pushq %rdi\n"
	"	pushq %r8\n	pushq %r9\n	pushq %r10\n	pushq %r11\n"
	"	movq 72(%rsp), %rdi\n"       /* the error code */
	"	subq $8, %rsp\n"             /* CPU frame + code + 9 pushes = 16n + 8 */
	"	cld\n"
	"	call pf_handler\n"
	"	addq $8, %rsp\n"
	"	popq %r11\n	popq %r10\n	popq %r9\n	popq %r8\n"
	"	popq %rdi\n	popq %rsi\n	popq %rdx\n	popq %rcx\n	popq %rax\n"
	"	addq $8, %rsp\n"             /* drop the error code */
	"	iretq\n");

void pf_handler(uint64_t error_code)
{
	/* Deprivileged, CR2 is the shared page's (no exit, no privileged instruction); at ring 0
	 * (and natively) the register itself, so the ring-0 profiles pay no GetCR2 exit. */
	uint64_t va = vmi_deprivileged() ? trap_cr2() : read_cr2();
	if (va < WORK_BASE || va >= WORK_BASE + (uint64_t)npages * SZ_4K || (error_code & 1)) {
		printf("BENCH error unexpected #PF at 0x%lx code 0x%lx\n", (unsigned long)va, (unsigned long)error_code);
		exit(EXIT_FAILED_TESTS);
	}
	unsigned i = (unsigned)((va - WORK_BASE) / SZ_4K);
	check(vmi_set_pte_queued(work_slot(i), frame(i) | LEAF_RW), "set_pte_queued");
	check(vmi_flush_queue(), "flush_queue");
	demand_faults++;
}

/* Our own gate in the kernel's IDT: the runtime's, found through VMI (deprivileged, sidt would
 * name the hypervisor's table; the guest's own is virtual state the hypervisor delivers from). */
static void install_pf_gate(void)
{
	uint64_t base = 0;
	uint32_t limit = 0;
	if (vmi_get_idt(&base, &limit) != VMI_ERR_OK || limit < 15 * 16 - 1 || !base) {
		printf("BENCH error no IDT to install the #PF gate in\n");
		exit(EXIT_FAILED_TESTS);
	}
	uint8_t *gate = (uint8_t *)(uintptr_t)(base + 14 * 16);
	uint64_t addr = (uintptr_t)pf_stub;
	gate[0] = (uint8_t)addr;
	gate[1] = (uint8_t)(addr >> 8);
	gate[6] = (uint8_t)(addr >> 16);
	gate[7] = (uint8_t)(addr >> 24);
	*(uint32_t *)(gate + 8) = (uint32_t)(addr >> 32);
	/* selector (0x08) and type (0x8E interrupt gate) are the runtime's already */
}

/* --- the workloads ------------------------------------------------------------ */

static uint64_t sink;

/* One timed repetition of workload w; returns its operation count. */
static uint64_t run_one(unsigned w, uint32_t tag, unsigned calls, unsigned switches, uint64_t *cycles)
{
	uint64_t t0 = 0, t1 = 0, ops = 0, acc = 0;
	uint32_t out[4];
	uint32_t version;

	/* untimed preparation */
	if (w == W_UNMAP || w == W_MPROTECT || w == W_FORK)
		map_all(LEAF_RW);

/* The markers bracket exactly the timed section. */
#define TIMED(body)                                                          \
	do {                                                                 \
		outl(tag, PORT_BENCH);                                       \
		t0 = tsc();                                                  \
		body;                                                        \
		t1 = tsc();                                                  \
		outl(tag | MARK_END, PORT_BENCH);                            \
	} while (0)
	switch (w) {
	case W_NULL:
		TIMED(for (unsigned i = 0; i < calls; i++) acc += (uint64_t)vmi_get_version(&version));
		ops = calls;
		break;
	case W_RDTSC_VMI:
		TIMED(for (unsigned i = 0; i < calls; i++) acc += vmi_rdtsc());
		ops = calls;
		break;
	case W_RDTSC_NATIVE:
		TIMED(for (unsigned i = 0; i < calls; i++) acc += rdtsc());
		ops = calls;
		break;
	case W_CPUID_VMI:
		TIMED(for (unsigned i = 0; i < calls; i++) { vmi_cpuid(0, 0, out); acc += out[0]; });
		ops = calls;
		break;
	case W_CPUID_NATIVE:
		TIMED(for (unsigned i = 0; i < calls; i++) acc += cpuid(0, 0).eax);
		ops = calls;
		break;
	case W_SPIN: /* calibration: an empty loop */
		TIMED(for (unsigned i = 0; i < calls; i++) __asm__ __volatile__("" : "+r"(acc)));
		ops = calls;
		break;
	case W_SETPTE:
		TIMED(for (unsigned i = 0; i < npages; i++)
			      check(vmi_set_pte(work_slot(i), frame(i) | LEAF_RW), "set_pte"));
		ops = npages;
		break;
	case W_MAP:
		TIMED(map_all(LEAF_RW));
		ops = npages;
		break;
	case W_UNMAP:
		TIMED(for (unsigned i = 0; i < npages; i++)
			      check(vmi_set_pte_queued(work_slot(i), 0), "set_pte_queued");
		      check(vmi_flush_queue(), "flush_queue");
		      check(vmi_flush_tlb(VMI_FLUSH_TLB), "flush_tlb"));
		ops = npages;
		break;
	case W_MPROTECT:
		TIMED(for (unsigned i = 0; i < npages; i++)
			      check(vmi_set_pte_queued(work_slot(i), frame(i) | LEAF_RO), "set_pte_queued");
		      check(vmi_flush_queue(), "flush_queue");
		      check(vmi_flush_tlb(VMI_FLUSH_TLB), "flush_tlb"));
		ops = npages;
		break;
	case W_FORK:
		TIMED(fork_space());
		ops = npages;
		break;
	case W_SWITCH:
		TIMED(for (unsigned i = 0; i < switches; i++) check(vmi_set_cr3((i & 1) ? space_a : space_b), "set_cr3");
		      if (switches & 1) check(vmi_set_cr3(space_a), "set_cr3"));
		ops = switches;
		break;
	case W_DEMAND:
		demand_faults = 0;
		TIMED(for (unsigned i = 0; i < npages; i++)
			      acc += *(volatile uint64_t *)(uintptr_t)(WORK_BASE + (uint64_t)i * SZ_4K));
		if (demand_faults != npages)
			check(VMI_ERR_INVALID_ARGUMENT, "demand fault count");
		ops = npages;
		break;
	}
#undef TIMED
	sink += acc;
	*cycles = t1 - t0;
	return ops;
}

/* Untimed: what the workload left behind is what it was meant to leave (under every profile
 * and privilege). Each mapped work page must read its own frame's tag (the frame number written
 * by build_space) with the flags asked for; fork's parent entries must be read-only. Unmap's
 * effect is checked by the next demand workload (every page must fault again). */
static void verify(unsigned w)
{
	uint64_t want_flags = w == W_MPROTECT || w == W_FORK ? LEAF_RO : LEAF_RW;
	unsigned bad_value = 0, bad_entry = 0;
	if (!(w == W_SETPTE || w == W_MAP || w == W_MPROTECT || w == W_FORK || w == W_DEMAND))
		return;
	for (unsigned i = 0; i < npages; i++) {
		if (entry_get(work_pt[i / 512], i % 512) != (frame(i) | want_flags))
			bad_entry++;
		if (*(volatile uint64_t *)(uintptr_t)(WORK_BASE + (uint64_t)i * SZ_4K) != i % NFRAMES)
			bad_value++;
	}
	if (bad_entry || bad_value) {
		printf("BENCH error %s left %u wrong entries and %u pages that read wrong\n", names[w], bad_entry,
		       bad_value);
		bad_calls++;
	}
}

static void after_one(unsigned w)
{
	verify(w);
	if (w == W_SETPTE || w == W_MAP || w == W_UNMAP || w == W_MPROTECT || w == W_FORK || w == W_DEMAND)
		unmap_all();
}

static int is_mmu(unsigned w) { return w >= W_SETPTE && w != W_SPIN; }

void kmain(uint32_t magic, uint32_t mbinfo)
{
	(void)magic;
	(void)mbinfo;
	unsigned selected[W_COUNT * 2];
	unsigned nsel = 0, need_space = 0;
	unsigned reps = (unsigned)cmdline_u64("reps", 5);
	unsigned calls = (unsigned)cmdline_u64("calls", 1000);
	unsigned switches = (unsigned)cmdline_u64("m", 1000);
	unsigned pages = (unsigned)cmdline_u64("n", 1024);
	const char *v, *end;

	if (pages < 1 || pages > MAX_PAGES) {
		printf("BENCH error n=%u is out of range 1..%u\n", pages, (unsigned)MAX_PAGES);
		exit(EXIT_FAILED_TESTS);
	}
	if (cmdline_find("workload", &v, &end)) {
		while (v < end && nsel < ARRAY_SIZE(selected)) {
			const char *comma = v;
			while (comma < end && *comma != ',')
				comma++;
			unsigned w;
			for (w = 0; w < W_COUNT; w++)
				if (strlen(names[w]) == (size_t)(comma - v) && memcmp(names[w], v, (size_t)(comma - v)) == 0)
					break;
			if (w == W_COUNT) {
				printf("BENCH error unknown workload\n");
				exit(EXIT_FAILED_TESTS);
			}
			selected[nsel++] = w;
			v = comma + 1;
		}
	} else {
		for (unsigned w = 0; w < W_COUNT; w++)
			selected[nsel++] = w;
	}
	for (unsigned k = 0; k < nsel; k++)
		need_space |= is_mmu(selected[k]);

	if (need_space) {
		build_space(pages);
		space_b = bench_table(VMI_LEVEL_PML4);
		put_q(space_b, 0, kpdpt | NONLEAF);
		put_q(space_b, 2, work_pdpt | NONLEAF);
		check(vmi_flush_queue(), "flush_queue");
		install_pf_gate();
	}

	for (unsigned k = 0; k < nsel; k++) {
		unsigned w = selected[k];
		for (unsigned r = 0; r < reps; r++) {
			uint64_t cycles;
			uint32_t tag = (w << 16) | (r & 0xFFFF);
			uint64_t ops = run_one(w, tag, calls, switches, &cycles);
			printf("BENCH %s ops=%lu cycles=%lu\n", names[w], (unsigned long)ops, (unsigned long)cycles);
			after_one(w);
		}
	}
	if (bad_calls || mmu_bad_calls) {
		printf("BENCH failed calls=%u\n", bad_calls + mmu_bad_calls);
		exit(EXIT_FAILED_TESTS);
	}
	exit(EXIT_OK);
}
