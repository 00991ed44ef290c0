/* Early initialisation, called by boot.S in long mode before kmain. */
#include "lib.h"
#include "vmi.h"

void runtime_init(uint32_t magic, uint32_t mbinfo);

uint32_t boot_magic;
const struct multiboot_info *boot_info;

void runtime_init(uint32_t magic, uint32_t mbinfo)
{
	boot_magic = magic;
	/* Without the magic EBX means nothing; do not dereference it. */
	boot_info = magic == MULTIBOOT_BOOTLOADER_MAGIC
			    ? (const struct multiboot_info *)(uintptr_t)mbinfo
			    : NULL;
	idt_load();
	vmi_init(); /* find the hypervisor's ROM, if any, before guest code makes VMI calls */
	idt_fill(); /* until here a fault has no gate: as on a CPU, it ends the run (triple fault) */
	alloc_init(boot_info);
}
