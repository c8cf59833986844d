/*
 * umbra's disk test init: PID 1 of a test Linux guest whose root filesystem is a virtio-blk
 * disk (root=/dev/vda rw), freestanding like init.c, whose helpers it includes. The disk journeys (monitor and
 * cmd/umbra tests) build it with gcc and put it on the ext2 image they prepare with
 * mke2fs -d; it is not part of the initramfs, so changing it rebuilds no kernel.
 *
 * Arguments (after "--" on the kernel command line), done in order:
 *   put=NAME:TEXT  write TEXT and a newline to /NAME (created or truncated), fsync it
 *   get=NAME       print "UMBRA-DISK: NAME=<contents without the trailing newline>"
 *   keep=NAME:TEXT get=NAME if /NAME exists, else put=NAME:TEXT (one command line for a
 *                  first boot that writes and later boots that read back)
 *   exit=N         the power-off status (default 0)
 * Then the root filesystem is synced and remounted read-only (so the host's e2fsck finds it
 * clean) and the VM powers off through umbra's power register. Any failure prints
 * "UMBRA-DISK: error ..." and powers off with status 99.
 */
/* The system-call wrappers, console output and poweroff are init.c's: it is included with
 * its init_main renamed, so its _start calls the init_main below. */
#define init_main umbra_test_init_main
#include "init.c"
#undef init_main

enum { SYS_close = 3, SYS_fsync = 74, SYS_sync = 162 };

static void fail(const char *what, const char *arg, long err)
{
	char num[24];
	int i = sizeof num;
	unsigned long e = (unsigned long)(err < 0 ? -err : err);
	num[--i] = 0;
	do
		num[--i] = (char)('0' + e % 10);
	while ((e /= 10) && i > 0);
	puts_("UMBRA-DISK: error ");
	puts_(what);
	puts_(" ");
	puts_(arg);
	puts_(" errno ");
	puts_(num + i);
	puts_("\n");
	poweroff(99);
}

/* path builds "/NAME" from arg up to stop (':' or NUL). */
static const char *path(char *buf, long cap, const char *arg, char stop)
{
	long n = 0;
	buf[n++] = '/';
	while (*arg && *arg != stop && n < cap - 1)
		buf[n++] = *arg++;
	buf[n] = 0;
	return arg;
}

static void put(const char *arg)
{
	char p[128];
	const char *text = path(p, sizeof p, arg, ':');
	if (*text != ':')
		fail("put needs NAME:TEXT", arg, 0);
	text++;
	long fd = sc(SYS_open, p, 01 /* O_WRONLY */ | 0100 /* O_CREAT */ | 01000 /* O_TRUNC */, 0644);
	if (fd < 0)
		fail("open", p, fd);
	long n = slen(text);
	long r = sc(SYS_write, fd, text, n);
	if (r != n)
		fail("write", p, r);
	if ((r = sc(SYS_write, fd, "\n", 1)) != 1)
		fail("write", p, r);
	if ((r = sc(SYS_fsync, fd, 0, 0)) != 0)
		fail("fsync", p, r);
	sc(SYS_close, fd, 0, 0);
	puts_("UMBRA-DISK: wrote ");
	puts_(p);
	puts_("\n");
}

static void get(const char *arg)
{
	char p[128], buf[512];
	path(p, sizeof p, arg, 0);
	long fd = sc(SYS_open, p, 0, 0);
	if (fd < 0)
		fail("open", p, fd);
	long n = sc(SYS_read, fd, buf, sizeof buf);
	if (n < 0)
		fail("read", p, n);
	sc(SYS_close, fd, 0, 0);
	while (n > 0 && buf[n - 1] == '\n')
		n--;
	puts_("UMBRA-DISK: ");
	puts_(p + 1);
	puts_("=");
	out(buf, n);
	puts_("\n");
}

static void keep(const char *arg)
{
	char p[128];
	path(p, sizeof p, arg, ':');
	long fd = sc(SYS_open, p, 0, 0);
	if (fd < 0) {
		put(arg);
		return;
	}
	sc(SYS_close, fd, 0, 0);
	get(p + 1);
}

void init_main(long *sp);
void init_main(long *sp)
{
	long argc = sp[0];
	char **argv = (char **)(sp + 1);
	unsigned status = 0;
	puts_("UMBRA-DISK: up\n");
	for (long i = 1; i < argc; i++) {
		if (prefix(argv[i], "put="))
			put(argv[i] + 4);
		else if (prefix(argv[i], "get="))
			get(argv[i] + 4);
		else if (prefix(argv[i], "keep="))
			keep(argv[i] + 5);
		else if (prefix(argv[i], "exit=")) {
			status = 0;
			for (const char *d = argv[i] + 5; *d >= '0' && *d <= '9'; d++)
				status = status * 10 + (unsigned)(*d - '0');
		}
	}
	sc(SYS_sync, 0, 0, 0);
	long r = sc6(SYS_mount, 0, (long)"/", 0, 32 /* MS_REMOUNT */ | 1 /* MS_RDONLY */, 0, 0);
	if (r != 0)
		fail("remount read-only", "/", r);
	sc(SYS_sync, 0, 0, 0);
	poweroff(status);
}
