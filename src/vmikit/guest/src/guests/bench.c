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
 * The same binary runs with a full ROM, without one (native and trap paging)
 * and on a bare machine, where the markers go to an undecoded port.
 */
#include "lib.h"
#include "vmi.h"

#define MARK_END    0x80000000u

#include "paging.h"

#define WORK_BASE     0x0000010000000000ull /* PML4 index 2 */
#define LOW_END       0x9F000ull
#define ROM_IMG_BASE  0xC0000ull
#define ROM_IMG_END   0xC8000ull
#define ROM_DAT_BASE  0xD0000ull
#define ROM_DAT_END   0xE0000ull
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
	return (uint64_t *)(uintptr_t)(table + 8ull * index);
}

static inline uint64_t get(uint64_t table, unsigned index)
{
	return *(volatile uint64_t *)slot(table, index);
}

static inline void put_q(uint64_t table, unsigned index, uint64_t value)
{
	check(vmi_set_pte_queued(slot(table, index), value), "set_pte_queued");
}

static uint64_t new_table(uint32_t level)
{
	uint64_t t = (uintptr_t)alloc_pt_page();
	if (!t) {
		printf("BENCH error page-table pool exhausted\n");
		exit(EXIT_FAILED_TESTS);
	}
	check(vmi_allocate_page(t, level), "allocate_page");
	return t;
}

/* Whole 2 MiB pages only (QEMU keeps a tail for itself). */
static uint64_t ram_end(void)
{
	return ram_end_below_4g() & ~(SZ_2M - 1);
}

static uint64_t space_a, space_b;  /* the bench address spaces (b shares everything with a) */
static uint64_t kpdpt, work_pdpt, work_pd;
static uint64_t work_pt[MAX_PT];
static unsigned npages, npt;

/* Build space A top-down (trap paging learns levels from links): the kernel map,
 * then the work region's tables for `pages` pages, empty. */
static void build_space(unsigned pages)
{
	uint64_t end = ram_end();
	uint64_t pd[4] = { 0 };

	space_a = new_table(VMI_LEVEL_PML4);
	kpdpt = new_table(VMI_LEVEL_PDPT);
	put_q(space_a, 0, kpdpt | NONLEAF);
	for (unsigned g = 0; g < 4 && (uint64_t)g * SZ_1G < end; g++) {
		pd[g] = new_table(VMI_LEVEL_PD);
		put_q(kpdpt, g, pd[g] | NONLEAF);
	}
	uint64_t pt_low = new_table(VMI_LEVEL_PT);
	put_q(pd[0], 0, pt_low | NONLEAF);
	for (uint64_t a = 0; a < SZ_2M; a += SZ_4K) {
		uint64_t flags = 0;
		if (a < LOW_END || a >= 0x100000ull)
			flags = LEAF_RW;
		else if (vmi_rom_present() && a >= ROM_IMG_BASE && a < ROM_IMG_END)
			flags = LEAF_RO;
		else if (vmi_rom_present() && a >= ROM_DAT_BASE && a < ROM_DAT_END)
			flags = LEAF_RW;
		if (flags)
			put_q(pt_low, (unsigned)(a / SZ_4K), a | flags);
	}
	for (uint64_t a = SZ_2M; a < end; a += SZ_2M) {
		int pool = a >= PT_POOL_BASE && a < PT_POOL_BASE + PT_POOL_SIZE;
		put_q(pd[a / SZ_1G], (unsigned)((a % SZ_1G) / SZ_2M), a | (pool ? LEAF_RO : LEAF_RW) | PTE_PS);
	}

	work_pdpt = new_table(VMI_LEVEL_PDPT);
	put_q(space_a, 2, work_pdpt | NONLEAF);
	work_pd = new_table(VMI_LEVEL_PD);
	put_q(work_pdpt, 0, work_pd | NONLEAF);
	npages = pages;
	npt = (pages + 511) / 512;
	for (unsigned j = 0; j < npt; j++) {
		work_pt[j] = new_table(VMI_LEVEL_PT);
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
	uint64_t pml4 = new_table(VMI_LEVEL_PML4);
	put_q(pml4, 0, kpdpt | NONLEAF);
	uint64_t pdpt = new_table(VMI_LEVEL_PDPT);
	put_q(pml4, 2, pdpt | NONLEAF);
	uint64_t pd = new_table(VMI_LEVEL_PD);
	put_q(pdpt, 0, pd | NONLEAF);
	for (unsigned j = 0; j < npt; j++) {
		uint64_t pt = new_table(VMI_LEVEL_PT);
		put_q(pd, j, pt | NONLEAF);
		unsigned count = npages - j * 512 < 512 ? npages - j * 512 : 512;
		for (unsigned k = 0; k < count; k++) {
			uint64_t e = get(work_pt[j], k);
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
	uint64_t va = read_cr2();
	if (va < WORK_BASE || va >= WORK_BASE + (uint64_t)npages * SZ_4K || (error_code & 1)) {
		printf("BENCH error unexpected #PF at 0x%lx code 0x%lx\n", (unsigned long)va, (unsigned long)error_code);
		exit(EXIT_FAILED_TESTS);
	}
	unsigned i = (unsigned)((va - WORK_BASE) / SZ_4K);
	check(vmi_set_pte_queued(work_slot(i), frame(i) | LEAF_RW), "set_pte_queued");
	check(vmi_flush_queue(), "flush_queue");
	demand_faults++;
}

static void install_pf_gate(void)
{
	struct descriptor_ptr idtr = sidt();
	uint8_t *gate = (uint8_t *)(uintptr_t)(idtr.base + 14 * 16);
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

static void after_one(unsigned w)
{
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
		space_b = new_table(VMI_LEVEL_PML4);
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
	if (bad_calls) {
		printf("BENCH failed calls=%u\n", bad_calls);
		exit(EXIT_FAILED_TESTS);
	}
	exit(EXIT_OK);
}
