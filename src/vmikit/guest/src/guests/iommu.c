/*
 * iommu: QEMU's edu PCI device behind an Intel VT-d IOMMU, driven as a native kernel would, at
 * ring 0 on the bare board (--rom none --device edu --device intel-iommu) and unchanged on QEMU
 * (-M q35,kernel-irqchip=split -device intel-iommu,intremap=on,eim=off -device edu). It finds
 * the edu by scanning PCI bus 0 (configuration mechanism #1) and the remapping unit through the
 * ACPI DMAR, then checks:
 *   - the edu: its ID, liveness (the inverse of what was written), the factorial unit;
 *   - DMA with translation off: guest-physical addresses, both directions;
 *   - queued invalidation: an invalidation-wait descriptor's status write;
 *   - DMA remapping (root table, a context entry for the edu, a 3-level second-level table;
 *     SRTP and TE through the GSTS handshake): a read from an IOVA mapped read-only and a write
 *     to one mapped read/write land where the tables say; a write to the read-only IOVA and one
 *     to an unmapped IOVA are blocked (memory unchanged) and recorded (fault reason, address,
 *     source ID) in the fault-recording register FSTS.FRI names;
 *   - interrupt remapping (IRTA, SIRTP, IRE): the edu's MSI in remappable format delivers its
 *     IRTE's vector, an IOAPIC entry in remappable format for the edu's INTx line delivers its
 *     IRTE's vector, and a not-present IRTE blocks the MSI.
 * The PASS lines are the same on both machines; what legitimately differs (addresses, the pin,
 * QEMU 7.2 recording no interrupt-remapping faults) is on INFO lines. Every wait is bounded by
 * the ACPI PM timer and ends in a FAIL. Without an edu (or a DMAR) it says SKIP and ends cleanly.
 * Deprivileged under a ROM it refuses (exit 2): it needs ring 0.
 */
#include "apic.h"
#include "lib.h"
#include "vmi.h"

#define VEC_MSI  0x61
#define VEC_INTX 0x62
#define VEC_FAULT 0x63
#define VEC_PIC  0x70 /* the 8259s, remapped out of the exception vectors and masked */

/* --- time: every wait is bounded --------------------------------------------------------- */

#define PM_TIMER_HZ 3579545ull
static unsigned pm_port, pm_bits = 24;
static uint64_t pm_last, pm_total;

static uint64_t pm_now(void)
{
	if (!pm_port)
		return 0;
	uint64_t v = inl((uint16_t)pm_port), mask = (1ull << pm_bits) - 1;
	pm_total += (v - pm_last) & mask;
	pm_last = v;
	return pm_total;
}

/* Spin until cond() or ms have passed (without a PM timer: a generous iteration count). */
static int wait_ms(int (*cond)(void), unsigned ms)
{
	uint64_t start = pm_now(), limit = ms * PM_TIMER_HZ / 1000;
	for (uint64_t i = 0;; i++) {
		if (cond())
			return 1;
		if (pm_port ? pm_now() - start > limit : i > (uint64_t)ms * 10000)
			return cond();
		__asm__ __volatile__("pause" ::: "memory");
	}
}

/* --- MMIO and PCI configuration space --------------------------------------------------------- */

static inline uint32_t rd32(uint64_t a) { barrier(); uint32_t v = *(volatile uint32_t *)(uintptr_t)a; barrier(); return v; }
static inline uint64_t rd64(uint64_t a) { barrier(); uint64_t v = *(volatile uint64_t *)(uintptr_t)a; barrier(); return v; }
static inline void wr32(uint64_t a, uint32_t v) { barrier(); *(volatile uint32_t *)(uintptr_t)a = v; barrier(); }
static inline void wr64(uint64_t a, uint64_t v) { barrier(); *(volatile uint64_t *)(uintptr_t)a = v; barrier(); }

static void cfg_select(unsigned devfn, unsigned reg) { outl(0x80000000u | devfn << 8 | (reg & 0xFC), 0xCF8); }
static uint32_t cfg_read32(unsigned devfn, unsigned reg) { cfg_select(devfn, reg); return inl(0xCFC); }
static uint16_t cfg_read16(unsigned devfn, unsigned reg) { cfg_select(devfn, reg); return inw((uint16_t)(0xCFC + (reg & 2))); }
static uint8_t cfg_read8(unsigned devfn, unsigned reg) { cfg_select(devfn, reg); return inb((uint16_t)(0xCFC + (reg & 3))); }
static void cfg_write32(unsigned devfn, unsigned reg, uint32_t v) { cfg_select(devfn, reg); outl(v, 0xCFC); }
static void cfg_write16(unsigned devfn, unsigned reg, uint16_t v) { cfg_select(devfn, reg); outw(v, (uint16_t)(0xCFC + (reg & 2))); }

