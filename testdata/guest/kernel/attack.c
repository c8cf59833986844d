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

void attack_on_yield(struct proc *p)
{
	if (!is_victim(p))
		return;
	if (!strcmp(cfg.attack, "replay") && (p->yields == 1 || p->yields == 2)) {
		attack_replay(p, (int)p->yields);
		return;
	}
	if (p->yields != 2)
		return;
	if (pp_attack(p))
		return;
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
	if (!is_victim(p) || strcmp(cfg.attack, "regs"))
		return;
	const char *ev = tf->vector == VEC_SYSCALL ? "syscall" : tf->vector == VEC_TIMER ? "timer" : "exception";
	kprintf("attack regs: victim=%s event=%s vec=0x%lx rip=0x%lx rsp=0x%lx rflags=0x%lx rax=0x%lx rbx=0x%lx "
		"rcx=0x%lx rdx=0x%lx rsi=0x%lx rdi=0x%lx rbp=0x%lx r8=0x%lx r9=0x%lx r10=0x%lx r11=0x%lx "
		"r12=0x%lx r13=0x%lx r14=0x%lx r15=0x%lx\n",
		p->name, ev, tf->vector, tf->rip, tf->rsp, tf->rflags, tf->rax, tf->rbx, tf->rcx, tf->rdx, tf->rsi,
		tf->rdi, tf->rbp, tf->r8, tf->r9, tf->r10, tf->r11, tf->r12, tf->r13, tf->r14, tf->r15);
}
