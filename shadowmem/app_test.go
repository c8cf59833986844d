package shadowmem

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"testing"
)

var testMaster = bytes.Repeat([]byte{0x5a}, MasterSize)

func testID(s string) Identity { return Identity(sha256.Sum256([]byte(s))) }

func pageOf(b byte) []byte {
	p := make([]byte, PageSize)
	for i := range p {
		p[i] = b + byte(i*7)
	}
	return p
}

// newTestApp returns an app with resources 1 and 2 and pages (1,0), (1,1), (2,0).
func newTestApp(t testing.TB) *App {
	t.Helper()
	vm, err := NewVM(testMaster)
	if err != nil {
		t.Fatal(err)
	}
	a, err := vm.NewApp(testID("app"))
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range []uint32{1, 2} {
		if err := a.RegisterResource(r); err != nil {
			t.Fatal(err)
		}
	}
	for _, p := range []PageID{{1, 0}, {1, 1}, {2, 0}} {
		if err := a.AddPage(p, 0x100000+uint64(p.Index)*PageSize); err != nil {
			t.Fatal(err)
		}
	}
	return a
}

func mustEncrypt(t testing.TB, a *App, p PageID, plain []byte) []byte {
	t.Helper()
	buf := append([]byte(nil), plain...)
	if err := a.EncryptPage(p, 0x200000, buf); err != nil {
		t.Fatalf("encrypt %v: %v", p, err)
	}
	return buf
}

func mustDecrypt(t testing.TB, a *App, p PageID, ct []byte) []byte {
	t.Helper()
	buf := append([]byte(nil), ct...)
	if err := a.DecryptPage(p, 0x200000, buf); err != nil {
		t.Fatalf("decrypt %v: %v", p, err)
	}
	return buf
}

func TestRoundTrip(t *testing.T) {
	a := newTestApp(t)
	p := PageID{1, 0}
	plain := pageOf(1)
	for v := uint64(1); v <= 5; v++ {
		ct := mustEncrypt(t, a, p, plain)
		if bytes.Equal(ct, plain) {
			t.Fatal("ciphertext equals plaintext")
		}
		info, _ := a.Page(p)
		if info.State != Cipher || info.Version != v || info.Frame != 0x200000 {
			t.Fatalf("after encrypt %d: %+v", v, info)
		}
		if got := mustDecrypt(t, a, p, ct); !bytes.Equal(got, plain) {
			t.Fatal("decrypted bytes differ from plaintext")
		}
		if info, _ := a.Page(p); info.State != Plain || info.Version != v {
			t.Fatalf("after decrypt %d: %+v", v, info)
		}
	}
}

func TestSamePlaintextNeverSameCiphertext(t *testing.T) {
	a := newTestApp(t)
	seen := map[string]string{}
	plain := pageOf(9)
	note := func(what string, ct []byte) {
		t.Helper()
		if prev, ok := seen[string(ct)]; ok {
			t.Fatalf("%s has the same ciphertext as %s", what, prev)
		}
		seen[string(ct)] = what
	}
	for i := range 3 {
		for _, p := range []PageID{{1, 0}, {1, 1}, {2, 0}} {
			ct := mustEncrypt(t, a, p, plain)
			note(fmt.Sprintf("%v round %d", p, i), ct)
			mustDecrypt(t, a, p, ct)
		}
	}
	// A removed and re-added page continues its version.
	if err := a.RemovePage(PageID{1, 0}); err != nil {
		t.Fatal(err)
	}
	if err := a.AddPage(PageID{1, 0}, 0); err != nil {
		t.Fatal(err)
	}
	if info, _ := a.Page(PageID{1, 0}); info.Version != 3 {
		t.Fatalf("re-added page version = %d, want 3", info.Version)
	}
	note("re-added page", mustEncrypt(t, a, PageID{1, 0}, plain))
	// A re-registered resource id gets a new key: version 1 again, new bytes.
	if err := a.RemovePage(PageID{2, 0}); err != nil {
		t.Fatal(err)
	}
	if err := a.UnregisterResource(2); err != nil {
		t.Fatal(err)
	}
	if err := a.RegisterResource(2); err != nil {
		t.Fatal(err)
	}
	if err := a.AddPage(PageID{2, 0}, 0); err != nil {
		t.Fatal(err)
	}
	note("re-registered resource", mustEncrypt(t, a, PageID{2, 0}, plain))
	// Another instance of the same image.
	b := newTestApp(t)
	note("other instance", mustEncrypt(t, b, PageID{1, 1}, plain))
}

