/*
 * compat: conformance-style checks that hold for a guest built against ANY 1.x header
 * (vmi_spec.h of 1.0, 1.1 or 1.2) under a hypervisor of ANY 1.x version.
 *
 * The guest learns what the hypervisor offers (Query.GetVersion/HasFamily/QueryCall, or on a
 * 1.0 hypervisor without the Query family, the ROM header) and checks that the ROM offers
 * exactly the calls of that version which its own header names, that everything else falls
 * back natively, and that the results are the same either way.  PASS lines depend only on the
 * header the guest was built with, never on the hypervisor: INFO lines say which path ran.
 *
 * Under a hypervisor that deprivileges the kernel (vmi_deprivileged(): ring 3, since 1.3) the
 * native instructions the CPU checks compare against raise #GP (mov CRn, rdmsr) or describe the
 * hypervisor's tables (str, sldt): there each check compares against a witness that can still
 * fail -- paged long mode, tables that map this code, the values the guest set -- on the same line.
 */
#include "lib.h"
#include "paging.h"
#include "vmi.h"

#define RFLAGS_IF (1ul << 9)
#define V(major, minor) ((uint32_t)(major) << 16 | (minor))
#define CALL_REBOOT VMI_CALLID(0x01, 0x10, 0) /* in every ROM since 1.1, implemented by no hypervisor yet */
#ifdef VMI_FAMILY_QUERY
#define KNOWS_QUERY 1
#else
#define KNOWS_QUERY 0 /* a 1.0 guest: it cannot ask */
#endif

static uint32_t hv_version; /* what the hypervisor implements */
static int has_query;       /* the Query family answers (since 1.1) */

static void describe(void)
{
	printf("INFO: built with VMI %u.%u, needs at least %u.%u\n", VMI_VERSION_MAJOR, VMI_VERSION_MINOR,
	       VMI_MIN_VERSION >> 16, VMI_MIN_VERSION & 0xFFFF);
	uint32_t v = 0;
	has_query = vmi_get_version(&v) == VMI_ERR_OK;
	hv_version = vmi_hypervisor_version();
	printf("INFO: hypervisor VMI %u.%u (learnt from %s)\n", hv_version >> 16, hv_version & 0xFFFF,
	       has_query ? "Query.GetVersion" : "the ROM header: no Query family");
}

static void test_rom_and_version(void)
{
	uint32_t seen = vmi_rom_present() ? vmi_rom_version() : vmi_rom_rejected();
	report(seen != 0 && vmi_rom_present() == (seen >= VMI_MIN_VERSION),
	       "the ROM is used exactly when its major matches and its version is at least VMI_MIN_VERSION");
	if (!vmi_rom_present()) {
		printf("INFO: ROM %u.%u rejected: running natively\n", seen >> 16, seen & 0xFFFF);
		return;
	}
	report(hv_version == vmi_rom_version() && has_query == (KNOWS_QUERY && hv_version >= V(1, 1)),
	       "the hypervisor's version is learnt: Query.GetVersion when both know it, else the ROM header");
}

/* Every call this header names is offered by the ROM exactly when the hypervisor's version has it. */
static void test_call_table(void)
{
	unsigned through = 0, native = 0, wrong = 0, disagree = 0;
	int rom = vmi_rom_present();
#define CHECK_CALL(id, since, optional)                                                         \
	do {                                                                                    \
		int offered = vmi_entry(id) != NULL;                                            \
		offered ? through++ : native++;                                                 \
		wrong += offered != (rom && (since) <= hv_version);                             \
		uint64_t info = 0;                                                              \
		/* Query agrees with the ROM for the calls it implements (optional ones may be absent). */ \
		if (has_query && offered && !(optional) && vmi_query_call(id, &info) == VMI_ERR_OK && \
		    !(info & 0x100) && (id) != CALL_REBOOT)                                     \
			disagree++;                                                             \
	} while (0);
	VMI_FOR_EACH_CALL(CHECK_CALL)
#undef CHECK_CALL
	printf("INFO: %u of %u calls through the ROM, %u native\n", through, VMI_CALL_COUNT, native);
	report(wrong == 0, "the ROM offers exactly the calls of the hypervisor's version this header names");
	report(disagree == 0, "Query.QueryCall agrees with the ROM (no Query before 1.1: nothing to ask)");
}

