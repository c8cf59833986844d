package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/attest/audit"
	"github.com/umbra-cc/umbra/control"
	"github.com/umbra-cc/umbra/launch"
	"github.com/umbra-cc/umbra/snapstore"
)

// clusterWorld is the snapshot world (its policy: operators, and VM "solo" never in a
// cluster checkpoint) with VMs of any name on host "a", each a test guest polling its
// console (little CPU) until it is stopped.
type clusterWorld struct {
	*snapshotWorld
}

func newClusterWorld(t *testing.T) *clusterWorld {
	w := &clusterWorld{newSnapshotWorld(t)}
	return w
}

func (w *clusterWorld) spec(vm string) string {
	p := w.path(vm + ".yaml")
	if _, err := os.Stat(p); err != nil {
		spec := fmt.Sprintf("apiVersion: umbra.dev/v1\nname: %s\nguest:\n  image: %s\n  cmdline: \"run=chat:50\"\nmemory: 16MiB\n", vm, w.path("guest.elf"))
		os.WriteFile(p, []byte(spec), 0o644)
	}
	return p
}

func (w *clusterWorld) launch(vms ...string) {
	w.t.Helper()
	for _, vm := range vms {
		w.must(append(append(append([]string{"run", "--detach"}, w.host("a")...), w.policy...), w.spec(vm))...)
		w.t.Cleanup(func() { killVM(w.t, w.state("a"), vm) })
	}
}

func (w *clusterWorld) stateDir() []string { return []string{"--state-dir", w.state("a")} }

// vmState is inspect's state of vm ("" and the error when it does not answer).
func (w *clusterWorld) vmState(vm string) (string, string) {
	code, out, errs := runUmbra(w.t, "inspect", "--json", "--state-dir", w.state("a"), vm)
	if code != 0 {
		return "", errs
	}
	var st launch.Status
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		w.t.Fatalf("inspect printed %q: %v", out, err)
	}
	return st.State, ""
}

func (w *clusterWorld) requireRunning(vms ...string) {
	w.t.Helper()
	for _, vm := range vms {
		if st, errs := w.vmState(vm); st != "running" {
			w.t.Fatalf("VM %s is %q, want running: %s", vm, st, errs)
		}
	}
}

// snapshots lists the snapshot names in vm's store.
func (w *clusterWorld) snapshots(vm string) []string {
	store, err := snapstore.Open(launch.SnapshotDir(w.state("a"), vm))
	if err != nil {
		w.t.Fatal(err)
	}
	recs, _ := store.List()
	var names []string
	for _, r := range recs {
		names = append(names, r.Name)
	}
	return names
}

// requireNoSet checks that no member kept a snapshot of group name and that its group
// record does not exist.
func (w *clusterWorld) requireNoSet(name string, vms ...string) {
	w.t.Helper()
	for _, vm := range vms {
		for _, s := range w.snapshots(vm) {
			if s == name {
				w.t.Errorf("VM %s kept snapshot %s of a set that failed", vm, name)
			}
		}
	}
	gs, _ := snapstore.OpenGroups(launch.ClusterDir(w.state("a")), false)
	if _, err := gs.Get(name); !errors.Is(err, snapstore.ErrGroupNotFound) {
		w.t.Errorf("group %s: %v, want no record", name, err)
	}
}

// auditOf returns the details of host a's audit records of kind whose group is group,
// by VM; the log is verified first.
func (w *clusterWorld) auditOf(kind, group string) map[string]map[string]any {
	w.t.Helper()
	log := filepath.Join(w.state("a"), "audit.jsonl")
	if code, out, errs := runUmbra(w.t, "audit", "verify", log); code != 0 || !strings.Contains(out, "RESULT: PASS") {
		w.t.Fatalf("audit verify = %d\n%s\n%s", code, out, errs)
	}
	f, _ := os.Open(log)
	defer f.Close()
	got := map[string]map[string]any{}
	audit.Scan(f, func(rec *audit.Record, _ string) error {
		var d map[string]any
		if rec.Kind == kind && json.Unmarshal(rec.Details, &d) == nil && (d["group"] == group || d["name"] == group) {
			got[rec.VM] = d
		}
		return nil
	})
	return got
}

