package monitor

import (
	"bytes"
	"strings"
	"testing"

	"github.com/go-json-experiment/json"

	"github.com/umbra-cc/umbra/appcontext"
	"github.com/umbra-cc/umbra/guestimage"
	"github.com/umbra-cc/umbra/kvm"
	"github.com/umbra-cc/umbra/shadowmem"
	"github.com/umbra-cc/umbra/strictjson"
)

var sectionMaster = bytes.Repeat([]byte{0x42}, 32)

const sectionRAM = 64 << 20

// goodCloakSection is a section as a checkpoint of one parked app in the middle of a
// forwarded write(1, buf, 100) and one app that ended writes it.
func goodCloakSection(t testing.TB) cloakSection {
	t.Helper()
	sm, err := shadowmem.NewVM(sectionMaster)
	if err != nil {
		t.Fatal(err)
	}
	defer sm.Close()
	id := appcontext.Identity{1, 2, 3}
	a, err := sm.NewApp(shadowmem.Identity(id))
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range []uint32{1, 2} {
		if err := a.RegisterResource(r); err != nil {
			t.Fatal(err)
		}
	}
	page := make([]byte, PageSize)
	for _, p := range []shadowmem.PageID{{Resource: 1, Index: 0}, {Resource: 2, Index: 3}} {
		if err := a.AddPage(p, 0x200000); err != nil {
			t.Fatal(err)
		}
		if err := a.EncryptPage(p, 0x200000, page); err != nil {
			t.Fatal(err)
		}
	}
	keys, err := a.State()
	if err != nil {
		t.Fatal(err)
	}
	vs, err := sm.State()
	if err != nil {
		t.Fatal(err)
	}
	layout := appcontext.LayoutState{
		Regions: []appcontext.RegionState{
			{Region: appcontext.Region{VA: 0x400000, Size: 0x4000, Kind: appcontext.RegionImage}, Resource: 1},
			{Region: appcontext.Region{VA: 0x600000, Size: 0x10000, Kind: appcontext.RegionHeap}, Resource: 2},
		},
		NextRes: 2, Trampoline: 0x500000, BounceVA: 0x510000, BounceSize: 0x4000,
		Code: []appcontext.Segment{{VA: 0x400000, Size: 0x1800, Kind: appcontext.SegmentCode}},
	}
	plan := appcontext.PlanState{
		Nr: appcontext.SysWrite, Args: [6]uint64{1, 0x510000, 100}, Orig: [6]uint64{1, 0x400100, 100},
		In: []appcontext.Copy{{Arg: 1, User: 0x400100, Bounce: 0x510000, Len: 100}},
	}
	return cloakSection{Keys: vs, Apps: []cloakAppState{
		{
			Seq: 1, Name: "app", Identity: id, State: "parked", Status: -1, CR3: 0x100000, Bound: true,
			Paging: appcontext.DefaultPaging, Summary: CloakedAppSummary{Seq: 1, Instance: keys.Instance},
			Layout: &layout, Keys: &keys,
			Thread:  &cloakThreadState{Regs: kvm.Regs{RIP: 0x400100, RSP: 0x7ff000}, XSAVE: make([]byte, 4096)},
			Pending: &cloakPendingState{Kind: pendSyscall, Stage: stageKernel, Plan: &plan},
		},
		{
			Seq: 2, Name: "gone", Identity: id, State: "gone", How: "exited", Status: 0, CR3: 0x180000,
			Summary: CloakedAppSummary{Seq: 2, Instance: 9},
		},
	}}
}

// restoreSection restores sec's apps into fresh cloaking state, as restoreCloak does
// after opening the section.
func restoreSection(sec cloakSection) (*cloaking, error) {
	sm, err := shadowmem.RestoreVM(sectionMaster, sec.Keys)
	if err != nil {
		return nil, err
	}
	c := &cloaking{sm: sm, byCR3: map[uint64]*cloakApp{}, plain: map[uint64]plainOwner{}}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c, c.restoreApps(sec.Apps, sectionRAM, sectionMaster)
}

func TestCloakSectionRestores(t *testing.T) {
	c, err := restoreSection(goodCloakSection(t))
	if err != nil {
		t.Fatal(err)
	}
	defer c.sm.Close()
	x := c.byCR3[0x100000]
	if x == nil || x.pending.kind != pendSyscall || x.pending.plan.Call == nil || x.thread.xsave == nil || x.life.state != appParked {
		t.Fatalf("restored app: %+v", x)
	}
	if g := c.apps[1]; !g.ended() || g.life.how != "exited" || c.byCR3[0x180000] != nil {
		t.Fatalf("restored ended app: %+v", g.life)
	}
}

