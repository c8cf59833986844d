package sealing_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-tpm/tpm2/transport"
	"github.com/umbra-cc/umbra/sealing"
)

// TestSimCounterJournal: on the simulator, each counter update is one line
// appended to tpm-sim.counters.log; the next boot replays the journal and the
// snapshot (the larger version wins, a half-written last line is ignored),
// folds the journal into tpm-sim.counters.json and still refuses old versions.
func TestSimCounterJournal(t *testing.T) {
	f := newFixture(t)
	h := backends()[0].newHost(t) // sim
	journal := filepath.Join(h.stateDir, "tpm-sim.counters.log")
	snapshot := filepath.Join(h.stateDir, "tpm-sim.counters.json")
	var v1, v2, v3 []byte
	h.session(t, func(tpm transport.TPM) {
		ek, err := sealing.ReadEKPublic(tpm)
		if err != nil {
			t.Fatal(err)
		}
		measure(t, tpm, h, monitorV1)
		v1, v2, v3 = f.seal(ek, 1, "p1"), f.seal(ek, 2, "p2"), f.seal(ek, 3, "p3")
		mustOpen(t, tpm, v1, f.opts(h), "p1")
		mustOpen(t, tpm, v2, f.opts(h), "p2")
		b, err := os.ReadFile(journal)
		if err != nil {
			t.Fatal(err)
		}
		if got := string(b); got != "vm1 1\nvm1 2\n" {
			t.Fatalf("journal = %q, want two appended lines", got)
		}
	})
	// Another process was writing a line when this one read the journal.
	if err := os.WriteFile(journal, []byte("vm1 2\nvm1 9"), 0o600); err != nil {
		t.Fatal(err)
	}
	h.session(t, func(tpm transport.TPM) {
		measure(t, tpm, h, monitorV1)
		b, err := os.ReadFile(journal)
		if err != nil || len(b) != 0 {
			t.Fatalf("journal after boot = %q, %v; want it folded into the snapshot", b, err)
		}
		if b, err := os.ReadFile(snapshot); err != nil || !strings.Contains(string(b), `"vm1": 2`) {
			t.Fatalf("snapshot = %s, %v; want vm1 at 2", b, err)
		}
		mustRefuse(t, tpm, v1, f.opts(h), sealing.ErrRolledBack, sealing.CheckRollback)
		mustOpen(t, tpm, v3, f.opts(h), "p3")
	})
	// The snapshot says 2, the journal 3: the larger wins.
	h.session(t, func(tpm transport.TPM) {
		measure(t, tpm, h, monitorV1)
		mustRefuse(t, tpm, v2, f.opts(h), sealing.ErrRolledBack, sealing.CheckRollback)
		mustOpen(t, tpm, v3, f.opts(h), "p3")
	})
	// A damaged journal is refused, not ignored.
	if err := os.WriteFile(journal, []byte("vm1 two\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if tpm, err := sealing.OpenTPM("sim", h.stateDir); err == nil {
		tpm.Close()
		t.Fatal("OpenTPM accepted a malformed counters journal")
	}
}
