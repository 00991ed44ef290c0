/* hcall.S: the ROM's shared code, included by the generated entries.S so that
 * the stubs' `jmp`s to these tails stay short (2 bytes) and the image compact.
 *
 * Entry convention (docs/rom-abi.md): long entry(u64 a0, u64 a1, u64 a2, u64 *res)
 * -> a0..a2 in rdi/rsi/rdx (already where the hypercall wants them), res in rcx.
 * Every hypercall stub is `mov $CALL_ID, %eax; jmp <tail>`.
 * The hypervisor preserves every register but rax and r8..r11.
 */

#if ROM_SMP
/* Several vCPUs: this CPU's queue and shared page are in its own area, which the GS base points
 * at once the hypervisor has set it up (CPU.Deprivilege, AP start; docs/smp.md). Until then (or
 * if the kernel reloaded GS) the magic does not match and every call is made at once. */
#define PCPU_READY	cmpl $PCPU_MAGIC_VALUE, %gs:PCPU_MAGIC
#define SHARED(off)	%gs:PCPU_SHARED + off
#else
#define SHARED(off)	SHARED_PAGE + off
#endif

/* vmi_hcall: eax = call ID. Makes the hypercall, stores r8..r11 to res, returns rax. */
	.globl vmi_hcall
vmi_hcall:
#if ROM_HONOURS_ANNOTATIONS
	/* Queued state must be complete before any other hypercall could observe it. */
#if ROM_SMP
	PCPU_READY
	jne	.Lout
	cmpl	$0, %gs:PCPU_COUNT
#else
	cmpl	$0, vmi_queue_count
#endif
	jne	.Lpreflush
#endif
.Lout:
	outl	%eax, $PORT_HYPERCALL
	.globl vmi_store
vmi_store:			/* rcx = res (or NULL); r8..r11 = results; rax = status */
	testq	%rcx, %rcx
	jz	1f
	movq	%r8, (%rcx)
	movq	%r9, 8(%rcx)
	movq	%r10, 16(%rcx)
	movq	%r11, 24(%rcx)
1:	ret

/* vmi_ret1: a native call's return: r8 = its single result (or 0), status 0. */
vmi_ret1:
	xorl	%r9d, %r9d
	xorl	%r10d, %r10d
	xorl	%r11d, %r11d
	xorl	%eax, %eax
	jmp	vmi_store

#if ROM_HONOURS_ANNOTATIONS
.Lpreflush:
	/* Entered with rsp = 8 mod 16 (just after a call); five pushes realign it for C. */
	pushq	%rax
	pushq	%rdi
	pushq	%rsi
	pushq	%rdx
	pushq	%rcx
	movq	%rcx, %rdi
	call	vmi_flush_pending	/* long vmi_flush_pending(u64 *res): fills res on failure */
	popq	%rcx
	popq	%rdx
	popq	%rsi
	popq	%rdi
	testq	%rax, %rax
	jnz	1f
	popq	%rax		/* the pre-flush succeeded: make the original call */
	jmp	.Lout
1:	addq	$8, %rsp	/* it failed: return BATCH_INVALID instead of making the call */
	ret
#endif

/* Raw call: long raw(u32 call_id, u64 a0, u64 a1, u64 a2, u64 *res). */
	.globl vmi_raw_call
vmi_raw_call:
	movl	%edi, %eax
	movq	%rsi, %rdi
	movq	%rdx, %rsi
	movq	%rcx, %rdx
	movq	%r8, %rcx
	jmp	vmi_hcall

#if !ROM_DEPRIVILEGED
/* MMU.FlushTLB: the hypervisor validates (and completes the queue first); the TLB
 * itself belongs to the hardware walking the guest's tables, so the ROM flushes it
 * after a successful exit: FLUSH_GLOBAL toggles CR4.PGE, FLUSH_TLB reloads CR3. */
vmi_hcall_flushtlb:
	pushq	%rdi		/* keeps flags; also keeps vmi_hcall's stack alignment */
	call	vmi_hcall
	popq	%rdi
	testq	%rax, %rax
	jnz	2f
	testb	$FLUSH_GLOBAL, %dil
	jz	1f
	movq	%cr4, %rdx
	testb	$CR4_PGE, %dl
	jz	1f
	movq	%rdx, %rsi
	xorb	$CR4_PGE, %sil
	movq	%rsi, %cr4	/* clearing PGE flushes global entries too */
	movq	%rdx, %cr4
	ret
1:	testb	$(FLUSH_TLB | FLUSH_GLOBAL), %dil
	jz	2f
	movq	%cr3, %rdx
	movq	%rdx, %cr3
2:	ret

/* MMU.InvalPage: hypercall, then invlpg natively on success (as FlushTLB). */
vmi_hcall_invlpg:
	pushq	%rdi
	call	vmi_hcall
	popq	%rdi
	testq	%rax, %rax
	jnz	1f
	invlpg	(%rdi)
1:	ret
#endif /* a deprivileged kernel's hypervisor completes TLB flushes itself */

