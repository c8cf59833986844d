/*
 * umbra's disk-snapshot test init: PID 1 of a test Linux guest with two data disks (/dev/vda
 * and /dev/vdb, no filesystem), freestanding like init.c, whose helpers it includes. The
 * snapshot tests build it with gcc into an initramfs of their own (internal/nettest's
 * Initramfs); it is not the kernel's initramfs, so changing it rebuilds no kernel.
 *
 * It writes a log of 8 records, one per sector, to sectors 0-7 of each disk ("LOG pre N"),
 * with O_DIRECT (no guest page cache: every read and write reaches the device) and fsync,
 * prints "UMBRA-LOG: ready" and reads one line TAG from the console. Then it reads sectors
 * 0-15 of each disk and prints "UMBRA-LOG: vdX pre=P post=Q" (how many records of each
 * phase the disk holds now), writes "LOG post N TAG" to sectors 8-15, prints
 * "UMBRA-LOG: done TAG" and powers off with status 0. A snapshot taken while it waits for
 * the line, and restored, must show pre=8 post=0: the disk as it was at the snapshot.
 * Any failure prints "UMBRA-LOG: error ..." and powers off with status 99.
 */
#define init_main umbra_test_init_main
#include "init.c"
#undef init_main

enum { SYS_close = 3, SYS_pread64 = 17, SYS_pwrite64 = 18, SYS_fsync = 74, SYS_mknod = 133 };
#define O_RDWR_DIRECT (02 | 040000) /* O_RDWR | O_DIRECT */

#define FAIL_PREFIX "UMBRA-LOG: "
#include "virtblk.h"

static char sector[512] __attribute__((aligned(4096)));

static void record(const char *phase, long i, const char *tag, long taglen)
{
	long n = 0;
	for (long j = 0; j < (long)sizeof sector; j++)
		sector[j] = 0;
	for (const char *p = "LOG "; *p; p++)
		sector[n++] = *p;
	for (const char *p = phase; *p; p++)
		sector[n++] = *p;
	sector[n++] = ' ';
	sector[n++] = (char)('0' + i);
	sector[n++] = ' ';
	for (long j = 0; j < taglen && n < 500; j++)
		sector[n++] = tag[j];
	sector[n++] = '\n';
}

static void write_log(const char *dev, const char *phase, long first, const char *tag, long taglen)
{
	long fd = sc(SYS_open, dev, O_RDWR_DIRECT, 0);
	if (fd < 0)
		fail("open for writing", fd);
	for (long i = 0; i < 8; i++) {
		record(phase, i, tag, taglen);
		long r = sc6(SYS_pwrite64, fd, (long)sector, sizeof sector, (first + i) * 512, 0, 0);
		if (r != (long)sizeof sector)
			fail("pwrite", r);
	}
	long r = sc(SYS_fsync, fd, 0, 0);
	if (r)
		fail("fsync", r);
	sc(SYS_close, fd, 0, 0);
}

static void count_log(const char *dev, const char *name)
{
	long fd = sc(SYS_open, dev, O_RDWR_DIRECT, 0);
	if (fd < 0)
		fail("open for reading", fd);
	long pre = 0, post = 0;
	for (long i = 0; i < 16; i++) {
		long r = sc6(SYS_pread64, fd, (long)sector, sizeof sector, i * 512, 0, 0);
		if (r != (long)sizeof sector)
			fail("pread", r);
		if (prefix(sector, "LOG pre "))
			pre++;
		else if (prefix(sector, "LOG post "))
			post++;
	}
	sc(SYS_close, fd, 0, 0);
	char msg[] = "UMBRA-LOG: vdX pre=N post=N\n";
	msg[13] = name[2];
	msg[19] = (char)('0' + (pre > 9 ? 9 : pre));
	msg[26] = (char)('0' + (post > 9 ? 9 : post));
	puts_(msg);
}

void init_main(long *sp);
void init_main(long *sp)
{
	(void)sp;
	sc(SYS_mount, "proc", "/proc", "proc");
	long major = blkmajor();
	long r = sc(SYS_mknod, "/dev/vda", 060600 /* S_IFBLK | 0600 */, (major << 8) | 0);
	if (r)
		fail("mknod /dev/vda", r);
	if ((r = sc(SYS_mknod, "/dev/vdb", 060600, (major << 8) | 16)))
		fail("mknod /dev/vdb", r);
	write_log("/dev/vda", "pre", 0, "", 0);
	write_log("/dev/vdb", "pre", 0, "", 0);
	puts_("UMBRA-LOG: ready\n");
	char tag[64];
	long n = 0;
	while (n < (long)sizeof tag) {
		r = sc(SYS_read, 0, tag + n, 1);
		if (r <= 0 || tag[n] == '\n' || tag[n] == '\r')
			break;
		n++;
	}
	count_log("/dev/vda", "vda");
	count_log("/dev/vdb", "vdb");
	write_log("/dev/vda", "post", 8, tag, n);
	write_log("/dev/vdb", "post", 8, tag, n);
	puts_("UMBRA-LOG: done ");
	out(tag, n);
	puts_("\n");
	poweroff(0);
}
