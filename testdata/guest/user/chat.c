/*
 * chat[:POLL_MS]: the interactive app of the console tests. It reads lines from the
 * serial console (stdin: the kernel hands over what the UART has received, or 0 bytes
 * when nothing has, as a Linux tty with VMIN=0 VTIME=0), polling every POLL_MS
 * milliseconds (default 10), and answers each line with "chat: got LINE (line N)".
 * The line "quit", or a hangup (the carrier dropping: umbra stop), ends it with status
 * 0. Lines end with CR or LF; at most 127 bytes.
 */
#include "libc.h"

int main(int argc, char **argv)
{
	long poll_ms = argc > 1 ? atol(argv[1]) : 10;
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
			printf("chat: got %s (line %ld)\n", line, lines);
		}
	}
}
