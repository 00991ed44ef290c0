/*
 * conformance: every call in the VMI spec through the guest VMI layer.
 *
 * The PASS lines read the same with a full ROM, a minimal ROM, no ROM (bare
 * KVM) and on QEMU: what differs between those is printed on INFO: lines.
 * Checks that only make sense with a ROM (malformed call IDs) print INFO:
 * when they hold and FAIL: when they do not.  Reboot and RDPMC are covered
 * only through Query.QueryCall (this hypervisor does not implement them).
 *
 * A kernel the hypervisor deprivileged (vmi_deprivileged(): it runs at ring 3,
 * docs/execution-model.md) cannot execute the native instruction a check
 * compares a call against (mov from CRn, rdmsr, sgdt, str, pushf's IF ...):
 * there each check compares against another witness that can fail -- the value
 * the guest itself set, a fact of the running CPU (long mode, its own page
 * tables, the runtime's IDT), a fault taken on purpose, or the shared page --
 * and prints the same line.
 */
#include "lib.h"
#include "paging.h"
#include "vmi.h"

#define MSR_KERNEL_GS_BASE 0xC0000102u
#define RFLAGS_IF          (1ul << 9)
#define CR0_TS             (1ul << 3)
#define DR7_FIXED          0x400ul        /* DR7 bit 10 reads as 1; bits 0-7 enable breakpoints */
#define PTE_TABLE          NONLEAF        /* present | writable | user | accessed (docs/paging.md rules) */
#define PTE_LEAF           LEAF_RW        /* ... | dirty: the hardware never writes a table */
#define TEST_VA            0x10000000000ul /* 1 TiB: PML4 slot 2, unmapped at boot */
#define SEL_TSS            0x18
#define SEL_LDT            0x28
#define SEL_LDT_DATA       0x0C           /* LDT index 1, TI = 1, RPL 0 */
#define DATA_DESCRIPTOR    0x00CF92000000FFFFul
#define LDT_ENTRIES        4

static int rom;
static int depriv; /* the kernel runs at ring 3: no privileged instruction (each raises #GP) */

/* A check that needs a ROM: INFO: when it holds, FAIL: otherwise (PASS lines stay mode-independent). */
static void rom_check(int ok, const char *what)
{
	if (ok)
		printf("INFO: %s\n", what);
	else
		report(0, "%s", what);
}

static inline uint64_t rflags(void)
{
	uint64_t f;
	__asm__ __volatile__("pushfq; popq %0" : "=r"(f) : : "memory");
	return f;
}

/* The interrupt flag the kernel runs with: RFLAGS.IF natively; deprivileged, the hardware IF is
 * the hypervisor's and the kernel's own is the shared page's virtual flag. */
static int if_set(void)
{
#ifdef VMI_SHARED_SIZE
	if (depriv) {
		volatile struct vmi_shared *sp = vmi_shared_page();
		return sp && sp->vif != 0;
	}
#endif
	return (rflags() & RFLAGS_IF) != 0;
}

static uint64_t cr0_now(void) { return depriv ? vmi_get_cr0() : read_cr0(); }
static uint64_t cr3_now(void) { return depriv ? vmi_get_cr3() : read_cr3(); }

/* A #PF taken on purpose: pf_probe(va) loads from va; the hook records CR2 and resumes after it. */
uint64_t pf_probe(uint64_t va);
extern char pf_probe_resume[];
__asm__(".text\n.globl pf_probe\npf_probe:\n\tmovq (%rdi), %rax\n"
	".globl pf_probe_resume\npf_probe_resume:\n\tret\n");
static volatile uint64_t pf_cr2, pf_count;

static int pf_hook(struct trap_regs *r)
{
	if (r->rip != (uintptr_t)pf_probe)
		return 0; /* any other #PF is a real one: fatal */
	pf_cr2 = trap_cr2();
	pf_count++;
	r->rip = (uintptr_t)pf_probe_resume;
	return 1;
}

/* Whether a #PF at `va` reaches the guest's handler with CR2 = va (trap_cr2, GetCR2 and, when
 * deprivileged, the shared page all saying so). */
static int fault_sets_cr2(uint64_t va)
{
	uint64_t before = pf_count;
	set_trap_hook(14, pf_hook);
	pf_probe(va);
	set_trap_hook(14, NULL);
	int ok = pf_count == before + 1 && pf_cr2 == va && vmi_get_cr2() == va;
#ifdef VMI_SHARED_SIZE
	volatile struct vmi_shared *sp = vmi_shared_page();
	ok &= !depriv || (sp && sp->cr2 == va);
#endif
	return ok;
}

