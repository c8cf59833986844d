/*
 * cloakcompute:PAGES:ROUNDS[:cloak|plain[:SPIN_MS]]: compute.c's deterministic
 * computation, cloaked when the third argument is "cloak": PAGES pages of heap
 * (brk), PAGES pages of anonymous mmap (cloaked with CLOAK_REGION_ADD) and a
 * page of stack, ROUNDS times, spinning SPIN_MS (default 3) between rounds so
 * that timer ticks (and, with swap=cloakcompute, evictions) happen in between.
 * PAGES = 128 is a 1 MiB working set. Prints one checksum (the same whatever
 * SPIN_MS, cloaked or not).
 */
#include "libc.h"
#include "../shim/cloak.h"

int main(int argc, char **argv)
{
	long pages = argc > 1 ? atol(argv[1]) : 8;
	long rounds = argc > 2 ? atol(argv[2]) : 6;
	int cloak = argc > 3 && !strcmp(argv[3], "cloak");
	long spin = argc > 4 ? atol(argv[4]) : 3;
	if (pages < 1 || pages > 256 || rounds < 1 || rounds > 100 || spin < 0 || spin > 1000) {
		printf("cloakcompute: bad arguments\n");
		return 2;
	}
	if (cloak) {
		long r = cloak_init("cloakcompute");
		if (r) {
			printf("cloakcompute: cloak_init failed: %ld\n", r);
			return 3;
		}
	}
	u64 *heap = (u64 *)sys_brk(0);
	if (sys_brk((char *)heap + pages * 4096) != (long)((char *)heap + pages * 4096)) {
		printf("cloakcompute: brk failed\n");
		return 1;
	}
	u64 *map = cloak ? cloak_mmap((unsigned long)pages * 4096)
			 : sys_mmap(NULL, (size_t)pages * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if ((long)map < 0 && (long)map > -4096) {
		printf("cloakcompute: mmap failed %ld\n", (long)map);
		return 1;
	}
	volatile u64 stack[512];
	u64 x = 0x9e3779b97f4a7c15UL, sum = 0;
	long words = pages * 512;
	for (long r = 0; r < rounds; r++) {
		for (long i = 0; i < words; i += 61) {
			x = x * 6364136223846793005UL + 1442695040888963407UL;
			heap[i] ^= x;
			map[words - 1 - i] += x >> 7;
			stack[i % 512] ^= x >> 3;
		}
		for (long i = 0; i < words; i += 61)
			sum = sum * 31 + heap[i] + map[words - 1 - i] + stack[i % 512];
		spin_ms(spin);
	}
	printf("cloakcompute: pages %ld rounds %ld result=0x%lx%s\n", pages, rounds, sum, cloak ? " cloaked" : "");
	return 0;
}
