package backup

import (
	"encoding/json"
	"testing"
	"time"
)

// FuzzParseManifest: a manifest is hostile input (it comes from a backup directory);
// ParseManifest never panics, and what it accepts encodes and parses back the same.
func FuzzParseManifest(f *testing.F) {
	key := testKey(f)
	m := &Manifest{ID: "20261203t170000-00000001", Kind: KindFull, VM: "vm1", Disk: "root", Created: time.Unix(1e9, 0).UTC(),
		DiskFormat: FormatRaw, Size: 128 << 10, ChunkSize: 64 << 10,
		Chunks: []Chunk{{0, 64 << 10, digestOf("a")}, {64 << 10, 64 << 10, digestOf("b")}}}
	body, _, err := m.Sign(key)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(body)
	m.Kind, m.Parent, m.Chunks = KindIncremental, digestOf("parent"), []Chunk{{64 << 10, 64 << 10, digestOf("c")}}
	body, _, _ = m.Sign(key)
	f.Add(body)
	f.Add([]byte(`{"format":"umbra-backup-1","chunks":[{"offset":-1}]}`))
	f.Add([]byte(`{}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := ParseManifest(b)
		if err != nil {
			return
		}
		again, err := json.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := ParseManifest(again); err != nil {
			t.Fatalf("an accepted manifest does not parse after encoding: %v", err)
		}
	})
}

func digestOf(s string) string { return Digest([]byte(s)) }
