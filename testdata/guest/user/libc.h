/* The test apps' tiny libc: raw Linux system calls (they return -errno),
 * strings, printf to stdout, and the monitor doorbell. */
#ifndef LIBC_H
#define LIBC_H

#include "../include/umbra_guest.h"

typedef unsigned long size_t;
typedef long ssize_t;
typedef unsigned long u64;
typedef unsigned char u8;
#define NULL ((void *)0)

#define O_RDONLY 0
#define O_WRONLY 1
#define O_RDWR 2
#define O_CREAT 0100
#define O_EXCL 0200
#define O_TRUNC 01000
#define O_APPEND 02000
#define O_DIRECTORY 0200000
#define AT_FDCWD (-100)
#define SEEK_SET 0
#define SEEK_CUR 1
#define SEEK_END 2
#define PROT_READ 1
#define PROT_WRITE 2
#define PROT_EXEC 4
#define MAP_SHARED 1
#define MAP_PRIVATE 2
#define MAP_ANONYMOUS 0x20
#define CLOCK_REALTIME 0
#define CLOCK_MONOTONIC 1
#define S_IFMT 0170000
#define S_IFREG 0100000
#define S_IFDIR 0040000

#define EBADF 9
#define ENOENT 2
#define EFAULT 14
#define EEXIST 17
#define ENOTDIR 20
#define EISDIR 21
#define EINVAL 22
#define ESPIPE 29
#define ENAMETOOLONG 36
#define ENOSYS 38

struct timespec {
	long tv_sec, tv_nsec;
};
struct stat {
	u64 st_dev, st_ino, st_nlink;
	unsigned st_mode, st_uid, st_gid, pad0;
	u64 st_rdev;
	long st_size, st_blksize, st_blocks;
	u64 st_atime, st_atime_nsec, st_mtime, st_mtime_nsec, st_ctime, st_ctime_nsec;
	long reserved[3];
};

long syscall6(long n, long a, long b, long c, long d, long e, long f);
long sys_read(int fd, void *buf, size_t n);
long sys_write(int fd, const void *buf, size_t n);
long sys_openat(int dirfd, const char *path, int flags, int mode);
long sys_close(int fd);
long sys_lseek(int fd, long off, int whence);
long sys_fstat(int fd, struct stat *st);
void *sys_mmap(void *addr, size_t len, int prot, int flags, int fd, long off);
long sys_mprotect(void *addr, size_t len, int prot);
long sys_munmap(void *addr, size_t len);
long sys_brk(void *addr);
long sys_getpid(void);
long sys_sched_yield(void);
long sys_nanosleep(const struct timespec *req, struct timespec *rem);
long sys_clock_gettime(int clk, struct timespec *ts);
__attribute__((noreturn)) void sys_exit_group(int status);

long hypercall(long nr, long a1, long a2);

size_t strlen(const char *s);
int strcmp(const char *a, const char *b);
int strncmp(const char *a, const char *b, size_t n);
char *strcpy(char *d, const char *s);
char *strcat(char *d, const char *s);
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
long atol(const char *s);

typedef __builtin_va_list va_list;
#define va_start __builtin_va_start
#define va_end __builtin_va_end
#define va_arg __builtin_va_arg
int vsnprintf(char *buf, size_t n, const char *fmt, va_list ap);
int snprintf(char *buf, size_t n, const char *fmt, ...);
int printf(const char *fmt, ...);

u64 now_ns(void);
void spin_ms(long ms);

#endif
