package shadowmem

// Checkpoints (docs/snapshot.md "Cloaked apps"): what a snapshot or a migration
// carries of a VM's cloaked state, and how a restored run goes on without ever using
// a (key, nonce) pair twice.
//
// A checkpoint carries no key. It carries the run salts of the VM's key generations
// and every page's metadata (state, version, tag, frame, generation); with the VM's
// master secret (from the sealed bundle) the keys are derived again. A restored run
// is a new key generation: RestoreVM draws a fresh run salt, so every encryption of
// the restored run is under a key no earlier run (the original, which may go on
// running, or another restore of the same checkpoint) ever used. The keys of earlier
// generations are derived only for decryption, for the pages whose current
// ciphertext they sealed; the next encryption of such a page is under the new
// generation (at version+1, so a page's version still only grows).
//
// Not carried: the history of earlier versions and the ciphertext fingerprints. A
// replay in the restored run of a ciphertext older than the checkpoint is reported
// as tampering rather than as a replay (it is refused all the same).

import (
	"crypto/rand"
	"errors"
	"fmt"
	"math"
)

// SaltSize is the size of a run salt.
const SaltSize = 32

// Limits of a restored state (hostile input).
const (
	// MaxGenerations bounds the key generations a VM's state may name: one per
	// restore its cloaked state went through.
	MaxGenerations = 1 << 12
	// MaxStateResources bounds the resources of one app in a restored state.
	MaxStateResources = 1 << 10
	// MaxStatePages bounds the pages of one app in a restored state.
	MaxStatePages = 1 << 22
)

// ErrBadState reports a checkpointed state that is not one this package wrote.
var ErrBadState = errors.New("shadowmem: invalid checkpointed state")

// VMState is what a checkpoint carries of a VM's key schedule: the run salts of its
// key generations, oldest first (the checkpointed run's last), and the last instance
// id handed out. No key.
type VMState struct {
	Salts [][SaltSize]byte `json:"salts"`
	Next  uint64           `json:"next"`
}

// AppState is what a checkpoint carries of one application instance: its identity
// and instance (from which, with the master secret and a generation's salt, its key
// is derived), its registration serial, and every resource's pages. No key, and no
// page in the Plain state (encrypt them first).
type AppState struct {
	Identity  Identity        `json:"identity"`
	Instance  uint64          `json:"instance"`
	Serial    uint64          `json:"serial"`
	Resources []ResourceState `json:"resources"`
}

// ResourceState is one registered resource of an AppState.
type ResourceState struct {
	ID     uint32      `json:"id"`
	Serial uint64      `json:"serial"`
	Pages  []PageState `json:"pages"`
}

// PageState is one page of a ResourceState: Cipher (its ciphertext is in the frame,
// sealed under generation Gen at Version) or removed (only its version is kept, so
// that it keeps counting).
type PageState struct {
	Index   uint32        `json:"index"`
	Removed bool          `json:"removed,omitempty"`
	Version uint64        `json:"version"`
	Gen     uint32        `json:"gen"`
	Frame   uint64        `json:"frame"`
	Tag     [TagSize]byte `json:"tag"`
}

func (v *VM) gen() uint32 { return uint32(len(v.salts) - 1) }

// newGeneration starts a key generation with a fresh run salt.
func (v *VM) newGeneration() error {
	var s [SaltSize]byte
	if _, err := rand.Read(s[:]); err != nil {
		return fmt.Errorf("shadowmem: draw run salt: %w", err)
	}
	v.salts = append(v.salts, s)
	return nil
}

// State returns the VM's key schedule for a checkpoint.
func (v *VM) State() (VMState, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.closed {
		return VMState{}, ErrDropped
	}
	return VMState{Salts: append([][SaltSize]byte(nil), v.salts...), Next: v.next}, nil
}

// RestoreVM is NewVM for a VM whose cloaked state comes from a checkpoint: it knows
// the checkpoint's key generations and instance ids, and starts a new generation with
// a fresh run salt. master must be the secret the checkpointed VM ran with.
func RestoreVM(master []byte, st VMState) (*VM, error) {
	return restoreVM(master, st, false)
}

// restoreVM is RestoreVM; reuseSalt (tests only: the attack the new generation
// defeats) continues the checkpoint's last generation instead of starting one.
func restoreVM(master []byte, st VMState, reuseSalt bool) (*VM, error) {
	if len(master) != MasterSize || allZero(master) {
		return nil, ErrBadMaster
	}
	if len(st.Salts) == 0 || len(st.Salts) >= MaxGenerations {
		return nil, fmt.Errorf("%w: %d key generations (want 1 to %d)", ErrBadState, len(st.Salts), MaxGenerations-1)
	}
	if st.Next == math.MaxUint64 {
		return nil, fmt.Errorf("%w: instance counter exhausted", ErrBadState)
	}
	v := &VM{master: append([]byte(nil), master...), apps: make(map[uint64]*App), next: st.Next}
	v.salts = append(v.salts, st.Salts...)
	if reuseSalt {
		v.reusedGen = true
		return v, nil
	}
	if err := v.newGeneration(); err != nil {
		return nil, err
	}
	return v, nil
}

