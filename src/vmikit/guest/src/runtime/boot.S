/*
 * Multiboot v1 entry: 32-bit protected mode -> long mode -> kmain.
 *
 * The loader (QEMU -kernel or the vmikit VMM) enters at `_start` with
 * EAX = 0x2BADB002, EBX = physical address of the multiboot info, flat 32-bit
 * CS/DS, paging and interrupts off.  Nothing else is guaranteed: no usable GDT,
 * no stack, and we zero .bss ourselves rather than trusting the loader to.
 */
#include "board.h"
#include "segments.h"

#define MB_MAGIC    0x1BADB002
#define MB_FLAGS    0x00000003 /* page-align modules | want memory info */

#define BOOT_STACK_SIZE 0x10000 /* 64 KiB */


	.section .multiboot, "a"
	.balign 4
multiboot_header:
	.long MB_MAGIC
	.long MB_FLAGS
	.long -(MB_MAGIC + MB_FLAGS)

	.section .bss
	.balign 4096
	.globl pml4                /* runtime/ap_boot.S: application processors start on these tables */
pml4:	.skip 4096
pdpt:	.skip 4096

	/* The stack is not zeroed (nothing reads a stack slot before writing it): outside .bss, so
	 * that the zeroing below, emulated store by store at ring 0 on this machine kind, skips it. */
	.section .stack, "aw", @nobits
	.balign 4096
pd:	.skip 4 * 4096 /* 4 x 512 x 2 MiB = the first 4 GiB, identity mapped (without 1 GiB pages) */
	.balign 16
boot_stack:
	.skip BOOT_STACK_SIZE
boot_stack_top:

	.section .data
	.balign 8
gdt:
	.quad 0                    /* null */
	.quad DESC_CODE64   /* 0x08: 64-bit code, DPL 0 (L=1, D=0) */
	.quad DESC_DATA   /* 0x10: flat 4 GiB data, read/write */
gdt_end:
	.balign 8
gdt_ptr:
	.word gdt_end - gdt - 1
	.quad gdt                  /* lgdt in 32-bit mode reads only the low 4 bytes */

	.section .text.boot, "ax"
	.code32
	.globl _start
	.type _start, @function
_start:
	cli
	cld
	/* Keep magic and info pointer in callee-untouched registers while we work. */
	movl %eax, %ebp
	movl %ebx, %esi

	/* Zero .bss (page tables and the stack live there). */
	movl $__bss_start, %edi
	movl $__bss_end, %ecx
	subl %edi, %ecx
	shrl $2, %ecx
	xorl %eax, %eax
	rep stosl

	movl $boot_stack_top, %esp

	/* PML4[0] -> PDPT. U/S everywhere: under VMI this kernel runs at ring 3 (docs/execution-model.md). */
	movl $pdpt, %eax
	orl $0x7, %eax             /* present | writable | user */
	movl %eax, pml4

	/* Where the CPU has 1 GiB pages (CPUID 0x80000001 EDX bit 26): four PDPT entries map the
	 * 4 GiB instead of 2048 PD entries, each store of which ring 0 emulates on this machine kind
	 * (QEMU's default CPU model has none: the 2 MiB fallback below). */
	movl $0x80000000, %eax
	cpuid
	cmpl $0x80000001, %eax
	jb 3f
	movl $0x80000001, %eax
	cpuid
	btl $26, %edx
	jnc 3f
	movl $pdpt, %edi
	movl $0x87, %eax           /* present | writable | user | page size (1 GiB) */
	movl $4, %ecx
5:	movl %eax, (%edi)
	addl $0x40000000, %eax
	addl $8, %edi
	loop 5b
	jmp 4f

	/* PDPT[0..3] -> the four page directories. */
3:	movl $pd, %eax
	orl $0x7, %eax
	movl $pdpt, %edi
	movl $4, %ecx
1:	movl %eax, (%edi)
	addl $4096, %eax
	addl $8, %edi
	loop 1b

	/* 2048 PD entries mapping 2 MiB each: phys = i << 21 (the PDs are not zeroed: both halves). */
	movl $pd, %edi
	movl $0x87, %eax           /* present | writable | user | page size (2 MiB) */
	movl $2048, %ecx
2:	movl %eax, (%edi)
	movl $0, 4(%edi)
	addl $0x200000, %eax
	addl $8, %edi
	loop 2b
4:

	/* Our own GDT; reload data segments from it while still in 32-bit mode. */
	lgdt gdt_ptr
	load_data_segments

	/* Long mode: PAE, CR3, EFER.LME, then paging. */
	movl %cr4, %eax
	orl $(1 << 5), %eax        /* CR4.PAE */
	movl %eax, %cr4
	movl $pml4, %eax
	movl %eax, %cr3
	movl $0xC0000080, %ecx     /* IA32_EFER */
	rdmsr
	orl $(1 << 8), %eax        /* EFER.LME */
	wrmsr
	movl %cr0, %eax
	orl $((1 << 31) | (1 << 0)), %eax /* CR0.PG | CR0.PE */
	movl %eax, %cr0

	ljmpl $SEL_CODE64, $start64
	.size _start, . - _start

	.code64
	.type start64, @function
start64:
	load_data_segments
	movq $boot_stack_top, %rsp
	movl %ebp, %r12d           /* magic and info survive the calls in callee-saved regs */
	movl %esi, %r13d
	xorl %ebp, %ebp            /* terminate frame-pointer chains */

	movl %r12d, %edi
	movl %r13d, %esi
	call runtime_init          /* IDT, page allocator: before any guest code runs */

	movl %r12d, %edi
	movl %r13d, %esi
	call kmain

	xorl %edi, %edi            /* kmain returned: EXIT_OK */
	call exit
3:	cli
	hlt
	jmp 3b
	.size start64, . - start64
