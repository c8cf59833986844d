package migration

import (
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"io"
	"regexp"

	"github.com/go-json-experiment/json"

	"github.com/umbra-cc/umbra/strictjson"
)

// Version is the migration protocol version this package speaks.
const Version = 1

type frameKind byte

const (
	frameOffer   frameKind = 1
	frameVerdict frameKind = 2
	frameData    frameKind = 3
	frameEnd     frameKind = 4
	frameReady   frameKind = 5
	frameCommit  frameKind = 6
	frameRunning frameKind = 7
	// Storage migration (storage.go).
	frameDisk     frameKind = 8
	frameDiskSync frameKind = 9
	frameDiskDone frameKind = 10
)

var frameNames = map[frameKind]string{
	frameOffer: "offer", frameVerdict: "verdict", frameData: "data", frameEnd: "end",
	frameReady: "ready", frameCommit: "commit", frameRunning: "running",
	frameDisk: "disk", frameDiskSync: "disk-sync", frameDiskDone: "disk-done",
}

func (k frameKind) String() string {
	if n, ok := frameNames[k]; ok {
		return n
	}
	return fmt.Sprintf("frame kind %d", byte(k))
}

// Limits of what a peer may send.
const (
	MaxOfferBytes = 1 << 20 // the offer, secrets included
	MaxChunk      = 1 << 20 // one data frame
	MaxFiles      = 8
	MaxFileBytes  = 1 << 30 // one offered file (a guest image, a kernel, a bundle)
	// MaxCheckpointBytes bounds the checkpoint stream: RAM (3 GiB at most) plus
	// the snapshot format's per-block overhead and the state sections.
	MaxCheckpointBytes = 4 << 30
	MaxSecrets         = 16
	MaxSecretBytes     = 4 << 10
	maxReasons         = 32
	maxReasonBytes     = 512
	maxSmallFrame      = 64 << 10
)

func maxFrame(k frameKind) int {
	switch k {
	case frameOffer:
		return MaxOfferBytes
	case frameData, frameDisk:
		return MaxChunk
	case frameVerdict, frameEnd, frameReady, frameCommit, frameRunning, frameDiskSync, frameDiskDone:
		return maxSmallFrame
	}
	return -1
}

const frameHeader = 5

func writeFrame(w io.Writer, k frameKind, payload []byte) error {
	if len(payload) > maxFrame(k) {
		return fmt.Errorf("migration: %s of %d bytes is over its limit of %d", k, len(payload), maxFrame(k))
	}
	var h [frameHeader]byte
	h[0] = byte(k)
	binary.BigEndian.PutUint32(h[1:], uint32(len(payload)))
	if _, err := w.Write(h[:]); err != nil {
		return fmt.Errorf("send %s: %w", k, err)
	}
	if _, err := w.Write(payload); err != nil {
		return fmt.Errorf("send %s: %w", k, err)
	}
	return nil
}

// readFrame reads one frame of any kind in want. It never allocates past the kind's
// limit, whatever the length says.
func readFrame(r io.Reader, want ...frameKind) (frameKind, []byte, error) {
	var h [frameHeader]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		if errors.Is(err, io.EOF) {
			return 0, nil, fmt.Errorf("%w: the peer closed the connection where a %s belongs", ErrPeerGone, want[0])
		}
		return 0, nil, fmt.Errorf("%w: read %s: %v", ErrPeerGone, want[0], err)
	}
	k := frameKind(h[0])
	ok := false
	for _, w := range want {
		ok = ok || k == w
	}
	if !ok {
		return 0, nil, fmt.Errorf("%w: the peer sent a %s where a %s belongs", ErrProtocol, k, want[0])
	}
	n := binary.BigEndian.Uint32(h[1:])
	if int64(n) > int64(maxFrame(k)) {
		return 0, nil, fmt.Errorf("%w: the peer's %s claims %d bytes, over its limit of %d", ErrProtocol, k, n, maxFrame(k))
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(r, b); err != nil {
		return 0, nil, fmt.Errorf("%w: read %s payload (%d bytes): %v", ErrPeerGone, k, n, err)
	}
	return k, b, nil
}

