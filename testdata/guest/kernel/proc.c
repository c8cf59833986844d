/* Processes: ELF loading, address-space layout, scheduling and traps. */
#include "kernel.h"

struct proc procs[MAX_PROCS];
struct proc *current;
static u8 kstacks[MAX_PROCS][KSTACK_SIZE] __attribute__((aligned(16)));
static int next_pid = 1;
u64 ticks;
u64 kernel_pml4;   /* physical; kernel half only */
u64 doorbell_gpa;

#define IDLE (&procs[0])

struct elf_ehdr {
	u8 ident[16];
	u16 type, machine;
	u32 version;
	u64 entry, phoff, shoff;
	u32 flags;
	u16 ehsize, phentsize, phnum, shentsize, shnum, shstrndx;
};
struct elf_phdr {
	u32 type, flags;
	u64 offset, vaddr, paddr, filesz, memsz, align;
};

struct vma *vma_find(struct proc *p, u64 va)
{
	for (int i = 0; i < p->nvma; i++)
		if (p->vmas[i].kind != VMA_NONE && va >= p->vmas[i].start && va < p->vmas[i].end)
			return &p->vmas[i];
	return NULL;
}

int vma_add(struct proc *p, u64 start, u64 end, int kind, int prot)
{
	for (int i = 0; i < MAX_VMAS; i++) {
		if (i < p->nvma && p->vmas[i].kind != VMA_NONE)
			continue;
		p->vmas[i] = (struct vma){.start = start, .end = end, .kind = kind, .prot = prot};
		if (i >= p->nvma)
			p->nvma = i + 1;
		return i;
	}
	return -ENOMEM;
}

struct proc *proc_by_name(const char *name)
{
	for (int i = 1; i < MAX_PROCS; i++)
		if (procs[i].state != P_FREE && procs[i].state != P_ZOMBIE && !strcmp(procs[i].name, name))
			return &procs[i];
	return NULL;
}

static int load_elf(struct proc *p, const u8 *elf, size_t size, u64 *entry, u64 *image_end)
{
	const struct elf_ehdr *eh = (const void *)elf;
	if (size < sizeof *eh || memcmp(eh->ident, "\x7f" "ELF", 4) || eh->ident[4] != 2 ||
	    eh->ident[5] != 1 || eh->type != 2 || eh->machine != 62 ||
	    eh->phentsize != sizeof(struct elf_phdr) || eh->phoff > size ||
	    (u64)eh->phnum * sizeof(struct elf_phdr) > size - eh->phoff)
		return -EINVAL;
	u64 end = 0;
	for (int i = 0; i < eh->phnum; i++) {
		const struct elf_phdr *ph = (const void *)(elf + eh->phoff + (u64)i * sizeof *ph);
		if (ph->type != 1 || ph->memsz == 0)
			continue;
		if (ph->vaddr < USER_IMAGE_BASE || ph->memsz > (1UL << 30) ||
		    ph->vaddr > (1UL << 32) || ph->filesz > ph->memsz || ph->offset > size ||
		    ph->filesz > size - ph->offset || (ph->vaddr & 0xfff) != (ph->offset & 0xfff))
			return -EINVAL;
		int prot = ((ph->flags & 4) ? 1 : 0) | ((ph->flags & 2) ? 2 : 0) | ((ph->flags & 1) ? 4 : 0);
		u64 s = ph->vaddr & PAGE_MASK, e = PAGE_UP(ph->vaddr + ph->memsz);
		for (int j = 0; j < p->nvma; j++)
			if (s < p->vmas[j].end && p->vmas[j].start < e)
				return -EINVAL;
		int v = vma_add(p, s, e, VMA_IMAGE, prot);
		if (v < 0)
			return v;
		p->vmas[v].file_off = ph->offset;
		p->vmas[v].file_vaddr = ph->vaddr;
		p->vmas[v].file_size = ph->filesz;
		if (e > end)
			end = e;
	}
	if (!end || eh->entry < USER_IMAGE_BASE || eh->entry >= end)
		return -EINVAL;
	*entry = eh->entry;
	*image_end = end;
	return 0;
}