#define PCI_COMMAND       0x04
#define PCI_CMD_MEMORY    (1u << 1)
#define PCI_CMD_MASTER    (1u << 2)
#define PCI_CMD_INTX_OFF  (1u << 10)
#define PCI_STATUS_CAPS   (1u << 4)
#define PCI_INTERRUPT_LINE 0x3C

/* Bus 0, every function of every slot: the first vendor:device match's devfn, or -1. */
static int pci_find(uint16_t vendor, uint16_t device)
{
	for (unsigned slot = 0; slot < 32; slot++) {
		for (unsigned fn = 0; fn < 8; fn++) {
			unsigned devfn = slot << 3 | fn;
			uint32_t id = cfg_read32(devfn, 0);
			if ((id & 0xFFFF) == 0xFFFF || (id & 0xFFFF) == 0) {
				if (fn == 0)
					break; /* no function 0: no device in this slot */
				continue;
			}
			if (id == ((uint32_t)device << 16 | vendor))
				return (int)devfn;
			if (fn == 0 && !(cfg_read8(devfn, 0x0E) & 0x80))
				break; /* not multi-function */
		}
	}
	return -1;
}

/* The offset of capability `id` in the capability list (bounded: a loop in the list ends it), or 0. */
static unsigned pci_cap(unsigned devfn, uint8_t id)
{
	if (!(cfg_read16(devfn, 0x06) & PCI_STATUS_CAPS))
		return 0;
	unsigned at = cfg_read8(devfn, 0x34) & 0xFC;
	for (int hops = 0; at >= 0x40 && hops < 48; hops++) {
		if (cfg_read8(devfn, at) == id)
			return at;
		at = cfg_read8(devfn, at + 1) & 0xFC;
	}
	return 0;
}

/* --- the edu (QEMU's docs/specs/edu.rst) ---------------------------------------------------- */

#define EDU_ID        0x00
#define EDU_ALIVE     0x04
#define EDU_FACTORIAL 0x08
#define EDU_STATUS    0x20
#define EDU_IRQ_STATUS 0x24
#define EDU_IRQ_RAISE 0x60
#define EDU_IRQ_ACK   0x64
#define EDU_DMA_SRC   0x80
#define EDU_DMA_DST   0x88
#define EDU_DMA_COUNT 0x90
#define EDU_DMA_CMD   0x98
#define EDU_DMA_START 1u
#define EDU_DMA_TO_RAM 2u /* direction: the edu's buffer to RAM */
#define EDU_BUFFER    0x40000ull /* the buffer's address in the edu's own DMA space */

static int edu_devfn = -1;
static uint64_t edu;
static volatile unsigned msi_count, intx_count, fault_count, other_count;

static uint32_t edu_read(unsigned reg) { return rd32(edu + reg); }
static void edu_write(unsigned reg, uint32_t v) { wr32(edu + reg, v); }

static int factorial_done(void) { return !(edu_read(EDU_STATUS) & 1); }
static int dma_done(void) { return !(edu_read(EDU_DMA_CMD) & EDU_DMA_START); }

/* One transfer of n bytes: RAM (or an IOVA) at `ram` and the buffer at `offset`. QEMU runs it
 * from a 100 ms timer and ignores the registers while it is busy, so each waits for the last. */
static int edu_dma(uint64_t ram, unsigned offset, unsigned n, int to_ram)
{
	if (!wait_ms(dma_done, 2000))
		return 0;
	wr64(edu + EDU_DMA_SRC, to_ram ? EDU_BUFFER + offset : ram);
	wr64(edu + EDU_DMA_DST, to_ram ? ram : EDU_BUFFER + offset);
	wr64(edu + EDU_DMA_COUNT, n);
	edu_write(EDU_DMA_CMD, EDU_DMA_START | (to_ram ? EDU_DMA_TO_RAM : 0));
	return wait_ms(dma_done, 2000);
}

static void fill(uint8_t *p, unsigned n, unsigned seed)
{
	for (unsigned i = 0; i < n; i++)
		p[i] = (uint8_t)(seed + i * 7);
}

