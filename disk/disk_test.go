package disk

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"
)

func TestRawReadWriteDiscard(t *testing.T) {
	path := filepath.Join(t.TempDir(), "raw.img")
	if err := os.WriteFile(path, bytes.Repeat([]byte{0x5a}, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	d, err := OpenRaw(path, false)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if d.Size() != 1<<20 {
		t.Fatalf("size %d", d.Size())
	}
	if _, err := d.WriteAt([]byte("hello"), 4096); err != nil {
		t.Fatal(err)
	}
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := d.Discard(8192, 8192); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 8192+5)
	if _, err := d.ReadAt(got, 4096); err != nil {
		t.Fatal(err)
	}
	if string(got[:5]) != "hello" || got[5] != 0x5a || got[4096] != 0 || got[8191] != 0 {
		t.Errorf("read back %q %x %x", got[:5], got[5], got[4096])
	}
	if _, err := d.ReadAt(make([]byte, 2), 1<<20-1); err == nil {
		t.Error("read past the end accepted")
	}
	if _, err := d.WriteAt(make([]byte, 2), -1); err == nil {
		t.Error("write at a negative offset accepted")
	}
}

func TestRawReadOnly(t *testing.T) {
	path := filepath.Join(t.TempDir(), "raw.img")
	os.WriteFile(path, make([]byte, 4096), 0o600)
	d, err := OpenRaw(path, true)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if _, err := d.WriteAt([]byte{1}, 0); !errors.Is(err, ErrReadOnly) {
		t.Errorf("write = %v", err)
	}
	if err := d.Discard(0, 4096); !errors.Is(err, ErrReadOnly) {
		t.Errorf("discard = %v", err)
	}
}
