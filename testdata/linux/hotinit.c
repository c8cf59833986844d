/*
 * umbra's hot-plug test init: PID 1 of a test Linux guest booted with an empty
 * hot-plug disk slot (/dev/vda), freestanding like init.c, whose helpers it includes. The
 * hot-plug tests build it with gcc into an initramfs of their own (internal/nettest's
 * Initramfs); it is not the kernel's initramfs, so changing it rebuilds no kernel.
 *
 * It finds virtio-blk's block major in /proc/devices, makes /dev/vda, prints
 * "UMBRA-HOT: waiting", waits (up to 120 s) for the disk to have a size (a medium
 * inserted), prints "UMBRA-HOT: read " and the disk's first line, waits for the size to
 * drop to zero (the medium removed), prints "UMBRA-HOT: gone" and powers off. Any failure
 * prints "UMBRA-HOT: error ..." and powers off with status 99.
 */
#define init_main umbra_test_init_main
#include "init.c"
#undef init_main

enum { SYS_close = 3, SYS_ioctl = 16, SYS_nanosleep = 35, SYS_mknod = 133 };
#define BLKGETSIZE64 0x80081272UL
#define BLKRRPART 0x125fUL

#define FAIL_PREFIX "UMBRA-HOT: "
#include "virtblk.h"

static void sleep_ms(long ms)
{
	long ts[2] = {ms / 1000, (ms % 1000) * 1000000};
	sc(SYS_nanosleep, ts, 0, 0);
}

static unsigned long disk_size(void)
{
	long fd = sc(SYS_open, "/dev/vda", 0, 0);
	if (fd < 0)
		return 0;
	unsigned long size = 0;
	if (sc(SYS_ioctl, fd, BLKGETSIZE64, &size) != 0)
		size = 0;
	sc(SYS_close, fd, 0, 0);
	return size;
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
	puts_("UMBRA-HOT: waiting\n");
	int i;
	for (i = 0; i < 1200 && disk_size() == 0; i++)
		sleep_ms(100);
	if (i == 1200)
		fail("no medium within 120 s", 110);
	char buf[512];
	long fd = sc(SYS_open, "/dev/vda", 0, 0);
	if (fd < 0)
		fail("open /dev/vda", fd);
	long n = sc(SYS_read, fd, buf, sizeof buf);
	sc(SYS_close, fd, 0, 0);
	if (n <= 0)
		fail("read /dev/vda", n);
	long len = 0;
	while (len < n && buf[len] && buf[len] != '\n')
		len++;
	puts_("UMBRA-HOT: read ");
	out(buf, len);
	puts_("\n");
	for (i = 0; i < 1200 && disk_size() != 0; i++)
		sleep_ms(100);
	if (i == 1200)
		fail("the medium stayed for 120 s", 110);
	puts_("UMBRA-HOT: gone\n");
	poweroff(0);
}
