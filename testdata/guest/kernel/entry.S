/*
 * Boot entry, trap stubs and the SYSCALL entry of the umbra test guest.
 *
 * The monitor enters _start (identity-mapped, linked at its physical
 * address) on the boot page tables of docs/boot.md with RDI = boot info.
 * _start maps the kernel image window (virtual 0xffffffff80000000 ->
 * physical 0, 16 MiB of 2 MiB pages) into PML4 slot 511 of the boot PML4
 * and jumps to the kernel proper, linked in that window (-mcmodel=kernel).
 */
#define KBASE 0xffffffff80000000

	.section .text.boot, "ax"
	.code64
	.globl _start
_start:
	mov %cr3, %rax
	and $~0xfff, %rax
	movl $kpdpt - KBASE, %ecx
	or $3, %rcx
	mov %rcx, 511*8(%rax)
	movl $kpd - KBASE, %ecx
	or $3, %rcx
	movl $kpdpt - KBASE, %edx
	mov %rcx, 510*8(%rdx)
	movl $kpd - KBASE, %edx
	mov $0x83, %ecx
	mov $8, %esi
1:	mov %rcx, (%rdx)
	add $8, %rdx
	add $0x200000, %rcx
	dec %esi
	jnz 1b
	mov %cr3, %rax
	mov %rax, %cr3
	movabs $high_start, %rax
	jmp *%rax

	.text
high_start:
	mov $boot_stack_top, %rsp
	xor %ebp, %ebp
	call kmain
2:	hlt
	jmp 2b

/* 256 interrupt stubs, 16 bytes apart: isr_stubs + 16 * vector. */
	.balign 16
	.globl isr_stubs
isr_stubs:
	.set vec, 0
	.rept 256
	.balign 16
	.if (vec == 8) || (vec == 10) || (vec == 11) || (vec == 12) || (vec == 13) || (vec == 14) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
	pushq $vec
	.else
	pushq $0
	pushq $vec
	.endif
	jmp trap_common
	.set vec, vec + 1
	.endr

trap_common:
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
	cld
	mov %rsp, %rdi
	call trap
	mov %rax, %rsp
	.globl trap_return
trap_return:
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
	add $16, %rsp
	iretq

/*
 * SYSCALL entry (IA32_LSTAR). RFLAGS.IF is cleared by IA32_FMASK, so this
 * single-CPU kernel can use a global scratch slot instead of SWAPGS.
 * The frame built here has the same layout as an interrupt frame; the
 * return path is the common IRETQ path.
 */
	.globl syscall_entry
syscall_entry:
	mov %rsp, user_rsp_scratch(%rip)
	mov kstack_top_cur(%rip), %rsp
	pushq $0x23
	pushq user_rsp_scratch(%rip)
	push %r11
	pushq $0x2b
	push %rcx
	pushq $0
	pushq $0x100
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
	cld
	mov %rsp, %rdi
	call syscall_trap
	mov %rax, %rsp
	jmp trap_return

	.globl idle_loop
idle_loop:
	sti
	hlt
	jmp idle_loop

	.data
	.balign 8
	.globl kstack_top_cur
kstack_top_cur:
	.quad 0
user_rsp_scratch:
	.quad 0

	.bss
	.balign 4096
	.globl kpdpt, kpd
kpdpt:	.skip 4096
kpd:	.skip 4096
	.balign 16
	.skip 16384
	.globl boot_stack_top
boot_stack_top:

	.section .note.GNU-stack, "", @progbits
