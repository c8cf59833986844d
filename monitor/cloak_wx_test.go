package monitor

import (
	"testing"

	"github.com/umbra-cc/umbra/appcontext"
	"github.com/umbra-cc/umbra/pageprot"
	"github.com/umbra-cc/umbra/shadowmem"
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

// TestAfterBrkForgetsOnlyTheHeap: a lower break the app asked for (which the Iago
// check accepts) forgets the heap pages above it and nothing else, even when the
// break lies below the heap, in the image: the image's pages stay the app's.
func TestAfterBrkForgetsOnlyTheHeap(t *testing.T) {
	const image, heap = 0x400000, 0x10000000
	master := make([]byte, shadowmem.MasterSize)
	master[0] = 1
	smv, err := shadowmem.NewVM(master)
	if err != nil {
		t.Fatal(err)
	}
	sm, err := smv.NewApp(shadowmem.Identity{1})
	if err != nil {
		t.Fatal(err)
	}
	req := &appcontext.RegisterRequest{
		Regions: []appcontext.Region{
			{VA: image, Size: 4 * PageSize, Kind: appcontext.RegionImage},
			{VA: heap, Size: 8 * PageSize, Kind: appcontext.RegionHeap},
		},
		Trampoline: 0x7000000, BounceVA: 0x7100000, BounceSize: PageSize,
	}
	for i := range req.Regions {
		if err := sm.RegisterResource(uint32(i + 1)); err != nil {
			t.Fatal(err)
		}
	}
	c := &cloaking{plain: map[uint64]plainOwner{}}
	x := &cloakApp{c: c, sm: sm, layout: appcontext.NewLayout(req), mapped: map[uint64]shadowMap{}}
	for _, p := range []shadowmem.PageID{{Resource: 1, Index: 1}, {Resource: 1, Index: 3}, {Resource: 2, Index: 0}, {Resource: 2, Index: 4}} {
		if err := sm.AddPage(p, 0x100000+uint64(p.Resource)<<16+uint64(p.Index)*PageSize); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		name           string
		from, to       uint64
		image1, image3 bool // still tracked
		heap0, heap4   bool
	}{
		{"within the heap", heap + 6*PageSize, heap + 2*PageSize + 8, true, true, true, false},
		{"below the heap, into the image", heap + 6*PageSize, image + PageSize, true, true, false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, p := range []shadowmem.PageID{{Resource: 2, Index: 0}, {Resource: 2, Index: 4}} {
				if _, ok := sm.Page(p); !ok {
					if err := sm.AddPage(p, 0x120000+uint64(p.Index)*PageSize); err != nil {
						t.Fatal(err)
					}
				}
			}
			x.brk = tc.from
			c.afterBrk(x, tc.to)
			for _, w := range []struct {
				p    shadowmem.PageID
				want bool
			}{{shadowmem.PageID{Resource: 1, Index: 1}, tc.image1}, {shadowmem.PageID{Resource: 1, Index: 3}, tc.image3},
				{shadowmem.PageID{Resource: 2, Index: 0}, tc.heap0}, {shadowmem.PageID{Resource: 2, Index: 4}, tc.heap4}} {
				if _, ok := sm.Page(w.p); ok != w.want {
					t.Errorf("page %v tracked %v, want %v", w.p, ok, w.want)
				}
			}
		})
	}
}