func TestIntegrityFailures(t *testing.T) {
	tests := []struct {
		name  string
		setup func(t *testing.T, a *App) (p PageID, bytes []byte)
		kind  error
		found PageID
		fver  uint64
	}{
		{"tampered byte", func(t *testing.T, a *App) (PageID, []byte) {
			ct := mustEncrypt(t, a, PageID{1, 0}, pageOf(1))
			ct[100] ^= 1
			return PageID{1, 0}, ct
		}, ErrTampered, PageID{}, 0},
		{"tampered fingerprint bytes", func(t *testing.T, a *App) (PageID, []byte) {
			ct := mustEncrypt(t, a, PageID{1, 0}, pageOf(1))
			ct[0] ^= 0x80
			return PageID{1, 0}, ct
		}, ErrTampered, PageID{}, 0},
		{"all zero", func(t *testing.T, a *App) (PageID, []byte) {
			mustEncrypt(t, a, PageID{1, 0}, pageOf(1))
			return PageID{1, 0}, make([]byte, PageSize)
		}, ErrTampered, PageID{}, 0},
		{"plaintext handed back", func(t *testing.T, a *App) (PageID, []byte) {
			mustEncrypt(t, a, PageID{1, 0}, pageOf(1))
			return PageID{1, 0}, pageOf(1)
		}, ErrTampered, PageID{}, 0},
		{"remapped within resource", func(t *testing.T, a *App) (PageID, []byte) {
			mustEncrypt(t, a, PageID{1, 0}, pageOf(1))
			return PageID{1, 0}, mustEncrypt(t, a, PageID{1, 1}, pageOf(2))
		}, ErrRemapped, PageID{1, 1}, 1},
		{"remapped across resources", func(t *testing.T, a *App) (PageID, []byte) {
			mustEncrypt(t, a, PageID{1, 0}, pageOf(1))
			return PageID{1, 0}, mustEncrypt(t, a, PageID{2, 0}, pageOf(2))
		}, ErrRemapped, PageID{2, 0}, 1},
		{"remapped to a stale copy of a plain page", func(t *testing.T, a *App) (PageID, []byte) {
			mustEncrypt(t, a, PageID{1, 0}, pageOf(1))
			ct := mustEncrypt(t, a, PageID{1, 1}, pageOf(2))
			mustDecrypt(t, a, PageID{1, 1}, ct)
			return PageID{1, 0}, ct
		}, ErrRemapped, PageID{1, 1}, 1},
		{"replayed previous version", func(t *testing.T, a *App) (PageID, []byte) {
			p := PageID{1, 0}
			old := mustEncrypt(t, a, p, pageOf(1))
			mustDecrypt(t, a, p, old)
			mustEncrypt(t, a, p, pageOf(3))
			return p, old
		}, ErrReplayed, PageID{1, 0}, 1},
		{"replayed beyond history", func(t *testing.T, a *App) (PageID, []byte) {
			p := PageID{1, 0}
			old := mustEncrypt(t, a, p, pageOf(1))
			mustDecrypt(t, a, p, old)
			for range HistoryDepth {
				mustDecrypt(t, a, p, mustEncrypt(t, a, p, pageOf(1)))
			}
			mustEncrypt(t, a, p, pageOf(1))
			return p, old
		}, ErrTampered, PageID{}, 0},
		{"other app's ciphertext", func(t *testing.T, a *App) (PageID, []byte) {
			mustEncrypt(t, a, PageID{1, 0}, pageOf(1))
			return PageID{1, 0}, mustEncrypt(t, newTestApp(t), PageID{1, 0}, pageOf(1))
		}, ErrTampered, PageID{}, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := newTestApp(t)
			p, in := tt.setup(t, a)
			before, _ := a.Page(p)
			buf := append([]byte(nil), in...)
			err := a.DecryptPage(p, 0x300000, buf)
			var ie *IntegrityError
			if !errors.As(err, &ie) {
				t.Fatalf("err = %v, want *IntegrityError", err)
			}
			if !errors.Is(err, tt.kind) {
				t.Fatalf("err = %v, want kind %v", err, tt.kind)
			}
			if ie.Page != p || ie.Frame != 0x300000 || ie.Version != before.Version {
				t.Errorf("error names %v frame %#x version %d", ie.Page, ie.Frame, ie.Version)
			}
			if tt.kind != ErrTampered && (ie.Found != tt.found || ie.FoundVersion != tt.fver) {
				t.Errorf("found %v version %d, want %v version %d", ie.Found, ie.FoundVersion, tt.found, tt.fver)
			}
			if !bytes.Equal(buf, in) {
				t.Error("buffer changed on failure")
			}
			if after, _ := a.Page(p); after != before {
				t.Errorf("metadata changed on failure: %+v -> %+v", before, after)
			}
			if ie.Error() == "" {
				t.Error("empty error text")
			}
		})
	}
}

