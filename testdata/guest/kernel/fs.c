/*
 * A small RAM file system with directories, and the per-process file
 * descriptor table. fds 0, 1, 2 are the console: reads return end of file,
 * writes go to the monitor's console through CONSOLE_WRITE. /dev/vdX are the
 * virtio-blk disks (vblk.c): a read or write at the file offset is a read or
 * write of the disk at that byte, the size is the disk's, and the last close of
 * a file that wrote (or fsync) flushes the disk.
 */
#include "kernel.h"

#define MAX_NODES 64
#define MAX_FILES 64
#define NAME_MAX 27
#define PATH_MAX 256
#define FILE_PAGES 16 /* a file holds at most 64 KiB */
#define AT_FDCWD (-100)

#define O_ACCMODE 3
#define O_RDONLY 0
#define O_WRONLY 1
#define O_CREAT 0100
#define O_EXCL 0200
#define O_TRUNC 01000
#define O_APPEND 02000
#define O_DIRECTORY 0200000

struct node {
	int used, is_dir;
	char name[NAME_MAX + 1];
	struct node *parent;
	u64 size;
	u64 pages[FILE_PAGES];
	u64 mtime_ns;
	int disk; /* /dev/vdX: virtio-blk disk index + 1 */
};

enum { F_FREE, F_CONSOLE, F_NODE };
struct file {
	int kind, refs, flags;
	struct node *node;
	u64 off;
	int dirty; /* wrote to a disk since its last flush */
};

static struct node nodes[MAX_NODES];
static struct file files[MAX_FILES];
static struct file console_in = {F_CONSOLE, 1, O_RDONLY, NULL, 0, 0};
static struct file console_out = {F_CONSOLE, 1, O_WRONLY, NULL, 0, 0};

static struct node *node_new(struct node *parent, const char *name, size_t len, int is_dir)
{
	for (int i = 0; i < MAX_NODES; i++) {
		if (nodes[i].used)
			continue;
		struct node *n = &nodes[i];
		memset(n, 0, sizeof *n);
		n->used = 1;
		n->is_dir = is_dir;
		memcpy(n->name, name, len);
		n->parent = parent ? parent : n;
		n->mtime_ns = now_ns();
		return n;
	}
	return NULL;
}

static struct node *lookup(struct node *dir, const char *name, size_t len)
{
	if (len == 1 && name[0] == '.')
		return dir;
	if (len == 2 && name[0] == '.' && name[1] == '.')
		return dir->parent;
	for (int i = 0; i < MAX_NODES; i++)
		if (nodes[i].used && nodes[i].parent == dir && &nodes[i] != dir && !strncmp(nodes[i].name, name, len) &&
		    nodes[i].name[len] == 0)
			return &nodes[i];
	return NULL;
}

static void file_write_bytes(struct node *n, const char *s)
{
	size_t l = strlen(s);
	n->pages[0] = frame_alloc();
	memcpy(P2V(n->pages[0]), s, l);
	n->size = l;
}

void fs_init(void)
{
	struct node *root = node_new(NULL, "", 0, 1);
	struct node *etc = node_new(root, "etc", 3, 1);
	node_new(root, "tmp", 3, 1);
	node_new(root, "home", 4, 1);
	file_write_bytes(node_new(etc, "motd", 4, 0), "Welcome to the umbra test guest.\n");
	file_write_bytes(node_new(etc, "hostname", 8, 0), "umbra-guest\n");
}

/* fs_add_disk makes /dev/NAME for disk index (vblk_init). */
void fs_add_disk(const char *name, int index)
{
	struct node *dev = lookup(&nodes[0], "dev", 3);
	if (!dev)
		dev = node_new(&nodes[0], "dev", 3, 1);
	struct node *n = dev ? node_new(dev, name, strlen(name), 0) : NULL;
	if (!n) {
		kprintf("kernel: no room for /dev/%s\n", name);
		return;
	}
	n->disk = index + 1;
}

void fds_init(struct proc *p)
{
	p->fds[0].f = &console_in;
	p->fds[1].f = &console_out;
	p->fds[2].f = &console_out;
}

static struct file *fd_get(struct proc *p, int fd)
{
	if (fd < 0 || fd >= MAX_FDS)
		return NULL;
	return p->fds[fd].f;
}

/* file_put drops a reference; the last one of a file that wrote to a disk
 * flushes it (the result is close's). */
static long file_put(struct file *f)
{
	long r = 0;
	if (f->kind == F_NODE && --f->refs == 0) {
		if (f->dirty)
			r = vblk_flush(f->node->disk - 1);
		f->kind = F_FREE;
	}
	return r;
}

void fds_close_all(struct proc *p)
{
	for (int i = 0; i < MAX_FDS; i++) {
		if (p->fds[i].f)
			file_put(p->fds[i].f);
		p->fds[i].f = NULL;
	}
}