/* setup_stack writes argc, argv, an empty envp and auxv into the top stack
 * page, the strings above them, Linux-style. */
static int setup_stack(struct proc *p, char **argv, int argc, u64 *sp_out)
{
	u64 top = USER_STACK_TOP, page;
	if (vma_add(p, USER_STACK_TOP - USER_STACK_MAX, USER_STACK_TOP, VMA_STACK, 3) < 0)
		return -ENOMEM;
	if (user_page_ensure(p, top - PAGE_SIZE, 1, &page))
		return -ENOMEM;
	u8 *k = P2V(page & PAGE_MASK);
	u64 off = PAGE_SIZE, uptr[16];
	if (argc > 15)
		return -EINVAL;
	for (int i = argc - 1; i >= 0; i--) {
		size_t l = strlen(argv[i]) + 1;
		if (l > 1024 || off < l + 512)
			return -EINVAL;
		off -= l;
		memcpy(k + off, argv[i], l);
		uptr[i] = top - PAGE_SIZE + off;
	}
	off &= ~15UL;
	u64 words[20], n = 0;
	words[n++] = (u64)argc;
	for (int i = 0; i < argc; i++)
		words[n++] = uptr[i];
	words[n++] = 0; /* argv terminator */
	words[n++] = 0; /* envp terminator */
	words[n++] = 0; /* AT_NULL */
	words[n++] = 0;
	if (n & 1)
		words[n++] = 0;
	off -= n * 8;
	memcpy(k + off, words, n * 8);
	*sp_out = top - PAGE_SIZE + off;
	return 0;
}

int proc_spawn(const char *app_name, char **argv, int argc, int order)
{
	const struct app *a = app_find(app_name);
	if (!a)
		return -ENOENT;
	struct proc *p = NULL;
	for (int i = 1; i < MAX_PROCS; i++)
		if (procs[i].state == P_FREE) {
			p = &procs[i];
			break;
		}
	if (!p)
		return -ENOMEM;
	memset(p, 0, sizeof *p);
	p->pid = next_pid++;
	p->order = order;
	size_t nl = strlen(app_name);
	memcpy(p->name, app_name, nl < sizeof p->name ? nl : sizeof p->name - 1);
	p->elf = a->start;
	p->elf_size = (size_t)(a->end - a->start);
	p->pml4 = frame_alloc();
	if (!p->pml4)
		return -ENOMEM;
	u64 *dst = P2V(p->pml4), *src = P2V(kernel_pml4);
	dst[256] = src[256];
	dst[511] = src[511];
	u64 entry, end, sp;
	int err = load_elf(p, p->elf, p->elf_size, &entry, &end);
	if (!err)
		err = setup_stack(p, argv, argc, &sp);
	if (!err)
		err = map_page(p, USER_DOORBELL_VA, doorbell_gpa, PTE_U | PTE_NX | PTE_DEV | 0x10);
	if (err) {
		free_address_space(p);
		return err;
	}
	p->brk_start = p->brk = end;
	vma_add(p, end, end, VMA_HEAP, 3);
	p->mmap_next = USER_MMAP_BASE;
	fds_init(p);
	p->kstack_top = (u64)kstacks[p - procs] + KSTACK_SIZE;
	p->tf = (struct trapframe *)p->kstack_top - 1;
	memset(p->tf, 0, sizeof *p->tf);
	p->tf->rip = entry;
	p->tf->cs = USER_CS;
	p->tf->ss = USER_DS;
	p->tf->rflags = 0x202;
	p->tf->rsp = sp;
	p->state = P_RUNNABLE;
	return p->pid;
}

