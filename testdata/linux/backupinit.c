/*
 * umbra's backup test init: PID 1 of a test Linux guest whose root filesystem is a
 * virtio-blk disk (root=/dev/vda rw), freestanding like init.c, whose helpers it includes.
 * The backup tests (backup/live_linux_test.go) build it with gcc and put it on the ext2
 * image they prepare with mke2fs -d; it is not part of the initramfs, so changing it
 * rebuilds no kernel.
 *
 * It writes 4 KiB records to /log for ever, each with fsync, so that the disk changes all
 * the while the host backs it up: record i goes to slot (i * 7919) mod SLOTS of the file
 * (its 64 blocks, 256 KiB, are rewritten again and again in a scattered order, so that
 * writes keep landing on chunks a running backup has still to copy) and holds
 * "umbra-backup-record <i>" repeated. After each record's fsync it prints "UMBRA-BK: <i>"
 * (the log of what the guest wrote, for the host to check the disk against). The host
 * stops the VM; any failure prints "UMBRA-BK: error ..." and powers off with status 99.
 */
#define init_main umbra_test_init_main
#include "init.c"
#undef init_main

enum { SYS_pwrite64 = 18, SYS_fsync = 74, SLOTS = 64, RECORD = 4096 };

static char rec[RECORD];

static long fmt_num(char *b, unsigned long v)
{
	char t[24];
	long n = 0, k = 0;
	do
		t[n++] = (char)('0' + v % 10);
	while ((v /= 10) && n < (long)sizeof t);
	while (n > 0)
		b[k++] = t[--n];
	return k;
}

static void fail(const char *what, long err)
{
	char num[24];
	long n = fmt_num(num, (unsigned long)(err < 0 ? -err : err));
	puts_("UMBRA-BK: error ");
	puts_(what);
	puts_(" errno ");
	out(num, n);
	puts_("\n");
	poweroff(99);
}

void init_main(long *sp);
void init_main(long *sp)
{
	(void)sp;
	long fd = sc(SYS_open, "/log", 01 /* O_WRONLY */ | 0100 /* O_CREAT */, 0644);
	if (fd < 0)
		fail("open /log", fd);
	puts_("UMBRA-BK: up\n");
	for (unsigned long i = 0;; i++) {
		char line[48];
		long n = 0;
		const char *p = "umbra-backup-record ";
		while (*p)
			line[n++] = *p++;
		n += fmt_num(line + n, i);
		line[n++] = '\n';
		for (long k = 0; k < RECORD; k++)
			rec[k] = line[k % n];
		long off = (long)((i * 7919) % SLOTS) * RECORD;
		long r = sc6(SYS_pwrite64, fd, (long)rec, RECORD, off, 0, 0);
		if (r != RECORD)
			fail("pwrite /log", r);
		if ((r = sc(SYS_fsync, fd, 0, 0)) != 0)
			fail("fsync /log", r);
		{
			char msg[40];
			long m = 0;
			p = "UMBRA-BK: ";
			while (*p)
				msg[m++] = *p++;
			m += fmt_num(msg + m, i);
			msg[m++] = '\n';
			out(msg, m);
		}
	}
}
