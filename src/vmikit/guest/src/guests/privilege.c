/*
 * privilege: the execution model from inside the guest (docs/execution-model.md).
 *
 * 1. A deprivileged kernel (ring 3 under the hypervisor) executes privileged instructions
 *    itself: each must raise #GP to its own handler, change nothing, and the kernel goes on.
 *    (At ring 0 they would simply work, so this part runs only deprivileged.)
 * 2. The kernel enters user mode (CPU.ReturnToUser, or natively iretq); user code makes
 *    privileged hypercalls, which must be refused with PERMISSION while a user-safe one
 *    works; it comes back with `syscall`, and once more through an exception (#UD).
 *    The kernel then checks that nothing the user asked for happened.
 * Command line: none.
 */
#include "lib.h"
#include "paging.h"
#include "vmi.h"

#define MSR_EFER_  0xC0000080u
#define MSR_STAR   0xC0000081u
#define MSR_LSTAR  0xC0000082u
#define MSR_SFMASK 0xC0000084u
#define SEL_KCODE  0x08
#define SEL_TSS    0x30
#define STAR_USER  0x18 /* sysret: SS = 0x20 | 3, CS = 0x28 | 3 */

/* --- part 1: privileged instructions ---------------------------------------------------- */

static volatile uint64_t resume_at;
static volatile unsigned gp_count;
static volatile uint64_t gp_error;

static int on_gp(struct trap_regs *r)
{
	if (!resume_at)
		return 0; /* not ours: the fatal report */
	gp_count++;
	gp_error = r->error_code;
	r->rip = resume_at;
	resume_at = 0;
	return 1;
}

/* Run `insn` with a recovery label after it; report whether exactly one #GP(0) came. */
#define EXPECT_GP(what, insn, ...)                                                            \
	do {                                                                                  \
		unsigned before_ = gp_count;                                                  \
		__asm__ __volatile__("leaq 1f(%%rip), %%r11\n\tmovq %%r11, %[at]\n\t" insn "\n1:" \
				     : [at] "=m"(resume_at) : __VA_ARGS__ : "r11", "memory");  \
		report(gp_count == before_ + 1 && gp_error == 0,                              \
		       "deprivileged: %s raises #GP to the kernel's own handler", what);       \
	} while (0)

static void privileged_instructions(void)
{
	set_trap_hook(13, on_gp);
	uint64_t cr3 = vmi_get_cr3(), lstar = 0, gdt_base = 0, gdt_base_after = 0;
	uint32_t gdt_limit = 0, gdt_limit_after = 0;
	vmi_rdmsr(MSR_LSTAR, &lstar);
	vmi_get_gdt(&gdt_base, &gdt_limit);
	static struct descriptor_ptr bogus = { .limit = 7, .base = 0x1000 };
	static char page[16] __attribute__((aligned(16)));

	EXPECT_GP("mov %rax,%cr3", "movq %[v], %%cr3", [v] "r"(0x1000ul));
	EXPECT_GP("wrmsr", "wrmsr", "c"(MSR_LSTAR), "a"(0), "d"(0));
	EXPECT_GP("lgdt", "lgdt %[v]", [v] "m"(bogus));
	EXPECT_GP("hlt", "hlt", "r"(0));
	EXPECT_GP("cli", "cli", "r"(0));
	EXPECT_GP("invlpg", "invlpg %[v]", [v] "m"(page));
	set_trap_hook(13, NULL);

	uint64_t lstar_after = 0;
	vmi_rdmsr(MSR_LSTAR, &lstar_after);
	vmi_get_gdt(&gdt_base_after, &gdt_limit_after);
	report(vmi_get_cr3() == cr3 && lstar_after == lstar && gdt_base_after == gdt_base &&
		       gdt_limit_after == gdt_limit && vmi_get_interrupt_mask() == 0,
	       "deprivileged: none of them changed CR3, LSTAR, the GDT or the interrupt flag");
}

/* --- part 2: user mode ------------------------------------------------------------------- */

/* GDT for the native path (and the kernel's own record under the hypervisor). */
static uint64_t gdt[8] __attribute__((aligned(16))) = {
	0,
	0x00AF9A000000FFFFull, /* 0x08 kernel code */
	0x00CF92000000FFFFull, /* 0x10 kernel data */
	0,                     /* 0x18 (32-bit user code: unused) */
	0x00CFF2000000FFFFull, /* 0x20 user data, DPL 3 */
	0x00AFFA000000FFFFull, /* 0x28 user code, DPL 3 */
	0, 0,                  /* 0x30 TSS, filled in below */
};

