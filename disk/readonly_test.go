package disk

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// A read-only view reads its disk and refuses every change; closing it leaves the disk open.
func TestReadOnlyView(t *testing.T) {
	p := filepath.Join(t.TempDir(), "d.raw")
	if err := os.WriteFile(p, []byte("0123456789abcdef"+string(make([]byte, 496))), 0o600); err != nil {
		t.Fatal(err)
	}
	be, err := OpenRaw(p, false)
	if err != nil {
		t.Fatal(err)
	}
	defer be.Close()
	v := ReadOnlyView(be)
	if ReadOnlyView(v) != v {
		t.Error("a view of a view is a new view")
	}
	if _, err := v.WriteAt([]byte("x"), 0); !errors.Is(err, ErrReadOnly) {
		t.Errorf("write through the view: %v", err)
	}
	if err := v.Discard(0, 512); !errors.Is(err, ErrReadOnly) {
		t.Errorf("discard through the view: %v", err)
	}
	if !v.ReadOnly() || v.Size() != 512 || v.Flush() != nil || v.Close() != nil {
		t.Error("the view's ReadOnly, Size, Flush or Close is wrong")
	}
	b := make([]byte, 4)
	if _, err := v.ReadAt(b, 10); err != nil || string(b) != "abcd" {
		t.Errorf("read %q, %v after the view was closed", b, err)
	}
}
