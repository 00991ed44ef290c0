/* kvm-unit-tests style reporting: PASS/FAIL lines, a summary, an exit port. */
#include "lib.h"

static unsigned passes, failures;

void report(int ok, const char *fmt, ...)
{
	va_list ap;

	console_write(ok ? "PASS: " : "FAIL: ");
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	console_putc('\n');
	if (ok)
		passes++;
	else
		failures++;
}

int report_summary(void)
{
	/* Deliberately not "N passed, M failed": a CI log parser owns that form. */
	printf("DONE pass=%u fail=%u\n", passes, failures);
	return failures ? EXIT_FAILED_TESTS : EXIT_OK;
}

void exit(int code)
{
	outl((uint32_t)code, PORT_EXIT);
	/* Nobody listening on the exit port (e.g. bare hardware): stop here. */
	for (;;) {
		cli();
		hlt();
	}
}