static void test_queue_annotation(void)
{
	int specialised = vmi_entry(VMI_CALL_MMU_SETPTE | VMI__ANN_QUEUE) != vmi_entry(VMI_CALL_MMU_SETPTE);
	uint64_t info = 0;
	int honoured = has_query && vmi_query_call(VMI_CALL_MMU_SETPTE, &info) == VMI_ERR_OK &&
		       (info & VMI__ANN_QUEUE) != 0 && VMI__ANN_QUEUE;
	printf("INFO: queued SetPTE %s\n", specialised ? "deferred into the ROM's batch" : "runs as a plain SetPTE");
	report(specialised == honoured,
	       "a queued SetPTE is batched exactly when both sides know `queue` and the hypervisor honours it");
}

static void test_cpu(void)
{
	int depriv = vmi_deprivileged();
	uint64_t efer = 0;
	if (depriv) {
		/* Paged long mode, on tables that map this very function where it runs. */
		uint64_t cr0 = vmi_get_cr0(), cr3 = vmi_get_cr3();
		report((cr0 & (CR0_PE | CR0_PG)) == (CR0_PE | CR0_PG) &&
			       pt_translates(cr3, (uintptr_t)test_cpu, (uintptr_t)test_cpu),
		       "GetCR0/GetCR3 agree with mov");
		report(vmi_rdmsr(MSR_EFER, &efer) == 0 && (efer & (EFER_LME | EFER_LMA)) == (EFER_LME | EFER_LMA),
		       "RDMSR of EFER agrees with rdmsr");
	} else {
		uint64_t cr0 = read_cr0(), cr3 = read_cr3();
		report(vmi_get_cr0() == cr0 && vmi_get_cr3() == cr3, "GetCR0/GetCR3 agree with mov");
		report(vmi_rdmsr(MSR_EFER, &efer) == 0 && efer == rdmsr(MSR_EFER), "RDMSR of EFER agrees with rdmsr");
	}
	uint64_t old2 = depriv ? vmi_get_cr2() : read_cr2(), v2 = 0x0000123456789000ul;
	long s = vmi_set_cr2(v2); /* since 1.1: native before */
	report(s == 0 && vmi_get_cr2() == v2 && (depriv || read_cr2() == v2), "SetCR2/GetCR2 round-trip (ROM or native)");
	vmi_set_cr2(old2);
	uint64_t back = 0;
	s = vmi_set_dr(0, 0x401000);
	report(s == 0 && vmi_get_dr(0, &back) == 0 && back == 0x401000, "SetDR/GetDR of DR0 round-trip (ROM or native)");
	vmi_set_dr(0, 0);
	uint16_t tr = 0, ldt = 0; /* deprivileged: the runtime never loads either, so both are null */
	if (!depriv)
		__asm__ __volatile__("str %0; sldt %1" : "=r"(tr), "=r"(ldt));
	report(vmi_get_tr() == tr && vmi_get_ldt() == ldt, "GetTR/GetLDT agree with str/sldt (ROM or native)");
	report(!(vmi_get_interrupt_mask() & RFLAGS_IF) && vmi_io_delay() == 0,
	       "GetInterruptMask shows IF clear; IODelay succeeds (ROM or native)");
}

static void test_families(void)
{
	uint64_t present = 7;
	long s = vmi_has_family(0x42, &present);
	report(has_query ? s == 0 && present == 0 : s == VMI_ERR_NOT_SUPPORTED,
	       "Query.HasFamily: an unknown family is absent (NOT_SUPPORTED without the Query family)");
}

#ifdef VMI_FAMILY_EVENTCHANNEL
static void test_event_channel(void)
{
	uint64_t present = 0;
	int hv = vmi_has_family(VMI_FAMILY_EVENTCHANNEL, &present) == VMI_ERR_OK && present;
	printf("INFO: event channel %s\n", vmi_evtchn_native() ? "in the guest (fallback)" : "through the hypervisor");
	report(hv == !vmi_evtchn_native(), "EventChannel goes through the hypervisor exactly when Query.HasFamily says so");

	long s = 0;
	for (uint64_t i = 0; i < 3; i++)
		s |= vmi_evtchn_send(1, 0xE0000 + i);
	uint64_t v[3] = { 0 };
	uint32_t pend[3] = { 9, 9, 9 };
	for (int i = 0; i < 3; i++)
		s |= vmi_evtchn_poll(1, &v[i], &pend[i]);
	report(s == 0 && v[0] == 0xE0000 && v[1] == 0xE0001 && v[2] == 0xE0002 && pend[0] == 2 && pend[1] == 1 &&
		       pend[2] == 0,
	       "EventChannel.Send/Poll: events come back in order with the count still pending");
	uint64_t x;
	uint32_t p;
	report(vmi_evtchn_poll(1, &x, &p) == VMI_ERR_AGAIN && vmi_evtchn_send(VMI_EVTCHN_PORTS, 1) == VMI_ERR_INVALID_ARGUMENT,
	       "EventChannel: Poll of an empty port is AGAIN, a port out of range INVALID_ARGUMENT");
	unsigned sent = 0;
	while (vmi_evtchn_send(2, sent) == VMI_ERR_OK && sent <= VMI_EVTCHN_DEPTH)
		sent++;
	unsigned drained = 0;
	while (vmi_evtchn_poll(2, &x, &p) == VMI_ERR_OK)
		drained += x == drained;
	report(sent == VMI_EVTCHN_DEPTH && drained == VMI_EVTCHN_DEPTH,
	       "EventChannel: a port holds VMI_EVTCHN_DEPTH events, then Send is AGAIN");
}
#endif

