/*
 * pc: the board is a PC a native kernel recognises. At ring 0 on the bare board (--rom none),
 * and unchanged on QEMU, it checks:
 *   - the firmware: an RSDP in 0xE0000-0xFFFFF with valid checksums, RSDT and XSDT listing
 *     the same tables, a MADT with this CPU's local APIC and an IOAPIC, a FADT with a PM timer;
 *     fw_cfg's signature, CPU count and RAM size;
 *   - the local APIC timer: one-shot never early, periodic at the programmed period (counted
 *     against the PM timer), and HLT with interrupts enabled waking on it;
 *   - the PIT's IRQ 0 through the IOAPIC (pin from the MADT's overrides) and through the PICs;
 *   - COM1 as a 16550A: scratch register, loopback through the FIFO, LSR's data-ready and
 *     overrun bits, IIR, and its IRQ 4 through the IOAPIC.
 * Deprivileged under a ROM it refuses (exit 2): it needs ring 0. Command line: `echo` reads one line from COM1 (host stdin), interrupt-driven, and prints it;
 * `sleep=MS` halts through MS of LAPIC ticks at the end; `reset=cf9|kbc|92` resets the machine
 * that way at the end; `halt` ends with cli; hlt (nothing can wake it).
 */
#include "apic.h"
#include "lib.h"
#include "vmi.h"

#define VEC_LAPIC_TIMER 0x40
#define VEC_IOAPIC_PIT  0x41
#define VEC_PIC_BASE    0x50 /* master 0x50-0x57, slave 0x58-0x5F */
#define VEC_UART        0x44

#define COM1            0x3F8
#define PM_TIMER_HZ     3579545ull
#define PIT_HZ          1193182ull
#define PERIOD_MS       10
#define TICKS           10

static uint64_t ioapic_base;
static unsigned pit_gsi, pm_port, pm_bits = 24;
static volatile unsigned lapic_ticks, ioapic_ticks, pic_ticks, uart_irqs;

/* --- firmware ---------------------------------------------------------------------- */

static void check_firmware(void)
{
	const struct acpi_rsdp *rsdp = acpi_find_rsdp();
	report(rsdp != NULL, "an RSDP with a valid checksum in 0xE0000-0xFFFFF");
	if (!rsdp)
		return;
	/* Revision 2 adds the XSDT (vmikit has one, QEMU's PC does not): checked where present. */
	int has_xsdt = rsdp->revision >= 2;
	report(!has_xsdt || !acpi_checksum(rsdp, rsdp->length), "the RSDP's extended checksum, where it has one");
	const struct acpi_sdt *rsdt = (const struct acpi_sdt *)(uintptr_t)rsdp->rsdt;
	const struct acpi_sdt *xsdt = has_xsdt ? (const struct acpi_sdt *)(uintptr_t)rsdp->xsdt : NULL;
	report(!memcmp(rsdt->sig, "RSDT", 4) && !acpi_checksum(rsdt, rsdt->length) &&
	       (!xsdt || (!memcmp(xsdt->sig, "XSDT", 4) && !acpi_checksum(xsdt, xsdt->length))),
	       "RSDT (and XSDT where there is one) with valid checksums");

	const struct acpi_sdt *madt = acpi_find_table(rsdp, "APIC", 0);
	report(madt && (!xsdt || madt == acpi_find_table(rsdp, "APIC", 1)) && !acpi_checksum(madt, madt->length),
	       "the MADT, the same through RSDT and XSDT, checksum valid");
	if (!madt)
		return;
	struct madt_info mi;
	acpi_parse_madt(madt, &mi);
	uint32_t lapic_addr = mi.lapic_addr;
	unsigned my_id = lapic_id(), cpus = mi.cpus, me = 0, ioapics = mi.ioapics;
	for (unsigned i = 0; i < cpus && i < MADT_MAX_CPUS; i++)
		me += mi.apic_ids[i] == my_id;
	ioapic_base = mi.ioapic_base;
	pit_gsi = mi.isa_irq0_gsi;
	report(lapic_addr == LAPIC_BASE && cpus == 1 && me == 1, "MADT: one enabled CPU, this one (APIC ID %u), LAPIC at 0x%x",
	       my_id, lapic_addr);
	report(ioapics == 1 && ioapic_base == 0xFEC00000, "MADT: one IOAPIC, at 0xfec00000, from GSI 0");

	const struct acpi_sdt *fadt = acpi_find_table(rsdp, "FACP", 0);
	if (fadt && !acpi_checksum(fadt, fadt->length)) {
		const uint8_t *f = (const uint8_t *)fadt;
		uint32_t flags;
		memcpy(&pm_port, f + 76, 4);
		memcpy(&flags, f + 112, 4);
		pm_bits = flags & (1u << 8) ? 32 : 24;
	}
	report(fadt && pm_port, "a FADT naming the ACPI PM timer port");

	outw(0x00, 0x510);
	char sig[5] = {0};
	for (int i = 0; i < 4; i++)
		sig[i] = (char)inb(0x511);
	outw(0x05, 0x510);
	unsigned ncpus = inb(0x511) | (unsigned)inb(0x511) << 8;
	outw(0x03, 0x510);
	uint64_t ram = 0;
	for (int i = 0; i < 8; i++)
		ram |= (uint64_t)inb(0x511) << (8 * i);
	report(!strcmp(sig, "QEMU") && ncpus == 1, "fw_cfg: signature QEMU, %u CPU", ncpus);
	report(ram >= ram_end_below_4g() && ram - ram_end_below_4g() < (2u << 20),
	       "fw_cfg: RAM size %lu MiB agrees with the memory map", (unsigned long)(ram >> 20));
}

