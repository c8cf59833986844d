package launch

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/umbra-cc/umbra/attest/audit"
	"github.com/umbra-cc/umbra/attest/eventlog"
	"github.com/umbra-cc/umbra/statefile"
)

// This file is the per-VM state that lets many monitors share a state directory:
// STATE/vms/NAME/lock, flocked by the one monitor running VM NAME, and
// STATE/vms/NAME/running, the marker of a launch whose outcome is not audited yet.
// A marker whose lock is free belongs to a monitor that died: the next monitor
// records that launch as lost (recordLostVMs).

func vmDir(stateDir, vm string) string { return filepath.Join(stateDir, "vms", vm) }

// lockVM takes VM vm's lock, refusing if another monitor holds it. A lock held only
// for a moment (another monitor recording a lost launch of this VM) is waited for.
func lockVM(ctx context.Context, stateDir, vm string) (*os.File, error) {
	dir := vmDir(stateDir, vm)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("VM state directory: %w", err)
	}
	f, err := os.OpenFile(filepath.Join(dir, "lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("VM lock: %w", err)
	}
	for try := 0; ; try++ {
		err = statefile.TryLock(f)
		if !errors.Is(err, statefile.ErrLocked) || try == 10 {
			break
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
	if errors.Is(err, statefile.ErrLocked) {
		f.Close()
		who := ""
		if m, rerr := readRunningMarker(stateDir, vm); rerr == nil {
			who = fmt.Sprintf(" (monitor pid %d, since %s)", m.PID, m.Started.Format(time.RFC3339))
		}
		return nil, fmt.Errorf("VM %s is already running on this host%s: one VM name runs once at a time; stop it or give this VM another name", vm, who)
	}
	if err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// runningMarker is the content of STATE/vms/NAME/running.
type runningMarker struct {
	LaunchID string    `json:"launch_id"`
	PID      int       `json:"pid"`
	Started  time.Time `json:"started"`
	// AuditOffset is the audit log's size when the marker was written: the launch
	// record and its outcome, if any, lie after it.
	AuditOffset int64 `json:"audit_offset"`
}

func markerPath(stateDir, vm string) string { return filepath.Join(vmDir(stateDir, vm), "running") }

func writeRunningMarker(stateDir, vm, launchID, auditPath string) error {
	var off int64
	if st, err := os.Stat(auditPath); err == nil {
		off = st.Size()
	}
	b, _ := json.Marshal(runningMarker{LaunchID: launchID, PID: os.Getpid(), Started: time.Now().UTC(), AuditOffset: off})
	if err := statefile.WriteAtomic(markerPath(stateDir, vm), b, 0o600); err != nil {
		return fmt.Errorf("mark VM %s running: %w", vm, err)
	}
	return nil
}

func removeRunningMarker(stateDir, vm string) {
	os.Remove(markerPath(stateDir, vm))
}

func readRunningMarker(stateDir, vm string) (*runningMarker, error) {
	b, err := os.ReadFile(markerPath(stateDir, vm))
	if err != nil {
		return nil, err
	}
	var m runningMarker
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("%s is corrupt: %w", markerPath(stateDir, vm), err)
	}
	return &m, nil
}

func newLaunchID() string {
	b := make([]byte, 16)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// recordLostVMs appends a lost record for every launch whose monitor died before it
// audited the outcome: a running marker whose VM lock nobody holds. own is this
// monitor's VM, whose lock it already holds.
func recordLostVMs(ctx context.Context, stateDir, own, auditPath string, l *audit.Log, log *slog.Logger) error {
	markers, _ := filepath.Glob(filepath.Join(stateDir, "vms", "*", "running"))
	for _, p := range markers {
		vm := filepath.Base(filepath.Dir(p))
		if vm == own {
			if err := recordLost(ctx, stateDir, vm, auditPath, l, log); err != nil {
				return err
			}
			continue
		}
		f, err := os.OpenFile(filepath.Join(filepath.Dir(p), "lock"), os.O_RDWR|os.O_CREATE, 0o600)
		if err != nil {
			continue
		}
		if statefile.TryLock(f) == nil {
			err = recordLost(ctx, stateDir, vm, auditPath, l, log)
		}
		f.Close() // drops the lock
		if err != nil {
			return err
		}
	}
	return nil
}

func recordLost(ctx context.Context, stateDir, vm, auditPath string, l *audit.Log, log *slog.Logger) error {
	m, err := readRunningMarker(stateDir, vm)
	if errors.Is(err, os.ErrNotExist) {
		return nil // recorded by another monitor meanwhile
	}
	if err == nil {
		// The monitor may have died after auditing the outcome but before removing
		// the marker: then the launch is closed already.
		closed, herr := audit.HasOutcome(auditPath, m.AuditOffset, m.LaunchID)
		if herr == nil && closed {
			removeRunningMarker(stateDir, vm)
			return nil
		}
	}
	details := map[string]any{"reason": "the monitor stopped without recording how the VM ended (killed, or the host went down)"}
	if err != nil {
		details["marker_error"] = err.Error()
	} else {
		details["launch_id"], details["monitor_pid"], details["started"] = m.LaunchID, m.PID, m.Started
	}
	raw, _ := json.Marshal(details)
	if _, err := l.Append(ctx, audit.Record{Kind: audit.KindLost, VM: vm, Actor: "umbra/system", Details: raw}); err != nil {
		return fmt.Errorf("record the lost launch of VM %s: %w", vm, err)
	}
	log.Warn("recorded a lost launch: its monitor died before auditing how the VM ended", "vm", vm)
	removeRunningMarker(stateDir, vm)
	return nil
}

// auditRecoveries audits the torn measurements the measurer repaired.
func auditRecoveries(ctx context.Context, l *audit.Log, m *eventlog.Measurer, log *slog.Logger) {
	if err := l.RecordRecoveries(ctx, m.TakeRecovered()); err != nil {
		log.Error("audit a repaired torn measurement", "err", err)
	}
}
