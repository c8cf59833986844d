/*
 * The trampoline (docs/cloak.md): cloak_init copies this code into an
 * uncloaked page. The app's process in the guest kernel only ever runs
 * here once it is cloaked. Each CLOAK_RESUME returns the next action in
 * rax: a system call number (arguments already in rdi, rsi, rdx, r10, r8,
 * r9; its result goes back in rdi), -1 (nothing: resume again) or -2
 * (touch [rdi], for writing if rsi != 0, so the kernel faults a page in).
 * It uses no stack and keeps the doorbell address in rbx.
 */
#include "../include/umbra_guest.h"

	.section .rodata.cloak_tramp, "a"
	.globl cloak_tramp_start, cloak_tramp_end
cloak_tramp_start:
	movabs $USER_DOORBELL_VA, %rbx
	xor %edi, %edi
1:	mov $0x104, %eax	/* CLOAK_RESUME(rdi) */
	mov (%rbx), %rax
	cmp $-1, %rax
	je 2f
	cmp $-2, %rax
	je 3f
	syscall
	mov %rax, %rdi
	jmp 1b
2:	xor %edi, %edi
	jmp 1b
3:	test %rsi, %rsi
	jz 4f
	lock orb $0, (%rdi)	/* a write that leaves the byte as it is */
	jmp 2b
4:	movb (%rdi), %al
	jmp 2b
cloak_tramp_end:

	.section .note.GNU-stack, "", @progbits