static int all_bytes(const volatile uint8_t *p, unsigned n, uint8_t v)
{
	for (unsigned i = 0; i < n; i++)
		if (p[i] != v)
			return 0;
	return 1;
}

static int same(const volatile uint8_t *a, const uint8_t *b, unsigned n)
{
	for (unsigned i = 0; i < n; i++)
		if (a[i] != b[i])
			return 0;
	return 1;
}

static int on_vector(struct trap_regs *r)
{
	if (r->vector == VEC_MSI)
		msi_count++;
	else if (r->vector == VEC_INTX)
		intx_count++;
	else if (r->vector == VEC_FAULT) {
		fault_count++;
		return 1; /* the unit's, not the edu's */
	}
	else
		other_count++;
	/* Acknowledged at the device: its INTx line falls, so the next raise is a new edge. */
	edu_write(EDU_IRQ_ACK, edu_read(EDU_IRQ_STATUS));
	return 1;
}

static int on_pic(struct trap_regs *r) { (void)r; other_count++; return 1; } /* spurious: no EOI owed */

static void check_edu(void)
{
	uint32_t id = edu_read(EDU_ID);
	report(id == 0x010000ED, "edu: the identification register reads 0x010000ed");
	edu_write(EDU_ALIVE, 0x12345678);
	uint32_t a = edu_read(EDU_ALIVE);
	edu_write(EDU_ALIVE, 0);
	report(a == 0xEDCBA987 && edu_read(EDU_ALIVE) == 0xFFFFFFFF, "edu: liveness returns the inverse of what was written");
	edu_write(EDU_FACTORIAL, 10);
	int done = wait_ms(factorial_done, 2000);
	report(done && edu_read(EDU_FACTORIAL) == 3628800, "edu: 10! = 3628800");
	edu_write(EDU_FACTORIAL, 12);
	done = wait_ms(factorial_done, 2000);
	report(done && edu_read(EDU_FACTORIAL) == 479001600, "edu: 12! = 479001600");
}

#define DMA_BYTES 256

static void check_dma_untranslated(void)
{
	uint8_t *src = alloc_page(), *dst = alloc_page();
	if (!src || !dst) {
		report(0, "DMA without the IOMMU: two pages of RAM");
		return;
	}
	fill(src, PAGE_SIZE, 3);
	memset(dst, 0xA5, PAGE_SIZE);
	int ok = edu_dma((uintptr_t)src, 0, DMA_BYTES, 0) && edu_dma((uintptr_t)dst + 64, 0, DMA_BYTES, 1);
	report(ok, "DMA without the IOMMU: both transfers complete");
	report(ok && same(dst + 64, src, DMA_BYTES) && all_bytes(dst, 64, 0xA5) &&
	       all_bytes(dst + 64 + DMA_BYTES, PAGE_SIZE - 64 - DMA_BYTES, 0xA5),
	       "DMA without the IOMMU: RAM to the edu's buffer and back, at guest-physical addresses, %u bytes",
	       DMA_BYTES);
}

/* --- the VT-d unit (Intel's VT-d specification, chapters 9-11) --------------------------------- */

#define VTD_VER     0x00
#define VTD_CAP     0x08
#define VTD_ECAP    0x10
#define VTD_GCMD    0x18
#define VTD_GSTS    0x1C
#define VTD_RTADDR  0x20
#define VTD_FSTS    0x34
#define VTD_FECTL   0x38
#define VTD_FEDATA  0x3C
#define VTD_FEADDR  0x40
#define VTD_FEUADDR 0x44
#define VTD_IQH     0x80
#define VTD_IQT     0x88
#define VTD_IQA     0x90
#define VTD_IRTA    0xB8
#define GCMD_TE     (1u << 31)
#define GCMD_SRTP   (1u << 30)
#define GCMD_QIE    (1u << 26)
#define GCMD_IRE    (1u << 25)
#define GCMD_SIRTP  (1u << 24)
#define GCMD_CFI    (1u << 23)
#define GSTS_ONESHOT 0x96FFFFFFu /* GSTS bits that are persistent commands: SRTP, SFL, EAFL, WBF, SIRTP cleared */
#define FSTS_PFO    (1u << 0)
#define FSTS_PPF    (1u << 1)
#define FSTS_IQE    (1u << 4)

