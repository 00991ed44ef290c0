/*
 * The freestanding guest runtime: console, formatting, test reporting, exit,
 * exceptions and a physical page allocator.  Guests include just this header
 * and define `void kmain(uint32_t magic, uint32_t mbinfo)`.
 */
#ifndef VMIKIT_LIB_H
#define VMIKIT_LIB_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include "board.h"
#include "multiboot.h"
#include "x86.h"

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define PAGE_SIZE 4096ul

/* Entry point every guest provides; the runtime calls exit(EXIT_OK) if it returns. */
void kmain(uint32_t magic, uint32_t mbinfo);

/* What the boot code was handed, saved before kmain runs. */
extern uint32_t boot_magic;
extern const struct multiboot_info *boot_info;

/* Linker-script symbols: first byte of the image and first byte after it (incl. .bss). */
extern char __kernel_start[], __kernel_end[];

/* string.c -- gcc may emit calls to these even in freestanding code. */
void *memset(void *dst, int c, size_t n);
void *memcpy(void *dst, const void *src, size_t n);
void *memmove(void *dst, const void *src, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strcmp(const char *a, const char *b);

/* printf.c: %d %i %u %x %X %o %s %c %p %%, l/ll/z/h modifiers, width, '0' and '-'. */
void console_putc(char c);
void console_write(const char *s); /* no newline appended */
int printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int vprintf(const char *fmt, va_list ap);
int snprintf(char *buf, size_t size, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap);

/* report.c */
void report(int ok, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
int report_summary(void); /* prints "DONE pass=N fail=M", returns the exit code */
void exit(int code) __attribute__((noreturn));

/* idt.c */
/* Frame written for the panic port: 24 little-endian u64, in this order. */
struct exception_frame {
	uint64_t vector, error_code, rip, cs, rflags, rsp, ss;
	uint64_t rax, rbx, rcx, rdx, rsi, rdi, rbp;
	uint64_t r8, r9, r10, r11, r12, r13, r14, r15;
	uint64_t cr2, cr3;
};
_Static_assert(sizeof(struct exception_frame) == 192, "panic frame is 24 u64");

/* The IDT: idt_load points the IDTR at it (at ring 0, before the kernel may leave it), idt_fill
 * writes its gates (after vmi_init: natively once deprivileged; this host emulates ring 0). */
void idt_load(void);
void idt_fill(void);
/* An interrupted context as idt_stubs.S saves it; a hook may change any field. */
struct trap_regs {
	uint64_t r15, r14, r13, r12, r11, r10, r9, r8;
	uint64_t rbp, rdi, rsi, rdx, rcx, rbx, rax;
	uint64_t vector, error_code;
	uint64_t rip, cs, rflags, rsp, ss; /* pushed by the CPU */
};
/* A hook returns nonzero when it handled the exception: the context resumes (iretq) with
 * *r as the hook left it (e.g. rip moved past the faulting instruction). Zero: fatal report. */
typedef int (*trap_hook_t)(struct trap_regs *r);
void set_trap_hook(unsigned vector, trap_hook_t hook); /* NULL restores the fatal default */
/* The same for an interrupt the local APIC delivers (vector 32-255: IPIs, LAPIC timer, IOAPIC):
 * the runtime writes the LAPIC's EOI after the hook handled it (ring 0 only, xAPIC MMIO). */
void set_irq_hook(unsigned vector, trap_hook_t hook);
uint64_t trap_cr2(void); /* the faulting address of the #PF being handled (no exit under VMI) */
const char *exception_name(unsigned vector);

/* alloc.c */
void alloc_init(const struct multiboot_info *mbi);
void *alloc_page(void); /* zeroed 4 KiB page, or NULL when memory is exhausted */
void *alloc_pt_page(void); /* a fresh, zero page of the page-table pool, or NULL; never written here */
uint64_t ram_end_below_4g(void);
/* cmdline.c: the multiboot command line as space-separated `key=value` and `word` tokens */
int cmdline_find(const char *key, const char **start, const char **end); /* value as [*start, *end) */
uint64_t cmdline_u64(const char *key, uint64_t def); /* decimal or 0x hex; def if absent or malformed */
int cmdline_has(const char *word); /* end of usable RAM below 4 GiB (memory map), page-aligned down */
void free_page(void *page);

#endif
