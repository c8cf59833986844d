/*
 * Page protection (docs/pageprot.md) in the test guest kernel.
 *
 * After boot the kernel locks its text and read-only data (the boot stub
 * through the embedded apps) and its IDT against writes, with the action
 * pp=kill (default) or pp=skip; pp=off leaves them unlocked. Locked, they
 * stay so until the VM is reset: no guest call can lift the lock.
 *
 * attack=tamper target=kernel-text|idt is what a compromised kernel then
 * tries: lift the lock every way the ABI offers, then overwrite the locked
 * bytes through its own mapping and through the direct map.
 * attack=share maps the victim's data page 0 into every other process at
 * PP_SHARE_VA, so a process can try to change another's protection.
 */
#include "pageprot.h"

extern char _start[], krodata_end[];
extern u64 idt[512];

#define DOORBELL_KVA (DIRECT_MAP + 0xe0000000UL)

static int pp_action = PP_ACT_KILL;
static int pp_off;
static char pp_target[16];

long pp_hypercall(u64 nr, u64 a1, u64 a2, u64 a3)
{
	long ret;
	__asm__ volatile("movq (%1), %0"
			 : "=a"(ret)
			 : "r"(DOORBELL_KVA), "a"(nr), "D"(a1), "S"(a2), "d"(a3)
			 : "memory");
	return ret;
}

int pp_cmdline(const char *key, const char *v)
{
	if (!strcmp(key, "pp")) {
		if (!strcmp(v, "kill"))
			pp_action = PP_ACT_KILL;
		else if (!strcmp(v, "skip"))
			pp_action = PP_ACT_SKIP;
		else if (!strcmp(v, "off"))
			pp_off = 1;
		else
			return -1;
		return 1;
	}
	if (!strcmp(key, "target")) {
		if (strcmp(v, "kernel-text") && strcmp(v, "idt"))
			return -1;
		memcpy(pp_target, v, strlen(v) + 1);
		return 1;
	}
	return 0;
}

const char *pp_cmdline_error(void)
{
	if (pp_target[0] && strcmp(cfg.attack, "tamper"))
		return "target= needs attack=tamper, got attack=";
	return NULL;
}

/* One-entry batches for the calls below (in .bss: read and written by the
 * monitor through the kernel's own mapping). */
static struct {
	struct pp_batch_header h;
	struct pp_range r[2];
} batch;

static long pp_set(int n)
{
	batch.h.magic = PP_BATCH_MAGIC;
	batch.h.version = PP_VERSION_MAJOR;
	batch.h.flags = 0;
	batch.h.count = (uint32_t)n;
	batch.h.bad_index = PP_NO_INDEX;
	return pp_hypercall(PP_SET, (u64)&batch, sizeof batch.h + (u64)n * sizeof batch.r[0], 0);
}

static void range(int i, u64 addr, u64 pages, int deny, int action, int flags)
{
	batch.r[i] = (struct pp_range){.addr = addr, .pages = pages, .deny = (uint8_t)deny,
				       .action = (uint8_t)action, .flags = (uint16_t)flags};
}

void pp_lock_kernel(void)
{
	if (pp_off) {
		kprintf("kernel: pageprot: off, kernel memory not locked\n");
		return;
	}
	long caps = pp_hypercall(PP_VERSION_CAPS, 0, 0, 0);
	if (caps < 0 || PP_CAPS_MAJOR(caps) != PP_VERSION_MAJOR) {
		kprintf("kernel: pageprot: not available (caps %ld)\n", caps);
		return;
	}
	if (!(PP_CAPS_DENY(caps) & PP_DENY_WRITE) || !(PP_CAPS_ACTIONS(caps) & (1 << pp_action)) ||
	    !(PP_CAPS_FLAGS(caps) & PP_F_LOCK)) {
		kprintf("kernel: pageprot: deny-write with action %d and lock not enforceable (caps 0x%lx)\n",
			pp_action, caps);
		return;
	}
	/* The boot stub at physical 1 MiB, then text, rodata and the apps: one
	 * range in the kernel window; the IDT is alone in its page. */
	u64 start = KERNEL_BASE + (u64)_start, end = (u64)krodata_end;
	range(0, start, (end - start) / PAGE_SIZE, PP_DENY_WRITE, pp_action, PP_F_LOCK);
	range(1, (u64)idt, 1, PP_DENY_WRITE, pp_action, PP_F_LOCK);
	long id = pp_set(2);
	if (id < 0) {
		kprintf("kernel: pageprot: locking kernel memory refused: %ld (entry %d)\n", id, (int)batch.h.bad_index);
		return;
	}
	kprintf("kernel: pageprot: locked text+rodata 0x%lx-0x%lx (id %ld) and idt 0x%lx (id %ld): deny write, %s\n",
		start, end, id, (u64)idt, id + 1, pp_action == PP_ACT_KILL ? "kill" : "skip");
}

