/* divzero: an integer divide by zero; the runtime's IDT reports #DE and exits 3. */
#include "lib.h"

void kmain(uint32_t magic, uint32_t mbinfo)
{
	(void)magic;
	(void)mbinfo;
	printf("vmikit divzero guest: dividing by zero\n");

	/* volatile, so the compiler can neither fold nor drop the division. */
	volatile unsigned divisor = 0;
	volatile unsigned quotient = 1000u / divisor;
	(void)quotient;

	report(0, "divide by zero did not fault");
	exit(report_summary());
}
