/*
 * SMP bring-up and cross-CPU work for a kernel at ring 0 (docs/smp.md).
 *
 * smp_init() (BSP, explicit: no guest gets other CPUs unless it asks) reads the MADT, copies
 * ap_boot.S's real-mode trampoline to a free page below 1 MiB, gives every AP a stack below
 * 1 MiB (the page allocator never hands that memory out; the multiboot memory map and the
 * loader's structures say which of it is free), and starts the APs one at a time with the
 * universal start-up algorithm (Intel SDM vol. 3, 8.4.4.1; the MP specification, B.4):
 * INIT, 10 ms, STARTUP, 200 us, STARTUP, 200 us, then a bounded wait for the AP to say it runs.
 *
 * An idle AP sleeps in `sti; hlt` and is woken by an IPI (SMP_VEC_WAKE) after work is posted
 * to its mailbox; the pair is atomic with respect to interrupts (STI's one-instruction shadow),
 * so a wake-up sent between the mailbox check and HLT still ends the HLT.
 *
 * Under a VMI 1.5 ROM the APs start through CPU.SetInitialAPState instead (smp_init_vmi), at
 * ring 3 too when the kernel is deprivileged.
 *
 * Little static data on purpose: boot.S zeroes .bss instruction by instruction in emulated
 * 32-bit mode on this machine kind, so every guest pays for what lives here.
 */
#include "apic.h"
#include "lib.h"
#include "smp.h"
#include "vmi.h"

#define LOW_END        0xA0000ull /* the legacy video window and BIOS area start here */
#define LOW_START      0x1000ull  /* page 0: real-mode IVT and BIOS data area */
#define CANARY         0x5AFEC0DEu
#define MB_INFO_SIZE   0x80       /* a multiboot v1 info block, every optional field included */
#define MB_LOADER_NAME (1u << 9)  /* flags: boot_loader_name at offset 64 */
#define TRAMP_SIZE     0x1000ull  /* one page: a SIPI vector names a 4 KiB page below 1 MiB */

extern char smp_trampoline[], smp_trampoline_end[];
extern char pml4[];
extern uint64_t smp_ap_cr0, smp_ap_cr3, smp_ap_cr4, smp_ap_efer;
extern struct descriptor_ptr smp_ap_gdtr, smp_ap_idtr;
extern uint32_t smp_ap_count, smp_ap_apic_ids[SMP_MAX_CPUS];
extern uint64_t smp_ap_stack_tops[SMP_MAX_CPUS];

void smp_ap_main(unsigned index) __attribute__((noreturn));

/* Started through VMI's CPU.SetInitialAPState (a 1.5 ROM): no LAPIC, trampoline or real mode;
 * the APs begin in long mode on their stacks, in the BSP's privilege (at ring 3 when the kernel is
 * deprivileged). A deprivileged kernel cannot `hlt` or take IPIs, so its idle APs spin on their
 * mailbox and shootdowns go through MMU.FlushTLBMulti/InvalPageMulti. */
static int vmi_started, spin_idle;

static struct smp_cpu bsp_cpu = { .canary = CANARY };
static struct smp_cpu *cpus[SMP_MAX_CPUS] = { &bsp_cpu };
static unsigned ncpus = 1, listed, initialised;
static uint64_t stacks_base, stacks_len; /* [base, base + len): the APs' stacks */
static unsigned pm_port, pm_bits;
static uint64_t tsc_per_ms;

/* --- time ------------------------------------------------------------------------------- */

static unsigned pm_read(void) { return inl((uint16_t)pm_port); }

/* PM timer ticks from a to b, across one wrap of its 24 or 32 bits. */
static uint64_t pm_delta(unsigned a, unsigned b)
{
	uint64_t mask = pm_bits == 32 ? 0xFFFFFFFFull : 0xFFFFFFull;
	return ((uint64_t)b - a) & mask;
}

void smp_udelay(unsigned us)
{
	if (!pm_port)
		return;
	/* 3.579545 MHz; re-read often enough (well under one wrap: 4.7 s at 24 bits). */
	uint64_t want = (uint64_t)us * 3579545ull / 1000000ull + 1, got = 0;
	unsigned last = pm_read();
	while (got < want) {
		unsigned now = pm_read();
		got += pm_delta(last, now);
		last = now;
		__asm__ __volatile__("pause");
	}
}

uint64_t smp_tsc_per_ms(void) { return tsc_per_ms; }

