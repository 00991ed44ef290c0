/* triplefault: with an empty IDT, #UD cannot be delivered -> #DF -> triple fault. */
#include "lib.h"

void kmain(uint32_t magic, uint32_t mbinfo)
{
	(void)magic;
	(void)mbinfo;
	printf("vmikit triplefault guest: loading an empty IDT, then ud2\n");

	struct descriptor_ptr empty = { .limit = 0, .base = 0 };
	lidt(&empty);
	__asm__ __volatile__("ud2");
	/* Unreachable: the CPU shuts down (KVM_EXIT_SHUTDOWN, QEMU -no-reboot exits). */
	exit(EXIT_OK);
}
