/*
 * counter[:LABEL[:N[:SPIN_MS]]]: prints N lines, burning SPIN_MS of CPU
 * between them without yielding or sleeping, so that several counters only
 * interleave if the kernel preempts them. Defaults: LABEL=c, N=5, SPIN_MS=4.
 */
#include "libc.h"

int main(int argc, char **argv)
{
	const char *label = argc > 1 ? argv[1] : "c";
	long n = argc > 2 ? atol(argv[2]) : 5;
	long spin = argc > 3 ? atol(argv[3]) : 4;
	long pid = sys_getpid();
	for (long i = 0; i < n; i++) {
		printf("counter %s: pid %ld line %ld\n", label, pid, i);
		spin_ms(spin);
	}
	printf("counter %s: done\n", label);
	return 0;
}
