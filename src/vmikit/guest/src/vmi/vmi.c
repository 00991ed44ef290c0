/*
 * The guest VMI layer: ROM discovery, call resolution, and one function per
 * spec call that uses the ROM entry when resolved and the native instruction
 * otherwise.  See vmi.h and docs/rom-abi.md.
 */
#include "lib.h"
#include "vmi.h"

#define ROM_SCAN_START 0xC0000ul
#define ROM_SCAN_END   0xE0000ul
#define ROM_SCAN_STEP  0x800ul
#define RFLAGS_IF      (1ul << 9)
#define CR0_TS         (1ul << 3)
#define CR4_PGE        (1ul << 7)

/* Calls added after 1.0 that an older header does not name: never resolved, so the native
 * path runs. (The IDs are fixed forever by the versioning rules; what the header lacks is
 * only what this guest was built to know.) Private to this file: guests keep testing
 * #ifdef VMI_CALL_... to learn what their header has. */
#define ABSENT 0xFFFFFFFFu
#ifndef VMI_CALL_CPU_SETCR2
#define VMI_CALL_CPU_SETCR2 ABSENT
#endif
#ifndef VMI_CALL_CPU_REBOOT
#define VMI_CALL_CPU_REBOOT ABSENT
#endif
#ifndef VMI_CALL_CPU_GETDR
#define VMI_CALL_CPU_GETDR ABSENT
#endif
#ifndef VMI_CALL_CPU_SETDR
#define VMI_CALL_CPU_SETDR ABSENT
#endif
#ifndef VMI_CALL_CPU_RDPMC
#define VMI_CALL_CPU_RDPMC ABSENT
#endif
#ifndef VMI_CALL_CPU_ENABLEINTERRUPTS
#define VMI_CALL_CPU_ENABLEINTERRUPTS ABSENT
#endif
#ifndef VMI_CALL_CPU_DISABLEINTERRUPTS
#define VMI_CALL_CPU_DISABLEINTERRUPTS ABSENT
#endif
#ifndef VMI_CALL_CPU_GETINTERRUPTMASK
#define VMI_CALL_CPU_GETINTERRUPTMASK ABSENT
#endif
#ifndef VMI_CALL_CPU_SETINTERRUPTMASK
#define VMI_CALL_CPU_SETINTERRUPTMASK ABSENT
#endif
#ifndef VMI_CALL_CPU_IODELAY
#define VMI_CALL_CPU_IODELAY ABSENT
#endif
#ifndef VMI_CALL_SEGMENTATION_GETLDT
#define VMI_CALL_SEGMENTATION_GETLDT ABSENT
#endif
#ifndef VMI_CALL_SEGMENTATION_GETTR
#define VMI_CALL_SEGMENTATION_GETTR ABSENT
#endif
#ifndef VMI_CALL_MMU_FLUSHQUEUE
#define VMI_CALL_MMU_FLUSHQUEUE ABSENT
#endif
#ifndef VMI_CALL_QUERY_GETVERSION
#define VMI_CALL_QUERY_GETVERSION ABSENT
#define VMI_CALL_QUERY_HASFAMILY ABSENT
#define VMI_CALL_QUERY_QUERYCALL ABSENT
#endif

/* The resolved entry of a call ID, NULL for one this header does not name (folds at compile time). */
static inline vmi_entry_t entry_of(uint32_t id) { return id == ABSENT ? NULL : vmi_entry(id); }

struct vmi_rom_header {
	uint16_t signature;    /* 0xAA55 */
	uint8_t blocks;        /* length in 512-byte blocks */
	uint8_t init[3];
	uint16_t zero;
	char vmi_signature[4]; /* "VMIK" */
	uint16_t major, minor;
	uint32_t size, count, table, flags, raw, data_base, data_size;
	uint8_t pad[3];
	uint8_t checksum;
} __attribute__((packed));
_Static_assert(sizeof(struct vmi_rom_header) == 48, "ROM header is 48 bytes");

struct vmi_rom_entry {
	uint32_t call_id, offset;
};

typedef long (*vmi_raw_t)(uint32_t call_id, uint64_t a0, uint64_t a1, uint64_t a2, uint64_t *res);

vmi_entry_t vmi_table[VMI_NSLOTS];
unsigned vmi_getter_failures;
static const struct vmi_rom_header *rom;
static vmi_raw_t rom_raw;
static int initialised;
static uint32_t rejected_version;

/* --- discovery and resolution ---------------------------------------------- */

/* The byte sum of the ROM image, eight bytes a step: this runs before the kernel can leave ring 0,
 * where this host emulates every instruction (a byte loop cost 7-10 ms of a 27 ms boot).
 * Each 16-bit lane of `acc` sums two byte columns; masking every 128 words keeps the lanes from
 * carrying into each other (128 x 510 + 255 < 65536) without changing the sum modulo 256. */
static uint8_t rom_sum(uintptr_t base, uint32_t size)
{
	const uint64_t bytes = 0x00FF00FF00FF00FFull;
	const volatile uint64_t *w = (const void *)base;
	uint64_t acc = 0;
	for (uint32_t i = 0; i < size / 8; i++) {
		uint64_t x = w[i];
		acc += (x & bytes) + ((x >> 8) & bytes);
		if (i % 128 == 127)
			acc &= bytes;
	}
	acc &= bytes;
	return (uint8_t)(acc + (acc >> 16) + (acc >> 32) + (acc >> 48));
}