/* A long-mode TSS with an all-zero I/O bitmap: user code may reach the hypercall port,
 * which is exactly what part 2 tests. */
static struct {
	uint8_t tss[0x68];
	uint8_t iomap[8192];
	uint8_t end;
} __attribute__((packed, aligned(16))) tss;

static uint8_t kernel_stack[8192] __attribute__((aligned(16)));
static uint8_t user_stack[8192] __attribute__((aligned(16)));

#define NUSER 4
static volatile long user_status[NUSER];
static volatile uint64_t user_value;

/* enter_user(rip, rsp, rflags): save the kernel's callee-saved registers and stack, enter
 * user mode; "returns" when user mode comes back (kernel_return), with its value. */
long enter_user(uint64_t rip, uint64_t rsp, uint64_t rflags);
void kernel_return(long value) __attribute__((noreturn));
void syscall_entry(void);
long climb(void);
uint64_t kernel_context;
__asm__(".text\n"
	".globl enter_user\nenter_user:\n"
	"\tpushq %rbx\n\tpushq %rbp\n\tpushq %r12\n\tpushq %r13\n\tpushq %r14\n\tpushq %r15\n"
	"\tmovq %rsp, kernel_context(%rip)\n"
	"\tcall vmi_return_to_user\n" /* returns only if it failed: the error in rax */
	"\tjmp 1f\n"
	/* climb(): save the context as enter_user does, then ud2: the #UD hook's kernel_return
	 * comes back here at the CPU's kernel privilege (see user_mode) */
	".globl climb\nclimb:\n"
	"\tpushq %rbx\n\tpushq %rbp\n\tpushq %r12\n\tpushq %r13\n\tpushq %r14\n\tpushq %r15\n"
	"\tmovq %rsp, kernel_context(%rip)\n\tud2\n"
	".globl kernel_return\nkernel_return:\n"
	"\tmovq %rdi, %rax\n"
	"1:\tmovq kernel_context(%rip), %rsp\n"
	"\tpopq %r15\n\tpopq %r14\n\tpopq %r13\n\tpopq %r12\n\tpopq %rbp\n\tpopq %rbx\n\tret\n"
	/* syscall: rax = the user's number, rcx/r11 its rip/rflags; still on the user stack */
	".globl syscall_entry\nsyscall_entry:\n"
	"\tmovq %rax, %rdi\n\tjmp kernel_return\n");

static long user_call(uint32_t id, uint64_t a0, uint64_t a1)
{
	uint64_t r[4] = { 0 };
	long s = vmi_raw_call(id, a0, a1, 0, r);
	if (id == VMI_CALL_QUERY_GETVERSION && s == 0)
		user_value = r[0];
	return s;
}

static void user_main(void)
{
	user_status[0] = user_call(VMI_CALL_CPU_GETCR0, 0, 0);
	user_status[1] = user_call(VMI_CALL_CPU_WRMSR, MSR_LSTAR, 0xDEAD0000ul);
	user_status[2] = user_call(VMI_CALL_CPU_SETCR4, 0, 0);
	user_status[3] = user_call(VMI_CALL_QUERY_GETVERSION, 0, 0);
	__asm__ __volatile__("syscall" : : "a"(42) : "rcx", "r11", "memory");
	for (;;)
		; /* the kernel never returns here */
}

static void user_fault(void)
{
	__asm__ __volatile__("ud2");
	for (;;)
		;
}

static volatile uint64_t ud_cs;

static int on_user_ud(struct trap_regs *r)
{
	ud_cs = r->cs;
	if ((r->cs & 3) != 3 && !kernel_context)
		return 0;
	kernel_return(1000 + (long)r->vector); /* back to the kernel context, as syscall does */
}

/* Whether the CPU runs this code at ring 0: mov from CR0 faults elsewhere. */
static int at_ring0(void)
{
	unsigned before = gp_count;
	uint64_t cr0;
	set_trap_hook(13, on_gp);
	__asm__ __volatile__("leaq 1f(%%rip), %%r11\n\tmovq %%r11, %[at]\n\tmovq %%cr0, %[v]\n1:"
			     : [at] "=m"(resume_at), [v] "=r"(cr0) : : "r11", "memory");
	resume_at = 0;
	set_trap_hook(13, NULL);
	return gp_count == before;
}

