/*
 * umbra's network test init: PID 1 of a test Linux guest with a virtio-net NIC,
 * freestanding like init.c, whose helpers it includes. The network journeys (monitor and
 * cmd/umbra tests) build it with gcc into an initramfs of its own (internal/nettest); it
 * is not the kernel's initramfs, so changing it rebuilds no kernel.
 *
 * Arguments (after "--" on the kernel command line):
 *   ip=A.B.C.D/N     the address of eth0 (brought up with it)
 *   server=A.B.C.D:P a TCP server to reach: the init sends msg and a newline, and prints
 *                    "UMBRA-NET: " and the first line of the answer
 *   msg=TEXT         what to send (default "hello")
 *   exit=N           the power-off status (default 0)
 * Any failure prints "UMBRA-NET: error ..." and powers off with status 99.
 * With UMBRA_NETINIT_HELPERS defined it is only the helpers (hotnetinit.c uses them).
 */
#define init_main umbra_test_init_main
#include "init.c"
#undef init_main

enum { SYS_close = 3, SYS_ioctl = 16, SYS_nanosleep = 35, SYS_socket = 41, SYS_connect = 42 };
enum { AF_INET = 2, SOCK_STREAM = 1, SOCK_DGRAM = 2 };
enum { SIOCGIFFLAGS = 0x8913, SIOCSIFFLAGS = 0x8914, SIOCSIFADDR = 0x8916, SIOCSIFNETMASK = 0x891c };
enum { IFF_UP = 0x1, IFF_RUNNING = 0x40 };

struct sockaddr_in {
	unsigned short family;
	unsigned short port; /* network order */
	unsigned int addr;   /* network order */
	unsigned char zero[8];
};

struct ifreq {
	char name[16];
	union {
		struct sockaddr_in addr;
		short flags;
		unsigned char pad[24];
	} u;
};

static void num(unsigned long v)
{
	char b[24];
	int i = sizeof b;
	b[--i] = 0;
	do
		b[--i] = (char)('0' + v % 10);
	while ((v /= 10) && i > 0);
	puts_(b + i);
}

static void fail(const char *what, long err)
{
	puts_("UMBRA-NET: error ");
	puts_(what);
	puts_(" errno ");
	num((unsigned long)(err < 0 ? -err : err));
	puts_("\n");
	poweroff(99);
}

/* parse_ip reads A.B.C.D into a network-order address and returns the rest of s. */
static const char *parse_ip(const char *s, unsigned int *out)
{
	unsigned int a = 0;
	for (int part = 0; part < 4; part++) {
		unsigned int v = 0;
		int digits = 0;
		while (*s >= '0' && *s <= '9' && digits < 3) {
			v = v * 10 + (unsigned)(*s++ - '0');
			digits++;
		}
		if (!digits || v > 255 || (part < 3 && *s++ != '.'))
			fail("bad address", 22);
		a |= v << (8 * part); /* little-endian host: byte 0 is the first octet */
	}
	*out = a;
	return s;
}

static unsigned long parse_num(const char *s, const char **rest)
{
	unsigned long v = 0;
	while (*s >= '0' && *s <= '9')
		v = v * 10 + (unsigned long)(*s++ - '0');
	if (rest)
		*rest = s;
	return v;
}

static void ifup(const char *cidr)
{
	unsigned int addr;
	const char *rest = parse_ip(cidr, &addr);
	unsigned long bits = 24;
	if (*rest == '/')
		bits = parse_num(rest + 1, 0);
	if (bits < 1 || bits > 31)
		fail("bad prefix length", 22);
	unsigned int mask = 0;
	for (unsigned long i = 0; i < bits; i++)
		mask |= 1u << (31 - i);
	/* to network order */
	mask = (mask >> 24) | ((mask >> 8) & 0xff00) | ((mask << 8) & 0xff0000) | (mask << 24);
	long fd = sc(SYS_socket, AF_INET, SOCK_DGRAM, 0);
	if (fd < 0)
		fail("socket", fd);
	struct ifreq r = {{'e', 't', 'h', '0'}};
	r.u.addr.family = AF_INET;
	r.u.addr.addr = addr;
	long e = sc(SYS_ioctl, fd, SIOCSIFADDR, &r);
	if (e)
		fail("SIOCSIFADDR eth0", e);
	r.u.addr.addr = mask;
	if ((e = sc(SYS_ioctl, fd, SIOCSIFNETMASK, &r)))
		fail("SIOCSIFNETMASK eth0", e);
	if ((e = sc(SYS_ioctl, fd, SIOCGIFFLAGS, &r)))
		fail("SIOCGIFFLAGS eth0", e);
	r.u.flags |= IFF_UP | IFF_RUNNING;
	if ((e = sc(SYS_ioctl, fd, SIOCSIFFLAGS, &r)))
		fail("SIOCSIFFLAGS eth0", e);
	sc(SYS_close, fd, 0, 0);
	puts_("UMBRA-NET: eth0 up ");
	puts_(cidr);
	puts_("\n");
}

static void reach(const char *server, const char *msg)
{
	struct sockaddr_in sa = {AF_INET};
	const char *rest = parse_ip(server, &sa.addr);
	if (*rest != ':')
		fail("server needs A.B.C.D:PORT", 22);
	unsigned long port = parse_num(rest + 1, 0);
	sa.port = (unsigned short)(((port & 0xff) << 8) | (port >> 8));
	long fd = -1, e = 0;
	/* The link may need a moment (ARP, the TAP's carrier): try for about 10 s. */
	for (int tries = 0; tries < 50; tries++) {
		fd = sc(SYS_socket, AF_INET, SOCK_STREAM, 0);
		if (fd < 0)
			fail("socket", fd);
		if ((e = sc(SYS_connect, fd, &sa, sizeof sa)) == 0)
			break;
		sc(SYS_close, fd, 0, 0);
		fd = -1;
		long ts[2] = {0, 200000000};
		sc(SYS_nanosleep, ts, 0, 0);
	}
	if (fd < 0)
		fail("connect", e);
	long n = slen(msg);
	if (sc(SYS_write, fd, msg, n) != n || sc(SYS_write, fd, "\n", 1) != 1)
		fail("write", 5);
	char buf[256];
	long got = 0;
	while (got < (long)sizeof buf - 1) {
		long r = sc(SYS_read, fd, buf + got, 1);
		if (r <= 0 || buf[got] == '\n')
			break;
		got++;
	}
	buf[got] = 0;
	sc(SYS_close, fd, 0, 0);
	puts_("UMBRA-NET: ");
	puts_(buf);
	puts_("\n");
}

#ifndef UMBRA_NETINIT_HELPERS /* hotnetinit.c takes the helpers and has its own main */
void init_main(long *sp);
void init_main(long *sp)
{
	long argc = sp[0];
	char **argv = (char **)(sp + 1);
	unsigned status = 0;
	const char *msg = "hello";
	puts_("UMBRA-NET: up\n");
	for (long i = 1; i < argc; i++)
		if (prefix(argv[i], "msg="))
			msg = argv[i] + 4;
	for (long i = 1; i < argc; i++) {
		if (prefix(argv[i], "ip="))
			ifup(argv[i] + 3);
		else if (prefix(argv[i], "server="))
			reach(argv[i] + 7, msg);
		else if (prefix(argv[i], "exit="))
			status = (unsigned)parse_num(argv[i] + 5, 0);
	}
	poweroff(status);
}
#endif
