/* queue.c: the ROM's queue of `queue`-annotated calls (built only when the ROM honours
 * annotations). The buffer is private to the VMI layer and lives in the ROM data area at
 * 0xD0000 (zero RAM, identity mapped, so a buffer's address is its guest-physical address).
 * One CPU: a single buffer in .bss. Several (ROM_SMP): one per CPU, in the CPU's own area
 * (layout.PERCPU_*), reached through the GS base the hypervisor set for that vCPU, so that the
 * same code at the same address serves every CPU and a flush drains only the caller's buffer.
 */
#include "rom_layout.h"
#include "vmi_spec.h"

typedef unsigned long long u64;

#if ROM_SMP
#define PCPU(type, off)	(*(volatile __seg_gs type *)(unsigned long)(off))
#define QREADY		(PCPU(unsigned int, PCPU_MAGIC) == PCPU_MAGIC_VALUE)
#define QCOUNT		PCPU(unsigned int, PCPU_COUNT)
#define QMAX		PCPU_QUEUE_ENTRIES
#define QENTRY(i)	((volatile __seg_gs struct vmi_batch_entry *)(unsigned long)(PCPU_QUEUE + (i) * sizeof(struct vmi_batch_entry)))
#define QADDR		(PCPU(u64, PCPU_SELF) + PCPU_QUEUE)
_Static_assert(PCPU_QUEUE + PCPU_QUEUE_ENTRIES * sizeof(struct vmi_batch_entry) <= PCPU_SHARED,
	       "the queue fits below the shared page");
_Static_assert(PCPU_QUEUE_ENTRIES <= VMI_BATCH_MAX_ENTRIES, "a full buffer is one valid batch");
#else
struct vmi_batch_entry vmi_queue[VMI_BATCH_MAX_ENTRIES] __attribute__((aligned(64)));
unsigned int vmi_queue_count;
#define QREADY		1
#define QCOUNT		vmi_queue_count
#define QMAX		VMI_BATCH_MAX_ENTRIES
#define QENTRY(i)	(&vmi_queue[i])
#define QADDR		((u64)(unsigned long)vmi_queue)
#endif

long vmi_flush_pending(u64 *res);
long vmi_enqueue(u64 a0, u64 a1, u64 a2, u64 *res, unsigned int call_id);
long vmi_flush_queue(u64 batch, u64 count, u64 a2, u64 *res);

static long hypercall(unsigned int id, u64 a0, u64 a1, u64 a2, u64 out[4])
{
	register u64 r8 __asm__("r8");
	register u64 r9 __asm__("r9");
	register u64 r10 __asm__("r10");
	register u64 r11 __asm__("r11");
	long status;

	/* "memory": the hypervisor reads the buffer we just wrote. */
	__asm__ volatile("outl %%eax, %[port]"
			 : "=a"(status), "=r"(r8), "=r"(r9), "=r"(r10), "=r"(r11)
			 : "a"(id), "D"(a0), "S"(a1), "d"(a2), [port] "i"(PORT_HYPERCALL)
			 : "memory");
	out[0] = r8;
	out[1] = r9;
	out[2] = r10;
	out[3] = r11;
	return status;
}

static void put(u64 *res, const u64 r[4])
{
	if (res) {
		res[0] = r[0];
		res[1] = r[1];
		res[2] = r[2];
		res[3] = r[3];
	}
}

/* One MMU.FlushQueue exit for the whole buffer. The count is reset whatever the
 * outcome: the hypervisor applies all of a batch or (BATCH_INVALID) none of it. */
static long flush_buffer(u64 out[4])
{
	u64 n = QCOUNT;

	QCOUNT = 0;
	return hypercall(VMI_CALL_MMU_FLUSHQUEUE, QADDR, n, 0, out);
}

/* Called by vmi_hcall before any other hypercall while the buffer is not empty.
 * On failure res gets FlushQueue's results (index, cause) and the call is not made. */
long vmi_flush_pending(u64 *res)
{
	u64 r[4];
	long status = flush_buffer(r);

	if (status)
		put(res, r);
	return status;
}

/* SetPTE|queue, SetLongPTE|queue: append, no exit; flush when the buffer becomes full. */
long vmi_enqueue(u64 a0, u64 a1, u64 a2, u64 *res, unsigned int call_id)
{
	static const u64 none[4];
	u64 r[4];
	long status;

	if (!QREADY) {	/* no per-CPU area (yet): the call is made now, which is always correct */
		status = hypercall(call_id, a0, a1, a2, r);
		put(res, r);
		return status;
	}
	unsigned int n = QCOUNT;
	__typeof__(QENTRY(0)) e = QENTRY(n);

	e->call_id = call_id;
	e->reserved = 0;
	e->args[0] = a0;
	e->args[1] = a1;
	e->args[2] = a2;
	QCOUNT = n + 1;
	if (n + 1 < QMAX) {
		put(res, none);
		return VMI_ERR_OK;
	}
	status = flush_buffer(r);
	put(res, status ? r : none);
	return status;
}

/* MMU.FlushQueue through the ROM. count == 0 (e.g. the guest's (0, 0)) means "flush the
 * ROM's own buffer": results as the hypervisor gives them (slot 1 = entries flushed),
 * and no exit at all when the buffer is empty. A guest's own non-empty batch is passed
 * through like any hypercall: the ROM's buffer is completed first. */
long vmi_flush_queue(u64 batch, u64 count, u64 a2, u64 *res)
{
	u64 r[4] = { 0, 0, 0, 0 };
	long status = VMI_ERR_OK;

	if (count == 0) {
		if (QREADY && QCOUNT)
			status = flush_buffer(r);
		put(res, r);
		return status;
	}
	if (QREADY && QCOUNT) {
		status = vmi_flush_pending(res);
		if (status)
			return status;
	}
	status = hypercall(VMI_CALL_MMU_FLUSHQUEUE, batch, count, a2, r);
	put(res, r);
	return status;
}
