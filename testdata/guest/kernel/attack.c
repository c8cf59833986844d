/*
 * Adversarial modes: what a compromised kernel does to a process it does
 * not own (attack=NAME victim=APP on the command line). Every mode works
 * on any process through the kernel's own mappings; against a cloaked
 * process the monitor is supposed to make each one fail or be detected.
 *
 * The victim's "data pages" are the first two pages of its lowest writable
 * image segment. Attacks fire at the victim's sched_yield calls: replay
 * saves page 0 at the first and restores it at the second; read, tamper,
 * remap and forge act at the second; regs prints at every syscall and
 * interrupt. Output lines start with "attack NAME: victim=APP".
 */
#include "kernel.h"
#include "pageprot.h"

extern u64 kernel_pml4;

static int deputy_mode(void);
static void deputy_redirect(struct proc *p);
static void deputy_on_tick(struct proc *p, struct trapframe *tf);

static u8 replay_copy[PAGE_SIZE];

static int is_victim(struct proc *p)
{
	return cfg.attack[0] && !strcmp(p->name, cfg.victim);
}

static u64 data_page(struct proc *p, int idx)
{
	u64 best = 0;
	for (int i = 0; i < p->nvma; i++) {
		struct vma *v = &p->vmas[i];
		if (v->kind == VMA_IMAGE && (v->prot & 2) && (!best || v->start < best) &&
		    v->start + (u64)(idx + 1) * PAGE_SIZE <= v->end)
			best = v->start;
	}
	return best ? best + (u64)idx * PAGE_SIZE : 0;
}

static void hex(char *out, const u8 *b, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		out[2 * i] = "0123456789abcdef"[b[i] >> 4];
		out[2 * i + 1] = "0123456789abcdef"[b[i] & 15];
	}
	out[2 * n] = 0;
}

/* attack_read prints every run of at least 8 printable bytes found in the
 * victim's writable pages, as hex (at most 64 bytes per run). */
static void attack_read(struct proc *p)
{
	char line[160];
	static u64 vas[MAX_RESIDENT]; /* too big for a kernel stack */
	int n = p->nresident;
	memcpy(vas, p->resident, (size_t)n * sizeof vas[0]);
	for (int i = 0; i < n; i++) {
		struct vma *v = vma_find(p, vas[i]);
		u64 pa;
		if (!v || !(v->prot & 2) || user_page_ensure(p, vas[i], 0, &pa))
			continue;
		const u8 *pg = P2V(pa);
		for (size_t off = 0; off < PAGE_SIZE;) {
			size_t e = off;
			while (e < PAGE_SIZE && pg[e] >= 0x20 && pg[e] < 0x7f)
				e++;
			if (e - off >= 8) {
				size_t l = e - off > 64 ? 64 : e - off;
				hex(line, pg + off, l);
				kprintf("attack read: victim=%s va=0x%lx hex=%s\n", p->name, vas[i] + off, line);
			}
			off = e + 1;
		}
	}
}

static void attack_tamper(struct proc *p)
{
	u64 va = data_page(p, 0), pa;
	char o[40], n[40];
	if (!va || user_page_ensure(p, va, 1, &pa)) {
		kprintf("attack tamper: victim=%s no data page\n", p->name);
		return;
	}
	u8 *pg = P2V(pa), before[16];
	memcpy(before, pg, 16);
	for (int i = 0, k = 0; i < 16 && k < 8; i++)
		if (pg[i]) {
			pg[i] ^= 1;
			k++;
		}
	hex(o, before, 16);
	hex(n, pg, 16);
	kprintf("attack tamper: victim=%s va=0x%lx old=%s new=%s\n", p->name, va, o, n);
}

static void attack_remap(struct proc *p)
{
	u64 va0 = data_page(p, 0), va1 = data_page(p, 1), pa0, pa1;
	if (!va0 || !va1 || user_page_ensure(p, va0, 0, &pa0) || user_page_ensure(p, va1, 0, &pa1)) {
		kprintf("attack remap: victim=%s needs two data pages\n", p->name);
		return;
	}
	u64 *e0 = pte_lookup(p, va0, 0), *e1 = pte_lookup(p, va1, 0);
	u64 t = *e0;
	*e0 = (*e0 & ~PTE_ADDR) | (*e1 & PTE_ADDR);
	*e1 = (*e1 & ~PTE_ADDR) | (t & PTE_ADDR);
	invlpg(va0);
	invlpg(va1);
	kprintf("attack remap: victim=%s va0=0x%lx va1=0x%lx pa0=0x%lx pa1=0x%lx swapped\n", p->name, va0, va1,
		pa0 & PTE_ADDR, pa1 & PTE_ADDR);
}

