/*
 * Helpers of the test inits that reach virtio-blk disks as block devices (hotinit.c,
 * loginit.c), included after init.c. The including file defines FAIL_PREFIX, the console
 * prefix of its failure line ("UMBRA-HOT: error ..."); fail() prints it and powers off with
 * status 99. blkmajor() finds virtio-blk's block major ("NNN virtblk" in /proc/devices).
 */
static void fail(const char *what, long err)
{
	char b[24];
	int i = sizeof b;
	unsigned long e = (unsigned long)(err < 0 ? -err : err);
	b[--i] = 0;
	do
		b[--i] = (char)('0' + e % 10);
	while ((e /= 10) && i > 0);
	puts_(FAIL_PREFIX "error ");
	puts_(what);
	puts_(" errno ");
	puts_(b + i);
	puts_("\n");
	poweroff(99);
}

static long blkmajor(void)
{
	static char buf[4096];
	long fd = sc(SYS_open, "/proc/devices", 0, 0);
	if (fd < 0)
		fail("open /proc/devices", fd);
	long n = sc(SYS_read, fd, buf, sizeof buf - 1);
	sc(SYS_close, fd, 0, 0);
	if (n <= 0)
		fail("read /proc/devices", n);
	buf[n] = 0;
	for (char *l = buf; *l;) {
		long v = 0;
		char *p = l;
		while (*p == ' ')
			p++;
		while (*p >= '0' && *p <= '9')
			v = v * 10 + (*p++ - '0');
		if (*p == ' ' && prefix(p + 1, "virtblk\n"))
			return v;
		while (*l && *l != '\n')
			l++;
		if (*l)
			l++;
	}
	fail("no virtblk in /proc/devices", 2);
	return 0;
}