/* Every call ID in the spec, in order. */
static const struct {
	uint32_t family, ncalls;
} families[] = {
	{ VMI_FAMILY_CPU, VMI_FAMILY_CPU_NCALLS },
	{ VMI_FAMILY_SEGMENTATION, VMI_FAMILY_SEGMENTATION_NCALLS },
	{ VMI_FAMILY_MMU, VMI_FAMILY_MMU_NCALLS },
	{ VMI_FAMILY_QUERY, VMI_FAMILY_QUERY_NCALLS },
#ifdef VMI_FAMILY_EVENTCHANNEL
	{ VMI_FAMILY_EVENTCHANNEL, VMI_FAMILY_EVENTCHANNEL_NCALLS },
#endif
#ifdef VMI_FAMILY_TIME
	{ VMI_FAMILY_TIME, VMI_FAMILY_TIME_NCALLS },
#endif
};

#define FOR_EACH_CALL(id)                                                      \
	for (unsigned f_ = 0; f_ < ARRAY_SIZE(families); f_++)                 \
		for (uint32_t c_ = 0, id; c_ < families[f_].ncalls &&          \
			 ((id = VMI_CALLID(families[f_].family, c_, 0)), 1); c_++)

static int unimplemented(uint32_t id) { return id == VMI_CALL_CPU_REBOOT || id == VMI_CALL_CPU_RDPMC; }

static void describe_mode(void)
{
	printf("INFO: built with VMI %u.%u (0x%08x)\n", VMI_VERSION_MAJOR, VMI_VERSION_MINOR, VMI_VERSION);
	if (!rom) {
		printf("INFO: no rom\n");
		return;
	}
	uint32_t v = vmi_rom_version(), through = 0;
	printf("INFO: rom present at 0x%lx, version %u.%u, %u entries, flags 0x%x\n",
	       (unsigned long)vmi_rom_base(), v >> 16, v & 0xFFFF, vmi_rom_entries(), vmi_rom_flags());
	console_write("INFO: native fallback for:");
	FOR_EACH_CALL(id) {
		if (vmi_entry(id))
			through++;
		else
			printf(" 0x%08x", id);
	}
	printf("%s\n", through == VMI_CALL_COUNT ? " none" : "");
	printf("INFO: %u of %u calls through the rom; queued SetPTE entry %s\n", through, VMI_CALL_COUNT,
	       vmi_entry(VMI_CALL_MMU_SETPTE | VMI_ANN_QUEUE) != vmi_entry(VMI_CALL_MMU_SETPTE) ? "specialised" : "shared");
}

/* --- CPU -------------------------------------------------------------------- */

static void test_cpu_ids(void)
{
	uint32_t v[4];
	long s = vmi_cpuid(0, 0, v);
	struct cpuid_result n = cpuid(0, 0);
	report(s == 0 && v[0] == n.eax && v[1] == n.ebx && v[2] == n.ecx && v[3] == n.edx,
	       "CPU.CPUID leaf 0 agrees with the cpuid instruction");
	s = vmi_cpuid(1, 0, v);
	report(s == 0 && v[0] == cpuid(1, 0).eax, "CPU.CPUID leaf 1 EAX agrees with the cpuid instruction");

	uint64_t a = vmi_rdtsc(), native = rdtsc(), b = vmi_rdtsc();
	report(a <= native && native <= b && a < b, "CPU.RDTSC is monotonic and brackets the rdtsc instruction");
}

static void test_msrs(void)
{
	uint64_t efer = 0, back = 0, value = 0x00007F0012345000ul, old = 0;
	if (depriv)
		vmi_rdmsr(MSR_KERNEL_GS_BASE, &old);
	else
		old = rdmsr(MSR_KERNEL_GS_BASE);
	long s = vmi_rdmsr(MSR_EFER, &efer);
	/* Deprivileged: the CPU runs this code in long mode, so EFER has LME and LMA. */
	report(s == 0 && (depriv ? (efer & (EFER_LME | EFER_LMA)) == (EFER_LME | EFER_LMA) : efer == rdmsr(MSR_EFER)),
	       "CPU.RDMSR of EFER agrees with rdmsr");
	long w = vmi_wrmsr(MSR_KERNEL_GS_BASE, value);
	s = vmi_rdmsr(MSR_KERNEL_GS_BASE, &back);
	int agrees;
	if (depriv) {
		/* A second value the guest sets, then the old one back: the reads follow each write. */
		uint64_t value2 = value ^ 0x0000001000001000ul, back2 = 0, back3 = ~old;
		long w2 = vmi_wrmsr(MSR_KERNEL_GS_BASE, value2), s2 = vmi_rdmsr(MSR_KERNEL_GS_BASE, &back2);
		long w3 = vmi_wrmsr(MSR_KERNEL_GS_BASE, old), s3 = vmi_rdmsr(MSR_KERNEL_GS_BASE, &back3);
		agrees = w2 == 0 && s2 == 0 && back2 == value2 && w3 == 0 && s3 == 0 && back3 == old;
	} else {
		agrees = rdmsr(MSR_KERNEL_GS_BASE) == value;
	}
	report(w == 0 && s == 0 && back == value && agrees,
	       "CPU.WRMSR/RDMSR of KERNEL_GS_BASE round-trips and rdmsr agrees");
	vmi_wrmsr(MSR_KERNEL_GS_BASE, old);
}