static void attack_replay(struct proc *p, int phase)
{
	u64 va = data_page(p, 0), pa;
	char h[40];
	if (!va || user_page_ensure(p, va, 1, &pa)) {
		kprintf("attack replay: victim=%s no data page\n", p->name);
		return;
	}
	u8 *pg = P2V(pa);
	if (phase == 1) {
		memcpy(replay_copy, pg, PAGE_SIZE);
		hex(h, pg, 16);
		kprintf("attack replay: victim=%s va=0x%lx saved=%s\n", p->name, va, h);
	} else {
		hex(h, pg, 16);
		memcpy(pg, replay_copy, PAGE_SIZE);
		char o[40];
		hex(o, pg, 16);
		kprintf("attack replay: victim=%s va=0x%lx current=%s restored=%s\n", p->name, va, h, o);
	}
}

/* attack_forge issues the monitor's hypercalls in the victim's context
 * (its address space loaded), as if the victim had made them. */
static void attack_forge(struct proc *p)
{
	u64 va = data_page(p, 0), pa;
	if (!va || user_page_ensure(p, va, 0, &pa)) {
		kprintf("attack forge: victim=%s no data page\n", p->name);
		return;
	}
	attack_forge_blind(p, va, pa);
	size_t len = 0;
	const char *s = P2V(pa);
	while (len < 64 && s[len] >= 0x20 && s[len] < 0x7f)
		len++;
	long ver = hypercall(HC_VERSION, 0, 0);
	kprintf("attack forge: victim=%s call=VERSION ret=0x%lx\n", p->name, ver);
	kprintf("attack forge: victim=%s call=CONSOLE_WRITE va=0x%lx len=%lu data=", p->name, va, len);
	long r = hypercall(HC_CONSOLE_WRITE, va, len);
	kprintf("\nattack forge: victim=%s call=CONSOLE_WRITE ret=%ld\n", p->name, r);
}

/*
 * attack=ptwalk (victim cloaksecret): at the second yield the kernel points the
 * page directory entry of the victim's stack at the frame of its data page 0,
 * which holds the victim's plaintext while the kernel leaves it alone. Whoever
 * walks the victim's stack through the guest's tables next reads that
 * plaintext as page-table entries. The entry is put back at the victim's exit.
 */
static u64 *ptwalk_pde, ptwalk_saved;

static void attack_ptwalk(struct proc *p)
{
	u64 va = data_page(p, 0), pa;
	u64 *pte = va ? pte_lookup(p, va, 0) : NULL;
	if (!pte || !(*pte & PTE_P)) {
		kprintf("attack ptwalk: victim=%s no data page\n", p->name);
		return;
	}
	pa = *pte & PTE_ADDR; /* from the table: the frame itself is not touched */
	u64 sva = USER_STACK_TOP - PAGE_SIZE, table = p->pml4;
	u64 *e = NULL;
	for (int level = 3; level >= 2; level--) {
		e = (u64 *)P2V(table) + ((sva >> (12 + 9 * level)) & 511);
		if (!(*e & PTE_P)) {
			kprintf("attack ptwalk: victim=%s no stack tables\n", p->name);
			return;
		}
		table = *e & PTE_ADDR;
	}
	e = (u64 *)P2V(table) + ((sva >> 21) & 511);
	ptwalk_pde = e;
	ptwalk_saved = *e;
	*e = pa | PTE_P | PTE_W | PTE_U;
	write_cr3(read_cr3());
	kprintf("attack ptwalk: victim=%s stack=0x%lx table=0x%lx (data page 0x%lx)\n", p->name, sva, pa, va);
}

/*
 * ptwalk_on_fault: a fault of the victim under the planted stack table. The
 * walk that faulted read the victim's data frame as page-table entries; the
 * kernel reads the same entries through its own walk of the planted table
 * and prints the first 32 bytes of that "table" (for an uncloaked victim, its
 * plaintext) and the entry the faulting address selected. Then it puts the
 * entry back, so the fault is retried through the real table and the victim
 * runs on. A cloaked victim never gets here: the monitor refuses the walk.
 */
static void ptwalk_on_fault(struct proc *p, struct trapframe *tf)
{
	u64 va = read_cr2();
	if (!ptwalk_pde || tf->vector != 14 || (va >> 21) != ((USER_STACK_TOP - PAGE_SIZE) >> 21))
		return;
	const u64 *table = (const u64 *)P2V(*ptwalk_pde & PTE_ADDR);
	char h[65];
	hex(h, (const u8 *)table, 32);
	kprintf("attack ptwalk: victim=%s fault=0x%lx err=0x%lx entry=0x%lx entries=%s\n", p->name, va, tf->err,
		table[(va >> 12) & 511], h);
	*ptwalk_pde = ptwalk_saved;
	ptwalk_pde = NULL;
	write_cr3(read_cr3());
}

