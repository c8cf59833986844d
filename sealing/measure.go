package sealing

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/google/go-tpm/tpm2/transport"

	"github.com/umbra-cc/umbra/statefile"
	"github.com/umbra-cc/umbra/tpmdev"
)

// MonitorPCR is the PCR that holds the umbra monitor measurement: one SHA-256
// extension per boot, so its value is SHA-256(zero32 || SHA-256(monitor binary)).
// See docs/sealing.md for why 13.
const MonitorPCR = 13

// MonitorPCRValue is the value of MonitorPCR after the monitor with the given
// digest was measured into it on a fresh boot.
func MonitorPCRValue(monitorDigest [32]byte) [32]byte {
	var zero [32]byte
	return [32]byte(tpmdev.ExtendValue(zero[:], monitorDigest[:]))
}

// FileDigest returns the SHA-256 of a file, e.g. the monitor binary.
func FileDigest(path string) ([32]byte, error) {
	var d [32]byte
	f, err := os.Open(path)
	if err != nil {
		return d, err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return d, err
	}
	copy(d[:], h.Sum(nil))
	return d, nil
}

// SelfDigest returns the SHA-256 of the running executable. It reads /proc/self/exe,
// the file the process was started from even if its path was replaced since (a path
// from os.Executable could name a different file by now), once per process: the
// binary (tens of MiB) is measured for sealing and again for the launch event log.
var SelfDigest = sync.OnceValues(func() ([32]byte, error) {
	return FileDigest("/proc/self/exe")
})

// ReadPCRs reads SHA-256 PCR values (tpmdev.ReadPCRs), its error marked ErrTPM.
func ReadPCRs(t transport.TPM, pcrs ...int) (map[int][32]byte, error) {
	m, err := tpmdev.ReadPCRs(t, pcrs...)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrTPM, err)
	}
	return m, nil
}

// MeasureEvent is one line of the measurement log in the state directory.
type MeasureEvent struct {
	Time    time.Time `json:"time"`
	BootID  string    `json:"boot_id"`
	PCR     int       `json:"pcr"`
	Digest  string    `json:"sha256"`
	Comment string    `json:"comment"`
}

const measureLog = "measurements.jsonl"

// MeasureMonitor makes sure MonitorPCR holds the measurement of the monitor with
// the given digest, extending it if this is the first measurement since boot.
// It is meant to run once per boot, as early as possible (docs/sealing.md):
// the first extension after boot decides the PCR value for the whole boot.
// If the PCR already holds another value it returns ErrPCRMismatch: a different
// monitor was measured this boot, or something else uses the PCR.
func MeasureMonitor(t transport.TPM, digest [32]byte, stateDir, comment string) (extended bool, err error) {
	if stateDir != "" {
		// Monitors starting together must not both see an unmeasured PCR and both
		// extend it (the PCR would then match no approval until a reboot).
		unlock, err := lockMeasure(stateDir)
		if err != nil {
			return false, err
		}
		defer unlock()
	}
	cur, err := ReadPCRs(t, MonitorPCR)
	if err != nil {
		return false, err
	}
	want := MonitorPCRValue(digest)
	switch cur[MonitorPCR] {
	case want:
		return false, nil
	case [32]byte{}:
	default:
		return false, fmt.Errorf("%w: PCR %d is %x, not the measurement %x of monitor %x: %s",
			ErrPCRMismatch, MonitorPCR, cur[MonitorPCR], want, digest, ExplainMonitorPCR(stateDir, cur[MonitorPCR]))
	}
	if err := tpmdev.Extend(t, MonitorPCR, digest[:]); err != nil {
		return false, fmt.Errorf("%w: %w", ErrTPM, err)
	}
	if stateDir != "" {
		ev := MeasureEvent{Time: time.Now().UTC(), BootID: bootID(t), PCR: MonitorPCR, Digest: hex.EncodeToString(digest[:]), Comment: comment}
		if err := appendMeasureLog(stateDir, ev); err != nil {
			return true, fmt.Errorf("PCR %d extended but the measurement log was not written: %w", MonitorPCR, err)
		}
	}
	return true, nil
}

