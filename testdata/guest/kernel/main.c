/* Boot: check the boot information, parse the command line, start apps. */
#include "kernel.h"
#include "pageprot.h"

struct config cfg = {.tick_us = 2000};
u64 ram_size; /* bytes of guest RAM, from the boot info */
extern u64 kernel_pml4, doorbell_gpa;
extern char kernel_end[];

static char cmdline[4096];
static int kernel_fault_selftest;
static u64 tsc0, tsc_mult; /* ns = ((tsc - tsc0) * tsc_mult) >> 32 */

u64 now_ns(void)
{
	return (u64)(((unsigned __int128)(rdtsc() - tsc0) * tsc_mult) >> 32);
}

static __attribute__((noreturn)) void cmdline_error(const char *what, const char *arg)
{
	kprintf("kernel: command line: %s \"%s\"\n", what, arg);
	guest_exit(STATUS_CMDLINE);
}

static void set_name(char *dst, const char *v, const char *key)
{
	if (strlen(v) == 0 || strlen(v) > 15)
		cmdline_error("bad value for", key);
	memcpy(dst, v, strlen(v) + 1);
}

/* split cuts s at every sep, storing up to max pieces; returns their number or -1. */
static int split(char *s, char sep, char **out, int max)
{
	int n = 0;
	for (;;) {
		if (n == max)
			return -1;
		out[n++] = s;
		while (*s && *s != sep)
			s++;
		if (!*s)
			return n;
		*s++ = 0;
	}
}

static void parse_and_spawn(void)
{
	char *tok[48], *run = NULL;
	int nt = 0;
	for (char *s = cmdline; *s;) {
		while (*s == ' ' || *s == '\t' || *s == '\n')
			*s++ = 0;
		if (!*s)
			break;
		if (nt == 48)
			cmdline_error("too many words at", s);
		tok[nt++] = s;
		while (*s && *s != ' ' && *s != '\t' && *s != '\n')
			s++;
	}
	for (int i = 0; i < nt; i++) {
		int r;
		char *eq = tok[i];
		while (*eq && *eq != '=')
			eq++;
		if (!*eq)
			cmdline_error("expected key=value, got", tok[i]);
		*eq = 0;
		char *v = eq + 1;
		if (!strcmp(tok[i], "run"))
			run = v;
		else if (!strcmp(tok[i], "swap"))
			set_name(cfg.swap, v, "swap");
		else if (!strcmp(tok[i], "victim"))
			set_name(cfg.victim, v, "victim");
		else if (!strcmp(tok[i], "attack")) {
			if (strcmp(v, "read") && strcmp(v, "tamper") && strcmp(v, "remap") && strcmp(v, "replay") &&
			    strcmp(v, "regs") && strcmp(v, "forge") && strcmp(v, "share") && strcmp(v, "ppbounce") &&
			    strcmp(v, "ppzero") && strcmp(v, "ppstore") && strcmp(v, "brklie") && strcmp(v, "plant") &&
			    strcmp(v, "mmaplie") && strcmp(v, "ptwalk") && strcmp(v, "pptick") &&
			    strcmp(v, "ppother") && strcmp(v, "vblkring"))
				cmdline_error("unknown attack", v);
			set_name(cfg.attack, v, "attack");
		} else if (!strcmp(tok[i], "selftest")) {
			if (strcmp(v, "kernel-fault"))
				cmdline_error("unknown selftest", v);
			kernel_fault_selftest = 1;
		} else if (!strcmp(tok[i], "tick_us")) {
			if (parse_u64(v, &cfg.tick_us) || cfg.tick_us < 100 || cfg.tick_us > 1000000)
				cmdline_error("bad tick_us (100..1000000)", v);
		} else if ((r = vblk_cmdline(tok[i], v)) != 0) {
			if (r < 0)
				cmdline_error("bad value for", tok[i]);
		} else {
			r = pp_cmdline(tok[i], v);
			if (r < 0)
				cmdline_error("bad value for", tok[i]);
			if (r == 0)
				cmdline_error("unknown key", tok[i]);
		}
	}
	if (pp_cmdline_error())
		cmdline_error(pp_cmdline_error(), cfg.attack);
	if (!run || !*run)
		cmdline_error("nothing to run, need", "run=APP[:ARG...][,APP...]");
	if (cfg.attack[0] && !cfg.victim[0])
		cmdline_error("attack needs victim=APP for", cfg.attack);
	vblk_init();
	char *ent[MAX_PROCS];
	int ne = split(run, ',', ent, MAX_PROCS - 1);
	if (ne < 0)
		cmdline_error("too many processes in", "run");
	int victim_found = 0, swap_found = 0;
	for (int i = 0; i < ne; i++) {
		char *argv[16];
		int argc = split(ent[i], ':', argv, 15);
		if (argc < 0)
			cmdline_error("too many arguments for", ent[i]);
		if (!app_find(argv[0]))
			cmdline_error("unknown app", argv[0]);
		victim_found |= !strcmp(argv[0], cfg.victim);
		swap_found |= !strcmp(argv[0], cfg.swap);
		int pid = proc_spawn(argv[0], argv, argc, i);
		if (pid < 0) {
			kprintf("kernel: cannot start %s: error %d\n", argv[0], -pid);
			guest_exit(STATUS_CMDLINE);
		}
	}
	if (cfg.victim[0] && !victim_found)
		cmdline_error("victim is not in run=", cfg.victim);
	if (cfg.swap[0] && !swap_found)
		cmdline_error("swap target is not in run=", cfg.swap);
}

