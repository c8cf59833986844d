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
 *   twice       registers a second time (a CLOAK_REGISTER while cloaked)
 *   resume      calls CLOAK_RESUME from cloaked code (out of order)
 *   region      cloak_mmap, CLOAK_REGION_REMOVE, munmap of cloaked memory
 *   refusals    requests the monitor refuses, each with its errno (the last a
 *               trampoline mapped writable and executable), then a good one
 *   pp          page protection of its own cloaked pages (docs/pageprot.md):
 *               a locked read-only page with an upcall handler that checks
 *               its record, the lock held against the app itself, a
 *               read-denied page (upcall at the load), skip and log, refusals
 *   ppexec      runs code in a page of its image, denies executing it (kill)
 *               and runs it again: the monitor ends the app there
 */
#include "libc.h"
#include "../shim/cloak.h"
#include "../../../docs/pageprot_abi.h"

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
	case 5: { /* W^X: a trampoline mapped writable and executable */
		char *t = sys_mmap(NULL, 4096, PROT_READ | PROT_WRITE | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if ((long)t < 0 && (long)t > -4096)
			return (long)t;
		t[0] = (char)0xc3;
		q.h.trampoline_va = (u64)t;
		break;
	}
	}
	return cloak_call(CLOAK_REGISTER, (long)&q, 0, 0);
}

/* ---- page protection (modes pp, ppexec) ---- */

static u8 pp_pages[4][4096] __attribute__((aligned(4096)));
static u8 pp_stack[8192] __attribute__((aligned(4096)));
static struct {
	struct pp_batch_header h;
	struct pp_range r[1];
} pp_batch;

static long pp_protect(void *addr, int deny, int action, int flags)
{
	pp_batch.h = (struct pp_batch_header){.magic = PP_BATCH_MAGIC, .version = PP_VERSION_MAJOR, .count = 1,
					      .bad_index = PP_NO_INDEX};
	pp_batch.r[0] = (struct pp_range){.addr = (u64)addr, .pages = 1, .deny = (unsigned char)deny,
					  .action = (unsigned char)action, .flags = (unsigned short)flags};
	return cloak_call(PP_SET, (long)&pp_batch, sizeof pp_batch, 0);
}

/* pp_store writes v at p (pp_store_at: the store); pp_load reads *p into a
 * register that holds 0x5e5e before (pp_load_at: the load), so a discarded
 * load returns 0x5e5e. */
extern char pp_store_at[], pp_load_at[];
static __attribute__((noinline)) void pp_store(volatile u64 *p, u64 v)
{
	__asm__ volatile(".globl pp_store_at\npp_store_at: movq %1, (%0)" ::"r"(p), "r"(v) : "memory");
}
static __attribute__((noinline)) u64 pp_load(volatile u64 *p)
{
	u64 v;
	__asm__ volatile("movq $0x5e5e, %0\n.globl pp_load_at\npp_load_at: movq (%1), %0" : "=&r"(v) : "r"(p) : "memory");
	return v;
}

static volatile int pp_handled;
static struct pp_violation pp_seen;

__attribute__((noreturn, used)) static void pp_handler(struct pp_violation *v, unsigned long size)
{
	memcpy(&pp_seen, v, sizeof pp_seen);
	pp_handled++;
	printf("cloakprobe: pp: handler size=%u/%lu access=%u addr=0x%lx gpa=0x%lx rip=0x%lx id=%lu action=%u flags=0x%x\n",
	       v->size, size, v->access, v->addr, v->gpa, v->rip, v->range_id, v->action, v->flags);
	cloak_call(PP_UPCALL_RETURN, PP_RET_RESUME, 0, 0);
	printf("cloakprobe: pp: FAIL PP_UPCALL_RETURN returned\n");
	sys_exit_group(99);
}

/* pp_record_ok checks the last record the handler saw. */
static int pp_record_ok(int access, void *addr, void *rip, long id)
{
	return pp_seen.size == sizeof pp_seen && pp_seen.version == 1 && pp_seen.access == access &&
	       pp_seen.addr == (u64)addr && pp_seen.gpa == 0 && pp_seen.rip == (u64)rip && (long)pp_seen.range_id == id &&
	       pp_seen.action == PP_ACT_UPCALL && pp_seen.flags == 0;
}

