/* hang: prints one line, then spins forever with interrupts off (watchdog test). */
#include "lib.h"
#include "vmi.h"

void kmain(uint32_t magic, uint32_t mbinfo)
{
	(void)magic;
	(void)mbinfo;
	printf("vmikit hang guest: spinning forever\n");
	vmi_disable_interrupts(); /* cli natively; the virtual flag when deprivileged */
	for (;;)
		barrier(); /* keeps the empty loop from being treated as UB and removed */
}
