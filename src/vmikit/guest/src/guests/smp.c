/*
 * smp: the guest runtime's SMP bring-up on a bare machine (docs/smp.md), at ring 0: --rom none,
 * QEMU with -smp N, or --privilege ring0 under a ROM. It checks that
 *   - every CPU the MADT lists came online (INIT, SIPI, SIPI through the LAPIC's ICR);
 *   - each CPU runs a function and sees its own number and APIC ID, its per-CPU data intact;
 *   - smp_run_all runs a function once on every CPU and returns when all are done;
 *   - a barrier holds every CPU until all have arrived, twice in a row;
 *   - a fixed IPI reaches every other CPU's handler;
 *   - a TLB shootdown: CPU 0 maps a page to frame X, CPU 1 reads it in a loop (so its TLB holds
 *     the translation), CPU 0 remaps it to frame Y and calls smp_flush_tlb_others; reads CPU 1
 *     makes after the acknowledgement see Y. Where the CPU caches translations, leaving the
 *     flush out (command line `noflush`) makes that check fail; an INFO line says whether CPU 1
 *     still read X before the flush, i.e. whether this machine caches the translation at all.
 * The PASS lines are the same for any number of CPUs above one; with one CPU the checks that
 * need two say so on one INFO line. Deprivileged under a ROM it refuses (exit 2).
 */
#include "apic.h"
#include "lib.h"
#include "paging.h"
#include "smp.h"
#include "vmi.h"

#define VEC_TEST_IPI 0xE0
#define PROBE_VA     0x0000018000000000ull /* PML4 slot 3: nothing else maps there */
#define TAG_X        0x5858585858585858ull
#define TAG_Y        0x5959595959595959ull

extern char pml4[]; /* boot.S: the tables every CPU runs on */

/* --- each CPU on its own ------------------------------------------------------------------ */

struct who {
	unsigned id, apic_id, canary_ok;
};

static void record_id(void *arg)
{
	struct who *w = arg;
	struct smp_cpu *c = smp_this_cpu();
	w->id = smp_cpu_id();
	w->apic_id = lapic_id();
	w->canary_ok = c->canary == 0x5AFEC0DEu && c->id == w->id;
}

static void check_each_cpu(unsigned n)
{
	int ok = 1;
	for (unsigned i = 0; i < n; i++) {
		struct who w = { ~0u, ~0u, 0 };
		int rc = smp_run_on(i, record_id, &w);
		if (rc || w.id != i || w.apic_id != smp_cpu(i)->apic_id || !w.canary_ok) {
			printf("INFO: CPU %u: run %d, saw id %u, APIC ID %u (MADT %u), per-CPU data %s\n", i, rc, w.id,
			       w.apic_id, smp_cpu(i)->apic_id, w.canary_ok ? "intact" : "wrong");
			ok = 0;
		}
	}
	report(ok, "each CPU ran a function and saw its own CPU number, APIC ID and per-CPU data");
}

static volatile unsigned run_count;
static volatile unsigned run_seen[SMP_MAX_CPUS];

static void count_run(void *arg)
{
	(void)arg;
	__atomic_add_fetch(&run_count, 1, __ATOMIC_RELAXED);
	__atomic_add_fetch(&run_seen[smp_cpu_id()], 1, __ATOMIC_RELAXED);
}

static void check_run_all(unsigned n)
{
	int rc = smp_run_all(count_run, NULL);
	int ok = rc == 0 && run_count == n;
	for (unsigned i = 0; i < n; i++)
		ok &= run_seen[i] == 1;
	report(ok, "smp_run_all ran the function once on every CPU and returned when all were done");
}

static struct smp_barrier bar;
static volatile unsigned marks[SMP_MAX_CPUS], seen_round1[SMP_MAX_CPUS], seen_round2[SMP_MAX_CPUS];
static volatile unsigned barrier_failures;

static unsigned count_marks(unsigned want)
{
	unsigned k = 0;
	for (unsigned i = 0; i < smp_cpus(); i++)
		k += marks[i] >= want;
	return k;
}

