/*
 * fuzz: a hostile guest.  Issues, as fast as it can, random and mutated VMI
 * calls through the ROM's raw entry (plus the ROM's queue) to attack the
 * hypervisor, never itself.  Run it with `vmikit fuzz` (docs in vmikit/fuzz/).
 *
 * Command line: calls=N seed=S stores=0|1 (plain stores into the ROM, the
 * monitor area, the page-table pool and the shadow area; default 1)
 * straddle=0|1 (batches across the page-table pool's boundaries; default 1).
 *
 * It runs as the hypervisor put it: deprivileged (vmi_deprivileged(): hardware
 * ring 3, no privileged instruction allowed, sgdt/sidt showing the monitor's
 * tables) or at ring 0.  So it reads CR0/CR3/CR4, EFER, the GDT and the IDT
 * through VMI once at setup (at ring 0 also natively, and both must agree),
 * and keeps those values: it only ever sets them again or sets values the
 * hypervisor must refuse, so the final checks expect them unchanged.
 *
 * How an attack is chosen: pick a call (any spec call, a legacy number, an
 * unknown call or family, a registered experimental 0xFF call), then mutate
 * its ID (unknown annotation bits, sometimes reserved bits) and draw its
 * arguments from a per-call generator.  The generator knows which values the
 * guest can survive if the hypervisor accepts them, and which it must refuse:
 *
 *   never called        CPU.Shutdown (ends the run) -- except with reserved
 *                       bits set, which must be refused before dispatch, and
 *                       from user mode (below);
 *   idempotent          CPU.Deprivilege (answers the privilege the kernel has);
 *   reject-only values  SetCR0/SetCR4 (bits above 31, clearing PG/PE/PAE,
 *                       NW without CD, reserved CR4 bits), SetCR3 (anything
 *                       but a registered PML4: such a root has no identity
 *                       map and would kill the guest), SetGDT/SetIDT (limit
 *                       > 0xFFFF, unmapped, ROM, past RAM, non-canonical
 *                       bases), WriteIDTEntry (malformed gates, or
 *                       not-present gates), SetDR(7) (bits above 31), WRMSR of
 *                       EFER (mode bits) and of MSRs outside the writable set,
 *                       ReturnToUser (a non-canonical rip or rsp);
 *   own playground      WriteGDTEntry/SetTR/SetLDT/WriteLDTEntry/
 *                       UpdateKernelStack act on a private copy of the GDT, at
 *                       indices the guest never uses, with descriptor bases in
 *                       scratch RAM, page-table pages, the ROM or nowhere;
 *   anything            the rest (getters, CPUID, RDMSR, SetCR2, SetDR0-6,
 *                       IF calls, the MMU family on the guest's own registered
 *                       tables and random pool pages, Query, EventChannel,
 *                       FlushQueue with corrupted batches, experimental calls);
 *   user mode           the kernel enters its user mode (ReturnToUser) where
 *                       user code makes any calls with hostile arguments --
 *                       Shutdown, SetCR3, SetPTE, WRMSR(LSTAR) included -- and
 *                       each must answer exactly PERMISSION unless the spec
 *                       marks it user-safe (or the hypervisor lacks it), and a
 *                       user-safe one answers as the same call from the kernel;
 *                       ud2 brings the kernel back through its own IDT;
 *   ID floods           bursts of distinct IDs, each refused before dispatch;
 *   edge batches        FlushQueue sized by the spec's [batch]: counts around
 *                       max_entries, one bad entry at a known index, every arg
 *                       slot at boundary values, buffers at the edges of RAM.
 *
 * Every call is counted in one attack class (class_name[]): FUZZ-CLASSES at the
 * end, and live in `stat`, which the host samples for its progress line.
 *
 * Checks in the guest: every status is a spec error and one the call may
 * give (e.g. exactly PERMISSION for a writable alias of a page table or the
 * ROM); a rejected batch changes no table, an accepted one all of its
 * entries; the ROM stays unchanged under stores; and after every rejected
 * call Query.GetVersion still answers.  The first surprise prints FUZZ-LAST
 * (the call) and FUZZ-UNEXPECTED (why); the host also reads `fuzz_record`
 * after a crash or hang.  The run ends with a few FUZZ lines and
 * vmi_shutdown(0), or 1 when a valid call stopped working.
 */
#include "lib.h"
#include "paging.h"
#include "vmi.h"

/* --- page-table constants (docs/paging.md; NONLEAF and LEAF_RW from paging.h carry U/S) --- */
#define P_   PTE_P
#define RW_  PTE_RW
#define US_  PTE_US
#define A_   PTE_A
#define D_   PTE_D
#define PS_  PTE_PS
#define G_   0x100ull
#define NX_  (1ull << 63)
#define ADDR PTE_ADDR
#define LEAF_RO_ (P_ | US_ | A_ | D_)

#define ROM_IMAGE   0xC0000ull
#define MONITOR     0xC8000ull    /* the hypervisor's GDT, IDTs, TSS and stubs (layout.MONITOR_BASE) */
#define ROM_DATA    0xD0000ull
#define SHADOW_BASE 0xE0000000ull /* shadow paging's private tables (machine/layout.py) */
#define MMIO_HOLE   0xFEB00000ull /* nothing decodes it */
#define CR0_NW (1ull << 29)
#define CR0_CD (1ull << 30)
#define MSR_STAR 0xC0000081u

#define NPOOL  16 /* pool pages the fuzzer owns: 0..4 its address space, the rest free game */
#define NDATA  8
#define NBATCH (VMI_BATCH_MAX_ENTRIES + 44)
#define ALL_ERRORS 0x7FFu /* bit k: status -k is acceptable (bit 0: OK); AGAIN (-11) only for EventChannel */
#define BIT(e) (1u << (unsigned)-(e))
#define GDT_FIRST_FREE 8 /* boot GDT uses 0..2; 3..7 left alone */

/* The call being made, for the host to read after a crash or hang (gpa printed at start). */
struct fuzz_record {
	uint64_t magic, n, kind, id, a0, a1, a2;
	int64_t status;
};
volatile struct fuzz_record fuzz_record = { .magic = 0x4C41535446555A5Aull };
enum { KIND_CALL = 0, KIND_STORE = 1, KIND_QUEUED = 2, KIND_USER = 3 };
#define PENDING 0x7FFFFFFFll

static struct vmi_batch_entry batch[NBATCH] __attribute__((aligned(64)));

static uint64_t rng;
static uint64_t ram_end, boot_cr3;
/* CR0, CR4 and EFER as setup found them: the fuzzer never changes them (it sets only these
 * values or ones the hypervisor must refuse), so the final check expects them unchanged.
 * Read through VMI: a deprivileged kernel (ring 3) may not execute mov from CRn or rdmsr. */
static uint64_t cr0_0, cr4_0, efer_0;
static int depriv;
static uint64_t pool[NPOOL];
static int level_of[NPOOL]; /* the guest's model of registrations (0: not registered) */
static uint64_t data[NDATA], victim, scratch, gdt;
static uint64_t gdt_limit, idt_base, idt_limit;
static int direct, stores = 1;
static uint64_t tr_base, ldt_base; /* cached at SetTR/SetLDT, as the CPU caches them */
static int tr_loaded, ldt_loaded;
static uint32_t experimental[256];
static uint8_t supported[6][256]; /* Query.QueryCall: does the hypervisor implement (family, call)? */
static unsigned n_experimental;

/* Statistics. */
#define NSTATUS (1 - VMI_ERR_AGAIN) /* 0 .. -11 */
static uint64_t by_status[NSTATUS], odd_status;
static int broken;

/* The attack classes (which kind of attack a call belongs to).  The host reads their names
 * from FUZZ-START and their counts from FUZZ-CLASSES, or live from `stat`. */
enum { C_SPEC, C_LEGACY, C_UNKNOWN, C_RESERVED, C_EXPERIMENTAL, C_CORRUPT_BATCH, C_ROM_QUEUE,
       C_USER, C_ID_FLOOD, C_EDGE_BATCH, NCLASS };
static const char *const class_name[NCLASS] = {
	"spec", "legacy", "unknown", "reserved-bits", "experimental", "corrupt-batch", "rom-queue",
	"user-mode", "id-flood", "edge-batch",
};
static unsigned cur_class;

/* Live counters the host samples for its progress line (no exit needed: it reads guest memory
 * at the address FUZZ-START prints).  Layout: vmikit/fuzz/guestlog.py STATS. */
#define STATS_MAGIC 0x5354415446555A5Aull
static volatile struct fuzz_stats {
	uint64_t magic, calls, unexpected, canaries, stores, nclass;
	uint64_t by_class[NCLASS];
} stat = { .magic = STATS_MAGIC, .nclass = NCLASS };

static void count_call(void)
{
	stat.calls++;
	stat.by_class[cur_class]++;
}

/* --- helpers ------------------------------------------------------------------------ */

static uint64_t rnd(void) /* xorshift64* */
{
	rng ^= rng >> 12;
	rng ^= rng << 25;
	rng ^= rng >> 27;
	return rng * 0x2545F4914F6CDD1Dull;
}

static uint64_t below(uint64_t n) { return n ? rnd() % n : 0; }
static int chance(unsigned percent) { return below(100) < percent; }

static inline uint64_t rd64(uint64_t a) { return *(volatile uint64_t *)(uintptr_t)a; }

static void print_record(const char *why)
{
	printf("FUZZ-LAST n=%lu kind=%lu id=0x%08lx a0=0x%lx a1=0x%lx a2=0x%lx status=%ld seed=0x%lx\n",
	       (unsigned long)fuzz_record.n, (unsigned long)fuzz_record.kind, (unsigned long)fuzz_record.id,
	       (unsigned long)fuzz_record.a0, (unsigned long)fuzz_record.a1, (unsigned long)fuzz_record.a2,
	       (long)fuzz_record.status, (unsigned long)cmdline_u64("seed", 1));
	printf("FUZZ-UNEXPECTED %s\n", why);
}

static int verbose;

static void surprise(const char *why)
{
	if (!stat.unexpected++ || (verbose && stat.unexpected < 60))
		print_record(why);
}

static void record(uint64_t kind, uint64_t id, uint64_t a0, uint64_t a1, uint64_t a2)
{
	fuzz_record.n = stat.calls;
	fuzz_record.kind = kind;
	fuzz_record.id = id;
	fuzz_record.a0 = a0, fuzz_record.a1 = a1, fuzz_record.a2 = a2;
	fuzz_record.status = PENDING;
}

/* A valid call must still work: Query.GetVersion answers the version. */
static void canary(void)
{
	uint64_t r[4] = { 0 };
	stat.canaries++;
	long s = vmi_raw_call(VMI_CALL_QUERY_GETVERSION, 0, 0, 0, r);
	if (s != 0 || r[0] != VMI_VERSION) {
		broken = 1;
		surprise("canary: Query.GetVersion stopped working");
	}
}

