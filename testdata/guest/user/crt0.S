/* Process entry: the kernel (or Linux) leaves argc at (%rsp), argv above it. */
	.section .text.start, "ax"
	.globl _start
_start:
	xor %ebp, %ebp
	mov (%rsp), %rdi
	lea 8(%rsp), %rsi
	and $~15, %rsp
	call main
	mov %eax, %edi
	mov $231, %eax
	syscall
	ud2
	.section .note.GNU-stack, "", @progbits
