/*
 * pp:MODE: a process that uses the monitor's page protection
 * (docs/pageprot.md) directly through the doorbell.
 *
 *   upcall    protect data page 0 read-only and locked, with an upcall handler;
 *             write it; the handler checks the violation record; then try to
 *             lift the lock and replace the handler (both must fail)
 *   refuse    requests the monitor must refuse: a kernel page, a physical
 *             address, deny-exec, a malformed batch (nothing may change), the
 *             doorbell page, an unmapped page
 *   skip|log|inject-pf|inject-gp|kill
 *             protect data page 0 read-only with that action, then write it
 *   read      deny reads of data page 0: a skipped load reads zeros, an upcall
 *             reports the load (not yet retired), then inject-gp faults at it
 *   owner[:open]
 *             protect data page 0 read-only (open: leave it unprotected, the
 *             defence absent), then yield for a while
 *   intruder  wait for attack=share to map another process's data page 0 at
 *             PP_SHARE_VA, then try to change its protection and write it
 *
 * Output lines start with "pp: ".
 */
#include "libc.h"
#include "../../../docs/pageprot_abi.h"

#define PP_SHARE_VA 0x7fe000000000UL /* kernel/pageprot.h */

/* Data page 0: the first page of the data segment (user.ld). */
static u8 page[4096] __attribute__((section(".data.victim"), aligned(4096))) = {1};
static u8 hstack[8192] __attribute__((aligned(4096)));

static long pp_hc(long nr, long a1, long a2, long a3)
{
	long ret;
	__asm__ volatile("movq (%1), %0"
			 : "=a"(ret)
			 : "r"(USER_DOORBELL_VA), "a"(nr), "D"(a1), "S"(a2), "d"(a3)
			 : "memory");
	return ret;
}

static struct {
	struct pp_batch_header h;
	struct pp_range r[2];
} batch;

static void range(int i, u64 addr, u64 pages, int deny, int action, int flags)
{
	batch.r[i] = (struct pp_range){.addr = addr, .pages = pages, .deny = (unsigned char)deny,
				       .action = (unsigned char)action, .flags = (unsigned short)flags};
}

static long pp_set(int n)
{
	batch.h.magic = PP_BATCH_MAGIC;
	batch.h.version = PP_VERSION_MAJOR;
	batch.h.flags = 0;
	batch.h.count = (unsigned)n;
	batch.h.bad_index = PP_NO_INDEX;
	return pp_hc(PP_SET, (long)&batch, (long)(sizeof batch.h + (unsigned long)n * sizeof batch.r[0]), 0);
}

static long protect(u64 addr, int deny, int action, int flags)
{
	range(0, addr, 1, deny, action, flags);
	return pp_set(1);
}

/* store writes v at p; pp_store_next is the address of the next instruction,
 * which a write violation reports (PP_VF_RIP_NEXT). */
extern char pp_store_next[];
static __attribute__((noinline)) void store(volatile u64 *p, u64 v)
{
	__asm__ volatile("movq %1, (%0)\n\t.globl pp_store_next\npp_store_next:" ::"r"(p), "r"(v) : "memory");
}

/* load reads *p; pp_load_at is the address of the load instruction, which a
 * read violation reports (the load has not retired). */
extern char pp_load_at[];
static __attribute__((noinline)) u64 load(volatile u64 *p)
{
	u64 v;
	__asm__ volatile(".globl pp_load_at\npp_load_at: movq (%1), %0" : "=r"(v) : "r"(p) : "memory");
	return v;
}

static volatile int handled;
static struct pp_violation seen;

/* The upcall handler: entered with rdi = record, rsi = its size and rsp at a
 * zero return slot, as after a call; it never returns, it resumes the
 * interrupted code with PP_UPCALL_RETURN. */
__attribute__((noreturn, used)) static void handler(struct pp_violation *v, unsigned long size)
{
	memcpy(&seen, v, sizeof seen);
	handled++;
	printf("pp: handler: size=%u/%lu version=%u access=%u addr=0x%lx gpa=0x%lx rip=0x%lx id=%lu action=%u "
	       "bytes=%u flags=0x%x value=0x%lx\n",
	       v->size, size, v->version, v->access, v->addr, v->gpa, v->rip, v->range_id, v->action, v->size_bytes,
	       v->flags, v->value);
	pp_hc(PP_UPCALL_RETURN, PP_RET_RESUME, 0, 0);
	printf("pp: FAIL PP_UPCALL_RETURN returned\n");
	sys_exit_group(99);
}