// TestCloakSectionRefusesHostileRecords: every record of a section is checked; a
// forged or corrupted one refuses the restore, naming the app and what is wrong.
func TestCloakSectionRefusesHostileRecords(t *testing.T) {
	for _, tc := range []struct {
		name, want string
		mod        func(*cloakSection)
	}{
		{"sequence out of order", "out of order", func(s *cloakSection) { s.Apps[0].Seq = 2 }},
		{"running", "running", func(s *cloakSection) { s.Apps[0].State = "running" }},
		{"unknown state", "unknown cloaked app state", func(s *cloakSection) { s.Apps[0].State = "zombie" }},
		{"page tables outside RAM", "not a page of guest RAM", func(s *cloakSection) { s.Apps[0].CR3 = sectionRAM }},
		{"unaligned page tables", "not a page of guest RAM", func(s *cloakSection) { s.Apps[0].CR3 = 0x100008 }},
		{"ended app with keys", "carries keys", func(s *cloakSection) { s.Apps[1].Keys = s.Apps[0].Keys }},
		{"parked app without its thread", "without its keys", func(s *cloakSection) { s.Apps[0].Thread = nil }},
		{"keys of another app", "another app's", func(s *cloakSection) { s.Apps[0].Identity[0] ^= 1 }},
		{"resource of no region", "none of its regions", func(s *cloakSection) { s.Apps[0].Keys.Resources[0].ID = 7 }},
		{"page frame outside RAM", "not a frame of guest RAM", func(s *cloakSection) {
			s.Apps[0].Keys.Resources[0].Pages[0].Frame = 1 << 40
		}},
		{"short XSAVE", "XSAVE area", func(s *cloakSection) { s.Apps[0].Thread.XSAVE = s.Apps[0].Thread.XSAVE[:100] }},
		{"thread in the kernel half", "outside the user half", func(s *cloakSection) { s.Apps[0].Thread.Regs.RIP = 0xffffffff81000000 }},
		{"FS base in the kernel half", "outside the user half", func(s *cloakSection) { s.Apps[0].Thread.FS.Base = 1 << 63 }},
		{"unknown pending kind", "pending kind", func(s *cloakSection) { s.Apps[0].Pending.Kind = 9 }},
		{"call without a plan", "without its plan", func(s *cloakSection) { s.Apps[0].Pending.Plan = nil }},
		{"copy out of the bounce area", "bounce area", func(s *cloakSection) {
			s.Apps[0].Pending.Plan.In[0].Bounce, s.Apps[0].Pending.Plan.Args[1] = 0x700000, 0x700000
		}},
		{"two apps on one process", "another app's", func(s *cloakSection) { s.Apps[1].Bound, s.Apps[1].CR3 = true, 0x100000 }},
		{"layout over the trampoline", "layout", func(s *cloakSection) { s.Apps[0].Layout.Trampoline = 0x600000 }},
		{"page at a key generation the state lacks", "generation", func(s *cloakSection) {
			s.Apps[0].Keys.Resources[0].Pages[0].Gen = 5
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sec := goodCloakSection(t)
			tc.mod(&sec)
			c, err := restoreSection(sec)
			if c != nil {
				c.sm.Close()
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("restore: %v, want an error naming %q", err, tc.want)
			}
		})
	}
}

// FuzzCloakSection: a section's JSON (as it is once opened) restores or is refused,
// never panics.
func FuzzCloakSection(f *testing.F) {
	good, err := json.Marshal(goodCloakSection(f))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(good)
	f.Add([]byte(`{"keys":{"salts":[],"next":0},"apps":[]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		var sec cloakSection
		if strictjson.Decode(b, &sec) != nil {
			return
		}
		c, err := restoreSection(sec)
		if c != nil {
			c.sm.Close()
		}
		_ = err
	})
}

// TestCloakSectionSealed: the section opens only under the cloak secret it was
// sealed with, and any flipped bit refuses it.
func TestCloakSectionSealed(t *testing.T) {
	requireGuestKVM(t)
	sealed := sealedSection(t)
	if bytes.Contains(sealed, []byte(`"regs"`)) {
		t.Fatal("the sealed section holds its plaintext")
	}
	restore := func(secret, b []byte) error {
		v, err := New(Config{Image: guestimage.Image(), MemorySize: sectionRAM, CloakSecret: secret})
		if err != nil {
			t.Fatal(err)
		}
		defer v.Close()
		return v.restoreCloak(b)
	}
	if err := restore(sectionMaster, sealed); err != nil {
		t.Fatalf("the section as sealed: %v", err)
	}
	flipped := append([]byte(nil), sealed...)
	flipped[len(flipped)/2] ^= 0x10
	if err := restore(sectionMaster, flipped); err == nil || !strings.Contains(err.Error(), "does not open") {
		t.Fatalf("a flipped bit: %v", err)
	}
	if err := restore(bytes.Repeat([]byte{0x43}, 32), sealed); err == nil || !strings.Contains(err.Error(), "does not open") {
		t.Fatalf("another cloak secret: %v", err)
	}
	if err := restore(nil, sealed); err == nil || !strings.Contains(err.Error(), "no cloak secret") {
		t.Fatalf("no cloak secret: %v", err)
	}
}
