/*
 * chat[:POLL_MS]: the interactive app of the console tests. It reads lines from the
 * serial console (stdin: the kernel hands over what the UART has received, or 0 bytes
 * when nothing has, as a Linux tty with VMIN=0 VTIME=0), polling every POLL_MS
 * milliseconds (default 10), and answers each line with "chat: got LINE (line N)".
 * The line "quit", or a hangup (the carrier dropping: umbra stop), ends it with status
 * 0. Lines end with CR or LF; at most 127 bytes.
 *
 * chat:POLL_MS:disk also writes each line to the virtio-blk disk /dev/vda before it
 * answers: "LINE\n" at byte N * 65536 (N = the line's number, 1-63: one 64 KiB
 * backup tracking chunk each), then closes the disk, which flushes it, and answers
 * "chat: wrote LINE at N" (or "chat: disk: ... failed: ERR").
 */
#include "libc.h"

#define DISK_STRIDE 65536

/* disk_write writes line (len bytes and a newline) at n * DISK_STRIDE of /dev/vda and
 * closes the disk (which flushes it). */
static long disk_write(const char *line, size_t len, long n)
{
	char rec[130];
	memcpy(rec, line, len);
	rec[len] = '\n';
	long fd = sys_openat(AT_FDCWD, "/dev/vda", O_WRONLY, 0);
	if (fd < 0)
		return fd;
	long r = sys_lseek((int)fd, n * DISK_STRIDE, SEEK_SET);
	if (r == n * DISK_STRIDE)
		r = sys_write((int)fd, rec, len + 1);
	long c = sys_close((int)fd);
	if (r >= 0 && r != (long)len + 1)
		r = -1;
	return r < 0 ? r : c;
}

int main(int argc, char **argv)
{
	long poll_ms = argc > 1 ? atol(argv[1]) : 10;
	int disk = argc > 2 && !strcmp(argv[2], "disk");
	struct timespec ts = {poll_ms / 1000, (poll_ms % 1000) * 1000000L};
	char line[128];
	size_t len = 0;
	long lines = 0;
	printf("chat: ready\n");
	for (;;) {
		char buf[64];
		long n = sys_read(0, buf, sizeof buf);
		if (n == -5) { /* -EIO: the line hung up (the monitor's graceful stop) */
			printf("chat: hangup after %ld lines\n", lines);
			return 0;
		}
		if (n < 0) {
			printf("chat: read: error %ld\n", n);
			return 1;
		}
		if (n == 0) {
			sys_nanosleep(&ts, NULL);
			continue;
		}
		for (long i = 0; i < n; i++) {
			char c = buf[i];
			if (c != '\r' && c != '\n') {
				if (len < sizeof line - 1)
					line[len++] = c;
				continue;
			}
			if (len == 0)
				continue;
			line[len] = 0;
			len = 0;
			lines++;
			if (!strcmp(line, "quit")) {
				printf("chat: bye after %ld lines\n", lines);
				return 0;
			}
			if (disk) {
				long r = lines < DISK_STRIDE / 1024 ? disk_write(line, strlen(line), lines) : -22;
				if (r < 0)
					printf("chat: disk: write of line %ld failed: %ld\n", lines, r);
				else
					printf("chat: wrote %s at %ld\n", line, lines);
			}
			printf("chat: got %s (line %ld)\n", line, lines);
		}
	}
}
