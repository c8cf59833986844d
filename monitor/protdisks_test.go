package monitor

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/umbra-cc/umbra/disk/protdisk"
	"github.com/umbra-cc/umbra/sealing"
	_ "github.com/umbra-cc/umbra/sealing/tpmsim" // the in-process TPM simulator back end
)

func testProtectedDisk(t testing.TB) *protectedDisk {
	t.Helper()
	env := &ProtectedDiskEnv{Secret: bytes.Repeat([]byte{7}, 32), StateDir: t.TempDir(), VM: "vm"}
	p, err := env.disk("root")
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// TestDiskAnchorFileIsAuthenticated: the host can read the anchor file but cannot write a
// root of its own, change the version, or move another disk's (or VM's) anchor here.
func TestDiskAnchorFileIsAuthenticated(t *testing.T) {
	p := testProtectedDisk(t)
	if r, err := p.root(); err != nil || r != "" {
		t.Fatalf("no anchor yet: root %q, %v", r, err)
	}
	if err := os.MkdirAll(filepath.Dir(p.path), 0o700); err != nil {
		t.Fatal(err)
	}
	var root protdisk.Root
	root[0] = 1
	write := func(version uint64, r string, mac string) {
		a := `{"version":` + strconv.FormatUint(version, 10) + `,"root":"` + r + `","mac":"` + mac + `"}`
		os.WriteFile(p.path, []byte(a), 0o600)
	}
	write(3, root.String(), p.mac(3, root.String(), ""))
	if r, err := p.root(); err != nil || r != root.String() {
		t.Fatalf("a genuine anchor: root %q, %v", r, err)
	}
	other := strings.Repeat("ab", 32)
	otherEnv := &ProtectedDiskEnv{Secret: bytes.Repeat([]byte{7}, 32), VM: "vm"}
	od, _ := otherEnv.disk("data")
	for _, tc := range []struct {
		name          string
		version       uint64
		root, mac     string
		wantErrSubstr string
	}{
		{"host's own root", 3, other, p.mac(3, root.String(), ""), "fails its MAC"},
		{"version changed", 4, root.String(), p.mac(3, root.String(), ""), "fails its MAC"},
		{"another disk's anchor", 3, root.String(), od.mac(3, root.String(), ""), "fails its MAC"},
		{"no MAC", 3, root.String(), "", "fails its MAC"},
	} {
		write(tc.version, tc.root, tc.mac)
		if _, err := p.root(); err == nil || !strings.Contains(err.Error(), tc.wantErrSubstr) {
			t.Errorf("%s: %v, want %q", tc.name, err, tc.wantErrSubstr)
		}
	}
	os.WriteFile(p.path, []byte(`{"version":1,"root":"x","mac":"y","extra":1}`), 0o600)
	if _, err := p.root(); err == nil || !strings.Contains(err.Error(), "corrupt") {
		t.Errorf("unknown field: %v", err)
	}
}

// FuzzDiskAnchor: any anchor file the host writes is either refused or is one the monitor
// wrote (its MAC verifies); nothing panics.
func FuzzDiskAnchor(f *testing.F) {
	p := testProtectedDisk(f)
	os.MkdirAll(filepath.Dir(p.path), 0o700)
	r := strings.Repeat("01", 32)
	f.Add([]byte(`{"version":2,"root":"` + r + `","mac":"` + p.mac(2, r, "") + `"}`))
	f.Add([]byte(`{"version":-1}`))
	f.Add([]byte(`[]`))
	f.Fuzz(func(t *testing.T, data []byte) {
		if err := os.WriteFile(p.path, data, 0o600); err != nil {
			t.Fatal(err)
		}
		a, err := p.load()
		if err != nil || a == nil {
			return
		}
		if a.MAC != p.mac(a.Version, a.Root, a.Top) {
			t.Fatalf("accepted an anchor whose MAC does not verify: %+v", a)
		}
	})
}

// TestProtectedDiskAnchorAgainstTheTPM: the anchor's version against the TPM counter. A
// commit interrupted between the anchor file and the counter is completed; an older anchor
// (with its older image), a removed anchor and an anchor ahead of the counter are refused.
func TestProtectedDiskAnchorAgainstTheTPM(t *testing.T) {
	state := t.TempDir()
	tpm, err := sealing.OpenTPM("sim", state)
	if err != nil {
		t.Skipf("skipping: no TPM simulator: %v", err)
	}
	defer tpm.Close()
	env := &ProtectedDiskEnv{Secret: bytes.Repeat([]byte{9}, 32), Counter: sealing.SeriesCounter{TPM: tpm, Host: "test-host"}, StateDir: state, VM: "vm"}
	dir := t.TempDir()
	seed, img := filepath.Join(dir, "seed.raw"), filepath.Join(dir, "root.pd")
	if err := os.WriteFile(seed, bytes.Repeat([]byte("seed data "), 8192)[:64<<10], 0o600); err != nil {
		t.Fatal(err)
	}
	spec := DiskSpec{Name: "root", Path: "root.pd", Protected: true, Seed: "seed.raw"}
	open := func() (*protectedDisk, error) {
		t.Helper()
		p, err := env.disk("root")
		if err != nil {
			t.Fatal(err)
		}
		be, err := p.open(context.Background(), spec, img, seed)
		if err == nil {
			be.Close()
		}
		return p, err
	}
	hw := func() uint64 {
		v, err := sealing.SeriesVersion(tpm, "test-host", "umbra-disk.vm.root")
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	if _, err := open(); err != nil { // made from the seed
		t.Fatal(err)
	}
	p, _ := env.disk("root")
	oldImage, _ := os.ReadFile(img)
	oldAnchor, _ := os.ReadFile(p.path)
	a, _ := p.load()
	if a == nil || a.Version != hw() {
		t.Fatalf("anchor %+v, counter %d", a, hw())
	}
	// A write and flush: the anchor and the counter move on.
	pd, err := protdisk.Open(img, p.key, rootOf(t, a.Root), p, false)
	if err != nil {
		t.Fatal(err)
	}
	p.series.version = a.Version
	pd.WriteAt(bytes.Repeat([]byte{1}, 4096), 0)
	if err := pd.Close(); err != nil {
		t.Fatal(err)
	}
	cur, _ := p.load()
	if cur.Version != a.Version+1 || hw() != cur.Version {
		t.Fatalf("after a commit: anchor %d, counter %d, want both %d", cur.Version, hw(), a.Version+1)
	}
	// A crash between the anchor file and the counter: the file is one ahead.
	ahead := diskAnchorFile{Version: cur.Version + 1, Root: cur.Root}
	ahead.MAC = p.mac(ahead.Version, ahead.Root, "")
	writeAnchor(t, p.path, ahead)
	if _, err := open(); err != nil {
		t.Fatalf("interrupted commit not completed: %v", err)
	}
	if hw() != ahead.Version {
		t.Fatalf("counter %d after completing, want %d", hw(), ahead.Version)
	}
	good, _ := os.ReadFile(p.path)
	for _, tc := range []struct {
		name   string
		setup  func()
		substr string
	}{
		{"older anchor and image", func() { os.WriteFile(p.path, oldAnchor, 0o600); os.WriteFile(img, oldImage, 0o600) }, "restored an older anchor"},
		{"anchor removed", func() { os.Remove(p.path) }, "removed the anchor"},
		{"anchor far ahead", func() {
			far := diskAnchorFile{Version: hw() + 5, Root: cur.Root}
			far.MAC = p.mac(far.Version, far.Root, "")
			writeAnchor(t, p.path, far)
		}, "counters were reset"},
	} {
		cleanImage, _ := os.ReadFile(img)
		tc.setup()
		_, err := open()
		if !errors.Is(err, ErrDiskRolledBack) || !strings.Contains(err.Error(), tc.substr) {
			t.Errorf("%s: %v, want ErrDiskRolledBack saying %q", tc.name, err, tc.substr)
		}
		os.WriteFile(p.path, good, 0o600)
		os.WriteFile(img, cleanImage, 0o600)
	}
}

func rootOf(t *testing.T, h string) protdisk.Root {
	t.Helper()
	var r protdisk.Root
	b, err := hex.DecodeString(h)
	if err != nil || len(b) != len(r) {
		t.Fatalf("root %q", h)
	}
	copy(r[:], b)
	return r
}

func writeAnchor(t *testing.T, path string, a diskAnchorFile) {
	t.Helper()
	b, _ := json.Marshal(a)
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}
