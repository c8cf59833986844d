package shadowmem

import (
	"crypto/aes"
	"crypto/cipher"
	"encoding/binary"
	"fmt"
	"math"
	"sync"
)

// PageSize is the size of a cloaked page.
const PageSize = 4096

// TagSize is the size of a GCM tag.
const TagSize = 16

// HistoryDepth is how many earlier versions of a page are remembered for
// classifying a failure as a replay or a remapping. Older ciphertexts that come
// back are still refused; they are reported as tampering.
const HistoryDepth = 3

// fpSize is the length of the ciphertext prefix used as a fingerprint to find
// which page a foreign ciphertext might belong to. A hit is only a candidate:
// it is confirmed by verifying the tag before anything is reported.
const fpSize = 16

// PageID names a cloaked page: a resource of the app and a page index in it.
type PageID struct {
	Resource uint32
	Index    uint32
}

func (p PageID) String() string { return fmt.Sprintf("page %d:%d", p.Resource, p.Index) }

// State is the state of a cloaked page.
type State uint8

const (
	// Plain: the frame holds plaintext, only the app view may map it.
	Plain State = iota + 1
	// Cipher: the frame holds ciphertext, only the system view may map it.
	Cipher
	// removed pages keep their version so that their nonces are never reused.
	removed
)

func (s State) String() string {
	switch s {
	case Plain:
		return "plain"
	case Cipher:
		return "cipher"
	case removed:
		return "removed"
	}
	return fmt.Sprintf("State(%d)", uint8(s))
}

// PageInfo is a copy of a page's metadata.
type PageInfo struct {
	State   State
	Version uint64 // 0 until the first encryption
	Frame   uint64 // guest-physical address of the frame last seen
	Tag     [TagSize]byte
}

// FrameMemory gives the monitor's own mapping of a guest frame, one page long.
type FrameMemory interface {
	FrameBytes(gpa uint64) ([]byte, error)
}

type histEntry struct {
	version uint64
	gen     uint32 // the key generation the version was sealed under
	tag     [TagSize]byte
	fp      [fpSize]byte
}

type page struct {
	home    fpRef // res, serial, idx of this page; version unused
	state   State
	version uint64
	gen     uint32 // the key generation of the current ciphertext (state.go)
	tag     [TagSize]byte
	fp      [fpSize]byte
	frame   uint64
	hist    [HistoryDepth]histEntry // hist[0] newest; version 0 = empty
}

type resource struct {
	serial uint64
	key    []byte
	aead   cipher.AEAD // the current generation's: every encryption uses it
	// older holds the keys of earlier generations (a restored checkpoint's,
	// state.go) that pages' ciphertexts are still under: decryption only.
	older map[uint32]olderKey
	pages map[uint32]*page
}

type olderKey struct {
	key  []byte
	aead cipher.AEAD
}

// aeadOf returns the cipher of key generation gen of the app whose current
// generation is cur, or nil if the resource holds none.
func (r *resource) aeadOf(gen, cur uint32) cipher.AEAD {
	if gen == cur {
		return r.aead
	}
	return r.older[gen].aead
}

func (r *resource) zeroize() {
	Zeroize(r.key)
	r.aead = nil
	for g, k := range r.older {
		Zeroize(k.key)
		delete(r.older, g)
	}
}

type fpRef struct {
	res     uint32
	serial  uint64
	idx     uint32
	version uint64
}

// App holds the keys and page metadata of one cloaked application instance.
type App struct {
	mu       sync.Mutex
	id       Identity
	instance uint64
	key      []byte
	gen      uint32 // the key generation key belongs to (state.go)
	serial   uint64
	res      map[uint32]*resource
	fps      map[[fpSize]byte]fpRef
	dropped  bool

	// Per-call buffers, guarded by mu, kept here so that the hot path
	// allocates nothing.
	scratch [PageSize + TagSize]byte
	nonce   [12]byte
	aad     [len(aadLabel) + IdentitySize + 8 + 4 + 4 + 8]byte
}

