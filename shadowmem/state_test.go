package shadowmem

import (
	"bytes"
	"encoding/json"
	"errors"
	"testing"
)

// checkpointed returns a VM with one app whose pages (1,0) and (2,0) hold ciphertext
// of pageOf(1) and pageOf(2), (1,1) is removed, and the state a checkpoint would carry.
func checkpointed(t *testing.T) (VMState, AppState, map[PageID][]byte) {
	t.Helper()
	vm, err := NewVM(testMaster)
	if err != nil {
		t.Fatal(err)
	}
	defer vm.Close()
	a, err := vm.NewApp(testID("app"))
	if err != nil {
		t.Fatal(err)
	}
	cts := map[PageID][]byte{}
	for _, r := range []uint32{1, 2} {
		if err := a.RegisterResource(r); err != nil {
			t.Fatal(err)
		}
	}
	for _, p := range []PageID{{1, 0}, {1, 1}, {2, 0}} {
		if err := a.AddPage(p, 0x200000); err != nil {
			t.Fatal(err)
		}
		ct := mustEncrypt(t, a, p, pageOf(byte(p.Resource)))
		// A second version, so versions in the state are not all 1.
		ct = mustEncrypt(t, a, p, mustDecrypt(t, a, p, ct))
		cts[p] = ct
	}
	if err := a.RemovePage(PageID{1, 1}); err != nil {
		t.Fatal(err)
	}
	delete(cts, PageID{1, 1})
	if err := a.AddPage(PageID{2, 7}, 0x300000); err != nil {
		t.Fatal(err)
	}
	if _, err := a.State(); !errors.Is(err, ErrState) {
		t.Fatalf("State with a plain page: %v, want ErrState", err)
	}
	if _, err := a.ScrubResource(2, zeroFrames{}); err != nil {
		t.Fatal(err)
	}
	vs, err := vm.State()
	if err != nil {
		t.Fatal(err)
	}
	as, err := a.State()
	if err != nil {
		t.Fatal(err)
	}
	return vs, as, cts
}

type zeroFrames struct{}

func (zeroFrames) FrameBytes(uint64) ([]byte, error) { return make([]byte, PageSize), nil }