static uint64_t vtd;
static uint64_t cap, ecap;
static unsigned frcd_offset, frcd_count;
static uint64_t *queue;
static unsigned queue_tail;
static volatile uint32_t *wait_status;

static uint32_t gsts_bit;
static int gsts_set(void) { return (rd32(vtd + VTD_GSTS) & gsts_bit) != 0; }
static int gsts_clear(void) { return !(rd32(vtd + VTD_GSTS) & gsts_bit); }

/* A command bit in GCMD, the persistent ones kept as GSTS shows them, then wait for GSTS to
 * follow (spec 10.4.4: one command at a time, software waits for the status). */
static int gcmd(uint32_t bit, int on, uint32_t status_bit)
{
	uint32_t now = rd32(vtd + VTD_GSTS) & GSTS_ONESHOT & ~(on ? 0 : bit);
	wr32(vtd + VTD_GCMD, now | (on ? bit : 0));
	gsts_bit = status_bit;
	return wait_ms(on ? gsts_set : gsts_clear, 1000);
}

static uint32_t wait_value = 0x600DF00D;
static int status_written(void) { return *wait_status == wait_value; }

/* Descriptors into the queue, then an invalidation wait whose status write says they are done. */
static int qi_submit(const uint64_t (*desc)[2], unsigned n)
{
	*wait_status = 0;
	wait_value++;
	for (unsigned i = 0; i <= n; i++) {
		uint64_t *slot = queue + 2 * (queue_tail % 256);
		if (i < n) {
			slot[0] = desc[i][0];
			slot[1] = desc[i][1];
		} else {
			slot[0] = 0x5 | 1u << 5 | (uint64_t)wait_value << 32; /* wait, SW: write the status data */
			slot[1] = (uintptr_t)wait_status;
		}
		queue_tail++;
	}
	barrier();
	wr64(vtd + VTD_IQT, (uint64_t)(queue_tail % 256) << 4);
	return wait_ms(status_written, 1000) && !(rd32(vtd + VTD_FSTS) & FSTS_IQE);
}

static const uint64_t inv_context_global[2] = { 0x1 | 1u << 4, 0 }; /* context cache, global */
static const uint64_t inv_iotlb_global[2] = { 0x2 | 1u << 4, 0 };   /* IOTLB, global */
static const uint64_t inv_iec_global[2] = { 0x4, 0 };               /* interrupt entry cache, global */

struct fault {
	unsigned index, reason, sid, read;
	uint64_t info;
};

/* The first pending fault (FSTS.PPF; FSTS.FRI names its record): read, then cleared (F is
 * write-1-to-clear) so that the next fault has a free record. 0 when none is pending. */
static int take_fault(struct fault *f)
{
	uint32_t fsts = rd32(vtd + VTD_FSTS);
	if (!(fsts & FSTS_PPF))
		return 0;
	f->index = fsts >> 8 & 0xFF;
	uint64_t at = vtd + frcd_offset + 16ull * (f->index % frcd_count);
	uint64_t lo = rd64(at), hi = rd64(at + 8);
	f->info = lo & ~0xFFFull;
	f->sid = hi & 0xFFFF;
	f->reason = hi >> 32 & 0xFF;
	f->read = hi >> 62 & 1;
	wr32(at + 12, 1u << 31);
	wr32(vtd + VTD_FSTS, FSTS_PFO | FSTS_IQE);
	return (hi >> 63) & 1;
}

static void clear_faults(void)
{
	struct fault f;
	for (unsigned i = 0; i < frcd_count + 1 && take_fault(&f); i++)
		;
}

static volatile unsigned *count_watched;
static unsigned count_target;
static int counted(void) { return *count_watched >= count_target; }

/* A 3-level second-level table (39-bit address width): R and W at every level but the leaf. */
static uint64_t *slpt_root;

static int map_page(uint64_t iova, uint64_t gpa, uint64_t perm)
{
	uint64_t *table = slpt_root;
	for (int level = 3; level > 1; level--) {
		uint64_t *e = &table[iova >> (12 + 9 * (level - 1)) & 0x1FF];
		if (!(*e & 3)) {
			void *next = alloc_page();
			if (!next)
				return 0;
			*e = (uintptr_t)next | 3;
		}
		table = (uint64_t *)(uintptr_t)(*e & 0x000FFFFFFFFFF000ull);
	}
	table[iova >> 12 & 0x1FF] = gpa | perm;
	return 1;
}

