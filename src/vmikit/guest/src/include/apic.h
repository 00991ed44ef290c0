/*
 * Local APIC and IOAPIC register access (xAPIC, memory-mapped), and the ACPI tables a native
 * kernel reads to find them (runtime/acpi.c): the RSDP, RSDT/XSDT, the MADT and the FADT's
 * PM timer. Facts from the Intel SDM (vol. 3, ch. 10/11 "APIC") and the ACPI specification
 * (5.2 "ACPI System Description Tables", 5.2.12 "MADT").
 *
 * The registers are reached through boot.S's identity map of the first 4 GiB; that only works
 * at ring 0 (a deprivileged kernel's accesses go to the hypervisor, docs/execution-model.md).
 */
#ifndef VMIKIT_APIC_H
#define VMIKIT_APIC_H

#include <stddef.h>
#include <stdint.h>

#define LAPIC_BASE      0xFEE00000ull /* the architectural reset value of IA32_APIC_BASE */
#define IOAPIC_BASE     0xFEC00000ull
#define MSR_APIC_BASE   0x1B
#define APIC_BASE_EN    (1u << 11)    /* IA32_APIC_BASE: the xAPIC globally enabled */

#define LAPIC_ID        0x020
#define LAPIC_VERSION   0x030
#define LAPIC_TPR       0x080
#define LAPIC_EOI       0x0B0
#define LAPIC_SVR       0x0F0
#define LAPIC_ESR       0x280
#define LAPIC_ICR_LOW   0x300
#define LAPIC_ICR_HIGH  0x310
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_LVT0      0x350
#define LAPIC_TIMER_ICR 0x380
#define LAPIC_TIMER_CCR 0x390
#define LAPIC_TIMER_DCR 0x3E0

#define LVT_MASKED      (1u << 16)
#define LVT_PERIODIC    (1u << 17)
#define LVT_EXTINT      (7u << 8)
#define SVR_ENABLE      (1u << 8)     /* APIC software enable */
#define APIC_SPURIOUS   0xFF          /* spurious vector; its low 4 bits must be 1 on P6 */

/* ICR low dword (SDM 10.6.1). */
#define ICR_FIXED       (0u << 8)
#define ICR_INIT        (5u << 8)
#define ICR_STARTUP     (6u << 8)
#define ICR_BUSY        (1u << 12)    /* delivery status: send pending */
#define ICR_ASSERT      (1u << 14)
#define ICR_LEVEL       (1u << 15)

static inline volatile uint32_t *lapic(unsigned reg) { return (volatile uint32_t *)(uintptr_t)(LAPIC_BASE + reg); }
static inline uint32_t lapic_read(unsigned reg) { return *lapic(reg); }
static inline void lapic_write(unsigned reg, uint32_t value) { *lapic(reg) = value; }
static inline unsigned lapic_id(void) { return lapic_read(LAPIC_ID) >> 24; }
static inline void lapic_eoi(void) { lapic_write(LAPIC_EOI, 0); }

/* The IOAPIC's indirect registers: select through IOREGSEL (+0), then IOWIN (+0x10). */
static inline void ioapic_write(uint64_t base, unsigned reg, uint32_t value)
{
	*(volatile uint32_t *)(uintptr_t)base = reg;
	*(volatile uint32_t *)(uintptr_t)(base + 0x10) = value;
}

static inline uint32_t ioapic_read(uint64_t base, unsigned reg)
{
	*(volatile uint32_t *)(uintptr_t)base = reg;
	return *(volatile uint32_t *)(uintptr_t)(base + 0x10);
}

/* --- ACPI (runtime/acpi.c) ----------------------------------------------------------------- */

struct acpi_sdt {
	char sig[4];
	uint32_t length;
	uint8_t revision, checksum;
	char oem[6], oem_table[8];
	uint32_t oem_rev, creator, creator_rev;
} __attribute__((packed));

struct acpi_rsdp {
	char sig[8];
	uint8_t checksum;
	char oem[6];
	uint8_t revision;
	uint32_t rsdt;
	uint32_t length;
	uint64_t xsdt;
	uint8_t ext_checksum, reserved[3];
} __attribute__((packed));

#define MADT_MAX_CPUS 64 /* APIC IDs kept; the count goes on past it */

/* What the MADT says, as a kernel needs it. */
struct madt_info {
	uint32_t lapic_addr;             /* the MADT's local APIC address */
	unsigned cpus;                   /* enabled processor local APIC entries (type 0, flags bit 0) */
	uint8_t apic_ids[MADT_MAX_CPUS]; /* their APIC IDs, in MADT order (the first MADT_MAX_CPUS) */
	unsigned ioapics;                /* IOAPIC entries (type 1) */
	uint64_t ioapic_base;            /* the address of the IOAPIC whose GSI base is 0, or 0 */
	unsigned isa_irq0_gsi;           /* GSI of ISA IRQ 0 (an interrupt source override, else 0) */
};

uint8_t acpi_checksum(const void *p, size_t n);      /* byte sum: 0 for a valid table */
const struct acpi_rsdp *acpi_find_rsdp(void);        /* "RSD PTR " on a 16-byte boundary in
							 0xE0000-0xFFFFF, checksum valid; NULL */
/* The first table with signature `sig` listed by the RSDT (use_xsdt 0) or XSDT (1); NULL. */
const struct acpi_sdt *acpi_find_table(const struct acpi_rsdp *rsdp, const char *sig, int use_xsdt);
void acpi_parse_madt(const struct acpi_sdt *madt, struct madt_info *out);
/* The firmware's MADT (through the XSDT where the RSDP has one, else the RSDT), checksums
 * checked: 1 and *out filled, or 0. */
int acpi_read_madt(struct madt_info *out);
/* The FADT's PM timer: its port and width (24 or 32 bits); 0 when there is none. */
int acpi_pm_timer(unsigned *port, unsigned *bits);

/* What the DMAR ("DMA Remapping", Intel VT-d spec ch. 8) says, as an IOMMU driver needs it. */
struct dmar_info {
	unsigned host_width;  /* host address width in bits (the table's value + 1) */
	uint8_t flags;        /* bit 0: INTR_REMAP */
	unsigned units;       /* DRHD structures (type 0) */
	uint64_t base;        /* register base of the DRHD for segment 0 with INCLUDE_PCI_ALL, else the first */
	int ioapic_scope;     /* that DRHD lists an IOAPIC device scope (type 3) */
	uint8_t ioapic_id;    /* its enumeration ID (the IOAPIC's ID) */
	uint16_t ioapic_sid;  /* its source ID: start bus << 8 | device << 3 | function */
};
/* The firmware's DMAR, checksum checked: 1 and *out filled, or 0 (no table, or no DRHD). */
int acpi_read_dmar(struct dmar_info *out);

#endif