static void count_status(long s)
{
	if (s <= 0 && s > -NSTATUS)
		by_status[-s]++;
	else
		odd_status++;
}

/* One fuzzed hypercall through the raw entry; `allowed` is the set of statuses it may give. */
static long call(uint32_t id, uint64_t a0, uint64_t a1, uint64_t a2, uint32_t allowed, uint64_t r[4])
{
	uint64_t junk[4];
	count_call();
	record(KIND_CALL, id, a0, a1, a2);
	long s = vmi_raw_call(id, a0, a1, a2, r ? r : junk);
	fuzz_record.status = s;
	count_status(s);
	if (s > 0 || s <= -NSTATUS)
		surprise("status is not a spec error code");
	else if (!(allowed & BIT(s)))
		surprise("status not one this call may give");
	if (s)
		canary();
	return s;
}

/* --- the guest's model of its page tables ------------------------------------------- */

static int pool_index(uint64_t gpa)
{
	for (int i = 0; i < NPOOL; i++)
		if (pool[i] == (gpa & ~0xFFFull))
			return i;
	return -1;
}

static int is_table(uint64_t gpa)
{
	int i = pool_index(gpa);
	return i >= 0 && level_of[i];
}

/* --- argument generators ------------------------------------------------------------ */

static uint64_t any_pool(void) { return pool[below(NPOOL)]; }

/* Addresses at the edges: past RAM, the ROM, the pool, unaligned, huge. */
static uint64_t hostile_addr(void)
{
	switch (below(16)) {
	case 0: return 0;
	case 1: return ~0ull;
	case 2: return 1ull << 63;
	case 3: return ram_end;
	case 4: return ram_end - 8;
	case 5: return ram_end - 4096 + below(4096);
	case 6: return ROM_IMAGE + below(0x10000); /* the ROM image and the monitor area */
	case 7: return any_pool() + 8 * below(512) + (chance(20) ? below(8) : 0);
	case 8: return SHADOW_BASE + 8 * below(512);
	case 9: return MMIO_HOLE;
	case 10: return rnd();
	case 11: return rnd() & 0xFFFFFFFFull;
	case 12: return 1ull << 52;
	case 13: return data[below(NDATA)] + below(4096);
	case 14: return ROM_DATA + below(0x10000);
	default: return below(64);
	}
}

static uint64_t frame_choice(void)
{
	switch (below(12)) {
	case 0: case 1: return any_pool();
	case 2: return ROM_IMAGE + 0x1000 * below(16); /* the ROM image and the monitor area */
	case 3: return ROM_DATA + 0x1000 * below(16);
	case 4: case 5: case 6: return data[below(NDATA)];
	case 7: return ram_end + 0x1000 * below(4);
	case 8: return SHADOW_BASE;
	case 9: return MMIO_HOLE;
	case 10: return rnd() & ADDR;
	default: return 0;
	}
}

static uint64_t pte_value(void)
{
	if (chance(5))
		return rnd();
	uint64_t v = frame_choice();
	v |= chance(90) ? P_ : 0;
	v |= chance(50) ? RW_ : 0;
	v |= chance(10) ? US_ : 0;
	v |= chance(70) ? A_ | D_ : 0;
	v |= chance(15) ? PS_ : 0;
	v |= chance(5) ? G_ : 0;
	v |= chance(5) ? NX_ : 0;
	v |= chance(5) ? 1ull << (52 + below(11)) : 0; /* available bits */
	v |= chance(5) ? 1ull << (40 + below(12)) : 0; /* maybe above MAXPHYADDR */
	v |= chance(10) ? below(0x1000) : 0;
	if (chance(5)) /* a 2 MiB or 1 GiB frame with low bits */
		v = (v & ~ADDR) | ((frame_choice() & ~0x1FFFFFull) + 0x1000 * below(512)) | PS_;
	return v;
}

static uint64_t pte_ptr(void)
{
	switch (below(10)) {
	case 0: return hostile_addr();
	case 1: return any_pool() + below(4096);  /* maybe unaligned */
	default: return pool[below(6)] + 8 * below(512); /* the guest's own tables first */
	}
}

static uint64_t non_canonical(uint64_t va) { return va | (1ull << (48 + below(15))); } /* maybe */
/* Surely not canonical: exactly one of bits 63..48 set, whatever bit 47 is. */
static uint64_t never_canonical(uint64_t va) { return (va & 0xFFFFFFFFFFFFull) | 1ull << (48 + below(16)); }

static uint64_t seg_base(void)
{
	switch (below(10)) {
	case 0: case 1: case 2: return scratch + 8 * below(64);
	case 3: return pool[below(6)] + 8 * below(64); /* a page-table page */
	case 4: return any_pool();
	case 5: return chance(50) ? ROM_IMAGE : MONITOR + 0x1000 * below(8) + 8 * below(64);
	case 6: return ram_end;
	case 7: return non_canonical(scratch);
	case 8: return 1ull << 39;                    /* unmapped */
	default: return data[below(NDATA)] + 8 * below(64);
	}
}

static uint64_t descriptor_low(uint64_t base, uint32_t limit, unsigned type, int system, int present)
{
	return (limit & 0xFFFFull) | (base & 0xFFFFFFull) << 16 | (uint64_t)(type & 0xF) << 40 |
	       (uint64_t)(system ? 0 : 1) << 44 | (uint64_t)below(4) << 45 | (uint64_t)(present ? 1 : 0) << 47 |
	       (uint64_t)((limit >> 16) & 0xF) << 48 | (uint64_t)below(16) << 52 | ((base >> 24) & 0xFF) << 56;
}

static uint64_t any_selector(void)
{
	switch (below(6)) {
	case 0: return below(0x10000);
	case 1: return (GDT_FIRST_FREE + below(512 - GDT_FIRST_FREE)) << 3 | below(4);
	case 2: return 1ull << 16 | 0x40;
	case 3: return 0;
	default: return (GDT_FIRST_FREE + below(16)) << 3;
	}
}

/* Does the loaded LDT / TR point into a registered table or the ROM?  Then a write must be refused. */
static uint64_t seg_base_of(uint16_t sel)
{
	uint64_t lo = rd64(gdt + (sel & ~7u)), hi = rd64(gdt + (sel & ~7u) + 8);
	return ((lo >> 16) & 0xFFFFFF) | ((lo >> 56) & 0xFF) << 24 | (hi & 0xFFFFFFFF) << 32;
}

static int protected_gpa(uint64_t gpa) { return is_table(gpa) || (gpa >= ROM_IMAGE && gpa < ROM_DATA); }

/* --- one attack per spec call -------------------------------------------------------- */

/*
 * Arguments for the canonical call `c`; returns the statuses it may give.
 * *skip is set when no safe arguments exist (the call is then not made).
 */