/* Deprivileged, the control registers are the hypervisor's: GetCRn is checked against what the
 * running CPU must have (paged long mode, tables that map this very code and data), and after each
 * SetCRn against the value the guest set. */
static void test_control_registers(void)
{
	static const uint64_t marker = 0x4352334d41524b00ul; /* an object of the kernel image */
	if (depriv) {
		uint64_t cr0 = vmi_get_cr0(), cr3 = vmi_get_cr3(), cr4 = vmi_get_cr4();
		report((cr0 & (CR0_PE | CR0_PG)) == (CR0_PE | CR0_PG) && vmi_get_cr0() == cr0,
		       "CPU.GetCR0 agrees with mov from CR0");
		report(pt_translates(cr3, (uintptr_t)&marker, (uintptr_t)&marker) &&
			       pt_translates(cr3, (uintptr_t)test_control_registers, (uintptr_t)test_control_registers) &&
			       vmi_get_cr3() == cr3,
		       "CPU.GetCR3 agrees with mov from CR3");
		report((cr4 & CR4_PAE) && vmi_get_cr4() == cr4, "CPU.GetCR4 agrees with mov from CR4");

		long s = vmi_set_cr0(cr0 | CR0_TS);
		report(s == 0 && vmi_get_cr0() == (cr0 | CR0_TS), "CPU.SetCR0 sets CR0.TS (GetCR0 and mov agree)");
		s = vmi_clts();
		report(s == 0 && vmi_get_cr0() == (cr0 & ~CR0_TS), "CPU.CLTS clears CR0.TS (GetCR0 and mov agree)");
		if (cr0 & CR0_TS)
			vmi_set_cr0(cr0);

		s = vmi_set_cr4(cr4);
		report(s == 0 && vmi_get_cr4() == cr4, "CPU.SetCR4 with the current value keeps it");

		/* CR2: set, read back, then a #PF on purpose must replace it with the faulting address. */
		uint64_t old2 = vmi_get_cr2(), v2 = 0x0000123456789000ul;
		s = vmi_set_cr2(v2);
		int round = s == 0 && vmi_get_cr2() == v2;
		report(round && fault_sets_cr2(TEST_VA + 0x5008), "CPU.SetCR2/GetCR2 round-trip and mov from CR2 agrees");
		vmi_set_cr2(old2);

		s = vmi_set_cr3(cr3);
		report(s == 0 && vmi_get_cr3() == cr3 && pt_translates(vmi_get_cr3(), (uintptr_t)&marker, (uintptr_t)&marker),
		       "CPU.SetCR3 with the current root keeps running");
		return;
	}

	uint64_t cr0 = read_cr0(), cr3 = read_cr3(), cr4 = read_cr4();
	report(vmi_get_cr0() == cr0, "CPU.GetCR0 agrees with mov from CR0");
	report(vmi_get_cr3() == cr3, "CPU.GetCR3 agrees with mov from CR3");
	report(vmi_get_cr4() == cr4, "CPU.GetCR4 agrees with mov from CR4");

	long s = vmi_set_cr0(cr0 | CR0_TS);
	report(s == 0 && (vmi_get_cr0() & CR0_TS) && (read_cr0() & CR0_TS), "CPU.SetCR0 sets CR0.TS (GetCR0 and mov agree)");
	s = vmi_clts();
	report(s == 0 && !(vmi_get_cr0() & CR0_TS) && read_cr0() == cr0, "CPU.CLTS clears CR0.TS (GetCR0 and mov agree)");

	s = vmi_set_cr4(cr4);
	report(s == 0 && vmi_get_cr4() == cr4 && read_cr4() == cr4, "CPU.SetCR4 with the current value keeps it");

	uint64_t old2 = read_cr2(), v2 = 0x0000123456789000ul;
	s = vmi_set_cr2(v2);
	report(s == 0 && vmi_get_cr2() == v2 && read_cr2() == v2, "CPU.SetCR2/GetCR2 round-trip and mov from CR2 agrees");
	vmi_set_cr2(old2);

	s = vmi_set_cr3(cr3);
	report(s == 0 && vmi_get_cr3() == cr3 && read_cr3() == cr3, "CPU.SetCR3 with the current root keeps running");
}