/*
 * ppother: the redirect needs the owner's page protected first and the owner
 * still alive. The owner yields only after protecting it. Whichever of the two
 * reaches its first yield first is held asleep until the other's first yield,
 * which does the redirect and wakes it: the order of the two processes on a
 * loaded host does not decide the outcome.
 */
static struct proc *ppother_held;

static struct proc *ppother_owner(void)
{
	for (int i = 0; i < MAX_PROCS; i++)
		if ((procs[i].state == P_RUNNABLE || procs[i].state == P_SLEEPING) && !strcmp(procs[i].name, "pp"))
			return &procs[i];
	return NULL;
}

static void ppother_hold(struct proc *p)
{
	ppother_held = p;
	p->wake_ns = ~0UL / 2;
	p->state = P_SLEEPING;
}

static void ppother_release(void)
{
	ppother_held->state = P_RUNNABLE;
	ppother_held->tf->rax = 0;
	ppother_held = NULL;
}

static void ppother_on_yield(struct proc *p)
{
	struct proc *owner = ppother_owner();
	if (p->yields != 1)
		return;
	if (is_victim(p)) {
		if (owner && !owner->yields) {
			ppother_hold(p);
			return;
		}
		deputy_redirect(p);
		if (ppother_held == owner && owner)
			ppother_release();
	} else if (p == owner) {
		if (ppother_held) {
			deputy_redirect(ppother_held);
			ppother_release();
			return;
		}
		ppother_hold(p); /* until the victim's first yield */
	}
}

/* attack_vblkring points vda's used ring at the victim's data page 0 (first
 * yield) and makes a request (second yield): vblk_hostile.c. */
static void attack_vblkring(struct proc *p, int step)
{
	u64 va = data_page(p, 0), pa;
	if (!va || user_page_ensure(p, va, 0, &pa)) {
		kprintf("attack vblkring: victim=%s no data page\n", p->name);
		return;
	}
	if (step == 1)
		(void)*(volatile u8 *)P2V(pa); /* the kernel's read: a cloaked page is ciphertext now */
	vblk_ring_attack(step, pa, p->name);
}

void attack_on_yield(struct proc *p)
{
	if (!strcmp(cfg.attack, "ppother")) {
		ppother_on_yield(p);
		return;
	}
	if (!is_victim(p))
		return;
	if (!strcmp(cfg.attack, "replay") && (p->yields == 1 || p->yields == 2)) {
		attack_replay(p, (int)p->yields);
		return;
	}
	if (!strcmp(cfg.attack, "vblkring") && (p->yields == 1 || p->yields == 2)) {
		attack_vblkring(p, (int)p->yields);
		return;
	}
	if (p->yields == 1 && deputy_mode() && strcmp(cfg.attack, "pptick")) {
		deputy_redirect(p);
		return;
	}
	if (p->yields != 2)
		return;
	if (pp_attack(p))
		return;
	if (!strcmp(cfg.attack, "ptwalk")) {
		attack_ptwalk(p);
		return;
	}
	if (!strcmp(cfg.attack, "read"))
		attack_read(p);
	else if (!strcmp(cfg.attack, "tamper"))
		attack_tamper(p);
	else if (!strcmp(cfg.attack, "remap"))
		attack_remap(p);
	else if (!strcmp(cfg.attack, "forge"))
		attack_forge(p);
}

void attack_on_trap(struct proc *p, struct trapframe *tf)
{
	deputy_on_tick(p, tf);
	if (is_victim(p) && !strcmp(cfg.attack, "ptwalk"))
		ptwalk_on_fault(p, tf);
	if (!is_victim(p) || strcmp(cfg.attack, "regs"))
		return;
	const char *ev = tf->vector == VEC_SYSCALL ? "syscall" : tf->vector == VEC_TIMER ? "timer" : "exception";
	kprintf("attack regs: victim=%s event=%s vec=0x%lx rip=0x%lx rsp=0x%lx rflags=0x%lx rax=0x%lx rbx=0x%lx "
		"rcx=0x%lx rdx=0x%lx rsi=0x%lx rdi=0x%lx rbp=0x%lx r8=0x%lx r9=0x%lx r10=0x%lx r11=0x%lx "
		"r12=0x%lx r13=0x%lx r14=0x%lx r15=0x%lx\n",
		p->name, ev, tf->vector, tf->rip, tf->rsp, tf->rflags, tf->rax, tf->rbx, tf->rcx, tf->rdx, tf->rsi,
		tf->rdi, tf->rbp, tf->r8, tf->r9, tf->r10, tf->r11, tf->r12, tf->r13, tf->r14, tf->r15);
}

