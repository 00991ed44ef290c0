/*
 * ACPI tables as a native kernel finds them (ACPI specification 5.2): the RSDP on a 16-byte
 * boundary in the BIOS area 0xE0000-0xFFFFF, the RSDT (32-bit entries) or XSDT (64-bit), and in
 * them the MADT ("APIC": local APICs, IOAPICs, interrupt source overrides), the FADT ("FACP":
 * the PM timer) and the DMAR (an Intel IOMMU's remapping units, VT-d specification 8.1-8.3). Tables are read through boot.S's identity map, so only tables below 4 GiB are
 * followed (both QEMU and the vmikit board put them below 1 MiB).
 */
#include "apic.h"
#include "lib.h"

#define MEM_4G 0x100000000ull

uint8_t acpi_checksum(const void *p, size_t n)
{
	uint8_t s = 0;
	for (size_t i = 0; i < n; i++)
		s += ((const uint8_t *)p)[i];
	return s;
}

const struct acpi_rsdp *acpi_find_rsdp(void)
{
	for (uintptr_t a = 0xE0000; a < 0x100000; a += 16)
		if (!memcmp((const void *)a, "RSD PTR ", 8) && !acpi_checksum((const void *)a, 20))
			return (const struct acpi_rsdp *)a;
	return NULL;
}

const struct acpi_sdt *acpi_find_table(const struct acpi_rsdp *rsdp, const char *sig, int use_xsdt)
{
	uint64_t root_addr = use_xsdt ? rsdp->xsdt : rsdp->rsdt;
	if (!root_addr || root_addr >= MEM_4G)
		return NULL;
	const struct acpi_sdt *root = (const struct acpi_sdt *)(uintptr_t)root_addr;
	unsigned width = use_xsdt ? 8 : 4;
	if (root->length < sizeof(*root))
		return NULL;
	unsigned n = (root->length - sizeof(*root)) / width;
	for (unsigned i = 0; i < n; i++) {
		const uint8_t *entry = (const uint8_t *)(root + 1) + i * width;
		uint64_t addr = 0;
		memcpy(&addr, entry, width);
		if (!addr || addr >= MEM_4G)
			continue;
		const struct acpi_sdt *t = (const struct acpi_sdt *)(uintptr_t)addr;
		if (!memcmp(t->sig, sig, 4))
			return t;
	}
	return NULL;
}

void acpi_parse_madt(const struct acpi_sdt *madt, struct madt_info *out)
{
	*out = (struct madt_info){ 0 };
	const uint8_t *p = (const uint8_t *)(madt + 1), *end = (const uint8_t *)madt + madt->length;
	memcpy(&out->lapic_addr, p, 4); /* then 4 bytes of flags, then the entries */
	/* Each entry is [type, length, ...]; a zero length would loop forever, so it ends the walk. */
	for (const uint8_t *e = p + 8; e + 2 <= end && e[1] && e + e[1] <= end; e += e[1]) {
		if (e[0] == 0 && e[1] >= 8 && (e[4] & 1)) { /* processor local APIC, enabled */
			if (out->cpus < MADT_MAX_CPUS)
				out->apic_ids[out->cpus] = e[3];
			out->cpus++;
		} else if (e[0] == 1 && e[1] >= 12) { /* IOAPIC: id, reserved, address, GSI base */
			out->ioapics++;
			uint32_t addr, gsi;
			memcpy(&addr, e + 4, 4);
			memcpy(&gsi, e + 8, 4);
			if (gsi == 0)
				out->ioapic_base = addr;
		} else if (e[0] == 2 && e[1] >= 10 && e[2] == 0 && e[3] == 0) { /* ISA IRQ 0 overridden */
			uint32_t gsi;
			memcpy(&gsi, e + 4, 4);
			out->isa_irq0_gsi = gsi;
		}
	}
}

/* The root table a kernel should use: the XSDT where the RSDP (revision 2+) names one. */
static int use_xsdt(const struct acpi_rsdp *rsdp)
{
	return rsdp->revision >= 2 && rsdp->xsdt && rsdp->xsdt < MEM_4G &&
	       !acpi_checksum(rsdp, rsdp->length);
}

static const struct acpi_sdt *find_valid(const char *sig)
{
	const struct acpi_rsdp *rsdp = acpi_find_rsdp();
	if (!rsdp)
		return NULL;
	const struct acpi_sdt *t = acpi_find_table(rsdp, sig, use_xsdt(rsdp));
	return t && !acpi_checksum(t, t->length) ? t : NULL;
}

int acpi_read_madt(struct madt_info *out)
{
	const struct acpi_sdt *madt = find_valid("APIC");
	if (!madt)
		return 0;
	acpi_parse_madt(madt, out);
	return 1;
}

int acpi_pm_timer(unsigned *port, unsigned *bits)
{
	const struct acpi_sdt *fadt = find_valid("FACP");
	if (!fadt || fadt->length < 116)
		return 0;
	const uint8_t *f = (const uint8_t *)fadt;
	uint32_t pm, flags;
	memcpy(&pm, f + 76, 4);    /* PM_TMR_BLK */
	memcpy(&flags, f + 112, 4); /* bit 8: TMR_VAL_EXT, a 32-bit counter */
	if (!pm)
		return 0;
	*port = pm;
	*bits = flags & (1u << 8) ? 32 : 24;
	return 1;
}

int acpi_read_dmar(struct dmar_info *out)
{
	*out = (struct dmar_info){ 0 };
	const struct acpi_sdt *dmar = find_valid("DMAR");
	if (!dmar || dmar->length < 48)
		return 0;
	const uint8_t *t = (const uint8_t *)dmar, *end = t + dmar->length;
	out->host_width = t[36] + 1u;
	out->flags = t[37];
	int chosen = 0; /* a DRHD with INCLUDE_PCI_ALL on segment 0 wins over an earlier one */
	/* Remapping structures from byte 48: [type u16, length u16, ...]; a short length ends the walk. */
	for (const uint8_t *r = t + 48; r + 4 <= end; ) {
		uint16_t type, len;
		memcpy(&type, r, 2);
		memcpy(&len, r + 2, 2);
		if (len < 4 || r + len > end)
			break;
		if (type == 0 && len >= 16) { /* DRHD: flags, size, segment u16, register base u64, scopes */
			uint16_t segment;
			uint64_t base;
			memcpy(&segment, r + 6, 2);
			memcpy(&base, r + 8, 8);
			int all = (r[4] & 1) && segment == 0;
			if (!out->units++ || (all && !chosen)) {
				out->base = base;
				out->ioapic_scope = 0;
				chosen = all;
				/* Device scopes: [type, length, reserved u16, enumeration ID, start bus, path...]. */
				for (const uint8_t *d = r + 16; d + 8 <= r + len && d[1] >= 8 && d + d[1] <= r + len; d += d[1]) {
					if (d[0] == 3 && !out->ioapic_scope) {
						out->ioapic_scope = 1;
						out->ioapic_id = d[4];
						out->ioapic_sid = (uint16_t)(d[5] << 8 | (d[6] & 31) << 3 | (d[7] & 7));
					}
				}
			}
		}
		r += len;
	}
	return out->units > 0;
}
