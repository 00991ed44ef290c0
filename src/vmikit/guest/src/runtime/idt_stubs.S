/*
 * One 16-byte entry stub per vector (256 of them), so every vector reports its
 * own number.  Each stub makes the stack look the same -- [vector, error code,
 * CPU frame] -- pushing a dummy error code where the CPU pushes none, then
 * joins the common path, which saves every GPR and calls the C handler.
 */
	.text
	.code64

/* Vectors for which the CPU pushes an error code: #DF #TS #NP #SS #GP #PF #AC #CP #VC #SX */
#define HAS_ERROR_CODE(v) ((v) == 8 || ((v) >= 10 && (v) <= 14) || (v) == 17 || \
			   (v) == 21 || (v) == 29 || (v) == 30)

	.balign 16
	.globl idt_stubs
idt_stubs:
	.set vec, 0
	.rept 256
	.balign 16
	.if !HAS_ERROR_CODE(vec)
	pushq $0
	.endif
	pushq $vec
	jmp idt_common
	.set vec, vec + 1
	.endr

idt_common:
	/* Push order chosen so that, read upwards from %rsp, this is struct saved_regs. */
	pushq %rax
	pushq %rbx
	pushq %rcx
	pushq %rdx
	pushq %rsi
	pushq %rdi
	pushq %rbp
	pushq %r8
	pushq %r9
	pushq %r10
	pushq %r11
	pushq %r12
	pushq %r13
	pushq %r14
	pushq %r15
	cld
	movq %rsp, %rdi
	movq %rsp, %rbx            /* callee-saved: the frame, to come back to */
	andq $-16, %rsp            /* SysV ABI: 16-byte aligned at the call */
	call exception_handler     /* returns only when a hook handled the exception */
	movq %rbx, %rsp
	popq %r15
	popq %r14
	popq %r13
	popq %r12
	popq %r11
	popq %r10
	popq %r9
	popq %r8
	popq %rbp
	popq %rdi
	popq %rsi
	popq %rdx
	popq %rcx
	popq %rbx
	popq %rax
	addq $16, %rsp             /* vector, error code */
	iretq
