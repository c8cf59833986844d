// Package tap opens the host side of a VM's network link: a Linux TAP device, created (or
// attached to, if it exists) in a network namespace the administrator names the way
// `ip netns` does (/var/run/netns/NAME), or handed over as an open file descriptor. The
// namespace switch happens on a locked OS thread of its own that returns to the host
// namespace before it is released, so no other goroutine ever runs in the VM's namespace.
// It uses golang.org/x/sys/unix; nothing is shelled out.
package tap

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"runtime"

	"golang.org/x/sys/unix"
)

// NetnsDir is where `ip netns add` binds named network namespaces.
var NetnsDir = "/var/run/netns"

var (
	netnsRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`)
	ifaceRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$`)
)

// ValidNetns checks a namespace name: a file name in NetnsDir, so never a path.
func ValidNetns(name string) error {
	if !netnsRE.MatchString(name) {
		return fmt.Errorf("network namespace %q must be 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit (a name `ip netns list` shows)", name)
	}
	return nil
}

// ValidName checks an interface name (at most 15 bytes, IFNAMSIZ-1).
func ValidName(name string) error {
	if !ifaceRE.MatchString(name) {
		return fmt.Errorf("TAP interface name %q must be 1-15 letters, digits, '_', '.' or '-', starting with a letter or digit", name)
	}
	return nil
}

// TAP is an open TAP device carrying Ethernet frames without packet information or a
// virtio-net header (IFF_TAP|IFF_NO_PI), and the lock that makes it this TAP's only user
// among umbra's VMs on the host. It is a virtio/net Backend.
type TAP struct {
	f     *os.File // the TAP's own descriptor: opened here, or a duplicate of an inherited one
	lock  *os.File
	name  string
	netns string
}

// Name is the interface's name; Netns the namespace it was opened in ("" when handed over).
func (t *TAP) Name() string  { return t.name }
func (t *TAP) Netns() string { return t.netns }

// File is the TAP's file (for benchmarks that write to it directly).
func (t *TAP) File() *os.File { return t.f }

// ReadPacket reads one frame (blocking; the runtime's poller waits).
func (t *TAP) ReadPacket(p []byte) (int, error) { return t.f.Read(p) }

// WritePacket writes one frame.
func (t *TAP) WritePacket(p []byte) error {
	n, err := t.f.Write(p)
	if err == nil && n != len(p) {
		err = fmt.Errorf("short write of %d of %d bytes", n, len(p))
	}
	return err
}

// Close closes the TAP's descriptor and releases its lock; a non-persistent TAP the
// monitor created disappears. An inherited descriptor FromFD duplicated stays open.
func (t *TAP) Close() error {
	err := t.f.Close()
	if lerr := t.lock.Close(); err == nil {
		err = lerr
	}
	return err
}

// Open opens the TAP device name inside the named network namespace, creating it there if
// it does not exist.
func Open(netns, name string) (*TAP, error) {
	if err := ValidNetns(netns); err != nil {
		return nil, err
	}
	if err := ValidName(name); err != nil {
		return nil, err
	}
	nsPath := filepath.Join(NetnsDir, netns)
	nsFD, err := unix.Open(nsPath, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("network namespace %s: open %s: %w (create it with `ip netns add %s`)", netns, nsPath, err, netns)
	}
	defer unix.Close(nsFD)
	if typ, err := unix.IoctlRetInt(nsFD, unix.NS_GET_NSTYPE); err != nil || typ != unix.CLONE_NEWNET {
		return nil, fmt.Errorf("network namespace %s: %s is not a network namespace (NS_GET_NSTYPE: %d, %v)", netns, nsPath, typ, err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(nsFD, &st); err != nil {
		return nil, fmt.Errorf("network namespace %s: %w", netns, err)
	}
	// Locked before it is opened: an attach to a TAP another VM holds must not happen.
	lock, err := lockTAP(st.Ino, name, "network namespace "+netns)
	if err != nil {
		return nil, err
	}
	type result struct {
		fd  int
		err error
	}
	done := make(chan result, 1)
	go func() {
		// This goroutine's thread is the only one that enters the namespace. If it cannot
		// get back, it stays locked, and the runtime ends the thread with the goroutine.
		runtime.LockOSThread()
		home, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			done <- result{-1, fmt.Errorf("the host's network namespace: %w", err)}
			return
		}
		defer unix.Close(home)
		if err := unix.Setns(nsFD, unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			done <- result{-1, fmt.Errorf("entering network namespace %s: %w (needs CAP_SYS_ADMIN)", netns, err)}
			return
		}
		fd, err := create(name)
		if rerr := unix.Setns(home, unix.CLONE_NEWNET); rerr != nil {
			if fd >= 0 {
				unix.Close(fd)
			}
			done <- result{-1, fmt.Errorf("returning to the host's network namespace: %w", rerr)}
			return // the thread stays locked and dies
		}
		runtime.UnlockOSThread()
		done <- result{fd, err}
	}()
	r := <-done
	if r.err != nil {
		lock.Close()
		return nil, fmt.Errorf("TAP %s in network namespace %s: %w", name, netns, r.err)
	}
	return &TAP{f: os.NewFile(uintptr(r.fd), "tap "+name), lock: lock, name: name, netns: netns}, nil
}

// create opens /dev/net/tun and attaches it to the TAP name (created if missing) in the
// calling thread's network namespace.
func create(name string) (int, error) {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		return -1, fmt.Errorf("open /dev/net/tun: %w", err)
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		unix.Close(fd)
		return -1, err
	}
	ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("TUNSETIFF %s: %w (an existing interface of that name must be a TAP without packet information, and the caller needs CAP_NET_ADMIN)", name, err)
	}
	return fd, nil
}