/* --- time ---------------------------------------------------------------------------- */

static uint64_t pm_last, pm_total;

/* PM timer ticks since the first call, widened past its 24 or 32 bits. */
static uint64_t pm_now(void)
{
	uint64_t v = inl((uint16_t)pm_port), mask = (1ull << pm_bits) - 1;
	pm_total += (v - pm_last) & mask;
	pm_last = v;
	return pm_total;
}

static uint64_t pm_us(uint64_t ticks) { return ticks * 1000000ull / PM_TIMER_HZ; }

static void wait_ticks(volatile unsigned *counter, unsigned n)
{
	while (*counter < n) {
		sti();
		hlt(); /* interrupts on: the next tick wakes us */
		cli();
	}
}

/* PM-timer ticks that n periods of a timer just started take, measured from its first tick, not
 * from its programming: an edge left over from before (a PIT that was still running, its tick
 * latched while the line was masked, or reinjected by KVM) arrives at once and would count as one
 * more period. */
static uint64_t time_ticks(volatile unsigned *counter, unsigned n)
{
	*counter = 0;
	wait_ticks(counter, 1);
	uint64_t start = pm_now();
	*counter = 0;
	wait_ticks(counter, n);
	return pm_now() - start;
}

/* --- interrupt controllers ---------------------------------------------------------------- */

static void ioapic_route(unsigned pin, unsigned vector, int masked)
{
	ioapic_write(ioapic_base, 0x11 + 2 * pin, lapic_id() << 24);
	ioapic_write(ioapic_base, 0x10 + 2 * pin, vector | (masked ? LVT_MASKED : 0)); /* fixed, physical, edge, high */
}

static void pic_init(uint8_t master_mask, uint8_t slave_mask)
{
	outb(0x11, 0x20); outb(VEC_PIC_BASE, 0x21); outb(0x04, 0x21); outb(0x01, 0x21);
	outb(0x11, 0xA0); outb(VEC_PIC_BASE + 8, 0xA1); outb(0x02, 0xA1); outb(0x01, 0xA1);
	outb(master_mask, 0x21);
	outb(slave_mask, 0xA1);
}

static void pit_periodic(unsigned hz)
{
	unsigned divisor = (unsigned)(PIT_HZ / hz);
	outb(0x34, 0x43); /* channel 0, lobyte/hibyte, mode 2 (rate generator) */
	outb((uint8_t)divisor, 0x40);
	outb((uint8_t)(divisor >> 8), 0x40);
}

static void pit_stop(void)
{
	outb(0x30, 0x43); /* mode 0 with no count written: the output stays low, no more edges */
}

/* An edge the PIT left latched while the line was masked (firmware runs it) arrives the moment
 * the line is unmasked: take it before the measured ticks start. */
