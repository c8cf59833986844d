/*
 * systest[:DIR]: checks the system calls the test guest implements, with
 * their error returns. It runs unchanged on Linux (it is a static Linux
 * x86-64 program), so tests can compare its output there and in the guest.
 * DIR (default /tmp) must be an existing, empty-enough directory.
 * Prints "systest: ok NAME" or "systest: FAIL NAME got=X want=Y" per check.
 */
#include "libc.h"

static int failures, checks;
static char dir[200];

static void check(const char *name, long got, long want)
{
	checks++;
	if (got == want) {
		printf("systest: ok %s\n", name);
	} else {
		failures++;
		printf("systest: FAIL %s got=%ld want=%ld\n", name, got, want);
	}
}

static void check_true(const char *name, int cond, long got)
{
	checks++;
	if (cond) {
		printf("systest: ok %s\n", name);
	} else {
		failures++;
		printf("systest: FAIL %s got=%ld\n", name, got);
	}
}

static const char *path(const char *name)
{
	static char buf[2][300];
	static int k;
	char *b = buf[k++ & 1];
	snprintf(b, 300, "%s/%s", dir, name);
	return b;
}

static void *const BAD = (void *)0x10;
static void *const KERNEL_PTR = (void *)0xffff800000100000UL;

static void files(void)
{
	char buf[128];
	struct stat st;
	check("openat-enoent", sys_openat(AT_FDCWD, path("missing"), O_RDONLY, 0), -ENOENT);
	check("openat-efault", sys_openat(AT_FDCWD, BAD, O_RDONLY, 0), -EFAULT);
	check("openat-empty", sys_openat(AT_FDCWD, "", O_RDONLY, 0), -ENOENT);
	check("openat-creat-in-missing-dir", sys_openat(AT_FDCWD, path("nodir/f"), O_CREAT | O_RDWR, 0644), -ENOENT);
	char longname[300];
	memset(longname, 'a', 299);
	longname[299] = 0;
	check("openat-enametoolong", sys_openat(AT_FDCWD, longname, O_RDONLY, 0), -ENAMETOOLONG);

	long fd = sys_openat(AT_FDCWD, path("f1"), O_CREAT | O_RDWR | O_TRUNC, 0644);
	check_true("openat-creat", fd >= 3, fd);
	check("openat-eexist", sys_openat(AT_FDCWD, path("f1"), O_CREAT | O_EXCL | O_RDWR, 0644), -EEXIST);
	check("write-file", sys_write((int)fd, "hello world", 11), 11);
	check("lseek-cur", sys_lseek((int)fd, 0, SEEK_CUR), 11);
	check("lseek-set", sys_lseek((int)fd, 0, SEEK_SET), 0);
	memset(buf, 0, sizeof buf);
	check("read-file", sys_read((int)fd, buf, sizeof buf), 11);
	check("read-content", memcmp(buf, "hello world", 11), 0);
	check("read-eof", sys_read((int)fd, buf, sizeof buf), 0);
	check("lseek-negative", sys_lseek((int)fd, -1, SEEK_SET), -EINVAL);
	check("lseek-whence", sys_lseek((int)fd, 0, 7), -EINVAL);
	check("lseek-end", sys_lseek((int)fd, -5, SEEK_END), 6);
	check("read-after-seek-end", sys_read((int)fd, buf, 5), 5);
	check("read-after-seek-content", memcmp(buf, "world", 5), 0);
	check("lseek-past-end", sys_lseek((int)fd, 100, SEEK_SET), 100);
	check("write-past-end", sys_write((int)fd, "x", 1), 1);
	check("fstat", sys_fstat((int)fd, &st), 0);
	check("fstat-size", st.st_size, 101);
	check("fstat-isreg", st.st_mode & S_IFMT, S_IFREG);
	check("lseek-hole", sys_lseek((int)fd, 50, SEEK_SET), 50);
	buf[0] = 'z';
	check("read-hole", sys_read((int)fd, buf, 1), 1);
	check("read-hole-zero", buf[0], 0);
	check("lseek-rewind", sys_lseek((int)fd, 0, SEEK_SET), 0);
	check("read-efault", sys_read((int)fd, BAD, 5), -EFAULT);
	check("read-efault-kernel", sys_read((int)fd, KERNEL_PTR, 5), -EFAULT);
	check("write-efault", sys_write((int)fd, BAD, 5), -EFAULT);
	check("fstat-efault", sys_fstat((int)fd, BAD), -EFAULT);
	check("fstat-ebadf", sys_fstat(99, &st), -EBADF);
	check("close", sys_close((int)fd), 0);
	check("close-ebadf", sys_close((int)fd), -EBADF);
	check("read-ebadf", sys_read((int)fd, buf, 1), -EBADF);

	long ro = sys_openat(AT_FDCWD, path("f1"), O_RDONLY, 0);
	check_true("openat-rdonly", ro >= 0, ro);
	check("write-rdonly-ebadf", sys_write((int)ro, "x", 1), -EBADF);
	sys_close((int)ro);
	long wo = sys_openat(AT_FDCWD, path("f1"), O_WRONLY | O_APPEND, 0);
	check_true("openat-append", wo >= 0, wo);
	check("read-wronly-ebadf", sys_read((int)wo, buf, 1), -EBADF);
	check("write-append", sys_write((int)wo, "!", 1), 1);
	check("fstat-append", sys_fstat((int)wo, &st) == 0 ? st.st_size : -1, 102);
	sys_close((int)wo);
	long tr = sys_openat(AT_FDCWD, path("f1"), O_RDWR | O_TRUNC, 0);
	check("fstat-trunc", sys_fstat((int)tr, &st) == 0 ? st.st_size : -1, 0);
	check("write-after-trunc", sys_write((int)tr, "hello world", 11), 11);
	sys_close((int)tr);

	long d = sys_openat(AT_FDCWD, dir, O_RDONLY | O_DIRECTORY, 0);
	check_true("openat-dir", d >= 0, d);
	check("fstat-isdir", sys_fstat((int)d, &st) == 0 ? (long)(st.st_mode & S_IFMT) : -1, S_IFDIR);
	check("read-dir-eisdir", sys_read((int)d, buf, 10), -EISDIR);
	long rel = sys_openat((int)d, "f1", O_RDONLY, 0);
	check_true("openat-relative", rel >= 0, rel);
	memset(buf, 0, sizeof buf);
	check("read-relative", sys_read((int)rel, buf, 5), 5);
	check("read-relative-content", memcmp(buf, "hello", 5), 0);
	sys_close((int)rel);
	check("openat-dotdot", (rel = sys_openat((int)d, "../", O_RDONLY | O_DIRECTORY, 0)) >= 0 ? 0 : rel, 0);
	if (rel >= 0)
		sys_close((int)rel);
	check("openat-relative-ebadf", sys_openat(99, "f1", O_RDONLY, 0), -EBADF);
	check("openat-relative-enotdir", sys_openat(1, "f1", O_RDONLY, 0), -ENOTDIR);
	sys_close((int)d);
	check("openat-dir-wronly", sys_openat(AT_FDCWD, dir, O_WRONLY, 0), -EISDIR);
	check("openat-notdir-component", sys_openat(AT_FDCWD, path("f1/x"), O_RDONLY, 0), -ENOTDIR);
	check("openat-directory-on-file", sys_openat(AT_FDCWD, path("f1"), O_RDONLY | O_DIRECTORY, 0), -ENOTDIR);
	check("openat-trailing-slash-file", sys_openat(AT_FDCWD, path("f1/"), O_RDONLY, 0), -ENOTDIR);
}

