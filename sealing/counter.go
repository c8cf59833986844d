package sealing

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/umbra-cc/umbra/statefile"
)

// Rollback counters. Each bundle series owns two NV indices in the owner range
// 0x01810000-0x0181FFFF, chosen from the SHA-256 of the series name:
//
//   - the counter (even handle): a TPM_NT_COUNTER. The TPM only ever increments
//     it, and a counter defined again after deletion starts above every value
//     any counter on this TPM ever held (TPM 2.0 Part 1, "NV Counters").
//   - the anchor (odd handle): 40 bytes, counter value at definition (8 bytes,
//     big-endian) then the SHA-256 of the series name, write-locked for good with
//     TPM2_NV_WriteLock right after it is written (TPMA_NV_WRITEDEFINE).
//
// The high-water version of a series is counter - anchor. Opening version v
// above it increments the counter v-hw times.

const (
	nvRangeBase  = 0x01810000
	anchorSize   = 8 + sha256.Size
	maxVersionUp = 4096 // increments allowed per open; bounds time and NV wear
)

// CounterHandles returns the NV index handles of the series' counter and anchor.
func CounterHandles(series string) (counter, anchor tpm2.TPMHandle) {
	h := sha256.Sum256([]byte(series))
	slot := uint32(binary.BigEndian.Uint16(h[:2])) &^ 1
	return tpm2.TPMHandle(nvRangeBase + slot), tpm2.TPMHandle(nvRangeBase + slot + 1)
}

func counterAttrs() tpm2.TPMANV {
	return tpm2.TPMANV{AuthWrite: true, AuthRead: true, OwnerRead: true, NoDA: true, NT: tpm2.TPMNTCounter}
}

func anchorAttrs() tpm2.TPMANV {
	return tpm2.TPMANV{AuthWrite: true, AuthRead: true, OwnerRead: true, NoDA: true, WriteDefine: true, NT: tpm2.TPMNTOrdinary}
}

// nvIndex is an NV index as read back with NVReadPublic.
type nvIndex struct {
	handle tpm2.TPMHandle
	name   tpm2.TPM2BName
	pub    tpm2.TPMSNVPublic
}

// readNV returns the index, or (nil, nil) if it is not defined.
func readNV(t transport.TPM, h tpm2.TPMHandle) (*nvIndex, error) {
	rsp, err := tpm2.NVReadPublic{NVIndex: h}.Execute(t)
	if err != nil {
		if errors.Is(err, tpm2.TPMRCHandle) {
			return nil, nil
		}
		return nil, fmt.Errorf("%w: NV_ReadPublic %#x: %w", ErrTPM, uint32(h), err)
	}
	pub, err := rsp.NVPublic.Contents()
	if err != nil {
		return nil, fmt.Errorf("%w: NV_ReadPublic %#x: %w", ErrTPM, uint32(h), err)
	}
	return &nvIndex{handle: h, name: rsp.NVName, pub: *pub}, nil
}

// checkAttrs refuses an index that someone else defined with other attributes
// (e.g. an ordinary index at the counter's handle that they could rewrite).
func checkAttrs(ix *nvIndex, want tpm2.TPMANV, size uint16) error {
	got := ix.pub.Attributes
	want.Written, want.WriteLocked = got.Written, got.WriteLocked
	if got != want || ix.pub.NameAlg != tpm2.TPMAlgSHA256 || len(ix.pub.AuthPolicy.Buffer) != 0 || ix.pub.DataSize != size {
		return fmt.Errorf("%w: NV index %#x exists with attributes %#x (want %#x) or size %d: it was not defined by umbra; an administrator must remove it (tpm2_nvundefine %#x)",
			ErrTPM, uint32(ix.handle), tpm2.Marshal(got), tpm2.Marshal(want), ix.pub.DataSize, uint32(ix.handle))
	}
	return nil
}

func nvRead(t transport.TPM, ix *nvIndex, size uint16) ([]byte, error) {
	rsp, err := tpm2.NVRead{
		AuthHandle: tpm2.AuthHandle{Handle: ix.handle, Name: ix.name, Auth: tpm2.PasswordAuth(nil)},
		NVIndex:    tpm2.NamedHandle{Handle: ix.handle, Name: ix.name},
		Size:       size,
	}.Execute(t)
	if err != nil {
		return nil, fmt.Errorf("%w: NV_Read %#x: %w", ErrTPM, uint32(ix.handle), err)
	}
	if len(rsp.Data.Buffer) != int(size) {
		return nil, fmt.Errorf("%w: NV_Read %#x returned %d bytes, want %d", ErrTPM, uint32(ix.handle), len(rsp.Data.Buffer), size)
	}
	return rsp.Data.Buffer, nil
}