static void finish(void)
{
	int status = 0, best = 1 << 30, n = 0;
	for (int i = 1; i < MAX_PROCS; i++) {
		if (procs[i].state != P_ZOMBIE)
			continue;
		n++;
		if (procs[i].exit_status && procs[i].order < best) {
			best = procs[i].order;
			status = procs[i].exit_status;
		}
	}
	kprintf("kernel: all %d processes exited, status %d, ticks %lu, free frames %lu/%lu\n", n, status,
		ticks, frames_free_count, frames_total);
	guest_exit(status);
}

/* schedule picks the next runnable process after current (round robin),
 * or the idle context, and switches to its address space and stack. */
struct trapframe *schedule(void)
{
	u64 now = now_ns();
	int cur = (int)(current - procs), live = 0;
	struct proc *next = NULL;
	for (int k = 1; k <= MAX_PROCS; k++) {
		struct proc *p = &procs[(cur + k) % MAX_PROCS];
		if (p == IDLE)
			continue;
		if (p->state == P_SLEEPING && now >= p->wake_ns) {
			p->state = P_RUNNABLE;
			p->tf->rax = 0;
		}
		if (p->state == P_RUNNABLE || p->state == P_SLEEPING)
			live++;
		if (!next && p->state == P_RUNNABLE)
			next = p;
	}
	if (!live)
		finish();
	if (!next)
		next = IDLE;
	current = next;
	if (next != IDLE) {
		set_kernel_stack(next->kstack_top);
		if ((read_cr3() & PTE_ADDR) != next->pml4)
			write_cr3(next->pml4);
	}
	return next->tf;
}

void proc_exit(struct proc *p, int status)
{
	p->exit_status = status & 0xff;
	kprintf("kernel: exit pid=%d name=%s status=%d faults=%lu swapout=%lu swapin=%lu moved=%lu\n", p->pid,
		p->name, p->exit_status, p->faults, p->swapouts, p->swapins, p->moved);
	write_cr3(kernel_pml4);
	fds_close_all(p);
	cloak_release(p);
	attack_on_exit(p);
	free_address_space(p);
	p->state = P_ZOMBIE;
}

static const char *const exc_names[32] = {
	"divide error", "debug", "NMI", "breakpoint", "overflow", "bound range", "invalid opcode",
	"device not available", "double fault", "coprocessor overrun", "invalid TSS", "segment not present",
	"stack fault", "general protection", "page fault", "reserved", "x87 error", "alignment check",
	"machine check", "SIMD error", "virtualization", "control protection",
};

static int exc_signal(u64 v)
{
	switch (v) {
	case 0:
	case 16:
	case 19:
		return 8; /* SIGFPE */
	case 1:
	case 3:
		return 5; /* SIGTRAP */
	case 6:
		return 4; /* SIGILL */
	case 17:
		return 7; /* SIGBUS */
	default:
		return 11; /* SIGSEGV */
	}
}

/*
 * swap=NAME: at a tick that interrupts process NAME in user mode when
 * SWAP_IDLE_TICKS ticks since its last page fault found it in user mode and
 * it has not page-faulted for at least half a tick, evict every one of its
 * pages. The condition guarantees progress: a process busy faulting its
 * working set back in is left alone until it computes again. Counting ticks
 * that find it running, not only wall time, matters on a slow host: ticks
 * arrive far apart and swap-ins take longer than a tick, so "half a tick of
 * wall time without a fault" alone holds at nearly every tick and evicts
 * pages before the process uses them (a shim's pages between its touch and
 * CLOAK_REGISTER, the page served for a cloaked app's forwarded touch).
 */
#define SWAP_IDLE_TICKS 4
static void on_tick(struct trapframe *tf)
{
	ticks++;
	struct proc *p = current;
	if (cfg.swap[0] && p != IDLE && (tf->cs & 3) == 3 && !strcmp(p->name, cfg.swap) &&
	    ++p->idle_ticks >= SWAP_IDLE_TICKS && now_ns() - p->last_fault_ns >= cfg.tick_us * 500) {
		evict_all(p);
		p->idle_ticks = 0;
	}
}

