// Package eventlogtest writes long event logs quickly, for tests and benchmarks of how
// cost grows with history: records encoded and extended exactly as a Measurer does,
// but buffered, without an fsync per record.
package eventlogtest

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"os"

	"github.com/google/go-tpm/tpm2/transport"

	"github.com/umbra-cc/umbra/attest/eventlog"
	"github.com/umbra-cc/umbra/tpmdev"
)

// Extend appends n records (cloak registrations, the most frequent runtime
// measurement) to the event log at path, extending pcr of tpm with each, then opens
// and closes the log through eventlog.Open, so that its checkpoint names the new end.
func Extend(tpm transport.TPM, path string, pcr, n int) error {
	ctx := context.Background()
	m, err := eventlog.Open(ctx, tpm, path, pcr, nil)
	if err != nil {
		return err
	}
	recs, err := m.Records()
	if cerr := m.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	w := bufio.NewWriter(f)
	for i := range n {
		var seed [8]byte
		binary.BigEndian.PutUint64(seed[:], uint64(i))
		value := sha256.Sum256(seed[:])
		typ, desc := eventlog.TypeCloakRegister, fmt.Sprintf("app-%d", i)
		digest := eventlog.EventDigest(typ, desc, value[:])
		rec := eventlog.Record{RecNum: uint64(len(recs) + i), PCR: pcr,
			Digests:     []eventlog.Digest{{HashAlg: eventlog.HashAlg, Digest: hex.EncodeToString(digest)}},
			ContentType: eventlog.ContentType,
			Content:     eventlog.Content{Type: typ, Description: desc, Value: hex.EncodeToString(value[:])}}
		line, err := eventlog.Encode(&rec)
		if err == nil {
			_, err = w.Write(line)
		}
		if err == nil {
			err = tpmdev.Extend(tpm, pcr, digest)
		}
		if err != nil {
			f.Close()
			return fmt.Errorf("extend event log %s: record %d: %w", path, rec.RecNum, err)
		}
	}
	err = w.Flush()
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("extend event log %s: %w", path, err)
	}
	// The checkpoint still names the old end: this open replays the new records
	// (checking them against the PCR) and its close checkpoints them.
	if m, err = eventlog.Open(ctx, tpm, path, pcr, nil); err != nil {
		return err
	}
	return m.Close()
}
