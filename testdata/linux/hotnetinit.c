/*
 * umbra's NIC hot-plug test init: PID 1 of a test Linux guest booted with an empty NIC
 * hot-plug slot, freestanding like netinit.c, whose helpers it includes. The NIC
 * hot-plug tests build it with gcc into an initramfs of their own (internal/nettest's
 * Initramfs); it is not the kernel's initramfs, so changing it rebuilds no kernel.
 *
 * Arguments (after "--" on the kernel command line):
 *   slot=virtio-mmio.N  the slot's platform device (its virtio_mmio.device= word)
 *   ip=, server=        as netinit.c's
 *   msg=A msg2=B        what the first and the second attach send
 *
 * It mounts sysfs, prints "UMBRA-HOTNET: waiting" and binds the slot's platform device
 * to virtio-mmio until that works (an empty slot reads DeviceID 0 and the bind fails
 * with ENODEV), brings eth0 up and reaches the server with msg. It then waits for the
 * carrier to go (the NIC detached), prints "UMBRA-HOTNET: link down", tries the server
 * once more for 3 s (that must fail: "UMBRA-HOTNET: unreachable"), unbinds the device
 * (which resets it and frees the slot: "UMBRA-HOTNET: released"), binds it again for
 * the second NIC and reaches the server with msg2. Then it powers off. Any failure
 * prints "UMBRA-NET: error ..." and powers off with status 99.
 */
#define UMBRA_NETINIT_HELPERS
#include "netinit.c"

enum { SYS_setsockopt = 54, SYS_mkdir = 83 };
enum { SOL_SOCKET = 1, SO_SNDTIMEO = 21 };

static void sleep_ms(long ms)
{
	long ts[2] = {ms / 1000, (ms % 1000) * 1000000};
	sc(SYS_nanosleep, ts, 0, 0);
}

/* sysfs_write writes s to a sysfs file and returns the write's result. */
static long sysfs_write(const char *path, const char *s)
{
	long fd = sc(SYS_open, path, 1 /* O_WRONLY */, 0);
	if (fd < 0)
		return fd;
	long r = sc(SYS_write, fd, s, slen(s));
	sc(SYS_close, fd, 0, 0);
	return r;
}

/* carrier reads /sys/class/net/eth0/carrier: 1, 0, or -1 if unreadable. */
static int carrier(void)
{
	char c = 0;
	long fd = sc(SYS_open, "/sys/class/net/eth0/carrier", 0, 0);
	if (fd < 0)
		return -1;
	long n = sc(SYS_read, fd, &c, 1);
	sc(SYS_close, fd, 0, 0);
	if (n != 1)
		return -1;
	return c == '1' ? 1 : 0;
}

/* bind binds the slot's platform device, retrying every 100 ms for 120 s. */
static void bind(const char *slot)
{
	long r = 0;
	for (int i = 0; i < 1200; i++) {
		r = sysfs_write("/sys/bus/platform/drivers/virtio-mmio/bind", slot);
		if (r > 0)
			break;
		sleep_ms(100);
	}
	if (r <= 0)
		fail("no NIC in the slot within 120 s (bind)", r);
	puts_("UMBRA-HOTNET: bound ");
	puts_(slot);
	puts_("\n");
}

/* unreachable tries one connection with a 3 s timeout, which must fail. */
static void unreachable(const char *server)
{
	struct sockaddr_in sa = {AF_INET};
	const char *rest = parse_ip(server, &sa.addr);
	unsigned long port = parse_num(rest + 1, 0);
	sa.port = (unsigned short)(((port & 0xff) << 8) | (port >> 8));
	long fd = sc(SYS_socket, AF_INET, SOCK_STREAM, 0);
	if (fd < 0)
		fail("socket", fd);
	long tv[2] = {3, 0};
	sc6(SYS_setsockopt, fd, SOL_SOCKET, SO_SNDTIMEO, (long)tv, sizeof tv, 0);
	long e = sc(SYS_connect, fd, &sa, sizeof sa);
	sc(SYS_close, fd, 0, 0);
	if (e == 0) {
		puts_("UMBRA-NET: error reached the server after the NIC was detached\n");
		poweroff(99);
	}
	puts_("UMBRA-HOTNET: unreachable, errno ");
	num((unsigned long)-e);
	puts_("\n");
}

void init_main(long *sp);
void init_main(long *sp)
{
	long argc = sp[0];
	char **argv = (char **)(sp + 1);
	const char *slot = "virtio-mmio.0", *ip = "10.0.2.15/24", *server = 0, *msg = "hello", *msg2 = "again";
	for (long i = 1; i < argc; i++) {
		if (prefix(argv[i], "slot="))
			slot = argv[i] + 5;
		else if (prefix(argv[i], "ip="))
			ip = argv[i] + 3;
		else if (prefix(argv[i], "server="))
			server = argv[i] + 7;
		else if (prefix(argv[i], "msg2="))
			msg2 = argv[i] + 5;
		else if (prefix(argv[i], "msg="))
			msg = argv[i] + 4;
	}
	if (!server)
		fail("server= is required", 22);
	sc(SYS_mkdir, "/sys", 0755, 0);
	long r = sc6(SYS_mount, (long)"sysfs", (long)"/sys", (long)"sysfs", 0, 0, 0);
	if (r)
		fail("mount /sys", r);
	puts_("UMBRA-HOTNET: waiting\n");
	bind(slot);
	ifup(ip);
	reach(server, msg);
	int i;
	for (i = 0; i < 1200 && carrier() != 0; i++)
		sleep_ms(100);
	if (i == 1200)
		fail("the link stayed up for 120 s", 110);
	puts_("UMBRA-HOTNET: link down\n");
	unreachable(server);
	r = sysfs_write("/sys/bus/platform/drivers/virtio-mmio/unbind", slot);
	if (r <= 0)
		fail("unbind", r);
	puts_("UMBRA-HOTNET: released\n");
	bind(slot);
	ifup(ip);
	reach(server, msg2);
	poweroff(0);
}
