/*
 * idflood: a hostile guest that sends many distinct call IDs the hypervisor does not know
 * (`ids=N`, default 100000), half with the reserved byte set, so that its per-call accounting
 * is tested for bounded memory. Every call must be refused; prints one RESULT line and a PASS.
 */
#include "lib.h"
#include "vmi.h"

void kmain(uint32_t magic, uint32_t mbinfo)
{
	(void)magic, (void)mbinfo;
	uint64_t n = cmdline_u64("ids", 100000), res[4];
	uint64_t unknown = 0, reserved = 0, other = 0;

	for (uint64_t i = 0; i < n && i < (1u << 22); i++) {
		/* Families 0x80..0x9f are unassigned. Even i: reserved byte 0 (families 0x80..); odd i:
		 * reserved byte 1..255 (families 0x90..). Both maps are one-to-one, so IDs never repeat. */
		uint32_t j = (uint32_t)(i >> 1), id;
		if (!(i & 1))
			id = 0x80000000u | (j >> 8) << 16 | (j & 0xffu);
		else
			id = 0x90000000u | (j / 255u) << 16 | (j % 255u + 1u) << 8 | (j & 0xffu);
		long status = vmi_raw_call(id, i, i, i, res);
		if (status == VMI_ERR_NOT_SUPPORTED)
			unknown++;
		else if (status == VMI_ERR_RESERVED_BITS)
			reserved++;
		else
			other++;
	}
	printf("RESULT ids=%lu not_supported=%lu reserved_bits=%lu other=%lu\n", (unsigned long)n,
	       (unsigned long)unknown, (unsigned long)reserved, (unsigned long)other);
	printf("%s idflood: every unknown ID refused\n", other ? "FAIL" : "PASS");
	vmi_shutdown(other ? 1 : 0);
	exit(other ? 1 : 0);
}