static int rom_valid(uintptr_t base)
{
	const struct vmi_rom_header *h = (const void *)base;
	if (memcmp(h->vmi_signature, "VMIK", 4) != 0)
		return 0;
	/* Another major is another interface; an older minor than the guest needs is not enough. */
	uint32_t version = (uint32_t)h->major << 16 | h->minor;
	if (h->major != VMI_VERSION_MAJOR || version < VMI_MIN_VERSION) {
		rejected_version = version;
		return 0;
	}
	uint32_t size = h->blocks * 512u;
	if (size < sizeof(*h) || base + size > ROM_SCAN_END || h->size != size)
		return 0;
	if (rom_sum(base, size) != 0)
		return 0;
	if (h->table < sizeof(*h) || h->table % 4 || h->count > (size - h->table) / sizeof(struct vmi_rom_entry))
		return 0;
	if (h->raw >= size)
		return 0;
	const struct vmi_rom_entry *e = (const void *)(base + h->table);
	for (uint32_t i = 0; i < h->count; i++)
		if (e[i].offset < sizeof(*h) || e[i].offset >= size)
			return 0;
	return 1;
}

#ifdef VMI_CALL_CPU_DEPRIVILEGE /* the one call found before the others */
static vmi_entry_t rom_lookup(uint32_t call_id)
{
	const struct vmi_rom_entry *e = (const void *)((uintptr_t)rom + rom->table);
	for (uint32_t i = 0; i < rom->count; i++)
		if (e[i].call_id == call_id)
			return (vmi_entry_t)((uintptr_t)rom + e[i].offset);
	return NULL;
}
#endif

/* Calls in a family this header names (0: a family it does not know). */
static uint32_t family_calls(uint32_t family)
{
	switch (family) {
	case VMI_FAMILY_CPU: return VMI_FAMILY_CPU_NCALLS;
	case VMI_FAMILY_SEGMENTATION: return VMI_FAMILY_SEGMENTATION_NCALLS;
	case VMI_FAMILY_MMU: return VMI_FAMILY_MMU_NCALLS;
	case VMI__FAMILY_QUERY_ID: return VMI__QUERY_NCALLS;
	case VMI__FAMILY_EVTCHN_ID: return VMI__EVTCHN_NCALLS;
	case VMI__FAMILY_TIME_ID: return VMI__TIME_NCALLS;
	default: return 0;
	}
}

/* One pass over the ROM's table: each entry whose ID this header names, plainly or (MMU) with
 * `queue` alone, fills its slot; the first entry of an ID wins. A queued MMU call the ROM lacks
 * is the plain call. */
static void resolve(void)
{
	const struct vmi_rom_entry *e = (const void *)((uintptr_t)rom + rom->table);
	for (uint32_t i = 0; i < rom->count; i++) {
		uint32_t id = e[i].call_id, family = VMI_CALLID_FAMILY(id), call = VMI_CALLID_CALL(id);
		uint32_t ann = id ^ VMI_CALLID(family, call, 0);
		if (call >= family_calls(family) || (ann && !(family == VMI_FAMILY_MMU && ann == VMI__ANN_QUEUE)))
			continue;
		if (!vmi_table[VMI_SLOT(id)])
			vmi_table[VMI_SLOT(id)] = (vmi_entry_t)((uintptr_t)rom + e[i].offset);
	}
	for (uint32_t call = 0; VMI__ANN_QUEUE && call < VMI_FAMILY_MMU_NCALLS; call++)
		if (!vmi_table[VMI__BASE_QUEUED + call])
			vmi_table[VMI__BASE_QUEUED + call] = vmi_table[VMI__BASE_MMU + call];
}

#ifdef VMI_CALL_CPU_DEPRIVILEGE
static void vmi_enter_model(vmi_entry_t deprivilege);
#endif

int vmi_init(void)
{
	if (initialised)
		return rom != NULL;
	initialised = 1;
	/* Without a ROM every read of this window may be an MMIO exit: 2 bytes a step. */
	for (uintptr_t base = ROM_SCAN_START; base < ROM_SCAN_END; base += ROM_SCAN_STEP) {
		if (*(const volatile uint16_t *)base == 0xAA55 && rom_valid(base)) {
			rom = (const void *)base;
			break;
		}
	}
	if (!rom)
		return 0;
	/* Leave ring 0 first: everything after runs natively at the deprivileged level. */
#ifdef VMI_CALL_CPU_DEPRIVILEGE
	vmi_enter_model(rom_lookup(VMI_CALL_CPU_DEPRIVILEGE));
#endif
	resolve();
#ifdef VMI_FAMILY_EVENTCHANNEL
	/* A family is used only when the hypervisor says it is there: the ROM may list entries
	 * its hypervisor does not back. No Query (a 1.0 hypervisor): the family is absent. */
	int offered = 0;
	for (uint32_t i = 0; i < VMI_FAMILY_EVENTCHANNEL_NCALLS; i++)
		offered |= vmi_table[VMI__BASE_EVTCHN + i] != NULL;
	if (offered) {
		uint64_t present = 0;
		if (vmi_has_family(VMI_FAMILY_EVENTCHANNEL, &present) != VMI_ERR_OK || !present)
			for (uint32_t i = 0; i < VMI_FAMILY_EVENTCHANNEL_NCALLS; i++)
				vmi_table[VMI__BASE_EVTCHN + i] = NULL;
	}
#endif
#ifdef VMI_FAMILY_TIME
	uint64_t has_time = 0;
	if (vmi_has_family(VMI_FAMILY_TIME, &has_time) != VMI_ERR_OK || !has_time)
		for (uint32_t i = 0; i < VMI_FAMILY_TIME_NCALLS; i++)
			vmi_table[VMI__BASE_TIME + i] = NULL;
#endif
	if (rom->raw)
		rom_raw = (vmi_raw_t)((uintptr_t)rom + rom->raw);
	return 1;
}

