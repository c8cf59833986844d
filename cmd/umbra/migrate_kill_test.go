package main

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/attest/audit"
	"github.com/umbra-cc/umbra/launch"
)

// Killing either side mid-migration (docs/migration.md §4). A relay between the hosts
// paces the stream to 256 KiB/s with a small TCP window, and the kill lands once the
// destination holds the checkpoint's first data frame (found by its spool files). The
// sockets on the source's side may still hold the rest of the checkpoint (about
// 0.4 MiB) and deliver it, so the destination may get all of it and restore the VM
// before it learns the source is gone; the source's monitor may have handed all of it
// to the kernel and be waiting for ready. Either way the kill is before commit, and
// the tests log which step each side failed at.

// killGuest is the guest the kill tests migrate, in 64 MiB: a counter that prints a
// line every 100 ms (so the test sees the guest run) beside the computations.
const killGuest = "run=counter:mig:1000:100,cloakcompute:256:100:plain:100,cloakcompute:256:100:plain:100,cloakcompute:256:100:plain:100,cloakcompute:256:100:plain:100," +
	"cloakcompute:256:100:plain:100,cloakcompute:256:100:plain:100,cloakcompute:256:100:plain:100,cloakcompute:256:100:plain:100"

// slowLink relays TCP connections to target, pacing the source's bytes to bps. Its
// listening socket's receive buffer is small (inherited by what it accepts), so the
// source's side of the path cannot buffer much of a stream: TCP's window stays small.
func slowLink(t *testing.T, target string, bps float64) string {
	t.Helper()
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) { serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 16<<10) })
		return errors.Join(err, serr)
	}}
	l, err := lc.Listen(context.Background(), "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			a, err := l.Accept()
			if err != nil {
				return
			}
			b, err := net.Dial("tcp", target)
			if err != nil {
				a.Close()
				continue
			}
			go func() {
				defer a.Close()
				defer b.Close()
				buf := make([]byte, 8<<10)
				next := time.Now()
				for {
					n, err := a.Read(buf)
					if n > 0 {
						if _, werr := b.Write(buf[:n]); werr != nil {
							return
						}
						if now := time.Now(); next.Before(now) {
							next = now
						}
						next = next.Add(time.Duration(float64(n) / bps * 1e9))
						time.Sleep(time.Until(next))
					}
					if err != nil {
						return
					}
				}
			}()
			go func() { io.Copy(a, b); a.Close(); b.Close() }()
		}
	}()
	return l.Addr().String()
}

// spoolSizes lists the sizes of the migration spool files process pid holds open
// (unlinked files in STATE/migration/incoming).
func spoolSizes(pid int) []int64 {
	dir := "/proc/" + strconv.Itoa(pid) + "/fd"
	ents, _ := os.ReadDir(dir)
	var sizes []int64
	for _, e := range ents {
		p := filepath.Join(dir, e.Name())
		l, err := os.Readlink(p)
		if err != nil || !strings.Contains(l, "/migration/incoming/.migration-") {
			continue
		}
		if fi, err := os.Stat(p); err == nil {
			sizes = append(sizes, fi.Size())
		}
	}
	return sizes
}

// startMigrate runs umbra migrate in a process of its own, over link.
func (w *migrationWorld) startMigrate(link string) (*exec.Cmd, *strings.Builder) {
	w.t.Helper()
	return w.umbraProcess("migrate", "mig", "--to", link, "--compression", "none", "--state-dir", w.a.state)
}

// waitMidCheckpoint waits until umbra receive (r) spools the checkpoint: the files
// that travel first (launch.json, the spec, the image, the policy) are in, and the
// checkpoint's first data frame too (its spool file is not empty).
func waitMidCheckpoint(t *testing.T, r *receiver, migrate *strings.Builder) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for time.Now().Before(deadline) {
		if s := spoolSizes(r.cmd.Process.Pid); len(s) == 5 && !slices.Contains(s, 0) {
			t.Logf("mid-checkpoint: spool files %v", s)
			return
		}
		select {
		case code := <-r.done:
			t.Fatalf("umbra receive ended (%d) before the checkpoint streamed:\n%s\nmigrate: %s", code, r.stderr, migrate)
		default:
		}
		time.Sleep(2 * time.Millisecond)
	}
	t.Fatalf("the checkpoint never started streaming to host B\nreceive:\n%s\nmigrate: %s", r.stderr, migrate)
}