// VM derives application instances from one VM's master secret. It assigns
// instance ids itself and mixes a random per-run salt into every app key, so
// that a master secret reused across monitor runs (it is sealed, so it is)
// never yields the same key, and hence never the same (key, nonce) pair, twice.
type VM struct {
	mu     sync.Mutex
	master []byte
	// salts are the run salts of every key generation, oldest first: one per run
	// the VM's cloaked state went through (state.go); the last is this run's.
	salts [][SaltSize]byte
	next  uint64
	apps  map[uint64]*App
	// reusedGen (tests only): a restore that continued the checkpoint's generation.
	reusedGen bool
	closed    bool
}

// NewVM copies master (32 bytes, not all zero) and draws the run salt.
func NewVM(master []byte) (*VM, error) {
	if len(master) != MasterSize || allZero(master) {
		return nil, ErrBadMaster
	}
	v := &VM{master: append([]byte(nil), master...), apps: make(map[uint64]*App)}
	if err := v.newGeneration(); err != nil {
		return nil, err
	}
	return v, nil
}

// NewApp creates the next application instance for the image with identity id.
func (v *VM) NewApp(id Identity) (*App, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.closed {
		return nil, ErrDropped
	}
	v.next++
	gen := v.gen()
	k, err := deriveAppKeySalted(v.master, v.salts[gen][:], id, v.next)
	if err != nil {
		return nil, err
	}
	a := newApp(k, id, v.next)
	a.gen = gen
	v.apps[v.next] = a
	return a, nil
}

// DropApp drops the instance and zeroes its keys. Unknown ids are ignored.
func (v *VM) DropApp(instance uint64) {
	v.mu.Lock()
	a := v.apps[instance]
	delete(v.apps, instance)
	v.mu.Unlock()
	if a != nil {
		a.Drop()
	}
}

// Close drops every instance and zeroes the master secret.
func (v *VM) Close() {
	v.mu.Lock()
	apps := v.apps
	v.apps = nil
	v.closed = true
	Zeroize(v.master)
	for i := range v.salts {
		Zeroize(v.salts[i][:])
	}
	v.mu.Unlock()
	for _, a := range apps {
		a.Drop()
	}
}

// NewApp creates an application instance with a key derived by DeriveAppKey.
// The caller guarantees that (master, id, instance) is never used for two
// instances; VM.NewApp does that by itself and is the better choice.
func NewApp(master []byte, id Identity, instance uint64) (*App, error) {
	k, err := DeriveAppKey(master, id, instance)
	if err != nil {
		return nil, err
	}
	return newApp(k, id, instance), nil
}

func newApp(key []byte, id Identity, instance uint64) *App {
	a := &App{
		id:       id,
		instance: instance,
		key:      key,
		res:      make(map[uint32]*resource),
		fps:      make(map[[fpSize]byte]fpRef),
	}
	copy(a.aad[:], aadLabel)
	copy(a.aad[len(aadLabel):], id[:])
	binary.BigEndian.PutUint64(a.aad[len(aadLabel)+IdentitySize:], instance)
	return a
}

// Identity returns the measurement the app was created for.
func (a *App) Identity() Identity { return a.id }

// Instance returns the app's instance id.
func (a *App) Instance() uint64 { return a.instance }

// RegisterResource creates resource res with a fresh key. Resource ids are the
// caller's to choose (for example one per cloaked region).
func (a *App) RegisterResource(res uint32) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.dropped {
		return ErrDropped
	}
	if _, ok := a.res[res]; ok {
		return fmt.Errorf("%w: %d", ErrResourceExists, res)
	}
	a.serial++
	k, aead, err := resourceCipher(a.key, res, a.serial)
	if err != nil {
		return err
	}
	a.res[res] = &resource{serial: a.serial, key: k, aead: aead, pages: make(map[uint32]*page)}
	return nil
}