#define IOVA_RW 0x0C000000ull /* 192 MiB: above the RAM the checks run with; the edu's 28-bit DMA mask on QEMU */
#define IOVA_RO 0x0C001000ull

static uint16_t edu_sid(void) { return (uint16_t)edu_devfn; } /* bus 0 */

static int setup_unit(const struct dmar_info *d)
{
	vtd = d->base;
	uint32_t ver = rd32(vtd + VTD_VER);
	cap = rd64(vtd + VTD_CAP);
	ecap = rd64(vtd + VTD_ECAP);
	frcd_offset = (unsigned)(cap >> 24 & 0x3FF) * 16;
	frcd_count = (unsigned)(cap >> 40 & 0xFF) + 1;
	printf("INFO: VT-d unit at 0x%lx, version %u.%u, CAP 0x%lx, ECAP 0x%lx, %u fault record(s) at 0x%x\n",
	       (unsigned long)vtd, ver >> 4 & 0xF, ver & 0xF, (unsigned long)cap, (unsigned long)ecap, frcd_count,
	       frcd_offset);
	report(ver != 0xFFFFFFFF && ver >> 4 >= 1, "VT-d: the unit the DMAR names answers (version 1.0 or later)");
	report(cap >> 9 & 1, "VT-d: CAP.SAGAW offers 39-bit, 3-level tables");
	report((ecap >> 1 & 1) && (ecap >> 3 & 1), "VT-d: ECAP offers queued invalidation and interrupt remapping");
	report(!(rd32(vtd + VTD_GSTS) & (GCMD_TE | GCMD_IRE | GCMD_QIE)),
	       "VT-d: translation, interrupt remapping and the queue are off after reset");
	return (cap >> 9 & 1) && (ecap >> 1 & 1) && (ecap >> 3 & 1) && frcd_offset;
}

static int setup_queue(void)
{
	queue = alloc_page();
	wait_status = alloc_page();
	if (!queue || !wait_status)
		return 0;
	wr64(vtd + VTD_IQT, 0);
	wr64(vtd + VTD_IQA, (uintptr_t)queue); /* 256 entries of 128 bits: one page */
	int on = gcmd(GCMD_QIE, 1, GCMD_QIE);
	report(on, "VT-d: queued invalidation enabled (GSTS.QIES)");
	if (!on)
		return 0;
	int done = qi_submit(NULL, 0);
	report(done, "VT-d: an invalidation-wait descriptor writes its status data");
	report(done && rd64(vtd + VTD_IQH) == rd64(vtd + VTD_IQT), "VT-d: the queue head reaches its tail");
	return done;
}