/* A TSC deadline for waits that must not exit to the VMM on every pass (the PM timer would). */
static uint64_t deadline_ms(unsigned ms) { return rdtsc() + (uint64_t)ms * tsc_per_ms; }
static int expired(uint64_t deadline) { return (int64_t)(rdtsc() - deadline) >= 0; }

static void calibrate_tsc(void)
{
	/* 10 ms of PM timer: a deadline only needs the right order of magnitude. */
	unsigned start = pm_read();
	uint64_t t0 = rdtsc(), ticks = 0;
	unsigned last = start;
	while (ticks < 35795) {
		unsigned now = pm_read();
		ticks += pm_delta(last, now);
		last = now;
	}
	uint64_t per_ms = (rdtsc() - t0) * 3579545ull / (ticks * 1000ull);
	tsc_per_ms = per_ms ? per_ms : 1;
}

/* --- per-CPU data ------------------------------------------------------------------------ */

struct smp_cpu *smp_this_cpu(void)
{
	uint64_t sp;
	__asm__ __volatile__("mov %%rsp, %0" : "=r"(sp));
	/* An AP's stack is aligned to its size with its struct at the bottom; any other stack is
	 * the BSP's (boot.S's, or one a guest switched to). */
	if (sp - stacks_base < stacks_len)
		return (struct smp_cpu *)(uintptr_t)(sp & ~(SMP_STACK_SIZE - 1));
	return &bsp_cpu;
}

unsigned smp_cpu_id(void) { return smp_this_cpu()->id; }
unsigned smp_cpus(void) { return ncpus; }
unsigned smp_cpus_listed(void) { return listed; }
struct smp_cpu *smp_cpu(unsigned cpu) { return cpu < ncpus ? cpus[cpu] : NULL; }

uint64_t smp_online_mask(void)
{
	uint64_t m = 0;
	for (unsigned i = 0; i < ncpus; i++)
		if (cpus[i]->online)
			m |= 1ull << i;
	return m;
}

/* --- low memory -------------------------------------------------------------------------- */

static int overlaps(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
	return alen && blen && a < b + blen && b < a + alen;
}

/* [start, start + len) is RAM the memory map calls available, and the loader left nothing
 * there we still need (info block, memory map, command line, modules, their names). */
static int low_free(uint64_t start, uint64_t len)
{
	const struct multiboot_info *mbi = boot_info;
	if (!mbi || !(mbi->flags & MULTIBOOT_INFO_MMAP))
		return 0;
	int ram = 0;
	for (uint64_t p = mbi->mmap_addr; p + sizeof(struct multiboot_mmap_entry) <= (uint64_t)mbi->mmap_addr + mbi->mmap_length;) {
		const struct multiboot_mmap_entry *e = (const void *)(uintptr_t)p;
		if (e->type == MULTIBOOT_MEMORY_AVAILABLE && e->base <= start && start + len <= e->base + e->len)
			ram = 1;
		p += (uint64_t)e->size + sizeof(e->size);
	}
	if (!ram || overlaps(start, len, (uintptr_t)mbi, MB_INFO_SIZE) ||
	    overlaps(start, len, mbi->mmap_addr, mbi->mmap_length))
		return 0;
	if ((mbi->flags & MULTIBOOT_INFO_CMDLINE) &&
	    overlaps(start, len, mbi->cmdline, strlen((const char *)(uintptr_t)mbi->cmdline) + 1))
		return 0;
	if (mbi->flags & MB_LOADER_NAME) {
		uint32_t name;
		memcpy(&name, (const uint8_t *)mbi + 64, 4);
		if (overlaps(start, len, name, strlen((const char *)(uintptr_t)name) + 1))
			return 0;
	}
	if (mbi->flags & MULTIBOOT_INFO_MODS) {
		const struct multiboot_module *m = (const void *)(uintptr_t)mbi->mods_addr;
		if (overlaps(start, len, mbi->mods_addr, mbi->mods_count * sizeof(*m)))
			return 0;
		for (uint32_t i = 0; i < mbi->mods_count; i++)
			if (overlaps(start, len, m[i].start, m[i].end - m[i].start) ||
			    (m[i].string && overlaps(start, len, m[i].string, strlen((const char *)(uintptr_t)m[i].string) + 1)))
				return 0;
	}
	return 1;
}

/* The lowest `align`-aligned free run of `len` bytes below LOW_END that avoids [avoid, +alen). */
static uint64_t low_alloc(uint64_t len, uint64_t align, uint64_t avoid, uint64_t alen)
{
	for (uint64_t a = (LOW_START + align - 1) & ~(align - 1); a + len <= LOW_END; a += align)
		if (!overlaps(a, len, avoid, alen) && low_free(a, len))
			return a;
	return 0;
}

