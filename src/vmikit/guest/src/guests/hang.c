/* hang: prints one line, then spins forever with interrupts off (watchdog test); with `print`
 * on its command line it prints lines forever instead (a console flood). */
#include "lib.h"
#include "vmi.h"

void kmain(uint32_t magic, uint32_t mbinfo)
{
	(void)magic;
	(void)mbinfo;
	printf("vmikit hang guest: spinning forever\n");
	vmi_disable_interrupts(); /* cli natively; the virtual flag when deprivileged */
	for (unsigned long n = 0; cmdline_has("print"); n++)
		printf("flood line %lu: the quick brown fox jumps over the lazy dog\n", n);
	for (;;)
		barrier(); /* keeps the empty loop from being treated as UB and removed */
}
