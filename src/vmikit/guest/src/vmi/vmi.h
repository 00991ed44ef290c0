/*
 * The guest VMI layer: one C function per call in the spec.
 *
 * vmi_init() (run by the runtime before kmain) scans the option-ROM window
 * for a VMI ROM (docs/rom-abi.md) and resolves every call once into a table:
 * the ROM entry for (family, call, annotation) if there is one, else the one
 * for (family, call, 0), else nothing.  Each function below calls the
 * resolved ROM entry, or does the native thing (the instruction itself, a
 * store into the table memory, ...) when there is none -- so the same guest
 * binary runs with a full ROM, a minimal ROM, and on a bare machine.
 *
 * Conventions: functions returning `long` return VMI_ERR_OK (0) or a
 * negative VMI_ERR_* (native paths return 0, Query calls without a ROM
 * VMI_ERR_NOT_SUPPORTED).  Getters returning a value return 0 if the ROM call
 * failed and count the failure in vmi_getter_failures.  Pointers to page-table
 * entries and tables are guest-physical == guest-virtual (the runtime's
 * identity map of the first 4 GiB).
 *
 * Versions (docs/vmi-reference.md, "Versioning rules"): this layer compiles
 * against the vmi_spec.h of any 1.x version.  A call or family the header
 * does not name is never resolved (the native path runs); one the header
 * names but the ROM lacks falls back the same way.  A guest states the
 * minimum version it needs with VMI_MIN_VERSION (define it before this
 * header, e.g. -DVMI_MIN_VERSION=0x00010001u); a ROM of another major or an
 * older version is not used.
 */
#ifndef VMIKIT_VMI_H
#define VMIKIT_VMI_H

#include <stdint.h>

#include "vmi_spec.h"

/* The oldest interface this guest accepts: by default any minor of its own major. */
#ifndef VMI_MIN_VERSION
#define VMI_MIN_VERSION ((unsigned int)VMI_VERSION_MAJOR << 16)
#endif
_Static_assert((VMI_MIN_VERSION >> 16) == VMI_VERSION_MAJOR && VMI_MIN_VERSION <= VMI_VERSION,
	       "VMI_MIN_VERSION must be of the header's major and not newer than the header");

/* Families and annotations that older headers lack (1.0: no Query, no `queue`; 1.1: no
 * EventChannel) count as empty, so the tables below have the same shape for every version. */
#ifdef VMI_FAMILY_QUERY_NCALLS
#define VMI__QUERY_NCALLS VMI_FAMILY_QUERY_NCALLS
#else
#define VMI__QUERY_NCALLS 0
#endif
#ifdef VMI_FAMILY_EVENTCHANNEL_NCALLS
#define VMI__EVTCHN_NCALLS VMI_FAMILY_EVENTCHANNEL_NCALLS
#else
#define VMI__EVTCHN_NCALLS 0
#endif
#ifdef VMI_FAMILY_TIME_NCALLS
#define VMI__TIME_NCALLS VMI_FAMILY_TIME_NCALLS
#else
#define VMI__TIME_NCALLS 0
#endif
#ifdef VMI_ANN_QUEUE
#define VMI__ANN_QUEUE VMI_ANN_QUEUE
#else
#define VMI__ANN_QUEUE 0u /* queued calls are plain calls */
#endif
#define VMI__FAMILY_QUERY_ID  0x04u
#define VMI__FAMILY_EVTCHN_ID 0x05u
#define VMI__FAMILY_TIME_ID   0x06u

/* A ROM entry: long entry(u64 a0, u64 a1, u64 a2, u64 *res), res NULL or u64[4]. */
typedef long (*vmi_entry_t)(uint64_t a0, uint64_t a1, uint64_t a2, uint64_t *res);

/* Slots of the resolution table: one per spec call, plus one per MMU call with `queue`. */
#define VMI__BASE_CPU    0
#define VMI__BASE_SEG    (VMI__BASE_CPU + VMI_FAMILY_CPU_NCALLS)
#define VMI__BASE_MMU    (VMI__BASE_SEG + VMI_FAMILY_SEGMENTATION_NCALLS)
#define VMI__BASE_QUERY  (VMI__BASE_MMU + VMI_FAMILY_MMU_NCALLS)
#define VMI__BASE_EVTCHN (VMI__BASE_QUERY + VMI__QUERY_NCALLS)
#define VMI__BASE_TIME   (VMI__BASE_EVTCHN + VMI__EVTCHN_NCALLS)
#define VMI__BASE_QUEUED (VMI__BASE_TIME + VMI__TIME_NCALLS)
#define VMI_NSLOTS       (VMI__BASE_QUEUED + VMI_FAMILY_MMU_NCALLS)
#define VMI__FAMILY_BASE(f)                                                  \
	((f) == VMI_FAMILY_CPU ? VMI__BASE_CPU :                             \
	 (f) == VMI_FAMILY_SEGMENTATION ? VMI__BASE_SEG :                    \
	 (f) == VMI_FAMILY_MMU ? VMI__BASE_MMU :                             \
	 (f) == VMI__FAMILY_EVTCHN_ID ? VMI__BASE_EVTCHN :                   \
	 (f) == VMI__FAMILY_TIME_ID ? VMI__BASE_TIME : VMI__BASE_QUERY)
