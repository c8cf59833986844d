package monitor

import (
	"bytes"
	"errors"
	"testing"

	"github.com/umbra-cc/umbra/pageprot"
)

// TestGuardedView runs the guarded view (the one constructor, guarded) without KVM,
// over real guest RAM with the system VM's page protection and a cloaked app's
// plaintext frame in force: what each caller may read, write, name or walk, that a
// refusal returns no bytes, changes nothing, is a *guardRefusal and is audited.
func TestGuardedView(t *testing.T) {
	const (
		denyRead  = 0x20000
		denyWrite = 0x21000
		open      = 0x22000
		plain     = 0x23000
	)
	m, x := newFakeMachine(t)
	x.guard.set([]pageprot.PhysRange{
		{Start: denyRead, End: denyRead + PageSize, Deny: pageprot.DenyRead | pageprot.DenyWrite},
		{Start: denyWrite, End: denyWrite + PageSize, Deny: pageprot.DenyWrite},
	})
	for _, f := range []uint64{denyRead, denyWrite, open, plain} {
		if err := m.v.mem.WritePhys(f, bytes.Repeat([]byte{byte(f >> 12)}, PageSize)); err != nil {
			t.Fatal(err)
		}
	}
	c := &cloaking{host: vmCloakHost{m.v}, ram: m.v.mem, pp: x, plain: map[uint64]plainOwner{plain: {app: &cloakApp{seq: 3}}}}

	sys := m.v.guardedSys(0, fmPML4)
	walk := func() guardedMem { return c.walkMem(nil) }
	for _, tc := range []struct {
		name string
		op   func() error
		ok   bool
	}{
		{"system read of an open frame", func() error { return sys.ReadPhys(open, make([]byte, 16)) }, true},
		{"system write to an open frame", func() error { return sys.WritePhys(open+8, []byte{0xee}) }, true},
		{"system read of a deny-read frame", func() error { return sys.ReadPhys(denyRead, make([]byte, 16)) }, false},
		{"system read of a deny-write frame", func() error { return sys.ReadPhys(denyWrite, make([]byte, 16)) }, true},
		{"system write to a deny-write frame", func() error { return sys.WritePhys(denyWrite, []byte{0xee}) }, false},
		{"system read straddling into a deny-read frame", func() error { return sys.ReadPhys(denyRead-8, make([]byte, 16)) }, false},
		{"system entry read of a deny-read frame", func() error { _, err := sys.ReadPhysUint64(denyRead); return err }, false},
		{"naming an open frame", func() error { return sys.name(open, PageSize) }, true},
		{"walk through an open frame", func() error { _, err := walk().ReadPhysUint64(open); return err }, true},
		{"walk through a deny-read frame", func() error { _, err := walk().ReadPhysUint64(denyRead); return err }, false},
		{"walk through a frame of cloaked plaintext", func() error { _, err := walk().ReadPhysUint64(plain); return err }, false},
		{"walk past the end of RAM", func() error { _, err := walk().ReadPhysUint64(fmRAM - 4); return err }, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := len(m.audits)
			err := tc.op()
			if tc.ok {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				if len(m.audits) != before {
					t.Errorf("an allowed access was audited: %q", m.audits[before:])
				}
				return
			}
			if err == nil {
				t.Fatal("allowed, want a refusal")
			}
			if errors.Is(err, ErrOutsideRAM) {
				return // not the rule's: RAM bounds come first
			}
			if !isGuardRefusal(err) {
				t.Fatalf("error %v is not a guard refusal", err)
			}
			if len(m.audits) != before+1 || m.audits[before] != EventGuardRefused {
				t.Errorf("audit records %q, want one %s", m.audits[before:], EventGuardRefused)
			}
		})
	}
	// Refused writes changed nothing; the allowed one landed.
	var b [1]byte
	if err := m.v.mem.ReadPhys(denyWrite, b[:]); err != nil || b[0] != byte(denyWrite>>12) {
		t.Errorf("deny-write frame after the refused write: %#x %v", b[0], err)
	}
	if err := m.v.mem.ReadPhys(open+8, b[:]); err != nil || b[0] != 0xee {
		t.Errorf("open frame after the allowed write: %#x %v", b[0], err)
	}
	// Without the protection (the same accesses with no lock in force) the rule allows
	// what it refused above: the refusals are the locks', not the view's.
	x.guard.set(nil)
	if err := sys.ReadPhys(denyRead, make([]byte, 16)); err != nil {
		t.Errorf("read of the frame once unlocked: %v", err)
	}
}
