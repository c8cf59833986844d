/* Console output: CONSOLE_WRITE hypercalls, and the 16550 for panics. */
#include "kernel.h"

#define DOORBELL_KVA (DIRECT_MAP + 0xe0000000UL)

int kernel_panicking;

/* hypercall performs a doorbell call from the kernel (docs/hypercalls.md). */
long hypercall(u64 nr, u64 a1, u64 a2)
{
	long ret;
	__asm__ volatile("movq (%1), %0"
			 : "=a"(ret)
			 : "r"(DOORBELL_KVA), "a"(nr), "D"(a1), "S"(a2)
			 : "memory");
	return ret;
}

void serial_puts(const char *s)
{
	for (; *s; s++) {
		if (*s == '\n')
			outb(0x3f8, '\r');
		outb(0x3f8, (u8)*s);
	}
}

void console_write(const char *s, size_t n)
{
	while (n > 0) {
		size_t c = n > 4096 ? 4096 : n;
		long r = hypercall(HC_CONSOLE_WRITE, (u64)s, c);
		if (r <= 0) {
			serial_puts("kernel: CONSOLE_WRITE failed\n");
			return;
		}
		s += r;
		n -= (size_t)r;
	}
}

void kprintf(const char *fmt, ...)
{
	char buf[512];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(buf, sizeof buf, fmt, ap);
	va_end(ap);
	if (n > (int)sizeof buf - 1)
		n = sizeof buf - 1;
	console_write(buf, (size_t)n);
}

__attribute__((noreturn)) void guest_exit(int status)
{
	for (;;) {
		hypercall(HC_EXIT, (u64)status, 0);
		/* EXIT does not return; if a monitor lets it, stop here. */
		__asm__ volatile("cli; hlt");
	}
}

__attribute__((noreturn)) void panic(const char *fmt, ...)
{
	char buf[512];
	va_list ap;
	__asm__ volatile("cli");
	if (kernel_panicking++) {
		serial_puts("\nPANIC: recursive panic\n");
		guest_exit(STATUS_PANIC);
	}
	va_start(ap, fmt);
	vsnprintf(buf, sizeof buf, fmt, ap);
	va_end(ap);
	serial_puts("\nPANIC: ");
	serial_puts(buf);
	serial_puts("\n");
	guest_exit(STATUS_PANIC);
}

/*
 * serial_read is the console's receive side: it takes what the 16550 at 0x3F8 has
 * received (polling LSR.DR, at most 64 bytes a call) and returns 0 when nothing has
 * arrived, as a Linux tty with VMIN=0 VTIME=0: callers poll. Once the carrier (MSR.DCD)
 * drops, the line is hung up and reads fail with -EIO, as on Linux: that is how the
 * monitor's graceful stop asks the console's programs to end.
 */
long serial_read(struct proc *p, u64 buf, u64 n)
{
	u8 tmp[64];
	u64 got = 0;
	if (!(inb(0x3f8 + 6) & 0x80))
		return -EIO;
	if (n > sizeof tmp)
		n = sizeof tmp;
	while (got < n && (inb(0x3f8 + 5) & 0x01))
		tmp[got++] = inb(0x3f8);
	if (got && copy_to_user(p, buf, tmp, got))
		return -EFAULT;
	return (long)got;
}