/* Slot of a call ID; the only annotated slots are MMU calls with VMI_ANN_QUEUE. */
#define VMI_SLOT(id)                                                             \
	((VMI_CALLID_FAMILY(id) == VMI_FAMILY_MMU && (VMI_CALLID_ANNOTATION(id) & VMI__ANN_QUEUE)) \
		 ? VMI__BASE_QUEUED + VMI_CALLID_CALL(id)                        \
		 : VMI__FAMILY_BASE(VMI_CALLID_FAMILY(id)) + VMI_CALLID_CALL(id))

extern vmi_entry_t vmi_table[VMI_NSLOTS];
extern unsigned vmi_getter_failures;

/* The ROM entry a call ID resolved to (NULL: native fallback). */
static inline vmi_entry_t vmi_entry(uint32_t call_id) { return vmi_table[VMI_SLOT(call_id)]; }

/* --- discovery ----------------------------------------------------------- */
int vmi_init(void);              /* 1 if a ROM was found; idempotent */
int vmi_rom_present(void);
uint32_t vmi_rom_version(void);  /* major << 16 | minor from the ROM header, 0 without a ROM */
uint32_t vmi_rom_flags(void);    /* header flags (bit 0: honours annotations), 0 without a ROM */
uint32_t vmi_rom_entries(void);  /* entries in the ROM's table */
uint64_t vmi_rom_base(void);     /* guest-physical address of the accepted ROM, 0 without */
uint32_t vmi_rom_rejected(void); /* version of a VMI ROM found but not used (other major or
				    older than VMI_MIN_VERSION), 0 if none */
/* What the hypervisor implements: Query.GetVersion, else (a 1.0 hypervisor) the ROM header. */
uint32_t vmi_hypervisor_version(void);

/* --- the execution model (docs/execution-model.md) ---------------------------
 * Under a ROM whose hypervisor deprivileges (CPU.Deprivilege, since 1.3), vmi_init() leaves
 * the kernel running at ring 3: from then on no privileged instruction may run (each raises
 * #GP), and every function below reaches the hypervisor or the shared page instead. */
int vmi_deprivileged(void);        /* 1 when the kernel runs at ring 3 under the hypervisor */
volatile void *vmi_shared_page(void); /* the per-vCPU page shared with the hypervisor, or NULL */
/* Enter user mode at rip with stack rsp and flags rflags (only IF and the arithmetic flags are
 * kept). Does not return on success: user mode comes back through an exception or `syscall`,
 * which enter the kernel through its IDT / its LSTAR, as natively. Without a ROM (or with a
 * hypervisor older than 1.3) it is done natively (iretq with the STAR user selectors). */
long vmi_return_to_user(uint64_t rip, uint64_t rsp, uint64_t rflags);

/* --- CPU ----------------------------------------------------------------- */
long vmi_cpuid(uint32_t leaf, uint32_t subleaf, uint32_t out[4]);
uint64_t vmi_rdtsc(void);
long vmi_rdmsr(uint32_t msr, uint64_t *value);
long vmi_wrmsr(uint32_t msr, uint64_t value);
uint64_t vmi_get_cr0(void);
uint64_t vmi_get_cr2(void);
uint64_t vmi_get_cr3(void);
uint64_t vmi_get_cr4(void);
long vmi_set_cr0(uint64_t value);
long vmi_set_cr2(uint64_t value);
long vmi_set_cr3(uint64_t root);
long vmi_set_cr4(uint64_t value);
long vmi_clts(void);
long vmi_wbinvd(void);
long vmi_halt(void);              /* native: returns at once when RFLAGS.IF is clear */
long vmi_shutdown(uint32_t code); /* does not return unless the ROM refused */
long vmi_reboot(void);
long vmi_get_dr(uint32_t reg, uint64_t *value);
long vmi_set_dr(uint32_t reg, uint64_t value);
long vmi_rdpmc(uint32_t counter, uint64_t *value);
long vmi_enable_interrupts(void);
long vmi_disable_interrupts(void);
uint64_t vmi_get_interrupt_mask(void); /* RFLAGS; only IF (bit 9) is meaningful */
long vmi_set_interrupt_mask(uint64_t flags);
long vmi_io_delay(void);

/* --- Segmentation -------------------------------------------------------- */
long vmi_set_gdt(uint64_t base, uint32_t limit);
long vmi_set_idt(uint64_t base, uint32_t limit);
long vmi_set_ldt(uint16_t selector);
long vmi_set_tr(uint16_t selector);
long vmi_get_gdt(uint64_t *base, uint32_t *limit);
long vmi_get_idt(uint64_t *base, uint32_t *limit);
uint16_t vmi_get_ldt(void);
uint16_t vmi_get_tr(void);
long vmi_write_gdt_entry(uint32_t index, uint64_t low, uint64_t high);
long vmi_write_idt_entry(uint32_t index, uint64_t low, uint64_t high);
long vmi_write_ldt_entry(uint32_t index, uint64_t low, uint64_t high);
long vmi_update_kernel_stack(uint64_t stack);