static void touch(void)
{
	volatile u8 *h = hstack;
	for (unsigned long i = 0; i < sizeof hstack; i += 4096)
		h[i] = 0;
	(void)*(volatile u8 *)page;
	(void)*(volatile u8 *)handler; /* fault the handler's text page in */
}

static int upcall(void)
{
	long caps = pp_hc(PP_VERSION_CAPS, 0, 0, 0);
	printf("pp: caps deny=0x%x actions=0x%x flags=0x%x version=%u.%u\n", PP_CAPS_DENY(caps), PP_CAPS_ACTIONS(caps),
	       PP_CAPS_FLAGS(caps), PP_CAPS_MAJOR(caps), PP_CAPS_MINOR(caps));
	touch();
	long r = pp_hc(PP_SET_HANDLER, (long)handler, (long)(hstack + sizeof hstack), sizeof hstack);
	printf("pp: set-handler=%ld\n", r);
	long id = protect((u64)page, PP_DENY_WRITE, PP_ACT_UPCALL, PP_F_LOCK);
	long q = pp_hc(PP_QUERY, (long)page, 0, 0);
	printf("pp: protect=%ld query deny=%u locked=%d action=%u owner=%u id=%u\n", id, PP_Q_DENY(q),
	       (q & PP_Q_LOCKED) != 0, PP_Q_ACTION(q), PP_Q_OWNER(q), PP_Q_ID(q));
	volatile u64 *target = (volatile u64 *)(page + 8);
	u64 before = *target, v = 0x5a5a0000c0ffeeUL;
	store(target, v);
	int ok = handled == 1 && seen.size == sizeof seen && seen.version == 1 && seen.access == PP_DENY_WRITE &&
		 seen.addr == (u64)target && seen.gpa == 0 && seen.rip == (u64)pp_store_next &&
		 (long)seen.range_id == id && seen.action == PP_ACT_UPCALL && seen.size_bytes == 8 &&
		 seen.flags == (PP_VF_VALUE | PP_VF_RIP_NEXT) && seen.value == v && *target == before;
	printf("pp: after upcall handled=%d page=0x%lx record %s\n", handled, *target, ok ? "ok" : "FAIL");
	/* The lock holds against the owner itself. */
	long unprot = protect((u64)page, 0, 0, 0);
	long relax = protect((u64)page, PP_DENY_WRITE, PP_ACT_LOG, PP_F_LOCK);
	long rehandle = pp_hc(PP_SET_HANDLER, (long)upcall, (long)(hstack + sizeof hstack), sizeof hstack);
	long unhandle = pp_hc(PP_SET_HANDLER, 0, 0, 0);
	long ret = pp_hc(PP_UPCALL_RETURN, PP_RET_RESUME, 0, 0);
	printf("pp: lock unprotect=%ld relax=%ld set-handler=%ld unregister=%ld stray-return=%ld\n", unprot, relax,
	       rehandle, unhandle, ret);
	/* A second write runs the handler again. */
	store(target, v + 1);
	printf("pp: second write handled=%d page=0x%lx\n", handled, *target);
	return ok ? 0 : 1;
}

static int refuse(void)
{
	touch();
	long kernel = protect(0xffffffff80100000UL, PP_DENY_WRITE, PP_ACT_SKIP, 0);
	long phys = protect(0x100000, PP_DENY_WRITE, PP_ACT_SKIP, PP_F_PHYS);
	long exec = protect((u64)page, PP_DENY_WRITE | PP_DENY_EXEC, PP_ACT_KILL, 0);
	range(0, (u64)page, 1, PP_DENY_WRITE, PP_ACT_SKIP, 0);
	range(1, (u64)hstack + 1, 1, PP_DENY_WRITE, PP_ACT_SKIP, 0); /* not page aligned */
	long malformed = pp_set(2);
	unsigned bad = batch.h.bad_index;
	long query = pp_hc(PP_QUERY, (long)page, 0, 0);
	long doorbell = protect(USER_DOORBELL_VA, PP_DENY_WRITE, PP_ACT_SKIP, 0);
	long unmapped = protect(0x300000000000UL, PP_DENY_WRITE, PP_ACT_SKIP, 0);
	long kquery = pp_hc(PP_QUERY, (long)0xffffffff80100000UL, 0, 0);
	printf("pp: refuse kernel-page=%ld phys=%ld deny-exec=%ld malformed=%ld bad_index=%u query-after=%ld "
	       "doorbell=%ld unmapped=%ld kernel-query=%ld\n",
	       kernel, phys, exec, malformed, bad, query, doorbell, unmapped, kquery);
	return 0;
}