static void stdio(void)
{
	struct stat st;
	check("write-stdout", sys_write(1, "systest: write to stdout\n", 25), 25);
	check("write-stdout-efault", sys_write(1, BAD, 5), -EFAULT);
	check("write-ebadf", sys_write(99, "x", 1), -EBADF);
	check("write-negative-fd", sys_write(-1, "x", 1), -EBADF);
	check("write-zero", sys_write(1, "x", 0), 0);
	check("lseek-stdout-espipe", sys_lseek(1, 0, SEEK_CUR), -ESPIPE);
	check("fstat-stdout", sys_fstat(1, &st), 0);
}

static void memory(void)
{
	char *p = sys_mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	check_true("mmap", (long)p > 0 && ((long)p & 4095) == 0, (long)p);
	check("mmap-zero-filled", p[0] | p[8191], 0);
	p[0] = 1;
	p[8191] = 2;
	check("mmap-readback", p[0] + p[8191], 3);
	check("munmap-unaligned", sys_munmap(p + 1, 4096), -EINVAL);
	check("munmap-zero", sys_munmap(p, 0), -EINVAL);
	check("munmap-second-page", sys_munmap(p + 4096, 4096), 0);
	check("mmap-first-page-kept", p[0], 1);
	check("write-from-unmapped-efault", sys_write(1, p + 4096, 1), -EFAULT);
	check("munmap", sys_munmap(p, 4096), 0);
	check("write-from-munmapped-efault", sys_write(1, p, 1), -EFAULT);
	check("mmap-len-zero", (long)sys_mmap(NULL, 0, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), -EINVAL);
	check("mmap-no-type", (long)sys_mmap(NULL, 4096, PROT_READ, MAP_ANONYMOUS, -1, 0), -EINVAL);
	char *ro = sys_mmap(NULL, 4096, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	check_true("mmap-readonly", (long)ro > 0, (long)ro);
	long fd = sys_openat(AT_FDCWD, path("f1"), O_RDONLY, 0);
	check("read-into-readonly-efault", sys_read((int)fd, ro, 4), -EFAULT);
	sys_close((int)fd);
	check("munmap-readonly", sys_munmap(ro, 4096), 0);

	char *b0 = (char *)sys_brk(0);
	check_true("brk-query", (long)b0 > 0, (long)b0);
	check("brk-grow", sys_brk(b0 + 8192), (long)(b0 + 8192));
	b0[0] = 7;
	b0[8191] = 8;
	check("brk-memory", b0[0] + b0[8191], 15);
	check("brk-shrink", sys_brk(b0), (long)b0);
	check("brk-invalid-keeps-break", sys_brk((void *)1), (long)b0);
	check("write-from-shrunk-heap-efault", sys_write(1, b0 + 4096, 1), -EFAULT);
}

static void misc(void)
{
	struct timespec a, b, req;
	check_true("getpid", sys_getpid() > 0, sys_getpid());
	check("clock-gettime", sys_clock_gettime(CLOCK_MONOTONIC, &a), 0);
	check_true("clock-gettime-nsec-range", a.tv_nsec >= 0 && a.tv_nsec < 1000000000L, a.tv_nsec);
	check("clock-gettime-realtime", sys_clock_gettime(CLOCK_REALTIME, &b), 0);
	check("clock-gettime-einval", sys_clock_gettime(999, &b), -EINVAL);
	check("clock-gettime-efault", sys_clock_gettime(CLOCK_MONOTONIC, BAD), -EFAULT);
	req.tv_sec = 0;
	req.tv_nsec = 3000000;
	check("nanosleep", sys_nanosleep(&req, NULL), 0);
	sys_clock_gettime(CLOCK_MONOTONIC, &b);
	long el = (b.tv_sec - a.tv_sec) * 1000000000L + (b.tv_nsec - a.tv_nsec);
	check_true("nanosleep-elapsed", el >= 3000000L, el);
	req.tv_nsec = 1000000000L;
	check("nanosleep-einval", sys_nanosleep(&req, NULL), -EINVAL);
	req.tv_sec = -1;
	req.tv_nsec = 0;
	check("nanosleep-negative-einval", sys_nanosleep(&req, NULL), -EINVAL);
	check("nanosleep-efault", sys_nanosleep(BAD, NULL), -EFAULT);
	check("sched-yield", sys_sched_yield(), 0);
	check("enosys", syscall6(1000, 0, 0, 0, 0, 0, 0), -ENOSYS);
}

int main(int argc, char **argv)
{
	strcpy(dir, argc > 1 && strlen(argv[1]) < 150 ? argv[1] : "/tmp");
	stdio();
	files();
	memory();
	misc();
	printf("systest: done checks=%d failures=%d\n", checks, failures);
	return failures ? 1 : 0;
}