#if ROM_DEPRIVILEGED
/* A ring-3 kernel: the interrupt flag is the shared page's vif and CR2 its cr2 (written by the
 * hypervisor before it delivers a #PF). None of these exits, but unmasking with an event
 * pending, which hands the event over with one CPU.EnableInterrupts hypercall. A kernel that
 * has not (or not yet) called CPU.Deprivilege is at ring 0 with the real flag and CR2: for it
 * each of these is the plain hypercall (still no privileged instruction in this image). */
#if ROM_SMP
#define IF_NOT_DEPRIVILEGED(id) \
	PCPU_READY; \
	jne	8f; \
	cmpl	$3, SHARED(ROM_SHARED_PRIVILEGE); \
	je	9f; \
8:	movl	$(id), %eax; \
	jmp	vmi_hcall; \
9:
#else
#define IF_NOT_DEPRIVILEGED(id) \
	cmpl	$3, SHARED(ROM_SHARED_PRIVILEGE); \
	je	9f; \
	movl	$(id), %eax; \
	jmp	vmi_hcall; \
9:
#endif

vmi_shared_sti:
	IF_NOT_DEPRIVILEGED(ROM_CALL_ENABLEINTERRUPTS)
	movl	$1, SHARED(ROM_SHARED_VIF)
	cmpl	$0, SHARED(ROM_SHARED_PENDING)
	je	1f
	movl	$ROM_CALL_ENABLEINTERRUPTS, %eax
	jmp	vmi_hcall
1:	xorl	%r8d, %r8d
	jmp	vmi_ret1

vmi_shared_cli:
	IF_NOT_DEPRIVILEGED(ROM_CALL_DISABLEINTERRUPTS)
	movl	$0, SHARED(ROM_SHARED_VIF)
	xorl	%r8d, %r8d
	jmp	vmi_ret1

vmi_shared_get_if:
	IF_NOT_DEPRIVILEGED(ROM_CALL_GETINTERRUPTMASK)
	xorl	%r8d, %r8d
	cmpl	$0, SHARED(ROM_SHARED_VIF)
	je	1f
	movl	$RFLAGS_IF, %r8d
1:	jmp	vmi_ret1

vmi_shared_set_if:		/* IF from flags bit 9 */
	IF_NOT_DEPRIVILEGED(ROM_CALL_SETINTERRUPTMASK)
	testl	$RFLAGS_IF, %edi
	jnz	vmi_shared_sti
	jmp	vmi_shared_cli

vmi_shared_cr2:
	IF_NOT_DEPRIVILEGED(ROM_CALL_GETCR2)
	movq	SHARED(ROM_SHARED_CR2), %r8
	jmp	vmi_ret1
#endif

#if ROM_NATIVE_CALLS || ROM_DEPRIVILEGED
vmi_native_rdtsc:
	rdtsc
	shlq	$32, %rdx
	orq	%rax, %rdx
	movq	%rdx, %r8
	jmp	vmi_ret1

#endif
#if ROM_NATIVE_CALLS && !ROM_DEPRIVILEGED
vmi_native_rdpmc:		/* counter = a0 */
	movq	%rcx, %rsi	/* rdpmc takes ecx: keep res */
	movl	%edi, %ecx
	rdpmc
	movq	%rsi, %rcx
	shlq	$32, %rdx
	orq	%rax, %rdx
	movq	%rdx, %r8
	jmp	vmi_ret1

#endif
#if ROM_NATIVE_CALLS || ROM_DEPRIVILEGED
vmi_native_iodelay:		/* no port-0x80 write: that would be an exit, the very cost to avoid */
	xorl	%r8d, %r8d
	jmp	vmi_ret1
#endif
#if ROM_NATIVE_CALLS && !ROM_DEPRIVILEGED

/* With a shared page (1.3+), the kernel's IF is also the vif that masks the hypervisor's events
 * (upcalls, VMI 1.4): kept equal to it, and unmasking with an event pending takes it with one
 * CPU.EnableInterrupts hypercall, as in the deprivileged ROM. */
vmi_native_sti:
	sti
#ifdef ROM_SHARED_VIF
#if ROM_SMP
	PCPU_READY
	jne	1f
#endif
	movl	$1, SHARED(ROM_SHARED_VIF)
	cmpl	$0, SHARED(ROM_SHARED_PENDING)
	je	1f
	movl	$ROM_CALL_ENABLEINTERRUPTS, %eax
	jmp	vmi_hcall
1:
#endif
	xorl	%r8d, %r8d
	jmp	vmi_ret1

vmi_native_cli:
	cli
#ifdef ROM_SHARED_VIF
#if ROM_SMP
	PCPU_READY
	jne	1f
#endif
	movl	$0, SHARED(ROM_SHARED_VIF)
1:
#endif
	xorl	%r8d, %r8d
	jmp	vmi_ret1

vmi_native_get_if:		/* spec: RFLAGS with only IF (bit 9) meaningful; the hypervisor returns RFLAGS & IF too */
	pushfq
	popq	%r8
	andl	$RFLAGS_IF, %r8d
	jmp	vmi_ret1

vmi_native_set_if:		/* spec: IF from flags bit 9 */
	testl	$RFLAGS_IF, %edi
	jnz	vmi_native_sti
	jmp	vmi_native_cli
#endif /* ROM_NATIVE_CALLS */