func restored(t *testing.T, vs VMState, as AppState, reuse bool) *App {
	t.Helper()
	vm, err := restoreVM(testMaster, vs, reuse)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(vm.Close)
	a, err := vm.RestoreApp(as)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// TestRestoredAppDecryptsAndGoesOn: a restored app decrypts the checkpoint's
// ciphertext (under the old generation), encrypts under its own, and its versions
// keep growing; a removed page stays removed and keeps its version.
func TestRestoredAppDecryptsAndGoesOn(t *testing.T) {
	vs, as, cts := checkpointed(t)
	a := restored(t, vs, as, false)
	for p, ct := range cts {
		before, _ := a.Page(p)
		plain := mustDecrypt(t, a, p, ct)
		if !bytes.Equal(plain, pageOf(byte(p.Resource))) {
			t.Fatalf("%v: restored plaintext differs", p)
		}
		again := mustEncrypt(t, a, p, plain)
		after, _ := a.Page(p)
		if after.Version != before.Version+1 {
			t.Fatalf("%v: version %d after %d", p, after.Version, before.Version)
		}
		if !bytes.Equal(mustDecrypt(t, a, p, again), plain) {
			t.Fatalf("%v: the new generation's ciphertext does not decrypt", p)
		}
	}
	if a.Tracked(PageID{1, 1}) {
		t.Fatal("a removed page is tracked after restore")
	}
	if err := a.AddPage(PageID{1, 1}, 0x200000); err != nil {
		t.Fatal(err)
	}
	mustEncrypt(t, a, PageID{1, 1}, pageOf(9))
	if pi, _ := a.Page(PageID{1, 1}); pi.Version != 3 {
		t.Fatalf("re-added page version %d, want 3 (it keeps counting)", pi.Version)
	}
	// A tampered checkpoint ciphertext does not verify under the old generation.
	bad := append([]byte(nil), cts[PageID{2, 0}]...)
	b := restored(t, vs, as, false)
	bad[100] ^= 1
	if err := b.DecryptPage(PageID{2, 0}, 0x200000, bad); !errors.Is(err, ErrTampered) {
		t.Fatalf("tampered checkpoint page: %v, want ErrTampered", err)
	}
}

// TestRestoreTwiceNeverReusesANonce is the attack a checkpoint invites: restore the
// same cloaked state twice (or let the original run on) and have both runs encrypt
// the same page at the same next version. With one key for both, the two
// ciphertexts are the same (key, nonce) pair over different plaintexts: XOR of the
// ciphertexts is XOR of the plaintexts, and GCM's authentication key leaks. Each
// restore's fresh generation keeps them apart; the same attack with the
// checkpoint's generation reused shows what the defence prevents.
func TestRestoreTwiceNeverReusesANonce(t *testing.T) {
	vs, as, cts := checkpointed(t)
	p := PageID{1, 0}
	encryptAfterRestore := func(reuse bool, plain []byte) []byte {
		a := restored(t, vs, as, reuse)
		mustDecrypt(t, a, p, cts[p])
		return mustEncrypt(t, a, p, plain)
	}
	x, y := pageOf(0x11), pageOf(0x77)
	keystreamLeak := func(c1, c2 []byte) bool {
		for i := range c1 {
			if c1[i]^c2[i] != x[i]^y[i] {
				return false
			}
		}
		return true
	}
	if c1, c2 := encryptAfterRestore(true, x), encryptAfterRestore(true, y); !keystreamLeak(c1, c2) {
		t.Fatal("defence absent: two runs on one generation did not reuse the keystream; the test cannot show the attack")
	}
	if c1, c2 := encryptAfterRestore(false, x), encryptAfterRestore(false, y); keystreamLeak(c1, c2) {
		t.Fatal("two restores of one checkpoint encrypted under the same (key, nonce)")
	}
	// Nor does a restore reuse the original run's key: the original goes on at the
	// same version under its generation.
	vm, err := restoreVM(testMaster, vs, false)
	if err != nil {
		t.Fatal(err)
	}
	defer vm.Close()
	if len(vm.salts) != len(vs.Salts)+1 || vm.salts[len(vm.salts)-1] == vs.Salts[len(vs.Salts)-1] {
		t.Fatal("RestoreVM did not start a generation of its own")
	}
}

// TestRestoreAppRefusesBadState: every field of a state is checked.
func TestRestoreAppRefusesBadState(t *testing.T) {
	vs, as, cts := checkpointed(t)
	clone := func() AppState {
		var c AppState
		b, _ := json.Marshal(as)
		if err := json.Unmarshal(b, &c); err != nil {
			t.Fatal(err)
		}
		return c
	}
	firstCipher := func(s *AppState) *PageState {
		for i := range s.Resources {
			for j := range s.Resources[i].Pages {
				if !s.Resources[i].Pages[j].Removed {
					return &s.Resources[i].Pages[j]
				}
			}
		}
		t.Fatal("no cipher page")
		return nil
	}
	for _, tc := range []struct {
		name string
		mod  func(*AppState)
	}{
		{"instance 0", func(s *AppState) { s.Instance = 0 }},
		{"instance not handed out", func(s *AppState) { s.Instance = vs.Next + 1 }},
		{"duplicate resource", func(s *AppState) { s.Resources = append(s.Resources, s.Resources[0]) }},
		{"resource serial beyond the app's", func(s *AppState) { s.Resources[0].Serial = s.Serial + 1 }},
		{"resource serial 0", func(s *AppState) { s.Resources[0].Serial = 0 }},
		{"duplicate page", func(s *AppState) {
			s.Resources[0].Pages = append(s.Resources[0].Pages, s.Resources[0].Pages[0])
		}},
		{"ciphertext at version 0", func(s *AppState) { firstCipher(s).Version = 0 }},
		{"generation of the restored run", func(s *AppState) { firstCipher(s).Gen = uint32(len(vs.Salts)) }},
		{"generation beyond the state", func(s *AppState) { firstCipher(s).Gen = 1 << 30 }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := clone()
			tc.mod(&s)
			vm, err := RestoreVM(testMaster, vs)
			if err != nil {
				t.Fatal(err)
			}
			defer vm.Close()
			if _, err := vm.RestoreApp(s); !errors.Is(err, ErrBadState) {
				t.Fatalf("RestoreApp: %v, want ErrBadState", err)
			}
		})
	}
	vm, err := RestoreVM(testMaster, vs)
	if err != nil {
		t.Fatal(err)
	}
	defer vm.Close()
	if _, err := vm.RestoreApp(as); err != nil {
		t.Fatal(err)
	}
	if _, err := vm.RestoreApp(as); !errors.Is(err, ErrBadState) {
		t.Fatalf("the same instance restored twice: %v, want ErrBadState", err)
	}
	for _, bad := range []VMState{{}, {Salts: make([][SaltSize]byte, MaxGenerations)}} {
		if _, err := RestoreVM(testMaster, bad); !errors.Is(err, ErrBadState) {
			t.Fatalf("RestoreVM(%d salts): %v, want ErrBadState", len(bad.Salts), err)
		}
	}
	// Another master derives other keys: the pages do not verify.
	other := bytes.Repeat([]byte{0x33}, MasterSize)
	vm2, err := RestoreVM(other, vs)
	if err != nil {
		t.Fatal(err)
	}
	defer vm2.Close()
	a, err := vm2.RestoreApp(as)
	if err != nil {
		t.Fatal(err)
	}
	buf := append([]byte(nil), cts[PageID{1, 0}]...)
	if err := a.DecryptPage(PageID{1, 0}, 0x200000, buf); !errors.Is(err, ErrTampered) {
		t.Fatalf("another master's keys: %v, want ErrTampered", err)
	}
}

// FuzzRestoreApp: any state decoded from JSON restores or is refused, never panics,
// and a restored app's pages answer Decrypt with an error, not a crash.
func FuzzRestoreApp(f *testing.F) {
	vs := VMState{Salts: make([][SaltSize]byte, 2), Next: 3}
	f.Add([]byte(`{"identity":[],"instance":1,"serial":2,"resources":[{"id":1,"serial":1,"pages":[{"index":0,"version":2,"gen":1,"frame":4096}]}]}`))
	f.Add([]byte(`{"instance":3,"serial":1,"resources":[{"id":9,"serial":1,"pages":[{"index":5,"removed":true,"version":7}]}]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		var st AppState
		if json.Unmarshal(b, &st) != nil {
			return
		}
		vm, err := RestoreVM(testMaster, vs)
		if err != nil {
			t.Fatal(err)
		}
		defer vm.Close()
		a, err := vm.RestoreApp(st)
		if err != nil {
			return
		}
		buf := make([]byte, PageSize)
		for _, r := range st.Resources {
			for _, p := range r.Pages {
				_ = a.DecryptPage(PageID{r.ID, p.Index}, p.Frame, buf)
			}
		}
	})
}