static void check_dma_remapping(void)
{
	uint64_t *root = alloc_page(), *context = alloc_page();
	uint8_t *rw = alloc_page(), *ro = alloc_page(), *unmapped = alloc_page();
	slpt_root = alloc_page();
	if (!root || !context || !rw || !ro || !unmapped || !slpt_root ||
	    !map_page(IOVA_RW, (uintptr_t)rw, 3) || !map_page(IOVA_RO, (uintptr_t)ro, 1)) {
		report(0, "DMA remapping: pages for the tables");
		return;
	}
	unsigned bus = 0, devfn = (unsigned)edu_devfn;
	root[2 * bus] = (uintptr_t)context | 1; /* present */
	/* Present, translation type 0 (second-level only), the table; AW 1 (39 bits), domain 1. */
	context[2 * devfn] = (uintptr_t)slpt_root | 1;
	context[2 * devfn + 1] = 1 | 1u << 8;
	barrier();

	wr64(vtd + VTD_RTADDR, (uintptr_t)root);
	report(gcmd(GCMD_SRTP, 1, GCMD_SRTP), "DMA remapping: the root table pointer latched (GSTS.RTPS)");
	const uint64_t inval[2][2] = { { inv_context_global[0], inv_context_global[1] },
				       { inv_iotlb_global[0], inv_iotlb_global[1] } };
	report(qi_submit(inval, 2), "DMA remapping: context cache and IOTLB invalidated through the queue");
	report(gcmd(GCMD_TE, 1, GCMD_TE), "DMA remapping: translation enabled (GSTS.TES)");

	/* A read from the read-only IOVA, a write to the read/write one: where the tables say. */
	fill(ro, PAGE_SIZE, 11);
	memset(rw, 0x5A, PAGE_SIZE);
	int ok = edu_dma(IOVA_RO + 128, 0, DMA_BYTES, 0) && edu_dma(IOVA_RW + 512, 0, DMA_BYTES, 1);
	report(ok, "DMA remapping: both transfers through IOVAs complete");
	report(ok && same(rw + 512, ro + 128, DMA_BYTES) && all_bytes(rw, 512, 0x5A) &&
	       all_bytes(rw + 512 + DMA_BYTES, PAGE_SIZE - 512 - DMA_BYTES, 0x5A),
	       "DMA remapping: a read from an IOVA mapped read-only and a write to one mapped read/write, the data "
	       "in the pages the tables name");
	report(!(rd32(vtd + VTD_FSTS) & FSTS_PPF), "DMA remapping: the permitted accesses recorded no fault");

	/* A write to the read-only IOVA: blocked, the page unchanged, a write fault recorded. The
	 * IOTLB is invalidated first: QEMU's model serves a write from the read-only translation its
	 * IOTLB cached for the read above and records no fault for it (hardware would), while a
	 * walk of the tables records one on both machines. */
	qi_submit(&inv_iotlb_global, 1);
	uint8_t before[64];
	memcpy(before, ro, sizeof(before));
	ok = edu_dma(IOVA_RO, 0, DMA_BYTES, 1);
	struct fault f = { 0 };
	int faulted = take_fault(&f);
	report(ok && same(ro, before, sizeof(before)) && same(ro + 128, rw + 512, DMA_BYTES),
	       "DMA remapping: a write to an IOVA mapped read-only is blocked, the page unchanged");
	printf("INFO: write to the read-only IOVA: record %u, reason 0x%x, address 0x%lx, source %04x, %s\n", f.index,
	       f.reason, (unsigned long)f.info, f.sid, f.read ? "read" : "write");
	report(faulted && f.reason == 0x5 && f.info == IOVA_RO && f.sid == edu_sid() && !f.read,
	       "DMA remapping: that fault recorded: reason 5 (no write permission), the IOVA, the edu's source ID, a write");

	/* A write to an IOVA the tables do not map: the IOVA is this page's own address, where an
	 * untranslated write would land. */
	memset(unmapped, 0xC3, PAGE_SIZE);
	/* This time the fault event is unmasked: an MSI with FEDATA's vector (not remapped). */
	set_irq_hook(VEC_FAULT, on_vector);
	wr32(vtd + VTD_FEDATA, VEC_FAULT);
	wr32(vtd + VTD_FEADDR, 0xFEE00000u | lapic_id() << 12);
	wr32(vtd + VTD_FEUADDR, 0);
	wr32(vtd + VTD_FECTL, 0);
	ok = edu_dma((uintptr_t)unmapped, 0, DMA_BYTES, 1);
	count_watched = &fault_count;
	count_target = 1;
	sti();
	int event = wait_ms(counted, 1000);
	cli();
	wr32(vtd + VTD_FECTL, 1u << 31);
	faulted = take_fault(&f);
	report(ok && all_bytes(unmapped, PAGE_SIZE, 0xC3),
	       "DMA remapping: a write to an unmapped IOVA is blocked, memory unchanged");
	printf("INFO: write to the unmapped IOVA: record %u, reason 0x%x, address 0x%lx, source %04x, %s\n", f.index,
	       f.reason, (unsigned long)f.info, f.sid, f.read ? "read" : "write");
	report(faulted && f.reason == 0x5 && f.info == (uintptr_t)unmapped && f.sid == edu_sid() && !f.read,
	       "DMA remapping: that fault recorded: reason 5 (not present for a write), the IOVA, the edu's source ID");
	report(event && fault_count == 1 && !other_count,
	       "DMA remapping: with FECTL unmasked the fault event interrupts with FEDATA's vector");
	report(!(rd32(vtd + VTD_FSTS) & FSTS_PPF), "DMA remapping: clearing F leaves no fault pending");
}

/* --- interrupt remapping ------------------------------------------------------------------------ */

static uint64_t *irt;

static void irte(unsigned index, unsigned vector, int svt, uint16_t sid)
{
	/* Present, physical destination, fixed delivery, edge; the xAPIC destination in bits 47:40. */
	irt[2 * index + 1] = (uint64_t)(svt ? 1 : 0) << 18 | sid;
	irt[2 * index] = 1 | (uint64_t)vector << 16 | (uint64_t)lapic_id() << 40;
}

