/*
 * secret:SECRET: a victim for the attack modes. It keeps "v1:SECRET" in its
 * first data page and a decoy in the second, yields (attack point 1),
 * updates page 0 to "v2:SECRET", yields again with the secret's first 16
 * bytes in r12/r13 (attack point 2), then prints both pages.
 */
#include "libc.h"

static char pages[2][4096] __attribute__((section(".data.victim"), aligned(4096))) = {{0}};

int main(int argc, char **argv)
{
	if (argc < 2 || strlen(argv[1]) > 200) {
		printf("secret: usage secret:SECRET (at most 200 bytes)\n");
		return 2;
	}
	const char *secret = argv[1];
	strcpy(pages[0], "v1:");
	strcat(pages[0], secret);
	strcpy(pages[1], "decoy:page1");
	printf("secret: pid %ld holds its secret at %p\n", sys_getpid(), (void *)pages[0]);
	sys_sched_yield();
	strcpy(pages[0], "v2:");
	strcat(pages[0], secret);
	/* Keep secret bytes in callee-saved registers across a system call. */
	u64 w[2] = {0, 0};
	memcpy(w, secret, strlen(secret) < 16 ? strlen(secret) : 16);
	register u64 r12 __asm__("r12") = w[0];
	register u64 r13 __asm__("r13") = w[1];
	long ret;
	__asm__ volatile("syscall" : "=a"(ret) : "a"(24L), "r"(r12), "r"(r13) : "rcx", "r11", "memory");
	printf("secret: final page0=%s page1=%s\n", pages[0], pages[1]);
	return 0;
}
