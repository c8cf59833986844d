package monitor

import (
	"testing"

	"github.com/umbra-cc/umbra/appcontext"
	"github.com/umbra-cc/umbra/pageprot"
)

// TestShadowRights: the rights of an appVM shadow entry are the guest's restricted by
// page protection and W^X: measured code is executable and never writable, anything
// else is never executable, and the trampoline page is never writable either.
func TestShadowRights(t *testing.T) {
	const code, data, tramp = 0x400000, 0x401000, 0x7000000
	x := &cloakApp{layout: appcontext.NewLayout(&appcontext.RegisterRequest{
		Segments:   []appcontext.Segment{{VA: code, Size: 0x100, Kind: appcontext.SegmentCode}, {VA: data, Size: 0x100, Kind: appcontext.SegmentData}},
		Regions:    []appcontext.Region{{VA: code, Size: 0x2000, Kind: appcontext.RegionImage}},
		Trampoline: tramp, BounceVA: 0x7100000, BounceSize: PageSize,
	})}
	for _, tc := range []struct {
		name             string
		page             uint64
		writable, noExec bool
		deny             pageprot.Deny
		w, nx            bool
	}{
		{"code, guest RWX", code, true, false, 0, false, false},
		{"code, guest NX", code, false, true, 0, false, true},
		{"code, deny-exec", code, false, false, pageprot.DenyExec, false, true},
		{"data, guest RWX", data, true, false, 0, true, true},
		{"data, deny-write", data, true, false, pageprot.DenyWrite, false, true},
		{"trampoline, guest RWX", tramp, true, false, 0, false, true},
		{"trampoline, guest R+X", tramp, false, false, 0, false, true},
		{"uncloaked, guest RWX", 0x9000000, true, false, 0, true, true},
	} {
		w, nx := shadowRights(x, tc.page, tc.writable, tc.noExec, tc.deny)
		if w != tc.w || nx != tc.nx {
			t.Errorf("%s: writable %v noexec %v, want %v %v", tc.name, w, nx, tc.w, tc.nx)
		}
	}
}
