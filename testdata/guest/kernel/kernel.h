/* The umbra test guest kernel: shared declarations. */
#ifndef KERNEL_H
#define KERNEL_H

#include "../include/umbra_guest.h"

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef long i64;
typedef unsigned long size_t;
typedef long ssize_t;

#define NULL ((void *)0)
#define PAGE_SIZE 4096UL
#define PAGE_MASK (~(PAGE_SIZE - 1))
#define PAGE_UP(x) (((x) + PAGE_SIZE - 1) & PAGE_MASK)

#define KERNEL_BASE 0xffffffff80000000UL /* kernel image window: phys 0 */
#define DIRECT_MAP 0xffff800000000000UL  /* all of physical memory */
#define P2V(pa) ((void *)((u64)(pa) + DIRECT_MAP))
#define V2P(va) ((u64)(va) - DIRECT_MAP)
#define KIMG2P(va) ((u64)(va) - KERNEL_BASE)

/* Segment selectors (GDT in cpu.c). */
#define KERNEL_CS 0x08
#define KERNEL_DS 0x10
#define USER_DS 0x23
#define USER_CS 0x2b
#define TSS_SEL 0x30

/* Page table entry bits. */
#define PTE_P 0x1UL
#define PTE_W 0x2UL
#define PTE_U 0x4UL
#define PTE_PS 0x80UL
#define PTE_DEV 0x200UL  /* software: device page (doorbell), never swapped */
#define PTE_SWAP 0x400UL /* software, with P clear: page is in swap slot (pte >> 12) */
#define PTE_NX (1UL << 63)
#define PTE_ADDR 0x000ffffffffff000UL

/* Linux errno values. */
#define EPERM 1
#define ENOENT 2
#define ESRCH 3
#define EINTR 4
#define EIO 5
#define ENXIO 6
#define EBADF 9
#define ENOMEM 12
#define EFAULT 14
#define EEXIST 17
#define ENOTDIR 20
#define EISDIR 21
#define EINVAL 22
#define ENFILE 23
#define EMFILE 24
#define EFBIG 27
#define ENOSPC 28
#define ESPIPE 29
#define EROFS 30
#define ENAMETOOLONG 36
#define ENOSYS 38

/* Exit statuses of the whole guest (EXIT hypercall). */
#define STATUS_CMDLINE 250 /* bad command line */
#define STATUS_PANIC 255   /* unexpected kernel exception or internal error */

struct trapframe {
	u64 r15, r14, r13, r12, r11, r10, r9, r8;
	u64 rbp, rdi, rsi, rdx, rcx, rbx, rax;
	u64 vector, err;
	u64 rip, cs, rflags, rsp, ss;
};
#define VEC_SYSCALL 0x100 /* trapframe.vector for SYSCALL entries */
#define VEC_TIMER 0x20
#define VEC_SPURIOUS 0xff

struct boot_info {
	u32 magic, version;
	u64 ram_size, cmdline_gpa, cmdline_len, doorbell_gpa;
	u64 image_start, image_end, tsc_khz, apic_timer_hz;
};

/* lib.c */
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strcmp(const char *a, const char *b);
int strncmp(const char *a, const char *b, size_t n);
int parse_u64(const char *s, u64 *out);
typedef __builtin_va_list va_list;
#define va_start __builtin_va_start
#define va_end __builtin_va_end
#define va_arg __builtin_va_arg
int vsnprintf(char *buf, size_t n, const char *fmt, va_list ap);
int snprintf(char *buf, size_t n, const char *fmt, ...);

/* console.c */
long hypercall(u64 nr, u64 a1, u64 a2);
void serial_puts(const char *s);
void console_write(const char *s, size_t n);
struct proc;
long serial_read(struct proc *p, u64 buf, u64 n);
void kprintf(const char *fmt, ...);
__attribute__((noreturn)) void panic(const char *fmt, ...);
__attribute__((noreturn)) void guest_exit(int status);
extern int kernel_panicking;

/* cpu.c */
void cpu_init(void);
void timer_init(u64 apic_hz, u64 tick_us);
void lapic_eoi(void);
void set_kernel_stack(u64 top);
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u64 read_cr2(void) { u64 v; __asm__ volatile("mov %%cr2, %0" : "=r"(v)); return v; }
static inline u64 read_cr3(void) { u64 v; __asm__ volatile("mov %%cr3, %0" : "=r"(v)); return v; }
static inline void write_cr3(u64 v) { __asm__ volatile("mov %0, %%cr3" ::"r"(v) : "memory"); }
static inline void invlpg(u64 va) { __asm__ volatile("invlpg (%0)" ::"r"(va) : "memory"); }
static inline u64 rdtsc(void) { u32 lo, hi; __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi)); return ((u64)hi << 32) | lo; }
extern u64 kstack_top_cur; /* entry.S: syscall entry switches to this stack */

/* time (main.c) */
u64 now_ns(void);

/* mm.c */
void mm_init(u64 free_start, u64 ram_size);
u64 frame_alloc(void);       /* zeroed frame, 0 if out of memory */
u64 frame_alloc_nozero(void);
void frame_free(u64 pa);
extern u64 frames_free_count, frames_total;