static void test_debug_registers(void)
{
	uint64_t value = 0x0000000000401000ul, back = 0, dr7 = 0;
	long s = vmi_set_dr(0, value), g = vmi_get_dr(0, &back);
	int agrees;
	if (depriv) { /* a second value the guest sets is the one read back */
		uint64_t value2 = 0x0000000000402000ul, back2 = 0;
		agrees = vmi_set_dr(0, value2) == 0 && vmi_get_dr(0, &back2) == 0 && back2 == value2;
	} else {
		uint64_t native;
		__asm__ __volatile__("mov %%dr0, %0" : "=r"(native));
		agrees = native == value;
	}
	report(s == 0 && g == 0 && back == value && agrees, "CPU.SetDR/GetDR of DR0 round-trip and mov agrees");
	g = vmi_get_dr(7, &dr7);
	if (depriv) { /* the guest never enabled a breakpoint: bits 0-7 clear, bit 10 reads as 1 */
		agrees = (dr7 & (DR7_FIXED | 0xFF)) == DR7_FIXED;
	} else {
		uint64_t native7;
		__asm__ __volatile__("mov %%dr7, %0" : "=r"(native7));
		agrees = dr7 == native7;
	}
	report(g == 0 && agrees, "CPU.GetDR of DR7 agrees with mov");
	vmi_set_dr(0, 0);
	uint64_t junk = 0;
	report(vmi_get_dr(4, &junk) == VMI_ERR_INVALID_ARGUMENT && vmi_set_dr(8, 0) == VMI_ERR_INVALID_ARGUMENT,
	       "CPU.GetDR/SetDR refuse DR4 and DR8 with INVALID_ARGUMENT");
}

static void test_misc_cpu(void)
{
	report(vmi_wbinvd() == 0, "CPU.WBINVD succeeds");
	report(vmi_io_delay() == 0, "CPU.IODelay succeeds");
	report(!if_set() && vmi_halt() == 0, "CPU.Halt with interrupts disabled returns");
}

static void test_interrupt_mask(void)
{
	/* QEMU's BIOS leaves the PIT unmasked at vector 8; mask the PICs before IF is ever set. */
	outb(0xFF, 0x21);
	outb(0xFF, 0xA1);
	int off0 = !(vmi_get_interrupt_mask() & RFLAGS_IF) && !if_set();
	long s1 = vmi_enable_interrupts();
	int on1 = (vmi_get_interrupt_mask() & RFLAGS_IF) && if_set();
	long s2 = vmi_disable_interrupts();
	int off1 = !(vmi_get_interrupt_mask() & RFLAGS_IF) && !if_set();
	report(off0 && s1 == 0 && on1 && s2 == 0 && off1,
	       "CPU.EnableInterrupts/DisableInterrupts set and clear IF (GetInterruptMask and pushf agree)");
	long s3 = vmi_set_interrupt_mask(RFLAGS_IF);
	int on2 = if_set();
	long s4 = vmi_set_interrupt_mask(0);
	int off2 = !if_set();
	report(s3 == 0 && on2 && s4 == 0 && off2, "CPU.SetInterruptMask restores IF from bit 9");
}

/* --- Segmentation --------------------------------------------------------------- */

static uint64_t system_low(uint64_t base, uint32_t limit, uint32_t type)
{
	return (limit & 0xFFFFul) | (base & 0xFFFFFFul) << 16 | (0x80ul | type) << 40 |
	       (uint64_t)((limit >> 16) & 0xF) << 48 | ((base >> 24) & 0xFF) << 56;
}

/* #UD handler: count, step over the 2-byte ud2, return.  (Not int3: on this AMD nested-KVM host
 * KVM intercepts INT3 and cannot emulate its delivery in long mode -- an internal error.) */
volatile uint64_t ud_count;
extern char ud_stub[];
__asm__(".text\n.globl ud_stub\nud_stub:\n\tlock incq ud_count(%rip)\n\taddq $2, (%rsp)\n\tiretq\n");

/* The GDT/IDT the kernel loaded: sgdt/sidt natively; deprivileged those name the hypervisor's
 * tables, and the guest's own are virtual state that GetGDT/GetIDT answer. */