func auditTime(t *testing.T, d map[string]any, field string) time.Time {
	t.Helper()
	s, _ := d[field].(string)
	tm, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		t.Fatalf("audit field %s = %v: %v", field, d[field], err)
	}
	return tm
}

// TestClusterCheckpointCLI checkpoints two running VMs as one set and proves that both
// were paused at once across both captures (every pause, from the monitors' audit
// records, begins before any resume, and both snapshots are written in between); a
// set with a member whose policy refuses it, and a set whose second capture fails
// (the name is taken in one store), leave no snapshot anywhere and every VM running;
// the set restores as one, and a set with a member's snapshot replaced or missing is
// refused before any member starts.
func TestClusterCheckpointCLI(t *testing.T) {
	w := newClusterWorld(t)
	w.launch("web", "db", "solo")
	time.Sleep(500 * time.Millisecond)

	// One VM's pause alone, for comparison with the set's.
	var one launch.SnapshotResult
	if err := json.Unmarshal([]byte(w.must("snapshot", "create", "web", "alone", "--json", "--state-dir", w.state("a"))), &one); err != nil {
		t.Fatal(err)
	}

	out := w.must(append([]string{"cluster", "checkpoint", "nightly", "web", "db", "--json"}, w.stateDir()...)...)
	var res ClusterCheckpointResult
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatalf("cluster checkpoint printed %q: %v", out, err)
	}
	t.Logf("one VM's snapshot pause %v; the set: paused together %v, web %v, db %v (load: %s)", one.Pause, res.SetPause, res.Held["web"], res.Held["db"], loadAvg())
	w.requireRunning("web", "db")
	gs, _ := snapstore.OpenGroups(launch.ClusterDir(w.state("a")), false)
	g, err := gs.Get("nightly")
	if err != nil {
		t.Fatal(err)
	}
	for _, vm := range []string{"web", "db"} {
		store, _ := snapstore.Open(launch.SnapshotDir(w.state("a"), vm))
		sn, err := store.Get("nightly")
		if err != nil {
			t.Fatalf("VM %s: %v", vm, err)
		}
		sn.Close()
		if err := g.Check(vm, &sn.Record); err != nil {
			t.Fatal(err)
		}
	}
	// One cut: the latest pause precedes the earliest resume, and both captures lie
	// between them (the monitors' own records of each).
	quiesced, released := w.auditOf(launch.KindClusterQuiesce, "nightly"), w.auditOf(launch.KindClusterRelease, "nightly")
	created := w.auditOf(launch.KindSnapshotCreate, "nightly")
	var lastPause, firstResume time.Time
	for _, vm := range []string{"web", "db"} {
		if quiesced[vm] == nil || released[vm] == nil || created[vm] == nil {
			t.Fatalf("VM %s: audit records quiesce %v release %v snapshot %v", vm, quiesced[vm], released[vm], created[vm])
		}
		lastPause = maxTime(lastPause, auditTime(t, quiesced[vm], "paused_at"))
		r := auditTime(t, released[vm], "resumed_at")
		if firstResume.IsZero() || r.Before(firstResume) {
			firstResume = r
		}
		if released[vm]["kept"] != true {
			t.Errorf("VM %s's release did not keep its snapshot: %v", vm, released[vm])
		}
	}
	if !lastPause.Before(firstResume) {
		t.Fatalf("the members were not all paused at once: the last pause %v is not before the first resume %v", lastPause, firstResume)
	}
	if g.Captured.Before(lastPause) || !g.Captured.Before(firstResume) {
		t.Fatalf("the set's captures ended at %v, outside the common pause [%v, %v]", g.Captured, lastPause, firstResume)
	}
	t.Logf("common pause %v, the captures ended %v into it", firstResume.Sub(lastPause), g.Captured.Sub(lastPause))
	if list := w.must(append([]string{"cluster", "list"}, w.stateDir()...)...); !strings.Contains(list, "nightly") || !strings.Contains(list, "web@") {
		t.Fatalf("cluster list:\n%s", list)
	}
	if code, _, errs := runUmbra(t, append([]string{"cluster", "checkpoint", "nightly", "web", "db"}, w.stateDir()...)...); code == 0 || !strings.Contains(errs, "exists") {
		t.Fatalf("a second set of one name = %d: %s", code, errs)
	}

	// A member whose policy refuses: nothing is kept, every VM runs.
	code, _, errs := runUmbra(t, append([]string{"cluster", "checkpoint", "refused", "web", "solo"}, w.stateDir()...)...)
	if code != exitRefused || !strings.Contains(errs, "snapshot.group_not_allowed") || !strings.Contains(errs, "VM solo") {
		t.Fatalf("a set with a refusing member = %d, want %d naming solo's refusal: %s", code, exitRefused, errs)
	}
	w.requireRunning("web", "solo")
	w.requireNoSet("refused", "web", "solo")

	// Restore the set: both members start from it.
	killVM(t, w.state("a"), "web")
	killVM(t, w.state("a"), "db")
	waitStopped(t, w.state("a"), "web")
	waitStopped(t, w.state("a"), "db")
	runFlags := append(w.host("a"), w.policy...)
	restore := func(name string, pairs ...string) (int, string, string) {
		return runUmbra(t, append(append([]string{"cluster", "restore", name}, pairs...), runFlags...)...)
	}
	if code, _, errs := restore("nightly", "web="+w.spec("web")); code == 0 || !strings.Contains(errs, "member db is not given") {
		t.Fatalf("a restore without every member = %d: %s", code, errs)
	}
	if code, out, errs := restore("nightly", "web="+w.spec("web"), "db="+w.spec("db")); code != 0 {
		t.Fatalf("cluster restore = %d\n%s\n%s%s", code, out, errs, monitorLogs(w.dir))
	}
	w.requireRunning("web", "db")
	restored := w.auditOf(launch.KindSnapshotRestore, "nightly")
	for _, vm := range []string{"web", "db"} {
		if restored[vm] == nil || restored[vm]["outcome"] != "restored" || restored[vm]["id"] != memberID(g, vm) {
			t.Errorf("VM %s's restore record: %v", vm, restored[vm])
		}
	}

	// (Every snapshot taken after the set, even one a failed set removed, moves the
	// VM's generation on: from here the set would resume only as a replay.)
	// A capture that fails after another member's succeeded: that one is removed.
	w.must("snapshot", "create", "db", "taken", "--state-dir", w.state("a"))
	code, _, errs = runUmbra(t, append([]string{"cluster", "checkpoint", "taken", "web", "db"}, w.stateDir()...)...)
	if code == 0 || !strings.Contains(errs, "VM db") || !strings.Contains(errs, "exists") {
		t.Fatalf("a set whose name db's store has = %d: %s", code, errs)
	}
	w.requireRunning("web", "db")
	if s := w.snapshots("web"); strings.Contains(strings.Join(s, " "), "taken") {
		t.Fatalf("web kept its snapshot of the failed set: %v", s)
	}
	if rel := w.auditOf(launch.KindClusterRelease, "taken"); rel["web"] == nil || rel["web"]["kept"] != false || rel["web"]["snapshot"] != "taken" {
		t.Fatalf("web's release of the failed set: %v", rel["web"])
	}
	// While nothing holds them a plain resume is refused as ever (not paused).
	if code, _, _ := runUmbra(t, "resume", "--state-dir", w.state("a"), "web"); code == 0 {
		t.Fatal("resume of a running VM succeeded")
	}

	// A member's snapshot replaced by another of the name (another generation) or
	// gone: the set is refused, no member starts.
	dbStore := launch.SnapshotDir(w.state("a"), "db")
	os.Remove(filepath.Join(dbStore, "nightly.snap"))
	os.Remove(filepath.Join(dbStore, "nightly.json"))
	w.must("snapshot", "create", "db", "nightly", "--state-dir", w.state("a"))
	killVM(t, w.state("a"), "web")
	killVM(t, w.state("a"), "db")
	waitStopped(t, w.state("a"), "web")
	waitStopped(t, w.state("a"), "db")
	if code, _, errs := restore("nightly", "web="+w.spec("web"), "db="+w.spec("db")); code == 0 || !strings.Contains(errs, "VM db: snapshot nightly is id") || !strings.Contains(errs, "no member started") {
		t.Fatalf("a set whose db snapshot was retaken = %d: %s", code, errs)
	}
	os.Remove(filepath.Join(dbStore, "nightly.snap"))
	if code, _, errs := restore("nightly", "web="+w.spec("web"), "db="+w.spec("db")); code == 0 || !strings.Contains(errs, "member db") || !strings.Contains(errs, "no member started") {
		t.Fatalf("a set whose db snapshot is gone = %d: %s", code, errs)
	}
	for _, vm := range []string{"web", "db"} {
		if st, _ := w.vmState(vm); st != "" {
			t.Errorf("VM %s is %s after a refused restore of its set", vm, st)
		}
	}
}