static uint32_t gen_args(uint32_t c, uint64_t *a, int *skip)
{
	uint64_t v;
	a[0] = hostile_addr(), a[1] = hostile_addr(), a[2] = chance(80) ? 0 : rnd();
	switch (c) {
	case VMI_CALL_CPU_SHUTDOWN:
		*skip = 1;
		return 0;
	case VMI_CALL_CPU_REBOOT:
	case VMI_CALL_CPU_RDPMC:
		return BIT(VMI_ERR_NOT_SUPPORTED);
	case VMI_CALL_CPU_CPUID:
		a[0] = chance(50) ? below(0x20) | (chance(30) ? 0x80000000u : 0) : rnd();
		return ALL_ERRORS;
	case VMI_CALL_CPU_RDMSR:
		a[0] = chance(30) ? rnd() : chance(50) ? 0xC0000000u + below(0x110) : below(0x1000);
		return BIT(0) | BIT(VMI_ERR_INVALID_ARGUMENT);
	case VMI_CALL_CPU_WRMSR:
		switch (below(4)) {
		case 0: /* EFER: flip LME/LMA or a reserved bit */
			a[0] = MSR_EFER;
			a[1] = efer_0 ^ (1ull << (chance(50) ? 8 + 2 * below(2) : 16 + below(40)));
			return BIT(VMI_ERR_PERMISSION);
		case 1: /* harmless MSRs the guest owns (no syscalls, no FS/GS use here) */
			a[0] = chance(50) ? MSR_STAR : 0xC0000102u;
			a[1] = chance(50) ? rnd() : non_canonical(rnd() & 0xFFFFFFFFFFFFull);
			return BIT(0) | BIT(VMI_ERR_INVALID_ARGUMENT);
		default: /* MSRs outside the writable set */
			do
				a[0] = chance(50) ? rnd() & 0xFFFFFFFFull : below(0x200) | (chance(50) ? 0xC0000000u : 0);
			while (a[0] == MSR_STAR || (a[0] >= 0x174 && a[0] <= 0x176) || a[0] == 0x277 ||
			       (a[0] >= 0xC0000080u && a[0] <= 0xC0000084u) || (a[0] >= 0xC0000100u && a[0] <= 0xC0000103u));
			a[1] = rnd();
			return BIT(VMI_ERR_PERMISSION);
		}
	case VMI_CALL_CPU_SETCR0:
		v = cr0_0;
		switch (below(5)) {
		case 0: a[0] = v | 1ull << (32 + below(32)); return BIT(VMI_ERR_INVALID_ARGUMENT);
		case 1: a[0] = v & ~CR0_PG; return BIT(VMI_ERR_PERMISSION);
		case 2: a[0] = v & ~CR0_PE; return BIT(VMI_ERR_PERMISSION);
		case 3: a[0] = (v | CR0_NW) & ~CR0_CD; return BIT(VMI_ERR_INVALID_ARGUMENT);
		default: a[0] = v; return BIT(0);
		}
	case VMI_CALL_CPU_SETCR4:
		v = cr4_0;
		switch (below(4)) {
		case 0: a[0] = v | 1ull << (32 + below(32)); return BIT(VMI_ERR_INVALID_ARGUMENT);
		case 1: a[0] = v & ~CR4_PAE; return BIT(VMI_ERR_PERMISSION);
		case 2: a[0] = v | (1ull << 15); return BIT(VMI_ERR_INVALID_ARGUMENT); /* reserved */
		default: a[0] = v; return BIT(0);
		}
	case VMI_CALL_CPU_SETCR3: {
		int i = (int)below(NPOOL);
		switch (below(6)) {
		case 0: a[0] = ram_end + 0x1000 * below(16); return BIT(VMI_ERR_BAD_ADDRESS);
		case 1: a[0] = (1ull << (52 + below(12))) | boot_cr3; return BIT(VMI_ERR_INVALID_ARGUMENT);
		case 2: a[0] = boot_cr3; return BIT(VMI_ERR_NOT_PAGE_TABLE);
		case 3: a[0] = ROM_IMAGE; return BIT(VMI_ERR_BAD_ADDRESS);
		default:
			if (level_of[i] == 4) {
				*skip = 1; /* a registered root without the identity map: accepted, and fatal */
				return 0;
			}
			a[0] = pool[i];
			return BIT(level_of[i] ? VMI_ERR_WRONG_LEVEL : VMI_ERR_NOT_PAGE_TABLE);
		}
	}
	case VMI_CALL_CPU_DEPRIVILEGE: /* idempotent: it answers the privilege the kernel already has */
		return BIT(0);
	case VMI_CALL_CPU_RETURNTOUSER: /* reject-only: a non-canonical rip or rsp (an accepted call
					 * would leave the kernel for user code at a hostile address) */
		if (chance(50))
			a[0] = never_canonical(a[0]);
		else
			a[1] = never_canonical(a[1]);
		a[2] = rnd();
		return BIT(VMI_ERR_INVALID_ARGUMENT);
#ifdef VMI_CALL_EVENTCHANNEL_SETCALLBACK
	case VMI_CALL_EVENTCHANNEL_SETCALLBACK: /* reject-only: an accepted entry would hand the next
						 * event to a random address (a guest bug, not the VMM's) */
		a[0] = never_canonical(a[0]);
		return BIT(VMI_ERR_BAD_ADDRESS);
#endif
	case VMI_CALL_EVENTCHANNEL_SEND:
	case VMI_CALL_EVENTCHANNEL_POLL:
		a[0] = chance(70) ? below(VMI_EVTCHN_PORTS + 2) : rnd();
		a[1] = rnd();
		return a[0] >= VMI_EVTCHN_PORTS ? BIT(VMI_ERR_INVALID_ARGUMENT) : BIT(0) | BIT(VMI_ERR_AGAIN);
	case VMI_CALL_CPU_SETCR2:
		a[0] = rnd();
		return BIT(0) | BIT(VMI_ERR_INVALID_ARGUMENT);
	case VMI_CALL_CPU_GETDR:
		a[0] = chance(50) ? below(8) : rnd();
		return BIT(0) | BIT(VMI_ERR_INVALID_ARGUMENT);
	case VMI_CALL_CPU_SETDR:
		a[0] = chance(70) ? below(7) : rnd(); /* DR0-3 any value (DR7 keeps them off), DR6 */
		a[1] = a[0] == 6 ? rnd() & 0xFFFFFFFFull : rnd();
		if (a[0] == 6 && chance(50))
			a[1] = rnd();
		if (chance(15)) { /* DR7 only with bits the CPU refuses */
			a[0] = 7;
			a[1] = 1ull << (32 + below(32));
			return BIT(VMI_ERR_INVALID_ARGUMENT);
		}
		return BIT(0) | BIT(VMI_ERR_INVALID_ARGUMENT);
	case VMI_CALL_CPU_SETINTERRUPTMASK:
		a[0] = rnd();
		return BIT(0);
	case VMI_CALL_SEGMENTATION_SETGDT:
	case VMI_CALL_SEGMENTATION_SETIDT: {
		uint64_t base = c == VMI_CALL_SEGMENTATION_SETGDT ? gdt : idt_base;
		uint64_t limit = c == VMI_CALL_SEGMENTATION_SETGDT ? gdt_limit : idt_limit;
		switch (below(6)) {
		case 0: a[0] = base, a[1] = 0x10000 + below(1ull << 32); return BIT(VMI_ERR_INVALID_ARGUMENT);
		case 1: a[0] = 1ull << 39 | below(1ull << 39), a[1] = below(0x10000); return BIT(VMI_ERR_BAD_ADDRESS);
		case 2: a[0] = chance(50) ? ROM_IMAGE : MONITOR + 0x1000 * below(8), a[1] = below(0x1000);
			return BIT(VMI_ERR_BAD_ADDRESS);
		case 3: a[0] = ram_end - 0x800, a[1] = 0x1000 + below(0xF000); return BIT(VMI_ERR_BAD_ADDRESS);
		case 4: /* a non-canonical base that the identity map would translate */
			a[0] = non_canonical(base), a[1] = limit;
			return BIT(VMI_ERR_BAD_ADDRESS) | BIT(VMI_ERR_INVALID_ARGUMENT);
		default: a[0] = base, a[1] = limit; return BIT(0);
		}
	}
	case VMI_CALL_SEGMENTATION_WRITEGDTENTRY: {
		int system = chance(50);
		unsigned type = system && chance(60) ? (unsigned)(chance(50) ? 0x2 : 0x9) : (unsigned)below(16);
		a[0] = chance(10) ? 0 : chance(10) ? 512 + below(1ull << 20) : GDT_FIRST_FREE + below(512 - GDT_FIRST_FREE - 1);
		a[1] = chance(10) ? rnd() : descriptor_low(seg_base(), (uint32_t)(chance(50) ? 0x67 + below(0x1000) : rnd()), type, system, chance(85));
		a[2] = chance(10) ? rnd() : system ? seg_base() >> 32 : 0;
		return a[0] == 0 || a[0] >= 512 ? BIT(VMI_ERR_INVALID_ARGUMENT) : BIT(0) | BIT(VMI_ERR_INVALID_ARGUMENT);
	}
	case VMI_CALL_SEGMENTATION_SETLDT:
	case VMI_CALL_SEGMENTATION_SETTR:
		a[0] = any_selector();
		if ((a[0] >> 3) < GDT_FIRST_FREE && a[0] >= 8) /* the guest's own code/data selectors */
			a[0] = 0x10;
		return ALL_ERRORS;
	case VMI_CALL_SEGMENTATION_WRITEIDTENTRY:
		switch (below(5)) {
		case 0: a[0] = 256 + below(1ull << 32); a[1] = rnd(); a[2] = rnd(); return BIT(VMI_ERR_INVALID_ARGUMENT);
		case 1: /* present, not an interrupt or trap gate */
			a[0] = below(256);
			do
				a[1] = ((rnd() | 1ull << 47) & ~(0xFull << 40)) | (below(16) << 40);
			while (((a[1] >> 40) & 0xF) == 0xE || ((a[1] >> 40) & 0xF) == 0xF);
			a[2] = 0;
			return BIT(VMI_ERR_INVALID_ARGUMENT);
		case 2: /* present gate with a null selector */
			a[0] = below(256);
			a[1] = (rnd() | 1ull << 47 | 0xEull << 40) & ~(0xFFFFull << 16) & ~(1ull << 44);
			a[2] = 0;
			return BIT(VMI_ERR_INVALID_ARGUMENT);
		case 3: /* present gate, upper dword of high set */
			a[0] = below(256);
			a[1] = (0x08ull << 16) | 1ull << 47 | 0xEull << 40;
			a[2] = 1ull << (32 + below(32));
			return BIT(VMI_ERR_INVALID_ARGUMENT);
		default: /* not present, at a vector no interrupt ever uses */
			a[0] = 64 + below(192);
			a[1] = rnd() & ~(1ull << 47);
			a[2] = rnd() & 0xFFFFFFFFull;
			return BIT(0);
		}
	case VMI_CALL_SEGMENTATION_WRITELDTENTRY:
		a[0] = chance(20) ? rnd() & 0xFFFFFFFF : below(8);
		a[1] = chance(50) ? 0x00CF92000000FFFFull : rnd();
		a[2] = chance(70) ? 0 : rnd();
		if (ldt_loaded && protected_gpa(ldt_base + 8 * a[0]))
			return ALL_ERRORS & ~BIT(0);
		return ALL_ERRORS;
	case VMI_CALL_SEGMENTATION_UPDATEKERNELSTACK:
		a[0] = rnd();
		if (tr_loaded && protected_gpa(tr_base + 4))
			return ALL_ERRORS & ~BIT(0);
		return ALL_ERRORS;
	case VMI_CALL_MMU_SETPTE:
	case VMI_CALL_MMU_SETLONGPTE:
		if (chance(15)) { /* a writable alias of a page table or of the ROM */
			int t = (int)below(5), pt = 3 + (int)below(2);
			a[0] = pool[pt] + 8 * below(512);
			a[1] = (chance(70) ? pool[t] : ROM_IMAGE + 0x1000 * below(16)) | LEAF_RW; /* ROM or monitor */
			if (level_of[pt] != 1)
				return ALL_ERRORS & ~BIT(VMI_ERR_BATCH_INVALID); /* not a PT now: judged at another level */
			if (is_table(a[1]) || (a[1] & ADDR) < pool[0])
				return BIT(VMI_ERR_PERMISSION);
			return BIT(0);
		}
		a[0] = pte_ptr();
		a[1] = pte_value();
		return ALL_ERRORS & ~BIT(VMI_ERR_BATCH_INVALID);
	case VMI_CALL_MMU_FLUSHTLB:
		a[0] = chance(60) ? below(4) : rnd();
		return a[0] & ~3ull ? BIT(VMI_ERR_INVALID_ARGUMENT) : BIT(0);
	case VMI_CALL_MMU_INVALPAGE:
		a[0] = rnd();
		return BIT(0);
	case VMI_CALL_MMU_ALLOCATEPAGE:
		a[1] = chance(80) ? 1 + below(4) : rnd();
		switch (below(6)) {
		case 0: a[0] = victim; return BIT(VMI_ERR_BAD_ADDRESS) | BIT(VMI_ERR_INVALID_ARGUMENT); /* outside the pool */
		case 1: a[0] = hostile_addr() | (chance(50) ? below(4096) : 0);
			return ALL_ERRORS & ~BIT(VMI_ERR_BATCH_INVALID);
		case 2: a[0] = data[below(NDATA)]; return ALL_ERRORS & ~BIT(0) & ~BIT(VMI_ERR_BATCH_INVALID);
		default: a[0] = pool[5 + below(NPOOL - 5)]; return ALL_ERRORS & ~BIT(VMI_ERR_BATCH_INVALID);
		}
	case VMI_CALL_MMU_RELEASEPAGE:
		a[0] = chance(80) ? pool[5 + below(NPOOL - 5)] : chance(50) ? hostile_addr() : pool[below(5)];
		return ALL_ERRORS & ~BIT(VMI_ERR_BATCH_INVALID);
	case VMI_CALL_QUERY_HASFAMILY:
		a[0] = chance(50) ? below(0x100) : rnd();
		return a[0] > 0xFF ? BIT(VMI_ERR_INVALID_ARGUMENT) : BIT(0);
	case VMI_CALL_QUERY_QUERYCALL:
		a[0] = chance(50) ? rnd() & 0xFFFF00FFull : rnd();
		return BIT(0) | BIT(VMI_ERR_RESERVED_BITS);
	case VMI_CALL_MMU_FLUSHQUEUE:
		*skip = 2; /* its own attack, below */
		return 0;
	default:
		return ALL_ERRORS;
	}
}

