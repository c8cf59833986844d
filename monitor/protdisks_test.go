package monitor

import (
	"bytes"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/umbra-cc/umbra/disk/protdisk"
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
	write(3, root.String(), p.mac(3, root.String()))
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
		{"host's own root", 3, other, p.mac(3, root.String()), "fails its MAC"},
		{"version changed", 4, root.String(), p.mac(3, root.String()), "fails its MAC"},
		{"another disk's anchor", 3, root.String(), od.mac(3, root.String()), "fails its MAC"},
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
	f.Add([]byte(`{"version":2,"root":"` + r + `","mac":"` + p.mac(2, r) + `"}`))
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
		if a.MAC != p.mac(a.Version, a.Root) {
			t.Fatalf("accepted an anchor whose MAC does not verify: %+v", a)
		}
	})
}
