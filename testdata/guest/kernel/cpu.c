/* CPU tables (GDT, TSS, IDT), SYSCALL MSRs and the local APIC timer. */
#include "kernel.h"

struct tss {
	u32 reserved0;
	u64 rsp0, rsp1, rsp2;
	u64 reserved1;
	u64 ist[7];
	u64 reserved2;
	u16 reserved3, iomap_base;
} __attribute__((packed));

static u64 gdt[8] __attribute__((aligned(16)));
static struct tss tss __attribute__((aligned(16)));
u64 idt[512] __attribute__((aligned(4096))); /* one page: kernel/pageprot.c locks it */
static u8 df_stack[4096] __attribute__((aligned(16)));

extern char isr_stubs[];
extern char syscall_entry[];

#define MSR_EFER 0xc0000080
#define MSR_STAR 0xc0000081
#define MSR_LSTAR 0xc0000082
#define MSR_FMASK 0xc0000084

#define LAPIC ((volatile u32 *)(DIRECT_MAP + 0xfee00000UL))
#define LAPIC_EOI (0xb0 / 4)
#define LAPIC_SVR (0xf0 / 4)
#define LAPIC_LVT_TIMER (0x320 / 4)
#define LAPIC_TIMER_INIT (0x380 / 4)
#define LAPIC_TIMER_DIV (0x3e0 / 4)

static void wrmsr(u32 msr, u64 v)
{
	__asm__ volatile("wrmsr" ::"c"(msr), "a"((u32)v), "d"((u32)(v >> 32)));
}

static u64 rdmsr(u32 msr)
{
	u32 lo, hi;
	__asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
	return ((u64)hi << 32) | lo;
}

static void set_gate(int vec, u64 handler, int dpl, int ist)
{
	idt[vec * 2] = (handler & 0xffff) | ((u64)KERNEL_CS << 16) | ((u64)ist << 32) |
		       ((u64)(0x8e | (dpl << 5)) << 40) | (((handler >> 16) & 0xffff) << 48);
	idt[vec * 2 + 1] = handler >> 32;
}

void set_kernel_stack(u64 top)
{
	tss.rsp0 = top;
	kstack_top_cur = top;
}

void cpu_init(void)
{
	struct {
		u16 limit;
		u64 base;
	} __attribute__((packed)) d;

	gdt[0] = 0;
	gdt[1] = 0x00af9b000000ffffUL; /* 0x08 kernel code, 64-bit */
	gdt[2] = 0x00cf93000000ffffUL; /* 0x10 kernel data */
	gdt[3] = 0;                    /* 0x18 (32-bit user code slot, unused) */
	gdt[4] = 0x00cff3000000ffffUL; /* 0x20 user data, DPL 3 */
	gdt[5] = 0x00affb000000ffffUL; /* 0x28 user code, 64-bit, DPL 3 */
	u64 t = (u64)&tss;
	tss.iomap_base = sizeof tss; /* no I/O bitmap: user port I/O faults */
	tss.ist[0] = (u64)df_stack + sizeof df_stack;
	gdt[6] = (sizeof tss - 1) | ((t & 0xffffff) << 16) | (0x89UL << 40) | (((t >> 24) & 0xff) << 56);
	gdt[7] = t >> 32;

	d.limit = sizeof gdt - 1;
	d.base = (u64)gdt;
	__asm__ volatile("lgdt %0\n\t"
			 "mov %1, %%ds\n\t"
			 "mov %1, %%es\n\t"
			 "mov %1, %%ss\n\t"
			 "xor %%eax, %%eax\n\t"
			 "mov %%eax, %%fs\n\t"
			 "mov %%eax, %%gs\n\t"
			 "pushq %2\n\t"
			 "leaq 1f(%%rip), %%rax\n\t"
			 "pushq %%rax\n\t"
			 "lretq\n"
			 "1:\n\t"
			 "ltr %w3"
			 :
			 : "m"(d), "r"((u64)KERNEL_DS), "i"(KERNEL_CS), "r"(TSS_SEL)
			 : "rax", "memory");

	for (int v = 0; v < 256; v++)
		set_gate(v, (u64)isr_stubs + 16 * (u64)v, 0, v == 8 ? 1 : 0);
	d.limit = sizeof idt - 1;
	d.base = (u64)idt;
	__asm__ volatile("lidt %0" ::"m"(d));

	/* SYSCALL: kernel CS 0x08 (SS 0x10); SYSRET base 0x18 -> SS 0x23, CS 0x2b. */
	wrmsr(MSR_EFER, rdmsr(MSR_EFER) | 1); /* SCE */
	wrmsr(MSR_STAR, ((u64)(0x18 | 3) << 48) | ((u64)KERNEL_CS << 32));
	wrmsr(MSR_LSTAR, (u64)syscall_entry);
	wrmsr(MSR_FMASK, 0x40700); /* clear IF, TF, DF, AC on entry */

	/* Mask the legacy PICs; only the local APIC timer interrupts. */
	outb(0x21, 0xff);
	outb(0xa1, 0xff);
}

void timer_init(u64 apic_hz, u64 tick_us)
{
	LAPIC[LAPIC_SVR] = 0x100 | VEC_SPURIOUS;
	LAPIC[LAPIC_TIMER_DIV] = 0x3; /* divide by 16 */
	u64 count = apic_hz / 16 / 1000000 * tick_us;
	if (apic_hz / 16 < 1000000)
		count = apic_hz / 16 * tick_us / 1000000;
	if (count == 0)
		count = 1;
	if (count > 0xffffffffUL)
		count = 0xffffffffUL;
	LAPIC[LAPIC_LVT_TIMER] = VEC_TIMER | (1 << 17); /* periodic */
	LAPIC[LAPIC_TIMER_INIT] = (u32)count;
}

void lapic_eoi(void)
{
	LAPIC[LAPIC_EOI] = 0;
}