// Errors a migration ends with.
var (
	// ErrRefused: the other side refused (its verdict's reasons follow).
	ErrRefused = errors.New("the peer refused the migration")
	// ErrProtocol: the peer sent something this protocol does not allow.
	ErrProtocol = errors.New("migration protocol violation")
	// ErrPeerGone: the connection ended or timed out before the step completed.
	ErrPeerGone = errors.New("the peer is gone")
	// ErrInDoubt: commit was sent but the destination's running never came; the VM
	// stays paused and unresumable on the source (see the package doc).
	ErrInDoubt = errors.New("the handover is in doubt: commit was sent, the destination did not confirm it runs the VM")
)

// FileInfo names a file that travels with the VM.
type FileInfo struct {
	Name string `json:"name"`
	Size int64  `json:"size"`
}

var fileName = regexp.MustCompile(`^[a-z][a-z0-9.-]{0,63}$`)

// Offer is what the source proposes: the VM and what it needs to run elsewhere.
type Offer struct {
	Version int `json:"version"`
	// VM is the VM's name.
	VM string `json:"vm"`
	// Generation is the VM's rollback generation; it moves to the destination.
	Generation uint64 `json:"generation"`
	// Files travel before the checkpoint, in this order (the guest image, the
	// sealed bundle...), so the destination can rebuild the VM the checkpoint
	// restores into.
	Files []FileInfo `json:"files"`
	// Key is the per-migration key the checkpoint is sealed under (32 bytes).
	Key []byte `json:"key"`
	// Secrets are the VM's secrets (its cloak master secret, disk keys), by name.
	Secrets map[string][]byte `json:"secrets"`
	// Disks are the VM's disks: shared, or copied before and during the pause
	// (storage.go).
	Disks []DiskInfo `json:"disks,omitempty"`
	// Replica makes it a continuous replication to a standby (replicate.go), not a
	// migration.
	Replica bool `json:"replica,omitempty"`
	// LeaseMS is a replica source's lease: the standby waits at least this long (and
	// its margin) without a frame before it takes over.
	LeaseMS int64 `json:"lease_ms,omitempty"`
}

var vmName = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)

func (o *Offer) validate() error {
	if o.Version != Version {
		return fmt.Errorf("offer version %d, this umbra speaks %d", o.Version, Version)
	}
	if !vmName.MatchString(o.VM) {
		return fmt.Errorf("offer names VM %q, not a VM name", o.VM)
	}
	if o.Generation == 0 {
		return errors.New("offer has generation 0")
	}
	if len(o.Key) != 32 {
		return fmt.Errorf("offer's checkpoint key is %d bytes, not 32", len(o.Key))
	}
	if len(o.Files) > MaxFiles {
		return fmt.Errorf("offer lists %d files, at most %d", len(o.Files), MaxFiles)
	}
	seen := map[string]bool{}
	for _, f := range o.Files {
		if !fileName.MatchString(f.Name) || seen[f.Name] {
			return fmt.Errorf("offer's file name %q is invalid or repeated", f.Name)
		}
		seen[f.Name] = true
		if f.Size < 0 || f.Size > MaxFileBytes {
			return fmt.Errorf("offer's file %s is %d bytes, at most %d", f.Name, f.Size, MaxFileBytes)
		}
	}
	if o.LeaseMS < 0 || o.LeaseMS > 3600_000 || (o.LeaseMS != 0 && !o.Replica) {
		return fmt.Errorf("offer's lease of %d ms is out of range or not a replication's", o.LeaseMS)
	}
	if err := validateDisks(o.Disks); err != nil {
		return err
	}
	if o.Replica && len(o.Disks) > 0 {
		return errors.New("offer replicates a VM with disks, which a replication does not carry")
	}
	if len(o.Secrets) > MaxSecrets {
		return fmt.Errorf("offer has %d secrets, at most %d", len(o.Secrets), MaxSecrets)
	}
	for n, s := range o.Secrets {
		if !fileName.MatchString(n) || len(s) == 0 || len(s) > MaxSecretBytes {
			return fmt.Errorf("offer's secret %q is misnamed, empty or over %d bytes", n, MaxSecretBytes)
		}
	}
	return nil
}

func decodeStrict(b []byte, v any) error { return strictjson.Decode(b, v) }

func decodeOffer(b []byte) (*Offer, error) {
	var o Offer
	if err := strictjson.Decode(b, &o); err != nil {
		return nil, fmt.Errorf("%w: the offer: %v", ErrProtocol, err)
	}
	if err := o.validate(); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrProtocol, err)
	}
	return &o, nil
}

// verdict is an accept or a refusal with its reasons.
type verdict struct {
	Accepted bool     `json:"accepted"`
	Reasons  []string `json:"reasons,omitempty"`
}