/* --- the ICR ------------------------------------------------------------------------------ */

static uint64_t irq_save(void)
{
	uint64_t flags;
	__asm__ __volatile__("pushfq; popq %0; cli" : "=r"(flags) : : "memory");
	return flags;
}

static void irq_restore(uint64_t flags)
{
	if (flags & (1u << 9))
		sti();
}

/* The previous IPI accepted by the APIC bus (SDM: check delivery status before a new send).
 * A modern xAPIC sets it only briefly; bounded all the same. */
static int icr_wait_idle(void)
{
	for (unsigned i = 0; i < 100000; i++) {
		if (!(lapic_read(LAPIC_ICR_LOW) & ICR_BUSY))
			return 0;
		__asm__ __volatile__("pause");
	}
	return -1;
}

/* One ICR write pair, with interrupts off so that a handler's own IPI cannot split it. */
static void icr_send(unsigned apic_id, uint32_t low)
{
	uint64_t flags = irq_save();
	icr_wait_idle();
	lapic_write(LAPIC_ICR_HIGH, apic_id << 24);
	lapic_write(LAPIC_ICR_LOW, low);
	icr_wait_idle();
	irq_restore(flags);
}

void smp_send_ipi(unsigned cpu, unsigned vector)
{
	if (cpu < ncpus && !spin_idle)
		icr_send(cpus[cpu]->apic_id, ICR_FIXED | ICR_ASSERT | (vector & 0xFF));
}

/* --- interrupt handlers ------------------------------------------------------------------- */

static struct {
	volatile unsigned lock;
	volatile uint64_t va;
	volatile uint64_t pending; /* bit i: CPU i has yet to flush */
} flush;

static int on_wake(struct trap_regs *r)
{
	(void)r; /* the idle loop looks at the mailbox after HLT */
	return 1;
}

static int on_flush(struct trap_regs *r)
{
	(void)r;
	uint64_t va = __atomic_load_n(&flush.va, __ATOMIC_ACQUIRE);
	if (va == SMP_FLUSH_ALL)
		write_cr3(read_cr3()); /* every non-global translation */
	else
		invlpg((const void *)(uintptr_t)va);
	__atomic_fetch_and(&flush.pending, ~(1ull << smp_cpu_id()), __ATOMIC_RELEASE);
	return 1;
}

static void lapic_enable(void)
{
	wrmsr(MSR_APIC_BASE, rdmsr(MSR_APIC_BASE) | APIC_BASE_EN);
	lapic_write(LAPIC_TPR, 0); /* accept every priority */
	lapic_write(LAPIC_SVR, SVR_ENABLE | APIC_SPURIOUS);
}

/* --- the APs ------------------------------------------------------------------------------- */

static void idle_spinning(struct smp_cpu *c) __attribute__((noreturn));

void smp_ap_main(unsigned index)
{
	struct smp_cpu *c = smp_this_cpu();
	(void)index; /* the same CPU as c: ap_boot.S chose the stack by it */
	if (vmi_started)
		vmi_cpu_init(); /* this CPU's part of the VMI layer (its queue, its shared page) first */
	if (spin_idle)
		idle_spinning(c);
	lapic_enable(); /* software-disabled after INIT: fixed IPIs would be dropped */
	__atomic_store_n(&c->online, 1, __ATOMIC_RELEASE);
	for (;;) {
		cli();
		uint64_t posted = __atomic_load_n(&c->posted, __ATOMIC_ACQUIRE);
		if (posted != c->done) {
			void (*fn)(void *) = c->fn;
			void *arg = c->arg;
			sti(); /* shootdowns and other IPIs reach a CPU running work */
			fn(arg);
			__atomic_store_n(&c->done, posted, __ATOMIC_RELEASE);
			continue;
		}
		__asm__ __volatile__("sti; hlt" ::: "memory");
	}
}

/* A deprivileged AP: no hlt, no IPI; it polls its mailbox (natively, at ring 3: no exit). */
static void idle_spinning(struct smp_cpu *c)
{
	__atomic_store_n(&c->online, 1, __ATOMIC_RELEASE);
	for (;;) {
		uint64_t posted = __atomic_load_n(&c->posted, __ATOMIC_ACQUIRE);
		if (posted != c->done) {
			c->fn(c->arg);
			__atomic_store_n(&c->done, posted, __ATOMIC_RELEASE);
			continue;
		}
		__asm__ __volatile__("pause" ::: "memory");
	}
}