/* After a successful registration call, keep the model right. */
static void model_update(uint32_t c, const uint64_t *a)
{
	int i = pool_index(a[0]);
	if (c == VMI_CALL_MMU_ALLOCATEPAGE) {
		if (i < 0 || (a[0] & 0xFFF))
			surprise("AllocatePage accepted a page outside the page-table pool");
		else
			level_of[i] = (int)a[1];
	} else if (c == VMI_CALL_MMU_RELEASEPAGE && i >= 0) {
		level_of[i] = 0;
	} else if (c == VMI_CALL_SEGMENTATION_SETTR) {
		tr_loaded = 1, tr_base = seg_base_of((uint16_t)a[0]);
	} else if (c == VMI_CALL_SEGMENTATION_SETLDT) {
		ldt_loaded = a[0] != 0, ldt_base = a[0] ? seg_base_of((uint16_t)a[0]) : 0;
	}
}

/* --- FlushQueue with corrupted batches, and the ROM's queue ---------------------------- */

static void batch_entry(struct vmi_batch_entry *e)
{
	e->call_id = chance(85) ? (chance(50) ? VMI_CALL_MMU_SETPTE : VMI_CALL_MMU_SETLONGPTE) |
					  (chance(30) ? (uint32_t)below(256) : 0)
				: (uint32_t)rnd();
	if (chance(3))
		e->call_id |= (uint32_t)(1 + below(255)) << 8;
	e->reserved = chance(3) ? (uint32_t)rnd() : 0;
	e->args[0] = chance(90) ? pool[below(5)] + 8 * below(512) : pte_ptr();
	e->args[1] = chance(60) ? (frame_choice() & ADDR) | (chance(50) ? LEAF_RW : P_ | A_ | D_) : pte_value();
	e->args[2] = chance(95) ? 0 : rnd();
}

/* Entries a batch targets that the guest can read (aligned, in its pool pages). */
static int readable(uint64_t ptep) { return !(ptep & 7) && pool_index(ptep) >= 0; }

static uint64_t before_values[NBATCH];

static void snapshot(const struct vmi_batch_entry *e, unsigned n)
{
	for (unsigned k = 0; k < n; k++)
		before_values[k] = readable(e[k].args[0]) ? rd64(e[k].args[0]) : 0;
}

/* A rejected batch leaves every entry it names as it was; an accepted one lands the last
 * write to each.  (Memory is slow here, so only the named entries are read; the host's
 * auditor covers every other table word.) */
static void check_batch(long s, const struct vmi_batch_entry *e, unsigned n)
{
	static uint64_t seen[1024]; /* pteps already checked, newest first: a small open hash */
	memset(seen, 0, sizeof(seen));
	for (unsigned k = n; k-- > 0;) {
		uint64_t ptep = e[k].args[0];
		if (!readable(ptep))
			continue;
		if (s != 0) {
			if (rd64(ptep) != before_values[k])
				surprise("a rejected batch changed a page table");
			continue;
		}
		unsigned h = (unsigned)((ptep >> 3) * 0x9E3779B1u) & 1023;
		while (seen[h] && seen[h] != ptep)
			h = (h + 1) & 1023;
		if (seen[h] == ptep)
			continue; /* a later entry wrote it */
		seen[h] = ptep;
		if ((rd64(ptep) & ~(A_ | D_)) != (e[k].args[1] & ~(A_ | D_)))
			surprise("an accepted batch did not land an entry");
	}
}

static void attack_flush_queue(uint32_t id)
{
	uint64_t n = below(NBATCH + 1), ptr = (uintptr_t)batch, count = n;
	uint32_t allowed = BIT(0) | BIT(VMI_ERR_BATCH_INVALID);
	for (unsigned k = 0; k < n && k < NBATCH; k++)
		batch_entry(&batch[k]);
	if (chance(10)) {
		count = chance(50) ? rnd() : VMI_BATCH_MAX_ENTRIES + 1 + below(1ull << 32);
	} else if (chance(10)) {
		ptr = chance(50) ? hostile_addr() : ptr + 1 + below(7);
		allowed |= BIT(VMI_ERR_BAD_ADDRESS);
	}
	if (count > VMI_BATCH_MAX_ENTRIES)
		allowed = BIT(VMI_ERR_INVALID_ARGUMENT);
	else if (count == 0)
		allowed = BIT(0);
	uint64_t r[4] = { 0 };
	int checked = ptr == (uintptr_t)batch && count <= VMI_BATCH_MAX_ENTRIES;
	if (checked)
		snapshot(batch, (unsigned)count);
	long s = call(id, ptr, count, 0, allowed, r);
	if (checked)
		check_batch(s, batch, (unsigned)count);
	if (s == VMI_ERR_BATCH_INVALID && r[0] >= count)
		surprise("BATCH_INVALID names an index outside the batch");
}

/* The ROM's queued SetPTE, then one flush: same all-or-nothing rule. */
static void attack_queue(void)
{
	static struct vmi_batch_entry q[24];
	unsigned n = 1 + (unsigned)below(24);
	uint64_t r[4] = { 0 };
	for (unsigned k = 0; k < n; k++) {
		batch_entry(&q[k]);
		q[k].call_id = VMI_CALL_MMU_SETPTE | VMI_ANN_QUEUE, q[k].reserved = 0, q[k].args[2] = 0;
	}
	snapshot(q, n);
	for (unsigned k = 0; k < n; k++) {
		count_call();
		record(KIND_QUEUED, q[k].call_id, q[k].args[0], q[k].args[1], 0);
		long s = vmi_set_pte_queued((uint64_t *)(uintptr_t)q[k].args[0], q[k].args[1]);
		fuzz_record.status = s;
		if (s != 0 && !(vmi_rom_flags() & 1)) /* no queue in this ROM: each one is a plain SetPTE */
			n = k + 1;
		if (s != 0 && (vmi_rom_flags() & 1))
			surprise("a queued SetPTE failed before its flush");
		if (s != 0)
			break;
	}
	count_call();
	record(KIND_CALL, VMI_CALL_MMU_FLUSHQUEUE, 0, 0, 0);
	long s = vmi_raw_call(VMI_CALL_MMU_FLUSHQUEUE, 0, 0, 0, r); /* through the raw entry: it pre-flushes */
	fuzz_record.status = s;
	count_status(s);
	if (s != 0 && s != VMI_ERR_BATCH_INVALID && s != VMI_ERR_INVALID_ARGUMENT)
		surprise("flushing the ROM's queue gave an unexpected status");
	if (vmi_rom_flags() & 1)
		check_batch(s, q, n);
	if (s)
		canary();
}

/* --- plain stores: the ROM, the pool, the shadow area, nothing ----------------------------- */

static void attack_store(void)
{
	uint64_t addr;
	stat.stores++;
	switch (below(4)) {
	case 0: { /* the ROM image and the monitor area (the hypervisor's GDT, IDTs, TSS) are read-only */
		addr = ROM_IMAGE + below(0x10000);
		volatile uint8_t *p = (volatile uint8_t *)(uintptr_t)addr;
		uint8_t old = *p;
		record(KIND_STORE, 0, addr, (uint8_t)~old, 0);
		*p = (uint8_t)~old;
		if (*p != old)
			surprise("a guest store changed the ROM");
		break;
	}
	case 1: { /* a registered page table: only SetPTE may change it */
		addr = pool[below(5)] + 8 * below(512);
		volatile uint64_t *p = (volatile uint64_t *)(uintptr_t)addr;
		uint64_t old = *p, v = pool[below(5)] | LEAF_RW;
		record(KIND_STORE, 0, addr, v, 0);
		*p = v;
		if (direct && *p != old)
			surprise("a guest store changed a page table (direct paging)");
		break;
	}
	case 2: /* the hypervisor's shadow tables, if any, through the boot identity map */
		addr = SHADOW_BASE + 8 * below(512);
		record(KIND_STORE, 0, addr, LEAF_RW, 0);
		*(volatile uint64_t *)(uintptr_t)addr = LEAF_RW;
		break;
	default: /* nothing decodes this: reads float high */
		addr = MMIO_HOLE + 8 * below(512);
		record(KIND_STORE, 0, addr, rnd(), 0);
		*(volatile uint64_t *)(uintptr_t)addr = fuzz_record.a1;
		if (*(volatile uint32_t *)(uintptr_t)addr != 0xFFFFFFFFu)
			surprise("unmapped MMIO did not read as all ones");
		break;
	}
	fuzz_record.status = 0;
}

/* --- choosing a call ------------------------------------------------------------------ */

static const uint32_t legacy_map[][2] = {
#define L(n, c) { VMI_LEGACY_##n, VMI_CALL_##c }
	L(CPUID, CPU_CPUID), L(WRMSR, CPU_WRMSR), L(RDMSR, CPU_RDMSR), L(SETGDT, SEGMENTATION_SETGDT),
	L(SETLDT, SEGMENTATION_SETLDT), L(SETIDT, SEGMENTATION_SETIDT), L(SETTR, SEGMENTATION_SETTR),
	L(WRITEGDTENTRY, SEGMENTATION_WRITEGDTENTRY), L(WRITELDTENTRY, SEGMENTATION_WRITELDTENTRY),
	L(WRITEIDTENTRY, SEGMENTATION_WRITEIDTENTRY), L(UPDATEKERNELSTACK, SEGMENTATION_UPDATEKERNELSTACK),
	L(SETCR0, CPU_SETCR0), L(SETCR2, CPU_SETCR2), L(SETCR3, CPU_SETCR3), L(SETCR4, CPU_SETCR4),
	L(GETCR0, CPU_GETCR0), L(SETDR, CPU_SETDR), L(GETDR, CPU_GETDR), L(SETPXE, MMU_SETPTE),
	L(SETPXELONG, MMU_SETLONGPTE), L(ALLOCATEPAGE, MMU_ALLOCATEPAGE), L(RELEASEPAGE, MMU_RELEASEPAGE),
	L(FLUSHTLB, MMU_FLUSHTLB), L(INVALPAGE, MMU_INVALPAGE), L(SHUTDOWN, CPU_SHUTDOWN), L(REBOOT, CPU_REBOOT),
	L(HALT, CPU_HALT), L(SETINTERRUPTMASK, CPU_SETINTERRUPTMASK), L(RDPMC, CPU_RDPMC), L(IRET, CPU_RETURNTOUSER),
#undef L
};

static const struct {
	uint32_t family, ncalls;
} families[] = {
	{ VMI_FAMILY_CPU, VMI_FAMILY_CPU_NCALLS },
	{ VMI_FAMILY_SEGMENTATION, VMI_FAMILY_SEGMENTATION_NCALLS },
	{ VMI_FAMILY_MMU, VMI_FAMILY_MMU_NCALLS },
	{ VMI_FAMILY_QUERY, VMI_FAMILY_QUERY_NCALLS },
	{ VMI_FAMILY_EVENTCHANNEL, VMI_FAMILY_EVENTCHANNEL_NCALLS },
};

/* Legacy VMI 3.0 numbers with no family call: NOT_SUPPORTED. */
static const uint32_t legacy_only[] = {
	VMI_LEGACY_SYSEXIT, VMI_LEGACY_UPDATEPXE, VMI_LEGACY_UPDATEPXELONG, VMI_LEGACY_MACHINETOPHYSICAL,
	VMI_LEGACY_PHYSICALTOMACHINE, VMI_LEGACY_SETLINEARMAPPING, VMI_LEGACY_SETIOPLMASK,
	VMI_LEGACY_SETINITIALAPSTATE, VMI_LEGACY_APICWRITE, VMI_LEGACY_APICREAD, VMI_LEGACY_SETLAZYMODE,
};

