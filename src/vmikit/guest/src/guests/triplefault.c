/* triplefault: with an empty IDT, #UD cannot be delivered -> #DF -> triple fault. */
#include "lib.h"
#include "vmi.h"

void kmain(uint32_t magic, uint32_t mbinfo)
{
	(void)magic;
	(void)mbinfo;
	printf("vmikit triplefault guest: loading an empty IDT, then ud2\n");

	/* Through the VMI layer: natively lidt; a deprivileged kernel's IDT is the hypervisor's record,
	 * which then has no gate to deliver the #UD through (the same shutdown, reported by it). */
	vmi_set_idt(0, 0);
	__asm__ __volatile__("ud2");
	/* Unreachable: the CPU shuts down (KVM_EXIT_SHUTDOWN, QEMU -no-reboot exits). */
	exit(EXIT_OK);
}
