/*
 * events: time and asynchronous events (docs/events.md), through VMI 1.4 where the hypervisor
 * offers it (Time alarms, EventChannel sources, port masks, upcalls, the shared page's vif,
 * CPU.Halt) and through the board's own devices on a bare machine (the LAPIC timer, the PIT
 * through the IOAPIC, self-IPIs, the LAPIC's TPR as a port mask, cli/sti/hlt), with the same
 * PASS lines either way; INFO lines say which path ran.
 *
 * Command line: `halts=N period=MS` (the halting check: N one-shot alarms of MS, default 10 x
 * 10; `periodic`: one periodic alarm of MS, N halts), `echo` (read a line from COM1 through a console event and print it), `pairs=N` (only N
 * mask/unmask pairs, then exit: the tests count their exits), `bench=N` (alarm-to-handler
 * latency and event round trip over N samples, at most 256, printed as BENCH lines: every sample,
 * then median, min and max; `vmikit bench` reads them), `only=halts` (skip the
 * other checks).
 */
#include "lib.h"
#include "vmi.h"
#include "x86.h"

#define LAPIC_BASE      0xFEE00000ull
#define LAPIC_ID        0x020
#define LAPIC_TPR       0x080
#define LAPIC_EOI       0x0B0
#define LAPIC_SVR       0x0F0
#define LAPIC_ICR_LOW   0x300
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_TIMER_ICR 0x380
#define LAPIC_TIMER_DCR 0x3E0
#define LVT_MASKED      (1u << 16)
#define LVT_PERIODIC    (1u << 17)
#define MSR_APIC_BASE   0x1B
#define LAPIC_NS_PER_COUNT 1 /* KVM's LAPIC timer counts at 1 GHz with divide-by-1 (QEMU's too) */

#define VEC_ALARM0 0x40 /* the LAPIC timer */
#define VEC_ALARM1 0x41 /* the PIT through the IOAPIC */
#define VEC_SELF   0x42 /* a self-IPI */
#define VEC_UART   0x44
#define COM1       0x3F8
#define PIT_HZ     1193182ull
#define PM_TIMER_HZ 3579545ull

/* Ports (VMI) and the counters of both paths. */
enum { P_ALARM0 = 1, P_ALARM1 = 2, P_SELF = 3, P_CONSOLE = 4, NPORTS = 8 };

static int vmi_path;
static uint64_t hz;
static volatile unsigned count[NPORTS];
static volatile uint64_t handled_at[NPORTS];
static uint64_t ioapic_base = 0xFEC00000ull;
static unsigned pit_pin, pm_port, pm_bits = 24;
static char line[128];
static volatile unsigned line_len, line_done;

static inline volatile uint32_t *lapic(unsigned reg) { return (volatile uint32_t *)(uintptr_t)(LAPIC_BASE + reg); }
static uint64_t cycles(void) { return vmi_path ? vmi_cycle_counter() : rdtsc(); }
static uint64_t ns_to_cycles(uint64_t ns) { return ns * hz / 1000000000ull; }
static uint64_t cycles_to_ns(uint64_t c) { return hz ? c * 1000ull / (hz / 1000000ull) : 0; }

static void spin_ns(uint64_t ns)
{
	uint64_t end = cycles() + ns_to_cycles(ns);
	while (cycles() < end)
		__asm__ __volatile__("pause");
}

/* Spin (events on) until *c reaches n or ns pass; 1 if it did. */
static int spin_until(volatile unsigned *c, unsigned n, uint64_t ns)
{
	uint64_t end = cycles() + ns_to_cycles(ns);
	while (*c < n && cycles() < end)
		__asm__ __volatile__("pause");
	return *c >= n;
}

static void read_console(void)
{
	while (inb(COM1 + 5) & 0x01) {
		char c = (char)inb(COM1);
		if (c == '\n')
			line_done = 1;
		else if (line_len < sizeof(line) - 1)
			line[line_len++] = c;
	}
}

/* --- the VMI path: one upcall handler for every port --------------------------------- */

static void on_events(uint64_t ports)
{
	uint64_t now = cycles();
	for (unsigned p = 0; p < NPORTS; p++)
		if (ports & (1ull << p)) {
			count[p]++;
			handled_at[p] = now;
		}
	if (ports & (1ull << P_CONSOLE))
		read_console();
}

/* --- the native path: the board's interrupts ------------------------------------------ */