static void user_mode(void)
{
	uint64_t base = (uintptr_t)&tss, limit = sizeof(tss) - 1;
	gdt[6] = (limit & 0xFFFF) | (base & 0xFFFFFF) << 16 | 0x89ull << 40 | ((limit >> 16) & 0xF) << 48 |
		 ((base >> 24) & 0xFF) << 56;
	gdt[7] = base >> 32;
	tss.tss[0x66] = 0x68; /* I/O bitmap right after the TSS */
	tss.end = 0xFF;
	uint64_t efer = 0, cr4 = vmi_get_cr4(), lstar_before = 0;
	long s = vmi_set_gdt((uintptr_t)gdt, sizeof(gdt) - 1);
	s |= vmi_set_tr(SEL_TSS);
	s |= vmi_update_kernel_stack((uintptr_t)kernel_stack + sizeof(kernel_stack));
	s |= vmi_wrmsr(MSR_STAR, (uint64_t)STAR_USER << 48 | (uint64_t)SEL_KCODE << 32);
	s |= vmi_wrmsr(MSR_LSTAR, (uintptr_t)syscall_entry);
	s |= vmi_wrmsr(MSR_SFMASK, 0);
	s |= vmi_rdmsr(MSR_EFER_, &efer);
	s |= vmi_wrmsr(MSR_EFER_, efer | 1); /* EFER.SCE */
	vmi_rdmsr(MSR_LSTAR, &lstar_before);
	report(s == 0, "user mode set up: GDT, TSS, kernel stack, STAR/LSTAR/SFMASK, EFER.SCE");

	set_trap_hook(6, on_user_ud);
	long back = enter_user((uintptr_t)user_main, (uintptr_t)user_stack + sizeof(user_stack), 0x2);
	report(back == 42, "kernel -> user -> kernel: the user's syscall comes back to the kernel (rax = %ld)", back);
	if (!vmi_deprivileged() && !at_ring0()) {
		/* A fact of kvm_pvm: `syscall` from ring 3 jumps to LSTAR without loading STAR's CS/SS,
		 * so a ring-0 kernel's handler runs at ring 3. An exception does change privilege. */
		printf("INFO: this host's KVM ran the syscall handler at ring 3; the kernel climbs back with #UD\n");
		climb();
	}

	uint64_t lstar_after = 0;
	vmi_rdmsr(MSR_LSTAR, &lstar_after);
	if (vmi_rom_present()) {
		report(user_status[0] == VMI_ERR_PERMISSION, "user mode: CPU.GetCR0 is refused with PERMISSION (%ld)",
		       user_status[0]);
		report(user_status[1] == VMI_ERR_PERMISSION, "user mode: CPU.WRMSR(LSTAR) is refused with PERMISSION (%ld)",
		       user_status[1]);
		report(user_status[2] == VMI_ERR_PERMISSION, "user mode: CPU.SetCR4 is refused with PERMISSION (%ld)",
		       user_status[2]);
		report(user_status[3] == 0 && user_value == vmi_hypervisor_version(),
		       "user mode: the user-safe Query.GetVersion works (%ld)", user_status[3]);
	} else {
		printf("INFO: no ROM: user mode has no hypervisor to ask\n");
	}
	report(lstar_after == lstar_before && vmi_get_cr4() == cr4,
	       "nothing user mode asked for changed: LSTAR and CR4 are the kernel's");
	report(vmi_get_cr0() != 0 && vmi_get_cr0() == vmi_get_cr0(), "the kernel's own calls still work afterwards");

	back = enter_user((uintptr_t)user_fault, (uintptr_t)user_stack + sizeof(user_stack), 0x2);
	set_trap_hook(6, NULL);
	report(back == 1006, "kernel -> user -> kernel: a user #UD reaches the kernel's handler (%ld)", back);
}

void kmain(uint32_t magic, uint32_t mbinfo)
{
	(void)magic, (void)mbinfo;
	printf("vmikit privilege guest\n");
	printf("INFO: kernel runs %s\n", vmi_deprivileged() ? "deprivileged (ring 3)" : "at ring 0");
	if (vmi_deprivileged())
		privileged_instructions();
	user_mode();
	exit(report_summary());
}
