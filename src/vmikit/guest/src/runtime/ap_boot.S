/*
 * Application processor start-up: real mode -> 32-bit protected mode -> long mode -> C.
 *
 * A STARTUP IPI starts an AP in real mode at CS = vector << 8, IP = 0 (Intel SDM vol. 3,
 * 8.4.4 "MP Initialization Example"), so the first instructions must sit on a 4 KiB page below
 * 1 MiB: smp.c copies [smp_trampoline, smp_trampoline_end) to a free low page. That part only
 * loads a GDT and enters protected mode; it jumps straight into the kernel image (at 1 MiB,
 * reachable from 32-bit flat code), so nothing else needs relocating: the blob's one data item,
 * the GDT pointer, is read CS-relative, and its contents are link-time constants.
 *
 * 32-bit (ap_start32): the BSP's CR4 (PAE), boot.S's page tables, EFER.LME, then CR0 with PG.
 * 64-bit (ap_start64): the runtime's GDT and IDT (the BSP's, saved by smp.c), then the AP finds
 * its own stack by its local APIC ID in smp_ap_apic_ids[] (so an AP that arrives late, after the
 * BSP gave up on it, still uses its own stack, never the next AP's) and calls smp_ap_main(index).
 */
#include "segments.h"

#define SEL_CODE32  0x18
#define MSR_EFER    0xC0000080
#define EFER_LMA    (1 << 10)
#define LAPIC_ID_REG 0xFEE00020

	.section .data
	.balign 8
/* The start-up GDT: the runtime's two selectors (boot.S) plus a 32-bit code segment. */
ap_gdt:
	.quad 0
	.quad DESC_CODE64   /* 0x08: 64-bit code, DPL 0 */
	.quad DESC_DATA   /* 0x10: flat 4 GiB data */
	.quad 0x00CF9A000000FFFF   /* 0x18: flat 4 GiB 32-bit code (D=1, L=0) */
ap_gdt_end:

	/* Filled in by smp.c before any SIPI. */
	.globl smp_ap_cr0, smp_ap_cr3, smp_ap_cr4, smp_ap_efer, smp_ap_gdtr, smp_ap_idtr
	.globl smp_ap_count, smp_ap_apic_ids, smp_ap_stack_tops
	.balign 8
smp_ap_cr0:	.quad 0
smp_ap_cr3:	.quad 0
smp_ap_cr4:	.quad 0
smp_ap_efer:	.quad 0
smp_ap_gdtr:	.skip 16            /* struct descriptor_ptr: limit, 64-bit base */
smp_ap_idtr:	.skip 16
smp_ap_count:	.long 0            /* entries in the two tables below */
	.balign 8
smp_ap_apic_ids:	.skip 4 * 16  /* SMP_MAX_CPUS (smp.h) u32 */
smp_ap_stack_tops:	.skip 8 * 16  /* u64 */

/* --- the part copied below 1 MiB ----------------------------------------------------------- */
	.section .rodata
	.code16
	.globl smp_trampoline, smp_trampoline_end
	.balign 16
smp_trampoline:
	cli
	cld
	/* 66-prefixed lgdt: a 32-bit base (the 16-bit form would load only 24 bits of it). */
	lgdtl %cs:tramp_gdtr - smp_trampoline
	movl %cr0, %eax
	orl $1, %eax               /* CR0.PE */
	movl %eax, %cr0
	ljmpl $SEL_CODE32, $ap_start32
	.balign 8
tramp_gdtr:
	.word ap_gdt_end - ap_gdt - 1
	.long ap_gdt
smp_trampoline_end:

/* --- in the kernel image ------------------------------------------------------------------ */
	.text
	.code32
	.type ap_start32, @function
ap_start32:
	load_data_segments
	movl smp_ap_cr4, %eax      /* the BSP's CR4: PAE (long mode needs it before paging) */
	movl %eax, %cr4
	movl smp_ap_cr3, %eax      /* boot.S's pml4: identity maps this code and the kernel */
	movl %eax, %cr3
	movl $MSR_EFER, %ecx
	movl smp_ap_efer, %eax     /* the BSP's EFER: LME (and NXE, if it set it) */
	andl $~EFER_LMA, %eax      /* LMA is the CPU's to set, when paging comes on */
	xorl %edx, %edx
	wrmsr
	movl smp_ap_cr0, %eax      /* the BSP's CR0: PG | PE (| WP ...) -> long mode active */
	movl %eax, %cr0
	ljmpl $SEL_CODE64, $ap_start64
	.size ap_start32, . - ap_start32

	.code64
	.type ap_start64, @function
ap_start64:
	lgdt smp_ap_gdtr(%rip)     /* the runtime's GDT: same selectors as ap_gdt */
	load_data_segments
	lidt smp_ap_idtr(%rip)

	/* Which AP am I? The local APIC ID (a 32-bit address: mov imm32 zero-extends). */
	movl $LAPIC_ID_REG, %ecx
	movl (%rcx), %eax
	shrl $24, %eax
	xorl %ecx, %ecx
2:	cmpl smp_ap_count(%rip), %ecx
	jae 3f                     /* not one the BSP started: park */
	cmpl smp_ap_apic_ids(, %rcx, 4), %eax
	je 4f
	incl %ecx
	jmp 2b
	/* A stack first (SP is 0 after INIT), then CS from the runtime's GDT through it. */
4:	movq smp_ap_stack_tops(, %rcx, 8), %rsp
	pushq $SEL_CODE64
	leaq 1f(%rip), %rax
	pushq %rax
	lretq
1:	xorl %ebp, %ebp            /* terminate frame-pointer chains */
	movl %ecx, %edi
	call smp_ap_main           /* never returns */
3:	cli
	hlt
	jmp 3b
	.size ap_start64, . - ap_start64
