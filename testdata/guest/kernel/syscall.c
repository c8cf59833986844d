/* Linux x86-64 system calls: numbers, arguments and errors as on Linux. */
#include "kernel.h"

enum {
	SYS_read = 0,
	SYS_write = 1,
	SYS_close = 3,
	SYS_fstat = 5,
	SYS_lseek = 8,
	SYS_mmap = 9,
	SYS_mprotect = 10,
	SYS_munmap = 11,
	SYS_brk = 12,
	SYS_sched_yield = 24,
	SYS_nanosleep = 35,
	SYS_fsync = 74,
	SYS_getpid = 39,
	SYS_exit = 60,
	SYS_clock_gettime = 228,
	SYS_exit_group = 231,
	SYS_openat = 257,
};

#define MAP_SHARED 0x01
#define MAP_PRIVATE 0x02
#define MAP_FIXED 0x10
#define MAP_ANONYMOUS 0x20
#define ENODEV 19

struct timespec {
	i64 tv_sec, tv_nsec;
};

static long sys_mmap(struct proc *p, u64 addr, u64 len, u64 prot, u64 flags)
{
	(void)addr;
	if (len == 0 || (prot & ~7UL))
		return -EINVAL;
	if ((flags & 3) != MAP_PRIVATE) /* shared mappings are not supported */
		return -EINVAL;
	if (!(flags & MAP_ANONYMOUS))
		return -ENODEV; /* no file mappings */
	if (flags & MAP_FIXED)
		return -EINVAL; /* not supported: the kernel picks the address */
	if (len > (1UL << 30))
		return -ENOMEM;
	len = PAGE_UP(len);
	if (p->mmap_next + len > USER_MMAP_END)
		return -ENOMEM;
	if (vma_add(p, p->mmap_next, p->mmap_next + len, VMA_MMAP, (int)prot) < 0)
		return -ENOMEM;
	u64 start = p->mmap_next;
	p->mmap_next += len;
	return (long)start;
}

static long sys_munmap(struct proc *p, u64 addr, u64 len)
{
	if ((addr & ~PAGE_MASK) || len == 0)
		return -EINVAL;
	u64 end = addr + PAGE_UP(len);
	if (end < addr || end > 0x800000000000UL)
		return -EINVAL;
	for (int i = 0; i < p->nvma; i++) {
		struct vma *v = &p->vmas[i];
		if (v->kind != VMA_MMAP || end <= v->start || addr >= v->end)
			continue;
		u64 s = addr > v->start ? addr : v->start, e = end < v->end ? end : v->end;
		unmap_range(p, s, e);
		if (s == v->start && e == v->end) {
			v->kind = VMA_NONE;
		} else if (s == v->start) {
			v->start = e;
		} else if (e == v->end) {
			v->end = s;
		} else {
			u64 old_end = v->end;
			int prot = v->prot;
			v->end = s;
			if (vma_add(p, e, old_end, VMA_MMAP, prot) < 0) {
				/* No room to split: drop the tail too (its pages are gone anyway). */
				unmap_range(p, e, old_end);
			}
		}
	}
	return 0;
}

/* sys_mprotect changes the rights of one whole anonymous mapping (what the
 * cloaking shim needs for its trampoline: written, then read+execute). */
static long sys_mprotect(struct proc *p, u64 addr, u64 len, u64 prot)
{
	if ((addr & ~PAGE_MASK) || len == 0 || (prot & ~7UL))
		return -EINVAL;
	u64 end = addr + PAGE_UP(len);
	struct vma *v = vma_find(p, addr);
	if (end < addr || !v)
		return -ENOMEM;
	if (v->kind != VMA_MMAP || v->start != addr || v->end != end)
		return -EINVAL; /* not supported: only a whole mapping */
	v->prot = (int)prot;
	protect_range(p, addr, end, (int)prot);
	return 0;
}

