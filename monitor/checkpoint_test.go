package monitor

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/guestimage"
	"github.com/umbra-cc/umbra/snapshot"
)

// liveVM is a VM running in the background, for checkpoint tests.
type liveVM struct {
	v       *VM
	console *lockedBuffer
	done    chan struct{}
	res     *Result
	err     error
}

func startVM(t *testing.T, cfg Config) *liveVM {
	t.Helper()
	requireGuestKVM(t)
	l := &liveVM{console: &lockedBuffer{}, done: make(chan struct{})}
	cfg.Console = l.console
	if cfg.Timeout == 0 {
		cfg.Timeout = 5 * time.Minute
	}
	v, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	l.v = v
	go func() {
		defer close(l.done)
		l.res, l.err = v.Run(context.Background())
	}()
	t.Cleanup(func() {
		v.StopIfRunning(errors.New("test over"))
		<-l.done
		v.Close()
	})
	return l
}

func (l *liveVM) wait(t *testing.T) string {
	t.Helper()
	<-l.done
	if l.err != nil {
		t.Fatalf("run: %v\nconsole:\n%s", l.err, l.console.String())
	}
	return strings.ReplaceAll(l.console.String(), "\r\n", "\n")
}

// restoreVM restores chain into a new VM like cfg and runs it to its end.
func restoreVM(t *testing.T, cfg Config, chain *snapshot.Chain, opt RestoreOptions) (string, *Result, *VM) {
	t.Helper()
	var console lockedBuffer
	cfg.Console = &console
	if cfg.Timeout == 0 {
		cfg.Timeout = 5 * time.Minute
	}
	v, err := Restore(cfg, chain, opt)
	if err != nil {
		t.Fatalf("restore: %v", err)
	}
	t.Cleanup(func() { v.Close() })
	res, err := v.Run(context.Background())
	out := strings.ReplaceAll(console.String(), "\r\n", "\n")
	if err != nil {
		t.Fatalf("restored run: %v\nconsole:\n%s", err, out)
	}
	return out, res, v
}

func testKey(t testing.TB) []byte {
	k := make([]byte, 32)
	rand.Read(k)
	return k
}

func openChain(t *testing.T, key []byte, files ...[]byte) *snapshot.Chain {
	t.Helper()
	var cs []*Checkpoint
	for _, f := range files {
		c, err := OpenCheckpoint(bytes.NewReader(f), int64(len(f)), key)
		if err != nil {
			t.Fatalf("open checkpoint: %v", err)
		}
		cs = append(cs, c)
	}
	chain, err := NewCheckpointChain(cs...)
	if err != nil {
		t.Fatal(err)
	}
	return chain
}

func lineWith(out, prefix string) string {
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, prefix) {
			return l
		}
	}
	return ""
}

// TestCheckpointRestoreContinues checkpoints the test guest mid-computation while it
// runs, lets it finish, restores the checkpoint eagerly into a new VM and checks the
// restored guest finishes with the same result, having printed only what came after
// the checkpoint.
func TestCheckpointRestoreContinues(t *testing.T) {
	cfg := Config{Image: guestimage.Image(), MemorySize: 64 << 20, Cmdline: "run=cloakcompute:16:100"}
	l := startVM(t, cfg)
	time.Sleep(300 * time.Millisecond)
	key := testKey(t)
	var file bytes.Buffer
	info, err := l.v.Checkpoint(context.Background(), &file, CheckpointOptions{Key: key, Generation: 1})
	if err != nil {
		t.Fatal(err)
	}
	before := l.console.String()
	out := l.wait(t)
	want := lineWith(out, "cloakcompute: ")
	if want == "" || strings.Contains(before, "cloakcompute: pages") {
		t.Fatalf("the guest had finished before the checkpoint or printed no result:\n%s", out)
	}
	t.Logf("checkpoint: %d bytes, %d pages (%d in the pause), pause %v, pre-copy %v, own writes %d", info.Bytes, info.Pages, info.PauseCopy, info.Pause, info.PreCopy, info.OwnWrites)
	got, res, _ := restoreVM(t, cfg, openChain(t, key, file.Bytes()), RestoreOptions{})
	if lineWith(got, "cloakcompute: ") != want || res.ExitStatus != 0 {
		t.Fatalf("restored run printed %q (status %d), the original %q", got, res.ExitStatus, want)
	}
	if strings.Contains(got, "umbra test guest") {
		t.Fatalf("the restored guest booted again instead of continuing:\n%s", got)
	}
}
