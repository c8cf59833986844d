/*
 * crash:MODE: misbehaves so tests can show that a faulting process is
 * killed and the kernel carries on. MODE is one of null, kernel, ud2, port,
 * doorbell-store, exec-data.
 */
#include "libc.h"

static u8 data_code[16] = {0xc3};

int main(int argc, char **argv)
{
	const char *m = argc > 1 ? argv[1] : "null";
	printf("crash: %s\n", m);
	if (!strcmp(m, "null"))
		*(volatile int *)0 = 1;
	else if (!strcmp(m, "kernel"))
		(void)*(volatile u64 *)0xffffffff80100000UL;
	else if (!strcmp(m, "ud2"))
		__asm__ volatile("ud2");
	else if (!strcmp(m, "port"))
		__asm__ volatile("outb %%al, $0x80" ::"a"(0));
	else if (!strcmp(m, "doorbell-store"))
		*(volatile u64 *)USER_DOORBELL_VA = 1;
	else if (!strcmp(m, "exec-data"))
		((void (*)(void))data_code)();
	printf("crash: %s survived\n", m);
	return 3;
}