int vmi_rom_present(void) { return rom != NULL; }
uint32_t vmi_rom_version(void) { return rom ? (uint32_t)rom->major << 16 | rom->minor : 0; }
uint32_t vmi_rom_flags(void) { return rom ? rom->flags : 0; }
uint32_t vmi_rom_entries(void) { return rom ? rom->count : 0; }
uint64_t vmi_rom_base(void) { return (uintptr_t)rom; }
uint32_t vmi_rom_rejected(void) { return rejected_version; }

uint32_t vmi_hypervisor_version(void)
{
	uint32_t v = 0;
	return vmi_get_version(&v) == VMI_ERR_OK ? v : vmi_rom_version();
}

long vmi_raw_call(uint32_t call_id, uint64_t a0, uint64_t a1, uint64_t a2, uint64_t res[4])
{
	return rom_raw ? rom_raw(call_id, a0, a1, a2, res) : VMI_ERR_NOT_SUPPORTED;
}

/* --- the two shapes of a call ---------------------------------------------- */

/* Return the ROM entry's status from the enclosing function if `id` resolved. */
#define ROM_CALL(id, a0, a1, a2, res)                                         \
	do {                                                                  \
		vmi_entry_t e_ = entry_of(id);                                \
		if (e_)                                                       \
			return e_((uint64_t)(a0), (uint64_t)(a1), (uint64_t)(a2), (res)); \
	} while (0)

/* Getter: return result 0 of the ROM entry (0 + a counted failure if it fails), else `native`. */
#define ROM_GET(id, a0, native)                                               \
	do {                                                                  \
		vmi_entry_t e_ = entry_of(id);                                \
		if (e_) {                                                     \
			uint64_t r_[4] = { 0 };                               \
			if (e_((uint64_t)(a0), 0, 0, r_) == VMI_ERR_OK)       \
				return r_[0];                                 \
			vmi_getter_failures++;                                \
			return 0;                                             \
		}                                                             \
		return (native);                                              \
	} while (0)

/* A ROM entry with one result stored through `out`. */
static long rom_result(vmi_entry_t e, uint64_t a0, uint64_t *out)
{
	uint64_t r[4] = { 0 };
	long status = e(a0, 0, 0, r);
	if (status == VMI_ERR_OK && out)
		*out = r[0];
	return status;
}

/* --- the execution model ---------------------------------------------------- */

#define RFLAGS_USER  0xED5ul        /* CF PF AF ZF SF DF OF and IF: what user mode may set */
#define MSR_STAR     0xC0000081u

static int deprivileged;
volatile void *vmi__shared; /* not static: the upcall entry (asm) reads it */
#define shared vmi__shared

int vmi_deprivileged(void) { return deprivileged; }

/* Hand ring 0 to the hypervisor if it wants it (CPU.Deprivilege, since 1.3): from the return
 * on this kernel may be at ring 3 and uses only the ROM and the shared page. */
#ifdef VMI_CALL_CPU_DEPRIVILEGE
static void vmi_enter_model(vmi_entry_t deprivilege)
{
	uint64_t r[4] = { 0 };
	if (deprivilege && deprivilege(0, 0, 0, r) == VMI_ERR_OK) {
		shared = (volatile void *)(uintptr_t)r[1];
		deprivileged = r[0] == VMI_PRIVILEGE_DEPRIVILEGED;
	}
}
#endif

#ifdef VMI_SHARED_VIF
#define SHARED_U32(off) (*(volatile uint32_t *)((volatile char *)shared + (off)))
#endif
volatile void *vmi_shared_page(void) { return shared; }

/* Natively (and at ring 0 under a hypervisor without the call): iretq to the user selectors
 * that sysretq would load (STAR[63:48] + 8 for SS, + 16 for a 64-bit CS). */
static long native_return_to_user(uint64_t rip, uint64_t rsp, uint64_t rflags)
{
	uint64_t base = rdmsr(MSR_STAR) >> 48 & 0xFFFF;
	uint64_t ss = (base + 8) | 3, cs = (base + 16) | 3;
	__asm__ __volatile__("pushq %0; pushq %1; pushq %2; pushq %3; pushq %4; iretq"
			     : : "r"(ss), "r"(rsp), "r"((rflags & RFLAGS_USER) | 0x2), "r"(cs), "r"(rip)
			     : "memory");
	__builtin_unreachable();
}

long vmi_return_to_user(uint64_t rip, uint64_t rsp, uint64_t rflags)
{
#ifdef VMI_CALL_CPU_RETURNTOUSER
	ROM_CALL(VMI_CALL_CPU_RETURNTOUSER, rip, rsp, rflags, NULL);
#endif
	return native_return_to_user(rip, rsp, rflags);
}

/* --- CPU ------------------------------------------------------------------- */

long vmi_cpuid(uint32_t leaf, uint32_t subleaf, uint32_t out[4])
{
	vmi_entry_t e = entry_of(VMI_CALL_CPU_CPUID);
	if (e) {
		uint64_t r[4] = { 0 };
		long status = e(leaf, subleaf, 0, r);
		for (int i = 0; i < 4; i++)
			out[i] = status == VMI_ERR_OK ? (uint32_t)r[i] : 0;
		return status;
	}
	struct cpuid_result c = cpuid(leaf, subleaf);
	out[0] = c.eax, out[1] = c.ebx, out[2] = c.ecx, out[3] = c.edx;
	return VMI_ERR_OK;
}

uint64_t vmi_rdtsc(void) { ROM_GET(VMI_CALL_CPU_RDTSC, 0, rdtsc()); }

long vmi_rdmsr(uint32_t msr, uint64_t *value)
{
	vmi_entry_t e = entry_of(VMI_CALL_CPU_RDMSR);
	if (e)
		return rom_result(e, msr, value);
	*value = rdmsr(msr);
	return VMI_ERR_OK;
}

