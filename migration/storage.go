package migration

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"regexp"
	"slices"
	"time"
)

// Disks in a migration (docs/migration.md §8). A disk either stays where it is, on
// storage both hosts see (shared: nothing is copied; the source flushes it with the VM
// paused and the destination opens it only after that), or is copied (storage
// migration by dirty bitmap): the whole disk while the VM runs, then, round by round,
// what the VM wrote meanwhile, until a round is below a threshold; then the memory
// checkpoint pauses the VM and what was written since is copied in the pause. A
// protected disk is copied as its image file, ciphertext, and its anchored root and
// version travel with the final pass, so the destination opens exactly that state.
//
// On the wire, after the offered files and before the checkpoint:
//
//	S → D  disk…       chunks of copied disks while the VM runs
//	S → D  disk-sync   the end of the pre-copy
//
// and after the checkpoint, the VM paused:
//
//	S → D  disk…       what was written since
//	S → D  disk-done   every disk's state at the pause (a protected disk's root)
//
// A disk chunk is the disk's index in the offer (one byte), the offset (8 bytes, big
// endian) and the data; it must lie within the disk's offered size.

// Disk modes.
const (
	DiskShared = "shared"
	DiskCopy   = "copy"
)

// MaxDisks bounds the disks an offer lists.
const MaxDisks = 16

// MaxDiskBytes bounds one copied disk (the protected disk's limit, with its metadata).
const MaxDiskBytes = 1 << 40

// DiskInfo is one of the VM's disks in the offer.
type DiskInfo struct {
	// Name is the disk's name in the VM's spec.
	Name string `json:"name"`
	// Mode is DiskShared or DiskCopy.
	Mode string `json:"mode"`
	// Format is the spec's: raw, qcow2 or protected. A copied qcow2 disk arrives as
	// raw (its guest-visible bytes); a copied protected disk as its image file.
	Format string `json:"format"`
	// Path is a shared disk's image path on the source (the destination maps it).
	Path string `json:"path,omitempty"`
	// Size is the bytes a copy carries: a plain disk's size, a protected disk's file.
	Size     int64 `json:"size"`
	ReadOnly bool  `json:"read_only,omitempty"`
}

// DiskState is a disk's state at the pause.
type DiskState struct {
	Name string `json:"name"`
	// Root and Version are a protected disk's anchored root and version.
	Root    string `json:"root,omitempty"`
	Version uint64 `json:"version,omitempty"`
}

// Extent is a byte range of a disk's transfer image.
type Extent struct {
	Off, Len int64
}

// DiskSource is one copied disk as the source reads it.
type DiskSource interface {
	// ReadAt reads the transfer image; a read is not torn by the VM's writes.
	ReadAt(p []byte, off int64) (int, error)
	// Track starts recording what the VM writes; Written returns the extents written
	// since Track or the last Written; Untrack stops.
	Track()
	Written() ([]Extent, error)
	Untrack()
	// Always are extents the pause always copies (a protected disk's metadata and
	// journal, which every commit rewrites).
	Always() []Extent
}

// StorageSource is a Source whose VM has disks.
type StorageSource interface {
	// Disks are the VM's disks, in the offer's order.
	Disks() []DiskInfo
	// CopySource is disk i's transfer image (DiskCopy disks only).
	CopySource(i int) DiskSource
	// Quiesce makes every disk durable with the VM paused (after the checkpoint) and
	// returns each disk's state; the VM writes nothing after it.
	Quiesce(ctx context.Context) ([]DiskState, error)
}

// DiskSink is a copied disk's image on the destination.
type DiskSink interface {
	io.WriterAt
	// Finish makes what was written durable and closes the image.
	Finish() error
	// Remove deletes the image: the migration aborted.
	Remove()
}

// StorageDestination is a Destination that takes VMs with disks.
type StorageDestination interface {
	// CreateDisk makes the empty (all zero) image a copied disk is written into.
	CreateDisk(ctx context.Context, offer *Offer, d DiskInfo) (DiskSink, error)
}

// StorageOptions bound a storage migration's pre-copy.
type StorageOptions struct {
	// Threshold ends the pre-copy once a round copies fewer bytes (default 4 MiB):
	// the rest, written after it, is copied in the pause.
	Threshold int64
	// Rounds bounds the re-copy rounds after the first full copy (default 8).
	Rounds int
}

func (o StorageOptions) threshold() int64 {
	if o.Threshold > 0 {
		return o.Threshold
	}
	return 4 << 20
}

func (o StorageOptions) rounds() int {
	if o.Rounds > 0 {
		return o.Rounds
	}
	return 8
}

var diskNameRE = regexp.MustCompile(`^[a-z][a-z0-9-]{0,19}$`)