static void barrier_rounds(void *arg)
{
	(void)arg;
	unsigned me = smp_cpu_id();
	marks[me] = 1;
	barrier_failures += smp_barrier_wait(&bar) != 0;
	seen_round1[me] = count_marks(1);
	marks[me] = 2;
	barrier_failures += smp_barrier_wait(&bar) != 0;
	seen_round2[me] = count_marks(2);
}

static void check_barrier(unsigned n)
{
	smp_barrier_init(&bar, n);
	int rc = smp_run_all(barrier_rounds, NULL);
	int ok = rc == 0 && !barrier_failures;
	for (unsigned i = 0; i < n; i++)
		ok &= seen_round1[i] == n && seen_round2[i] == n;
	report(ok, "a barrier released no CPU before all had arrived, two rounds in a row");
}

/* --- IPIs ------------------------------------------------------------------------------------ */

static volatile unsigned ipi_hits[SMP_MAX_CPUS];

static int on_test_ipi(struct trap_regs *r)
{
	(void)r;
	__atomic_add_fetch(&ipi_hits[smp_cpu_id()], 1, __ATOMIC_RELAXED);
	return 1;
}

static void check_ipi(unsigned n)
{
	set_irq_hook(VEC_TEST_IPI, on_test_ipi);
	for (unsigned i = 1; i < n; i++)
		smp_send_ipi(i, VEC_TEST_IPI);
	uint64_t deadline = rdtsc() + 5000 * smp_tsc_per_ms();
	unsigned got = 0;
	while (rdtsc() < deadline) {
		got = 0;
		for (unsigned i = 1; i < n; i++)
			got += ipi_hits[i] == 1;
		if (got == n - 1)
			break;
		__asm__ __volatile__("pause");
	}
	report(got == n - 1 && ipi_hits[0] == 0, "a fixed IPI reached every other CPU's handler, once each");
}

/* --- TLB shootdown ----------------------------------------------------------------------------- */

static volatile uint64_t *probe_pte;
static volatile uint64_t reads, last_read;
static volatile int stop_reading;

static void reader(void *arg)
{
	(void)arg;
	uint64_t deadline = rdtsc() + 20000 * smp_tsc_per_ms(); /* never forever */
	while (!stop_reading && rdtsc() < deadline) {
		uint64_t v = *(volatile uint64_t *)(uintptr_t)PROBE_VA;
		last_read = v;
		__atomic_add_fetch(&reads, 1, __ATOMIC_RELEASE);
	}
}

/* Wait until the reader has made `more` reads since `from`; its latest value, or 0 on timeout. */
static uint64_t reads_after(uint64_t from, unsigned more)
{
	uint64_t deadline = rdtsc() + 5000 * smp_tsc_per_ms();
	while (__atomic_load_n(&reads, __ATOMIC_ACQUIRE) < from + more)
		if (rdtsc() >= deadline)
			return 0;
	return last_read;
}

static uint64_t table_page(void)
{
	return (uintptr_t)alloc_page(); /* zeroed; identity mapped */
}

static int map_probe(void)
{
	uint64_t pdpt = table_page(), pd = table_page(), pt = table_page();
	if (!pdpt || !pd || !pt)
		return 0;
	((volatile uint64_t *)(uintptr_t)pd)[0] = pt | NONLEAF;
	((volatile uint64_t *)(uintptr_t)pdpt)[0] = pd | NONLEAF;
	((volatile uint64_t *)pml4)[(PROBE_VA >> 39) & 0x1FF] = pdpt | NONLEAF;
	probe_pte = (volatile uint64_t *)(uintptr_t)pt;
	return 1;
}