// counterState is the state of a series' rollback counter on one TPM.
type counterState struct {
	counter, anchor *nvIndex
	value, base     uint64
}

// HighWater returns the newest version of the series that this TPM has opened,
// or 0 if it has opened none.
func HighWater(t transport.TPM, series string) (uint64, error) {
	st, err := loadCounter(t, series)
	if err != nil || st == nil {
		return 0, err
	}
	return st.value - st.base, nil
}

// loadCounter returns nil, nil if the series has no counter on this TPM.
func loadCounter(t transport.TPM, series string) (*counterState, error) {
	ch, ah := CounterHandles(series)
	ctr, err := readNV(t, ch)
	if err != nil {
		return nil, err
	}
	anc, err := readNV(t, ah)
	if err != nil {
		return nil, err
	}
	if ctr == nil && anc == nil {
		return nil, nil
	}
	if ctr == nil || anc == nil || !ctr.pub.Attributes.Written || !anc.pub.Attributes.Written || !anc.pub.Attributes.WriteLocked {
		return nil, fmt.Errorf("%w: rollback counter of series %q is incomplete (NV %#x/%#x): it was interrupted while being created or partly deleted; an administrator must inspect it with tpm2_nvreadpublic",
			ErrTPM, series, uint32(ch), uint32(ah))
	}
	if err := checkAttrs(ctr, counterAttrs(), 8); err != nil {
		return nil, err
	}
	if err := checkAttrs(anc, anchorAttrs(), anchorSize); err != nil {
		return nil, err
	}
	a, err := nvRead(t, anc, anchorSize)
	if err != nil {
		return nil, err
	}
	sh := sha256.Sum256([]byte(series))
	if !bytes.Equal(a[8:], sh[:]) {
		return nil, fmt.Errorf("%w: NV index %#x belongs to another bundle series whose name hashes to the same slot; rename series %q", ErrTPM, uint32(ah), series)
	}
	c, err := nvRead(t, ctr, 8)
	if err != nil {
		return nil, err
	}
	st := &counterState{counter: ctr, anchor: anc, value: binary.BigEndian.Uint64(c), base: binary.BigEndian.Uint64(a[:8])}
	if st.value < st.base {
		return nil, fmt.Errorf("%w: rollback counter of series %q is below its anchor", ErrTPM, series)
	}
	return st, nil
}

func (st *counterState) increment(t transport.TPM) error {
	if _, err := (tpm2.NVIncrement{
		AuthHandle: tpm2.AuthHandle{Handle: st.counter.handle, Name: st.counter.name, Auth: tpm2.PasswordAuth(nil)},
		NVIndex:    tpm2.NamedHandle{Handle: st.counter.handle, Name: st.counter.name},
	}).Execute(t); err != nil {
		return fmt.Errorf("%w: NV_Increment %#x: %w", ErrTPM, uint32(st.counter.handle), err)
	}
	st.value++
	// The first increment sets TPMA_NV_WRITTEN and so changes the index name.
	if !st.counter.pub.Attributes.Written {
		ix, err := readNV(t, st.counter.handle)
		if err != nil {
			return err
		}
		if ix == nil {
			return fmt.Errorf("%w: NV index %#x vanished", ErrTPM, uint32(st.counter.handle))
		}
		st.counter = ix
	}
	return nil
}

