/* The test apps' tiny libc. */
#include "libc.h"

long syscall6(long n, long a, long b, long c, long d, long e, long f)
{
	register long r10 __asm__("r10") = d;
	register long r8 __asm__("r8") = e;
	register long r9 __asm__("r9") = f;
	long ret;
	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
			 : "rcx", "r11", "memory");
	return ret;
}

long sys_read(int fd, void *buf, size_t n) { return syscall6(0, fd, (long)buf, (long)n, 0, 0, 0); }
long sys_write(int fd, const void *buf, size_t n) { return syscall6(1, fd, (long)buf, (long)n, 0, 0, 0); }
long sys_openat(int dirfd, const char *path, int flags, int mode) { return syscall6(257, dirfd, (long)path, flags, mode, 0, 0); }
long sys_close(int fd) { return syscall6(3, fd, 0, 0, 0, 0, 0); }
long sys_lseek(int fd, long off, int whence) { return syscall6(8, fd, off, whence, 0, 0, 0); }
long sys_fstat(int fd, struct stat *st) { return syscall6(5, fd, (long)st, 0, 0, 0, 0); }
void *sys_mmap(void *addr, size_t len, int prot, int flags, int fd, long off)
{
	return (void *)syscall6(9, (long)addr, (long)len, prot, flags, fd, off);
}
long sys_mprotect(void *addr, size_t len, int prot) { return syscall6(10, (long)addr, (long)len, prot, 0, 0, 0); }
long sys_munmap(void *addr, size_t len) { return syscall6(11, (long)addr, (long)len, 0, 0, 0, 0); }
long sys_brk(void *addr) { return syscall6(12, (long)addr, 0, 0, 0, 0, 0); }
long sys_getpid(void) { return syscall6(39, 0, 0, 0, 0, 0, 0); }
long sys_sched_yield(void) { return syscall6(24, 0, 0, 0, 0, 0, 0); }
long sys_nanosleep(const struct timespec *req, struct timespec *rem)
{
	return syscall6(35, (long)req, (long)rem, 0, 0, 0, 0);
}
long sys_clock_gettime(int clk, struct timespec *ts) { return syscall6(228, clk, (long)ts, 0, 0, 0, 0); }
void sys_exit_group(int status)
{
	for (;;)
		syscall6(231, status, 0, 0, 0, 0, 0);
}

/* hypercall calls the monitor through the doorbell mapped at USER_DOORBELL_VA. */
long hypercall(long nr, long a1, long a2)
{
	long ret;
	__asm__ volatile("movq (%1), %0" : "=a"(ret) : "r"(USER_DOORBELL_VA), "a"(nr), "D"(a1), "S"(a2) : "memory");
	return ret;
}

size_t strlen(const char *s)
{
	size_t n = 0;
	while (s[n])
		n++;
	return n;
}

int strcmp(const char *a, const char *b)
{
	while (*a && *a == *b)
		a++, b++;
	return (u8)*a - (u8)*b;
}

int strncmp(const char *a, const char *b, size_t n)
{
	for (; n > 0; n--, a++, b++) {
		if (*a != *b)
			return (u8)*a - (u8)*b;
		if (!*a)
			return 0;
	}
	return 0;
}

char *strcpy(char *d, const char *s)
{
	char *r = d;
	while ((*d++ = *s++))
		;
	return r;
}

char *strcat(char *d, const char *s)
{
	strcpy(d + strlen(d), s);
	return d;
}

void *memset(void *d, int c, size_t n)
{
	u8 *p = d;
	while (n--)
		*p++ = (u8)c;
	return d;
}

void *memcpy(void *d, const void *s, size_t n)
{
	u8 *p = d;
	const u8 *q = s;
	while (n--)
		*p++ = *q++;
	return d;
}

int memcmp(const void *a, const void *b, size_t n)
{
	const u8 *x = a, *y = b;
	for (size_t i = 0; i < n; i++)
		if (x[i] != y[i])
			return x[i] < y[i] ? -1 : 1;
	return 0;
}

long atol(const char *s)
{
	long v = 0, neg = 0;
	if (*s == '-')
		neg = 1, s++;
	while (*s >= '0' && *s <= '9')
		v = v * 10 + (*s++ - '0');
	return neg ? -v : v;
}

struct out {
	char *buf;
	size_t n, len;
};

static void put(struct out *o, char c)
{
	if (o->len + 1 < o->n)
		o->buf[o->len] = c;
	o->len++;
}

static void put_num(struct out *o, u64 v, int base, int neg, int width, int zero)
{
	char tmp[24];
	int i = 0;
	do {
		tmp[i++] = "0123456789abcdef"[v % (u64)base];
		v /= (u64)base;
	} while (v);
	if (neg)
		tmp[i++] = '-';
	for (int pad = width - i; pad > 0; pad--)
		put(o, zero ? '0' : ' ');
	while (i > 0)
		put(o, tmp[--i]);
}

int vsnprintf(char *buf, size_t n, const char *fmt, va_list ap)
{
	struct out o = {buf, n, 0};
	for (; *fmt; fmt++) {
		if (*fmt != '%') {
			put(&o, *fmt);
			continue;
		}
		fmt++;
		int zero = 0, width = 0, lng = 0;
		if (*fmt == '0')
			zero = 1, fmt++;
		while (*fmt >= '0' && *fmt <= '9')
			width = width * 10 + (*fmt++ - '0');
		while (*fmt == 'l' || *fmt == 'z')
			lng = 1, fmt++;
		switch (*fmt) {
		case 'd': {
			long v = lng ? va_arg(ap, long) : va_arg(ap, int);
			put_num(&o, v < 0 ? -(u64)v : (u64)v, 10, v < 0, width, zero);
			break;
		}
		case 'u':
			put_num(&o, lng ? va_arg(ap, u64) : va_arg(ap, unsigned), 10, 0, width, zero);
			break;
		case 'x':
			put_num(&o, lng ? va_arg(ap, u64) : va_arg(ap, unsigned), 16, 0, width, zero);
			break;
		case 'p':
			put(&o, '0');
			put(&o, 'x');
			put_num(&o, (u64)va_arg(ap, void *), 16, 0, width, zero);
			break;
		case 's': {
			const char *s = va_arg(ap, const char *);
			for (s = s ? s : "(null)"; *s; s++)
				put(&o, *s);
			break;
		}
		case 'c':
			put(&o, (char)va_arg(ap, int));
			break;
		case 0:
			fmt--;
			break;
		default:
			put(&o, *fmt);
		}
	}
	if (n)
		buf[o.len < n ? o.len : n - 1] = 0;
	return (int)o.len;
}

int snprintf(char *buf, size_t n, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	int r = vsnprintf(buf, n, fmt, ap);
	va_end(ap);
	return r;
}

/* printf formats into a buffer and writes it with one write(1, ...). */
int printf(const char *fmt, ...)
{
	char buf[512];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(buf, sizeof buf, fmt, ap);
	va_end(ap);
	if (n > (int)sizeof buf - 1)
		n = sizeof buf - 1;
	sys_write(1, buf, (size_t)n);
	return n;
}

u64 now_ns(void)
{
	struct timespec ts;
	sys_clock_gettime(CLOCK_MONOTONIC, &ts);
	return (u64)ts.tv_sec * 1000000000UL + (u64)ts.tv_nsec;
}

/* spin_ms burns CPU (no yielding, no sleeping) for ms milliseconds. */
void spin_ms(long ms)
{
	u64 end = now_ns() + (u64)ms * 1000000UL;
	while (now_ns() < end)
		;
}
