/* The user programs, embedded as ELF images (built into the build directory,
 * found through the assembler's include path). */
	.macro APP name
	.section .apps, "a"
	.balign 16
	.globl app_\name\()_start, app_\name\()_end
app_\name\()_start:
	.incbin "\name\().elf"
app_\name\()_end:
	.endm

	APP hello
	APP counter
	APP secret
	APP systest
	APP compute
	APP crash
	APP hcall
	APP pp
	APP cloaksecret
	APP cloakcompute
	APP cloakprobe
	APP cloakvictim
	APP chat
	APP cloakdisk

	.section .note.GNU-stack, "", @progbits