func TestLifecycleErrors(t *testing.T) {
	tests := []struct {
		name string
		op   func(a *App) error
		want error
	}{
		{"short buffer", func(a *App) error { return a.EncryptPage(PageID{1, 0}, 0, make([]byte, 100)) }, ErrBufferSize},
		{"long buffer", func(a *App) error { return a.DecryptPage(PageID{1, 0}, 0, make([]byte, PageSize+1)) }, ErrBufferSize},
		{"unknown resource", func(a *App) error { return a.EncryptPage(PageID{7, 0}, 0, make([]byte, PageSize)) }, ErrUnknownResource},
		{"unknown page", func(a *App) error { return a.EncryptPage(PageID{1, 9}, 0, make([]byte, PageSize)) }, ErrUnknownPage},
		{"decrypt plain", func(a *App) error { return a.DecryptPage(PageID{1, 0}, 0, make([]byte, PageSize)) }, ErrState},
		{"encrypt cipher", func(a *App) error {
			a.EncryptPage(PageID{1, 0}, 0, make([]byte, PageSize))
			return a.EncryptPage(PageID{1, 0}, 0, make([]byte, PageSize))
		}, ErrState},
		{"duplicate resource", func(a *App) error { return a.RegisterResource(1) }, ErrResourceExists},
		{"duplicate page", func(a *App) error { return a.AddPage(PageID{1, 0}, 0) }, ErrPageExists},
		{"removed page", func(a *App) error {
			a.RemovePage(PageID{1, 0})
			return a.DecryptPage(PageID{1, 0}, 0, make([]byte, PageSize))
		}, ErrUnknownPage},
		{"unregister with plain pages", func(a *App) error { return a.UnregisterResource(1) }, ErrState},
		{"dropped", func(a *App) error {
			a.Drop()
			return a.AddPage(PageID{1, 5}, 0)
		}, ErrDropped},
		{"exhausted version", func(a *App) error {
			_, pg, _ := a.page(PageID{1, 0})
			pg.version = ^uint64(0)
			return a.EncryptPage(PageID{1, 0}, 0, make([]byte, PageSize))
		}, ErrVersionExhausted},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := tt.op(newTestApp(t)); !errors.Is(err, tt.want) {
				t.Fatalf("err = %v, want %v", err, tt.want)
			}
		})
	}
}

type mapMem map[uint64][]byte

func (m mapMem) FrameBytes(gpa uint64) ([]byte, error) {
	b, ok := m[gpa]
	if !ok {
		return nil, fmt.Errorf("no frame %#x", gpa)
	}
	return b, nil
}

