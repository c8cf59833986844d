// Package tpmsim opens go-tpm-tools' in-process TPM 2.0 simulator (Microsoft's
// reference implementation, compiled with cgo against libcrypto) with hierarchy
// seeds that persist in umbra's state directory, and registers it as the "sim"
// back end of package sealing.
//
// This is a try-it-out back end with no security: the seed that every key
// derives from is a file, the simulator's NV memory lives in process memory only,
// and PCRs start from zero in every process. It is the only package of umbra that
// imports the simulator, so other packages stay cgo-free.
package tpmsim

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/google/go-tpm-tools/simulator"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/umbra-cc/umbra/sealing"
)

// SeedFile is the name, in the state directory, of the file holding the
// simulator's seed.
const SeedFile = "tpm-sim.seed"

func init() { sealing.RegisterSimulator(Open) }

// Open starts the simulator with the seed kept in stateDir/SeedFile, creating
// the seed on first use. Only one simulator can be open per process; Open blocks
// until the previous one is closed.
func Open(stateDir string) (transport.TPMCloser, error) {
	seed, err := loadSeed(filepath.Join(stateDir, SeedFile))
	if err != nil {
		return nil, err
	}
	s, err := simulator.GetWithFixedSeedInsecure(seed)
	if err != nil {
		return nil, fmt.Errorf("start simulator: %w", err)
	}
	return transport.FromReadWriteCloser(s), nil
}

func loadSeed(path string) (int64, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		b = make([]byte, 8)
		if _, err := rand.Read(b); err != nil {
			return 0, err
		}
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			return 0, fmt.Errorf("create simulator seed: %w", err)
		}
		if _, err := f.Write(b); err != nil {
			f.Close()
			return 0, fmt.Errorf("write simulator seed: %w", err)
		}
		if err := f.Close(); err != nil {
			return 0, fmt.Errorf("write simulator seed: %w", err)
		}
	} else if err != nil {
		return 0, fmt.Errorf("read simulator seed: %w", err)
	}
	if len(b) != 8 {
		return 0, fmt.Errorf("simulator seed %s is %d bytes, want 8: delete it to start a new simulated TPM (bundles sealed to the old one will no longer open)", path, len(b))
	}
	return int64(binary.BigEndian.Uint64(b)), nil
}