func validateDisks(disks []DiskInfo) error {
	if len(disks) > MaxDisks {
		return fmt.Errorf("offer lists %d disks, at most %d", len(disks), MaxDisks)
	}
	seen := map[string]bool{}
	for _, d := range disks {
		switch {
		case !diskNameRE.MatchString(d.Name) || seen[d.Name]:
			return fmt.Errorf("offer's disk name %q is invalid or repeated", d.Name)
		case d.Mode != DiskShared && d.Mode != DiskCopy:
			return fmt.Errorf("offer's disk %s has mode %q, not %s or %s", d.Name, d.Mode, DiskShared, DiskCopy)
		case d.Format != "raw" && d.Format != "qcow2" && d.Format != "protected":
			return fmt.Errorf("offer's disk %s has format %q", d.Name, d.Format)
		case d.Size <= 0 || d.Size > MaxDiskBytes || d.Size%512 != 0:
			return fmt.Errorf("offer's disk %s is %d bytes: want a positive multiple of 512 up to %d", d.Name, d.Size, int64(MaxDiskBytes))
		case (d.Mode == DiskShared) != (d.Path != ""), len(d.Path) > 4096:
			return fmt.Errorf("offer's disk %s: a shared disk names its path (at most 4096 bytes), a copied one none", d.Name)
		}
		seen[d.Name] = true
	}
	return nil
}

// diskSync ends a storage pass.
type diskSync struct {
	// States are every disk's, in the offer's order, on the final pass only.
	States []DiskState `json:"states,omitempty"`
}

const diskChunkHeader = 9

func encodeDiskChunk(i int, off int64, data []byte) []byte {
	b := make([]byte, diskChunkHeader+len(data))
	b[0] = byte(i)
	binary.BigEndian.PutUint64(b[1:], uint64(off))
	copy(b[diskChunkHeader:], data)
	return b
}

// decodeDiskChunk checks a chunk against the offer: a copied disk, within its size.
func decodeDiskChunk(b []byte, disks []DiskInfo) (i int, off int64, data []byte, err error) {
	if len(b) < diskChunkHeader {
		return 0, 0, nil, fmt.Errorf("%w: a disk chunk of %d bytes", ErrProtocol, len(b))
	}
	i = int(b[0])
	u := binary.BigEndian.Uint64(b[1:])
	data = b[diskChunkHeader:]
	if i >= len(disks) || disks[i].Mode != DiskCopy {
		return 0, 0, nil, fmt.Errorf("%w: a chunk of disk %d, which is not a copied disk of the offer", ErrProtocol, i)
	}
	if u > uint64(disks[i].Size) || uint64(len(data)) > uint64(disks[i].Size)-u {
		return 0, 0, nil, fmt.Errorf("%w: a chunk of disk %s at %d (%d bytes) is outside its %d bytes", ErrProtocol, disks[i].Name, u, len(data), disks[i].Size)
	}
	return i, int64(u), data, nil
}

func decodeDiskSync(b []byte, disks []DiskInfo, final bool) (*diskSync, error) {
	var s diskSync
	if err := decodeStrict(b, &s); err != nil {
		return nil, fmt.Errorf("%w: a disk-sync: %v", ErrProtocol, err)
	}
	if !final {
		if len(s.States) != 0 {
			return nil, fmt.Errorf("%w: the pre-copy's end carries disk states", ErrProtocol)
		}
		return &s, nil
	}
	if len(s.States) != len(disks) {
		return nil, fmt.Errorf("%w: the final pass gives %d disk states for %d disks", ErrProtocol, len(s.States), len(disks))
	}
	for i, st := range s.States {
		protected := disks[i].Format == "protected"
		switch {
		case st.Name != disks[i].Name:
			return nil, fmt.Errorf("%w: disk state %d is of %q, the offer's disk is %q", ErrProtocol, i, st.Name, disks[i].Name)
		case protected && (len(st.Root) != 64 || st.Version == 0):
			return nil, fmt.Errorf("%w: protected disk %s's state has no root or version", ErrProtocol, st.Name)
		case !protected && (st.Root != "" || st.Version != 0):
			return nil, fmt.Errorf("%w: disk %s is not protected but its state has a root", ErrProtocol, st.Name)
		}
	}
	return &s, nil
}

// storageSender copies a source's disks.
type storageSender struct {
	conn  io.Writer
	st    StorageSource
	disks []DiskInfo
	src   []DiskSource // nil for shared disks
	opt   StorageOptions
	buf   []byte
	rep   *Report
}

func newStorageSender(w io.Writer, st StorageSource, disks []DiskInfo, opt StorageOptions, rep *Report) *storageSender {
	s := &storageSender{conn: w, st: st, disks: disks, opt: opt, buf: make([]byte, MaxChunk-diskChunkHeader), rep: rep}
	s.src = make([]DiskSource, len(disks))
	for i, d := range disks {
		if d.Mode == DiskCopy {
			s.src[i] = st.CopySource(i)
		}
	}
	return s
}