/* Raise the edu's interrupt with interrupts on; 1 if *counter grew within ms. */
static int raise_and_wait(volatile unsigned *counter, unsigned ms)
{
	count_watched = counter;
	count_target = *counter + 1;
	sti();
	edu_write(EDU_IRQ_RAISE, 1);
	int got = wait_ms(counted, ms);
	cli();
	edu_write(EDU_IRQ_ACK, edu_read(EDU_IRQ_STATUS));
	return got;
}

static void msi_target(unsigned cap_at, unsigned handle)
{
	/* Remappable format: bit 4, the handle in bits 19:5 (and 2 for its bit 15); no subhandle. */
	cfg_write32((unsigned)edu_devfn, cap_at + 4, 0xFEE00000u | 1u << 4 | (handle & 0x7FFF) << 5 | (handle >> 15 & 1) << 2);
	uint16_t control = cfg_read16((unsigned)edu_devfn, cap_at + 2);
	unsigned data_at = control & (1u << 7) ? cap_at + 12 : cap_at + 8;
	if (control & (1u << 7))
		cfg_write32((unsigned)edu_devfn, cap_at + 8, 0);
	cfg_write16((unsigned)edu_devfn, data_at, 0);
}

static void check_interrupt_remapping(const struct dmar_info *d, uint64_t ioapic)
{
	irt = alloc_page();
	if (!irt) {
		report(0, "interrupt remapping: a page for the table");
		return;
	}
	wr64(vtd + VTD_IRTA, (uintptr_t)irt | 7); /* 2^(7+1) = 256 entries, xAPIC mode */
	report(gcmd(GCMD_SIRTP, 1, GCMD_SIRTP), "interrupt remapping: the table pointer latched (GSTS.IRTPS)");
	report(qi_submit(&inv_iec_global, 1), "interrupt remapping: interrupt entry cache invalidated through the queue");
	report(gcmd(GCMD_IRE, 1, GCMD_IRE), "interrupt remapping: enabled (GSTS.IRES)");
	report(!(rd32(vtd + VTD_GSTS) & GCMD_CFI), "interrupt remapping: compatibility-format interrupts blocked (CFIS clear)");

	set_irq_hook(VEC_MSI, on_vector);
	set_irq_hook(VEC_INTX, on_vector);
	unsigned devfn = (unsigned)edu_devfn;
	unsigned msi = pci_cap(devfn, 0x05);
	report(msi != 0, "edu: an MSI capability in its capability list");
	if (msi) {
		/* MSI through IRTE 1, its source verified (SVT 1: the edu's bus:device.function). */
		irte(1, VEC_MSI, 1, edu_sid());
		qi_submit(&inv_iec_global, 1);
		msi_target(msi, 1);
		cfg_write16(devfn, msi + 2, cfg_read16(devfn, msi + 2) | 1); /* MSI enable */
		int got = raise_and_wait(&msi_count, 1000);
		report(got && msi_count == 1 && !intx_count && !other_count,
		       "interrupt remapping: the edu's MSI in remappable format delivers its IRTE's vector");

		/* Handle 2 names an IRTE that is not present: the message is blocked. */
		msi_target(msi, 2);
		clear_faults();
		got = raise_and_wait(&msi_count, 200);
		report(!got && msi_count == 1 && !other_count, "interrupt remapping: a not-present IRTE blocks the MSI");
		struct fault f = { 0 };
		if (take_fault(&f))
			printf("INFO: the blocked MSI recorded fault reason 0x%x, index %lu, source %04x\n", f.reason,
			       (unsigned long)(f.info >> 48), f.sid);
		else
			printf("INFO: the blocked MSI recorded no fault\n");
		cfg_write16(devfn, msi + 2, cfg_read16(devfn, msi + 2) & ~1u); /* back to INTx */
	}

	/* INTx through the IOAPIC pin the firmware wrote in the interrupt line register, the entry in
	 * remappable format naming IRTE 3; its requester is the IOAPIC of the DMAR's device scope. */
	unsigned pin = cfg_read8(devfn, PCI_INTERRUPT_LINE);
	unsigned pins = ((ioapic_read(ioapic, 1) >> 16) & 0xFF) + 1;
	printf("INFO: edu INTx on IOAPIC pin %u of %u; IOAPIC source ID %04x%s\n", pin, pins, d->ioapic_sid,
	       d->ioapic_scope ? "" : " (no device scope: not verified)");
	if (pin >= pins) {
		report(0, "interrupt remapping: the edu's interrupt line names an IOAPIC pin");
		return;
	}
	irte(3, VEC_INTX, d->ioapic_scope, d->ioapic_sid);
	qi_submit(&inv_iec_global, 1);
	cfg_write16(devfn, PCI_COMMAND, cfg_read16(devfn, PCI_COMMAND) & ~PCI_CMD_INTX_OFF);
	ioapic_write(ioapic, 0x11 + 2 * pin, 1u << 16 | 3u << 17); /* format (bit 48), index 3 (bits 63:49) */
	ioapic_write(ioapic, 0x10 + 2 * pin, VEC_INTX); /* edge, unmasked; the vector as the IRTE's */
	int got = raise_and_wait(&intx_count, 1000);
	ioapic_write(ioapic, 0x10 + 2 * pin, 1u << 16);
	report(got && intx_count == 1 && !other_count,
	       "interrupt remapping: the edu's INTx through an IOAPIC entry in remappable format delivers its IRTE's vector");
}

