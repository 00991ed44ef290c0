/*
 * SMP on a bare machine (or a kernel kept at ring 0 under a ROM): bring up every CPU the ACPI
 * MADT lists, run functions on them, send IPIs, shoot down TLB entries. docs/smp.md tells how.
 *
 * Nothing here runs unless a guest calls smp_init(): every other guest stays uniprocessor.
 * CPU numbers are dense, 0 = the bootstrap processor (BSP), then the MADT's order.
 *
 * Every wait is bounded (a CPU that never answers is reported, not waited for forever); a
 * function that returns -1 / a nonzero mask timed out.
 */
#ifndef VMIKIT_SMP_H
#define VMIKIT_SMP_H

#include <stdint.h>

#include "lib.h"

#define SMP_MAX_CPUS    16       /* CPUs brought up; the MADT may list more */
#define SMP_STACK_SIZE  0x4000ul /* per AP, aligned to its size: the struct smp_cpu at its bottom */
#define SMP_VEC_WAKE    0xF0     /* wakes an idle AP to look at its mailbox */
#define SMP_VEC_FLUSH   0xF1     /* smp_flush_tlb_others */
#define SMP_FLUSH_ALL   (~0ull)  /* va argument: the whole TLB (a CR3 reload), not one page */
#define SMP_WAIT_MS     30000u   /* bound on any wait for another CPU */
#define SMP_ARRIVE_MS   3000u    /* bound on an AP's arrival after its SIPIs */

/* Per-CPU data, found from the stack pointer (smp_this_cpu): no MSR, no exit, no LAPIC read. */
struct smp_cpu {
	unsigned id;                /* 0 = BSP */
	unsigned apic_id;           /* from the MADT */
	volatile unsigned online;   /* the CPU runs the runtime's code and takes work */
	volatile unsigned lock;     /* held by a sender while it posts to the mailbox */
	void (*volatile fn)(void *);
	void *volatile arg;
	volatile uint64_t posted;   /* mailbox sequence: work posted ... */
	volatile uint64_t done;     /* ... and finished (done == posted: idle) */
	void *user;                 /* free for the guest */
	uint32_t canary;            /* overwritten when the stack overflowed into this struct */
};

/* Starts every AP the MADT lists (INIT, SIPI, SIPI) and returns the number of CPUs online,
 * 1 when there is nothing to start or SMP cannot work here (a deprivileged kernel, no MADT,
 * no PM timer to time the architected delays; said on an INFO line). Idempotent. BSP only. */
unsigned smp_init(void);
unsigned smp_cpus(void);           /* CPUs online (1 before smp_init) */
unsigned smp_cpus_listed(void);    /* enabled CPUs the MADT lists (0 before smp_init) */
unsigned smp_cpu_id(void);         /* this CPU's number, from the stack pointer */
struct smp_cpu *smp_this_cpu(void);
struct smp_cpu *smp_cpu(unsigned cpu); /* NULL past smp_cpus() */
uint64_t smp_online_mask(void);    /* bit i = CPU i online */

/* Run fn(arg) on `cpu` and wait for it to return (on the caller's own CPU: a plain call). An
 * AP runs it with interrupts enabled. 0, or -1 when the CPU is not online or did not finish. */
int smp_run_on(unsigned cpu, void (*fn)(void *), void *arg);
/* The same without waiting; smp_wait_on() waits for it (0, or -1 on timeout). */
int smp_start_on(unsigned cpu, void (*fn)(void *), void *arg);
int smp_wait_on(unsigned cpu);
/* fn(arg) on every online CPU, the caller's too; returns when all are done: the number of CPUs
 * that failed to (0 = all done). */
int smp_run_all(void (*fn)(void *), void *arg);

/* A barrier for n CPUs, reusable (sense by generation). Wait returns 0, or -1 on timeout. */
struct smp_barrier {
	volatile unsigned count, generation;
	unsigned n;
};
void smp_barrier_init(struct smp_barrier *b, unsigned n);
int smp_barrier_wait(struct smp_barrier *b);

/* A fixed IPI (physical destination, edge) to `cpu`. The handler is a set_irq_hook() hook. */
void smp_send_ipi(unsigned cpu, unsigned vector);

/* invlpg `va` (or reload CR3 for SMP_FLUSH_ALL) on every CPU in `mask` but the caller, each in
 * its SMP_VEC_FLUSH handler, and wait for every acknowledgement. The caller flushes its own TLB.
 * Targets must take interrupts (idle APs and functions started by smp_run_on do). Returns the
 * mask of CPUs that did not acknowledge in time (0 = done). */
uint64_t smp_flush_tlb_others(uint64_t mask, uint64_t va);

/* Time, calibrated by smp_init against the ACPI PM timer (0 before). */
uint64_t smp_tsc_per_ms(void);
void smp_udelay(unsigned us);      /* busy-waits on the PM timer; returns at once without one */

#endif