static int wait_online(struct smp_cpu *c)
{
	uint64_t deadline = deadline_ms(SMP_ARRIVE_MS);
	while (!__atomic_load_n(&c->online, __ATOMIC_ACQUIRE)) {
		if (expired(deadline))
			return -1;
		__asm__ __volatile__("pause");
	}
	return 0;
}

/* Every AP through CPU.SetInitialAPState: VMI numbers CPUs 0..n-1 by APIC ID. */
static unsigned smp_init_vmi(uint32_t n)
{
	listed = n;
	if (n <= 1)
		return ncpus;
	if (!acpi_pm_timer(&pm_port, &pm_bits)) {
		printf("INFO: smp: no ACPI PM timer to bound the waits; staying on one CPU\n");
		return ncpus;
	}
	calibrate_tsc();
	unsigned naps = n - 1 < SMP_MAX_CPUS - 1 ? n - 1 : SMP_MAX_CPUS - 1;
	uint64_t stacks = low_alloc(naps * SMP_STACK_SIZE, SMP_STACK_SIZE, 0, 0);
	if (!stacks) {
		printf("INFO: smp: no free low memory for %u stacks; staying on one CPU\n", naps);
		return ncpus;
	}
	stacks_base = stacks; /* before any AP runs: smp_this_cpu() finds an AP's struct by it */
	stacks_len = naps * SMP_STACK_SIZE;
	vmi_started = 1;
	spin_idle = vmi_deprivileged();
	if (!spin_idle) {
		lapic_enable();
		set_irq_hook(SMP_VEC_WAKE, on_wake);
		set_irq_hook(SMP_VEC_FLUSH, on_flush);
	}
	bsp_cpu.apic_id = 0;
	bsp_cpu.online = 1;
	unsigned online = 1;
	for (unsigned i = 0; i < naps; i++) {
		uint64_t base = stacks + i * SMP_STACK_SIZE;
		struct smp_cpu *c = (struct smp_cpu *)(uintptr_t)base;
		*c = (struct smp_cpu){ .id = online, .apic_id = i + 1, .canary = CANARY };
		__atomic_thread_fence(__ATOMIC_SEQ_CST);
		/* rsp as just after a call: smp_ap_main's frame is then aligned as the ABI wants. */
		long st = vmi_start_ap(i + 1, (uint64_t)(uintptr_t)smp_ap_main, base + SMP_STACK_SIZE - 8, online);
		if (st == VMI_ERR_OK && wait_online(c) == 0)
			cpus[online++] = c;
		else
			printf("INFO: smp: CPU %u did not start (status %ld)\n", i + 1, st);
	}
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	ncpus = online;
	return ncpus;
}

static int start_ap(unsigned index, unsigned vector)
{
	struct smp_cpu *c = cpus[index + 1];
	/* INIT: assert, then deassert (ignored since the Pentium 4, needed by older APICs). */
	icr_send(c->apic_id, ICR_INIT | ICR_LEVEL | ICR_ASSERT);
	smp_udelay(10000);
	icr_send(c->apic_id, ICR_INIT | ICR_LEVEL);
	/* Two STARTUPs: a CPU already running ignores the second (it is not waiting for SIPI). */
	for (int i = 0; i < 2 && !c->online; i++) {
		icr_send(c->apic_id, ICR_STARTUP | vector);
		smp_udelay(200);
	}
	return wait_online(c);
}

