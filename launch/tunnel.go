package launch

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/umbra-cc/umbra/policy"
)

// A tunnel is a byte stream a control client relays for the monitor: the jailed
// monitor may not open network connections, so for a migration the operator's CLI
// dials the destination, opens a tunnel on the control socket and relays bytes
// between the two, and the monitor speaks its end-to-end encrypted protocol through
// it. The CLI sees only ciphertext; if it dies, the tunnel closes and the migration
// aborts, leaving the VM running here.

// Tunnel limits.
const (
	// MaxTunnels is how many unclaimed tunnels a VM's monitor parks at once.
	MaxTunnels = 4
	// TunnelTTL is how long an unclaimed tunnel waits for its operation.
	TunnelTTL = 60 * time.Second
)

type parkedTunnel struct {
	owner string
	conn  net.Conn
	timer *time.Timer
}

type tunnelSet struct {
	mu sync.Mutex
	m  map[string]*parkedTunnel
}

// AddTunnel parks conn for a later operation of p and returns its id.
func (c *Control) AddTunnel(p policy.Principal, conn net.Conn) (string, error) {
	t := &c.tunnels
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(t.m) >= MaxTunnels {
		return "", fmt.Errorf("%d tunnels are already waiting for their operation", MaxTunnels)
	}
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", err
	}
	id := hex.EncodeToString(b[:])
	if t.m == nil {
		t.m = map[string]*parkedTunnel{}
	}
	pt := &parkedTunnel{owner: p.ID, conn: conn}
	pt.timer = time.AfterFunc(TunnelTTL, func() {
		t.mu.Lock()
		defer t.mu.Unlock()
		if t.m[id] == pt {
			delete(t.m, id)
			conn.Close()
		}
	})
	t.m[id] = pt
	return id, nil
}

// errNoTunnel is returned for a tunnel id that names no parked tunnel of the caller.
var errNoTunnel = errors.New("no such tunnel: open one on the control socket first (it waits 60 s), as the same user")

// takeTunnel claims the tunnel id for p: only the principal that opened it may.
func (c *Control) takeTunnel(p policy.Principal, id string) (net.Conn, error) {
	t := &c.tunnels
	t.mu.Lock()
	defer t.mu.Unlock()
	pt, ok := t.m[id]
	if !ok || pt.owner != p.ID {
		return nil, errNoTunnel
	}
	delete(t.m, id)
	pt.timer.Stop()
	return pt.conn, nil
}
