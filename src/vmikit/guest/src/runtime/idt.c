/*
 * Interrupt descriptor table.  A vector is fatal unless a guest hooked it
 * (set_trap_hook): the handler prints one line, hands a register frame to the
 * VMM through the panic port and exits with EXIT_EXCEPTION.
 *
 * The same stubs serve a kernel at ring 0 and one the hypervisor deprivileged
 * to ring 3 (docs/execution-model.md): there the hypervisor delivers each
 * exception to the gate installed here, with the frame the CPU would push.
 */
#include "apic.h"
#include "lib.h"
#include "vmi.h"

#define IDT_ENTRIES   256
#define STUB_SIZE     16     /* idt_stubs.S aligns each stub to 16 bytes */
#define SEL_CODE64    0x08   /* boot.S GDT */
#define GATE_INT64    0x8E   /* present, DPL 0, 64-bit interrupt gate (IF cleared) */

struct idt_gate {
	uint16_t offset_low;
	uint16_t selector;
	uint8_t ist;
	uint8_t type_attr;
	uint16_t offset_mid;
	uint32_t offset_high;
	uint32_t reserved;
} __attribute__((packed));
_Static_assert(sizeof(struct idt_gate) == 16, "long-mode IDT gate is 16 bytes");

void exception_handler(struct trap_regs *r);

extern char idt_stubs[];
static struct idt_gate idt[IDT_ENTRIES] __attribute__((aligned(16)));

/* Static, so its physical address (== virtual, identity map) is stable. */
static struct exception_frame panic_frame;
static volatile int in_handler;
static trap_hook_t hooks[IDT_ENTRIES];
/* Vectors whose hook is an interrupt from the local APIC: EOI after the hook (set_irq_hook). */
static uint32_t eoi_after[IDT_ENTRIES / 32];

void set_trap_hook(unsigned vector, trap_hook_t hook)
{
	if (vector < IDT_ENTRIES) {
		hooks[vector] = hook;
		eoi_after[vector / 32] &= ~(1u << (vector % 32));
	}
}

void set_irq_hook(unsigned vector, trap_hook_t hook)
{
	if (vector < 32 || vector >= IDT_ENTRIES)
		return; /* 0-31 are exceptions: no EOI for them */
	hooks[vector] = hook;
	if (hook)
		eoi_after[vector / 32] |= 1u << (vector % 32);
	else
		eoi_after[vector / 32] &= ~(1u << (vector % 32));
}

uint64_t trap_cr2(void) { return vmi_get_cr2(); }

static const char *const exception_names[32] = {
	"#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM",
	"#DF", "CSO", "#TS", "#NP", "#SS", "#GP", "#PF", "reserved",
	"#MF", "#AC", "#MC", "#XM", "#VE", "#CP", "reserved", "reserved",
	"reserved", "reserved", "reserved", "reserved", "#HV", "#VC", "#SX", "reserved",
};

const char *exception_name(unsigned vector)
{
	return vector < 32 ? exception_names[vector] : "interrupt";
}

void idt_load(void)
{
	struct descriptor_ptr p = { .limit = sizeof(idt) - 1, .base = (uintptr_t)idt };
	lidt(&p);
}

void idt_fill(void)
{
	for (unsigned v = 0; v < IDT_ENTRIES; v++) {
		uint64_t addr = (uintptr_t)idt_stubs + (uint64_t)v * STUB_SIZE;
		idt[v] = (struct idt_gate){
			.offset_low = (uint16_t)addr,
			.selector = SEL_CODE64,
			.type_attr = GATE_INT64,
			.offset_mid = (uint16_t)(addr >> 16),
			.offset_high = (uint32_t)(addr >> 32),
		};
	}
}

void exception_handler(struct trap_regs *r)
{
	trap_hook_t hook = r->vector < IDT_ENTRIES ? hooks[r->vector] : NULL;
	if (hook && hook(r)) {
		/* The in-service bit stays set (blocking this and lower priorities) until EOI. */
		if (eoi_after[r->vector / 32] & (1u << (r->vector % 32)))
			lapic_eoi();
		return; /* idt_stubs.S resumes the context from *r */
	}
	/* A fault while reporting a fault: skip the printing, just get out. */
	if (in_handler)
		exit(EXIT_EXCEPTION);
	in_handler = 1;

	struct exception_frame *f = &panic_frame;
	*f = (struct exception_frame){
		.vector = r->vector, .error_code = r->error_code,
		.rip = r->rip, .cs = r->cs, .rflags = r->rflags, .rsp = r->rsp, .ss = r->ss,
		.rax = r->rax, .rbx = r->rbx, .rcx = r->rcx, .rdx = r->rdx,
		.rsi = r->rsi, .rdi = r->rdi, .rbp = r->rbp,
		.r8 = r->r8, .r9 = r->r9, .r10 = r->r10, .r11 = r->r11,
		.r12 = r->r12, .r13 = r->r13, .r14 = r->r14, .r15 = r->r15,
		/* Through the VMI layer: a deprivileged kernel cannot read CR2/CR3 itself. */
		.cr2 = vmi_get_cr2(), .cr3 = vmi_get_cr3(),
	};

	printf("EXCEPTION: vector %lu (%s) error 0x%lx at rip 0x%lx",
	       (unsigned long)f->vector, exception_name((unsigned)f->vector),
	       (unsigned long)f->error_code, (unsigned long)f->rip);
	if (f->vector == 14)
		printf(" cr2 0x%lx", (unsigned long)f->cr2);
	console_putc('\n');

	outl((uint32_t)(uintptr_t)f, PORT_PANIC);
	exit(EXIT_EXCEPTION);
}
