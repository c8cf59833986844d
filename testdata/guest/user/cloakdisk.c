/*
 * cloakdisk:MODE:RECORD[:cloak]: file I/O on the virtio-blk disk /dev/vda,
 * cloaked when the last argument is "cloak". RECORD (at most 200 bytes) is
 * kept in the app's memory and never printed.
 *
 *   write  writes RECORD at byte 8192, closes (the kernel flushes the disk),
 *          reopens and reads it back; then writes a 10000-byte pattern made
 *          from RECORD at the unaligned offset 70001 and reads it back
 *   read   reads strlen(RECORD) bytes at 8192 and compares them with RECORD
 *
 * Lines: "cloakdisk: /dev/vda is N bytes", "cloakdisk: record written, close 0",
 * "cloakdisk: record read back: match|mismatch", "cloakdisk: pattern read
 * back: match|mismatch", then "cloakdisk: done". Exit status 0 when everything
 * matched, 1 on a mismatch, 4 on a failed call (the line says which).
 */
#include "libc.h"
#include "../shim/cloak.h"

#define RECORD_OFF 8192
#define PATTERN_OFF 70001
#define PATTERN_LEN 10000

static char record[256];
static char buf[PATTERN_LEN];
static char pattern[PATTERN_LEN];

static int fail(const char *what, long r)
{
	printf("cloakdisk: %s failed: %ld\n", what, r);
	return 4;
}

/* xfer reads or writes all n bytes at off (read and write may move fewer). */
static long xfer(int fd, long off, char *p, size_t n, int write)
{
	long r = sys_lseek(fd, off, SEEK_SET);
	if (r != off)
		return r < 0 ? r : -1;
	for (size_t done = 0; done < n;) {
		r = write ? sys_write(fd, p + done, n - done) : sys_read(fd, p + done, n - done);
		if (r <= 0)
			return r < 0 ? r : -1;
		done += (size_t)r;
	}
	return 0;
}

static int read_back(const char *what, long off, const char *want, size_t n)
{
	long fd = sys_openat(AT_FDCWD, "/dev/vda", O_RDONLY, 0);
	if (fd < 0)
		return fail("open for reading", fd);
	memset(buf, 0, n);
	long r = xfer((int)fd, off, buf, n, 0);
	if (r)
		return fail("read", r);
	sys_close((int)fd);
	int ok = !memcmp(buf, want, n);
	printf("cloakdisk: %s read back: %s\n", what, ok ? "match" : "mismatch");
	return ok ? 0 : 1;
}

int main(int argc, char **argv)
{
	int cloak = argc > 1 && !strcmp(argv[argc - 1], "cloak");
	if (argc - cloak != 3 || strlen(argv[2]) > 200 || (strcmp(argv[1], "write") && strcmp(argv[1], "read"))) {
		printf("cloakdisk: usage cloakdisk:write|read:RECORD[:cloak] (at most 200 bytes)\n");
		return 2;
	}
	if (cloak) {
		long r = cloak_init("cloakdisk");
		if (r) {
			printf("cloakdisk: cloak_init failed: %ld\n", r);
			return 3;
		}
		printf("cloakdisk: cloaked\n");
	}
	strcpy(record, argv[2]);
	size_t n = strlen(record);
	long fd = sys_openat(AT_FDCWD, "/dev/vda", O_RDWR, 0);
	if (fd < 0)
		return fail("open /dev/vda", fd);
	struct stat st;
	long r = sys_fstat((int)fd, &st);
	if (r)
		return fail("fstat", r);
	printf("cloakdisk: /dev/vda is %ld bytes\n", st.st_size);
	if (!strcmp(argv[1], "read")) {
		sys_close((int)fd);
		int bad = read_back("record", RECORD_OFF, record, n);
		printf("cloakdisk: done\n");
		return bad;
	}
	if ((r = xfer((int)fd, RECORD_OFF, record, n, 1)))
		return fail("write", r);
	r = sys_close((int)fd);
	printf("cloakdisk: record written, close %ld\n", r);
	if (r)
		return 4;
	int bad = read_back("record", RECORD_OFF, record, n);
	for (size_t i = 0; i < PATTERN_LEN; i++)
		pattern[i] = (char)(record[i % n] ^ (char)(i / n));
	fd = sys_openat(AT_FDCWD, "/dev/vda", O_WRONLY, 0);
	if (fd < 0)
		return fail("open for the pattern", fd);
	if ((r = xfer((int)fd, PATTERN_OFF, pattern, PATTERN_LEN, 1)))
		return fail("pattern write", r);
	if ((r = sys_close((int)fd)))
		return fail("close after the pattern", r);
	bad |= read_back("pattern", PATTERN_OFF, pattern, PATTERN_LEN);
	printf("cloakdisk: done\n");
	return bad;
}