// resourceCipher derives the key of registration serial of resource res under appKey
// and its AES-256-GCM cipher.
func resourceCipher(appKey []byte, res uint32, serial uint64) ([]byte, cipher.AEAD, error) {
	k, err := deriveResourceKey(appKey, res, serial)
	if err != nil {
		return nil, nil, err
	}
	blk, err := aes.NewCipher(k)
	if err != nil {
		Zeroize(k)
		return nil, nil, fmt.Errorf("shadowmem: resource %d: %w", res, err)
	}
	aead, err := cipher.NewGCM(blk)
	if err != nil {
		Zeroize(k)
		return nil, nil, fmt.Errorf("shadowmem: resource %d: %w", res, err)
	}
	return k, aead, nil
}

// UnregisterResource forgets res and zeroes its key. Pages still in the plain
// state are refused (ErrState): scrub them first with ScrubResource.
func (a *App) UnregisterResource(res uint32) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	r, err := a.resource(res)
	if err != nil {
		return err
	}
	for idx, pg := range r.pages {
		if pg.state == Plain {
			return fmt.Errorf("%w: %v is plain", ErrState, PageID{res, idx})
		}
	}
	for _, pg := range r.pages {
		a.forgetFingerprints(pg)
	}
	r.zeroize()
	delete(a.res, res)
	return nil
}

// AddPage starts tracking page p, whose plaintext is now in frame (for
// example a page of the image the app was loaded from, or a fresh zero page).
// The page starts in the Plain state. A page removed earlier may be added
// again; it keeps its version so that no nonce is used twice.
func (a *App) AddPage(p PageID, frame uint64) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	r, err := a.resource(p.Resource)
	if err != nil {
		return err
	}
	if pg, ok := r.pages[p.Index]; ok {
		if pg.state != removed {
			return fmt.Errorf("%w: %v", ErrPageExists, p)
		}
		pg.state, pg.frame = Plain, frame
		return nil
	}
	r.pages[p.Index] = &page{home: fpRef{res: p.Resource, serial: r.serial, idx: p.Index}, state: Plain, frame: frame}
	return nil
}

// RemovePage stops tracking p (the app unmapped it). Its version is kept. The
// caller scrubs the frame if the page was plain.
func (a *App) RemovePage(p PageID) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	_, pg, err := a.page(p)
	if err != nil {
		return err
	}
	a.forgetFingerprints(pg)
	pg.hist = [HistoryDepth]histEntry{}
	pg.tag, pg.fp = [TagSize]byte{}, [fpSize]byte{}
	pg.state = removed
	return nil
}

// Page returns a copy of p's metadata.
func (a *App) Page(p PageID) (PageInfo, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	_, pg, err := a.page(p)
	if err != nil {
		return PageInfo{}, false
	}
	return PageInfo{State: pg.state, Version: pg.version, Frame: pg.frame, Tag: pg.tag}, true
}