// send copies extent e of disk i; skipZero leaves out chunks of zeros (the first pass:
// the destination's image starts all zero).
func (s *storageSender) send(i int, e Extent, skipZero bool) error {
	for off := e.Off; off < e.Off+e.Len; {
		n := int(min(int64(len(s.buf)), e.Off+e.Len-off))
		if _, err := s.src[i].ReadAt(s.buf[:n], off); err != nil && !errors.Is(err, io.EOF) {
			return fmt.Errorf("read disk %s at %d: %w", s.disks[i].Name, off, err)
		}
		if !(skipZero && allZero(s.buf[:n])) {
			if err := writeFrame(s.conn, frameDisk, encodeDiskChunk(i, off, s.buf[:n])); err != nil {
				return err
			}
			s.rep.DiskBytes += int64(n)
		}
		off += int64(n)
	}
	return nil
}

// precopy is the pre-copy while the VM runs: everything, then what was written, round
// by round, until a round is below the threshold.
func (s *storageSender) precopy(ctx context.Context) error {
	for i, src := range s.src {
		if src == nil {
			continue
		}
		src.Track()
		if err := s.send(i, Extent{0, s.disks[i].Size}, true); err != nil {
			return err
		}
	}
	copied := slices.ContainsFunc(s.src, func(d DiskSource) bool { return d != nil })
	for r := 0; copied && r < s.opt.rounds(); r++ {
		if err := ctx.Err(); err != nil {
			return err
		}
		n, err := s.resend(false)
		if err != nil {
			return err
		}
		s.rep.DiskRounds++
		if n < s.opt.threshold() {
			break
		}
	}
	return writeFrame(s.conn, frameDiskSync, mustJSON(diskSync{}))
}

// resend copies again what the VM wrote to each copied disk since the last call (and,
// in the pause, what every commit rewrites) and returns how many bytes that was.
func (s *storageSender) resend(paused bool) (int64, error) {
	var n int64
	for i, src := range s.src {
		if src == nil {
			continue
		}
		ext, err := src.Written()
		if err != nil {
			return n, err
		}
		if paused {
			ext = append(ext, src.Always()...)
		}
		for _, e := range ext {
			if err := s.send(i, e, false); err != nil {
				return n, err
			}
			n += e.Len
		}
	}
	return n, nil
}

// final runs with the VM paused: the disks are made durable, what was written since
// the pre-copy is copied, and every disk's state is sent.
func (s *storageSender) final(ctx context.Context) error {
	start := time.Now()
	states, err := s.st.Quiesce(ctx)
	if err != nil {
		return fmt.Errorf("flush the disks: %w", err)
	}
	if _, err := s.resend(true); err != nil {
		return err
	}
	if err := writeFrame(s.conn, frameDiskDone, mustJSON(diskSync{States: states})); err != nil {
		return err
	}
	s.rep.DiskPause = time.Since(start)
	return nil
}

func (s *storageSender) untrack() {
	for _, src := range s.src {
		if src != nil {
			src.Untrack()
		}
	}
}

// storageReceiver writes copied disks on the destination.
type storageReceiver struct {
	disks []DiskInfo
	sinks []DiskSink
	kept  bool
}

func newStorageReceiver(ctx context.Context, dst Destination, offer *Offer) (*storageReceiver, error) {
	r := &storageReceiver{disks: offer.Disks, sinks: make([]DiskSink, len(offer.Disks))}
	var sd StorageDestination
	for i, d := range offer.Disks {
		if d.Mode != DiskCopy {
			continue
		}
		if sd == nil {
			var ok bool
			if sd, ok = dst.(StorageDestination); !ok {
				r.remove()
				return nil, errors.New("this destination does not take copied disks")
			}
		}
		s, err := sd.CreateDisk(ctx, offer, d)
		if err != nil {
			r.remove()
			return nil, fmt.Errorf("disk %s: %w", d.Name, err)
		}
		r.sinks[i] = s
	}
	return r, nil
}

// pass applies disk chunks until the pass's end (disk-sync, or disk-done when final).
func (r *storageReceiver) pass(rd io.Reader, final bool, rep *Report) (*diskSync, error) {
	end := frameDiskSync
	if final {
		end = frameDiskDone
	}
	for {
		k, b, err := readFrame(rd, frameDisk, end)
		if err != nil {
			return nil, fmt.Errorf("the disks: %w", err)
		}
		if k == end {
			return decodeDiskSync(b, r.disks, final)
		}
		i, off, data, err := decodeDiskChunk(b, r.disks)
		if err != nil {
			return nil, err
		}
		if _, err := r.sinks[i].WriteAt(data, off); err != nil {
			return nil, fmt.Errorf("write disk %s at %d: %w", r.disks[i].Name, off, err)
		}
		rep.DiskBytes += int64(len(data))
	}
}

func (r *storageReceiver) sync() error {
	for i, s := range r.sinks {
		if s != nil {
			if err := s.Finish(); err != nil {
				return fmt.Errorf("disk %s: %w", r.disks[i].Name, err)
			}
		}
	}
	return nil
}

// remove deletes the copied images unless the VM started with them.
func (r *storageReceiver) remove() {
	if r == nil || r.kept {
		return
	}
	for _, s := range r.sinks {
		if s != nil {
			s.Remove()
		}
	}
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