static int pp(void)
{
	long caps = cloak_call(PP_VERSION_CAPS, 0, 0, 0);
	printf("cloakprobe: pp: caps deny=0x%x actions=0x%x flags=0x%x\n", PP_CAPS_DENY(caps), PP_CAPS_ACTIONS(caps),
	       PP_CAPS_FLAGS(caps));
	for (unsigned i = 0; i < sizeof pp_stack; i += 4096)
		pp_stack[i] = 0;
	for (int i = 0; i < 4; i++)
		pp_pages[i][0] = (u8)(i + 1);
	long r = cloak_call(PP_SET_HANDLER, (long)pp_handler, (long)(pp_stack + sizeof pp_stack), sizeof pp_stack);
	/* Page 0: read-only, locked, upcall. */
	long id = pp_protect(pp_pages[0], PP_DENY_WRITE, PP_ACT_UPCALL, PP_F_LOCK);
	long q = cloak_call(PP_QUERY, (long)pp_pages[0], 0, 0);
	printf("cloakprobe: pp: set-handler=%ld protect=%ld query deny=%u locked=%d action=%u owner=%u\n", r, id,
	       PP_Q_DENY(q), (q & PP_Q_LOCKED) != 0, PP_Q_ACTION(q), PP_Q_OWNER(q));
	volatile u64 *w = (volatile u64 *)(pp_pages[0] + 8);
	pp_store(w, 0xc0ffee);
	int ok = pp_handled == 1 && pp_record_ok(PP_DENY_WRITE, (void *)w, pp_store_at, id) && *w == 0;
	printf("cloakprobe: pp: write handled=%d value=0x%lx record %s\n", pp_handled, *w, ok ? "ok" : "FAIL");
	/* The lock holds against the app itself. */
	long unprot = pp_protect(pp_pages[0], 0, 0, 0);
	long relax = pp_protect(pp_pages[0], PP_DENY_WRITE, PP_ACT_LOG, PP_F_LOCK);
	long rehandle = cloak_call(PP_SET_HANDLER, (long)pp, (long)(pp_stack + sizeof pp_stack), sizeof pp_stack);
	long unhandle = cloak_call(PP_SET_HANDLER, 0, 0, 0);
	long stray = cloak_call(PP_UPCALL_RETURN, PP_RET_RESUME, 0, 0);
	pp_store(w, 0xc0ffee);
	printf("cloakprobe: pp: lock unprotect=%ld relax=%ld set-handler=%ld unregister=%ld stray-return=%ld "
	       "second-write handled=%d value=0x%lx\n",
	       unprot, relax, rehandle, unhandle, stray, pp_handled, *w);
	/* Page 1: no access at all; a load is reported before it retires. */
	volatile u64 *rd = (volatile u64 *)(pp_pages[1] + 16);
	*rd = 0x1234;
	long id1 = pp_protect(pp_pages[1], PP_DENY_READ | PP_DENY_WRITE | PP_DENY_EXEC, PP_ACT_UPCALL, 0);
	u64 got = pp_load(rd);
	ok = pp_handled == 3 && pp_record_ok(PP_DENY_READ, (void *)rd, pp_load_at, id1) && got == 0x5e5e;
	long unprot1 = pp_protect(pp_pages[1], 0, 0, 0);
	u64 again = pp_load(rd);
	printf("cloakprobe: pp: read handled=%d got=0x%lx record %s unprotect=%ld then=0x%lx\n", pp_handled, got,
	       ok ? "ok" : "FAIL", unprot1, again);
	/* Page 2: skip discards stores; page 3: log lets them land. */
	volatile u64 *sk = (volatile u64 *)pp_pages[2], *lg = (volatile u64 *)pp_pages[3];
	long s1 = pp_protect(pp_pages[2], PP_DENY_WRITE, PP_ACT_SKIP, 0);
	pp_store(sk, 7);
	long s2 = pp_protect(pp_pages[3], PP_DENY_WRITE, PP_ACT_LOG, 0);
	pp_store(lg, 8);
	pp_store(lg + 1, 9);
	printf("cloakprobe: pp: skip=%ld value=0x%lx log=%ld values=0x%lx,0x%lx handled=%d\n", s1 > 0, *sk, s2 > 0,
	       lg[0], lg[1], pp_handled);
	/* Refused: a page that is not cloaked, deny-read alone. */
	long notcloaked = pp_protect((void *)0x7fe000000000UL, PP_DENY_WRITE, PP_ACT_KILL, 0);
	long readonly = pp_protect(pp_pages[2], PP_DENY_READ, PP_ACT_KILL, 0);
	printf("cloakprobe: pp: refused not-cloaked=%ld deny-read-alone=%ld\n", notcloaked, readonly);
	return 0;
}

/* ppexec_fn returns 42, alone in a page of the image's text: a page of int3
 * on either side (no alignment, which would move the text segment), so denying
 * the execution of its page stops nothing else. Cloaked code runs only its
 * measured code: code copied into anonymous memory would not run at all. */
extern int ppexec_fn(void);
__asm__(".pushsection .text.ppexec, \"ax\"\n"
	".fill 4096, 1, 0xcc\n"
	".globl ppexec_fn\n"
	"ppexec_fn: mov $42, %eax\n"
	"ret\n"
	".fill 4096, 1, 0xcc\n"
	".popsection");

static int ppexec(void)
{
	int (*volatile f)(void) = ppexec_fn;
	int first = f();
	long prot = pp_protect((void *)((u64)ppexec_fn & ~4095UL), PP_DENY_EXEC, PP_ACT_KILL, 0);
	printf("cloakprobe: ppexec: first=%d protect=%ld\n", first, prot);
	printf("cloakprobe: ppexec: FAIL survived=%d\n", f());
	return 1;
}

int main(int argc, char **argv)
{
	const char *mode = argc > 1 ? argv[1] : "";
	int cloak = argc > 2 && !strcmp(argv[argc - 1], "cloak");
	if (!strcmp(mode, "refusals")) {
		const char *names[] = {"overlap", "kernel-half", "trampoline-in-region", "magic", "unreadable-image",
				       "trampoline-writable"};
		for (int i = 0; i < 6; i++)
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
		/* Not cloak_init again: its mprotect is not a call the monitor forwards
		 * for a cloaked app. Any request is refused before it is read. */
		printf("cloakprobe: twice=%ld\n", raw_register(-1));
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
	} else if (!strcmp(mode, "pp")) {
		return pp();
	} else if (!strcmp(mode, "ppexec")) {
		return ppexec();
	}
	return 0;
}