/* --- what an arbitrary call ID names ------------------------------------------------------ */

enum { ID_UNKNOWN, ID_RESERVED, ID_CALL, ID_UNSURE };

/* Which answer the ID alone decides: RESERVED_BITS, NOT_SUPPORTED (no such call here), or a
 * call (*canonical; it then runs).  ID_UNSURE: a legacy number the fuzzer has no table for. */
static int id_class(uint32_t id, uint32_t *canonical)
{
	unsigned f = VMI_CALLID_FAMILY(id), c = VMI_CALLID_CALL(id);
	*canonical = 0;
	if (VMI_CALLID_RESERVED(id))
		return ID_RESERVED;
	if (f == VMI_FAMILY_LEGACY) {
		for (unsigned k = 0; k < ARRAY_SIZE(legacy_map); k++)
			if (legacy_map[k][0] == c)
				*canonical = legacy_map[k][1];
		for (unsigned k = 0; k < ARRAY_SIZE(legacy_only) && !*canonical; k++)
			if (legacy_only[k] == c)
				return ID_UNKNOWN;
		if (!*canonical)
			return ID_UNSURE;
	} else if (f == VMI_FAMILY_EXPERIMENTAL) {
		for (unsigned k = 0; k < n_experimental; k++)
			if (experimental[k] == (id & ~VMI_CALLID_ANNOTATION_MASK)) {
				*canonical = experimental[k];
				return ID_CALL;
			}
		return ID_UNKNOWN;
	} else {
		for (unsigned k = 0; k < ARRAY_SIZE(families); k++)
			if (families[k].family == f && c < families[k].ncalls)
				*canonical = VMI_CALLID(f, c, 0);
		if (!*canonical)
			return ID_UNKNOWN;
	}
	return supported[VMI_CALLID_FAMILY(*canonical)][VMI_CALLID_CALL(*canonical)] ? ID_CALL : ID_UNKNOWN;
}

/* --- ID floods: bursts of distinct call IDs, (nearly) all unknown or with reserved bits ------- */

/*
 * Every ID of a run is distinct: family, call and annotation bytes are a bijection of a running
 * counter (24 bits: 16 M IDs before one repeats), the reserved byte is zero for half of them.
 * So a hypervisor that keeps a counter per call ID meets a new one every call.  An ID that
 * names a call gets reserved bits (refused before dispatch: the flood never runs a call).
 * Each must answer exactly RESERVED_BITS or NOT_SUPPORTED; the canary runs once a burst.
 */
static uint32_t flood_next;
static int flood_seeded;

static uint32_t flood_id(void)
{
	uint32_t x = flood_next++ & 0xFFFFFFu; /* a bijection on 24 bits: odd multipliers, xorshifts */
	x = (x * 0xB5AD4Bu) & 0xFFFFFFu;
	x ^= x >> 12;
	x = (x * 0x2C1B3Du) & 0xFFFFFFu;
	x ^= x >> 11;
	return (x >> 8) << 16 | (x & 0xFFu);
}

static void attack_id_flood(uint64_t budget)
{
	uint64_t n = 16 + below(241), r[4];
	if (n > budget)
		n = budget ? budget : 1;
	if (!flood_seeded)
		flood_next = (uint32_t)rnd(), flood_seeded = 1;
	for (uint64_t k = 0; k < n; k++) {
		uint32_t id = flood_id(), canonical;
		if (chance(50))
			id |= (uint32_t)(1 + below(255)) << 8;
		int kind = id_class(id, &canonical);
		if (kind == ID_CALL || kind == ID_UNSURE)
			id |= (uint32_t)(1 + below(255)) << 8, kind = ID_RESERVED;
		long want = kind == ID_RESERVED ? VMI_ERR_RESERVED_BITS : VMI_ERR_NOT_SUPPORTED;
		uint64_t a0 = chance(50) ? hostile_addr() : rnd(), a1 = rnd(), a2 = rnd();
		count_call();
		record(KIND_CALL, id, a0, a1, a2);
		long s = vmi_raw_call(id, a0, a1, a2, r);
		fuzz_record.status = s;
		count_status(s);
		if (s != want) {
			surprise(want == VMI_ERR_RESERVED_BITS ? "id flood: an ID with reserved bits was not refused with RESERVED_BITS"
							       : "id flood: an unknown ID was not refused with NOT_SUPPORTED");
			canary();
		}
	}
	canary();
}

/* --- hostile batches sized by the spec ------------------------------------------------------ */

/*
 * FlushQueue with counts around and beyond batch.max_entries (VMI_BATCH_MAX_ENTRIES), valid
 * batches with exactly one bad entry at a chosen index (BATCH_INVALID must name that index and
 * its error, and change nothing), every one of the VMI_BATCH_MAX_ARGS argument slots at boundary
 * values, and buffers at the edges of guest RAM: ending exactly at its end (valid), crossing it,
 * crossing the end of low RAM or of the ROM's data area, in the ROM, the monitor area, the shadow
 * area, the MMIO hole, wrapping around 2^64.  The buffer at the end of RAM is the last pages
 * below ram_end, which the allocator never reaches in a fuzz run.
 */
#define MAXB VMI_BATCH_MAX_ENTRIES
#define EDGE_BYTES ((uint64_t)(MAXB + 2) * sizeof(struct vmi_batch_entry))
static uint64_t edge_top; /* ram_end if the pages below it are free for the guest, else 0 */
static int straddle = 1;   /* cmdline straddle=0: leave out batches across the pool's boundaries */
static int straddle_ok;    /* the RAM below the pool is free for the guest */

static int some_pt(void) /* a registered PT of the guest's (pool index), or -1 */
{
	int start = (int)below(NPOOL);
	for (int k = 0; k < NPOOL; k++)
		if (level_of[(start + k) % NPOOL] == 1)
			return (start + k) % NPOOL;
	return -1;
}

/* An entry the hypervisor must accept: SetPTE of a PT entry to not-present or a read-only data page. */
static void valid_entry(struct vmi_batch_entry *e, int pt)
{
	e->call_id = VMI_CALL_MMU_SETPTE | (chance(20) ? (uint32_t)below(256) : 0);
	e->reserved = 0;
	e->args[0] = pool[pt] + 8 * below(512);
	e->args[1] = chance(30) ? 0 : data[below(NDATA)] | P_ | A_ | D_ | (chance(50) ? US_ : 0);
	for (unsigned j = 2; j < VMI_BATCH_MAX_ARGS; j++)
		e->args[j] = 0;
}

/* Make entry `e` (valid so far) bad in one way; returns the errors its BATCH_INVALID cause may be. */
static uint32_t spoil_entry(struct vmi_batch_entry *e)
{
	switch (below(11)) {
	case 0: e->reserved = 1u << below(32); return BIT(VMI_ERR_RESERVED_BITS);
	case 1: e->call_id |= (uint32_t)(1 + below(255)) << 8; return BIT(VMI_ERR_RESERVED_BITS);
	case 2: /* a call that may not be queued: it must not run either */
		switch (below(4)) {
		case 0: e->call_id = VMI_CALL_CPU_SHUTDOWN; break;
		case 1: e->call_id = VMI_CALL_MMU_FLUSHQUEUE; break;
		case 2: e->call_id = VMI_CALL_QUERY_GETVERSION; break;
		default: e->call_id = VMI_CALLID(0x42, below(256), 0); break;
		}
		return BIT(VMI_ERR_NOT_SUPPORTED);
	case 3: e->args[0] += 1 + below(7); return BIT(VMI_ERR_BAD_ADDRESS);
	case 4: e->args[0] = data[below(NDATA)] + 8 * below(512); return BIT(VMI_ERR_NOT_PAGE_TABLE);
	case 5:
		e->args[0] = chance(50) ? ram_end + 8 * below(512) : chance(50) ? MMIO_HOLE : ~7ull;
		return BIT(VMI_ERR_BAD_ADDRESS);
	case 6: { /* a writable mapping of a registered table */
		int t = (int)below(NPOOL);
		if (!level_of[t])
			t = 0;
		if (!level_of[t])
			break;
		e->args[1] = pool[t] | LEAF_RW;
		return BIT(VMI_ERR_PERMISSION);
	}
	case 7: e->args[1] = (ROM_IMAGE + 0x1000 * below(16)) | LEAF_RW; return BIT(VMI_ERR_PERMISSION);
	case 8: /* reserved bits: bit 51 is above any MAXPHYADDR below 52 (at 52 it is RAM's far end) */
		e->args[1] = data[0] | 1ull << 51 | P_;
		return BIT(VMI_ERR_RESERVED_PTE_BITS) | BIT(VMI_ERR_BAD_ADDRESS);
	case 9: e->args[0] = ROM_IMAGE + 8 * below(0x2000); return BIT(VMI_ERR_BAD_ADDRESS) | BIT(VMI_ERR_NOT_PAGE_TABLE);
	default: break;
	}
	e->reserved = 0xFFFFFFFFu;
	return BIT(VMI_ERR_RESERVED_BITS);
}

/* Boundary values of one argument slot. */
static uint64_t boundary(void)
{
	switch (below(14)) {
	case 0: return 0;
	case 1: return 1;
	case 2: return ~0ull;
	case 3: return 1ull << 63;
	case 4: return 0xFFFFFFFFull;
	case 5: return 1ull << 32;
	case 6: return ram_end - 8;
	case 7: return ram_end;
	case 8: return (ram_end - 4096) | P_ | A_ | D_;
	case 9: return pool[below(NPOOL)] + 0xFF8;
	case 10: return pool[below(NPOOL)] + 0x1000;
	case 11: return ((1ull << 52) - 4096) | P_;
	case 12: return 0x7FFFFFFFFFFFFFFFull;
	default: return PENDING;
	}
}

static void flush_edge(struct vmi_batch_entry *e, uint64_t ptr, uint64_t count, uint32_t allowed,
		       uint32_t causes, uint64_t bad_index, unsigned checked)
{
	uint64_t r[4] = { 0 };
	snapshot(e, checked);
	long s = call(VMI_CALL_MMU_FLUSHQUEUE | (chance(20) ? (uint32_t)below(256) : 0), ptr, count, 0, allowed, r);
	check_batch(s, e, checked);
	if (s == VMI_ERR_BATCH_INVALID) {
		if (r[0] >= count)
			surprise("BATCH_INVALID names an index outside the batch");
		else if (bad_index != ~0ull && r[0] != bad_index)
			surprise("BATCH_INVALID names another entry than the one bad entry");
		else if (causes && (-(long)r[1] <= 0 || -(long)r[1] >= NSTATUS || !(causes & BIT((long)r[1]))))
			surprise("BATCH_INVALID gives the bad entry another error than its own");
	}
}