static struct descriptor_ptr own_table(int idt)
{
	if (!depriv)
		return idt ? sidt() : sgdt();
	uint64_t base = 0;
	uint32_t limit = 0;
	if ((idt ? vmi_get_idt(&base, &limit) : vmi_get_gdt(&base, &limit)) != 0)
		return (struct descriptor_ptr){ 0, 0 };
	return (struct descriptor_ptr){ .limit = (uint16_t)limit, .base = base };
}

/* Whether `t` is the runtime's IDT (idt.c): 256 gates, gate v to the stub at idt_stubs + 16 v. */
extern char idt_stubs[];
static int is_runtime_idt(struct descriptor_ptr t)
{
	if (t.limit != 256 * 16 - 1 || !t.base)
		return 0;
	static const unsigned vectors[] = { 0, 13, 14, 255 };
	for (unsigned i = 0; i < ARRAY_SIZE(vectors); i++) {
		const volatile uint64_t *g = (const volatile uint64_t *)(uintptr_t)(t.base + vectors[i] * 16ul);
		uint64_t handler = (g[0] & 0xFFFF) | ((g[0] >> 48) & 0xFFFF) << 16 | (g[1] & 0xFFFFFFFF) << 32;
		if (handler != (uintptr_t)idt_stubs + vectors[i] * 16ul || !(g[0] >> 47 & 1))
			return 0;
	}
	return 1;
}

/* Whether `d` (8 bytes each) starts as boot.S's GDT: null, 64-bit code, flat data (accessed bits aside). */
static int is_boot_gdt(const uint64_t *d, unsigned limit)
{
	const uint64_t accessed = 1ul << 40;
	return limit >= 3 * 8 - 1 && d[0] == 0 && (d[1] & ~accessed) == 0x00AF9A000000FFFFul &&
	       (d[2] & ~accessed) == 0x00CF92000000FFFFul;
}