// inspectState is umbra inspect's state of VM mig on h, or its error.
func inspectState(t *testing.T, h *migrationHost) (string, string) {
	code, out, errs := runUmbra(t, "inspect", "--json", "--state-dir", h.state, "mig")
	if code != 0 {
		return "", errs
	}
	var st launch.Status
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("inspect printed %q: %v", out, err)
	}
	return st.State, ""
}

// TestMigrateReceiveKilledMidStream: host B's umbra receive is SIGKILLed while the
// checkpoint streams to it. The migration fails, the VM resumes on host A and keeps
// running there (inspect says running, its exit count moves on), host A audits the
// abort and keeps no migrated marker, and nothing runs on host B.
func TestMigrateReceiveKilledMidStream(t *testing.T) {
	w := newMigrationWorld(t, func(_, b *migrationHost) []string { return []string{b.fingerprint} })
	w.launchOnAWith(killGuest, "64MiB")
	waitGuestRuns(t, w)
	r := w.receive()
	mig, out := w.startMigrate(slowLink(t, r.addr, 256<<10))
	waitMidCheckpoint(t, r, out)
	r.cmd.Process.Signal(syscall.SIGKILL)
	r.wait(t, time.Minute)
	if err := mig.Wait(); err == nil {
		t.Fatalf("umbra migrate succeeded although the destination was killed:\n%s", out)
	}
	t.Logf("umbra migrate: %s", strings.TrimSpace(out.String()))
	// The wait for ready ends in EOF ("where a ready belongs") or in a reset ("read
	// ready: ... connection reset by peer"), as the kill and the link's buffers fall.
	if e := out.String(); !strings.Contains(e, "where a ready belongs") && !strings.Contains(e, "read ready: ") && !strings.Contains(e, "checkpoint") {
		t.Fatalf("umbra migrate failed elsewhere than in the checkpoint's stream or its wait for ready: %s", out)
	}
	st, errs := inspectState(t, w.a)
	if st != "running" {
		t.Fatalf("host A: the VM is %q after the destination died mid-stream, want running (%s)", st, errs)
	}
	if _, errs := inspectState(t, w.b); !strings.Contains(errs, "not running") {
		t.Fatalf("host B: inspect says %q, want that no monitor runs VM mig", errs)
	}
	before := vmExits(t, w)
	time.Sleep(time.Second)
	if after := vmExits(t, w); after <= before {
		t.Fatalf("host A's VM does not run on: %d VM exits, a second later %d", before, after)
	}
	if _, err := os.Stat(filepath.Join(w.a.state, "vms", "mig", "migrated")); !os.IsNotExist(err) {
		t.Fatalf("host A recorded a handover of an aborted migration (%v)", err)
	}
	if kinds := strings.Join(auditKinds(t, w.a), " "); !strings.Contains(kinds, launch.KindMigrateAborted) || strings.Contains(kinds, launch.KindMigrateOut) {
		t.Errorf("host A's audit log: %s, want %s and no %s", kinds, launch.KindMigrateAborted, launch.KindMigrateOut)
	}
	if strings.Contains(r.stdout.String(), "cloakcompute") {
		t.Fatalf("the VM ran on host B:\n%s", r.stdout)
	}
}

// waitGuestRuns waits until host A's guest printed three more counter lines after
// its first output: its processes are spawned and the computations have run rounds.
func waitGuestRuns(t *testing.T, w *migrationWorld) {
	t.Helper()
	var last uint64
	grew := 0
	for deadline := time.Now().Add(2 * time.Minute); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		var st launch.Status
		if json.Unmarshal([]byte(w.must("inspect", "--json", "--state-dir", w.a.state, "mig")), &st) != nil {
			continue
		}
		if n := st.Counters.ConsoleBytes; n > last {
			if last > 0 {
				grew++
			}
			last = n
		}
		if grew >= 4 {
			return
		}
	}
	t.Fatal("host A's guest printed nothing for two minutes")
}