unsigned smp_init(void)
{
	if (initialised)
		return ncpus;
	initialised = 1;
	uint32_t vmi_me = 0, vmi_n = 0;
	if (vmi_cpu_info(&vmi_me, &vmi_n) == VMI_ERR_OK)
		return smp_init_vmi(vmi_n);
	if (vmi_deprivileged()) {
		/* At ring 3 the LAPIC and CR/MSR accesses are the hypervisor's: VMI 1.5 starts CPUs. */
		printf("INFO: smp: the kernel is deprivileged under a hypervisor without SetInitialAPState; "
		       "staying on one CPU\n");
		return ncpus;
	}
	struct madt_info mi;
	if (!acpi_read_madt(&mi)) {
		printf("INFO: smp: no valid MADT; staying on one CPU\n");
		return ncpus;
	}
	listed = mi.cpus;
	if (mi.cpus <= 1)
		return ncpus;
	if (!acpi_pm_timer(&pm_port, &pm_bits)) {
		printf("INFO: smp: no ACPI PM timer to time INIT/SIPI; staying on one CPU\n");
		return ncpus;
	}
	if (mi.lapic_addr != LAPIC_BASE) {
		printf("INFO: smp: the local APIC is at 0x%x, not 0x%llx; staying on one CPU\n", mi.lapic_addr,
		       (unsigned long long)LAPIC_BASE);
		return ncpus;
	}
	calibrate_tsc();
	lapic_enable();
	set_irq_hook(SMP_VEC_WAKE, on_wake);
	set_irq_hook(SMP_VEC_FLUSH, on_flush);

	unsigned me = lapic_id(), naps = 0;
	uint32_t ids[SMP_MAX_CPUS];
	for (unsigned i = 0; i < mi.cpus && i < MADT_MAX_CPUS; i++) {
		if (mi.apic_ids[i] == me)
			continue;
		if (naps == SMP_MAX_CPUS - 1) {
			printf("INFO: smp: the MADT lists %u CPUs; starting the first %u\n", mi.cpus, SMP_MAX_CPUS);
			break;
		}
		ids[naps++] = mi.apic_ids[i];
	}
	bsp_cpu.apic_id = me;
	bsp_cpu.online = 1;

	uint64_t tramp_len = (uint64_t)(smp_trampoline_end - smp_trampoline);
	uint64_t tramp = low_alloc(TRAMP_SIZE, TRAMP_SIZE, 0, 0);
	uint64_t stacks = tramp ? low_alloc(naps * SMP_STACK_SIZE, SMP_STACK_SIZE, tramp, TRAMP_SIZE) : 0;
	if (!tramp || !stacks) {
		printf("INFO: smp: no free low memory for the trampoline and %u stacks; staying on one CPU\n", naps);
		return ncpus;
	}
	memcpy((void *)(uintptr_t)tramp, smp_trampoline, tramp_len);

	/* What the APs load on their way to long mode: the BSP's own state. */
	smp_ap_cr0 = read_cr0();
	smp_ap_cr3 = (uintptr_t)pml4;
	smp_ap_cr4 = read_cr4();
	smp_ap_efer = rdmsr(MSR_EFER);
	smp_ap_gdtr = sgdt();
	smp_ap_idtr = sidt();
	for (unsigned i = 0; i < naps; i++) {
		uint64_t base = stacks + i * SMP_STACK_SIZE;
		struct smp_cpu *c = (struct smp_cpu *)(uintptr_t)base;
		*c = (struct smp_cpu){ .id = i + 1, .apic_id = ids[i], .canary = CANARY };
		smp_ap_apic_ids[i] = ids[i];
		smp_ap_stack_tops[i] = base + SMP_STACK_SIZE;
		cpus[i + 1] = c;
	}
	smp_ap_count = naps;
	stacks_base = stacks;
	stacks_len = naps * SMP_STACK_SIZE;
	__atomic_thread_fence(__ATOMIC_SEQ_CST); /* all of it visible before the first SIPI */

	/* Numbers stay dense: a CPU that does not come is left out and the ones after move down. */
	unsigned online = 1;
	for (unsigned i = 0; i < naps; i++) {
		if (start_ap(i, (unsigned)(tramp >> 12)) == 0) {
			cpus[online++] = cpus[i + 1];
		} else {
			printf("INFO: smp: the CPU with APIC ID %u did not start within %u ms\n", ids[i], SMP_ARRIVE_MS);
		}
	}
	/* Renumber: an AP's id is its slot (its struct stays on its own stack). */
	for (unsigned i = 1; i < online; i++)
		cpus[i]->id = i;
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	ncpus = online;
	return ncpus;
}

/* --- work --------------------------------------------------------------------------------- */

static int lock_bounded(volatile unsigned *lock)
{
	uint64_t deadline = deadline_ms(SMP_WAIT_MS);
	while (__atomic_exchange_n(lock, 1, __ATOMIC_ACQUIRE)) {
		if (expired(deadline))
			return -1;
		__asm__ __volatile__("pause");
	}
	return 0;
}

static void unlock(volatile unsigned *lock) { __atomic_store_n(lock, 0, __ATOMIC_RELEASE); }

static int wait_idle(struct smp_cpu *c)
{
	uint64_t deadline = deadline_ms(SMP_WAIT_MS);
	while (__atomic_load_n(&c->done, __ATOMIC_ACQUIRE) != c->posted) {
		if (expired(deadline))
			return -1;
		__asm__ __volatile__("pause");
	}
	return 0;
}

