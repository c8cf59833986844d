/*
 * hcall: calls the monitor directly through the doorbell mapped at
 * USER_DOORBELL_VA, as a cloaked app's shim will, and prints each result.
 */
#include "libc.h"

int main(void)
{
	static const char msg[] = "hcall: console write from user mode\n";
	printf("hcall: VERSION=0x%lx\n", hypercall(HC_VERSION, 0, 0));
	printf("hcall: CONSOLE_WRITE=%ld\n", hypercall(HC_CONSOLE_WRITE, (long)msg, sizeof msg - 1));
	printf("hcall: CONSOLE_WRITE-bad-buffer=%ld\n", hypercall(HC_CONSOLE_WRITE, 0x10, 4));
	printf("hcall: CONSOLE_WRITE-too-long=%ld\n", hypercall(HC_CONSOLE_WRITE, (long)msg, 4097));
	printf("hcall: EXIT=%ld\n", hypercall(HC_EXIT, 7, 0));
	printf("hcall: unknown=%ld\n", hypercall(0x7777, 0, 0));
	long v;
	__asm__ volatile("movl (%1), %k0" : "=a"(v) : "r"(USER_DOORBELL_VA + 8) : "memory");
	printf("hcall: bad-width-offset=%d\n", (int)v);
	return 0;
}
