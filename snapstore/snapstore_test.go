package snapstore

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

func rec(gen uint64, parent string) Record {
	return Record{Parent: parent, Generation: gen, ID: strings.Repeat("ab", 16), Created: time.Unix(1, 0).UTC(), Bytes: 5, Host: "h"}
}

func put(t *testing.T, s *Store, name string, r Record) {
	t.Helper()
	p, err := s.Create(name)
	if err != nil {
		t.Fatal(err)
	}
	p.Write([]byte("bytes"))
	if err := p.Commit(r); err != nil {
		t.Fatal(err)
	}
}

func TestStoreLifecycle(t *testing.T) {
	s, err := Open(filepath.Join(t.TempDir(), "snaps"))
	if err != nil {
		t.Fatal(err)
	}
	put(t, s, "b", rec(2, "a"))
	put(t, s, "a", rec(1, ""))
	recs, errs := s.List()
	if len(errs) != 0 || len(recs) != 2 || recs[0].Name != "a" || recs[1].Name != "b" {
		t.Fatalf("list: %v %v", recs, errs)
	}
	sn, err := s.Get("b")
	if err != nil || sn.Size != 5 || sn.Parent != "a" {
		t.Fatalf("get: %+v %v", sn, err)
	}
	sn.Close()
	if _, err := s.Create("a"); !errors.Is(err, ErrExists) {
		t.Fatalf("create over an existing snapshot: %v", err)
	}
	if err := s.Delete("a"); err == nil || !strings.Contains(err.Error(), "parent of b") {
		t.Fatalf("deleting a parent: %v", err)
	}
	if err := s.Delete("b"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Get("b"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("get after delete: %v", err)
	}
	for _, bad := range []string{"", "../x", "a/b", ".hidden", "A", strings.Repeat("x", 64)} {
		if _, err := s.Create(bad); err == nil {
			t.Errorf("Create(%q) accepted", bad)
		}
		if _, err := s.Get(bad); err == nil {
			t.Errorf("Get(%q) accepted", bad)
		}
	}
}

// A crash before Commit leaves no snapshot (a temporary file Clean removes); a record
// without its file is not a snapshot.
func TestStoreCrashLeavesNoHalfSnapshot(t *testing.T) {
	dir := t.TempDir()
	s, _ := Open(dir)
	p, err := s.Create("x")
	if err != nil {
		t.Fatal(err)
	}
	p.Write([]byte("half"))
	p.f.Close() // the process dies here
	if _, err := s.Create("x"); !errors.Is(err, ErrExists) {
		t.Fatalf("a name claimed by a crashed create was taken again before Clean: %v", err)
	}
	if recs, _ := s.List(); len(recs) != 0 {
		t.Fatalf("a crashed create is listed: %v", recs)
	}
	if _, err := s.Get("x"); err == nil {
		t.Fatal("a crashed create opens")
	}
	s.Clean()
	ents, _ := os.ReadDir(dir)
	if len(ents) != 0 {
		t.Fatalf("Clean left %v", ents)
	}
	// Record written, file not yet linked (crash between the two steps of Commit).
	os.WriteFile(filepath.Join(dir, "y.json"), []byte(`{"name":"y","generation":1,"id":"abababababababababababababababab","created":"1970-01-01T00:00:01Z","bytes":1,"pages":0,"host":"h"}`), 0o600)
	if recs, _ := s.List(); len(recs) != 0 {
		t.Fatalf("a record without a file is listed: %v", recs)
	}
	if _, err := s.Get("y"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("a record without a file opens: %v", err)
	}
}

func TestStoreRefusesHostileFiles(t *testing.T) {
	dir := t.TempDir()
	s, _ := Open(dir)
	put(t, s, "good", rec(1, ""))
	good, _ := os.ReadFile(filepath.Join(dir, "good.json"))
	for _, tc := range []struct{ name, record string }{
		{"unknown-field", strings.Replace(string(good), `"name"`, `"extra":1,"name"`, 1)},
		{"renamed", strings.Replace(string(good), `"name":"good"`, `"name":"other"`, 1)},
		{"zero-generation", strings.Replace(string(good), `"generation":1`, `"generation":0`, 1)},
		{"not-json", "garbage"},
		{"huge", `{"name":"` + strings.Repeat("a", MaxRecordBytes) + `"}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := "t-" + tc.name
			os.WriteFile(filepath.Join(dir, n+".snap"), []byte("x"), 0o600)
			os.WriteFile(filepath.Join(dir, n+".json"), []byte(strings.Replace(tc.record, `"name":"good"`, `"name":"`+n+`"`, 1)), 0o600)
			if _, err := s.Get(n); !errors.Is(err, ErrCorrupt) {
				t.Fatalf("Get: %v, want ErrCorrupt", err)
			}
			if _, errs := s.List(); len(errs) == 0 {
				t.Fatal("List hid the corrupt record")
			}
			os.Remove(filepath.Join(dir, n+".snap"))
			os.Remove(filepath.Join(dir, n+".json"))
		})
	}
	// A symlink where a snapshot file belongs is not followed.
	os.Symlink("/etc/passwd", filepath.Join(dir, "link.snap"))
	r := strings.Replace(string(good), `"name":"good"`, `"name":"link"`, 1)
	os.WriteFile(filepath.Join(dir, "link.json"), []byte(r), 0o600)
	if _, err := s.Get("link"); err == nil {
		t.Fatal("a symlinked snapshot file was opened")
	}
}

func TestStoreConcurrentCreatesOfOneName(t *testing.T) {
	s, _ := Open(t.TempDir())
	var wg sync.WaitGroup
	var mu sync.Mutex
	ok, exists := 0, 0
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p, err := s.Create("same")
			if err == nil {
				p.Write([]byte("x"))
				err = p.Commit(rec(1, ""))
			}
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err == nil:
				ok++
			case errors.Is(err, ErrExists):
				exists++
			default:
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if ok != 1 || exists != 7 {
		t.Fatalf("%d creates of one name succeeded, %d were told it exists", ok, exists)
	}
}

func FuzzDecodeRecord(f *testing.F) {
	f.Add([]byte(`{"name":"a","generation":1,"id":"abababababababababababababababab","created":"1970-01-01T00:00:01Z","bytes":1,"pages":0,"host":"h"}`))
	f.Add([]byte(`{"name":"../a"}`))
	f.Add([]byte(`{"name":"a","generation":1,"id":"abababababababababababababababab","created":"1970-01-01T00:00:01Z","bytes":1,"pages":0,"host":"h","disks":["data"]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := DecodeRecord(b)
		if err == nil && (ValidName(r.Name) != nil || r.Generation == 0) {
			t.Fatalf("accepted %+v", r)
		}
	})
}

// A record's disks list names disks, at most eight; anything else is corrupt.
func TestRecordDisks(t *testing.T) {
	base := `{"name":"a","generation":1,"id":"abababababababababababababababab","created":"1970-01-01T00:00:01Z","bytes":1,"pages":0,"host":"h"`
	if r, err := DecodeRecord([]byte(base + `,"disks":["data","root-2"]}`)); err != nil || len(r.Disks) != 2 {
		t.Fatalf("a record with two disks: %v, %v", r, err)
	}
	for _, disks := range []string{`["Data"]`, `["../x"]`, `[""]`, `["a","b","c","d","e","f","g","h","i"]`, `"data"`} {
		if _, err := DecodeRecord([]byte(base + `,"disks":` + disks + `}`)); !errors.Is(err, ErrCorrupt) {
			t.Errorf("disks %s: %v, want ErrCorrupt", disks, err)
		}
	}
	// The backup reference points at the snapshot's instant (launch/backup.go).
	if r, err := DecodeRecord([]byte(base + `,"backup_refs":{"data":["20261204t070000-ab12"],"root":[]}}`)); err != nil || len(r.BackupRefs) != 2 || r.BackupRefs["data"][0] != "20261204t070000-ab12" {
		t.Fatalf("a record with reference points: %+v, %v", r, err)
	}
	many := `["r0"` + strings.Repeat(`,"r1"`, MaxBackupRefs) + `]`
	for _, refs := range []string{`{"Data":[]}`, `{"data":["../x"]}`, `{"data":["A"]}`, `{"data":[""]}`, `{"data":` + many + `}`,
		`{"a":[],"b":[],"c":[],"d":[],"e":[],"f":[],"g":[],"h":[],"i":[]}`, `["data"]`, `{"data":"r"}`} {
		if _, err := DecodeRecord([]byte(base + `,"backup_refs":` + refs + `}`)); !errors.Is(err, ErrCorrupt) {
			t.Errorf("backup_refs %s: %v, want ErrCorrupt", refs, err)
		}
	}
}
