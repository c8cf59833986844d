package userfile

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestReadRefusesWhatIsNotARegularFile(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	big := filepath.Join(dir, "big")
	os.WriteFile(big, make([]byte, 2048), 0o600)
	link := filepath.Join(dir, "link")
	os.Symlink(big, link)
	ok := filepath.Join(dir, "ok")
	os.WriteFile(ok, []byte("fine"), 0o600)
	tests := []struct {
		path, want string
	}{
		{"/dev/zero", "not a regular file (a character device)"},
		{fifo, "not a regular file (a FIFO)"},
		{dir, "not a regular file (a directory)"},
		{big, "more than the 1024 allowed"},
		{filepath.Join(dir, "missing"), "no such file"},
	}
	for _, tt := range tests {
		done := make(chan error, 1)
		go func() {
			_, err := Read(context.Background(), tt.path, "test input", 1024)
			done <- err
		}()
		select {
		case err := <-done:
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("Read(%s) = %v, want %q", tt.path, err, tt.want)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("Read(%s) hangs", tt.path)
		}
	}
	if b, err := Read(context.Background(), ok, "x", 1024); err != nil || string(b) != "fine" {
		t.Fatalf("Read(regular) = %q, %v", b, err)
	}
	if b, err := Read(context.Background(), link, "x", 4096); err != nil || len(b) != 2048 {
		t.Fatalf("Read through a symlink to a regular file = %d bytes, %v", len(b), err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := Read(ctx, ok, "x", 1024); err == nil {
		t.Fatal("Read with a cancelled context succeeded")
	}
}

func TestCreateNewFollowsNoSymlinkAndOverwritesNothing(t *testing.T) {
	dir := t.TempDir()
	target := filepath.Join(dir, "target")
	os.WriteFile(target, []byte("keep"), 0o600)
	link := filepath.Join(dir, "link")
	os.Symlink(target, link)
	for _, p := range []string{target, link} {
		if f, err := CreateNew(p, 0o600); err == nil {
			f.Close()
			t.Fatalf("CreateNew(%s) succeeded", p)
		}
	}
	if b, _ := os.ReadFile(target); string(b) != "keep" {
		t.Fatalf("target changed to %q", b)
	}
	f, err := CreateNew(filepath.Join(dir, "new"), 0o600)
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
}