static void attack_edge_batch(void)
{
	int pt = some_pt();
	unsigned pick = (unsigned)below(6);
	if (pt < 0)
		pick = 5; /* no PT to aim valid entries at: only the address edges */
	struct vmi_batch_entry *e = batch;
	uint64_t count, bad = ~0ull;
	uint32_t causes = 0;

	switch (pick) {
	case 0: { /* counts around max_entries, valid entries */
		static const uint64_t counts[] = { MAXB - 1, MAXB, MAXB + 1, MAXB + 2, 2 * MAXB, 0x80000000ull, 0xFFFFFFFFull };
		count = chance(80) ? counts[below(ARRAY_SIZE(counts))] : MAXB + 1 + below(1ull << 20);
		for (unsigned k = 0; k < MAXB + 2; k++)
			valid_entry(&e[k], pt);
		unsigned n = count <= MAXB + 2 ? (unsigned)count : MAXB + 2;
		flush_edge(e, (uintptr_t)e, count, count > MAXB ? BIT(VMI_ERR_INVALID_ARGUMENT) : BIT(0), 0, bad, n);
		return;
	}
	case 1: /* one bad entry among valid ones: first, last or anywhere */
		count = chance(50) ? MAXB - below(2) : 1 + below(MAXB);
		for (unsigned k = 0; k < count; k++)
			valid_entry(&e[k], pt);
		bad = chance(30) ? 0 : chance(40) ? count - 1 : below(count);
		causes = spoil_entry(&e[bad]);
		flush_edge(e, (uintptr_t)e, count, BIT(VMI_ERR_BATCH_INVALID), causes, bad, (unsigned)count);
		return;
	case 2: /* every argument slot at a boundary value */
		count = 1 + below(MAXB);
		for (unsigned k = 0; k < count; k++) {
			valid_entry(&e[k], pt);
			for (unsigned j = 0; j < VMI_BATCH_MAX_ARGS; j++)
				if (chance(40))
					e[k].args[j] = boundary();
		}
		flush_edge(e, (uintptr_t)e, count, BIT(0) | BIT(VMI_ERR_BATCH_INVALID), 0, bad, (unsigned)count);
		return;
	case 3: /* a buffer ending exactly at the end of RAM (valid), or crossing it (BAD_ADDRESS) */
		if (edge_top) {
			uint64_t k = 1 + below(MAXB);
			count = chance(50) ? k : k + 1 + below(MAXB + 1 - k);
			if (count > MAXB)
				count = MAXB;
			e = (struct vmi_batch_entry *)(uintptr_t)(edge_top - k * sizeof(*e));
			for (unsigned j = 0; j < k; j++)
				valid_entry(&e[j], pt);
			int crosses = count > k;
			flush_edge(e, (uintptr_t)e + (crosses && chance(20) ? 4 : 0), count,
				   crosses ? BIT(VMI_ERR_BAD_ADDRESS) : BIT(0), 0, bad, (unsigned)k);
			return;
		}
		/* fall through */
	case 4: /* wholly in guest RAM, across the start or end of the page-table pool: the memory map
		 * has one RAM range there, so the entries decide (the pool's words: BATCH_INVALID) */
		if (straddle && straddle_ok) {
			uint64_t k = 1 + below(8), edge = chance(50) ? PT_POOL_BASE : PT_POOL_BASE + PT_POOL_SIZE;
			count = k + 1 + below(MAXB - k);
			e = (struct vmi_batch_entry *)(uintptr_t)(edge - k * sizeof(*e));
			struct vmi_batch_entry *mine = edge == PT_POOL_BASE ? e : (struct vmi_batch_entry *)(uintptr_t)edge;
			unsigned n = (unsigned)(edge == PT_POOL_BASE ? k : count - k); /* the entries the guest can write */
			for (unsigned j = 0; j < n; j++)
				valid_entry(&mine[j], pt);
			uint64_t r[4] = { 0 };
			snapshot(mine, n);
			long s = call(VMI_CALL_MMU_FLUSHQUEUE, (uintptr_t)e, count, 0,
				      BIT(0) | BIT(VMI_ERR_BATCH_INVALID) | BIT(VMI_ERR_BAD_ADDRESS), r);
			check_batch(s, mine, n);
			if (s == VMI_ERR_BAD_ADDRESS)
				surprise("a batch wholly in guest RAM answered BAD_ADDRESS (it crosses the page-table pool's boundary)");
			return;
		}
		/* fall through */
	default: { /* buffers that are not wholly in RAM, whatever they hold: BAD_ADDRESS */
		uint64_t k = below(4), ptr;
		count = k + 1 + below(MAXB - k);
		switch (below(10)) {
		case 0: ptr = 0x9F000ull - k * 32; break;              /* end of low RAM */
		case 1: ptr = 0xE0000ull - k * 32; break;              /* end of the ROM's data area */
		case 2: ptr = ROM_IMAGE + 32 * below(0x400); break;     /* the ROM image */
		case 3: ptr = MONITOR + 32 * below(0x400); break;       /* the monitor area */
		case 4: ptr = SHADOW_BASE + 32 * below(0x80); break;
		case 5: ptr = MMIO_HOLE - k * 32; break;
		case 6: ptr = 0 - (k + 1) * 32, count = k + 2 + below(MAXB - k - 1); break; /* wraps around 2^64 */
		case 7: ptr = 0x100000000ull - k * 32; break;          /* just below 4 GiB, above RAM */
		case 8: ptr = non_canonical((uintptr_t)batch); break;
		default: ptr = ram_end - k * 32; break;                /* whatever is there: it crosses */
		}
		flush_edge(e, ptr, count, BIT(VMI_ERR_BAD_ADDRESS), 0, bad, 0);
		return;
	}
	}
}

/* --- user mode: every call but the spec's user-safe ones is refused ------------------------- */

/*
 * The kernel enters its user mode (CPU.ReturnToUser; deprivileged, the hypervisor's virtual
 * privilege level says "user" although kernel and user share hardware ring 3), user code makes
 * a few calls with hostile arguments -- CPU.Shutdown, SetCR3, SetPTE, WRMSR, ReturnToUser,
 * legacy numbers, experimental calls -- each of which must answer exactly PERMISSION unless
 * the spec marks it user-safe, and comes back with ud2 (#UD to the kernel's IDT gate).
 * Before each trip the kernel re-establishes what the fuzzing disturbs: its TSS (SetTR,
 * UpdateKernelStack: the stack the #UD lands on) and STAR (whose user selectors a ring-0
 * kernel's ReturnToUser loads, from GDT entries 4 and 5 of its private GDT).
 */
#define NUSER 8
#define SEL_TSS 0x30
#define STAR_USER 0x18 /* sysret/iretq user selectors: SS = 0x20 | 3, CS = 0x28 | 3 */
static struct user_call {
	uint32_t id, allowed;
	uint32_t safe; /* user-safe: 1 the kernel's answer must be the same, 2 its status (RDTSC, IODelay) */
	uint64_t a0, a1, a2;
	long status;
	uint64_t r[4];
} ucall[NUSER];
static volatile unsigned n_ucall;
static uint8_t user_stack[8192] __attribute__((aligned(16)));
static uint8_t kernel_stack[8192] __attribute__((aligned(16)));
static struct {
	uint8_t tss[0x68];
	uint8_t iomap[8192]; /* all zero: user code reaches the hypercall port (a ring-0 kernel's TSS) */
	uint8_t end;
} __attribute__((packed, aligned(16))) tss;
static volatile int in_user;
static volatile uint64_t user_trap_cs, user_trap_rip;
static uint64_t user_trips;

/* fuzz_enter_user(rip, rsp, rflags): save the kernel's callee-saved registers and stack, enter
 * user mode; "returns" when the #UD hook calls fuzz_kernel_return(value), or ReturnToUser's
 * error if it refused. */
long fuzz_enter_user(uint64_t rip, uint64_t rsp, uint64_t rflags);
void fuzz_kernel_return(long value) __attribute__((noreturn));
uint64_t fuzz_kernel_context;
__asm__(".text\n"
	".globl fuzz_enter_user\nfuzz_enter_user:\n"
	"\tpushq %rbx\n\tpushq %rbp\n\tpushq %r12\n\tpushq %r13\n\tpushq %r14\n\tpushq %r15\n"
	"\tmovq %rsp, fuzz_kernel_context(%rip)\n"
	"\tcall vmi_return_to_user\n" /* returns only if it failed: the error in rax */
	"\tjmp 1f\n"
	".globl fuzz_kernel_return\nfuzz_kernel_return:\n"
	"\tmovq %rdi, %rax\n"
	"1:\tmovq fuzz_kernel_context(%rip), %rsp\n"
	"\tpopq %r15\n\tpopq %r14\n\tpopq %r13\n\tpopq %r12\n\tpopq %rbp\n\tpopq %rbx\n\tret\n");

static void user_main(void)
{
	for (unsigned k = 0; k < n_ucall; k++) {
		struct user_call *u = &ucall[k];
		fuzz_record.n = stat.calls + k;
		fuzz_record.kind = KIND_USER, fuzz_record.id = u->id;
		fuzz_record.a0 = u->a0, fuzz_record.a1 = u->a1, fuzz_record.a2 = u->a2;
		fuzz_record.status = PENDING;
		u->status = vmi_raw_call(u->id, u->a0, u->a1, u->a2, u->r);
		fuzz_record.status = u->status;
	}
	__asm__ __volatile__("ud2");
	for (;;)
		;
}

static int on_user_trap(struct trap_regs *r)
{
	if (!in_user)
		return 0; /* the kernel's own fault: the fatal report */
	in_user = 0;
	user_trap_cs = r->cs, user_trap_rip = r->rip;
	fuzz_kernel_return(1000 + (long)r->vector);
}

static int user_safe(uint32_t canonical)
{
	switch (canonical) {
#ifdef VMI_CALL_CPU_CPUID_USER
	case VMI_CALL_CPU_CPUID:
#endif
#ifdef VMI_CALL_CPU_RDTSC_USER
	case VMI_CALL_CPU_RDTSC:
#endif
#ifdef VMI_CALL_CPU_IODELAY_USER
	case VMI_CALL_CPU_IODELAY:
#endif
#ifdef VMI_CALL_QUERY_GETVERSION_USER
	case VMI_CALL_QUERY_GETVERSION:
#endif
#ifdef VMI_CALL_QUERY_HASFAMILY_USER
	case VMI_CALL_QUERY_HASFAMILY:
#endif
#ifdef VMI_CALL_QUERY_QUERYCALL_USER
	case VMI_CALL_QUERY_QUERYCALL:
#endif
#ifdef VMI_CALL_CPU_GETCPUINFO_USER
	case VMI_CALL_CPU_GETCPUINFO:
#endif
		return 1;
	default:
		return 0;
	}
}