static int on_native(struct trap_regs *r)
{
	unsigned p = r->vector == VEC_ALARM0 ? P_ALARM0 : r->vector == VEC_ALARM1 ? P_ALARM1
		   : r->vector == VEC_SELF ? P_SELF : P_CONSOLE;
	handled_at[p] = rdtsc();
	count[p]++;
	if (p == P_CONSOLE)
		read_console();
	*lapic(LAPIC_EOI) = 0;
	return 1;
}

static void ioapic_write(unsigned reg, uint32_t value)
{
	*(volatile uint32_t *)(uintptr_t)ioapic_base = reg;
	*(volatile uint32_t *)(uintptr_t)(ioapic_base + 0x10) = value;
}

static void ioapic_route(unsigned pin, unsigned vector, int masked)
{
	ioapic_write(0x11 + 2 * pin, (*lapic(LAPIC_ID) >> 24) << 24);
	ioapic_write(0x10 + 2 * pin, vector | (masked ? LVT_MASKED : 0));
}

static uint64_t pm_last, pm_total;
static uint64_t pm_now(void)
{
	uint64_t v = inl((uint16_t)pm_port), mask = (1ull << pm_bits) - 1;
	pm_total += (v - pm_last) & mask;
	pm_last = v;
	return pm_total;
}

/* The firmware facts the native path needs: the PM timer (FADT), the IOAPIC and the PIT's pin (MADT). */
static int read_firmware(void)
{
	for (uintptr_t a = 0xE0000; a < 0x100000; a += 16) {
		if (memcmp((const void *)a, "RSD PTR ", 8))
			continue;
		uint32_t rsdt;
		memcpy(&rsdt, (const void *)(a + 16), 4);
		uint32_t len;
		memcpy(&len, (const void *)(uintptr_t)(rsdt + 4), 4);
		for (uint32_t off = 36; off + 4 <= len; off += 4) {
			uint32_t t;
			memcpy(&t, (const void *)(uintptr_t)(rsdt + off), 4);
			const uint8_t *tab = (const uint8_t *)(uintptr_t)t;
			uint32_t tlen;
			memcpy(&tlen, tab + 4, 4);
			if (!memcmp(tab, "FACP", 4)) {
				uint32_t flags;
				memcpy(&pm_port, tab + 76, 4);
				memcpy(&flags, tab + 112, 4);
				pm_bits = flags & (1u << 8) ? 32 : 24;
			} else if (!memcmp(tab, "APIC", 4)) {
				for (const uint8_t *e = tab + 44; e < tab + tlen && e[1]; e += e[1]) {
					if (e[0] == 1) {
						uint32_t addr;
						memcpy(&addr, e + 4, 4);
						ioapic_base = addr;
					} else if (e[0] == 2 && e[3] == 0) {
						memcpy(&pit_pin, e + 4, 4);
					}
				}
			}
		}
		return pm_port != 0;
	}
	return 0;
}

static void native_setup(void)
{
	outb(0xFF, 0x21); /* both 8259s masked: the IOAPIC and the LAPIC deliver */
	outb(0xFF, 0xA1);
	for (unsigned pin = 0; pin < 24; pin++)
		ioapic_route(pin, 0xFE, 1);
	wrmsr(MSR_APIC_BASE, rdmsr(MSR_APIC_BASE) | (1u << 11));
	*lapic(LAPIC_SVR) = 0x1FF;
	*lapic(LAPIC_TIMER_DCR) = 0xB;
	*lapic(LAPIC_TPR) = 0;
	set_trap_hook(VEC_ALARM0, on_native);
	set_trap_hook(VEC_ALARM1, on_native);
	set_trap_hook(VEC_SELF, on_native);
	set_trap_hook(VEC_UART, on_native);
	/* The TSC against the PM timer over 50 ms: the frequency the Time family would tell. */
	pm_now();
	uint64_t p0 = pm_now(), t0 = rdtsc();
	while (pm_now() - p0 < PM_TIMER_HZ / 20)
		;
	uint64_t p1 = pm_now(), t1 = rdtsc();
	hz = (t1 - t0) * PM_TIMER_HZ / (p1 - p0);
}

/* --- one interface over both paths ----------------------------------------------------- */

static void alarm_once(unsigned n, uint64_t ns)
{
	if (vmi_path) {
		vmi_set_alarm(n, cycles() + ns_to_cycles(ns), 0);
		return;
	}
	*lapic(LAPIC_LVT_TIMER) = VEC_ALARM0;
	*lapic(LAPIC_TIMER_ICR) = (uint32_t)(ns / LAPIC_NS_PER_COUNT);
}