// createCounter defines the counter and its anchor for a series new to this TPM.
func createCounter(t transport.TPM, series string) (*counterState, error) {
	ch, ah := CounterHandles(series)
	define := func(h tpm2.TPMHandle, attrs tpm2.TPMANV, size uint16) (*nvIndex, error) {
		if _, err := (tpm2.NVDefineSpace{
			AuthHandle: tpm2.TPMRHOwner,
			PublicInfo: tpm2.New2B(tpm2.TPMSNVPublic{NVIndex: h, NameAlg: tpm2.TPMAlgSHA256, Attributes: attrs, DataSize: size}),
		}).Execute(t); err != nil {
			return nil, fmt.Errorf("%w: NV_DefineSpace %#x (needs the owner hierarchy with an empty authorization): %w", ErrTPM, uint32(h), err)
		}
		return readNV(t, h)
	}
	ctr, err := define(ch, counterAttrs(), 8)
	if err != nil {
		return nil, err
	}
	st := &counterState{counter: ctr}
	if err := st.increment(t); err != nil {
		return nil, err
	}
	c, err := nvRead(t, st.counter, 8)
	if err != nil {
		return nil, err
	}
	st.value = binary.BigEndian.Uint64(c)
	st.base = st.value
	anc, err := define(ah, anchorAttrs(), anchorSize)
	if err != nil {
		return nil, err
	}
	data := binary.BigEndian.AppendUint64(nil, st.base)
	sh := sha256.Sum256([]byte(series))
	data = append(data, sh[:]...)
	auth := tpm2.AuthHandle{Handle: ah, Name: anc.name, Auth: tpm2.PasswordAuth(nil)}
	if _, err := (tpm2.NVWrite{AuthHandle: auth, NVIndex: tpm2.NamedHandle{Handle: ah, Name: anc.name}, Data: tpm2.TPM2BMaxNVBuffer{Buffer: data}}).Execute(t); err != nil {
		return nil, fmt.Errorf("%w: NV_Write %#x: %w", ErrTPM, uint32(ah), err)
	}
	if anc, err = readNV(t, ah); err != nil {
		return nil, err
	}
	auth.Name = anc.name
	if _, err := (tpm2.NVWriteLock{AuthHandle: auth, NVIndex: tpm2.NamedHandle{Handle: ah, Name: anc.name}}).Execute(t); err != nil {
		return nil, fmt.Errorf("%w: NV_WriteLock %#x: %w", ErrTPM, uint32(ah), err)
	}
	if st.anchor, err = readNV(t, ah); err != nil {
		return nil, err
	}
	return st, nil
}

// advanceCounter raises the series' high-water version to version. It refuses
// with ErrRolledBack if the TPM already records a newer version. It reads the
// counter again rather than trusting the rollback check's value: the unseal
// took milliseconds, and another process may have raised the counter since.
func advanceCounter(t transport.TPM, host, series string, version uint64) error {
	st, _, err := rollbackState(t, host, series)
	if err != nil {
		return err
	}
	if st == nil {
		if st, err = createCounter(t, series); err != nil {
			return err
		}
	}
	hw := st.value - st.base
	if version < hw {
		return fmt.Errorf("%w: series %q version %d, this host has opened version %d", ErrRolledBack, series, version, hw)
	}
	if version-hw > maxVersionUp {
		return fmt.Errorf("%w: series %q jumps from version %d to %d; versions may grow by at most %d per bundle", ErrMalformed, series, hw, version, maxVersionUp)
	}
	if hw == version {
		return nil
	}
	// NV_Increment with a password session does not bind the index name, but
	// only a TPM_NT_COUNTER can be incremented, and one defined again at this
	// handle starts above every value a counter on this TPM ever held: the
	// worst another index here can cause is a refusal of older bundles.
	for ; hw < version; hw++ {
		if err := st.increment(t); err != nil {
			return err
		}
	}
	if s, ok := t.(*simTPM); ok {
		return s.saveCounter(series, version)
	}
	return nil
}

// Expected public areas of a series' indices once set up: the counter after its
// first increment, the anchor written and write-locked. Their names are what
// the fast path asks the TPM to check.
func counterPublic(h tpm2.TPMHandle) tpm2.TPMSNVPublic {
	a := counterAttrs()
	a.Written = true
	return tpm2.TPMSNVPublic{NVIndex: h, NameAlg: tpm2.TPMAlgSHA256, Attributes: a, DataSize: 8}
}

func anchorPublic(h tpm2.TPMHandle) tpm2.TPMSNVPublic {
	a := anchorAttrs()
	a.Written, a.WriteLocked = true, true
	return tpm2.TPMSNVPublic{NVIndex: h, NameAlg: tpm2.TPMAlgSHA256, Attributes: a, DataSize: anchorSize}
}

func expectedIndex(pub tpm2.TPMSNVPublic) (*nvIndex, error) {
	// tpm2.NVName(&pub), memoized and without reflection (fastmarshal.go).
	name := expectedName(pub, nvNameKey{handle: pub.NVIndex, anchor: pub.Attributes.WriteDefine})
	return &nvIndex{handle: pub.NVIndex, name: name, pub: pub}, nil
}