func memberID(g *snapstore.Group, vm string) string {
	m, _ := g.Member(vm)
	return m.ID
}

// loadAvg is the host's 1-minute load average, for the figures' context.
func loadAvg() string {
	b, _ := os.ReadFile("/proc/loadavg")
	if f := strings.Fields(string(b)); len(f) > 0 {
		return f[0]
	}
	return "?"
}

// TestClusterCoordinatorKilled: the coordinator is SIGKILLed after both members are
// captured and before the set is recorded (while its --exec hook runs). Each member's
// lease runs out: the monitor resumes its VM on its own, removes the snapshot no set
// recorded, and audits it; a later set of the name succeeds.
func TestClusterCoordinatorKilled(t *testing.T) {
	w := newClusterWorld(t)
	w.launch("web", "db")
	w.killCoordinator()
	expired := w.auditOf(launch.KindClusterLeaseExpired, "crash")
	for _, vm := range []string{"web", "db"} {
		d := expired[vm]
		if d == nil || d["kept"] != false || d["snapshot"] != "crash" || d["resumed_at"] == nil {
			t.Fatalf("VM %s's lease expiry record: %v", vm, d)
		}
	}
	w.requireNoSet("crash", "web", "db")
	w.must(append([]string{"cluster", "checkpoint", "crash", "web", "db"}, w.stateDir()...)...)
	w.requireRunning("web", "db")
}