// State returns the app's metadata for a checkpoint. A page in the Plain state is
// refused (ErrState): the caller encrypts every page first, so that guest memory,
// which the checkpoint carries, holds only ciphertext of the app.
func (a *App) State() (AppState, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.dropped {
		return AppState{}, ErrDropped
	}
	st := AppState{Identity: a.id, Instance: a.instance, Serial: a.serial}
	for id, r := range a.res {
		rs := ResourceState{ID: id, Serial: r.serial}
		for idx, pg := range r.pages {
			switch pg.state {
			case Plain:
				return AppState{}, fmt.Errorf("%w: %v is plain (encrypt it before the checkpoint)", ErrState, PageID{id, idx})
			case removed:
				rs.Pages = append(rs.Pages, PageState{Index: idx, Removed: true, Version: pg.version})
			default:
				rs.Pages = append(rs.Pages, PageState{Index: idx, Version: pg.version, Gen: pg.gen, Frame: pg.frame, Tag: pg.tag})
			}
		}
		st.Resources = append(st.Resources, rs)
	}
	return st, nil
}

// RestoreApp recreates a checkpointed application instance in a VM made by
// RestoreVM. Its new encryptions are under the VM's new generation; its pages
// decrypt under the generations that sealed them. The state is validated (ids,
// counts, generations, versions) and refused with ErrBadState, naming what is wrong.
func (v *VM) RestoreApp(st AppState) (_ *App, err error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.closed {
		return nil, ErrDropped
	}
	switch {
	case st.Instance == 0 || st.Instance > v.next:
		return nil, fmt.Errorf("%w: instance %d (the state handed out 1 to %d)", ErrBadState, st.Instance, v.next)
	case v.apps[st.Instance] != nil:
		return nil, fmt.Errorf("%w: instance %d restored twice", ErrBadState, st.Instance)
	case len(st.Resources) > MaxStateResources:
		return nil, fmt.Errorf("%w: %d resources (at most %d)", ErrBadState, len(st.Resources), MaxStateResources)
	}
	cur := v.gen()
	key, err := deriveAppKeySalted(v.master, v.salts[cur][:], st.Identity, st.Instance)
	if err != nil {
		return nil, err
	}
	a := newApp(key, st.Identity, st.Instance)
	a.gen, a.serial = cur, st.Serial
	defer func() {
		if err != nil {
			a.Drop()
		}
	}()
	older := map[uint32][]byte{} // app keys of earlier generations, derived once
	defer func() {
		for _, k := range older {
			Zeroize(k)
		}
	}()
	total := 0
	for _, rs := range st.Resources {
		if _, dup := a.res[rs.ID]; dup {
			return nil, fmt.Errorf("%w: resource %d twice", ErrBadState, rs.ID)
		}
		if rs.Serial == 0 || rs.Serial > st.Serial {
			return nil, fmt.Errorf("%w: resource %d has registration %d (the app made %d)", ErrBadState, rs.ID, rs.Serial, st.Serial)
		}
		if total += len(rs.Pages); total > MaxStatePages {
			return nil, fmt.Errorf("%w: more than %d pages", ErrBadState, MaxStatePages)
		}
		k, aead, err := resourceCipher(a.key, rs.ID, rs.Serial)
		if err != nil {
			return nil, err
		}
		r := &resource{serial: rs.Serial, key: k, aead: aead, older: map[uint32]olderKey{}, pages: make(map[uint32]*page, len(rs.Pages))}
		a.res[rs.ID] = r
		for _, ps := range rs.Pages {
			id := PageID{rs.ID, ps.Index}
			if _, dup := r.pages[ps.Index]; dup {
				return nil, fmt.Errorf("%w: %v twice", ErrBadState, id)
			}
			pg := &page{home: fpRef{res: rs.ID, serial: rs.Serial, idx: ps.Index}, version: ps.Version}
			r.pages[ps.Index] = pg
			if ps.Removed {
				pg.state = removed
				continue
			}
			if ps.Version == 0 {
				return nil, fmt.Errorf("%w: %v holds ciphertext at version 0", ErrBadState, id)
			}
			if v.reusedGen && ps.Gen == cur {
				pg.state, pg.gen, pg.frame, pg.tag = Cipher, ps.Gen, ps.Frame, ps.Tag
				continue
			}
			if ps.Gen >= cur {
				return nil, fmt.Errorf("%w: %v is sealed under generation %d (the state has %d)", ErrBadState, id, ps.Gen, cur)
			}
			pg.state, pg.gen, pg.frame, pg.tag = Cipher, ps.Gen, ps.Frame, ps.Tag
			if _, ok := r.older[ps.Gen]; ok {
				continue
			}
			ak := older[ps.Gen]
			if ak == nil {
				if ak, err = deriveAppKeySalted(v.master, v.salts[ps.Gen][:], st.Identity, st.Instance); err != nil {
					return nil, err
				}
				older[ps.Gen] = ak
			}
			ok, oa, err := resourceCipher(ak, rs.ID, rs.Serial)
			if err != nil {
				return nil, err
			}
			r.older[ps.Gen] = olderKey{key: ok, aead: oa}
		}
	}
	v.apps[st.Instance] = a
	return a, nil
}
