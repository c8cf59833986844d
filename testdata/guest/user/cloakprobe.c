/*
 * cloakprobe:MODE[:ARG][:cloak]: small probes of cloaked execution, one per
 * mode; cloaked when the last argument is "cloak".
 *
 *   spin:N      N million iterations of pure computation (no system calls):
 *               only a time slice can take the CPU from it
 *   getpid:N    N getpid calls; prints the time per call (for benchmarks)
 *   files       openat/write/lseek/read/fstat/close of a file in /tmp, with
 *               every buffer in cloaked memory
 *   enosys      a system call the monitor does not forward
 *   ud2         an invalid opcode (the app cannot survive it)
 *   segv        a load from an address nothing maps
 *   twice       registers a second time
 *   resume      calls CLOAK_RESUME from cloaked code (out of order)
 *   region      cloak_mmap, CLOAK_REGION_REMOVE, munmap of cloaked memory
 *   refusals    requests the monitor refuses, each with its errno, then a
 *               good one
 */
#include "libc.h"
#include "../shim/cloak.h"

static u64 spin(long millions)
{
	u64 x = 0x9e3779b97f4a7c15UL;
	for (long i = 0; i < millions * 1000000L; i++)
		x = x * 6364136223846793005UL + 1442695040888963407UL;
	return x;
}

static int files(void)
{
	static const char text[] = "cloaked bytes through the bounce area\n";
	char buf[64];
	long fd = sys_openat(AT_FDCWD, "/tmp/cloakprobe", O_RDWR | O_CREAT | O_TRUNC, 0644);
	if (fd < 0)
		return printf("cloakprobe: files: openat %ld\n", fd), 1;
	long w = sys_write((int)fd, text, sizeof text - 1);
	long s = sys_lseek((int)fd, 0, SEEK_SET);
	memset(buf, 0, sizeof buf);
	long r = sys_read((int)fd, buf, sizeof buf);
	struct stat st;
	long f = sys_fstat((int)fd, &st);
	long c = sys_close((int)fd);
	int same = r == (long)sizeof text - 1 && !memcmp(buf, text, sizeof text - 1);
	printf("cloakprobe: files: write=%ld lseek=%ld read=%ld fstat=%ld size=%ld close=%ld same=%d\n", w, s, r, f,
	       st.st_size, c, same);
	return same ? 0 : 1;
}

/* raw_register issues CLOAK_REGISTER with a request edited by edit(). */
static long raw_register(int what)
{
	static struct {
		struct cloak_register_req h;
		struct cloak_segment s[1];
		struct cloak_region r[3];
	} q __attribute__((aligned(8)));
	extern const char __cloak_text_start[];
	memset(&q, 0, sizeof q);
	q.h.magic = CLOAK_REQ_MAGIC;
	q.h.version = CLOAK_REQ_VERSION;
	q.h.header_size = sizeof q.h;
	q.h.total_size = sizeof q;
	q.h.nr_segments = 1;
	q.h.nr_regions = 3;
	q.h.trampoline_va = 0x100000000000UL;
	q.h.bounce_va = 0x100000010000UL;
	q.h.bounce_size = 4096;
	q.s[0] = (struct cloak_segment){.va = (u64)__cloak_text_start, .size = 64, .kind = CLOAK_SEG_CODE};
	q.r[0] = (struct cloak_region){.va = 0x400000, .size = 0x1000, .kind = CLOAK_REGION_IMAGE};
	q.r[1] = (struct cloak_region){.va = 0x10000000, .size = 0x10000, .kind = CLOAK_REGION_HEAP};
	q.r[2] = (struct cloak_region){.va = 0x20000000, .size = 0x10000, .kind = CLOAK_REGION_ANON};
	switch (what) {
	case 0: /* regions overlap */
		q.r[2].va = 0x10008000;
		break;
	case 1: /* not user memory */
		q.r[2].va = 0xffff800000000000UL;
		break;
	case 2: /* trampoline inside a region */
		q.h.trampoline_va = 0x10004000;
		break;
	case 3: /* bad magic */
		q.h.magic ^= 1;
		break;
	case 4: /* a measured byte the app cannot read: nothing maps it */
		q.s[0].va = 0x0f000000;
		q.r[0].va = 0x0f000000;
		break;
	}
	return cloak_call(CLOAK_REGISTER, (long)&q, 0, 0);
}

int main(int argc, char **argv)
{
	const char *mode = argc > 1 ? argv[1] : "";
	int cloak = argc > 2 && !strcmp(argv[argc - 1], "cloak");
	if (!strcmp(mode, "refusals")) {
		const char *names[] = {"overlap", "kernel-half", "trampoline-in-region", "magic", "unreadable-image"};
		for (int i = 0; i < 5; i++)
			printf("cloakprobe: refusals: %s=%ld\n", names[i], raw_register(i));
	}
	if (cloak) {
		long r = cloak_init("cloakprobe");
		printf("cloakprobe: cloak_init=%ld\n", r);
		if (r)
			return 3;
	}
	if (!strcmp(mode, "spin")) {
		long n = argc > 2 ? atol(argv[2]) : 10;
		printf("cloakprobe: spin start\n");
		u64 x = spin(n);
		printf("cloakprobe: spin done x=0x%lx\n", x);
	} else if (!strcmp(mode, "getpid")) {
		long n = argc > 2 ? atol(argv[2]) : 100;
		u64 t0 = now_ns();
		for (long i = 0; i < n; i++)
			sys_getpid();
		u64 t1 = now_ns();
		printf("cloakprobe: getpid n=%ld ns=%lu\n", n, (t1 - t0) / (u64)n);
	} else if (!strcmp(mode, "files")) {
		return files();
	} else if (!strcmp(mode, "enosys")) {
		printf("cloakprobe: enosys=%ld\n", syscall6(999, 1, 2, 3, 4, 5, 6));
	} else if (!strcmp(mode, "ud2")) {
		__asm__ volatile("ud2");
		printf("cloakprobe: survived ud2\n");
	} else if (!strcmp(mode, "segv")) {
		static volatile long bad = 0x10;
		printf("cloakprobe: segv load=%d\n", *(volatile int *)bad);
	} else if (!strcmp(mode, "twice")) {
		printf("cloakprobe: twice=%ld\n", cloak_init("again"));
	} else if (!strcmp(mode, "resume")) {
		printf("cloakprobe: resume=%ld\n", cloak_call(CLOAK_RESUME, 0, 0, 0));
	} else if (!strcmp(mode, "region")) {
		char *p = cloak_mmap(8192);
		if ((long)p < 0 && (long)p > -4096)
			return printf("cloakprobe: region: cloak_mmap %ld\n", (long)p), 1;
		strcpy(p, "in a cloaked mapping");
		long again = cloak_call(CLOAK_REGION_ADD, (long)p, 4096, CLOAK_REGION_ANON);
		long unmap = sys_munmap(p, 8192);
		long image = cloak_call(CLOAK_REGION_REMOVE, 0x400000, 4096, 0);
		long rm = cloak_call(CLOAK_REGION_REMOVE, (long)p, 8192, 0);
		long unmap2 = sys_munmap(p, 8192);
		printf("cloakprobe: region: add-again=%ld munmap-cloaked=%ld remove-image=%ld remove=%ld munmap=%ld\n",
		       again, unmap, image, rm, unmap2);
	} else if (!strcmp(mode, "refusals")) {
		printf("cloakprobe: refusals: done\n");
	}
	return 0;
}