// EncryptPage moves p from Plain to Cipher: buf (exactly one page, the
// frame's contents through the monitor's mapping) is encrypted in place under
// version+1, and frame is recorded as where the ciphertext lives.
func (a *App) EncryptPage(p PageID, frame uint64, buf []byte) error {
	if len(buf) != PageSize {
		return fmt.Errorf("%w: %d bytes", ErrBufferSize, len(buf))
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	r, pg, err := a.page(p)
	if err != nil {
		return err
	}
	if pg.state != Plain {
		return fmt.Errorf("%w: encrypt %v in state %v", ErrState, p, pg.state)
	}
	if pg.version == math.MaxUint64 {
		return fmt.Errorf("%w: %v", ErrVersionExhausted, p)
	}
	v := pg.version + 1
	a.setNonceAAD(p, v)
	out := r.aead.Seal(a.scratch[:0], a.nonce[:], buf, a.aad[:])
	copy(buf, out[:PageSize])

	if pg.version != 0 {
		a.pushHistory(pg)
	}
	pg.version, pg.gen = v, a.gen
	copy(pg.tag[:], out[PageSize:])
	copy(pg.fp[:], out[:fpSize])
	pg.state = Cipher
	pg.frame = frame
	a.fps[pg.fp] = pg.ref(v)
	return nil
}

// DecryptPage moves p from Cipher to Plain: buf (exactly one page, read from
// frame) is verified against p's current version and decrypted in place. On
// failure buf is left holding the bytes it held on entry, p stays in the
// Cipher state and the error is an *IntegrityError whose Kind says whether
// the bytes were tampered with, belong to another page (remapped) or to an
// older version of p (replayed).
func (a *App) DecryptPage(p PageID, frame uint64, buf []byte) error {
	if len(buf) != PageSize {
		return fmt.Errorf("%w: %d bytes", ErrBufferSize, len(buf))
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	r, pg, err := a.page(p)
	if err != nil {
		return err
	}
	if pg.state != Cipher {
		return fmt.Errorf("%w: decrypt %v in state %v", ErrState, p, pg.state)
	}
	copy(a.scratch[:PageSize], buf)
	copy(a.scratch[PageSize:], pg.tag[:])
	a.setNonceAAD(p, pg.version)
	aead := r.aeadOf(pg.gen, a.gen)
	if aead == nil {
		return fmt.Errorf("shadowmem: %v: no key of generation %d (a monitor bug: the state restored without it)", p, pg.gen)
	}
	if _, err := aead.Open(buf[:0:PageSize], a.nonce[:], a.scratch[:], a.aad[:]); err != nil {
		copy(buf, a.scratch[:PageSize])
		return a.classify(p, pg, frame)
	}
	pg.state = Plain
	pg.frame = frame
	return nil
}

// classify works out what the unverifiable ciphertext in a.scratch[:PageSize]
// is. It only reports ErrRemapped or ErrReplayed after the bytes verified as
// that page and version.
func (a *App) classify(p PageID, pg *page, frame uint64) error {
	e := &IntegrityError{Kind: ErrTampered, Page: p, Version: pg.version, Frame: frame}
	var fp [fpSize]byte
	copy(fp[:], a.scratch[:fpSize])
	ref, ok := a.fps[fp]
	if !ok {
		return e
	}
	r, ok := a.res[ref.res]
	if !ok || r.serial != ref.serial {
		return e
	}
	cand, ok := r.pages[ref.idx]
	if !ok {
		return e
	}
	var tag *[TagSize]byte
	var gen uint32
	if cand.version == ref.version && cand.state != removed {
		tag, gen = &cand.tag, cand.gen
	} else {
		for i := range cand.hist {
			if cand.hist[i].version == ref.version {
				tag, gen = &cand.hist[i].tag, cand.hist[i].gen
				break
			}
		}
	}
	aead := r.aeadOf(gen, a.gen)
	if tag == nil || aead == nil {
		return e
	}
	id := PageID{ref.res, ref.idx}
	copy(a.scratch[PageSize:], tag[:])
	a.setNonceAAD(id, ref.version)
	_, err := aead.Open(a.scratch[:0], a.nonce[:], a.scratch[:], a.aad[:])
	clear(a.scratch[:])
	if err != nil {
		return e
	}
	e.Found, e.FoundVersion = id, ref.version
	if id == p {
		e.Kind = ErrReplayed
	} else {
		e.Kind = ErrRemapped
	}
	return e
}

// ScrubPlain zeroes the frame of every page of the app in the Plain state
// (the app is exiting or being killed) and returns how many it zeroed. Pages
// are removed from tracking as they are scrubbed; on error the rest remain.
func (a *App) ScrubPlain(mem FrameMemory) (int, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.dropped {
		return 0, ErrDropped
	}
	n := 0
	for res := range a.res {
		k, err := a.scrubResource(res, mem)
		n += k
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

// ScrubResource is ScrubPlain for one resource.
func (a *App) ScrubResource(res uint32, mem FrameMemory) (int, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.scrubResource(res, mem)
}

func (a *App) scrubResource(res uint32, mem FrameMemory) (int, error) {
	r, err := a.resource(res)
	if err != nil {
		return 0, err
	}
	n := 0
	for idx, pg := range r.pages {
		if pg.state != Plain {
			continue
		}
		b, err := mem.FrameBytes(pg.frame)
		if err != nil {
			return n, fmt.Errorf("shadowmem: scrub %v at frame %#x: %w", PageID{res, idx}, pg.frame, err)
		}
		if len(b) != PageSize {
			return n, fmt.Errorf("shadowmem: scrub %v at frame %#x: %w: %d bytes", PageID{res, idx}, pg.frame, ErrBufferSize, len(b))
		}
		clear(b)
		a.forgetFingerprints(pg)
		pg.state = removed
		n++
	}
	return n, nil
}

// Drop zeroes every key of the app and forgets all metadata. Every later call
// fails with ErrDropped. Scrub plain pages first.
func (a *App) Drop() {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.dropped {
		return
	}
	for _, r := range a.res {
		r.zeroize()
	}
	Zeroize(a.key)
	clear(a.scratch[:])
	a.res, a.fps, a.key = nil, nil, nil
	a.dropped = true
}

func (a *App) resource(res uint32) (*resource, error) {
	if a.dropped {
		return nil, ErrDropped
	}
	r, ok := a.res[res]
	if !ok {
		return nil, fmt.Errorf("%w: %d", ErrUnknownResource, res)
	}
	return r, nil
}

func (a *App) page(p PageID) (*resource, *page, error) {
	r, err := a.resource(p.Resource)
	if err != nil {
		return nil, nil, err
	}
	pg, ok := r.pages[p.Index]
	if !ok || pg.state == removed {
		return nil, nil, fmt.Errorf("%w: %v", ErrUnknownPage, p)
	}
	return r, pg, nil
}

func (a *App) setNonceAAD(p PageID, version uint64) {
	binary.BigEndian.PutUint32(a.nonce[0:], p.Index)
	binary.BigEndian.PutUint64(a.nonce[4:], version)
	o := len(aadLabel) + IdentitySize + 8
	binary.BigEndian.PutUint32(a.aad[o:], p.Resource)
	binary.BigEndian.PutUint32(a.aad[o+4:], p.Index)
	binary.BigEndian.PutUint64(a.aad[o+8:], version)
}

func (pg *page) ref(version uint64) fpRef {
	r := pg.home
	r.version = version
	return r
}

// unindex removes fingerprint fp from the index if it still names pg at version.
func (a *App) unindex(pg *page, fp [fpSize]byte, version uint64) {
	if version == 0 {
		return
	}
	if ref, ok := a.fps[fp]; ok && ref == pg.ref(version) {
		delete(a.fps, fp)
	}
}

func (a *App) pushHistory(pg *page) {
	old := pg.hist[HistoryDepth-1]
	a.unindex(pg, old.fp, old.version)
	copy(pg.hist[1:], pg.hist[:HistoryDepth-1])
	pg.hist[0] = histEntry{version: pg.version, gen: pg.gen, tag: pg.tag, fp: pg.fp}
}

func (a *App) forgetFingerprints(pg *page) {
	a.unindex(pg, pg.fp, pg.version)
	for _, h := range pg.hist {
		a.unindex(pg, h.fp, h.version)
	}
}

// Pages returns the indices of the pages of resource res that are tracked (plain or
// cipher), in no particular order.
func (a *App) Pages(res uint32) ([]uint32, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	r, err := a.resource(res)
	if err != nil {
		return nil, err
	}
	out := make([]uint32, 0, len(r.pages))
	for idx, pg := range r.pages {
		if pg.state != removed {
			out = append(out, idx)
		}
	}
	return out, nil
}

// Tracked reports whether page p is tracked (plain or cipher).
func (a *App) Tracked(p PageID) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	_, _, err := a.page(p)
	return err == nil
}
