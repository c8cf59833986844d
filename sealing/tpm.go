package sealing

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/google/go-tpm/tpm2/transport"
	"github.com/google/go-tpm/tpm2/transport/linuxtpm"
)

// Back-end kinds accepted by ParseTPMSpec.
const (
	KindSim    = "sim"
	KindSwtpm  = "swtpm"
	KindDevice = "device"
)

// DefaultTPMSpec is the back end used when the user names none: the in-process
// simulator, for trying umbra out. It offers no protection at all.
const DefaultTPMSpec = KindSim

// TPMSpec is a parsed --tpm value.
type TPMSpec struct {
	Kind string // KindSim, KindSwtpm or KindDevice
	Path string // socket or device path; empty for KindSim
}

// ParseTPMSpec parses "sim", "swtpm:PATH" or "device:PATH".
func ParseTPMSpec(spec string) (TPMSpec, error) {
	if spec == "" || spec == KindSim {
		return TPMSpec{Kind: KindSim}, nil
	}
	kind, path, ok := strings.Cut(spec, ":")
	if !ok || path == "" || (kind != KindSwtpm && kind != KindDevice) {
		return TPMSpec{}, fmt.Errorf("tpm back end %q: want sim, swtpm:SOCKET-PATH or device:DEVICE-PATH (e.g. device:/dev/tpmrm0)", spec)
	}
	if strings.ContainsRune(path, 0) {
		return TPMSpec{}, fmt.Errorf("tpm back end %q: path contains a NUL byte", spec)
	}
	return TPMSpec{Kind: kind, Path: path}, nil
}

// SimulatorOpener opens the in-process simulator whose persistent state lives in
// stateDir.
type SimulatorOpener func(stateDir string) (transport.TPMCloser, error)

var (
	simMu     sync.Mutex
	simOpener SimulatorOpener
)

// RegisterSimulator installs the opener used for the "sim" back end. Package
// sealing/tpmsim calls it; keeping the cgo simulator out of this package lets
// cgo-free builds use the device and swtpm back ends.
func RegisterSimulator(open SimulatorOpener) {
	simMu.Lock()
	defer simMu.Unlock()
	simOpener = open
}

// ErrNoSimulator is returned for the sim back end when no simulator is linked in.
var ErrNoSimulator = errors.New("the TPM simulator is not linked into this build (import github.com/umbra-cc/umbra/sealing/tpmsim, which needs cgo and libssl); use --tpm device:/dev/tpmrm0 or --tpm swtpm:SOCKET")

// DefaultTPMTimeout bounds one TPM command's exchange (send and response) on the
// swtpm and device back ends. The slowest commands umbra sends (primary key
// creation on a hardware TPM) take a few seconds.
const DefaultTPMTimeout = 30 * time.Second

// ErrTPMTimeout reports that a TPM did not answer a command in time.
var ErrTPMTimeout = errors.New("TPM command timed out")

// ErrTPMInterrupted reports that a TPM exchange was abandoned because the command
// was interrupted (SIGINT, SIGTERM).
var ErrTPMInterrupted = errors.New("TPM command interrupted")

// OpenTPM opens the back end named by spec ("sim", "swtpm:PATH", "device:PATH").
// stateDir holds the simulator's persistent state and is unused otherwise.
func OpenTPM(spec, stateDir string) (transport.TPMCloser, error) {
	return OpenTPMTimeout(spec, stateDir, DefaultTPMTimeout)
}

// OpenTPMTimeout is OpenTPM with the deadline for one command's exchange (the
// in-process simulator cannot hang and has none).
func OpenTPMTimeout(spec, stateDir string, timeout time.Duration) (transport.TPMCloser, error) {
	return OpenTPMContext(context.Background(), spec, stateDir, timeout)
}

// OpenTPMContext is OpenTPMTimeout whose exchanges are cut short once ctx is done
// (a signal): from then on every exchange, the one under way included, has at most
// a short grace (2 s) instead of the timeout. A TPM that answers still serves what
// the command does on its way out (a monitor's outcome and audit anchor); one that
// does not no longer holds the command for the whole timeout, and the error wraps
// ErrTPMInterrupted and ctx's cause.
func OpenTPMContext(ctx context.Context, spec, stateDir string, timeout time.Duration) (transport.TPMCloser, error) {
	if timeout <= 0 {
		return nil, fmt.Errorf("TPM timeout %s: must be positive", timeout)
	}
	s, err := ParseTPMSpec(spec)
	if err != nil {
		return nil, err
	}
	switch s.Kind {
	case KindDevice:
		t, err := linuxtpm.Open(s.Path)
		if err != nil {
			return nil, fmt.Errorf("open TPM device %s: %w (is the kernel resource manager /dev/tpmrm0 present and readable by this user?)", s.Path, err)
		}
		return &deviceTPM{TPMCloser: t, path: s.Path, timeout: timeout, ctx: ctx}, nil
	case KindSwtpm:
		t, err := openSwtpm(ctx, s.Path, timeout)
		if err != nil {
			return nil, fmt.Errorf("open swtpm socket %s: %w (start swtpm with --server type=unixio,path=%s --flags not-need-init,startup-clear)", s.Path, err, s.Path)
		}
		return t, nil
	}
	simMu.Lock()
	open := simOpener
	simMu.Unlock()
	if open == nil {
		return nil, ErrNoSimulator
	}
	if stateDir == "" {
		return nil, errors.New("open TPM simulator: no state directory given")
	}
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		return nil, fmt.Errorf("open TPM simulator: create state directory: %w", err)
	}
	t, err := open(stateDir)
	if err != nil {
		return nil, fmt.Errorf("open TPM simulator: %w", err)
	}
	st := &simTPM{TPMCloser: t, stateDir: stateDir}
	if err := st.restoreCounters(); err != nil {
		st.Close()
		return nil, fmt.Errorf("open TPM simulator: restore rollback counters: %w", err)
	}
	return st, nil
}

// IsSimulator reports whether t is the in-process simulator back end.
func IsSimulator(t transport.TPM) bool {
	_, ok := t.(*simTPM)
	return ok
}

// DefaultStateDir returns $UMBRA_STATE_DIR, else $XDG_STATE_HOME/umbra, else
// ~/.local/state/umbra.
func DefaultStateDir() (string, error) {
	if d := os.Getenv("UMBRA_STATE_DIR"); d != "" {
		return d, nil
	}
	if d := os.Getenv("XDG_STATE_HOME"); d != "" {
		return filepath.Join(d, "umbra"), nil
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return "", fmt.Errorf("find state directory: set UMBRA_STATE_DIR: %w", err)
	}
	return filepath.Join(home, ".local", "state", "umbra"), nil
}