// boundRead reads an NV index through a one-use HMAC session. The session's
// HMAC covers the command parameter hash, which includes the index name the
// caller expects, so the TPM itself refuses (TPM_RC_AUTH_FAIL) if the index at
// that handle has other attributes, size, name algorithm or policy, in the same
// command that returns the data: unlike NV_ReadPublic followed by NV_Read with
// a password, nobody can swap the index between the check and the read.
func boundRead(t transport.TPM, ix *nvIndex) ([]byte, error) {
	rsp, err := tpm2.NVRead{
		AuthHandle: tpm2.AuthHandle{Handle: ix.handle, Name: ix.name, Auth: tpm2.HMAC(tpm2.TPMAlgSHA256, 16, tpm2.Auth(nil))},
		NVIndex:    tpm2.NamedHandle{Handle: ix.handle, Name: ix.name},
		Size:       ix.pub.DataSize,
	}.Execute(t)
	if err != nil {
		return nil, fmt.Errorf("%w: NV_Read %#x with name check: %w", ErrTPM, uint32(ix.handle), err)
	}
	if len(rsp.Data.Buffer) != int(ix.pub.DataSize) {
		return nil, fmt.Errorf("%w: NV_Read %#x returned %d bytes, want %d", ErrTPM, uint32(ix.handle), len(rsp.Data.Buffer), ix.pub.DataSize)
	}
	return rsp.Data.Buffer, nil
}

// fastCounter reads the state of a series whose counter and anchor are set up,
// in two TPM round trips (StartAuthSession, NV_Read) when the anchor is cached
// and four when not. Any error, including a series that has no counter yet,
// sends the caller to loadCounter, which explains what is wrong.
func fastCounter(t transport.TPM, host, series string) (*counterState, error) {
	ch, ah := CounterHandles(series)
	ctr, err := expectedIndex(counterPublic(ch))
	if err != nil {
		return nil, err
	}
	anc, err := expectedIndex(anchorPublic(ah))
	if err != nil {
		return nil, err
	}
	cache := cacheOf(t)
	key := anchorKey{host: host, series: series}
	base, ok := cache.anchor(key)
	if !ok {
		a, err := boundRead(t, anc)
		if err != nil {
			return nil, err
		}
		sh := sha256.Sum256([]byte(series))
		if !bytes.Equal(a[8:], sh[:]) {
			return nil, fmt.Errorf("%w: NV index %#x belongs to another bundle series", ErrTPM, uint32(ah))
		}
		base = binary.BigEndian.Uint64(a[:8])
	}
	c, err := boundRead(t, ctr)
	if err != nil {
		return nil, err
	}
	st := &counterState{counter: ctr, anchor: anc, value: binary.BigEndian.Uint64(c), base: base}
	if st.value < st.base {
		return nil, fmt.Errorf("%w: rollback counter of series %q is below its anchor", ErrTPM, series)
	}
	if !ok {
		cache.setAnchor(key, base)
	}
	return st, nil
}

// rollbackState returns the series' counter state on this TPM (nil if it has
// none) and its high-water version. host is the TPM's EK fingerprint, which
// keys the anchor cache.
func rollbackState(t transport.TPM, host, series string) (*counterState, uint64, error) {
	st, err := fastCounter(t, host, series)
	if err != nil {
		if st, err = loadCounter(t, series); err != nil {
			return nil, 0, err
		}
	}
	if st == nil {
		return nil, 0, nil
	}
	return st, st.value - st.base, nil
}

// simTPM is the simulator back end. Its NV memory does not outlive the process,
// so the high-water versions are kept in files in the state directory and
// replayed into fresh NV counters when the simulator is opened. On the
// simulator, rollback protection is therefore only as strong as those files.
//
// Two files: the snapshot tpm-sim.counters.json (series -> version) and the
// journal tpm-sim.counters.log, to which every counter update appends one line
// "SERIES VERSION\n" with a single write(2) on a descriptor kept open. A
// series' high-water mark is the largest version either file records, so
// concurrent processes cannot lose each other's updates (the old
// read-modify-write of the snapshot could) and an update costs one system
// call instead of read, write and rename (on ext4 the rename over the old file
// also forced the new one's data out: about 350 µs per increment here).
// Neither is fsynced, as the snapshot was not before: an update survives a
// crash of umbra, not necessarily a power cut in the next few seconds.
//
// Every process holds a shared flock on the journal while its simulator is
// open. The process that opens the simulator while no other has it open folds
// the journal into the snapshot (written to a temporary file and renamed) and
// empties it.
type simTPM struct {
	transport.TPMCloser
	stateDir string
	cache    tpmCache
	journal  *os.File
}

