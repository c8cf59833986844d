/*
 * umbra's disk-writer init: PID 1 of a test Linux guest whose root filesystem is a
 * virtio-blk disk (root=/dev/vda rw), freestanding like diskinit.c. The storage
 * migration tests (migration/storage_linux_test.go) build it with gcc and put it on the
 * ext2 image they prepare; it keeps writing its disk while the VM migrates.
 *
 * Arguments (after "--" on the kernel command line):
 *   count=N   append N 4 KiB records to /log, each "record NNNNNNNN" padded with '.',
 *             fsync'd one by one (default 1000)
 *   sleep=US  sleep US microseconds between records (default 0)
 * It prints "UMBRA-WRITE: at I" every 64 records, "UMBRA-WRITE: done N" at the end,
 * then syncs, remounts / read-only and powers off with status 0. Any failure prints
 * "UMBRA-WRITE: error ..." and powers off with status 99.
 */
#define init_main umbra_test_init_main
#include "init.c"
#undef init_main

enum { SYS_close = 3, SYS_nanosleep = 35, SYS_fsync = 74, SYS_sync = 162 };

static void num(char *buf, int width, unsigned long v)
{
	for (int i = width - 1; i >= 0; i--) {
		buf[i] = (char)('0' + v % 10);
		v /= 10;
	}
}

static void say(const char *what, unsigned long v)
{
	char b[12];
	num(b, 10, v);
	int i = 0;
	while (i < 9 && b[i] == '0')
		i++;
	puts_("UMBRA-WRITE: ");
	puts_(what);
	puts_(" ");
	out(b + i, 10 - i);
	puts_("\n");
}

static void fail(const char *what, long err)
{
	puts_("UMBRA-WRITE: error ");
	puts_(what);
	say(" errno", (unsigned long)(err < 0 ? -err : err));
	poweroff(99);
}

static unsigned long arg(const char *s)
{
	unsigned long v = 0;
	for (; *s >= '0' && *s <= '9'; s++)
		v = v * 10 + (unsigned long)(*s - '0');
	return v;
}

static char rec[4096];

void init_main(long *sp);
void init_main(long *sp)
{
	long argc = sp[0];
	char **argv = (char **)(sp + 1);
	unsigned long count = 1000, sleep_us = 0;
	for (long i = 1; i < argc; i++) {
		if (prefix(argv[i], "count="))
			count = arg(argv[i] + 6);
		else if (prefix(argv[i], "sleep="))
			sleep_us = arg(argv[i] + 6);
	}
	long fd = sc(SYS_open, "/log", 01 /* O_WRONLY */ | 0100 /* O_CREAT */ | 01000 /* O_TRUNC */, 0644);
	if (fd < 0)
		fail("open /log", fd);
	for (int i = 0; i < (int)sizeof rec; i++)
		rec[i] = '.';
	rec[sizeof rec - 1] = '\n';
	for (int i = 0; i < 7; i++)
		rec[i] = "record "[i];
	puts_("UMBRA-WRITE: up\n");
	for (unsigned long i = 0; i < count; i++) {
		num(rec + 7, 8, i);
		long r = sc(SYS_write, fd, rec, sizeof rec);
		if (r != (long)sizeof rec)
			fail("write /log", r);
		if ((r = sc(SYS_fsync, fd, 0, 0)) != 0)
			fail("fsync /log", r);
		if (i % 64 == 0)
			say("at", i);
		if (sleep_us) {
			long ts[2] = {(long)(sleep_us / 1000000), (long)(sleep_us % 1000000) * 1000};
			sc(SYS_nanosleep, ts, 0, 0);
		}
	}
	sc(SYS_close, fd, 0, 0);
	say("done", count);
	sc(SYS_sync, 0, 0, 0);
	long r = sc6(SYS_mount, 0, (long)"/", 0, 32 /* MS_REMOUNT */ | 1 /* MS_RDONLY */, 0, 0);
	if (r != 0)
		fail("remount read-only /", r);
	sc(SYS_sync, 0, 0, 0);
	poweroff(0);
}
