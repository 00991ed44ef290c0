/*
 * robust_rom: plain stores into the ROM image (refused: a read-only slot) and
 * accesses to guest-physical addresses nothing decodes.  The host reports them
 * as rom_writes_refused and mmio_unmapped.  Prints one RESULT line, exits 0.
 */
#include "lib.h"
#include "vmi.h"

#define ROM_IMAGE 0xC0000ul
#define NOWHERE   0xFEB00000ul /* identity-mapped, not RAM, no device */
#define ROM_STORES 10
#define MMIO_READS 5
#define MMIO_WRITES 5

void kmain(uint32_t magic, uint32_t mbinfo)
{
	(void)magic, (void)mbinfo;
	volatile uint8_t *rom = (volatile uint8_t *)ROM_IMAGE;
	volatile uint32_t *nowhere = (volatile uint32_t *)NOWHERE;
	int unchanged = 1, floating = 1;

	for (int i = 0; i < ROM_STORES; i++) {
		uint8_t old = rom[i * 512];
		rom[i * 512] = (uint8_t)~old;
		unchanged &= rom[i * 512] == old;
	}
	for (int i = 0; i < MMIO_READS; i++)
		floating &= nowhere[i] == 0xFFFFFFFFu;
	for (int i = 0; i < MMIO_WRITES; i++)
		nowhere[i] = 0x12345678u;
	uint32_t version = 0;
	long s = vmi_get_version(&version);
	printf("RESULT rom=%s mmio=%s rom-still-works=%s\n", unchanged ? "unchanged" : "CHANGED",
	       floating ? "all-ones" : "OTHER", s == 0 && version == VMI_VERSION ? "yes" : "no");
	vmi_shutdown(0);
	exit(0);
}