func (s *simTPM) tpmCache() *tpmCache { return &s.cache }

const (
	simCountersFile = "tpm-sim.counters.json"
	simJournalFile  = "tpm-sim.counters.log"
)

// Close closes the journal and the simulator.
func (s *simTPM) Close() error {
	if s.journal != nil {
		s.journal.Close()
		s.journal = nil
	}
	return s.TPMCloser.Close()
}

func (s *simTPM) loadCounters() (map[string]uint64, error) {
	m := map[string]uint64{}
	b, err := os.ReadFile(filepath.Join(s.stateDir, simCountersFile))
	if errors.Is(err, fs.ErrNotExist) {
		return m, nil
	}
	if err != nil {
		return nil, err
	}
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("%s: %w (delete it and %s to forget the simulator's rollback counters)", simCountersFile, err, simJournalFile)
	}
	return m, nil
}

// readJournal raises m to the versions the journal records. It returns the
// number of entries. A last line without its newline is being written by
// another process right now (whose simulator is another TPM) and is skipped.
func (s *simTPM) readJournal(m map[string]uint64) (int, error) {
	b, err := os.ReadFile(filepath.Join(s.stateDir, simJournalFile))
	if err != nil {
		return 0, err
	}
	n := 0
	for len(b) > 0 {
		i := bytes.IndexByte(b, '\n')
		if i < 0 {
			break
		}
		line := string(b[:i])
		b = b[i+1:]
		series, v, ok := strings.Cut(line, " ")
		version, err := strconv.ParseUint(v, 10, 64)
		if !ok || err != nil || !seriesRE.MatchString(series) {
			return 0, fmt.Errorf("%s: malformed line %q (delete it and %s to forget the simulator's rollback counters)", simJournalFile, line, simCountersFile)
		}
		m[series] = max(m[series], version)
		n++
	}
	return n, nil
}

func (s *simTPM) restoreCounters() error {
	f, err := os.OpenFile(filepath.Join(s.stateDir, simJournalFile), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	fd := int(f.Fd())
	alone := syscall.Flock(fd, syscall.LOCK_EX|syscall.LOCK_NB) == nil
	if !alone {
		if err := syscall.Flock(fd, syscall.LOCK_SH); err != nil {
			f.Close()
			return fmt.Errorf("lock %s: %w", simJournalFile, err)
		}
	}
	m, err := s.loadCounters()
	var n int
	if err == nil {
		n, err = s.readJournal(m)
	}
	if err == nil && alone && n > 0 {
		// Nobody else appends: fold the journal into the snapshot.
		if err = s.writeSnapshot(m); err == nil {
			err = f.Truncate(0)
		}
	}
	if err == nil && alone {
		err = syscall.Flock(fd, syscall.LOCK_SH)
	}
	if err != nil {
		f.Close()
		return err
	}
	s.journal = f
	for series, v := range m {
		if v > 1<<20 {
			return fmt.Errorf("%s: series %q at version %d, more than this simulator back end replays (%d)", simCountersFile, series, v, 1<<20)
		}
		st, err := createCounter(s.TPMCloser, series)
		if err != nil {
			return err
		}
		for i := uint64(0); i < v; i++ {
			if err := st.increment(s.TPMCloser); err != nil {
				return err
			}
		}
	}
	return nil
}

func (s *simTPM) writeSnapshot(m map[string]uint64) error {
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return err
	}
	if err := statefile.WriteAtomic(filepath.Join(s.stateDir, simCountersFile), b, 0o600); err != nil {
		return fmt.Errorf("save simulator counters: %w", err)
	}
	return nil
}

// saveCounter records that the series reached version: one append to the
// journal.
func (s *simTPM) saveCounter(series string, version uint64) error {
	if s.journal == nil {
		return errors.New("save simulator counters: journal not open")
	}
	line := strconv.AppendUint(append([]byte(series), ' '), version, 10)
	if _, err := s.journal.Write(append(line, '\n')); err != nil {
		return fmt.Errorf("save simulator counters: %w", err)
	}
	return nil
}