/*
 * The monitor as the kernel's deputy (attack=ppbounce, ppzero, ppstore,
 * brklie; victim cloakvictim). The kernel cannot write its own locked
 * rodata, so it points a page of the victim at the locked frame of canary
 * and waits for someone else to write it: the monitor's bounce copy of the
 * victim's write() (ppbounce: the page of the victim's first write buffer),
 * the monitor's zero fill of the victim's first heap page (ppzero), or the
 * victim's own store in appVM to uncloaked memory (ppstore: the page of the
 * victim's first mmap). ppother points the bounce page at a frame another
 * process protects instead: data page 0 of the process named "pp" (pp:owner).
 * The redirect happens at the victim's first sched_yield, between syscalls;
 * at the victim's exit the kernel says how many bytes of the target frame
 * changed since the redirect and puts the victim's page back.
 * brklie answers the victim's second growing brk with its first break, a
 * lower one it did not ask for (an Iago lie; the kernel unmaps nothing).
 */
static const u8 canary[PAGE_SIZE] __attribute__((aligned(PAGE_SIZE))) = "umbra-locked-canary";
static struct {
	u64 write_va, mmap_va, va, saved, target;
	int grows;
} dep;
static u8 dep_before[PAGE_SIZE]; /* the target frame at the redirect */

static int deputy_mode(void)
{
	return !strcmp(cfg.attack, "ppbounce") || !strcmp(cfg.attack, "pptick") || !strcmp(cfg.attack, "ppzero") || !strcmp(cfg.attack, "ppstore") ||
	       !strcmp(cfg.attack, "ppother");
}

/* other_frame is the frame of data page 0 of the process named "pp" (pp:owner,
 * which protects that page), or 0. */
static u64 other_frame(struct proc *p)
{
	for (int i = 0; i < MAX_PROCS; i++) {
		struct proc *q = &procs[i];
		u64 va, pa;
		if (q == p || !q->pml4 || (q->state != P_RUNNABLE && q->state != P_SLEEPING) || strcmp(q->name, "pp"))
			continue;
		va = data_page(q, 0);
		if (va && !user_page_ensure(q, va, 0, &pa))
			return pa & PTE_ADDR;
	}
	return 0;
}

static void deputy_redirect(struct proc *p)
{
	u64 va = 0, target = KIMG2P(canary);
	int create = 0;
	if (!strcmp(cfg.attack, "ppother")) {
		va = dep.write_va;
		target = other_frame(p);
		if (!target) {
			kprintf("attack %s: victim=%s no other process's page\n", cfg.attack, p->name);
			return;
		}
	} else if (!strcmp(cfg.attack, "ppbounce") || !strcmp(cfg.attack, "pptick"))
		va = dep.write_va;
	else if (!strcmp(cfg.attack, "ppstore"))
		va = dep.mmap_va;
	else {
		va = PAGE_UP(p->brk);
		create = 1;
	}
	u64 *e = va ? pte_lookup(p, va & ~(PAGE_SIZE - 1), create) : NULL;
	if (!e) {
		kprintf("attack %s: victim=%s no page to redirect\n", cfg.attack, p->name);
		return;
	}
	dep.va = va & ~(PAGE_SIZE - 1);
	dep.saved = *e;
	dep.target = target;
	memcpy(dep_before, P2V(target), PAGE_SIZE);
	u64 flags = *e & PTE_P ? *e & ~PTE_ADDR : PTE_P | PTE_W | PTE_U | PTE_NX;
	*e = flags | target;
	invlpg(dep.va);
	kprintf("attack %s: victim=%s va=0x%lx frame=0x%lx redirected\n", cfg.attack, p->name, dep.va, target);
}

/*
 * attack=plant (victim cloakvictim): before the victim registers, the kernel
 * plants code of its own in the victim's trampoline page (the mapping the
 * victim makes read+execute with mprotect) and points the return address of
 * the function making the next mmap (cloak_init, through its frame pointer:
 * the libc's sys_mmap has no frame) at it. The page is not writable for the
 * victim (W^X), so the kernel writes the frame through its direct map. The
 * planted code prints a line and exits with 42; run as the cloaked app it
 * would see the app's plaintext.
 */