static long alarm_periodic(unsigned n, uint64_t ns)
{
	if (vmi_path)
		return vmi_set_alarm(n, cycles() + ns_to_cycles(ns), ns_to_cycles(ns));
	if (n == 0) {
		*lapic(LAPIC_LVT_TIMER) = VEC_ALARM0 | LVT_PERIODIC;
		*lapic(LAPIC_TIMER_ICR) = (uint32_t)(ns / LAPIC_NS_PER_COUNT);
	} else {
		unsigned divisor = (unsigned)(PIT_HZ * ns / 1000000000ull);
		ioapic_route(pit_pin, VEC_ALARM1, 0);
		outb(0x34, 0x43);
		outb((uint8_t)divisor, 0x40);
		outb((uint8_t)(divisor >> 8), 0x40);
	}
	return 0;
}

static uint64_t alarm_cancel(unsigned n)
{
	uint64_t fired = 0;
	if (vmi_path) {
		vmi_cancel_alarm(n, &fired);
		return fired;
	}
	if (n == 0) {
		*lapic(LAPIC_LVT_TIMER) = LVT_MASKED;
		*lapic(LAPIC_TIMER_ICR) = 0;
	} else {
		outb(0x30, 0x43);
		ioapic_route(pit_pin, VEC_ALARM1, 1);
	}
	return count[n == 0 ? P_ALARM0 : P_ALARM1];
}

static void send_self(uint64_t value)
{
	vmi_evtchn_send(P_SELF, value); /* the hypervisor's channel, or the guest's own FIFO natively */
	if (!vmi_path)
		*lapic(LAPIC_ICR_LOW) = VEC_SELF | (1u << 18); /* fixed, shorthand: self */
}

static void port_mask(int masked)
{
	if (vmi_path)
		masked ? vmi_evtchn_mask(P_SELF) : vmi_evtchn_unmask(P_SELF);
	else
		*lapic(LAPIC_TPR) = masked ? 0x40 : 0; /* class 4 (our vectors) held in the IRR */
}

/* Sleep until *c reaches n: events masked while checking, then CPU.Halt (VMI: it unmasks and
 * sleeps in one call and makes the upcall before it returns) or sti; hlt (natively, atomic):
 * no wake-up is lost between the check and the sleep. */
static void halt_until(volatile unsigned *c, unsigned n)
{
	for (;;) {
		vmi_disable_interrupts();
		if (*c >= n)
			break;
		if (vmi_path)
			vmi_halt();
		else
			__asm__ __volatile__("sti; hlt; cli" ::: "memory");
	}
	vmi_enable_interrupts();
}

/* --- the checks ------------------------------------------------------------------------- */

static void check_time(void)
{
	uint64_t c0 = cycles();
	spin_ns(1000000);
	uint64_t c1 = cycles();
	printf("INFO: cycle counter at %lu MHz (%s)\n", (unsigned long)(hz / 1000000),
	       vmi_path ? "Time.GetCycleFrequency" : "the TSC, calibrated against the PM timer");
	report(hz >= 100000000ull && c1 > c0, "the cycle counter runs forward at a known frequency");
	uint64_t wall = 0;
	int has_wall = vmi_path && vmi_wallclock(&wall) == VMI_ERR_OK;
	if (has_wall)
		printf("INFO: wallclock %lu s since 1970\n", (unsigned long)(wall / 1000000000ull));
	report(!has_wall || wall / 1000000000ull > 1577836800ull, "the wallclock, where there is one, is after 2020");
}

static void check_one_shot(void)
{
	count[P_ALARM0] = 0;
	uint64_t start = cycles();
	alarm_once(0, 20000000);
	halt_until(&count[P_ALARM0], 1);
	uint64_t took = handled_at[P_ALARM0] - start;
	spin_ns(30000000);
	printf("INFO: one-shot alarm of 20000 us handled after %lu us\n", (unsigned long)(cycles_to_ns(took) / 1000));
	report(count[P_ALARM0] == 1 && cycles_to_ns(took) >= 19800000, "a one-shot alarm of 20 ms fires once, not before its time");
	alarm_cancel(0);
}