/* --- MMU ----------------------------------------------------------------- */
long vmi_set_pte(uint64_t *ptep, uint64_t pte);
long vmi_set_pte_queued(uint64_t *ptep, uint64_t pte);       /* MMU.SetPTE | queue */
long vmi_set_long_pte(uint64_t *ptep, uint64_t pte);
long vmi_set_long_pte_queued(uint64_t *ptep, uint64_t pte);  /* MMU.SetLongPTE | queue */
long vmi_flush_tlb(uint32_t flags);                          /* VMI_FLUSH_TLB | VMI_FLUSH_GLOBAL */
long vmi_inval_page(uint64_t va);
long vmi_allocate_page(uint64_t table, uint32_t level);
long vmi_release_page(uint64_t table);
long vmi_flush_queue(void);                                  /* completes the ROM's per-CPU queue */

/* --- SMP (since 1.5; VMI_ERR_NOT_SUPPORTED without it: the guest's own INIT/SIPI and IPIs) -- */
/* Start AP <cpu> (its APIC ID) at rip with rsp, rdi = arg, in this CPU's state and address space.
 * The AP must then call vmi_cpu_init() before any other VMI call. */
long vmi_start_ap(uint32_t cpu, uint64_t rip, uint64_t rsp, uint64_t arg);
long vmi_cpu_info(uint32_t *cpu, uint32_t *cpus);          /* this CPU's index and the count */
/* Every CPU's VMI layer once (the BSP's is vmi_init): the hypervisor sets up this CPU's part. */
long vmi_cpu_init(void);
/* Flush the TLB (flags as vmi_flush_tlb) or one page of every CPU in the mask (bit i = CPU i;
 * VMI_CPUS_ALL): one call for the whole set; *flushed = CPUs flushed (may be NULL). */
long vmi_flush_tlb_multi(uint32_t flags, uint64_t cpus, uint32_t *flushed);
long vmi_inval_page_multi(uint64_t va, uint64_t cpus, uint32_t *flushed);

/* --- Query (VMI_ERR_NOT_SUPPORTED without a ROM) ------------------------- */
long vmi_get_version(uint32_t *version);
long vmi_has_family(uint32_t family, uint64_t *present);
long vmi_query_call(uint32_t call_id, uint64_t *info);

#ifdef VMI_FAMILY_EVENTCHANNEL
/* --- EventChannel (since 1.2): through the hypervisor when Query.HasFamily says it is
 * there, else a FIFO of the same semantics inside the guest (VMI_EVTCHN_PORTS ports of
 * VMI_EVTCHN_DEPTH events; VMI_ERR_AGAIN when full or empty). */
long vmi_evtchn_send(uint32_t port, uint64_t value);
long vmi_evtchn_poll(uint32_t port, uint64_t *value, uint32_t *pending);
int vmi_evtchn_native(void);     /* 1 when the guest's own FIFO is in use */
#endif

#ifdef VMI_CALL_EVENTCHANNEL_BIND
/* --- EventChannel 1.4: sources, port masks and upcalls (docs/events.md) ------------------
 * vmi_events_present(): the hypervisor binds sources and makes upcalls (else every call below
 * is VMI_ERR_NOT_SUPPORTED and the guest uses the board's interrupts). The layer owns the
 * upcall entry: it saves every register, acknowledges the pending unmasked ports (clearing
 * their bits in the shared page), calls the handler with them, sets vif again (taking, with no
 * exit, what arrived meanwhile) and resumes the interrupted code. The handler runs with vif = 0. */
typedef void (*vmi_event_handler_t)(uint64_t ports);
int vmi_events_present(void);
long vmi_evtchn_bind(uint32_t source, uint32_t port);   /* VMI_EVTCHN_SOURCE_*, VMI_EVTCHN_UNBOUND */
long vmi_evtchn_mask(uint32_t port);
long vmi_evtchn_unmask(uint32_t port);
long vmi_evtchn_set_handler(vmi_event_handler_t handler); /* NULL: no upcalls */
uint64_t vmi_upcalls(void);      /* upcalls the hypervisor made (shared page), 0 without */
#endif

#ifdef VMI_FAMILY_TIME
/* --- Time (since 1.4): through the hypervisor when Query.HasFamily says it is there; else the
 * counter is the native TSC and the rest is VMI_ERR_NOT_SUPPORTED (use the board's timers). */
int vmi_time_present(void);
uint64_t vmi_cycle_counter(void);                 /* Time.GetCycleCounter, else rdtsc */
long vmi_cycle_frequency(uint64_t *hz);
long vmi_wallclock(uint64_t *ns);                 /* ns since the Unix epoch */
long vmi_set_alarm(uint32_t alarm, uint64_t expiry, uint64_t period); /* in cycles; period 0: once */
long vmi_cancel_alarm(uint32_t alarm, uint64_t *fired);
#endif

/* Any call ID through the ROM's raw entry (experimental calls, malformed IDs). */
long vmi_raw_call(uint32_t call_id, uint64_t a0, uint64_t a1, uint64_t a2, uint64_t res[4]);

#endif