static void test_segmentation(void)
{
	struct descriptor_ptr boot = own_table(0);
	uint64_t *gdt = alloc_page(), *ldt = alloc_page();
	uint8_t *tss = alloc_page();
	if (!gdt || !ldt || !tss) {
		report(0, "Segmentation: pages for a fresh GDT, TSS and LDT");
		return;
	}
	memcpy(gdt, (const void *)(uintptr_t)boot.base, boot.limit + 1u);

	uint64_t base = 0;
	uint32_t limit = 0;
	long s = vmi_set_gdt((uintptr_t)gdt, 8 * 8 - 1);
	long g = vmi_get_gdt(&base, &limit);
	int agrees;
	if (depriv) { /* GetGDT named boot.S's table before: its copy is in the fresh page */
		agrees = is_boot_gdt(gdt, boot.limit);
	} else {
		struct descriptor_ptr now = sgdt();
		agrees = now.base == base && now.limit == limit;
	}
	report(s == 0 && g == 0 && base == (uintptr_t)gdt && limit == 63 && agrees,
	       "Segmentation.SetGDT/GetGDT load a fresh GDT and sgdt agrees");

	uint64_t tss_low = system_low((uintptr_t)tss, 0x67, 0x9), tss_high = (uintptr_t)tss >> 32;
	uint64_t ldt_low = system_low((uintptr_t)ldt, LDT_ENTRIES * 8 - 1, 0x2), ldt_high = (uintptr_t)ldt >> 32;
	long w1 = vmi_write_gdt_entry(SEL_TSS >> 3, tss_low, tss_high);
	long w2 = vmi_write_gdt_entry(SEL_LDT >> 3, ldt_low, ldt_high);
	long w3 = vmi_write_gdt_entry(7, DATA_DESCRIPTOR, 0);
	report(w1 == 0 && w2 == 0 && w3 == 0 && gdt[3] == tss_low && gdt[4] == tss_high && gdt[5] == ldt_low &&
		       gdt[6] == ldt_high && gdt[7] == DATA_DESCRIPTOR,
	       "Segmentation.WriteGDTEntry writes 16-byte system and 8-byte data descriptors");

	s = vmi_set_tr(SEL_TSS);
	uint16_t tr = SEL_TSS; /* deprivileged, str names the hypervisor's TSS: GetTR and the busy bit tell */
	if (!depriv)
		__asm__ __volatile__("str %0" : "=r"(tr));
	report(s == 0 && vmi_get_tr() == SEL_TSS && tr == SEL_TSS && ((gdt[3] >> 40) & 0xF) == 0xB,
	       "Segmentation.SetTR/GetTR load the TSS, str agrees and the descriptor is busy");

	uint64_t stack = (uintptr_t)alloc_page() + PAGE_SIZE, rsp0 = 0;
	s = vmi_update_kernel_stack(stack);
	memcpy(&rsp0, tss + 4, sizeof(rsp0));
	report(s == 0 && rsp0 == stack, "Segmentation.UpdateKernelStack sets TSS.rsp0");

	s = vmi_set_ldt(SEL_LDT);
	uint16_t ldtr = SEL_LDT; /* deprivileged, sldt names the hypervisor's LDT: the selector load below tells */
	if (!depriv)
		__asm__ __volatile__("sldt %0" : "=r"(ldtr));
	report(s == 0 && vmi_get_ldt() == SEL_LDT && ldtr == SEL_LDT, "Segmentation.SetLDT/GetLDT load the LDT and sldt agrees");

	s = vmi_write_ldt_entry(1, DATA_DESCRIPTOR, 0);
	if (depriv) {
		/* At ring 3 on kvm_pvm a segment load uses the host's descriptor tables (a guest LDT
		 * selector reads back as 0), so no LDT selector can be loaded: the witness is that both
		 * writes land in the page the virtual LDTR names, each at the index it was given. */
		long s2 = vmi_write_ldt_entry(2, DATA_DESCRIPTOR | 1ul << 40, 0);
		report(s == 0 && s2 == 0 && ldt[1] == DATA_DESCRIPTOR && ldt[2] == (DATA_DESCRIPTOR | 1ul << 40) &&
			       vmi_get_ldt() == SEL_LDT,
		       "Segmentation.WriteLDTEntry writes the loaded LDT and its selector loads");
	} else {
		uint16_t fs = 0, old_fs;
		__asm__ __volatile__("movw %%fs, %0" : "=r"(old_fs));
		if (s == 0 && ldt[1] == DATA_DESCRIPTOR) {
			__asm__ __volatile__("movw %1, %%fs; movw %%fs, %0; movw %2, %%fs"
					     : "=r"(fs) : "r"((uint16_t)SEL_LDT_DATA), "r"(old_fs) : "memory");
		}
		report(fs == SEL_LDT_DATA, "Segmentation.WriteLDTEntry writes the loaded LDT and its selector loads");
	}

	struct descriptor_ptr idt = own_table(1);
	s = vmi_set_idt(idt.base, idt.limit);
	g = vmi_get_idt(&base, &limit);
	if (depriv) { /* the table GetIDT names is the runtime's: its gates lead to idt_stubs */
		agrees = is_runtime_idt(idt);
	} else {
		struct descriptor_ptr now = sidt();
		agrees = now.base == idt.base && now.limit == idt.limit;
	}
	report(s == 0 && g == 0 && base == idt.base && limit == idt.limit && agrees,
	       "Segmentation.SetIDT/GetIDT with the current IDT and sidt agrees");

	volatile uint64_t *gate = (volatile uint64_t *)(uintptr_t)(idt.base + 6 * 16);
	uint64_t old_low = gate[0], old_high = gate[1], addr = (uintptr_t)ud_stub;
	uint64_t low = (addr & 0xFFFF) | 0x08ul << 16 | 0x8Eul << 40 | ((addr >> 16) & 0xFFFF) << 48;
	s = vmi_write_idt_entry(6, low, addr >> 32);
	uint64_t before = ud_count;
	if (s == 0 && gate[0] == low)
		__asm__ __volatile__("ud2" ::: "memory");
	report(s == 0 && ud_count == before + 1, "Segmentation.WriteIDTEntry installs a #UD handler that runs");
	s = vmi_write_idt_entry(6, old_low, old_high);
	report(s == 0 && gate[0] == old_low && gate[1] == old_high, "Segmentation.WriteIDTEntry restores the original gate");
}

/* --- MMU -------------------------------------------------------------------------- */

#define PHYS(p) ((uint64_t)(uintptr_t)(p))