/* --- the run ------------------------------------------------------------------------------------ */

void kmain(uint32_t magic, uint32_t mbinfo)
{
	(void)magic;
	(void)mbinfo;
	printf("vmikit iommu guest\n");
	if (vmi_deprivileged()) {
		printf("IOMMU-SETUP failed: this guest drives the devices and the interrupt flag itself; run it with "
		       "--rom none or --privilege ring0\n");
		exit(2);
	}
	if (!acpi_pm_timer(&pm_port, &pm_bits))
		printf("INFO: no ACPI PM timer: waits are bounded by iteration counts\n");
	pm_now();

	edu_devfn = pci_find(0x1234, 0x11E8);
	if (edu_devfn < 0) {
		printf("SKIP: no edu device (1234:11e8) on PCI bus 0\n");
		exit(report_summary());
	}
	unsigned devfn = (unsigned)edu_devfn;
	edu = cfg_read32(devfn, 0x10) & ~0xFull;
	printf("INFO: edu at 00:%02x.%u, BAR0 0x%lx\n", devfn >> 3, devfn & 7, (unsigned long)edu);
	report(edu && edu < 0x100000000ull && !(cfg_read32(devfn, 0x10) & 1),
	       "edu: found on PCI bus 0 with a 32-bit memory BAR");
	cfg_write16(devfn, PCI_COMMAND, cfg_read16(devfn, PCI_COMMAND) | PCI_CMD_MEMORY | PCI_CMD_MASTER | PCI_CMD_INTX_OFF);

	/* Whatever the firmware left set up must not reach us: the 8259s remapped and masked, every
	 * IOAPIC pin masked; the local APIC software-enabled. */
	outb(0x11, 0x20); outb(VEC_PIC, 0x21); outb(0x04, 0x21); outb(0x01, 0x21); outb(0xFF, 0x21);
	outb(0x11, 0xA0); outb(VEC_PIC + 8, 0xA1); outb(0x02, 0xA1); outb(0x01, 0xA1); outb(0xFF, 0xA1);
	set_trap_hook(VEC_PIC + 7, on_pic);
	set_trap_hook(VEC_PIC + 15, on_pic);
	struct madt_info mi;
	uint64_t ioapic = acpi_read_madt(&mi) && mi.ioapic_base ? mi.ioapic_base : IOAPIC_BASE;
	unsigned pins = ((ioapic_read(ioapic, 1) >> 16) & 0xFF) + 1;
	for (unsigned p = 0; p < pins && p < 120; p++)
		ioapic_write(ioapic, 0x10 + 2 * p, 1u << 16);
	wrmsr(MSR_APIC_BASE, rdmsr(MSR_APIC_BASE) | APIC_BASE_EN);
	lapic_write(LAPIC_SVR, SVR_ENABLE | APIC_SPURIOUS);

	check_edu();
	check_dma_untranslated();

	struct dmar_info d;
	if (!acpi_read_dmar(&d)) {
		printf("SKIP: no ACPI DMAR: no IOMMU to check\n");
		exit(report_summary());
	}
	report(d.host_width >= 39 && (d.flags & 1), "DMAR: a remapping unit, host address width of 39 bits or more, INTR_REMAP");
	if (!setup_unit(&d) || !setup_queue()) {
		report(0, "VT-d: the unit can be driven further (tables, queue)");
		exit(report_summary());
	}
	check_dma_remapping();
	check_interrupt_remapping(&d, ioapic);
	clear_faults();
	exit(report_summary());
}