// vmExits is host A's VM's exit count (it grows while the guest runs: timer ticks).
func vmExits(t *testing.T, w *migrationWorld) uint64 {
	t.Helper()
	var st launch.Status
	if err := json.Unmarshal([]byte(w.must("inspect", "--json", "--state-dir", w.a.state, "mig")), &st); err != nil {
		t.Fatal(err)
	}
	return st.Counters.Exits
}

// TestMigrateSourceKilledMidStream: host A's monitor is SIGKILLed while the checkpoint
// streams to host B. The VM dies with its monitor, as it would without a migration;
// host B, which never got a commit, discards what it received and runs nothing
// (umbra receive fails, inspect on B finds no VM), host A recorded no handover, and
// the VM launches again on host A (inspect: running): one side, never two.
func TestMigrateSourceKilledMidStream(t *testing.T) {
	w := newMigrationWorld(t, func(_, b *migrationHost) []string { return []string{b.fingerprint} })
	w.launchOnAWith(killGuest, "64MiB")
	waitGuestRuns(t, w)
	pid := w.monitorPID()
	r := w.receive()
	mig, out := w.startMigrate(slowLink(t, r.addr, 256<<10))
	waitMidCheckpoint(t, r, out)
	syscall.Kill(pid, syscall.SIGKILL)
	if code := r.wait(t, 2*time.Minute); code == 0 {
		t.Fatalf("umbra receive succeeded although the source died mid-stream:\n%s", r.stderr)
	}
	t.Logf("umbra receive: %s", strings.TrimSpace(r.stderr.String()))
	if e := r.stderr.String(); !strings.Contains(e, "the checkpoint") && !strings.Contains(e, "aborted before its commit") {
		t.Fatalf("host B failed elsewhere than in the checkpoint's stream or its wait for commit: %s", e)
	}
	if err := mig.Wait(); err == nil {
		t.Fatalf("umbra migrate succeeded although the source monitor was killed:\n%s", out)
	}
	if strings.Contains(r.stdout.String(), "cloakcompute") {
		t.Fatalf("the VM ran on host B:\n%s", r.stdout)
	}
	// Host B may have decided and restored the VM (the whole checkpoint came) but
	// never ran it: every launch record is followed by its launch-failed. Either way
	// it audits the aborted incoming migration (a stream cut before the launch used
	// to leave B without any record, or audit log, of the attempt).
	kinds := auditKinds(t, w.b)
	if slices.Index(kinds, audit.KindLaunch) > slices.Index(kinds, audit.KindLaunchFailed) {
		t.Fatalf("host B launched the VM it never got a commit for: %v", kinds)
	}
	if len(kinds) == 0 || kinds[len(kinds)-1] != launch.KindMigrateInAborted {
		t.Fatalf("host B's audit log %v does not end with %s", kinds, launch.KindMigrateInAborted)
	}
	t.Logf("host B's audit: %v", kinds)
	for _, h := range []*migrationHost{w.a, w.b} {
		if _, errs := inspectState(t, h); !strings.Contains(errs, "not running") {
			t.Fatalf("%s: inspect says %q, want that no monitor runs VM mig", h.name, errs)
		}
	}
	if _, err := os.Stat(filepath.Join(w.a.state, "vms", "mig", "migrated")); !os.IsNotExist(err) {
		t.Fatalf("host A recorded a handover of a migration that never committed (%v)", err)
	}
	// The VM is still host A's: it launches there again.
	args := append(append([]string{"run", "--detach", "--no-jail"}, w.a.tpm...), w.policy...)
	w.must(append(args, w.path("mig.yaml"))...)
	if st, errs := inspectState(t, w.a); st != "running" {
		t.Fatalf("host A: the relaunched VM is %q (%s)", st, errs)
	}
}