int smp_start_on(unsigned cpu, void (*fn)(void *), void *arg)
{
	if (cpu >= ncpus || !cpus[cpu]->online || cpu == smp_cpu_id())
		return -1;
	struct smp_cpu *c = cpus[cpu];
	if (lock_bounded(&c->lock))
		return -1;
	if (wait_idle(c)) { /* still running earlier work */
		unlock(&c->lock);
		return -1;
	}
	c->fn = fn;
	c->arg = arg;
	__atomic_store_n(&c->posted, c->posted + 1, __ATOMIC_RELEASE);
	unlock(&c->lock);
	smp_send_ipi(cpu, SMP_VEC_WAKE);
	return 0;
}

int smp_wait_on(unsigned cpu)
{
	if (cpu >= ncpus)
		return -1;
	if (wait_idle(cpus[cpu])) {
		printf("INFO: smp: CPU %u did not finish its work within %u ms\n", cpu, SMP_WAIT_MS);
		return -1;
	}
	return 0;
}

int smp_run_on(unsigned cpu, void (*fn)(void *), void *arg)
{
	if (cpu < ncpus && cpu == smp_cpu_id()) {
		fn(arg);
		return 0;
	}
	if (smp_start_on(cpu, fn, arg))
		return -1;
	return smp_wait_on(cpu);
}

int smp_run_all(void (*fn)(void *), void *arg)
{
	unsigned me = smp_cpu_id(), failed = 0;
	uint64_t started = 0;
	for (unsigned i = 0; i < ncpus; i++)
		if (i != me) {
			if (smp_start_on(i, fn, arg) == 0)
				started |= 1ull << i;
			else
				failed++;
		}
	fn(arg);
	for (unsigned i = 0; i < ncpus; i++)
		if ((started >> i) & 1)
			failed += smp_wait_on(i) != 0;
	return (int)failed;
}

void smp_barrier_init(struct smp_barrier *b, unsigned n)
{
	b->count = 0;
	b->generation = 0;
	b->n = n;
}

int smp_barrier_wait(struct smp_barrier *b)
{
	unsigned gen = __atomic_load_n(&b->generation, __ATOMIC_ACQUIRE);
	if (__atomic_add_fetch(&b->count, 1, __ATOMIC_ACQ_REL) == b->n) {
		b->count = 0; /* the last to arrive opens the next round, then releases this one */
		__atomic_store_n(&b->generation, gen + 1, __ATOMIC_RELEASE);
		return 0;
	}
	uint64_t deadline = deadline_ms(SMP_WAIT_MS);
	while (__atomic_load_n(&b->generation, __ATOMIC_ACQUIRE) == gen) {
		if (expired(deadline))
			return -1;
		__asm__ __volatile__("pause");
	}
	return 0;
}

uint64_t smp_flush_tlb_others(uint64_t mask, uint64_t va)
{
	mask &= smp_online_mask() & ~(1ull << smp_cpu_id());
	if (!mask)
		return 0;
	if (vmi_started) { /* one call for the whole set; VMI names CPUs by APIC ID */
		uint64_t targets = 0;
		for (unsigned i = 0; i < ncpus; i++)
			if ((mask >> i) & 1)
				targets |= 1ull << cpus[i]->apic_id;
		long st = va == SMP_FLUSH_ALL ? vmi_flush_tlb_multi(VMI_FLUSH_TLB, targets, NULL)
					      : vmi_inval_page_multi(va, targets, NULL);
		return st == VMI_ERR_OK ? 0 : mask;
	}
	/* One shootdown at a time. A sender that spins here with interrupts enabled still answers
	 * the holder's IPI, so two CPUs flushing each other do not deadlock. */
	if (lock_bounded(&flush.lock))
		return mask;
	flush.va = va;
	__atomic_store_n(&flush.pending, mask, __ATOMIC_RELEASE);
	for (unsigned i = 0; i < ncpus; i++)
		if ((mask >> i) & 1)
			smp_send_ipi(i, SMP_VEC_FLUSH);
	uint64_t deadline = deadline_ms(SMP_WAIT_MS);
	while (__atomic_load_n(&flush.pending, __ATOMIC_ACQUIRE) && !expired(deadline))
		__asm__ __volatile__("pause");
	uint64_t left = __atomic_load_n(&flush.pending, __ATOMIC_ACQUIRE);
	unlock(&flush.lock);
	return left;
}