func refusal(err error) verdict {
	r := err.Error()
	if len(r) > maxReasonBytes {
		r = r[:maxReasonBytes]
	}
	return verdict{Reasons: []string{r}}
}

func decodeVerdict(b []byte) (*verdict, error) {
	var v verdict
	if err := strictjson.Decode(b, &v); err != nil {
		return nil, fmt.Errorf("%w: a verdict: %v", ErrProtocol, err)
	}
	if v.Accepted == (len(v.Reasons) > 0) || len(v.Reasons) > maxReasons {
		return nil, fmt.Errorf("%w: a verdict that accepts with reasons, refuses without, or gives over %d", ErrProtocol, maxReasons)
	}
	for _, r := range v.Reasons {
		if len(r) > maxReasonBytes {
			return nil, fmt.Errorf("%w: a verdict reason over %d bytes", ErrProtocol, maxReasonBytes)
		}
	}
	return &v, nil
}

// end closes a stream: its byte count and SHA-256.
type end struct {
	Bytes  int64  `json:"bytes"`
	SHA256 []byte `json:"sha256"`
}

func decodeEnd(b []byte) (*end, error) {
	var e end
	if err := strictjson.Decode(b, &e); err != nil || len(e.SHA256) != sha256.Size || e.Bytes < 0 {
		return nil, fmt.Errorf("%w: an end frame that is not a byte count and a SHA-256", ErrProtocol)
	}
	return &e, nil
}

func mustJSON(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(fmt.Sprintf("migration: encode %T: %v", v, err))
	}
	return b
}

// streamWriter frames what is written to it as data chunks and counts and hashes it.
type streamWriter struct {
	w   io.Writer
	n   int64
	h   hash.Hash
	max int64
}

func newStreamWriter(w io.Writer, max int64) *streamWriter {
	return &streamWriter{w: w, h: sha256.New(), max: max}
}

func (s *streamWriter) Write(p []byte) (int, error) {
	if s.n+int64(len(p)) > s.max {
		return 0, fmt.Errorf("migration: the stream is over its limit of %d bytes", s.max)
	}
	for off := 0; off < len(p); off += MaxChunk {
		c := p[off:min(off+MaxChunk, len(p))]
		if err := writeFrame(s.w, frameData, c); err != nil {
			return off, err
		}
		s.h.Write(c)
		s.n += int64(len(c))
	}
	return len(p), nil
}

func (s *streamWriter) close() error {
	return writeFrame(s.w, frameEnd, mustJSON(end{Bytes: s.n, SHA256: s.h.Sum(nil)}))
}

// receiveStream copies data frames into w until the end frame, refusing a stream over
// max bytes or one whose end does not match what came.
func receiveStream(r io.Reader, w io.Writer, max int64, what string) (int64, error) {
	return receiveStreamAfter(r, w, max, what, nil)
}

// receiveStreamAfter is receiveStream for a stream whose first data frame, first, was
// already read (a standby learns from it that a checkpoint begins).
func receiveStreamAfter(r io.Reader, w io.Writer, max int64, what string, first []byte) (int64, error) {
	h := sha256.New()
	var n int64
	if len(first) > 0 {
		if int64(len(first)) > max {
			return 0, fmt.Errorf("%s: %w: over its limit of %d bytes", what, ErrProtocol, max)
		}
		if _, err := w.Write(first); err != nil {
			return 0, fmt.Errorf("%s: spool: %w", what, err)
		}
		h.Write(first)
		n = int64(len(first))
	}
	for {
		k, b, err := readFrame(r, frameData, frameEnd)
		if err != nil {
			return n, fmt.Errorf("%s: %w", what, err)
		}
		if k == frameEnd {
			e, err := decodeEnd(b)
			if err != nil {
				return n, fmt.Errorf("%s: %w", what, err)
			}
			if e.Bytes != n || string(e.SHA256) != string(h.Sum(nil)) {
				return n, fmt.Errorf("%s: %w: the end frame says %d bytes with another digest; %d came", what, ErrProtocol, e.Bytes, n)
			}
			return n, nil
		}
		if n+int64(len(b)) > max {
			return n, fmt.Errorf("%s: %w: over its limit of %d bytes", what, ErrProtocol, max)
		}
		if _, err := w.Write(b); err != nil {
			return n, fmt.Errorf("%s: spool: %w", what, err)
		}
		h.Write(b)
		n += int64(len(b))
	}
}