static int action(const char *m)
{
	int a = !strcmp(m, "skip")        ? PP_ACT_SKIP
		: !strcmp(m, "log")       ? PP_ACT_LOG
		: !strcmp(m, "inject-pf") ? PP_ACT_INJECT_PF
		: !strcmp(m, "inject-gp") ? PP_ACT_INJECT_GP
					  : PP_ACT_KILL;
	touch();
	long id = protect((u64)page, PP_DENY_WRITE, a, 0);
	printf("pp: %s protect=%ld\n", m, id);
	store((volatile u64 *)(page + 16), 0x1234);
	printf("pp: after %s page=0x%lx\n", m, *(volatile u64 *)(page + 16));
	return 0;
}

static int readmode(void)
{
	touch();
	volatile u64 *target = (volatile u64 *)(page + 24);
	*target = 0x77;
	long r = pp_hc(PP_SET_HANDLER, (long)handler, (long)(hstack + sizeof hstack), sizeof hstack);
	long id = protect((u64)page, PP_DENY_READ, PP_ACT_SKIP, 0);
	u64 v = load(target);
	printf("pp: read set-handler=%ld protect=%ld skipped-load=0x%lx\n", r, id, v);
	id = protect((u64)page, PP_DENY_READ, PP_ACT_UPCALL, 0);
	v = load(target);
	int ok = handled == 1 && seen.access == PP_DENY_READ && seen.addr == (u64)target &&
		 seen.rip == (u64)pp_load_at && seen.flags == 0 && (long)seen.range_id == id;
	printf("pp: read upcall handled=%d record %s\n", handled, ok ? "ok" : "FAIL");
	/* Writes are no violation of a deny-read range: this one lands. */
	*target = 0x78;
	protect((u64)page, 0, 0, 0);
	printf("pp: read store-landed=%d\n", *target == 0x78);
	id = protect((u64)page, PP_DENY_READ, PP_ACT_INJECT_GP, 0);
	printf("pp: read inject-gp protect=%ld load-at=0x%lx\n", id, (u64)pp_load_at);
	v = load(target);
	printf("pp: FAIL read survived inject-gp (0x%lx)\n", v);
	return 1;
}

static int owner(int open)
{
	touch();
	*(volatile u64 *)page = 0x4f574e4552; /* "RENWO" */
	long id = open ? 0 : protect((u64)page, PP_DENY_WRITE, PP_ACT_SKIP, 0);
	printf("pp: owner protect=%ld page=0x%lx\n", id, (u64)page);
	for (int i = 0; i < 40; i++)
		sys_sched_yield();
	long q = pp_hc(PP_QUERY, (long)page, 0, 0);
	printf("pp: owner end page0=0x%lx query deny=%u owner=%u id=%u\n", *(volatile u64 *)page, PP_Q_DENY(q),
	       PP_Q_OWNER(q), PP_Q_ID(q));
	return 0;
}

static int intruder(void)
{
	long q = -1;
	for (int i = 0; i < 40 && q < 0; i++) {
		sys_sched_yield();
		q = pp_hc(PP_QUERY, (long)PP_SHARE_VA, 0, 0);
	}
	if (q < 0) {
		printf("pp: intruder no shared page (%ld)\n", q);
		return 1;
	}
	long unprot = protect(PP_SHARE_VA, 0, 0, 0);
	long prot = protect(PP_SHARE_VA, PP_DENY_WRITE | PP_DENY_READ, PP_ACT_KILL, PP_F_LOCK);
	long q2 = pp_hc(PP_QUERY, (long)PP_SHARE_VA, 0, 0);
	printf("pp: intruder query deny=%u owner=%u unprotect=%ld protect=%ld unchanged=%d\n", PP_Q_DENY(q),
	       PP_Q_OWNER(q), unprot, prot, q2 == q);
	/* A process's protection binds its own accesses only: this write is
	 * let through and audited as a foreign access. */
	*(volatile u64 *)PP_SHARE_VA = 0x5245445552544e49; /* "INTRUDER" */
	printf("pp: intruder wrote\n");
	return 0;
}

int main(int argc, char **argv)
{
	const char *m = argc > 1 ? argv[1] : "upcall";
	if (!strcmp(m, "upcall"))
		return upcall();
	if (!strcmp(m, "refuse"))
		return refuse();
	if (!strcmp(m, "owner"))
		return owner(argc > 2 && !strcmp(argv[2], "open"));
	if (!strcmp(m, "read"))
		return readmode();
	if (!strcmp(m, "intruder"))
		return intruder();
	if (!strcmp(m, "skip") || !strcmp(m, "log") || !strcmp(m, "inject-pf") || !strcmp(m, "inject-gp") ||
	    !strcmp(m, "kill"))
		return action(m);
	printf("pp: unknown mode %s\n", m);
	return 2;
}