static void check_shootdown(void)
{
	uint64_t *x = alloc_page(), *y = alloc_page();
	if (!x || !y || !map_probe()) {
		report(0, "TLB shootdown: memory for the frames and tables");
		return;
	}
	*x = TAG_X;
	*y = TAG_Y;
	*probe_pte = (uintptr_t)x | LEAF_RW;
	invlpg((const void *)(uintptr_t)PROBE_VA);
	if (smp_start_on(1, reader, NULL)) {
		report(0, "TLB shootdown: CPU 1 runs the reader");
		return;
	}
	/* Enough reads that CPU 1's TLB holds the translation to X. */
	uint64_t before = reads_after(0, 100);

	*probe_pte = (uintptr_t)y | LEAF_RW;
	invlpg((const void *)(uintptr_t)PROBE_VA); /* this CPU's own TLB */
	uint64_t r0 = __atomic_load_n(&reads, __ATOMIC_ACQUIRE);
	uint64_t stale = reads_after(r0, 100); /* no shootdown yet */
	if (stale == TAG_X)
		printf("INFO: without a shootdown CPU 1 still read the old frame: its TLB caches the translation\n");
	else
		printf("INFO: without a shootdown CPU 1 already read the new frame: this machine does not cache the "
		       "translation (the check below would pass without the flush here)\n");

	uint64_t left = 0;
	if (!cmdline_has("noflush"))
		left = smp_flush_tlb_others(1ull << 1, PROBE_VA);
	uint64_t r1 = __atomic_load_n(&reads, __ATOMIC_ACQUIRE);
	/* The read in flight when the IPI came may predate the flush; the one after it cannot. */
	uint64_t after = reads_after(r1, 2);
	stop_reading = 1;
	int joined = smp_wait_on(1) == 0;
	report(before == TAG_X && left == 0 && after == TAG_Y && joined,
	       "TLB shootdown: after smp_flush_tlb_others returns, CPU 1 reads the remapped page's new frame");

	/* The whole-TLB form: remap back to X, flush everything on every other CPU. */
	*probe_pte = (uintptr_t)x | LEAF_RW;
	invlpg((const void *)(uintptr_t)PROBE_VA);
	left = smp_flush_tlb_others(~0ull, SMP_FLUSH_ALL);
	report(left == 0, "TLB shootdown of the whole TLB: every other CPU acknowledged");
}

/* bench=N (vmikit bench, bench/shootdown.py): N shootdowns of the whole TLB of CPUs 0..n-1 for
 * n = 1, 2, 4, ...: IPIs to the others (each reloads CR3 in its handler and acknowledges), CPU 0
 * its own CR3 reload; one line per sample, in TSC cycles. */
static void bench(unsigned samples, unsigned n)
{
	for (unsigned k = 1; k <= n; k *= 2) {
		uint64_t others = ((1ull << k) - 1) & ~1ull;
		for (unsigned i = 0; i < samples; i++) {
			uint64_t t0 = rdtsc();
			uint64_t left = smp_flush_tlb_others(others, SMP_FLUSH_ALL);
			write_cr3(read_cr3());
			uint64_t t1 = rdtsc();
			if (left) {
				report(0, "shootdown bench on %u CPUs: CPUs %lx did not acknowledge", k, (unsigned long)left);
				return;
			}
			printf("BENCH shootdown cpus=%u ipi_cycles=%lu\n", k, (unsigned long)(t1 - t0));
		}
	}
}

void kmain(uint32_t magic, uint32_t mbinfo)
{
	(void)magic;
	(void)mbinfo;
	printf("vmikit smp guest\n");
	if (vmi_deprivileged()) {
		printf("SMP-SETUP failed: this guest starts CPUs through the local APIC itself; run it with --rom none "
		       "or --privilege ring0\n");
		exit(2);
	}
	unsigned n = smp_init(), listed = smp_cpus_listed();
	unsigned want = listed > SMP_MAX_CPUS ? SMP_MAX_CPUS : listed ? listed : 1;
	unsigned samples = (unsigned)cmdline_u64("bench", 0);
	if (samples) {
		bench(samples > 10000 ? 10000 : samples, n);
		exit(report_summary());
	}
	printf("INFO: %u CPUs listed in the MADT, %u online\n", listed, n);
	report(listed >= 1 && n == want, "every CPU the MADT lists came online");
	check_each_cpu(n);
	check_run_all(n);
	check_barrier(n);
	if (n > 1) {
		check_ipi(n);
		check_shootdown();
	} else {
		printf("INFO: one CPU: the IPI and TLB shootdown checks need two and were skipped\n");
	}
	exit(report_summary());
}