func TestScrubAndDrop(t *testing.T) {
	a := newTestApp(t)
	mem := mapMem{}
	frames := map[PageID]uint64{{1, 0}: 0x1000, {1, 1}: 0x2000, {2, 0}: 0x3000}
	for p, f := range frames {
		mem[f] = pageOf(byte(f >> 12))
		a.RemovePage(p)
		a.AddPage(p, f)
	}
	// (1,1) goes to cipher state: scrub must leave its ciphertext alone.
	if err := a.EncryptPage(PageID{1, 1}, 0x2000, mem[0x2000]); err != nil {
		t.Fatal(err)
	}
	ct := append([]byte(nil), mem[0x2000]...)
	n, err := a.ScrubPlain(mem)
	if err != nil || n != 2 {
		t.Fatalf("ScrubPlain = %d, %v; want 2, nil", n, err)
	}
	for _, f := range []uint64{0x1000, 0x3000} {
		if !allZero(mem[f]) {
			t.Errorf("frame %#x not zeroed", f)
		}
	}
	if !bytes.Equal(mem[0x2000], ct) {
		t.Error("cipher page was touched")
	}
	if err := a.UnregisterResource(1); err != nil {
		t.Fatalf("unregister after scrub: %v", err)
	}
	a.Drop()
	if a.key != nil || a.res != nil {
		t.Fatal("Drop kept keys")
	}
	if _, err := a.ScrubPlain(mem); !errors.Is(err, ErrDropped) {
		t.Fatalf("after drop: %v", err)
	}
	// A frame the monitor cannot reach is an error that names it.
	b := newTestApp(t)
	if _, err := b.ScrubPlain(mapMem{}); err == nil {
		t.Fatal("scrub of unreachable frames succeeded")
	}
}

func TestKeys(t *testing.T) {
	id := testID("x")
	k1, err := DeriveAppKey(testMaster, id, 1)
	if err != nil {
		t.Fatal(err)
	}
	k1b, _ := DeriveAppKey(testMaster, id, 1)
	k2, _ := DeriveAppKey(testMaster, id, 2)
	k3, _ := DeriveAppKey(testMaster, testID("y"), 1)
	if !bytes.Equal(k1, k1b) || bytes.Equal(k1, k2) || bytes.Equal(k1, k3) || len(k1) != KeySize {
		t.Fatal("app keys are not a function of (master, identity, instance)")
	}
	for _, m := range [][]byte{nil, make([]byte, 31), make([]byte, 32), make([]byte, 33)} {
		if _, err := DeriveAppKey(m, id, 1); !errors.Is(err, ErrBadMaster) {
			t.Errorf("master of %d bytes: err = %v", len(m), err)
		}
		if _, err := NewVM(m); !errors.Is(err, ErrBadMaster) {
			t.Errorf("NewVM with %d bytes: err = %v", len(m), err)
		}
	}
	Zeroize(k1)
	if !allZero(k1) {
		t.Fatal("Zeroize left bytes")
	}
	// Two VMs on the same master never share keys (run salt).
	v1, _ := NewVM(testMaster)
	v2, _ := NewVM(testMaster)
	a1, _ := v1.NewApp(id)
	a2, _ := v2.NewApp(id)
	if a1.Instance() != a2.Instance() || bytes.Equal(a1.key, a2.key) {
		t.Fatal("same master in two runs gave the same app key")
	}
	a3, _ := v1.NewApp(id)
	if a3.Instance() == a1.Instance() {
		t.Fatal("instance id reused")
	}
	v1.DropApp(a1.Instance())
	if a1.AddPage(PageID{}, 0) != ErrDropped {
		t.Fatal("DropApp did not drop")
	}
	v1.Close()
	if !a3.dropped || !allZero(v1.master) {
		t.Fatal("Close did not drop apps and zero the master")
	}
	if _, err := v1.NewApp(id); !errors.Is(err, ErrDropped) {
		t.Fatal("NewApp after Close succeeded")
	}
	// The non-VM constructor works too.
	if _, err := NewApp(testMaster, id, 9); err != nil {
		t.Fatal(err)
	}
}