#ifdef VMI_FAMILY_TIME
static volatile unsigned upcalled;
static void on_events(uint64_t ports) { upcalled += (ports >> 3) & 1; }

/* 1.4: Time through the hypervisor exactly when it says so, else the TSC and NOT_SUPPORTED;
 * upcalls where the hypervisor makes them, else nothing changes for the guest. */
static void test_time_and_events(void)
{
	uint64_t present = 0;
	int hv = vmi_has_family(VMI_FAMILY_TIME, &present) == VMI_ERR_OK && present;
	printf("INFO: time %s\n", vmi_time_present() ? "through the hypervisor" : "the native TSC (fallback)");
	report(hv == vmi_time_present(), "Time goes through the hypervisor exactly when Query.HasFamily says so");
	uint64_t a = vmi_cycle_counter(), b = vmi_cycle_counter(), hz = 0, fired = 1;
	long s = vmi_cycle_frequency(&hz);
	report(b >= a && (hv ? s == 0 && hz > 0 : s == VMI_ERR_NOT_SUPPORTED),
	       "the cycle counter runs forward; its frequency is known, or NOT_SUPPORTED without Time");
	long set = vmi_set_alarm(0, vmi_cycle_counter() + (hv ? hz : 1), 0);
	long cancel = vmi_cancel_alarm(0, &fired);
	report(hv ? set == 0 && cancel == 0 && fired == 0 : set == VMI_ERR_NOT_SUPPORTED && cancel == VMI_ERR_NOT_SUPPORTED,
	       "an alarm is set and cancelled before it fires (NOT_SUPPORTED without Time)");
	long bad = vmi_set_alarm(VMI_TIME_ALARMS, 0, 0);
	report(bad == (hv ? VMI_ERR_INVALID_ARGUMENT : VMI_ERR_NOT_SUPPORTED), "an alarm number out of range is refused");

	int events = vmi_events_present();
	printf("INFO: upcalls %s\n", events ? "from the hypervisor" : "none (polling only)");
	long h = vmi_evtchn_set_handler(on_events);
	if (events)
		vmi_enable_interrupts(); /* vif = 1: the upcall may come (only then: nothing else is armed) */
	long snd = vmi_evtchn_send(3, 0x14);
	if (events)
		vmi_disable_interrupts();
	uint64_t v = 0;
	uint32_t left = 9;
	long poll = vmi_evtchn_poll(3, &v, &left);
	vmi_evtchn_set_handler(NULL);
	report(events ? h == 0 && upcalled == 1 : h == VMI_ERR_NOT_SUPPORTED && upcalled == 0,
	       "a Send is delivered by upcall exactly where the hypervisor makes upcalls");
	report(snd == 0 && poll == 0 && v == 0x14 && left == 0, "the 1.2 Send/Poll pair works beside upcalls");
}
#endif

void kmain(uint32_t magic, uint32_t mbinfo)
{
	(void)magic, (void)mbinfo;
	printf("vmikit compat guest\n");
	describe();
	test_rom_and_version();
	test_call_table();
	test_queue_annotation();
	test_cpu();
	test_families();
#ifdef VMI_FAMILY_EVENTCHANNEL
	test_event_channel();
#endif
#ifdef VMI_FAMILY_TIME
	test_time_and_events();
#endif
	report(vmi_getter_failures == 0, "no VMI getter failed");
	int code = report_summary();
	vmi_shutdown((uint32_t)code);
	exit(code);
}