static void test_mmu(void)
{
	uint64_t *pml4 = (uint64_t *)(uintptr_t)(cr3_now() & ~0xFFFul);
	/* Tables come from the page-table pool, fresh (zero) and registered before use. */
	uint64_t *pdpt = alloc_pt_page(), *pd = alloc_pt_page(), *pt = alloc_pt_page();
	uint64_t *p1 = alloc_page(), *p2 = alloc_page();
	volatile uint64_t *va = (volatile uint64_t *)TEST_VA;
	const unsigned slot = (TEST_VA >> 39) & 0x1FF;

	if (!pdpt || !pd || !pt || !p1 || !p2 || pml4[slot]) {
		report(0, "MMU: fresh pages and a free PML4 slot for the test mapping");
		return;
	}
	p1[0] = 0x1111, p2[0] = 0x2222;

	long a = vmi_allocate_page(PHYS(pt), VMI_LEVEL_PT) | vmi_allocate_page(PHYS(pd), VMI_LEVEL_PD) |
		 vmi_allocate_page(PHYS(pdpt), VMI_LEVEL_PDPT);
	report(a == 0, "MMU.AllocatePage registers fresh PT, PD and PDPT pages");

	long s = vmi_set_pte(&pt[0], PHYS(p1) | PTE_LEAF) | vmi_set_long_pte(&pd[0], PHYS(pt) | PTE_TABLE) |
		 vmi_set_pte(&pdpt[0], PHYS(pd) | PTE_TABLE) | vmi_set_long_pte(&pml4[slot], PHYS(pdpt) | PTE_TABLE);
	report(s == 0 && pt[0] == (PHYS(p1) | PTE_LEAF) && pd[0] == (PHYS(pt) | PTE_TABLE) &&
		       pdpt[0] == (PHYS(pd) | PTE_TABLE) && pml4[slot] == (PHYS(pdpt) | PTE_TABLE),
	       "MMU.SetPTE and MMU.SetLongPTE link a new PT, PD and PDPT into the live PML4");

	s = vmi_flush_tlb(VMI_FLUSH_TLB);
	va[1] = 0xFEEDFACE;
	report(s == 0 && va[0] == 0x1111 && p1[1] == 0xFEEDFACE,
	       "MMU.FlushTLB: a write through the new mapping lands in the physical page");

	s = vmi_set_pte_queued(&pt[0], PHYS(p2) | PTE_LEAF);
	long i = vmi_inval_page(TEST_VA);
	report(s == 0 && i == 0 && va[0] == 0x2222, "MMU.SetPTE|queue then MMU.InvalPage: the new mapping is used at once");

	s = vmi_set_long_pte_queued(&pt[0], PHYS(p1) | PTE_LEAF);
	long f = vmi_flush_tlb(VMI_FLUSH_TLB | VMI_FLUSH_GLOBAL);
	report(s == 0 && f == 0 && va[0] == 0x1111,
	       "MMU.SetLongPTE|queue then MMU.FlushTLB(global): the new mapping is used at once");

	s = vmi_set_pte_queued(&pt[1], PHYS(p2) | PTE_LEAF);
	int deferred = pt[1] != (PHYS(p2) | PTE_LEAF);
	long q = vmi_flush_queue();
	report(s == 0 && q == 0 && pt[1] == (PHYS(p2) | PTE_LEAF), "MMU.FlushQueue completes a queued SetPTE");
	printf("INFO: a queued SetPTE was %s\n", deferred ? "deferred until MMU.FlushQueue" : "applied at once");
	report(deferred == !!(vmi_rom_flags() & 1), "a queued SetPTE is deferred exactly when the ROM honours annotations");

	/* More than one batch: the ROM must complete a full buffer on its own. */
	const unsigned n = VMI_BATCH_MAX_ENTRIES + 8;
	s = 0;
	for (unsigned k = 0; k < n; k++)
		s |= vmi_set_pte_queued(&pt[2 + k], PHYS(p1) | PTE_LEAF);
	q = vmi_flush_queue();
	int all = 1;
	for (unsigned k = 0; k < n; k++)
		all &= pt[2 + k] == (PHYS(p1) | PTE_LEAF);
	s |= vmi_flush_tlb(VMI_FLUSH_TLB);
	report(s == 0 && q == 0 && all && va[(2 * PAGE_SIZE) / 8] == 0x1111,
	       "MMU.SetPTE|queue beyond one batch (VMI_BATCH_MAX_ENTRIES + 8 entries) all land");

	s = vmi_set_pte(&pml4[slot], 0) | vmi_flush_tlb(VMI_FLUSH_TLB);
	long r = vmi_release_page(PHYS(pdpt)) | vmi_release_page(PHYS(pd)) | vmi_release_page(PHYS(pt));
	report(s == 0 && r == 0 && pml4[slot] == 0, "MMU.ReleasePage unregisters the tables once unlinked");
}

/* --- Query ------------------------------------------------------------------------- */

