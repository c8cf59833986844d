package tap

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// LockDir holds one lock file per TAP device an umbra VM on this host uses, named by the
// TAP's network namespace (its inode number) and interface name. A TAP is locked before
// it is opened or an inherited descriptor of it is taken, and unlocked when it closes, so
// two VMs never share one: the kernel lets any process holding a descriptor of a TAP read
// its frames and write into its link, which would let one VM see and forge another's
// traffic. The lock is flock(2) on a close-on-exec file, so it goes with the process that
// held it, however that ends.
var LockDir = "/run/umbra/tap"

// ErrInUse marks the refusal of a TAP another of umbra's VMs holds.
var ErrInUse = errors.New("the TAP is already another VM's")

// lockTAP takes the lock of TAP name in the network namespace of inode nsIno; what says
// how the caller knows the TAP (for the error).
func lockTAP(nsIno uint64, name, what string) (*os.File, error) {
	if err := lockDir(); err != nil {
		return nil, err
	}
	path := filepath.Join(LockDir, fmt.Sprintf("netns-%d-%s", nsIno, name))
	// O_NOFOLLOW: the directory is umbra's own, so a link in it is not a lock file.
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|unix.O_NOFOLLOW, 0o600)
	if err != nil {
		return nil, fmt.Errorf("TAP %s (%s): lock %s: %w", name, what, path, err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		holder := "?"
		if b, rerr := os.ReadFile(path); rerr == nil {
			holder = strings.TrimSpace(string(b))
		}
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("TAP %s (%s): %w (%s holds %s); hand each VM a TAP of its own", name, what, ErrInUse, holder, path)
		}
		return nil, fmt.Errorf("TAP %s (%s): lock %s: %w", name, what, path, err)
	}
	// Who holds it, for the next one's error; the lock is the flock, not this text.
	if err := f.Truncate(0); err == nil {
		f.WriteAt([]byte("umbra pid "+strconv.Itoa(os.Getpid())+"\n"), 0)
	}
	return f, nil
}

// lockDir makes LockDir if it is missing and checks it is a directory only its owner,
// this process's user, can change: anyone else able to replace a lock file could let two
// VMs take one TAP.
func lockDir() error {
	if err := os.MkdirAll(LockDir, 0o700); err != nil {
		return fmt.Errorf("the TAP lock directory: %w (umbra records there which TAPs its VMs hold)", err)
	}
	var st unix.Stat_t
	if err := unix.Lstat(LockDir, &st); err != nil {
		return fmt.Errorf("the TAP lock directory: %w", err)
	}
	switch {
	case st.Mode&unix.S_IFMT != unix.S_IFDIR:
		return fmt.Errorf("the TAP lock directory %s is not a directory", LockDir)
	case st.Uid != uint32(os.Geteuid()):
		return fmt.Errorf("the TAP lock directory %s belongs to uid %d, not to umbra's uid %d", LockDir, st.Uid, os.Geteuid())
	case st.Mode&0o022 != 0:
		return fmt.Errorf("the TAP lock directory %s is writable by others (mode %#o); make it 0700", LockDir, st.Mode&0o777)
	}
	return nil
}