static void truncate(struct node *n)
{
	for (int i = 0; i < FILE_PAGES; i++) {
		if (n->pages[i])
			frame_free(n->pages[i]);
		n->pages[i] = 0;
	}
	n->size = 0;
}

long sys_openat(struct proc *p, int dirfd, u64 upath, int flags, int mode)
{
	char path[PATH_MAX];
	(void)mode;
	int len = strncpy_from_user(p, path, upath, sizeof path);
	if (len < 0)
		return len;
	if (len == 0)
		return -ENOENT;
	int acc = flags & O_ACCMODE;
	if (acc == 3)
		return -EINVAL;
	struct node *dir = &nodes[0];
	if (path[0] != '/' && dirfd != AT_FDCWD) {
		struct file *df = fd_get(p, dirfd);
		if (!df)
			return -EBADF;
		if (df->kind != F_NODE || !df->node->is_dir)
			return -ENOTDIR;
		dir = df->node;
	}
	/* Walk every component but the last. */
	const char *s = path, *last = NULL;
	size_t last_len = 0;
	int trailing_slash = len > 0 && path[len - 1] == '/';
	for (;;) {
		while (*s == '/')
			s++;
		if (!*s)
			break;
		const char *e = s;
		while (*e && *e != '/')
			e++;
		size_t cl = (size_t)(e - s);
		if (cl > NAME_MAX)
			return -ENAMETOOLONG;
		const char *rest = e;
		while (*rest == '/')
			rest++;
		if (!*rest) {
			last = s;
			last_len = cl;
			break;
		}
		struct node *n = lookup(dir, s, cl);
		if (!n)
			return -ENOENT;
		if (!n->is_dir)
			return -ENOTDIR;
		dir = n;
		s = e;
	}
	struct node *n = last ? lookup(dir, last, last_len) : dir;
	if (!n) {
		if (!(flags & O_CREAT))
			return -ENOENT;
		if (trailing_slash)
			return -EISDIR;
		if (flags & O_DIRECTORY)
			return -EINVAL;
		n = node_new(dir, last, last_len, 0);
		if (!n)
			return -ENOSPC;
	} else {
		if ((flags & O_CREAT) && (flags & O_EXCL))
			return -EEXIST;
		if (n->is_dir && (acc != O_RDONLY || (flags & O_CREAT)))
			return -EISDIR;
		if (!n->is_dir && ((flags & O_DIRECTORY) || trailing_slash))
			return -ENOTDIR;
	}
	int fd = -1;
	for (int i = 0; i < MAX_FDS; i++)
		if (!p->fds[i].f) {
			fd = i;
			break;
		}
	if (fd < 0)
		return -EMFILE;
	struct file *f = NULL;
	for (int i = 0; i < MAX_FILES; i++)
		if (files[i].kind == F_FREE) {
			f = &files[i];
			break;
		}
	if (!f)
		return -ENFILE;
	if (n->disk && acc != O_RDONLY && vblk_readonly(n->disk - 1))
		return -EROFS;
	if ((flags & O_TRUNC) && !n->is_dir && !n->disk && acc != O_RDONLY)
		truncate(n);
	*f = (struct file){F_NODE, 1, flags, n, 0, 0};
	p->fds[fd].f = f;
	return fd;
}

long sys_close(struct proc *p, int fd)
{
	struct file *f = fd_get(p, fd);
	if (!f)
		return -EBADF;
	p->fds[fd].f = NULL;
	return file_put(f);
}

long sys_fsync(struct proc *p, int fd)
{
	struct file *f = fd_get(p, fd);
	if (!f)
		return -EBADF;
	if (f->kind != F_NODE || !f->node->disk)
		return 0;
	long r = vblk_flush(f->node->disk - 1);
	if (r == 0)
		f->dirty = 0;
	return r;
}

long sys_read(struct proc *p, int fd, u64 buf, u64 n)
{
	struct file *f = fd_get(p, fd);
	if (!f || (f->flags & O_ACCMODE) == O_WRONLY)
		return -EBADF;
	if (f->kind == F_CONSOLE)
		return serial_read(p, buf, n);
	struct node *nd = f->node;
	if (nd->is_dir)
		return -EISDIR;
	if (nd->disk) {
		long r = vblk_rw(nd->disk - 1, f->off, p, buf, n, 0);
		if (r > 0)
			f->off += (u64)r;
		return r;
	}
	u64 done = 0;
	while (done < n && f->off < nd->size) {
		u64 pg = f->off / PAGE_SIZE, po = f->off % PAGE_SIZE;
		u64 c = PAGE_SIZE - po;
		if (c > nd->size - f->off)
			c = nd->size - f->off;
		if (c > n - done)
			c = n - done;
		static const u8 zero[PAGE_SIZE];
		const u8 *src = nd->pages[pg] ? (const u8 *)P2V(nd->pages[pg]) + po : zero;
		if (copy_to_user(p, buf + done, src, c))
			return done ? (long)done : -EFAULT;
		done += c;
		f->off += c;
	}
	return (long)done;
}