static long sys_brk(struct proc *p, u64 addr)
{
	if (addr < p->brk_start || addr > p->brk_start + USER_HEAP_MAX)
		return (long)p->brk;
	struct vma *heap = NULL;
	for (int i = 0; i < p->nvma; i++)
		if (p->vmas[i].kind == VMA_HEAP)
			heap = &p->vmas[i];
	if (!heap)
		return (long)p->brk;
	if (PAGE_UP(addr) < PAGE_UP(p->brk))
		unmap_range(p, PAGE_UP(addr), PAGE_UP(p->brk));
	heap->end = PAGE_UP(addr);
	p->brk = addr;
	return (long)addr;
}

static long sys_clock_gettime(struct proc *p, u64 clk, u64 utp)
{
	switch (clk) {
	case 0: /* CLOCK_REALTIME: no RTC, time since boot */
	case 1: /* CLOCK_MONOTONIC */
	case 2: /* CLOCK_PROCESS_CPUTIME_ID (approximated by time since boot) */
	case 3: /* CLOCK_THREAD_CPUTIME_ID (likewise) */
	case 4: /* CLOCK_MONOTONIC_RAW */
	case 5: /* CLOCK_REALTIME_COARSE */
	case 6: /* CLOCK_MONOTONIC_COARSE */
	case 7: /* CLOCK_BOOTTIME */
		break;
	default:
		return -EINVAL;
	}
	u64 ns = now_ns();
	struct timespec ts = {(i64)(ns / 1000000000UL), (i64)(ns % 1000000000UL)};
	if (copy_to_user(p, utp, &ts, sizeof ts))
		return -EFAULT;
	return 0;
}

struct trapframe *syscall_trap(struct trapframe *tf)
{
	struct proc *p = current;
	p->tf = tf;
	p->syscalls++;
	attack_on_trap(p, tf);
	u64 nr = tf->rax, a1 = tf->rdi, a2 = tf->rsi, a3 = tf->rdx, a4 = tf->r10;
	attack_on_syscall(p, tf);
	long r;
	switch (nr) {
	case SYS_read:
		r = sys_read(p, (int)a1, a2, a3);
		break;
	case SYS_write:
		r = sys_write(p, (int)a1, a2, a3);
		break;
	case SYS_openat:
		r = sys_openat(p, (int)a1, a2, (int)a3, (int)a4);
		break;
	case SYS_close:
		r = sys_close(p, (int)a1);
		break;
	case SYS_lseek:
		r = sys_lseek(p, (int)a1, (i64)a2, (int)a3);
		break;
	case SYS_fstat:
		r = sys_fstat(p, (int)a1, a2);
		break;
	case SYS_fsync:
		r = sys_fsync(p, (int)a1);
		break;
	case SYS_mmap:
		r = sys_mmap(p, a1, a2, a3, a4);
		break;
	case SYS_mprotect:
		r = sys_mprotect(p, a1, a2, a3);
		break;
	case SYS_munmap:
		r = sys_munmap(p, a1, a2);
		break;
	case SYS_brk:
		r = sys_brk(p, a1);
		break;
	case SYS_getpid:
		r = p->pid;
		break;
	case SYS_sched_yield:
		p->yields++;
		attack_on_yield(p);
		tf->rax = 0;
		return schedule();
	case SYS_nanosleep: {
		struct timespec ts;
		if (copy_from_user(p, &ts, a1, sizeof ts)) {
			r = -EFAULT;
			break;
		}
		if (ts.tv_sec < 0 || ts.tv_nsec < 0 || ts.tv_nsec >= 1000000000L) {
			r = -EINVAL;
			break;
		}
		u64 ns = (u64)ts.tv_sec > 1000000000UL ? ~0UL / 2 : (u64)ts.tv_sec * 1000000000UL + (u64)ts.tv_nsec;
		tf->rax = 0;
		p->wake_ns = now_ns() + ns;
		p->state = P_SLEEPING;
		return schedule();
	}
	case SYS_clock_gettime:
		r = sys_clock_gettime(p, a1, a2);
		break;
	case SYS_exit:
	case SYS_exit_group:
		proc_exit(p, (int)a1);
		return schedule();
	default:
		r = -ENOSYS;
	}
	tf->rax = (u64)attack_on_result(p, nr, a1, r);
	return tf;
}