/* pp_lock_page locks the page at kernel address kva against writes (action
 * skip), as the kernel locks its text: vblk=hostile:lock-later locks a virtio
 * ring that way. It returns the protection id or -errno. */
long pp_lock_page(u64 kva)
{
	range(0, kva & PAGE_MASK, 1, PP_DENY_WRITE, PP_ACT_SKIP, PP_F_LOCK);
	return pp_set(1);
}

/* pp_text_canary is never called: attack=tamper target=kernel-text overwrites it. */
__attribute__((noinline, used, aligned(16))) void pp_text_canary(void)
{
	__asm__ volatile("nop; nop; nop; nop; nop; nop; nop; nop");
}

static void hex8(char *out, u64 v)
{
	snprintf(out, 20, "%016lx", v);
}

static void tamper_kernel(struct proc *p)
{
	/* kernel-text: the canary function; idt: gate 200 (never raised). */
	u64 va = !strcmp(pp_target, "idt") ? (u64)&idt[2 * 200] : (u64)pp_text_canary;
	u64 page = va & PAGE_MASK;
	long q = pp_hypercall(PP_QUERY, page, 0, 0);
	kprintf("attack tamper: victim=%s target=%s va=0x%lx query=0x%lx locked=%d\n", p->name, pp_target, va, q,
		q > 0 && (q & PP_Q_LOCKED) ? 1 : 0);
	/* Lift the lock every way the ABI offers. */
	range(0, page, 1, 0, 0, 0);
	long unprot = pp_set(1);
	range(0, page, 1, PP_DENY_WRITE, PP_ACT_LOG, PP_F_LOCK);
	long relax = pp_set(1);
	range(0, page, 1, PP_DENY_WRITE, pp_action, 0);
	long droplock = pp_set(1);
	range(0, (u64)P2V(KIMG2P(page)), 1, 0, 0, 0);
	long alias = pp_set(1);
	range(0, KIMG2P(page), 1, 0, 0, PP_F_PHYS);
	long phys = pp_set(1);
	kprintf("attack tamper: victim=%s target=%s unprotect=%ld relax=%ld droplock=%ld alias=%ld phys=%ld\n", p->name,
		pp_target, unprot, relax, droplock, alias, phys);
	/* Then overwrite: through the kernel window, then the direct map. */
	volatile u64 *w = (volatile u64 *)va, *d = P2V(KIMG2P(va));
	char o[20], n[20];
	u64 old = *w;
	*w = ~old;
	hex8(o, old);
	hex8(n, *w);
	kprintf("attack tamper: victim=%s target=%s via=kernel va=0x%lx old=%s new=%s\n", p->name, pp_target, va, o, n);
	old = *d;
	*d = ~old;
	hex8(o, old);
	hex8(n, *d);
	kprintf("attack tamper: victim=%s target=%s via=direct-map va=0x%lx old=%s new=%s\n", p->name, pp_target,
		(u64)d, o, n);
}

/*
 * attack=share: map the victim's data page 0 into every other process, once. When
 * several processes run the victim's program, the victim is the first one started
 * (the lowest pid still alive): which of them yields first is up to the scheduler.
 */
static void attack_share(struct proc *p)
{
	static int done;
	u64 va = 0, pa;
	if (done)
		return;
	for (int i = 0; i < MAX_PROCS; i++) {
		struct proc *q = &procs[i];
		if (q != p && q->pml4 && q->pid < p->pid && !strcmp(q->name, p->name) &&
		    (q->state == P_RUNNABLE || q->state == P_SLEEPING))
			return;
	}
	done = 1;
	for (int i = 0; i < p->nvma; i++) {
		struct vma *v = &p->vmas[i];
		if (v->kind == VMA_IMAGE && (v->prot & 2) && (!va || v->start < va))
			va = v->start;
	}
	if (!va || user_page_ensure(p, va, 0, &pa)) {
		kprintf("attack share: victim=%s no data page\n", p->name);
		return;
	}
	for (int i = 0; i < MAX_PROCS; i++) {
		struct proc *q = &procs[i];
		if (q == p || !q->pml4 || (q->state != P_RUNNABLE && q->state != P_SLEEPING))
			continue;
		int err = map_page(q, PP_SHARE_VA, pa & PTE_ADDR, PTE_U | PTE_W | PTE_NX | PTE_DEV);
		kprintf("attack share: victim=%s va=0x%lx pa=0x%lx mapped into pid=%d (%s) at 0x%lx err=%d\n", p->name, va,
			pa & PTE_ADDR, q->pid, q->name, PP_SHARE_VA, err);
	}
}

int pp_attack(struct proc *p)
{
	if (!strcmp(cfg.attack, "share")) {
		attack_share(p);
		return 1;
	}
	if (!strcmp(cfg.attack, "tamper") && pp_target[0]) {
		tamper_kernel(p);
		return 1;
	}
	return 0;
}