// FromFD opens the TAP device on fd, a descriptor umbra inherited (the administrator's
// tooling opened the TAP), which must be the TAP named name, without packet information
// or virtio-net header, and used by no other of umbra's VMs. The TAP gets a duplicate
// descriptor of its own (close-on-exec, closed exactly once by Close): fd itself stays
// the caller's, neither closed nor wrapped in an os.File, whatever the outcome. The two
// share one open file description, so fd is non-blocking afterwards.
func FromFD(fd int, name string) (*TAP, error) {
	if fd < 3 {
		return nil, fmt.Errorf("file descriptor %d is standard input, output or error; hand the TAP over as descriptor 3 or above", fd)
	}
	if err := ValidName(name); err != nil {
		return nil, err
	}
	// The duplicate first: every check below is of the descriptor the TAP then uses, so
	// the caller replacing fd meanwhile changes nothing.
	own, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 3)
	if err != nil {
		if errors.Is(err, unix.EBADF) {
			return nil, fmt.Errorf("file descriptor %d is not open: umbra inherited no such descriptor (hand the TAP over as that descriptor, without close-on-exec)", fd)
		}
		return nil, fmt.Errorf("file descriptor %d: duplicate: %w", fd, err)
	}
	t, err := fromOwnFD(fd, own, name)
	if err != nil {
		unix.Close(own)
		return nil, err
	}
	return t, nil
}

// fromOwnFD checks own (the duplicate of the caller's fd) and wraps it; on error the
// caller closes own.
func fromOwnFD(fd, own int, name string) (*TAP, error) {
	got, err := describe(fd, own)
	if err != nil {
		return nil, err
	}
	if got != name {
		return nil, fmt.Errorf("file descriptor %d is TAP %s, not %s", fd, got, name)
	}
	nsFD, err := unix.IoctlRetInt(own, unix.TUNGETDEVNETNS)
	if err != nil {
		return nil, fmt.Errorf("TAP %s (file descriptor %d): which network namespace it is in (TUNGETDEVNETNS: %w); umbra needs CAP_NET_ADMIN over that namespace to check that no other VM uses the TAP", name, fd, err)
	}
	var st unix.Stat_t
	err = unix.Fstat(nsFD, &st)
	unix.Close(nsFD)
	if err != nil {
		return nil, fmt.Errorf("TAP %s (file descriptor %d): its network namespace: %w", name, fd, err)
	}
	lock, err := lockTAP(st.Ino, name, fmt.Sprintf("file descriptor %d", fd))
	if err != nil {
		return nil, err
	}
	if err := unix.SetNonblock(own, true); err != nil {
		lock.Close()
		return nil, fmt.Errorf("TAP %s (file descriptor %d): %w", name, fd, err)
	}
	// The only os.File over own, which the TAP owns from here on.
	return &TAP{f: os.NewFile(uintptr(own), "tap "+name), lock: lock, name: name}, nil
}

// describe names the TAP device open on own (fd's duplicate), checking that it is one
// umbra can use; errors name fd, the descriptor the caller knows.
func describe(fd, own int) (string, error) {
	var st unix.Stat_t
	if err := unix.Fstat(own, &st); err != nil {
		return "", fmt.Errorf("file descriptor %d: %w", fd, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFCHR {
		return "", fmt.Errorf("file descriptor %d is %s, not a TAP device (a descriptor of /dev/net/tun attached to a TAP)", fd, fileKind(st.Mode))
	}
	ifr, err := unix.NewIfreq("")
	if err != nil {
		return "", err
	}
	if err := unix.IoctlIfreq(own, unix.TUNGETIFF, ifr); err != nil {
		if errors.Is(err, unix.EBADFD) {
			return "", fmt.Errorf("file descriptor %d is /dev/net/tun attached to no interface; attach it to the TAP (TUNSETIFF) before handing it over", fd)
		}
		return "", fmt.Errorf("file descriptor %d is not a TUN/TAP device (TUNGETIFF: %w)", fd, err)
	}
	flags := ifr.Uint16()
	switch {
	case flags&unix.IFF_TAP == 0:
		return "", fmt.Errorf("file descriptor %d is a TUN device (%s); umbra needs a TAP (Ethernet frames)", fd, ifr.Name())
	case flags&unix.IFF_NO_PI == 0:
		return "", fmt.Errorf("TAP %s (file descriptor %d) carries packet information; open it with IFF_NO_PI", ifr.Name(), fd)
	case flags&unix.IFF_VNET_HDR != 0:
		return "", fmt.Errorf("TAP %s (file descriptor %d) carries a virtio-net header; open it without IFF_VNET_HDR", ifr.Name(), fd)
	}
	return ifr.Name(), nil
}

func fileKind(mode uint32) string {
	switch mode & unix.S_IFMT {
	case unix.S_IFREG:
		return "a regular file"
	case unix.S_IFDIR:
		return "a directory"
	case unix.S_IFSOCK:
		return "a socket"
	case unix.S_IFIFO:
		return "a pipe"
	case unix.S_IFBLK:
		return "a block device"
	case unix.S_IFLNK:
		return "a symbolic link"
	}
	return fmt.Sprintf("a file of mode %#o", mode&unix.S_IFMT)
}
