// Package jail narrows what a VM's monitor process can do once it holds the file
// descriptors it needs (KVM, guest memory, TPM, audit and event logs, its control
// socket), as Firecracker's jailer does for its VMM: a mount view of its own with only
// its state directory and the user and group databases, no root (another uid and gid,
// no supplementary groups), no new privileges, and a seccomp filter that allows only
// the system calls the monitor makes; any other ends the process (SIGSYS). A guest that
// took over the monitor would find little to use. docs/api.md documents the filter and
// how to extend it.
//
// The filter is built with github.com/elastic/go-seccomp-bpf (pure Go, no libseccomp),
// which assembles a BPF program from syscall names and installs it with TSYNC on every
// thread of the process.
package jail

import (
	"errors"
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"runtime"
	"strconv"
	"syscall"

	seccomp "github.com/elastic/go-seccomp-bpf"
	"golang.org/x/sys/unix"
)

// Config says what the jailed process keeps.
type Config struct {
	// StateDir stays writable at the same path in the new mount view; everything else
	// of the host's file system is gone except /etc/passwd, /etc/group and
	// /etc/nsswitch.conf (read-only, for naming control-socket peers).
	StateDir string
	// UID and GID the process runs as from then on; both must be non-zero.
	UID, GID int
	// Seccomp installs the filter (Allowed, EPERM for Refused, death for the rest).
	Seccomp bool
	// Extra are system calls allowed on top of Allowed (for a feature that needs one).
	Extra []string
	// Deny removes system calls from Allowed: the tests use it to make the monitor
	// meet a forbidden call on a path they drive.
	Deny []string
}

// Allowed are the system calls a jailed monitor makes: the Go runtime (threads,
// memory, signals, timers, the network poller), KVM (ioctl on held descriptors, kicks
// with tgkill), the audit and event logs (write, fsync on held files), the control
// socket (accept4, SO_PEERCRED/SO_PEERGROUPS), naming peers (reading /etc/passwd and
// /etc/group through glibc), and the guest memory views of cloaking.
var Allowed = []string{
	// Go runtime and glibc threads
	"read", "write", "close", "mmap", "munmap", "mprotect", "madvise", "mremap", "brk",
	"futex", "sched_yield", "nanosleep", "clock_nanosleep", "clock_gettime", "gettimeofday",
	"gettid", "getpid", "getppid", "tgkill", "rt_sigaction", "rt_sigprocmask", "rt_sigreturn",
	"sigaltstack", "clone", "clone3", "exit", "exit_group", "set_robust_list", "rseq",
	"sched_getaffinity", "getrandom", "restart_syscall", "prlimit64", "uname",
	"getuid", "geteuid", "getgid", "getegid",
	// descriptors and files already open, and the few reads the monitor still makes
	"openat", "newfstatat", "fstat", "lseek", "pread64", "pwrite64", "readv", "writev",
	"fsync", "fdatasync", "fcntl", "dup", "dup3", "pipe2", "unlinkat", "getdents64", "ftruncate",
	"fallocate", "memfd_create", "userfaultfd",
	// The state directory's cross-process locks and atomic files (statefile), and the
	// snapshot store's commit, which links a finished file into place so that it never
	// replaces one (snapstore).
	"flock", "renameat", "renameat2", "mkdirat", "linkat", "fchmod",
	// cloaking: the userfaultfd serving loop (kvm.Userfaultfd.Serve)
	"ppoll", "poll",
	// the network poller and the control socket
	"epoll_create1", "epoll_ctl", "epoll_pwait", "epoll_wait", "eventfd2",
	"accept4", "getsockname", "getpeername", "getsockopt", "setsockopt", "shutdown",
	"recvfrom", "sendto", "recvmsg", "sendmsg",
	// KVM
	"ioctl",
}

// Refused fail with EPERM instead of ending the monitor: glibc's name lookup tries the
// name-service cache daemon's socket before the files, and a refusal there is expected.
var Refused = []string{"socket", "connect"}