static void drain(volatile unsigned *counter)
{
	sti();
	for (int i = 0; i < 1000; i++)
		__asm__ __volatile__("pause");
	cli();
	*counter = 0;
}

static int on_lapic_timer(struct trap_regs *r) { (void)r; lapic_ticks++; *lapic(LAPIC_EOI) = 0; return 1; }
static int on_ioapic_pit(struct trap_regs *r) { (void)r; ioapic_ticks++; *lapic(LAPIC_EOI) = 0; return 1; }
static int on_pic_pit(struct trap_regs *r) { (void)r; pic_ticks++; outb(0x20, 0x20); return 1; }

/* The n-th tick after arming comes n periods later or after that (a busy host delays a tick,
 * and a later one can then be closer to it), never before. The 1% are the PIT's divisor rounding. */
static int period_ok(uint64_t ticks_pm, unsigned n, unsigned period_ms)
{
	uint64_t us = pm_us(ticks_pm), want = (uint64_t)n * period_ms * 1000;
	/* 5% low: the first and last ticks' wake-ups (about 1 ms apart at emulated ring 0) need not
	 * cancel; one period too many or too few is 10% of TICKS and still fails. */
	return us >= want - want / 20 && us < want + 5000000;
}

static void check_lapic_timer(void)
{
	wrmsr(MSR_APIC_BASE, rdmsr(MSR_APIC_BASE) | (1u << 11));
	*lapic(LAPIC_SVR) = 0x1FF; /* software enable, spurious vector 0xFF */
	*lapic(LAPIC_TIMER_DCR) = 0xB; /* divide by 1 */
	set_trap_hook(VEC_LAPIC_TIMER, on_lapic_timer);

	/* One shot: a count the CPU can watch go down, then one interrupt, not before its time. */
	uint32_t count = 50 * 1000 * 1000; /* 50 ms at the 1 GHz bus KVM emulates */
	*lapic(LAPIC_LVT_TIMER) = VEC_LAPIC_TIMER;
	uint64_t start = pm_now();
	*lapic(LAPIC_TIMER_ICR) = count;
	uint32_t ccr = *lapic(LAPIC_TIMER_CCR);
	report(ccr > 0 && ccr <= count, "LAPIC timer: the current count runs down from the initial count");
	sti();
	hlt(); /* woken by the timer (or an earlier interrupt: there is none here) */
	cli();
	uint64_t took = pm_now() - start;
	report(lapic_ticks == 1, "HLT with interrupts enabled wakes on the LAPIC timer");
	printf("INFO: LAPIC one-shot of 50000 us fired after %lu us\n", (unsigned long)pm_us(took));
	report(pm_us(took) >= 49000, "LAPIC one-shot timer: not before its time");

	/* Periodic: TICKS interrupts take TICKS - 1 periods from the first. */
	lapic_ticks = 0;
	*lapic(LAPIC_LVT_TIMER) = VEC_LAPIC_TIMER | LVT_PERIODIC;
	start = pm_now();
	*lapic(LAPIC_TIMER_ICR) = PERIOD_MS * 1000 * 1000;
	wait_ticks(&lapic_ticks, TICKS);
	took = pm_now() - start;
	*lapic(LAPIC_LVT_TIMER) = LVT_MASKED;
	*lapic(LAPIC_TIMER_ICR) = 0;
	printf("INFO: LAPIC periodic timer: %u periods of %u ms in %lu us\n", TICKS, PERIOD_MS, (unsigned long)pm_us(took));
	report(period_ok(took, TICKS, PERIOD_MS), "LAPIC periodic timer: ticks at the programmed period");
}

