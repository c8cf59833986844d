/* The cloaking shim: builds and issues CLOAK_REGISTER (docs/cloak.md). */
#include "cloak.h"
#include "../user/libc.h"

/* Image bounds, from shim/cloak.ld. */
extern const char __cloak_text_start[], __cloak_text_end[], __cloak_rodata_start[], __cloak_rodata_end[];
extern char __cloak_data_start[], __cloak_data_end[], __cloak_image_end[];

extern const char cloak_tramp_start[], cloak_tramp_end[];

#define PG 4096UL
#define PG_DOWN(x) ((x) & ~(PG - 1))
#define PG_UP(x) (((x) + PG - 1) & ~(PG - 1))

static struct cloak_segment seg[CLOAK_MAX_SEGMENTS];
static struct cloak_region reg[CLOAK_MAX_REGIONS];
static unsigned char request[sizeof(struct cloak_register_req) + sizeof seg + sizeof reg] __attribute__((aligned(8)));

long cloak_call(long nr, long a1, long a2, long a3)
{
	long ret;
	register long rdx __asm__("rdx") = a3;
	__asm__ volatile("movq (%1), %0"
			 : "=a"(ret)
			 : "r"(USER_DOORBELL_VA), "a"(nr), "D"(a1), "S"(a2), "r"(rdx)
			 : "memory");
	return ret;
}

/* fault_in makes every page of [start, end) present, writing the pages of a
 * writable range back unchanged: the monitor measures and adopts what is
 * present at registration. */
static void fault_in(unsigned long start, unsigned long end, int writable)
{
	for (unsigned long p = PG_DOWN(start); p < end; p += PG) {
		volatile unsigned char *b = (volatile unsigned char *)p;
		unsigned char v = *b;
		if (writable)
			*b = v;
	}
}

long cloak_init(const char *name)
{
	int nseg = 0, nreg = 0;
	const struct {
		unsigned long start, end;
		unsigned kind;
	} parts[] = {
		{(unsigned long)__cloak_text_start, (unsigned long)__cloak_text_end, CLOAK_SEG_CODE},
		{(unsigned long)__cloak_rodata_start, (unsigned long)__cloak_rodata_end, CLOAK_SEG_CODE},
		{(unsigned long)__cloak_data_start, (unsigned long)__cloak_data_end, CLOAK_SEG_DATA},
	};
	for (unsigned i = 0; i < sizeof parts / sizeof parts[0]; i++)
		if (parts[i].end > parts[i].start)
			seg[nseg++] = (struct cloak_segment){
				.va = parts[i].start, .size = parts[i].end - parts[i].start, .kind = parts[i].kind};
	unsigned long image_start = PG_DOWN((unsigned long)__cloak_text_start);
	unsigned long image_end = PG_UP((unsigned long)__cloak_image_end);
	/* Make every image page present (the data pages writable and private). */
	fault_in(image_start, (unsigned long)__cloak_data_start, 0);
	fault_in((unsigned long)__cloak_data_start, image_end, 1);
	reg[nreg++] = (struct cloak_region){.va = image_start, .size = image_end - image_start, .kind = CLOAK_REGION_IMAGE};
	long brk0 = sys_brk(0);
	if (brk0 < 0)
		return brk0;
	unsigned long heap = PG_UP((unsigned long)brk0);
	if (heap < image_end)
		heap = image_end;
	reg[nreg++] = (struct cloak_region){.va = heap, .size = CLOAK_HEAP_SPAN, .kind = CLOAK_REGION_HEAP};
	reg[nreg++] = (struct cloak_region){
		.va = USER_STACK_TOP - USER_STACK_MAX, .size = USER_STACK_MAX, .kind = CLOAK_REGION_STACK};

	/* The trampoline and bounce area: uncloaked anonymous memory. The
	 * trampoline is never writable and executable at once (W^X, which the
	 * monitor checks at registration): written, then read+execute. */
	char *tramp = sys_mmap(NULL, PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if ((long)tramp < 0 && (long)tramp > -4096)
		return (long)tramp;
	memcpy(tramp, cloak_tramp_start, (size_t)(cloak_tramp_end - cloak_tramp_start));
	long pr = sys_mprotect(tramp, PG, PROT_READ | PROT_EXEC);
	if (pr < 0)
		return pr;
	char *bounce = sys_mmap(NULL, CLOAK_BOUNCE_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if ((long)bounce < 0 && (long)bounce > -4096)
		return (long)bounce;
	fault_in((unsigned long)bounce, (unsigned long)bounce + CLOAK_BOUNCE_SIZE, 1);

	struct cloak_register_req h = {
		.magic = CLOAK_REQ_MAGIC,
		.version = CLOAK_REQ_VERSION,
		.header_size = sizeof h,
		.total_size = (unsigned)(sizeof h + sizeof seg[0] * (unsigned)nseg + sizeof reg[0] * (unsigned)nreg),
		.nr_segments = (unsigned)nseg,
		.nr_regions = (unsigned)nreg,
		.trampoline_va = (unsigned long)tramp,
		.bounce_va = (unsigned long)bounce,
		.bounce_size = CLOAK_BOUNCE_SIZE,
	};
	for (int i = 0; i < CLOAK_NAME_SIZE && name[i]; i++)
		h.name[i] = name[i];
	memcpy(request, &h, sizeof h);
	memcpy(request + sizeof h, seg, sizeof seg[0] * (unsigned)nseg);
	memcpy(request + sizeof h + sizeof seg[0] * (unsigned)nseg, reg, sizeof reg[0] * (unsigned)nreg);
	/* The kernel may page the image or the live stack out again before the
	 * monitor measures and takes them (-EFAULT): bring them back and ask again,
	 * a few times. */
	long r = -EFAULT;
	for (int try = 0; try < 8 && r == -EFAULT; try++) {
		fault_in(image_start, (unsigned long)__cloak_data_start, 0);
		fault_in((unsigned long)__cloak_data_start, image_end, 1);
		fault_in((unsigned long)request, (unsigned long)request + sizeof request, 0);
		fault_in((unsigned long)tramp, (unsigned long)tramp + PG, 0);
		unsigned long sp;
		__asm__ volatile("mov %%rsp, %0" : "=r"(sp));
		fault_in(PG_DOWN(sp) - PG, USER_STACK_TOP, 1);
		r = cloak_call(CLOAK_REGISTER, (long)request, 0, 0);
	}
	return r;
}

void *cloak_mmap(unsigned long len)
{
	len = PG_UP(len);
	void *p = sys_mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if ((long)p < 0 && (long)p > -4096)
		return p;
	long r = cloak_call(CLOAK_REGION_ADD, (long)p, (long)len, CLOAK_REGION_ANON);
	if (r < 0)
		return (void *)r;
	return p;
}