long sys_write(struct proc *p, int fd, u64 buf, u64 n)
{
	struct file *f = fd_get(p, fd);
	if (!f || (f->flags & O_ACCMODE) == O_RDONLY)
		return -EBADF;
	u64 done = 0;
	if (f->kind == F_CONSOLE) {
		char kbuf[1024];
		while (done < n) {
			u64 c = n - done > sizeof kbuf ? sizeof kbuf : n - done;
			if (copy_from_user(p, kbuf, buf + done, c))
				return done ? (long)done : -EFAULT;
			console_write(kbuf, c);
			done += c;
		}
		return (long)done;
	}
	struct node *nd = f->node;
	if (nd->is_dir)
		return -EISDIR;
	if (nd->disk) {
		long r = vblk_rw(nd->disk - 1, f->off, p, buf, n, 1);
		if (r > 0) {
			f->off += (u64)r;
			f->dirty = 1;
		}
		return r;
	}
	if (f->flags & O_APPEND)
		f->off = nd->size;
	u64 max = FILE_PAGES * PAGE_SIZE;
	if (n > 0 && f->off >= max)
		return -EFBIG;
	if (n > max - f->off)
		n = max - f->off;
	while (done < n) {
		u64 pg = f->off / PAGE_SIZE, po = f->off % PAGE_SIZE;
		u64 c = PAGE_SIZE - po;
		if (c > n - done)
			c = n - done;
		if (!nd->pages[pg] && !(nd->pages[pg] = frame_alloc()))
			return done ? (long)done : -ENOSPC;
		if (copy_from_user(p, (u8 *)P2V(nd->pages[pg]) + po, buf + done, c))
			return done ? (long)done : -EFAULT;
		done += c;
		f->off += c;
		if (f->off > nd->size)
			nd->size = f->off;
	}
	if (done)
		nd->mtime_ns = now_ns();
	return (long)done;
}

long sys_lseek(struct proc *p, int fd, i64 off, int whence)
{
	struct file *f = fd_get(p, fd);
	if (!f)
		return -EBADF;
	if (f->kind == F_CONSOLE)
		return -ESPIPE;
	i64 base;
	switch (whence) {
	case 0:
		base = 0;
		break;
	case 1:
		base = (i64)f->off;
		break;
	case 2:
		base = f->node->disk ? (i64)vblk_size(f->node->disk - 1) : (i64)f->node->size;
		break;
	default:
		return -EINVAL;
	}
	i64 pos = base + off;
	if ((off > 0 && pos < base) || pos < 0)
		return -EINVAL;
	f->off = (u64)pos;
	return pos;
}

struct linux_stat {
	u64 st_dev, st_ino, st_nlink;
	u32 st_mode, st_uid, st_gid, pad0;
	u64 st_rdev;
	i64 st_size, st_blksize, st_blocks;
	u64 st_atime, st_atime_nsec, st_mtime, st_mtime_nsec, st_ctime, st_ctime_nsec;
	i64 reserved[3];
};

long sys_fstat(struct proc *p, int fd, u64 ubuf)
{
	struct file *f = fd_get(p, fd);
	if (!f)
		return -EBADF;
	struct linux_stat st;
	memset(&st, 0, sizeof st);
	st.st_dev = 1;
	st.st_blksize = PAGE_SIZE;
	if (f->kind == F_CONSOLE) {
		st.st_mode = 020620; /* S_IFCHR */
		st.st_nlink = 1;
		st.st_rdev = (5 << 8) | 1;
		st.st_ino = 1;
		st.st_dev = 5;
	} else {
		struct node *n = f->node;
		st.st_ino = (u64)(n - nodes) + 2;
		st.st_mode = n->is_dir ? 040755 : n->disk ? 060660 : 0100644;
		st.st_nlink = n->is_dir ? 2 : 1;
		st.st_size = n->is_dir ? (i64)PAGE_SIZE : n->disk ? (i64)vblk_size(n->disk - 1) : (i64)n->size;
		if (n->disk)
			st.st_rdev = (254UL << 8) | (u64)(n->disk - 1) * 16; /* virtblk's major, as on Linux */
		st.st_blocks = (st.st_size + 511) / 512;
		st.st_mtime = st.st_ctime = st.st_atime = n->mtime_ns / 1000000000UL;
		st.st_mtime_nsec = st.st_ctime_nsec = st.st_atime_nsec = n->mtime_ns % 1000000000UL;
	}
	if (copy_to_user(p, ubuf, &st, sizeof st))
		return -EFAULT;
	return 0;
}