static void check_periodic(void)
{
	count[P_ALARM0] = count[P_ALARM1] = 0;
	uint64_t start = cycles();
	long s = alarm_periodic(0, 2000000) | alarm_periodic(1, 5000000);
	halt_until(&count[P_ALARM0], 20);
	uint64_t took = cycles_to_ns(cycles() - start);
	unsigned a = count[P_ALARM0], b = count[P_ALARM1];
	uint64_t fa = alarm_cancel(0), fb = alarm_cancel(1);
	printf("INFO: periodic alarms: %u of 2 ms and %u of 5 ms in %lu us (fired %lu and %lu)\n", a, b,
	       (unsigned long)(took / 1000), (unsigned long)fa, (unsigned long)fb);
	report(s == 0 && a >= 20 && took >= 20 * 2000000ull * 99 / 100 && b >= 1 && b <= took / 5000000 + 1,
	       "two periodic alarms (2 ms and 5 ms) never fire more often than their periods, counted against the cycle counter");
	spin_ns(10000000); /* cancelled: nothing more */
	report(count[P_ALARM0] == a && count[P_ALARM1] <= b + 1, "cancelled alarms stop firing");
}

static void check_masking(void)
{
	count[P_ALARM0] = 0;
	vmi_disable_interrupts();
	alarm_once(0, 1000000);
	spin_ns(5000000);
	unsigned masked = count[P_ALARM0];
	vmi_enable_interrupts();
	unsigned at_once = count[P_ALARM0];
	/* KVM's emulator (ring 0 here) may run a while before it injects an interrupt. */
	spin_until(&count[P_ALARM0], 1, 50000000);
	unsigned after = count[P_ALARM0];
	alarm_cancel(0);
	printf("INFO: masked alarm: %u while masked, %u right after unmasking, %u within 50 ms\n", masked, at_once, after);
	report(masked == 0 && after == 1, "an alarm that fires while events are masked waits, and unmasking delivers it");
}

static void check_self(void)
{
	count[P_SELF] = 0;
	send_self(0x5E1F);
	int got = spin_until(&count[P_SELF], 1, 50000000);
	uint64_t v = 0;
	uint32_t left = 9;
	report(got && vmi_evtchn_poll(P_SELF, &v, &left) == VMI_ERR_OK && v == 0x5E1F && left == 0,
	       "an event the guest sends itself is delivered, and its value can still be polled");

	port_mask(1);
	send_self(0x5E20);
	spin_ns(2000000);
	unsigned held = count[P_SELF];
	port_mask(0);
	got = spin_until(&count[P_SELF], 2, 50000000);
	vmi_evtchn_poll(P_SELF, &v, &left);
	report(held == 1 && got, "a masked port holds its event, and unmasking the port delivers it");
}

/* One-shot alarms re-armed each time, or (`periodic`) one periodic alarm: a halt per period. */
static void check_halts(unsigned n, unsigned ms, int periodic)
{
	unsigned early = 0;
	count[P_ALARM0] = 0;
	uint64_t start = cycles(), t = start;
	if (periodic && n)
		alarm_periodic(0, ms * 1000000ull);
	for (unsigned i = 0; i < n; i++) {
		if (!periodic) {
			t = cycles();
			alarm_once(0, ms * 1000000ull);
		}
		halt_until(&count[P_ALARM0], i + 1);
		if (periodic) /* the n-th tick, n periods after arming or later, never before */
			early += cycles_to_ns(handled_at[P_ALARM0] - t) < (i + 1) * ms * 1000000ull * 99 / 100;
		else
			early += cycles_to_ns(handled_at[P_ALARM0] - t) < ms * 1000000ull * 99 / 100;
	}
	alarm_cancel(0);
	printf("HALTED: %u x %u ms in %lu ms\n", n, ms, (unsigned long)(cycles_to_ns(cycles() - start) / 1000000));
	report(count[P_ALARM0] == n && early == 0, "halting until an alarm wakes on it, %u times, never early", n);
}

static void echo(void)
{
	if (vmi_path) {
		vmi_evtchn_bind(VMI_EVTCHN_SOURCE_CONSOLE, P_CONSOLE);
	} else {
		ioapic_route(4, VEC_UART, 0);
		outb(0x0B, COM1 + 4); /* DTR, RTS, OUT2 (the IRQ gate) */
		outb(0x01, COM1 + 1); /* data available */
	}
	read_console(); /* what arrived before we listened */
	while (!line_done)
		halt_until(&line_done, 1);
	if (!vmi_path)
		outb(0, COM1 + 1);
	printf("ECHO: %s\n", line);
}

static void sort(uint64_t *v, unsigned n)
{
	for (unsigned i = 1; i < n; i++)
		for (unsigned j = i; j > 0 && v[j - 1] > v[j]; j--) {
			uint64_t t = v[j];
			v[j] = v[j - 1];
			v[j - 1] = t;
		}
}