long vmi_wrmsr(uint32_t msr, uint64_t value)
{
	ROM_CALL(VMI_CALL_CPU_WRMSR, msr, value, 0, NULL);
	wrmsr(msr, value);
	return VMI_ERR_OK;
}

uint64_t vmi_get_cr0(void) { ROM_GET(VMI_CALL_CPU_GETCR0, 0, read_cr0()); }
uint64_t vmi_get_cr2(void) { ROM_GET(VMI_CALL_CPU_GETCR2, 0, read_cr2()); }
uint64_t vmi_get_cr3(void) { ROM_GET(VMI_CALL_CPU_GETCR3, 0, read_cr3()); }
uint64_t vmi_get_cr4(void) { ROM_GET(VMI_CALL_CPU_GETCR4, 0, read_cr4()); }

long vmi_set_cr0(uint64_t value)
{
	ROM_CALL(VMI_CALL_CPU_SETCR0, value, 0, 0, NULL);
	write_cr0(value);
	return VMI_ERR_OK;
}

long vmi_set_cr2(uint64_t value)
{
	ROM_CALL(VMI_CALL_CPU_SETCR2, value, 0, 0, NULL);
	write_cr2(value);
	return VMI_ERR_OK;
}

long vmi_set_cr3(uint64_t root)
{
	ROM_CALL(VMI_CALL_CPU_SETCR3, root, 0, 0, NULL);
	write_cr3(root);
	return VMI_ERR_OK;
}

long vmi_set_cr4(uint64_t value)
{
	ROM_CALL(VMI_CALL_CPU_SETCR4, value, 0, 0, NULL);
	write_cr4(value);
	return VMI_ERR_OK;
}

long vmi_clts(void)
{
	ROM_CALL(VMI_CALL_CPU_CLTS, 0, 0, 0, NULL);
	__asm__ __volatile__("clts" ::: "memory");
	return VMI_ERR_OK;
}

long vmi_wbinvd(void)
{
	ROM_CALL(VMI_CALL_CPU_WBINVD, 0, 0, 0, NULL);
	__asm__ __volatile__("wbinvd" ::: "memory");
	return VMI_ERR_OK;
}

static inline uint64_t read_rflags(void)
{
	uint64_t f;
	__asm__ __volatile__("pushfq; popq %0" : "=r"(f) : : "memory");
	return f;
}

static inline void write_rflags(uint64_t f)
{
	__asm__ __volatile__("pushq %0; popfq" : : "r"(f) : "memory", "cc");
}

long vmi_halt(void)
{
	ROM_CALL(VMI_CALL_CPU_HALT, 0, 0, 0, NULL);
	if (read_rflags() & RFLAGS_IF) /* with IF clear nothing could wake us: return at once */
		__asm__ __volatile__("sti; hlt" ::: "memory");
	return VMI_ERR_OK;
}

long vmi_shutdown(uint32_t code)
{
	vmi_entry_t e = entry_of(VMI_CALL_CPU_SHUTDOWN);
	if (e) {
		long status = e(code, 0, 0, NULL);
		if (status != VMI_ERR_OK)
			return status;
	}
	outl(code, PORT_EXIT);
	return VMI_ERR_NOT_SUPPORTED; /* nobody listening on the exit port */
}

long vmi_reboot(void)
{
	ROM_CALL(VMI_CALL_CPU_REBOOT, 0, 0, 0, NULL);
	outb(0xFE, 0x64); /* keyboard-controller reset */
	return VMI_ERR_NOT_SUPPORTED;
}