extern char syscall_entry[];

/* trap handles every interrupt and exception; it returns the frame to resume. */
struct trapframe *trap(struct trapframe *tf)
{
	struct proc *p = current;
	if (!p) /* before the scheduler runs */
		panic("early kernel trap: vector %lu err=0x%lx rip=0x%lx cr2=0x%lx", tf->vector, tf->err, tf->rip,
		      read_cr2());
	int user = (tf->cs & 3) == 3;
	p->tf = tf;
	if (user && tf->vector == 14 && tf->rip == (u64)syscall_entry && read_cr2() == (u64)syscall_entry) {
		/*
		 * kvm_pvm emulates SYSCALL from a non-enlightened guest by loading
		 * RIP from LSTAR, RCX and R11 as usual, but it stays at CPL 3; the
		 * fetch of the supervisor-only entry page then faults here. Finish
		 * the transition in software. A process that jumps to the entry
		 * itself gains nothing: the result is the system call it could
		 * have made, with its return address and flags checked.
		 */
		if (tf->rcx >= 0x800000000000UL) {
			kprintf("kernel: pid %d (%s) killed: bad system call return address 0x%lx\n", p->pid,
				p->name, tf->rcx);
			proc_exit(p, 128 + 11);
			return schedule();
		}
		tf->rip = tf->rcx;
		tf->rflags = (tf->r11 & 0x40cd5) | 0x202;
		tf->vector = VEC_SYSCALL;
		tf->err = 0;
		return syscall_trap(tf);
	}
	if (user)
		attack_on_trap(p, tf);
	if (tf->vector == VEC_TIMER) {
		lapic_eoi();
		on_tick(tf);
		return schedule();
	}
	if (tf->vector == VEC_SPURIOUS)
		return tf;
	if (tf->vector >= 32) {
		kprintf("kernel: unexpected interrupt vector %lu\n", tf->vector);
		lapic_eoi();
		return tf;
	}
	const char *name = tf->vector < 22 && exc_names[tf->vector] ? exc_names[tf->vector] : "exception";
	if (!user || p == IDLE)
		panic("kernel %s (vector %lu) err=0x%lx rip=0x%lx rsp=0x%lx cr2=0x%lx", name, tf->vector, tf->err,
		      tf->rip, tf->rsp, read_cr2());
	if (tf->vector == 14) {
		u64 addr = read_cr2();
		if (!(tf->err & 1) && handle_user_fault(p, addr, (tf->err & 2) != 0) == 0) {
			p->last_fault_ns = now_ns();
			p->idle_ticks = 0;
			return tf;
		}
		kprintf("kernel: pid %d (%s) killed: page fault at 0x%lx rip=0x%lx err=0x%lx\n", p->pid, p->name,
			addr, tf->rip, tf->err);
	} else {
		kprintf("kernel: pid %d (%s) killed: %s at rip=0x%lx err=0x%lx\n", p->pid, p->name, name, tf->rip,
			tf->err);
	}
	proc_exit(p, 128 + exc_signal(tf->vector));
	return schedule();
}

void sched_start(void)
{
	/* The idle context runs "sti; hlt" at CPL 0 on the boot stack. */
	extern char idle_loop[], boot_stack_top[];
	static struct trapframe idle_tf;
	IDLE->state = P_RUNNABLE;
	memcpy(IDLE->name, "idle", 5);
	idle_tf.rip = (u64)idle_loop;
	idle_tf.cs = KERNEL_CS;
	idle_tf.ss = KERNEL_DS;
	idle_tf.rflags = 0x202;
	idle_tf.rsp = (u64)boot_stack_top - 4096;
	IDLE->tf = &idle_tf;
	current = IDLE;
	struct trapframe *tf = schedule();
	__asm__ volatile("mov %0, %%rsp\n\tjmp trap_return" ::"r"(tf) : "memory");
	__builtin_unreachable();
}
