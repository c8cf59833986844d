package snapstore

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func sampleGroup() *Group {
	t0 := time.Date(2026, 12, 3, 22, 0, 0, 0, time.UTC)
	return &Group{Name: "nightly", Created: t0, Quiesced: t0, Captured: t0.Add(time.Second), Members: []GroupMember{
		{VM: "web", Snapshot: "nightly", ID: strings.Repeat("ab", 16), Generation: 3, Host: "h", Paused: t0},
		{VM: "db", Snapshot: "nightly", ID: strings.Repeat("cd", 16), Generation: 1, Host: "h", Paused: t0},
	}}
}

// A group record is written once, whole, and read back as written; a second record
// of the name is refused, never replacing the first.
func TestGroupWriteOnce(t *testing.T) {
	gs, err := OpenGroups(filepath.Join(t.TempDir(), "clusters"), true)
	if err != nil {
		t.Fatal(err)
	}
	g := sampleGroup()
	if err := gs.Write(g); err != nil {
		t.Fatal(err)
	}
	other := sampleGroup()
	other.Members[0].Generation = 9
	if err := gs.Write(other); !errors.Is(err, ErrGroupExists) {
		t.Fatalf("second write of a group name: %v, want ErrGroupExists", err)
	}
	got, err := gs.Get("nightly")
	if err != nil {
		t.Fatal(err)
	}
	if got.Members[0].Generation != 3 || len(got.Members) != 2 {
		t.Fatalf("read back %+v", got)
	}
	if ents, _ := os.ReadDir(gs.dir); len(ents) != 1 {
		t.Fatalf("the directory holds %d files, want the record alone", len(ents))
	}
	if _, err := gs.Get("weekly"); !errors.Is(err, ErrGroupNotFound) {
		t.Fatalf("missing group: %v", err)
	}
	list, errs := gs.List()
	if len(list) != 1 || len(errs) != 0 {
		t.Fatalf("List = %v, %v", list, errs)
	}
	if err := gs.Delete("nightly"); err != nil {
		t.Fatal(err)
	}
	if _, err := gs.Get("nightly"); !errors.Is(err, ErrGroupNotFound) {
		t.Fatalf("deleted group: %v", err)
	}
}

// Invalid groups are refused when written and when read.
func TestGroupValidate(t *testing.T) {
	for _, tc := range []struct {
		name string
		edit func(g *Group)
	}{
		{"one member", func(g *Group) { g.Members = g.Members[:1] }},
		{"member twice", func(g *Group) { g.Members[1].VM = g.Members[0].VM }},
		{"bad vm", func(g *Group) { g.Members[1].VM = "../db" }},
		{"bad snapshot", func(g *Group) { g.Members[1].Snapshot = "A" }},
		{"bad id", func(g *Group) { g.Members[1].ID = strings.Repeat("AB", 16) }},
		{"no generation", func(g *Group) { g.Members[1].Generation = 0 }},
		{"captured before quiesced", func(g *Group) { g.Captured = g.Quiesced.Add(-time.Second) }},
		{"bad name", func(g *Group) { g.Name = ".x" }},
	} {
		g := sampleGroup()
		tc.edit(g)
		if err := g.Validate(); err == nil {
			t.Errorf("%s: accepted", tc.name)
		}
		gs, _ := OpenGroups(t.TempDir(), false)
		if err := gs.Write(g); err == nil {
			t.Errorf("%s: written", tc.name)
		}
	}
	if _, err := DecodeGroup([]byte(`{"name":"g","members":[],"extra":1}`)); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("unknown member: %v", err)
	}
}

// Check names what differs between a member's snapshot and the group's record of it.
func TestGroupCheck(t *testing.T) {
	g := sampleGroup()
	ok := Record{Name: "nightly", ID: strings.Repeat("ab", 16), Generation: 3, Group: "nightly"}
	if err := g.Check("web", &ok); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, vm, says string
		edit           func(r *Record)
	}{
		{"not a member", "cache", "not a member", func(*Record) {}},
		{"another generation", "web", "replaced", func(r *Record) { r.Generation = 4 }},
		{"another id", "web", "replaced", func(r *Record) { r.ID = strings.Repeat("ef", 16) }},
		{"another group", "web", "not taken for this group", func(r *Record) { r.Group = "" }},
		{"another name", "web", "not the member's", func(r *Record) { r.Name = "other" }},
	} {
		r := ok
		tc.edit(&r)
		if err := g.Check(tc.vm, &r); err == nil || !strings.Contains(err.Error(), tc.says) {
			t.Errorf("%s: %v, want %q", tc.name, err, tc.says)
		}
	}
}

func FuzzDecodeGroup(f *testing.F) {
	f.Add([]byte(`{"name":"g","created":"2026-12-03T22:00:00Z","quiesced":"2026-12-03T22:00:00Z","captured":"2026-12-03T22:00:01Z","members":[{"vm":"a","snapshot":"g","id":"abababababababababababababababab","generation":1,"host":"h","paused":"2026-12-03T22:00:00Z"},{"vm":"b","snapshot":"g","id":"cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd","generation":2,"host":"h","paused":"2026-12-03T22:00:00Z"}]}`))
	f.Add([]byte(`{"name":"g","members":[{"vm":"a"},{"vm":"a"}]}`))
	f.Add([]byte(`{}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		g, err := DecodeGroup(b)
		if err != nil {
			return
		}
		if g.Validate() != nil || len(g.Members) < 2 {
			t.Fatalf("accepted an invalid group %+v", g)
		}
	})
}