extern const u8 plant_start[], plant_end[];
__asm__(".pushsection .rodata.plant, \"a\"\n"
	"plant_start:\n"
	"lea plant_msg(%rip), %rsi\n"
	"mov $1, %edi\n"
	"mov $(plant_end - plant_msg), %edx\n"
	"mov $1, %eax\n"
	"syscall\n"
	"mov $42, %edi\n"
	"mov $231, %eax\n"
	"syscall\n"
	"plant_msg: .ascii \"attack plant: PLANTED code ran in the app\\n\"\n"
	"plant_end:\n"
	".popsection");
#define PLANT_OFF 0x800

static void attack_plant(struct proc *p, struct trapframe *tf)
{
	u64 slot = tf->rbp + 8, code = dep.mmap_va + PLANT_OFF, pa_code, pa_slot;
	if (user_page_ensure(p, code, 0, &pa_code) || user_page_ensure(p, slot, 1, &pa_slot)) {
		kprintf("attack plant: victim=%s no trampoline or stack page\n", p->name);
		return;
	}
	memcpy(P2V(pa_code), plant_start, (size_t)(plant_end - plant_start));
	u64 *ret = P2V(pa_slot);
	u64 old = *ret;
	*ret = code;
	kprintf("attack plant: victim=%s code=0x%lx slot=0x%lx ret=0x%lx planted\n", p->name, code, slot, old);
}

/* pptick: ppbounce's redirect, at the first timer tick that preempts the victim
 * after its first write (not at one of its system calls). */
static void deputy_on_tick(struct proc *p, struct trapframe *tf)
{
	if (is_victim(p) && !strcmp(cfg.attack, "pptick") && tf->vector == VEC_TIMER && dep.write_va && !dep.va &&
	    !p->yields)
		deputy_redirect(p);
}

void attack_on_syscall(struct proc *p, struct trapframe *tf)
{
	if (!is_victim(p))
		return;
	if (deputy_mode() && tf->rax == 1 && !dep.write_va)
		dep.write_va = tf->rsi;
	if (!strcmp(cfg.attack, "plant") && tf->rax == 10 && (tf->rdx & 4) && !dep.mmap_va)
		dep.mmap_va = tf->rdi; /* the trampoline page, made executable */
	else if (!strcmp(cfg.attack, "plant") && tf->rax == 9 && dep.mmap_va && dep.grows == 0) {
		dep.grows = 1;
		attack_plant(p, tf);
	}
}

long attack_on_result(struct proc *p, u64 nr, u64 a1, long r)
{
	if (!is_victim(p))
		return r;
	if (nr == 9 && !dep.mmap_va && r > 0 && deputy_mode())
		dep.mmap_va = (u64)r;
	if (nr == 9 && !strcmp(cfg.attack, "mmaplie") && r > 0 && ++dep.grows <= 4) {
		/* The third mapping is the bounce area (cloaked) or its stand-in: hand it
		 * out again as the fourth, fresh one. */
		if (dep.grows == 3)
			dep.mmap_va = (u64)r;
		else if (dep.grows == 4) {
			kprintf("attack mmaplie: victim=%s mapped=0x%lx returned=0x%lx\n", p->name, (u64)r, dep.mmap_va);
			return (long)dep.mmap_va;
		}
	}
	if (nr == 12 && !strcmp(cfg.attack, "brklie") && a1 && (u64)r == a1 && a1 > p->brk_start && ++dep.grows == 2) {
		kprintf("attack brklie: victim=%s asked=0x%lx returned=0x%lx\n", p->name, a1, p->brk_start);
		return (long)p->brk_start;
	}
	return r;
}

void attack_on_exit(struct proc *p)
{
	if (ppother_held && p != ppother_held && (is_victim(p) || !strcmp(p->name, "pp")))
		ppother_release(); /* the other one ended before its first yield */
	if (is_victim(p) && ptwalk_pde) {
		*ptwalk_pde = ptwalk_saved;
		ptwalk_pde = NULL;
	}
	if (!is_victim(p) || !deputy_mode() || !dep.va)
		return;
	int changed = 0;
	const u8 *now = P2V(dep.target);
	for (size_t i = 0; i < PAGE_SIZE; i++)
		changed += now[i] != dep_before[i];
	u64 *e = pte_lookup(p, dep.va, 0);
	if (e) {
		*e = dep.saved; /* never free the kernel's frame with the victim's pages */
		invlpg(dep.va);
	}
	kprintf("attack %s: victim=%s frame changed=%d\n", cfg.attack, p->name, changed);
	dep.va = 0;
}