/* Alarm expiry to handler entry, and a self-sent event to its handler and back. */
static void bench(unsigned n)
{
	static uint64_t lat[256], rt[256];
	if (n > 256)
		n = 256;
	for (unsigned i = 0; i < n; i++) {
		count[P_ALARM0] = 0;
		uint64_t armed = cycles(), expiry = armed + ns_to_cycles(1000000);
		alarm_once(0, 1000000);
		halt_until(&count[P_ALARM0], 1);
		lat[i] = handled_at[P_ALARM0] > expiry ? cycles_to_ns(handled_at[P_ALARM0] - expiry) : 0;
		count[P_SELF] = 0;
		uint64_t t = cycles();
		send_self(i);
		spin_until(&count[P_SELF], 1, 10000000);
		rt[i] = cycles_to_ns(cycles() - t);
		uint64_t v;
		uint32_t left;
		vmi_evtchn_poll(P_SELF, &v, &left);
	}
	alarm_cancel(0);
	/* Every sample, in the order taken (after the loop: printing is no part of what is timed). */
	for (unsigned i = 0; i < n; i++)
		printf("BENCH sample %u alarm_latency_ns=%lu event_roundtrip_ns=%lu\n", i, (unsigned long)lat[i],
		       (unsigned long)rt[i]);
	sort(lat, n);
	sort(rt, n);
	printf("BENCH alarm_latency_ns median=%lu min=%lu max=%lu n=%u path=%s\n", (unsigned long)lat[n / 2],
	       (unsigned long)lat[0], (unsigned long)lat[n - 1], n, vmi_path ? "vmi" : "native");
	printf("BENCH event_roundtrip_ns median=%lu min=%lu max=%lu n=%u path=%s\n", (unsigned long)rt[n / 2],
	       (unsigned long)rt[0], (unsigned long)rt[n - 1], n, vmi_path ? "vmi" : "native");
}

void kmain(uint32_t magic, uint32_t mbinfo)
{
	(void)magic;
	(void)mbinfo;
	printf("vmikit events guest\n");
	vmi_path = vmi_time_present() && vmi_events_present();
	if (!vmi_path && vmi_deprivileged()) {
		printf("EVENTS-SETUP failed: this hypervisor has no VMI 1.4 Time and event calls, and a deprivileged "
		       "kernel cannot drive the board's interrupts; run it under VMI 1.4, with --privilege ring0, or --rom none\n");
		exit(2);
	}
	printf("INFO: events through %s\n", vmi_path ? "VMI 1.4 (Time alarms, EventChannel upcalls, vif)"
						     : "the board (LAPIC timer, PIT, self-IPIs, cli/sti/hlt)");
	if (vmi_path) {
		vmi_cycle_frequency(&hz);
		vmi_evtchn_bind(VMI_EVTCHN_SOURCE_ALARM + 0, P_ALARM0);
		vmi_evtchn_bind(VMI_EVTCHN_SOURCE_ALARM + 1, P_ALARM1);
		vmi_evtchn_set_handler(on_events);
	} else {
		if (!read_firmware()) {
			printf("FAIL: no ACPI PM timer to calibrate the TSC against\n");
			exit(1);
		}
		native_setup();
	}
	vmi_enable_interrupts();

	uint64_t pairs = cmdline_u64("pairs", 0);
	const char *vs, *ve;
	if (cmdline_find("pairs", &vs, &ve)) {
		uint64_t before = vmi_upcalls();
		for (uint64_t i = 0; i < pairs; i++) {
			vmi_disable_interrupts();
			vmi_enable_interrupts();
		}
		printf("PAIRS: %lu mask/unmask pairs, %lu upcalls\n", (unsigned long)pairs,
		       (unsigned long)(vmi_upcalls() - before));
		exit(0);
	}
	uint64_t n_bench = cmdline_u64("bench", 0);
	if (n_bench) {
		bench((unsigned)n_bench);
		exit(0);
	}
	int only_halts = cmdline_has("only=halts");
	if (!only_halts) {
		check_time();
		check_one_shot();
		check_periodic();
		check_masking();
		check_self();
	}
	check_halts((unsigned)cmdline_u64("halts", 10), (unsigned)cmdline_u64("period", 10), cmdline_has("periodic"));
	if (cmdline_has("echo"))
		echo();
	if (vmi_path)
		printf("INFO: %lu upcalls\n", (unsigned long)vmi_upcalls());
	exit(report_summary());
}
