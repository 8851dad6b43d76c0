/*
 * Exception stubs (vectors 0-31) and run_user(), the CPL0 -> CPL3 -> CPL0
 * round trip.
 *
 * User -> kernel calls are a CPL3 `hlt` (always #GP(0) in user mode) with
 * rax = number: software KVMs of the PVM kind #UD on `int n` from user
 * mode but do deliver exceptions. trap_handler() recognises the hlt.
 */
#include "guest.h"

	.text
	.code64

/* ---- exceptions: push (err, vec) and call trap_handler (never returns) */
.macro EXC_NOERR vec
	.balign 16
exc_\vec:
	pushq $0
	pushq $\vec
	jmp exc_common
.endm
.macro EXC_ERR vec
	.balign 16
exc_\vec:
	pushq $\vec
	jmp exc_common
.endm

	.irp v, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31
	EXC_NOERR \v
	.endr
	.irp v, 8,10,11,12,13,14,17,21,29,30
	EXC_ERR \v
	.endr

/* Save all GPRs as a struct trap_frame and call trap_handler(frame). If it
 * returns (e.g. after emulating a user-mode in/out), resume via iretq.
 * In long mode the CPU 16-byte aligns RSP before pushing its frame, so
 * after 7 + 15 pushes RSP is 16-byte aligned again for the call. */
.macro SAVE_GPRS
	push %rax
	push %rbx
	push %rcx
	push %rdx
	push %rsi
	push %rdi
	push %rbp
	push %r8
	push %r9
	push %r10
	push %r11
	push %r12
	push %r13
	push %r14
	push %r15
.endm
.macro RESTORE_GPRS
	pop %r15
	pop %r14
	pop %r13
	pop %r12
	pop %r11
	pop %r10
	pop %r9
	pop %r8
	pop %rbp
	pop %rdi
	pop %rsi
	pop %rdx
	pop %rcx
	pop %rbx
	pop %rax
.endm

exc_common:
	SAVE_GPRS
	mov %rsp, %rdi
	call trap_handler
	RESTORE_GPRS
	add $16, %rsp                   /* vector, error code */
	iretq

/* The wake-up interrupt (LAPIC timer, the GED through the IOAPIC): it only
 * ends a `sti; hlt`. Acknowledge it at the LAPIC and return. */
	.balign 16
	.globl wake_isr
wake_isr:
	push %rax
	movabs $0xfee000b0, %rax        /* LAPIC EOI */
	movl $0, (%rax)
	pop %rax
	iretq

	.section .rodata
	.balign 8
	.globl exc_stub_table
exc_stub_table:
	.irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	.quad exc_\v
	.endr
	.text

/*
 * u64 run_user(fn, arg, user_stack_top, rsp0_slot)
 *
 * Saves the callee-saved registers, points TSS.RSP0 just below them and
 * iretq's to fn(arg) at CPL3 with IOPL=3, IF=0. When fn returns, the user
 * stub makes the SYS_EXIT call; its trap frame lies exactly below RSP0, so
 * trap_handler() finds the saved context at frame + sizeof(frame) and
 * user_return_to_kernel() unwinds straight back here.
 */
	.globl run_user
run_user:
	push %rbp
	push %rbx
	push %r12
	push %r13
	push %r14
	push %r15
	mov %rsp, %rax
	and $-16, %rsp
	push %rax                       /* [rsp0 + 8] (padding) */
	push %rax                       /* [rsp0]     = saved kernel rsp */
	mov %rsp, (%rcx)                /* TSS.RSP0 */
	pushq $(SEL_UDATA | 3)
	pushq %rdx
	pushq $RFLAGS_USER
	pushq $(SEL_UCODE | 3)
	lea user_start(%rip), %rax
	push %rax
	mov %rdi, %rax                  /* fn */
	mov %rsi, %rdi                  /* arg */
	iretq

user_start:                             /* CPL3 */
	call *%rax
	mov %rax, %rdi
	mov $SYS_EXIT, %eax
	hlt                             /* syscall */
	ud2

	.globl user_halt
user_halt:                              /* CPL3 */
	mov $SYS_HALT, %eax
	hlt                             /* syscall */
	ud2

/* void user_return_to_kernel(u64 rsp0, u64 result): CPL0, from the
 * SYS_EXIT handler; returns `result` from the matching run_user(). */
	.globl user_return_to_kernel
user_return_to_kernel:
	mov %rsi, %rax
	mov %rdi, %rsp
	pop %rsp                        /* saved kernel rsp */
	pop %r15
	pop %r14
	pop %r13
	pop %r12
	pop %rbx
	pop %rbp
	ret