struct proc;
u64 *pte_lookup(struct proc *p, u64 va, int create);
int map_page(struct proc *p, u64 va, u64 pa, u64 flags);
int handle_user_fault(struct proc *p, u64 va, int write);
int user_page_ensure(struct proc *p, u64 va, int write, u64 *pa);
int copy_from_user(struct proc *p, void *dst, u64 src, size_t n);
int copy_to_user(struct proc *p, u64 dst, const void *src, size_t n);
int strncpy_from_user(struct proc *p, char *dst, u64 src, size_t n);
int evict_page(struct proc *p, u64 va);
void evict_all(struct proc *p);
void unmap_range(struct proc *p, u64 start, u64 end);
void protect_range(struct proc *p, u64 start, u64 end, int prot);
void free_address_space(struct proc *p);

/* proc.c */
#define MAX_PROCS 12
#define MAX_VMAS 24
#define MAX_FDS 16
#define MAX_RESIDENT 1024
#define MAX_PTPAGES 64
#define KSTACK_SIZE 8192

enum vma_kind { VMA_NONE, VMA_IMAGE, VMA_HEAP, VMA_MMAP, VMA_STACK };
struct vma {
	u64 start, end; /* page aligned */
	int kind;
	int prot; /* PROT_READ=1, PROT_WRITE=2, PROT_EXEC=4 */
	u64 file_off, file_vaddr, file_size; /* image: bytes of the ELF backing this vma */
};

struct file;
struct fd {
	struct file *f;
};

enum proc_state { P_FREE, P_RUNNABLE, P_SLEEPING, P_ZOMBIE };
struct proc {
	int pid;
	int state;
	char name[16];
	struct trapframe *tf;
	u64 kstack_top;
	u64 pml4; /* physical */
	const u8 *elf;
	size_t elf_size;
	struct vma vmas[MAX_VMAS];
	int nvma;
	u64 brk_start, brk;
	u64 mmap_next;
	u64 wake_ns;
	u64 last_fault_ns; /* when the kernel last resolved a page fault for it */
	u32 idle_ticks;    /* ticks that found it in user mode since that fault */
	int exit_status;
	int order; /* position on the command line */
	struct fd fds[MAX_FDS];
	u64 resident[MAX_RESIDENT]; /* user VAs with a present, swappable PTE */
	int nresident;
	u64 ptpages[MAX_PTPAGES];
	int nptpages;
	/* statistics */
	u64 faults, swapouts, swapins, moved, syscalls, yields;
};
extern struct proc procs[MAX_PROCS];
extern struct proc *current;
extern u64 ticks;
struct vma *vma_find(struct proc *p, u64 va);
int vma_add(struct proc *p, u64 start, u64 end, int kind, int prot);
int proc_spawn(const char *app, char **argv, int argc, int order);
struct trapframe *schedule(void);
void proc_exit(struct proc *p, int status);
struct proc *proc_by_name(const char *name);
void sched_start(void) __attribute__((noreturn));
struct trapframe *trap(struct trapframe *tf);

/* apps.c */
struct app {
	const char *name;
	const u8 *start, *end;
};
const struct app *app_find(const char *name);

/* cloak.c */
void cloak_release(struct proc *p);
void attack_forge_blind(struct proc *p, u64 va, u64 pa);

/* syscall.c */
struct trapframe *syscall_trap(struct trapframe *tf);

/* fs.c */
void fs_init(void);
long sys_openat(struct proc *p, int dirfd, u64 path, int flags, int mode);
long sys_close(struct proc *p, int fd);
long sys_read(struct proc *p, int fd, u64 buf, u64 n);
long sys_write(struct proc *p, int fd, u64 buf, u64 n);
long sys_lseek(struct proc *p, int fd, i64 off, int whence);
long sys_fstat(struct proc *p, int fd, u64 st);
long sys_fsync(struct proc *p, int fd);
void fds_init(struct proc *p);
void fds_close_all(struct proc *p);
void fs_add_disk(const char *name, int index);

/* vblk.c: the virtio-blk driver */
int vblk_cmdline(const char *key, char *v);
const char *vblk_hostile_mode(void);
void vblk_init(void);
u64 vblk_size(int i);
int vblk_readonly(int i);
long vblk_rw(int i, u64 off, struct proc *p, u64 ubuf, u64 n, int write);
int vblk_flush(int i);
void vblk_hostile(const char *mode);
void vblk_ring_attack(int step, u64 pa, const char *victim);

/* attack.c and the command line (main.c) */
struct config {
	char swap[16];
	char attack[16];
	char victim[16];
	u64 tick_us;
};
extern struct config cfg;
void attack_on_trap(struct proc *p, struct trapframe *tf);
void attack_on_yield(struct proc *p);
void attack_on_syscall(struct proc *p, struct trapframe *tf);
long attack_on_result(struct proc *p, u64 nr, u64 a1, long r);
void attack_on_exit(struct proc *p);

#endif
