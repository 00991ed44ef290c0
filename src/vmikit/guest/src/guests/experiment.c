/*
 * experiment: call experimental call 0xFF07 (registered from Python) if the
 * hypervisor has it (`repeat=N` times, default once).  Prints one RESULT line (of the last call)
 * and exits 0.
 */
#include "lib.h"
#include "vmi.h"

#define EXPERIMENT_CALL VMI_CALLID(VMI_FAMILY_EXPERIMENTAL, 0x07, 0)

void kmain(uint32_t magic, uint32_t mbinfo)
{
	(void)magic, (void)mbinfo;
	uint64_t info = 0, res[4] = { 0 };

	if (vmi_query_call(EXPERIMENT_CALL, &info) == VMI_ERR_OK && (info & VMI_QUERY_SUPPORTED)) {
		long status = 0;
		for (uint64_t n = cmdline_u64("repeat", 1), i = 0; i < n; i++)
			status = vmi_raw_call(EXPERIMENT_CALL, 6, 7, 1, res);
		printf("RESULT status=%ld r0=0x%lx r1=0x%lx\n", status, (unsigned long)res[0], (unsigned long)res[1]);
	} else {
		printf("RESULT unsupported\n");
	}
	vmi_shutdown(0);
	exit(0);
}
