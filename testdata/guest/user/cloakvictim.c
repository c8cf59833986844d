/*
 * cloakvictim[:cloak]: the victim of the attacks on the monitor as a deputy
 * (attack=ppbounce, ppzero, ppstore, brklie; kernel/attack.c). Run cloaked
 * when its argument is "cloak". In order: it writes a line (the kernel learns
 * its bounce page from the buffer), yields (attack point 1), writes a second
 * line (a bounce copy), grows its heap by three pages and stores to the first
 * two (zero fills), stores to a page of uncloaked anonymous memory it mapped
 * before registering (an appVM store), asks for a fourth heap page (the brk
 * a lying kernel answers with a lower break), maps a fresh page (which
 * attack=mmaplie answers with its bounce area), yields (attack point 2) and
 * says whether its heap still holds what it stored. attack=plant hijacks the
 * return of cloak_init (uncloaked: of uncloaked_init, which maps the same).
 */
#include "libc.h"
#include "../shim/cloak.h"

/* uncloaked_init maps what cloak_init maps (a page written, then made read+
 * execute, then the bounce area) without registering: an uncloaked victim meets
 * attack=plant the same way. */
static __attribute__((noinline)) long uncloaked_init(void)
{
	char *t = sys_mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if ((long)t < 0 && (long)t > -4096)
		return (long)t;
	t[0] = (char)0xc3; /* ret */
	long r = sys_mprotect(t, 4096, PROT_READ | PROT_EXEC);
	if (r < 0)
		return r;
	void *b = sys_mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	__asm__ volatile("" ::"r"(t), "r"(b) : "memory");
	return 0;
}

static inline unsigned long long rdtsc(void)
{
	unsigned lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((unsigned long long)hi << 32) | lo;
}

int main(int argc, char **argv)
{
	/* Uncloaked memory the app shares with the kernel, present before registering. */
	char *shared = sys_mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if ((long)shared < 0 && (long)shared > -4096) {
		printf("cloakvictim: mmap failed: %ld\n", (long)shared);
		return 2;
	}
	shared[0] = 1;
	if (argc > 1 && !strcmp(argv[1], "cloak")) {
		long r = cloak_init("cloakvictim");
		if (r) {
			printf("cloakvictim: cloak_init failed: %ld\n", r);
			return 3;
		}
	} else if (uncloaked_init()) {
		return 3;
	}
	printf("cloakvictim: started shared=%p\n", (void *)shared);
	/*
	 * Long enough for timer ticks to preempt it (attack=pptick redirects there):
	 * at least 10^8 TSC cycles (20 ms or more at up to 5 GHz; the kernel ticks
	 * every 2 ms by default). Uncloaked, the guest's emulated instructions make one
	 * round of the loop longer than that; cloaked, appVM runs it at the host's
	 * speed and one round can fall between two ticks. The time is read with
	 * RDTSC, not a system call: a call's result would come back through the
	 * bounce page, which is the very page pptick points at the kernel's rodata.
	 */
	unsigned long long t0 = rdtsc();
	for (int round = 0; round < 100000 && rdtsc() - t0 < 100000000ULL; round++)
		for (volatile long i = 0; i < 200000; i++)
			;
	sys_sched_yield();
	printf("cloakvictim: second write\n");
	char *heap = (char *)sys_brk(0);
	long b = sys_brk(heap + 3 * 4096);
	if (b != (long)(heap + 3 * 4096)) {
		printf("cloakvictim: brk failed: %ld\n", b);
		return 4;
	}
	strcpy(heap, "heapdata:page0");
	strcpy(heap + 4096, "heapdata:page1");
	strcpy(shared + 64, "shared:store");
	b = sys_brk(heap + 4 * 4096);
	char *fresh = sys_mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	printf("cloakvictim: mmap=%p\n", (void *)fresh);
	sys_sched_yield();
	int intact = !strcmp(heap, "heapdata:page0") && !strcmp(heap + 4096, "heapdata:page1");
	printf("cloakvictim: brk=%s heap intact=%d\n", b == (long)(heap + 4 * 4096) ? "asked" : "other", intact);
	return 0;
}