#define DR_CASE(n)                                                                     \
	case n:                                                                        \
		if (get)                                                               \
			__asm__ __volatile__("mov %%dr" #n ", %0" : "=r"(*value));     \
		else                                                                   \
			__asm__ __volatile__("mov %0, %%dr" #n : : "r"(*value) : "memory"); \
		return VMI_ERR_OK;

static long native_dr(int get, uint32_t reg, uint64_t *value)
{
	switch (reg) {
	DR_CASE(0) DR_CASE(1) DR_CASE(2) DR_CASE(3) DR_CASE(6) DR_CASE(7)
	default:
		return VMI_ERR_INVALID_ARGUMENT;
	}
}

long vmi_get_dr(uint32_t reg, uint64_t *value)
{
	vmi_entry_t e = entry_of(VMI_CALL_CPU_GETDR);
	return e ? rom_result(e, reg, value) : native_dr(1, reg, value);
}

long vmi_set_dr(uint32_t reg, uint64_t value)
{
	ROM_CALL(VMI_CALL_CPU_SETDR, reg, value, 0, NULL);
	return native_dr(0, reg, &value);
}

long vmi_rdpmc(uint32_t counter, uint64_t *value)
{
	vmi_entry_t e = entry_of(VMI_CALL_CPU_RDPMC);
	if (e)
		return rom_result(e, counter, value);
	if (deprivileged)
		return VMI_ERR_NOT_SUPPORTED; /* rdpmc needs ring 0 (CR4.PCE is the hypervisor's) */
	uint32_t lo, hi;
	__asm__ __volatile__("rdpmc" : "=a"(lo), "=d"(hi) : "c"(counter));
	*value = (uint64_t)hi << 32 | lo;
	return VMI_ERR_OK;
}

/* Without the ROM's interrupt-flag entries (the minimal ROM) a deprivileged kernel's flag is
 * still the shared page's: cli/sti/popf cannot change the real one at ring 3. */
static int shared_if(int set, int value)
{
#ifdef VMI_SHARED_VIF
	if (set) {
		SHARED_U32(VMI_SHARED_VIF) = value;
		if (value && SHARED_U32(VMI_SHARED_PENDING))
			vmi_raw_call(VMI_CALL_CPU_ENABLEINTERRUPTS, 0, 0, 0, NULL);
	}
	return SHARED_U32(VMI_SHARED_VIF) != 0;
#else
	(void)set;
	return value;
#endif
}

/* At ring 0 under a hypervisor with a shared page the real IF is also the events' vif. */
long vmi_enable_interrupts(void)
{
	ROM_CALL(VMI_CALL_CPU_ENABLEINTERRUPTS, 0, 0, 0, NULL);
	if (deprivileged)
		return shared_if(1, 1), VMI_ERR_OK;
	sti();
	if (shared)
		shared_if(1, 1);
	return VMI_ERR_OK;
}

long vmi_disable_interrupts(void)
{
	ROM_CALL(VMI_CALL_CPU_DISABLEINTERRUPTS, 0, 0, 0, NULL);
	if (deprivileged)
		return shared_if(1, 0), VMI_ERR_OK;
	cli();
	if (shared)
		shared_if(1, 0);
	return VMI_ERR_OK;
}

uint64_t vmi_get_interrupt_mask(void)
{
	ROM_GET(VMI_CALL_CPU_GETINTERRUPTMASK, 0,
		deprivileged ? (shared_if(0, 0) ? RFLAGS_IF : 0) : read_rflags());
}

long vmi_set_interrupt_mask(uint64_t flags)
{
	ROM_CALL(VMI_CALL_CPU_SETINTERRUPTMASK, flags, 0, 0, NULL);
	if (deprivileged)
		return shared_if(1, (flags & RFLAGS_IF) != 0), VMI_ERR_OK;
	write_rflags((read_rflags() & ~RFLAGS_IF) | (flags & RFLAGS_IF));
	if (shared)
		shared_if(1, (flags & RFLAGS_IF) != 0);
	return VMI_ERR_OK;
}

long vmi_io_delay(void)
{
	ROM_CALL(VMI_CALL_CPU_IODELAY, 0, 0, 0, NULL);
	outb(0, 0x80);
	return VMI_ERR_OK;
}

/* --- Segmentation ---------------------------------------------------------- */

static long native_load_table(int idt, uint64_t base, uint32_t limit)
{
	if (limit > 0xFFFF)
		return VMI_ERR_INVALID_ARGUMENT;
	struct descriptor_ptr p = { .limit = (uint16_t)limit, .base = base };
	if (idt)
		lidt(&p);
	else
		__asm__ __volatile__("lgdt %0" : : "m"(p) : "memory");
	return VMI_ERR_OK;
}

long vmi_set_gdt(uint64_t base, uint32_t limit)
{
	ROM_CALL(VMI_CALL_SEGMENTATION_SETGDT, base, limit, 0, NULL);
	return native_load_table(0, base, limit);
}

long vmi_set_idt(uint64_t base, uint32_t limit)
{
	ROM_CALL(VMI_CALL_SEGMENTATION_SETIDT, base, limit, 0, NULL);
	return native_load_table(1, base, limit);
}

long vmi_set_ldt(uint16_t selector)
{
	ROM_CALL(VMI_CALL_SEGMENTATION_SETLDT, selector, 0, 0, NULL);
	__asm__ __volatile__("lldt %0" : : "r"(selector) : "memory");
	return VMI_ERR_OK;
}

long vmi_set_tr(uint16_t selector)
{
	ROM_CALL(VMI_CALL_SEGMENTATION_SETTR, selector, 0, 0, NULL);
	__asm__ __volatile__("ltr %0" : : "r"(selector) : "memory");
	return VMI_ERR_OK;
}

static long get_table(uint32_t id, struct descriptor_ptr (*native)(void), uint64_t *base, uint32_t *limit)
{
	vmi_entry_t e = entry_of(id);
	if (e) {
		uint64_t r[4] = { 0 };
		long status = e(0, 0, 0, r);
		if (status == VMI_ERR_OK)
			*base = r[0], *limit = (uint32_t)r[1];
		return status;
	}
	struct descriptor_ptr p = native();
	*base = p.base, *limit = p.limit;
	return VMI_ERR_OK;
}

long vmi_get_gdt(uint64_t *base, uint32_t *limit)
{
	return get_table(VMI_CALL_SEGMENTATION_GETGDT, sgdt, base, limit);
}

long vmi_get_idt(uint64_t *base, uint32_t *limit)
{
	return get_table(VMI_CALL_SEGMENTATION_GETIDT, sidt, base, limit);
}

static inline uint16_t native_sldt(void)
{
	uint16_t s;
	__asm__ __volatile__("sldt %0" : "=r"(s));
	return s;
}

static inline uint16_t native_str(void)
{
	uint16_t s;
	__asm__ __volatile__("str %0" : "=r"(s));
	return s;
}

uint16_t vmi_get_ldt(void) { ROM_GET(VMI_CALL_SEGMENTATION_GETLDT, 0, native_sldt()); }
uint16_t vmi_get_tr(void) { ROM_GET(VMI_CALL_SEGMENTATION_GETTR, 0, native_str()); }

/* Base of the 16-byte system descriptor `selector` names in the loaded GDT. */
static uint64_t system_base(uint16_t selector)
{
	const uint64_t *d = (const uint64_t *)(uintptr_t)(sgdt().base + (selector & ~7u));
	return ((d[0] >> 16) & 0xFFFFFF) | ((d[0] >> 56) & 0xFF) << 24 | (d[1] & 0xFFFFFFFF) << 32;
}

/* Store a descriptor as the hypervisor would: 16 bytes for a present system descriptor, else 8. */
static long store_descriptor(uint64_t addr, uint64_t low, uint64_t high)
{
	int wide = !(low >> 44 & 1) && (low >> 47 & 1);
	volatile uint64_t *d = (volatile uint64_t *)(uintptr_t)addr;
	d[0] = low;
	if (wide)
		d[1] = high;
	return VMI_ERR_OK;
}

long vmi_write_gdt_entry(uint32_t index, uint64_t low, uint64_t high)
{
	ROM_CALL(VMI_CALL_SEGMENTATION_WRITEGDTENTRY, index, low, high, NULL);
	return store_descriptor(sgdt().base + index * 8ul, low, high);
}

long vmi_write_ldt_entry(uint32_t index, uint64_t low, uint64_t high)
{
	ROM_CALL(VMI_CALL_SEGMENTATION_WRITELDTENTRY, index, low, high, NULL);
	uint16_t ldt = native_sldt();
	if (!(ldt & ~7u))
		return VMI_ERR_INVALID_ARGUMENT;
	return store_descriptor(system_base(ldt) + index * 8ul, low, high);
}

long vmi_write_idt_entry(uint32_t index, uint64_t low, uint64_t high)
{
	ROM_CALL(VMI_CALL_SEGMENTATION_WRITEIDTENTRY, index, low, high, NULL);
	if (index > 0xFF)
		return VMI_ERR_INVALID_ARGUMENT;
	volatile uint64_t *g = (volatile uint64_t *)(uintptr_t)(sidt().base + index * 16ul);
	g[0] = low;
	g[1] = high;
	return VMI_ERR_OK;
}

long vmi_update_kernel_stack(uint64_t stack)
{
	ROM_CALL(VMI_CALL_SEGMENTATION_UPDATEKERNELSTACK, stack, 0, 0, NULL);
	uint16_t tr = native_str();
	if (!(tr & ~7u))
		return VMI_ERR_INVALID_ARGUMENT;
	memcpy((void *)(uintptr_t)(system_base(tr) + 4), &stack, sizeof(stack)); /* TSS.rsp0 */
	return VMI_ERR_OK;
}

/* --- MMU ------------------------------------------------------------------- */

static long store_pte(uint64_t *ptep, uint64_t pte)
{
	*(volatile uint64_t *)ptep = pte;
	return VMI_ERR_OK;
}

long vmi_set_pte(uint64_t *ptep, uint64_t pte)
{
	ROM_CALL(VMI_CALL_MMU_SETPTE, (uintptr_t)ptep, pte, 0, NULL);
	return store_pte(ptep, pte);
}

long vmi_set_pte_queued(uint64_t *ptep, uint64_t pte)
{
	ROM_CALL(VMI_CALL_MMU_SETPTE | VMI__ANN_QUEUE, (uintptr_t)ptep, pte, 0, NULL);
	return store_pte(ptep, pte);
}

long vmi_set_long_pte(uint64_t *ptep, uint64_t pte)
{
	ROM_CALL(VMI_CALL_MMU_SETLONGPTE, (uintptr_t)ptep, pte, 0, NULL);
	return store_pte(ptep, pte);
}

long vmi_set_long_pte_queued(uint64_t *ptep, uint64_t pte)
{
	ROM_CALL(VMI_CALL_MMU_SETLONGPTE | VMI__ANN_QUEUE, (uintptr_t)ptep, pte, 0, NULL);
	return store_pte(ptep, pte);
}

static void native_flush(uint32_t flags)
{
	uint64_t cr4 = read_cr4();
	if ((flags & VMI_FLUSH_GLOBAL) && (cr4 & CR4_PGE)) {
		write_cr4(cr4 & ~CR4_PGE); /* toggling PGE drops global translations too */
		write_cr4(cr4);
	} else if (flags & (VMI_FLUSH_TLB | VMI_FLUSH_GLOBAL)) {
		write_cr3(read_cr3());
	}
}

/* With a ROM, its FlushTLB/InvalPage entries complete the flush in the guest after the exit
 * (docs/rom-abi.md, "Calls the ROM completes in the guest"); natively we do it here. */
long vmi_flush_tlb(uint32_t flags)
{
	ROM_CALL(VMI_CALL_MMU_FLUSHTLB, flags, 0, 0, NULL);
	if (flags & ~(VMI_FLUSH_TLB | VMI_FLUSH_GLOBAL))
		return VMI_ERR_INVALID_ARGUMENT;
	native_flush(flags);
	return VMI_ERR_OK;
}

long vmi_inval_page(uint64_t va)
{
	ROM_CALL(VMI_CALL_MMU_INVALPAGE, va, 0, 0, NULL);
	invlpg((const void *)(uintptr_t)va);
	return VMI_ERR_OK;
}

/* --- SMP ------------------------------------------------------------------- */

long vmi_start_ap(uint32_t cpu, uint64_t rip, uint64_t rsp, uint64_t arg)
{
#ifdef VMI_CALL_CPU_SETINITIALAPSTATE
	/* The state block is read during the call: the stack is fine (identity-mapped RAM). */
	uint64_t state[4] = { rip, rsp, arg, 0 };
	ROM_CALL(VMI_CALL_CPU_SETINITIALAPSTATE, cpu, (uint64_t)(uintptr_t)state, 0, NULL);
#else
	(void)cpu; (void)rip; (void)rsp; (void)arg;
#endif
	return VMI_ERR_NOT_SUPPORTED;
}

long vmi_cpu_info(uint32_t *cpu, uint32_t *cpus)
{
#ifdef VMI_CALL_CPU_GETCPUINFO
	vmi_entry_t e = entry_of(VMI_CALL_CPU_GETCPUINFO);
	if (e) {
		uint64_t r[4] = { 0 };
		long status = e(0, 0, 0, r);
		if (status == VMI_ERR_OK) {
			*cpu = (uint32_t)r[0];
			*cpus = (uint32_t)r[1];
		}
		return status;
	}
#else
	(void)cpu; (void)cpus;
#endif
	return VMI_ERR_NOT_SUPPORTED;
}

long vmi_cpu_init(void)
{
#ifdef VMI_CALL_CPU_DEPRIVILEGE
	vmi_entry_t e = entry_of(VMI_CALL_CPU_DEPRIVILEGE);
	uint64_t r[4] = { 0 };
	if (e)
		return e(0, 0, 0, r);
#endif
	return VMI_ERR_NOT_SUPPORTED;
}

#ifdef VMI_CALL_MMU_FLUSHTLBMULTI
static long flush_multi(uint32_t id, uint64_t a0, uint64_t cpus, uint32_t *flushed)
{
	vmi_entry_t e = entry_of(id);
	uint64_t r[4] = { 0 };
	long status;

	if (!e)
		return VMI_ERR_NOT_SUPPORTED;
	status = e(a0, cpus, 0, r);
	if (status == VMI_ERR_OK && flushed)
		*flushed = (uint32_t)r[0];
	return status;
}
#endif

long vmi_flush_tlb_multi(uint32_t flags, uint64_t cpus, uint32_t *flushed)
{
#ifdef VMI_CALL_MMU_FLUSHTLBMULTI
	return flush_multi(VMI_CALL_MMU_FLUSHTLBMULTI, flags, cpus, flushed);
#else
	(void)flags; (void)cpus; (void)flushed;
	return VMI_ERR_NOT_SUPPORTED;
#endif
}

long vmi_inval_page_multi(uint64_t va, uint64_t cpus, uint32_t *flushed)
{
#ifdef VMI_CALL_MMU_INVALPAGEMULTI
	return flush_multi(VMI_CALL_MMU_INVALPAGEMULTI, va, cpus, flushed);
#else
	(void)va; (void)cpus; (void)flushed;
	return VMI_ERR_NOT_SUPPORTED;
#endif
}

long vmi_allocate_page(uint64_t table, uint32_t level)
{
	ROM_CALL(VMI_CALL_MMU_ALLOCATEPAGE, table, level, 0, NULL);
	return VMI_ERR_OK; /* natively a page table is just memory */
}

long vmi_release_page(uint64_t table)
{
	ROM_CALL(VMI_CALL_MMU_RELEASEPAGE, table, 0, 0, NULL);
	return VMI_ERR_OK;
}

long vmi_flush_queue(void)
{
	/* The queue lives in the ROM's data area; the ROM's entry flushes its own buffer.
	 * (0, 0) is also a valid empty batch should an entry pass its arguments on.
	 * A ROM that does not honour annotations (flag bit 0 clear) never queues: no exit. */
	uint64_t r[4] = { 0 };
	if (!(vmi_rom_flags() & 1))
		return VMI_ERR_OK;
	ROM_CALL(VMI_CALL_MMU_FLUSHQUEUE, 0, 0, 0, r);
	return VMI_ERR_OK; /* natively nothing is ever queued */
}

/* --- Query ------------------------------------------------------------------ */

long vmi_get_version(uint32_t *version)
{
	vmi_entry_t e = entry_of(VMI_CALL_QUERY_GETVERSION);
	uint64_t v = 0;
	long status = e ? rom_result(e, 0, &v) : VMI_ERR_NOT_SUPPORTED;
	if (status == VMI_ERR_OK)
		*version = (uint32_t)v;
	return status;
}

long vmi_has_family(uint32_t family, uint64_t *present)
{
	vmi_entry_t e = entry_of(VMI_CALL_QUERY_HASFAMILY);
	return e ? rom_result(e, family, present) : VMI_ERR_NOT_SUPPORTED;
}

long vmi_query_call(uint32_t call_id, uint64_t *info)
{
	vmi_entry_t e = entry_of(VMI_CALL_QUERY_QUERYCALL);
	return e ? rom_result(e, call_id, info) : VMI_ERR_NOT_SUPPORTED;
}

/* --- EventChannel (since 1.2) -------------------------------------------------- */

#ifdef VMI_FAMILY_EVENTCHANNEL
/* The guest's own FIFO when the hypervisor has no event channel: same ports, depth, errors. */
static struct {
	uint64_t value[VMI_EVTCHN_DEPTH];
	uint32_t head, count;
} fifo[VMI_EVTCHN_PORTS];

int vmi_evtchn_native(void) { return !entry_of(VMI_CALL_EVENTCHANNEL_SEND); }

long vmi_evtchn_send(uint32_t port, uint64_t value)
{
	ROM_CALL(VMI_CALL_EVENTCHANNEL_SEND, port, value, 0, NULL);
	if (port >= VMI_EVTCHN_PORTS)
		return VMI_ERR_INVALID_ARGUMENT;
	if (fifo[port].count == VMI_EVTCHN_DEPTH)
		return VMI_ERR_AGAIN;
	fifo[port].value[(fifo[port].head + fifo[port].count++) % VMI_EVTCHN_DEPTH] = value;
	return VMI_ERR_OK;
}

long vmi_evtchn_poll(uint32_t port, uint64_t *value, uint32_t *pending)
{
	vmi_entry_t e = entry_of(VMI_CALL_EVENTCHANNEL_POLL);
	if (e) {
		uint64_t r[4] = { 0 };
		long status = e(port, 0, 0, r);
		if (status == VMI_ERR_OK)
			*value = r[0], *pending = (uint32_t)r[1];
		return status;
	}
	if (port >= VMI_EVTCHN_PORTS)
		return VMI_ERR_INVALID_ARGUMENT;
	if (!fifo[port].count)
		return VMI_ERR_AGAIN;
	*value = fifo[port].value[fifo[port].head];
	fifo[port].head = (fifo[port].head + 1) % VMI_EVTCHN_DEPTH;
	*pending = --fifo[port].count;
	return VMI_ERR_OK;
}
#endif

/* --- EventChannel 1.4: sources, masks, upcalls ------------------------------------------ */

#ifdef VMI_CALL_EVENTCHANNEL_BIND
#define VMI__STR_(x) #x
#define VMI__STR(x) VMI__STR_(x)
static vmi_event_handler_t event_handler;

int vmi_events_present(void) { return entry_of(VMI_CALL_EVENTCHANNEL_SETCALLBACK) != NULL && shared != NULL; }

long vmi_evtchn_bind(uint32_t source, uint32_t port)
{
	ROM_CALL(VMI_CALL_EVENTCHANNEL_BIND, source, port, 0, NULL);
	return VMI_ERR_NOT_SUPPORTED;
}

long vmi_evtchn_mask(uint32_t port)
{
	ROM_CALL(VMI_CALL_EVENTCHANNEL_MASK, port, 0, 0, NULL);
	return VMI_ERR_NOT_SUPPORTED;
}

long vmi_evtchn_unmask(uint32_t port)
{
	ROM_CALL(VMI_CALL_EVENTCHANNEL_UNMASK, port, 0, 0, NULL);
	return VMI_ERR_NOT_SUPPORTED;
}

uint64_t vmi_upcalls(void)
{
	return shared ? *(volatile uint64_t *)((volatile char *)shared + VMI_SHARED_UPCALLS) : 0;
}

/* Called by the entry below with vif = 0: take the pending unmasked ports (masked ones keep
 * their bits until unmasked) and hand them to the handler. */
void vmi__upcall_dispatch(void);
void vmi__upcall_dispatch(void)
{
	volatile char *page = (volatile char *)shared;
	uint64_t mask = *(volatile uint64_t *)(page + VMI_SHARED_EVTCHN_MASK);
	uint64_t old = __atomic_fetch_and((uint64_t *)(page + VMI_SHARED_EVTCHN_PENDING), mask, __ATOMIC_SEQ_CST);
	uint64_t ports = old & ~mask;
	if (ports && event_handler)
		event_handler(ports);
}

/* The upcall entry (docs/events.md): the hypervisor pushed rflags at [rsp], rip at [rsp + 8],
 * and cleared vif. Save the caller-saved registers (and rbx, used to realign the stack),
 * dispatch, then set vif again; an event that arrived meanwhile set `pending` (the hypervisor
 * could not deliver it), which is taken here with no exit. `popfq; ret` resumes the code. */
void vmi__upcall_entry(void);
__asm__(
	"	.text\n"
	"	.globl vmi__upcall_entry\n"
	"vmi__upcall_entry:\n"
	"	pushq %rax\n	pushq %rcx\n	pushq %rdx\n	pushq %rsi\n	pushq %rdi\n"
	"	pushq %r8\n	pushq %r9\n	pushq %r10\n	pushq %r11\n	pushq %rbx\n"
	"	movq %rsp, %rbx\n"
	"	andq $-16, %rsp\n"
	"1:	call vmi__upcall_dispatch\n"
	"	movq vmi__shared(%rip), %rax\n"
	"	movl $1, " VMI__STR(VMI_SHARED_VIF) "(%rax)\n"
	"	cmpl $0, " VMI__STR(VMI_SHARED_PENDING) "(%rax)\n"
	"	je 2f\n"
	"	movl $0, " VMI__STR(VMI_SHARED_VIF) "(%rax)\n"
	"	movl $0, " VMI__STR(VMI_SHARED_PENDING) "(%rax)\n"
	"	jmp 1b\n"
	"2:	movq %rbx, %rsp\n"
	"	popq %rbx\n	popq %r11\n	popq %r10\n	popq %r9\n	popq %r8\n"
	"	popq %rdi\n	popq %rsi\n	popq %rdx\n	popq %rcx\n	popq %rax\n"
	"	popfq\n"
	"	ret\n");

long vmi_evtchn_set_handler(vmi_event_handler_t handler)
{
	if (!vmi_events_present())
		return VMI_ERR_NOT_SUPPORTED;
	event_handler = handler;
	return entry_of(VMI_CALL_EVENTCHANNEL_SETCALLBACK)(handler ? (uint64_t)(uintptr_t)vmi__upcall_entry : 0,
							  0, 0, NULL);
}
#endif

/* --- Time (since 1.4) ------------------------------------------------------------------- */

#ifdef VMI_FAMILY_TIME
int vmi_time_present(void) { return entry_of(VMI_CALL_TIME_SETALARM) != NULL; }

uint64_t vmi_cycle_counter(void) { ROM_GET(VMI_CALL_TIME_GETCYCLECOUNTER, 0, rdtsc()); }

long vmi_cycle_frequency(uint64_t *hz)
{
	vmi_entry_t e = entry_of(VMI_CALL_TIME_GETCYCLEFREQUENCY);
	return e ? rom_result(e, 0, hz) : VMI_ERR_NOT_SUPPORTED;
}

long vmi_wallclock(uint64_t *ns)
{
	vmi_entry_t e = entry_of(VMI_CALL_TIME_GETWALLCLOCKTIME);
	return e ? rom_result(e, 0, ns) : VMI_ERR_NOT_SUPPORTED;
}

long vmi_set_alarm(uint32_t alarm, uint64_t expiry, uint64_t period)
{
	ROM_CALL(VMI_CALL_TIME_SETALARM, alarm, expiry, period, NULL);
	return VMI_ERR_NOT_SUPPORTED;
}

long vmi_cancel_alarm(uint32_t alarm, uint64_t *fired)
{
	vmi_entry_t e = entry_of(VMI_CALL_TIME_CANCELALARM);
	return e ? rom_result(e, alarm, fired) : VMI_ERR_NOT_SUPPORTED;
}
#endif