// lockMeasure takes the state directory's measurement lock (STATE/measure.lock).
func lockMeasure(stateDir string) (func(), error) {
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(filepath.Join(stateDir, "measure.lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("measure the monitor: %w", err)
	}
	if err := statefile.Lock(context.Background(), f); err != nil {
		f.Close()
		return nil, fmt.Errorf("measure the monitor: %w", err)
	}
	return func() { f.Close() }, nil
}

func bootID(t transport.TPM) string {
	if IsSimulator(t) {
		return "simulator-process"
	}
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return "unknown"
	}
	return strings.TrimSpace(string(b))
}

func appendMeasureLog(stateDir string, ev MeasureEvent) error {
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		return err
	}
	f, err := os.OpenFile(filepath.Join(stateDir, measureLog), os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return err
	}
	b, _ := json.Marshal(ev)
	if _, err := f.Write(append(b, '\n')); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// ExplainMonitorPCR says, from the measurement log, which monitor produced the
// PCR value, if the log knows.
func ExplainMonitorPCR(stateDir string, value [32]byte) string {
	if value == ([32]byte{}) {
		return "no monitor has been measured since boot (run `umbra tpm measure` at boot)"
	}
	b, err := os.ReadFile(filepath.Join(stateDir, measureLog))
	if err != nil || stateDir == "" {
		return "the measurement log has no record of this value"
	}
	lines := bytes.Split(b, []byte("\n"))
	for i := len(lines) - 1; i >= 0; i-- {
		var ev MeasureEvent
		if json.Unmarshal(lines[i], &ev) != nil || ev.PCR != MonitorPCR {
			continue
		}
		d, err := hex.DecodeString(ev.Digest)
		if err != nil || len(d) != 32 {
			continue
		}
		if MonitorPCRValue([32]byte(d)) == value {
			return fmt.Sprintf("it is the measurement of monitor %s, logged at %s (%s)", ev.Digest, ev.Time.Format(time.RFC3339), ev.Comment)
		}
	}
	return "the measurement log has no record of this value (the PCR was extended by something other than umbra, or more than once)"
}

// PredictApproval answers, without writing anything, whether a bundle would pass the
// monitor-approval check once this boot's monitor is measured: on a boot where
// PCR 13 holds no measurement yet, it reads the other PCRs the candidate approvals
// name, takes PCR 13 to be MonitorPCRValue(monitorDigest) (what `umbra run` extends
// first), and returns the first approval by the bundle's administrator (one of
// admins, by h.AdminKeyID) that verifies in software and matches. The TPM itself
// decides at the real open; this only predicts it.
func PredictApproval(t transport.TPM, h *Header, admins []*ecdsa.PublicKey, hostApprovals []*Approval, monitorDigest [32]byte) (*Approval, error) {
	var admin *ecdsa.PublicKey
	for _, a := range admins {
		if KeyID(a) == h.AdminKeyID {
			admin = a
		}
	}
	if admin == nil {
		return nil, fmt.Errorf("%w: no trusted administrator has key id %s", ErrBadApproval, h.AdminKeyID)
	}
	valid, all, _ := validApprovals(admin, approvalCandidates(h, h.AdminKeyID, hostApprovals))
	idx := slices.DeleteFunc(all, func(i int) bool { return i == MonitorPCR })
	cur := map[int][32]byte{}
	if len(idx) > 0 {
		var err error
		if cur, err = ReadPCRs(t, idx...); err != nil {
			return nil, err
		}
	}
	cur[MonitorPCR] = MonitorPCRValue(monitorDigest)
	for _, a := range valid {
		if a.Matches(cur) {
			return a, nil
		}
	}
	return nil, fmt.Errorf("%w: none of the %d valid approvals matches PCR %d = %x, the measurement of this monitor %x", ErrPCRMismatch, len(valid), MonitorPCR, cur[MonitorPCR], monitorDigest)
}
