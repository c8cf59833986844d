/*
 * umbra's test init: PID 1 of the test Linux guest, freestanding (raw system calls, no libc).
 *
 * It mounts /proc, prints "UMBRA-INIT: up" with /proc/uptime and /proc/version (the line
 * proves the kernel runs userspace), then powers the VM off through umbra's power register
 * (docs/linux.md) with the status given on the kernel command line after "--".
 *
 * Arguments (after "--" on the kernel command line):
 *   exit=N   power off with status N (0..255; default 0)
 *   ask      print "UMBRA-INIT: ready", read one line from the console and print
 *            "UMBRA-INIT: got <line>" before powering off
 */
typedef unsigned long u64;

#define UMBRA_POWER_GPA 0xE0001000UL /* monitor/power.go: PowerGPA */

static long sc6(long n, long a, long b, long c, long d, long e, long f)
{
	long r;
	register long r10 asm("r10") = d;
	register long r8 asm("r8") = e;
	register long r9 asm("r9") = f;
	asm volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9) : "rcx", "r11", "memory");
	return r;
}
#define sc(n, a, b, c) sc6(n, (long)(a), (long)(b), (long)(c), 0, 0, 0)

enum { SYS_read = 0, SYS_write = 1, SYS_open = 2, SYS_mmap = 9, SYS_exit = 60, SYS_mount = 165, SYS_reboot = 169 };

static long slen(const char *s)
{
	long n = 0;
	while (s[n])
		n++;
	return n;
}
static void out(const char *s, long n) { sc(SYS_write, 1, s, n); }
static void puts_(const char *s) { out(s, slen(s)); }
static int prefix(const char *s, const char *p)
{
	while (*p)
		if (*s++ != *p++)
			return 0;
	return 1;
}

/* cat prints a /proc file without its trailing newline. */
static void cat(const char *path)
{
	char buf[256];
	long fd = sc(SYS_open, path, 0, 0);
	if (fd < 0) {
		puts_("?");
		return;
	}
	long n = sc(SYS_read, fd, buf, sizeof buf);
	while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == 0))
		n--;
	if (n > 0)
		out(buf, n);
}

static void poweroff(unsigned status)
{
	long fd = sc(SYS_open, "/dev/mem", 2 /* O_RDWR */ | 04010000 /* O_SYNC */, 0);
	if (fd >= 0) {
		long p = sc6(SYS_mmap, 0, 4096, 3 /* PROT_READ|PROT_WRITE */, 1 /* MAP_SHARED */, fd, UMBRA_POWER_GPA);
		if (p > 0 || p < -4095) {
			*(volatile unsigned *)p = status & 0xff;
		}
	}
	puts_("UMBRA-INIT: power register unavailable, resetting\n");
	sc(SYS_reboot, 0xfee1dead, 672274793, 0x01234567); /* reboot(RESTART): i8042 reset */
	for (;;)
		sc(SYS_exit, 0, 0, 0);
}

void init_main(long *sp)
{
	long argc = sp[0];
	char **argv = (char **)(sp + 1);
	unsigned status = 0;
	int ask = 0;
	for (long i = 1; i < argc; i++) {
		if (prefix(argv[i], "exit=")) {
			status = 0;
			for (const char *d = argv[i] + 5; *d >= '0' && *d <= '9'; d++)
				status = status * 10 + (unsigned)(*d - '0');
		} else if (prefix(argv[i], "ask")) {
			ask = 1;
		}
	}
	sc(SYS_mount, "proc", "/proc", "proc");
	puts_("UMBRA-INIT: up, uptime ");
	cat("/proc/uptime");
	puts_(", kernel ");
	cat("/proc/sys/kernel/osrelease");
	puts_("\n");
	if (ask) {
		char line[128];
		long n = 0;
		puts_("UMBRA-INIT: ready\n");
		while (n < (long)sizeof line) {
			long r = sc(SYS_read, 0, line + n, 1);
			if (r <= 0 || line[n] == '\n' || line[n] == '\r')
				break;
			n++;
		}
		puts_("UMBRA-INIT: got ");
		out(line, n);
		puts_("\n");
	}
	poweroff(status);
}

__attribute__((naked, noreturn)) void _start(void)
{
	asm volatile("mov %rsp, %rdi\n\tand $-16, %rsp\n\tcall init_main\n\tud2");
}