/* One call for user mode, and the statuses it may give there. */
static void user_call_pick(struct user_call *u)
{
	uint32_t canonical = 0;
	u->safe = 0;
	u->a0 = chance(50) ? hostile_addr() : rnd(), u->a1 = rnd(), u->a2 = chance(50) ? 0 : rnd();
	switch (below(12)) {
	case 0: /* a legacy number that reaches a family call */
		canonical = legacy_map[below(ARRAY_SIZE(legacy_map))][1];
		u->id = VMI_CALLID(VMI_FAMILY_LEGACY, 0, 0);
		for (unsigned k = 0; k < ARRAY_SIZE(legacy_map); k++)
			if (legacy_map[k][1] == canonical)
				u->id = VMI_CALLID(VMI_FAMILY_LEGACY, legacy_map[k][0], 0);
		break;
	case 1: /* reserved bits: refused before anything else */
		u->id = VMI_CALLID(VMI_FAMILY_CPU, VMI_CALLID_CALL(VMI_CALL_CPU_SHUTDOWN), 0) | (uint32_t)(1 + below(255)) << 8;
		u->allowed = BIT(VMI_ERR_RESERVED_BITS);
		return;
	case 2: /* a registered experimental call, else an unknown one */
		if (n_experimental) {
			u->id = experimental[below(n_experimental)] | (uint32_t)below(256);
			u->allowed = BIT(VMI_ERR_PERMISSION);
		} else {
			u->id = VMI_CALLID(VMI_FAMILY_EXPERIMENTAL, below(256), 0);
			u->allowed = BIT(VMI_ERR_NOT_SUPPORTED);
		}
		return;
	case 3: /* the calls that would hurt most */
		switch (below(6)) {
		case 0: canonical = VMI_CALL_CPU_SHUTDOWN; break;
		case 1: canonical = VMI_CALL_CPU_SETCR3; u->a0 = pool[0]; break;
		case 2: canonical = VMI_CALL_MMU_SETPTE; u->a0 = pool[3] + 8 * below(512); u->a1 = pool[0] | LEAF_RW; break;
		case 3: canonical = VMI_CALL_CPU_WRMSR; u->a0 = 0xC0000082u; break; /* LSTAR */
		case 4: canonical = VMI_CALL_CPU_RETURNTOUSER; break;
		default: canonical = VMI_CALL_CPU_DEPRIVILEGE; break;
		}
		u->id = canonical;
		break;
	case 10: case 11: /* a fresh ID of the flood's, whatever it names */
		if (!flood_seeded)
			flood_next = (uint32_t)rnd(), flood_seeded = 1;
		u->id = flood_id() | (chance(50) ? (uint32_t)(1 + below(255)) << 8 : 0);
		switch (id_class(u->id, &canonical)) {
		case ID_CALL:
			if (VMI_CALLID_FAMILY(canonical) != VMI_FAMILY_EXPERIMENTAL)
				break; /* a spec call: judged below */
			u->allowed = BIT(VMI_ERR_PERMISSION);
			return;
		case ID_UNKNOWN:
			u->allowed = BIT(VMI_ERR_NOT_SUPPORTED);
			return;
		case ID_UNSURE:
			u->id |= 0x100u;
			/* fall through */
		default:
			u->allowed = BIT(VMI_ERR_RESERVED_BITS);
			return;
		}
		break;
	default: { /* any spec call */
		unsigned f = (unsigned)below(ARRAY_SIZE(families));
		canonical = u->id = VMI_CALLID(families[f].family, below(families[f].ncalls), 0);
		break;
	}
	}
	if (chance(25))
		u->id |= (uint32_t)below(256); /* annotations change nothing here either */
	if (!supported[VMI_CALLID_FAMILY(canonical)][VMI_CALLID_CALL(canonical)]) {
		u->allowed = BIT(VMI_ERR_NOT_SUPPORTED); /* a call this hypervisor lacks is unknown to it */
		return;
	}
	if (!user_safe(canonical)) {
		u->allowed = BIT(VMI_ERR_PERMISSION);
		return;
	}
	u->allowed = ALL_ERRORS & ~BIT(VMI_ERR_PERMISSION); /* a user-safe call answers as in the kernel */
	u->safe = canonical == VMI_CALL_CPU_RDTSC || canonical == VMI_CALL_CPU_IODELAY ? 2 : 1;
	if (canonical == VMI_CALL_CPU_CPUID)
		u->a0 &= 0x8000001Full;
}

static void attack_user(void)
{
	/* What the trip needs, re-established: the TSS (available: SetTR refuses a busy one),
	 * its kernel stack, the user segments a ring-0 kernel's ReturnToUser loads. */
	uint64_t base = (uintptr_t)&tss, limit = sizeof(tss) - 1;
	volatile uint64_t *g = (volatile uint64_t *)(uintptr_t)gdt;
	g[4] = 0x00CFF2000000FFFFull; /* user data, DPL 3 */
	g[5] = 0x00AFFA000000FFFFull; /* user code, DPL 3 */
	g[6] = (limit & 0xFFFF) | (base & 0xFFFFFF) << 16 | 0x89ull << 40 | ((limit >> 16) & 0xF) << 48 |
	       ((base >> 24) & 0xFF) << 56;
	g[7] = base >> 32;
	tss.tss[0x66] = 0x68, tss.end = 0xFF;
	long s = vmi_set_tr(SEL_TSS);
	s |= vmi_update_kernel_stack((uintptr_t)kernel_stack + sizeof(kernel_stack));
	s |= vmi_wrmsr(MSR_STAR, (uint64_t)STAR_USER << 48 | 0x08ull << 32);
	if (s) {
		surprise("user mode: the kernel could not set up its TSS and STAR");
		return;
	}
	tr_loaded = 1, tr_base = base;
	n_ucall = 1 + (unsigned)below(NUSER);
	for (unsigned k = 0; k < n_ucall; k++)
		user_call_pick(&ucall[k]);

	user_trips++;
	set_trap_hook(6, on_user_trap);
	set_trap_hook(13, on_user_trap);
	set_trap_hook(14, on_user_trap);
	in_user = 1;
	long back = fuzz_enter_user((uintptr_t)user_main, (uintptr_t)user_stack + sizeof(user_stack), 0x2);
	in_user = 0;
	set_trap_hook(6, NULL);
	set_trap_hook(13, NULL);
	set_trap_hook(14, NULL);

	uint64_t user_cs = depriv ? ((volatile struct vmi_shared *)vmi_shared_page())->user_cs : (STAR_USER + 16) | 3;
	for (unsigned k = 0; k < n_ucall; k++) {
		struct user_call *u = &ucall[k];
		count_call();
		count_status(u->status);
		if (u->status > 0 || u->status <= -NSTATUS) {
			record(KIND_USER, u->id, u->a0, u->a1, u->a2), fuzz_record.status = u->status;
			surprise("user mode: status is not a spec error code");
		} else if (!(u->allowed & BIT(u->status))) {
			record(KIND_USER, u->id, u->a0, u->a1, u->a2), fuzz_record.status = u->status;
			surprise(u->allowed == BIT(VMI_ERR_PERMISSION) ? "user mode: a kernel-only call was not refused with PERMISSION"
								       : "user mode: status not one this call may give");
		} else if (u->safe) { /* the same call from the kernel gives the same answer */
			uint64_t kr[4] = { 0 };
			stat.canaries++;
			long ks = vmi_raw_call(u->id, u->a0, u->a1, u->a2, kr);
			if (ks != u->status || (u->safe == 1 && ks == 0 && memcmp(kr, u->r, sizeof(kr)))) {
				record(KIND_USER, u->id, u->a0, u->a1, u->a2), fuzz_record.status = u->status;
				surprise("user mode: a user-safe call answered otherwise than from the kernel");
			}
		}
	}
	if (back != 1000 + 6)
		surprise(back < 1000 ? "user mode: ReturnToUser refused" : "user mode: a fault other than the ud2 came back");
	else if (user_trap_cs != user_cs)
		surprise("user mode: the #UD did not come from the user code segment");
	canary(); /* the kernel's calls work again */
}

/* One attack; `left` is how many calls the run still makes.  Classes in per mille of attacks
 * (a flood or a queue makes many calls, the others one or a few). */
static void one_attack(uint64_t left)
{
	uint64_t a[3] = { 0, 0, 0 }, r[4];
	uint32_t canonical, id, allowed;
	int skip = 0;
	unsigned pick = (unsigned)below(1000);

	if (stores && pick < 20) {
		attack_store();
		return;
	}
	if (pick < 60) {
		cur_class = C_ROM_QUEUE;
		attack_queue();
		return;
	}
	cur_class = pick < 110 ? C_UNKNOWN : pick < 160 ? C_RESERVED : pick < 190 ? C_USER : pick < 192 ? C_ID_FLOOD
		  : pick < 222 ? C_EDGE_BATCH : pick < 252 && n_experimental ? C_EXPERIMENTAL : pick < 302 ? C_LEGACY : C_SPEC;
	if (cur_class == C_UNKNOWN) { /* unknown: a family call past the end, an unknown family, a legacy-only number */
		unsigned f = (unsigned)below(ARRAY_SIZE(families));
		switch (below(4)) {
		case 0: id = VMI_CALLID(families[f].family, families[f].ncalls + below(256 - families[f].ncalls), 0); break;
		case 1: id = VMI_CALLID(VMI_FAMILY_EVENTCHANNEL + 1 + below(VMI_FAMILY_EXPERIMENTAL - VMI_FAMILY_EVENTCHANNEL - 1),
					below(256), 0); break;
		case 2: id = VMI_CALLID(VMI_FAMILY_LEGACY, legacy_only[below(ARRAY_SIZE(legacy_only))], 0); break;
		default: id = VMI_CALLID(VMI_FAMILY_EXPERIMENTAL, below(256), 0); break;
		}
		for (unsigned k = 0; k < n_experimental; k++)
			if (experimental[k] == id)
				id = VMI_CALLID(0x42, 0, 0);
		call(id | (uint32_t)below(256), rnd(), rnd(), rnd(), BIT(VMI_ERR_NOT_SUPPORTED), r);
		return;
	}
	if (cur_class == C_RESERVED) { /* reserved bits: refused before any handler runs, so any call, any args */
		unsigned f = (unsigned)below(ARRAY_SIZE(families));
		id = VMI_CALLID(chance(90) ? families[f].family : below(256), below(families[f].ncalls + 2), 0);
		call(id | (uint32_t)(1 + below(255)) << 8 | (uint32_t)below(256), hostile_addr(), rnd(), rnd(),
		     BIT(VMI_ERR_RESERVED_BITS), r);
		return;
	}
	if (cur_class == C_USER) { /* user mode: kernel-only calls refused */
		attack_user();
		return;
	}
	if (cur_class == C_ID_FLOOD) {
		attack_id_flood(left);
		return;
	}
	if (cur_class == C_EDGE_BATCH) {
		attack_edge_batch();
		return;
	}
	if (cur_class == C_EXPERIMENTAL) {
		id = experimental[below(n_experimental)];
		call(id | (uint32_t)below(256), chance(50) ? hostile_addr() : rnd(), rnd(), rnd(), ALL_ERRORS, r);
		return;
	}
	if (cur_class == C_LEGACY) { /* a legacy number */
		unsigned k = (unsigned)below(ARRAY_SIZE(legacy_map));
		canonical = legacy_map[k][1];
		id = VMI_CALLID(VMI_FAMILY_LEGACY, legacy_map[k][0], 0);
	} else {
		unsigned f = (unsigned)below(ARRAY_SIZE(families));
		canonical = id = VMI_CALLID(families[f].family, below(families[f].ncalls), 0);
	}
	allowed = gen_args(canonical, a, &skip);
	if (skip == 2) {
		cur_class = C_CORRUPT_BATCH;
		attack_flush_queue(id | (chance(20) ? (uint32_t)below(256) : 0));
		return;
	}
	if (skip)
		return;
	if (chance(25)) /* annotations: unknown ones must be ignored (queue on SetPTE is honoured or not) */
		id |= (uint32_t)below(256);
	long s = call(id, a[0], a[1], a[2], allowed, r);
	if (s == 0)
		model_update(canonical, a);
	/* Restore what must stay the guest's own: its GDT and IDT registers. */
	if (s == 0 && canonical == VMI_CALL_SEGMENTATION_SETGDT && a[0] != gdt)
		vmi_set_gdt(gdt, (uint32_t)gdt_limit);
	if (s == 0 && canonical == VMI_CALL_SEGMENTATION_SETIDT && a[0] != idt_base)
		vmi_set_idt(idt_base, (uint32_t)idt_limit);
}