static void test_query(void)
{
	uint32_t version = 0;
	long s = vmi_get_version(&version);
	report(rom ? s == 0 && version == VMI_VERSION && version == vmi_rom_version() : s == VMI_ERR_NOT_SUPPORTED,
	       "Query.GetVersion answers VMI_VERSION (NOT_SUPPORTED without a ROM)");

	int ok = 1;
	uint64_t present = 0;
	for (uint32_t family = VMI_FAMILY_CPU; family <= VMI_FAMILY_QUERY; family++) {
		s = vmi_has_family(family, &present);
		ok &= rom ? s == 0 && present == 1 : s == VMI_ERR_NOT_SUPPORTED;
	}
	s = vmi_has_family(0x42, &present);
	ok &= rom ? s == 0 && present == 0 : s == VMI_ERR_NOT_SUPPORTED;
	report(ok, "Query.HasFamily: CPU, Segmentation, MMU, Query present, 0x42 absent (NOT_SUPPORTED without a ROM)");

	int supported = 1, annotations = 1;
	uint32_t honoured = vmi_rom_flags() & 1 ? VMI_ANN_QUEUE : 0;
	FOR_EACH_CALL(id) {
		uint64_t info = 0;
		s = vmi_query_call(id, &info);
		if (!rom) {
			supported &= s == VMI_ERR_NOT_SUPPORTED;
			continue;
		}
		supported &= s == 0 && (unimplemented(id) ? !(info & VMI_QUERY_SUPPORTED) : (info & VMI_QUERY_SUPPORTED) != 0);
		int queueable = id == VMI_CALL_MMU_SETPTE || id == VMI_CALL_MMU_SETLONGPTE;
		if (!unimplemented(id))
			annotations &= (info & 0xFF) == (queueable ? honoured : 0);
	}
	report(supported, "Query.QueryCall: every spec call supported except Reboot and RDPMC (NOT_SUPPORTED without a ROM)");
	report(annotations, "Query.QueryCall: queue honoured on SetPTE/SetLongPTE exactly when the ROM honours annotations");
}

/* Malformed and unusual call IDs through the raw entry: only meaningful with a ROM. */
static void test_raw_ids(void)
{
	uint64_t r[4] = { 0 }, info = 0;
	if (!rom) {
		printf("INFO: raw call IDs not checked (no rom)\n");
		return;
	}
	uint64_t cr0 = cr0_now();
	rom_check(vmi_raw_call(VMI_CALL_CPU_GETCR0 | 0x100, 0, 0, 0, r) == VMI_ERR_RESERVED_BITS,
		  "raw: reserved bits in a call ID are refused with RESERVED_BITS");
	rom_check(vmi_raw_call(VMI_CALLID(VMI_FAMILY_CPU, 0xFE, 0), 0, 0, 0, r) == VMI_ERR_NOT_SUPPORTED,
		  "raw: an unknown call in a known family is NOT_SUPPORTED");
	rom_check(vmi_raw_call(VMI_CALLID(0x42, 0, 0), 0, 0, 0, r) == VMI_ERR_NOT_SUPPORTED,
		  "raw: an unknown family is NOT_SUPPORTED");
	r[0] = 0;
	rom_check(vmi_raw_call(VMI_CALL_CPU_GETCR0 | 0x80, 0, 0, 0, r) == 0 && r[0] == cr0,
		  "raw: an unknown annotation bit (0x80) on GetCR0 is ignored");
	r[0] = 0;
	rom_check(vmi_raw_call(VMI_CALLID(VMI_FAMILY_LEGACY, VMI_LEGACY_GETCR0, 0), 0, 0, 0, r) == 0 && r[0] == cr0,
		  "raw: legacy number GETCR0 reaches CPU.GetCR0");
	/* (IRET is legacy-only before 1.3; since, it reaches CPU.ReturnToUser.) */
	rom_check(vmi_raw_call(VMI_CALLID(VMI_FAMILY_LEGACY, VMI_LEGACY_SYSEXIT, 0), 0, 0, 0, r) == VMI_ERR_NOT_SUPPORTED,
		  "raw: legacy-only number SYSEXIT is NOT_SUPPORTED");
	rom_check(vmi_query_call(VMI_CALL_CPU_GETCR0 | 0x100, &info) == VMI_ERR_RESERVED_BITS,
		  "Query.QueryCall refuses a call ID with reserved bits");
}

void kmain(uint32_t magic, uint32_t mbinfo)
{
	(void)magic, (void)mbinfo;
	printf("vmikit conformance guest\n");
	rom = vmi_rom_present();
	depriv = vmi_deprivileged();
	describe_mode();

	test_cpu_ids();
	test_msrs();
	test_control_registers();
	test_debug_registers();
	test_misc_cpu();
	test_interrupt_mask();
	test_segmentation();
	test_mmu();
	test_query();
	test_raw_ids();
	report(vmi_getter_failures == 0, "no VMI getter failed");

	int code = report_summary();
	vmi_shutdown((uint32_t)code);
	exit(code);
}
