/*
 * cloaksecret:SECRET[:cloak]: the attack victim of secret.c, run cloaked when
 * its second argument is "cloak". It keeps "v1:SECRET" in its first data page
 * and a decoy in the second, yields (attack point 1), updates page 0 to
 * "v2:SECRET", yields again with the secret's first 16 bytes in r12/r13
 * (attack point 2), then says what each page holds without printing the
 * secret: v1, v2, decoy or other.
 */
#include "libc.h"
#include "../shim/cloak.h"

static char pages[2][4096] __attribute__((section(".data.victim"), aligned(4096))) = {{0}};

static const char *what(const char *page, const char *secret)
{
	char want[256];
	strcpy(want, "v1:");
	strcat(want, secret);
	if (!strcmp(page, want))
		return "v1";
	want[1] = '2';
	if (!strcmp(page, want))
		return "v2";
	if (!strcmp(page, "decoy:page1"))
		return "decoy";
	return "other";
}

int main(int argc, char **argv)
{
	if (argc < 2 || strlen(argv[1]) > 200) {
		printf("cloaksecret: usage cloaksecret:SECRET[:cloak] (at most 200 bytes)\n");
		return 2;
	}
	if (argc > 2 && !strcmp(argv[2], "cloak")) {
		long r = cloak_init("cloaksecret");
		if (r) {
			printf("cloaksecret: cloak_init failed: %ld\n", r);
			return 3;
		}
		printf("cloaksecret: cloaked\n");
	}
	const char *secret = argv[1];
	strcpy(pages[0], "v1:");
	strcat(pages[0], secret);
	strcpy(pages[1], "decoy:page1");
	printf("cloaksecret: pid %ld holds its secret at %p\n", sys_getpid(), (void *)pages[0]);
	sys_sched_yield();
	strcpy(pages[0], "v2:");
	strcat(pages[0], secret);
	u64 w[2] = {0, 0};
	memcpy(w, secret, strlen(secret) < 16 ? strlen(secret) : 16);
	register u64 r12 __asm__("r12") = w[0];
	register u64 r13 __asm__("r13") = w[1];
	long ret;
	__asm__ volatile("syscall" : "=a"(ret) : "a"(24L), "r"(r12), "r"(r13) : "rcx", "r11", "memory");
	printf("cloaksecret: final page0=%s page1=%s\n", what(pages[0], secret), what(pages[1], secret));
	return 0;
}