static void check_pit(void)
{
	pic_init(0xFF, 0xFF); /* both PICs masked: the IOAPIC alone delivers */
	set_trap_hook(VEC_IOAPIC_PIT, on_ioapic_pit);
	unsigned pins = ((ioapic_read(ioapic_base, 1) >> 16) & 0xFF) + 1;
	report(pins == 24, "IOAPIC: %u redirection entries", pins);
	pit_stop();
	ioapic_route(pit_gsi, VEC_IOAPIC_PIT, 0);
	drain(&ioapic_ticks);
	pit_periodic(1000 / PERIOD_MS);
	uint64_t took = time_ticks(&ioapic_ticks, TICKS);
	ioapic_route(pit_gsi, VEC_IOAPIC_PIT, 1);
	printf("INFO: PIT through the IOAPIC (GSI %u): %u periods of %u ms in %lu us\n", pit_gsi, TICKS, PERIOD_MS,
	       (unsigned long)pm_us(took));
	report(period_ok(took, TICKS, PERIOD_MS), "PIT through the IOAPIC (the MADT's GSI for IRQ 0): ticks at its period");

	/* Through the 8259: the LAPIC's LINT0 as ExtINT (virtual wire), IRQ 0 unmasked. */
	set_trap_hook(VEC_PIC_BASE, on_pic_pit);
	*lapic(LAPIC_LVT0) = LVT_EXTINT;
	pit_stop();
	pic_init(0xFE, 0xFF);
	drain(&pic_ticks);
	pit_periodic(1000 / PERIOD_MS); /* restarts the count */
	took = time_ticks(&pic_ticks, TICKS);
	pic_init(0xFF, 0xFF);
	pit_stop();
	printf("INFO: PIT through the PIC: %u periods of %u ms in %lu us\n", TICKS, PERIOD_MS, (unsigned long)pm_us(took));
	report(period_ok(took, TICKS, PERIOD_MS), "PIT through the PIC: ticks at its period");
}

/* --- COM1 --------------------------------------------------------------------------------- */

#define UART_RBR 0
#define UART_IER 1
#define UART_IIR 2
#define UART_FCR 2
#define UART_LCR 3
#define UART_MCR 4
#define UART_LSR 5
#define UART_MSR 6
#define UART_SCR 7

static int on_uart(struct trap_regs *r)
{
	(void)r;
	uart_irqs++;
	(void)inb(COM1 + UART_IIR); /* acknowledges a THR-empty cause */
	outb(0, COM1 + UART_IER); /* one interrupt is all we count */
	*lapic(LAPIC_EOI) = 0;
	return 1;
}

static void check_uart(void)
{
	outb(0x5A, COM1 + UART_SCR);
	uint8_t scr = inb(COM1 + UART_SCR);
	outb(0xA5, COM1 + UART_SCR);
	report(scr == 0x5A && inb(COM1 + UART_SCR) == 0xA5, "16550: the scratch register holds what was written");
	report((inb(COM1 + UART_LSR) & 0x60) == 0x60, "16550: LSR says transmitter empty");

	/* In loopback the transmitter is cut off from the line, so the console too: results are
	 * gathered first and reported once loopback is off again. */
	outb(0x13, COM1 + UART_MCR); /* loopback, DTR, RTS: cut off from host input, */
	outb(0x07, COM1 + UART_FCR); /* then FIFO on, both cleared */
	int fifo = (inb(COM1 + UART_IIR) & 0xC0) == 0xC0;
	int msr = (inb(COM1 + UART_MSR) & 0x30) == 0x30;
	int empty = !(inb(COM1 + UART_LSR) & 0x01);
	const char msg[] = "loopback";
	for (const char *c = msg; *c; c++)
		outb((uint8_t)*c, COM1);
	char back[sizeof(msg)] = {0};
	int ready = inb(COM1 + UART_LSR) & 0x01;
	for (unsigned i = 0; i < sizeof(msg) - 1; i++)
		back[i] = (char)inb(COM1 + UART_RBR);
	int drained = !(inb(COM1 + UART_LSR) & 0x01);
	for (int i = 0; i < 17; i++)
		outb((uint8_t)i, COM1);
	uint8_t lsr = inb(COM1 + UART_LSR);
	int cleared = !(inb(COM1 + UART_LSR) & 0x02);
	outb(0x03, COM1 + UART_MCR); /* loopback off */
	outb(0x07, COM1 + UART_FCR);
	report(fifo, "16550: IIR shows the FIFO enabled");
	report(msr, "16550: loopback wires RTS and DTR to CTS and DSR");
	report(empty, "16550: no data ready before anything is sent");
	report(ready && !strcmp(back, msg) && drained,
	       "16550: loopback returns the bytes in order through the FIFO, then no data ready");
	report((lsr & 0x03) == 0x03 && cleared, "16550: the 17th byte overruns the FIFO; reading LSR clears it");

	/* IRQ 4 through the IOAPIC: THR empty, gated by OUT2. */
	set_trap_hook(VEC_UART, on_uart);
	ioapic_route(4, VEC_UART, 0);
	outb(0x0B, COM1 + UART_MCR); /* loopback off, DTR, RTS, OUT2 */
	outb(0x02, COM1 + UART_IER); /* THR empty: pending at once */
	sti();
	for (int i = 0; i < 1000 && !uart_irqs; i++)
		__asm__ __volatile__("pause");
	cli();
	report(uart_irqs == 1, "16550: the THR-empty interrupt arrives on IRQ 4 through the IOAPIC");
	ioapic_route(4, VEC_UART, 1);
}