// Enter jails the calling process. As root it must be called from a process in a
// mount namespace of its own (the monitor is started with CLONE_NEWNS); started by an
// unprivileged user, the monitor keeps that user's ids and the host's mount view, and
// gets no_new_privs and the filter. It locks the calling goroutine to its thread while
// it works. On error the process may be partly jailed
// and must not go on.
func Enter(cfg Config) error {
	if cfg.UID <= 0 || cfg.GID <= 0 {
		return fmt.Errorf("jail: uid %d gid %d: the monitor must not keep root", cfg.UID, cfg.GID)
	}
	if !filepath.IsAbs(cfg.StateDir) {
		return fmt.Errorf("jail: state directory %q is not absolute", cfg.StateDir)
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	// Name lookups load glibc's NSS modules on first use; do it while they can be read.
	user.LookupId("0")
	user.LookupGroupId("0")
	if os.Geteuid() == 0 {
		if err := mountView(cfg.StateDir); err != nil {
			return fmt.Errorf("jail: mount view: %w", err)
		}
		if err := dropRoot(cfg.UID, cfg.GID); err != nil {
			return fmt.Errorf("jail: drop root: %w", err)
		}
	} else if os.Geteuid() != cfg.UID || os.Getegid() != cfg.GID {
		return fmt.Errorf("jail: a monitor running as uid %d cannot become uid %d gid %d", os.Geteuid(), cfg.UID, cfg.GID)
	}
	// An unprivileged monitor keeps its ids and the host's mount view (it may not make
	// one); no_new_privs and the filter still apply.
	if !cfg.Seccomp {
		return unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
	}
	f := seccomp.Filter{
		NoNewPrivs: true,
		Flag:       seccomp.FilterFlagTSync,
		Policy: seccomp.Policy{
			DefaultAction: seccomp.ActionKillProcess,
			Syscalls: []seccomp.SyscallGroup{
				{Action: seccomp.ActionAllow, Names: allowed(cfg)},
				{Action: seccomp.ActionErrno, Names: Refused},
			},
		},
	}
	if err := seccomp.LoadFilter(f); err != nil {
		return fmt.Errorf("jail: seccomp filter: %w", err)
	}
	return nil
}

func allowed(cfg Config) []string {
	deny := map[string]bool{}
	for _, s := range cfg.Deny {
		deny[s] = true
	}
	var out []string
	for _, s := range append(append([]string{}, Allowed...), cfg.Extra...) {
		if !deny[s] {
			out = append(out, s)
		}
	}
	return out
}

// mountView replaces the root with a tmpfs holding only the state directory (bound
// read-write at its own path) and the user and group databases (read-only).
func mountView(stateDir string) error {
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("make mounts private (is the monitor in its own mount namespace?): %w", err)
	}
	root, err := os.MkdirTemp("", "umbra-jail-")
	if err != nil {
		return err
	}
	if err := unix.Mount("umbra-jail", root, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, "mode=0755,size=1m"); err != nil {
		return fmt.Errorf("tmpfs: %w", err)
	}
	bind := func(src string, ro, dir bool) error {
		dst := filepath.Join(root, src)
		if dir {
			if err := os.MkdirAll(dst, 0o755); err != nil {
				return err
			}
		} else {
			if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
				return err
			}
			if err := os.WriteFile(dst, nil, 0o644); err != nil {
				return err
			}
		}
		if err := unix.Mount(src, dst, "", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("bind %s: %w", src, err)
		}
		flags := uintptr(unix.MS_BIND | unix.MS_REMOUNT | unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC)
		if ro {
			flags |= unix.MS_RDONLY
		}
		if err := unix.Mount("", dst, "", flags, ""); err != nil {
			return fmt.Errorf("remount %s: %w", src, err)
		}
		return nil
	}
	if err := bind(stateDir, false, true); err != nil {
		return err
	}
	for _, f := range []string{"/etc/passwd", "/etc/group", "/etc/nsswitch.conf"} {
		if _, err := os.Stat(f); errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err := bind(f, true, false); err != nil {
			return err
		}
	}
	old := filepath.Join(root, ".old-root")
	if err := os.Mkdir(old, 0o700); err != nil {
		return err
	}
	if err := unix.PivotRoot(root, old); err != nil {
		return fmt.Errorf("pivot_root: %w", err)
	}
	if err := unix.Chdir("/"); err != nil {
		return err
	}
	if err := unix.Unmount("/.old-root", unix.MNT_DETACH); err != nil {
		return fmt.Errorf("detach the old root: %w", err)
	}
	if err := os.Remove("/.old-root"); err != nil {
		return err
	}
	// The new root itself is read-only from now on.
	return unix.Mount("", "/", "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, "")
}

// dropRoot switches every thread to uid and gid with no supplementary groups (Go's
// syscall package applies these to all threads).
func dropRoot(uid, gid int) error {
	if err := syscall.Setgroups(nil); err != nil {
		return fmt.Errorf("setgroups: %w", err)
	}
	if err := syscall.Setresgid(gid, gid, gid); err != nil {
		return fmt.Errorf("setresgid %d: %w", gid, err)
	}
	if err := syscall.Setresuid(uid, uid, uid); err != nil {
		return fmt.Errorf("setresuid %d: %w", uid, err)
	}
	if os.Getuid() != uid || os.Geteuid() != uid || os.Getgid() != gid {
		return errors.New("ids did not change")
	}
	return nil
}

// LookupUser returns the uid and gid of a user name or number.
func LookupUser(name string) (uid, gid int, err error) {
	u, err := user.Lookup(name)
	if err != nil {
		if _, nerr := strconv.Atoi(name); nerr == nil {
			u, err = user.LookupId(name)
		}
	}
	if err != nil {
		return 0, 0, fmt.Errorf("jail user %q: %w", name, err)
	}
	uid, _ = strconv.Atoi(u.Uid)
	gid, _ = strconv.Atoi(u.Gid)
	return uid, gid, nil
}
