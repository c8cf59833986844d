package control

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os/user"
	"strconv"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/umbra-cc/umbra/policy"
)

// Peer is the identity the kernel reports for the other end of a Unix socket,
// fixed when the client connected.
type Peer struct {
	PID    int32
	UID    uint32
	GID    uint32
	Groups []uint32 // supplementary groups (SO_PEERGROUPS)
}

// maxPeerGroups bounds SO_PEERGROUPS (the kernel's NGROUPS_MAX is 65536).
const maxPeerGroups = 65536

// PeerOf returns the credentials of conn's peer.
func PeerOf(conn *net.UnixConn) (Peer, error) {
	raw, err := conn.SyscallConn()
	if err != nil {
		return Peer{}, fmt.Errorf("peer credentials: %w", err)
	}
	var p Peer
	var cerr error
	err = raw.Control(func(fd uintptr) {
		var uc *unix.Ucred
		uc, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
		if cerr != nil {
			cerr = fmt.Errorf("SO_PEERCRED: %w", cerr)
			return
		}
		p.PID, p.UID, p.GID = uc.Pid, uc.Uid, uc.Gid
		p.Groups, cerr = peerGroups(int(fd))
	})
	if err == nil {
		err = cerr
	}
	if err != nil {
		return Peer{}, fmt.Errorf("peer credentials: %w", err)
	}
	return p, nil
}

// peerGroups reads SO_PEERGROUPS, which x/sys/unix has no wrapper for: the kernel
// fills an array of gid_t and reports its size, or ERANGE with the size it needs.
func peerGroups(fd int) ([]uint32, error) {
	buf := make([]byte, 64*4)
	for {
		n := uint32(len(buf))
		_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), unix.SOL_SOCKET, unix.SO_PEERGROUPS,
			uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&n)), 0)
		if errno == unix.ERANGE && int(n) > len(buf) && n/4 <= maxPeerGroups {
			buf = make([]byte, n)
			continue
		}
		if errno != 0 {
			return nil, fmt.Errorf("SO_PEERGROUPS: %w", errno)
		}
		if n%4 != 0 || int(n) > len(buf) {
			return nil, errors.New("SO_PEERGROUPS: kernel returned a malformed group list")
		}
		gids := make([]uint32, n/4)
		for i := range gids {
			gids[i] = binary.NativeEndian.Uint32(buf[i*4:])
		}
		return gids, nil
	}
}

// Principal is the policy principal of a peer: "unix:NAME" for its uid (as
// launch.LocalPrincipal names the user who launches), and the names of its primary
// and supplementary groups, authenticated "unix-peer". IDs without a name in the
// host's user or group database are given as "uid:N" and "gid:N".
func (p Peer) Principal() policy.Principal {
	pr := policy.Principal{Auth: "unix-peer", Groups: []string{}}
	if u, err := user.LookupId(strconv.FormatUint(uint64(p.UID), 10)); err == nil {
		pr.ID = "unix:" + u.Username
	} else {
		pr.ID = "uid:" + strconv.FormatUint(uint64(p.UID), 10)
	}
	seen := map[uint32]bool{}
	for _, gid := range append([]uint32{p.GID}, p.Groups...) {
		if seen[gid] || len(pr.Groups) >= 256 {
			continue
		}
		seen[gid] = true
		if g, err := user.LookupGroupId(strconv.FormatUint(uint64(gid), 10)); err == nil {
			pr.Groups = append(pr.Groups, g.Name)
		} else {
			pr.Groups = append(pr.Groups, "gid:"+strconv.FormatUint(uint64(gid), 10))
		}
	}
	return pr
}
