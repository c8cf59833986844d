package launch

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/umbra-cc/umbra/monitor"
)

// A disk's head record sends the next launch from the spec to the disk's newest overlay
// when it is over the spec's image; a head over another image, a read-only or protected
// disk are left alone, and a corrupt head refuses the launch (it names where the disk's
// newest writes are).
func TestApplyDiskHeads(t *testing.T) {
	state, specDir := t.TempDir(), t.TempDir()
	dir := overlayDir(state, "vm")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	env := &snapshotEnv{overlays: dir}
	head := func(name, base, overlay string) {
		t.Helper()
		if err := env.writeHead(&liveDisk{name: name, base: base, path: overlay}); err != nil {
			t.Fatal(err)
		}
	}
	head("a", filepath.Join(specDir, "a.raw"), filepath.Join(dir, "a.g3.qcow2"))
	head("b", "/elsewhere/b.raw", filepath.Join(dir, "b.g3.qcow2"))
	head("c", filepath.Join(specDir, "c.raw"), filepath.Join(dir, "c.g3.qcow2"))
	specs := []monitor.DiskSpec{
		{Name: "a", Path: "a.raw"},
		{Name: "b", Path: "b.raw"},
		{Name: "c", Path: "c.raw", ReadOnly: true},
		{Name: "d", Path: "d.raw"},
	}
	if err := applyDiskHeads(state, "vm", specDir, specs); err == nil || !strings.Contains(err.Error(), "disk a: its newest writes are in") {
		t.Fatalf("a head naming a missing overlay: %v", err)
	}
	os.WriteFile(filepath.Join(dir, "a.g3.qcow2"), nil, 0o600)
	if err := applyDiskHeads(state, "vm", specDir, specs); err != nil {
		t.Fatal(err)
	}
	if specs[0].Path != filepath.Join(dir, "a.g3.qcow2") || specs[0].Format != monitor.FormatQcow2 {
		t.Errorf("disk a (its head over its image): %+v", specs[0])
	}
	for i, want := range []string{"", "b.raw", "c.raw", "d.raw"} {
		if i > 0 && (specs[i].Path != want || specs[i].Format != "") {
			t.Errorf("disk %s changed: %+v", specs[i].Name, specs[i])
		}
	}
	for _, bad := range []string{`{"base":"rel","overlay":"/x"}`, `{"base":"/a","overlay":"/tmp/elsewhere.qcow2"}`, `{"base":"/a"`, `{"base":"/a","overlay":"/x","more":1}`} {
		os.WriteFile(headFile(dir, "a"), []byte(bad), 0o600)
		err := applyDiskHeads(state, "vm", specDir, []monitor.DiskSpec{{Name: "a", Path: "a.raw"}})
		if err == nil || !strings.Contains(err.Error(), "disk a") || !strings.Contains(err.Error(), "corrupt") {
			t.Errorf("head %s: %v, want a refusal naming disk a", bad, err)
		}
	}
}