/* --- console input ------------------------------------------------------------------------ */

static char line[128];
static volatile unsigned line_len, line_done;

static int on_uart_rx(struct trap_regs *r)
{
	(void)r;
	while (inb(COM1 + UART_LSR) & 0x01) {
		char c = (char)inb(COM1 + UART_RBR);
		if (c == '\n')
			line_done = 1;
		else if (line_len < sizeof(line) - 1)
			line[line_len++] = c;
	}
	*lapic(LAPIC_EOI) = 0;
	return 1;
}

static void echo_line(void)
{
	set_trap_hook(VEC_UART, on_uart_rx);
	ioapic_route(4, VEC_UART, 0);
	outb(0x0B, COM1 + UART_MCR);
	outb(0x01, COM1 + UART_IER); /* data available */
	while (!line_done) {
		sti();
		hlt();
		cli();
	}
	outb(0, COM1 + UART_IER);
	printf("ECHO: %s\n", line);
}

void kmain(uint32_t magic, uint32_t mbinfo)
{
	(void)magic;
	(void)mbinfo;
	printf("vmikit pc guest\n");
	if (vmi_deprivileged()) {
		/* At ring 3 sti, cli and hlt fault, and interrupts reach the hypervisor's IDT, not ours. */
		printf("PC-SETUP failed: this guest drives the interrupt flag and devices itself; run it with --rom none "
		       "or --privilege ring0\n");
		exit(2);
	}
	check_firmware();
	if (!pm_port || !ioapic_base) {
		printf("FAIL: no PM timer or IOAPIC to go on with\n");
		exit(report_summary() | 1);
	}
	/* Whatever firmware left set up (SeaBIOS runs the PIT through the PIC at vector 8) must
	 * not reach us: both PICs remapped and masked, every IOAPIC pin masked. */
	pic_init(0xFF, 0xFF);
	for (unsigned pin = 0; pin < 24; pin++)
		ioapic_route(pin, 0xFE, 1);
	pm_now();
	check_lapic_timer();
	check_pit();
	if (cmdline_has("echo"))
		echo_line(); /* first: the loopback checks below clear the receive FIFO */
	check_uart();
	int status = report_summary();
	const char *v, *end;
	if (cmdline_find("reset", &v, &end)) {
		if (end - v == 3 && !memcmp(v, "cf9", 3))
			outb(0x06, 0xCF9);
		else if (end - v == 3 && !memcmp(v, "kbc", 3))
			outb(0xFE, 0x64);
		else if (end - v == 2 && !memcmp(v, "92", 2))
			outb(0x01, 0x92);
		printf("FAIL: still running after the reset\n");
		exit(1);
	}
	uint64_t sleep_ms = cmdline_u64("sleep", 0);
	if (sleep_ms) { /* halt through sleep_ms / PERIOD_MS LAPIC ticks: the host should idle */
		lapic_ticks = 0;
		*lapic(LAPIC_LVT_TIMER) = VEC_LAPIC_TIMER | LVT_PERIODIC;
		*lapic(LAPIC_TIMER_ICR) = PERIOD_MS * 1000 * 1000;
		wait_ticks(&lapic_ticks, (unsigned)(sleep_ms / PERIOD_MS));
		*lapic(LAPIC_LVT_TIMER) = LVT_MASKED;
		printf("SLEPT: %lu ms in %u ticks\n", (unsigned long)sleep_ms, lapic_ticks);
	}
	if (cmdline_has("halt")) {
		cli();
		hlt();
	}
	exit(status);
}