void kmain(u64 boot_info_pa)
{
	serial_puts("umbra test guest: booting\n");
	if (boot_info_pa >= 0x100000)
		panic("boot info at 0x%lx is outside low memory", boot_info_pa);
	struct boot_info *bi = P2V(boot_info_pa);
	if (bi->magic != 0x524d4255 || bi->version != 1)
		panic("bad boot info magic 0x%x version %u", bi->magic, bi->version);
	if (bi->ram_size < (8UL << 20) || bi->ram_size > (3UL << 30))
		panic("unsupported RAM size 0x%lx", bi->ram_size);
	if (bi->tsc_khz == 0 || bi->tsc_khz > 100000000UL || bi->apic_timer_hz < 1000000)
		panic("bad clock frequencies: tsc_khz=%lu apic_timer_hz=%lu", bi->tsc_khz, bi->apic_timer_hz);
	if ((bi->doorbell_gpa & ~PAGE_MASK) || bi->doorbell_gpa < bi->ram_size || bi->doorbell_gpa >= (4UL << 30))
		panic("bad doorbell address 0x%lx", bi->doorbell_gpa);
	doorbell_gpa = bi->doorbell_gpa;
	ram_size = bi->ram_size;
	u64 len = bi->cmdline_len;
	if (len > sizeof cmdline - 1 || bi->cmdline_gpa + len > 0x100000)
		panic("bad command line (gpa 0x%lx, length %lu)", bi->cmdline_gpa, len);
	memcpy(cmdline, P2V(bi->cmdline_gpa), len);
	cmdline[len] = 0;
	tsc_mult = (1000000UL << 32) / bi->tsc_khz;
	tsc0 = rdtsc();

	cpu_init();
	long ver = hypercall(HC_VERSION, 0, 0);
	if (ver < 0 || (ver >> 16) != 1)
		panic("monitor hypercall ABI version 0x%lx, need 1.x", ver);
	u64 free_start = bi->image_end;
	if (KIMG2P(kernel_end) > free_start)
		free_start = KIMG2P(kernel_end);
	mm_init(free_start, bi->ram_size);
	kernel_pml4 = frame_alloc();
	if (!kernel_pml4)
		panic("out of memory at boot");
	u64 *k = P2V(kernel_pml4), *boot = P2V(read_cr3() & PTE_ADDR);
	k[256] = boot[256];
	k[511] = boot[511];
	write_cr3(kernel_pml4);
	fs_init();
	kprintf("kernel: umbra test guest, ram %lu MiB, cmdline \"%s\"\n", bi->ram_size >> 20, cmdline);
	parse_and_spawn();
	if (kernel_fault_selftest) {
		/* Show that an unexpected kernel exception panics cleanly. */
		kprintf("kernel: selftest: touching an unmapped kernel address\n");
		(void)*(volatile u64 *)0x1000;
	}
	pp_lock_kernel();
	if (vblk_hostile_mode()[0])
		vblk_hostile(vblk_hostile_mode());
	timer_init(bi->apic_timer_hz, cfg.tick_us);
	sched_start();
}