// TestClusterCommittedThenCoordinatorGone: a coordinator (the test, through each
// member's control socket) quiesces, captures and commits both members, records the
// set, and is gone before any release. The leases run out: each monitor resumes its VM,
// keeps its committed snapshot and audits it, and the set is whole and restores. A
// member quiesced by one coordinator cannot be captured or released with another's
// token.
func TestClusterCommittedThenCoordinatorGone(t *testing.T) {
	w := newClusterWorld(t)
	w.launch("web", "db")
	time.Sleep(500 * time.Millisecond)
	ctx := t.Context()
	g := &snapstore.Group{Name: "late", Created: time.Now().UTC()}
	for _, vm := range []string{"web", "db"} {
		cl := control.NewClient(controlSocket(w.state("a"), vm))
		var q launch.ClusterQuiesceResult
		if err := cl.Operation(ctx, "cluster.quiesce", launch.ClusterQuiesceArgs{Group: "late", Members: []string{"web", "db"}, LeaseMS: 3000}, &q); err != nil {
			t.Fatal(err)
		}
		if err := cl.Operation(ctx, "cluster.snapshot", launch.ClusterTokenArgs{Group: "late", Token: strings.Repeat("0", 32)}, nil); err == nil || !strings.Contains(err.Error(), "token or principal") {
			t.Fatalf("a capture with another token: %v", err)
		}
		var s launch.ClusterSnapshotResult
		if err := cl.Operation(ctx, "cluster.snapshot", launch.ClusterTokenArgs{Group: "late", Token: q.Token}, &s); err != nil {
			t.Fatal(err)
		}
		if err := cl.Operation(ctx, "cluster.commit", launch.ClusterTokenArgs{Group: "late", Token: q.Token}, nil); err != nil {
			t.Fatal(err)
		}
		g.Quiesced, g.Captured = maxTime(g.Quiesced, q.Paused.UTC()), maxTime(g.Captured, s.Captured.UTC())
		g.Members = append(g.Members, snapstore.GroupMember{VM: vm, Snapshot: s.Name, ID: s.ID, Generation: s.Generation, Host: s.Host, Paused: q.Paused.UTC()})
	}
	gs, _ := snapstore.OpenGroups(launch.ClusterDir(w.state("a")), true)
	if err := gs.Write(g); err != nil {
		t.Fatal(err)
	}
	for _, vm := range []string{"web", "db"} {
		for deadline := time.Now().Add(30 * time.Second); ; {
			if st, _ := w.vmState(vm); st == "running" {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("VM %s never resumed after its lease", vm)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	expired := w.auditOf(launch.KindClusterLeaseExpired, "late")
	for _, vm := range []string{"web", "db"} {
		if d := expired[vm]; d == nil || d["kept"] != true {
			t.Fatalf("VM %s's lease expiry record: %v, want its committed snapshot kept", vm, d)
		}
	}
	killVM(t, w.state("a"), "web")
	killVM(t, w.state("a"), "db")
	waitStopped(t, w.state("a"), "web")
	waitStopped(t, w.state("a"), "db")
	if code, out, errs := runUmbra(t, append([]string{"cluster", "restore", "late", "web=" + w.spec("web"), "db=" + w.spec("db")}, append(w.host("a"), w.policy...)...)...); code != 0 {
		t.Fatalf("restore of the set recorded before its coordinator went = %d\n%s\n%s", code, out, errs)
	}
	w.requireRunning("web", "db")
}

// killCoordinator runs umbra cluster checkpoint crash web db in a process of its own
// with a 5 s lease, waits until both members are captured and held, SIGKILLs the coordinator and waits until both VMs run again on their own.
func (w *clusterWorld) killCoordinator() {
	t := w.t
	t.Helper()
	time.Sleep(500 * time.Millisecond)
	p := startUmbra(t, "coordinator", append([]string{"cluster", "checkpoint", "crash", "web", "db", "--lease", "5s", "--exec", "exec sleep 15 >/dev/null 2>&1"}, w.stateDir()...)...)
	deadline := time.Now().Add(time.Minute)
	for time.Now().Before(deadline) {
		if len(w.snapshots("web")) == 1 && len(w.snapshots("db")) == 1 {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if len(w.snapshots("web")) != 1 || len(w.snapshots("db")) != 1 {
		t.Fatalf("the members were never captured: %v %v\n%s", w.snapshots("web"), w.snapshots("db"), p.stderr.String())
	}
	for _, vm := range []string{"web", "db"} {
		if st, errs := w.vmState(vm); st != "paused" {
			t.Fatalf("VM %s is %q while held, want paused: %s", vm, st, errs)
		}
	}
	killed := time.Now()
	p.cmd.Process.Signal(syscall.SIGKILL)
	p.wait(t, 10*time.Second)
	// A plain resume of a held VM is refused: the hold is the coordinator's.
	if code, _, errs := runUmbra(t, "resume", "--state-dir", w.state("a"), "web"); code == 0 || !strings.Contains(errs, "held by cluster checkpoint crash") {
		t.Fatalf("resume of a held VM = %d: %s", code, errs)
	}
	for _, vm := range []string{"web", "db"} {
		for {
			st, _ := w.vmState(vm)
			if st == "running" {
				break
			}
			if time.Since(killed) > 30*time.Second {
				t.Fatalf("VM %s is still %q %v after its coordinator died", vm, st, time.Since(killed))
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	t.Logf("both VMs resumed on their own %v after the coordinator was killed (lease 5s)", time.Since(killed).Round(time.Millisecond))
}