/* --- setup --------------------------------------------------------------------------- */

static int setup(void)
{
	ram_end = ram_end_below_4g();
	depriv = vmi_deprivileged();
	boot_cr3 = vmi_get_cr3() & ADDR;
	cr0_0 = vmi_get_cr0(), cr4_0 = vmi_get_cr4();
	if (vmi_rdmsr(MSR_EFER, &efer_0) || !(cr0_0 & CR0_PG) || !(cr4_0 & CR4_PAE))
		return 0;
	if (!depriv && (cr0_0 != read_cr0() || cr4_0 != read_cr4() || boot_cr3 != (read_cr3() & ADDR) ||
			efer_0 != rdmsr(MSR_EFER)))
		return 0; /* at ring 0 the getters must agree with the native instructions */
	for (int i = 0; i < NPOOL; i++)
		if (!(pool[i] = (uintptr_t)alloc_pt_page()))
			return 0;
	for (int i = 0; i < NDATA; i++)
		if (!(data[i] = (uintptr_t)alloc_page()))
			return 0;
	victim = (uintptr_t)alloc_page();
	scratch = (uintptr_t)alloc_page();
	gdt = (uintptr_t)alloc_page();
	if (!victim || !scratch || !gdt)
		return 0;
	/* The last pages of RAM hold the batches that end where RAM ends: far above anything allocated. */
	if (ram_end > DATA_POOL_BASE + DATA_POOL_SIZE + EDGE_BYTES && gdt + 0x100000 < ram_end - EDGE_BYTES)
		edge_top = ram_end;
	straddle_ok = gdt + 0x100000 < PT_POOL_BASE - EDGE_BYTES && ram_end > PT_POOL_BASE + PT_POOL_SIZE + EDGE_BYTES;

	/* A small registered address space: PML4 -> PDPT -> PD -> two PTs -> data pages. */
	static const int levels[5] = { 4, 3, 2, 1, 1 };
	long s = 0;
	for (int i = 0; i < 5; i++) {
		s |= vmi_allocate_page(pool[i], (uint32_t)levels[i]);
		level_of[i] = levels[i];
	}
	s |= vmi_set_pte((uint64_t *)(uintptr_t)pool[0], pool[1] | NONLEAF);
	s |= vmi_set_pte((uint64_t *)(uintptr_t)pool[1], pool[2] | NONLEAF);
	s |= vmi_set_pte((uint64_t *)(uintptr_t)pool[2], pool[3] | NONLEAF);
	s |= vmi_set_pte((uint64_t *)(uintptr_t)(pool[2] + 8), pool[4] | NONLEAF);
	for (int i = 0; i < NDATA; i++)
		s |= vmi_set_pte((uint64_t *)(uintptr_t)(pool[3] + 8 * i), data[i] | (i & 1 ? LEAF_RW : LEAF_RO_));
	if (s)
		return 0;
	/* A validating hypervisor (direct, shadow paging) refuses a writable mapping of a table;
	 * one that does not validate (native paging) would let the attacks below wreck these tables. */
	if (vmi_set_pte((uint64_t *)(uintptr_t)(pool[4] + 8 * 511), pool[0] | LEAF_RW) != VMI_ERR_PERMISSION)
		return 0;

	/* A private GDT: the boot entries, then room for the fuzzer's descriptors. */
	/* sgdt/sidt would give the hypervisor's tables at ring 3: ask for the guest's own. */
	uint64_t g_base = 0, i_base = 0;
	uint32_t g_limit = 0, i_limit = 0;
	if (vmi_get_gdt(&g_base, &g_limit) || vmi_get_idt(&i_base, &i_limit) || g_limit > 0xFFF)
		return 0;
	if (!depriv) {
		struct descriptor_ptr g = sgdt(), idt = sidt();
		if (g.base != g_base || g.limit != g_limit || idt.base != i_base || idt.limit != i_limit)
			return 0;
	}
	memcpy((void *)(uintptr_t)gdt, (const void *)(uintptr_t)g_base, g_limit + 1u);
	gdt_limit = 0xFFF;
	idt_base = i_base, idt_limit = i_limit;
	if (vmi_set_gdt(gdt, (uint32_t)gdt_limit))
		return 0;

	for (unsigned f = 0; f < ARRAY_SIZE(families); f++)
		for (uint32_t n = 0; n < families[f].ncalls; n++) {
			uint64_t info = 0;
			uint32_t id = VMI_CALLID(families[f].family, n, 0);
			supported[families[f].family][n] = vmi_query_call(id, &info) == 0 && (info & VMI_QUERY_SUPPORTED);
		}

	/* Experimental calls the user registered. */
	for (uint32_t n = 0; n < 256; n++) {
		uint64_t info = 0;
		uint32_t id = VMI_CALLID(VMI_FAMILY_EXPERIMENTAL, n, 0);
		if (vmi_query_call(id, &info) == 0 && (info & VMI_QUERY_SUPPORTED))
			experimental[n_experimental++] = id;
	}
	return 1;
}

static void summary(void)
{
	printf("FUZZ calls=%lu canaries=%lu stores=%lu unexpected=%lu odd=%lu broken=%d experimental=%u\n",
	       (unsigned long)stat.calls, (unsigned long)stat.canaries, (unsigned long)stat.stores,
	       (unsigned long)stat.unexpected,
	       (unsigned long)odd_status, broken, n_experimental);
	for (unsigned k = 0; k < ARRAY_SIZE(by_status); k++)
		if (by_status[k])
			printf("FUZZ status=-%u n=%lu\n", k, (unsigned long)by_status[k]);
	printf("FUZZ-CLASSES");
	for (unsigned k = 0; k < NCLASS; k++)
		printf(" %s=%lu", class_name[k], (unsigned long)stat.by_class[k]);
	printf("\n");
}

/* At the end, valid calls of every kind still work. */
static void final_checks(void)
{
	uint64_t r[4] = { 0 }, info = 0;
	int ok = 1;
	ok &= vmi_raw_call(VMI_CALL_CPU_GETCR0, 0, 0, 0, r) == 0 && r[0] == cr0_0 && (depriv || r[0] == read_cr0());
	ok &= vmi_raw_call(VMI_CALL_CPU_GETCR4, 0, 0, 0, r) == 0 && r[0] == cr4_0;
	ok &= vmi_raw_call(VMI_CALL_CPU_RDMSR, MSR_EFER, 0, 0, r) == 0 && r[0] == efer_0;
	ok &= vmi_query_call(VMI_CALL_MMU_SETPTE, &info) == 0 && (info & VMI_QUERY_SUPPORTED);
	uint64_t scratch_table = pool[NPOOL - 1];
	if (level_of[NPOOL - 1] != 1) { /* make it a registered, empty PT again (or refuse) */
		if (level_of[NPOOL - 1])
			for (int i = 0; i < NPOOL; i++)
				if (level_of[i] > 1)
					for (unsigned k = 0; k < 512; k++)
						if ((rd64(pool[i] + 8 * k) & ADDR) == scratch_table)
							vmi_set_pte((uint64_t *)(uintptr_t)(pool[i] + 8 * k), 0);
		vmi_release_page(scratch_table);
		level_of[NPOOL - 1] = vmi_allocate_page(scratch_table, 1) == 0 ? 1 : 0;
	}
	if (level_of[NPOOL - 1] == 1) {
		uint64_t v = data[0] | P_ | A_ | D_;
		ok &= vmi_set_pte((uint64_t *)(uintptr_t)(scratch_table + 8), v) == 0 && rd64(scratch_table + 8) == v;
	}
	ok &= vmi_flush_tlb(VMI_FLUSH_TLB) == 0;
	uint64_t base = 0;
	uint32_t limit = 0;
	ok &= vmi_get_gdt(&base, &limit) == 0 && base == gdt && limit == gdt_limit;
	if (!ok) {
		broken = 1;
		surprise("final: a valid call no longer works");
	}
	printf("FUZZ-FINAL %s\n", ok ? "ok" : "broken");
}

void kmain(uint32_t magic, uint32_t mbinfo)
{
	(void)magic, (void)mbinfo;
	uint64_t n = cmdline_u64("calls", 10000);
	rng = cmdline_u64("seed", 1) * 0x9E3779B97F4A7C15ull ^ 0xD1B54A32D192ED03ull;
	if (!rng)
		rng = 1;
	stores = (int)cmdline_u64("stores", 1);
	straddle = (int)cmdline_u64("straddle", 1);
	direct = cmdline_has("paging=direct");
	verbose = cmdline_has("verbose");
	printf("FUZZ-START calls=%lu seed=0x%lx record=0x%lx stats=0x%lx classes=", (unsigned long)n,
	       (unsigned long)cmdline_u64("seed", 1), (unsigned long)(uintptr_t)&fuzz_record,
	       (unsigned long)(uintptr_t)&stat);
	for (unsigned k = 0; k < NCLASS; k++)
		printf("%s%s", k ? "," : "", class_name[k]);
	printf("\n");
	if (!vmi_rom_present() || !setup()) {
		printf("FUZZ-SETUP failed: needs a ROM and --paging direct or shadow\n");
		vmi_shutdown(2);
		exit(2);
	}
	while (stat.calls < n && !broken)
		one_attack(n - stat.calls);
	final_checks();
	summary();
	vmi_shutdown(broken ? 1 : 0);
	exit(broken ? 1 : 0);
}
