package snapstore

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/umbra-cc/umbra/statefile"
	"github.com/umbra-cc/umbra/strictjson"
)

// A cluster checkpoint (docs/snapshot.md §4.9) is a set of snapshots, one in each
// member VM's store, taken while every member was paused at once. Its group record,
// kept in a Groups directory, lists the members' snapshots by name, ID and generation.
// The record is what makes the set: it is written last, once every member's snapshot
// is committed, exclusively and atomically (a crash leaves either no record or a
// complete one), and a restore of the set refuses it unless every member's snapshot is
// still the one listed. Like a snapshot's record it is never trusted for what a
// restore of one VM decides: each member's monitor authenticates its own snapshot.

// Errors of group records.
var (
	// ErrGroupNotFound: no group record has that name.
	ErrGroupNotFound = errors.New("no such cluster checkpoint")
	// ErrGroupExists: a group record of that name exists.
	ErrGroupExists = errors.New("a cluster checkpoint of that name exists")
)

// MaxGroupMembers bounds a group's members (policy.MaxGroupMembers).
const MaxGroupMembers = 16

// MaxGroupBytes bounds a group record file.
const MaxGroupBytes = 16 << 10

// vmName is a VM's name as monitor.ValidVMName allows it.
var vmName = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)

// Group is a cluster checkpoint's record.
type Group struct {
	Name    string    `json:"name"`
	Created time.Time `json:"created"`
	// Quiesced is when the last member was paused and Captured when the last member's
	// snapshot was written: every member was paused from Quiesced to Captured.
	Quiesced time.Time     `json:"quiesced"`
	Captured time.Time     `json:"captured"`
	Members  []GroupMember `json:"members"`
}

// GroupMember is one member VM's snapshot in a group.
type GroupMember struct {
	VM         string    `json:"vm"`
	Snapshot   string    `json:"snapshot"`
	ID         string    `json:"id"`         // the snapshot's checkpoint ID (hex), as its record
	Generation uint64    `json:"generation"` // its TPM-anchored generation
	Host       string    `json:"host"`       // the EK fingerprint of the host it was taken on
	Paused     time.Time `json:"paused"`     // when its monitor parked its vCPU
}

// Member returns the group's member vm.
func (g *Group) Member(vm string) (GroupMember, bool) {
	i := slices.IndexFunc(g.Members, func(m GroupMember) bool { return m.VM == vm })
	if i < 0 {
		return GroupMember{}, false
	}
	return g.Members[i], true
}

// Validate checks the record: a valid name, 2 to MaxGroupMembers distinct members,
// each with a valid snapshot name, a 32-hex-digit ID and a generation.
func (g *Group) Validate() error {
	if err := ValidName(g.Name); err != nil {
		return fmt.Errorf("group: %w", err)
	}
	if n := len(g.Members); n < 2 || n > MaxGroupMembers {
		return fmt.Errorf("group %s: %d members, want 2 to %d", g.Name, n, MaxGroupMembers)
	}
	seen := map[string]bool{}
	for i, m := range g.Members {
		if !vmName.MatchString(m.VM) {
			return fmt.Errorf("group %s: member %d: %q is not a VM name", g.Name, i, m.VM)
		}
		if seen[m.VM] {
			return fmt.Errorf("group %s: VM %s is a member twice", g.Name, m.VM)
		}
		seen[m.VM] = true
		if err := ValidName(m.Snapshot); err != nil {
			return fmt.Errorf("group %s: member %s: %w", g.Name, m.VM, err)
		}
		if !isHex32(m.ID) || m.Generation == 0 || len(m.Host) > 128 {
			return fmt.Errorf("group %s: member %s: id, generation or host out of range", g.Name, m.VM)
		}
	}
	if g.Captured.Before(g.Quiesced) {
		return fmt.Errorf("group %s: captured (%s) before every member was quiesced (%s)", g.Name, g.Captured, g.Quiesced)
	}
	return nil
}

func isHex32(s string) bool {
	if len(s) != 32 {
		return false
	}
	for _, c := range s {
		if !strings.ContainsRune("0123456789abcdef", c) {
			return false
		}
	}
	return true
}

// DecodeGroup decodes a group record strictly and validates it.
func DecodeGroup(b []byte) (*Group, error) {
	if len(b) > MaxGroupBytes {
		return nil, fmt.Errorf("%w: group record of %d bytes, at most %d", ErrCorrupt, len(b), MaxGroupBytes)
	}
	var g Group
	if err := strictjson.Decode(b, &g); err != nil {
		return nil, fmt.Errorf("%w: group record: %v", ErrCorrupt, err)
	}
	if err := g.Validate(); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrCorrupt, err)
	}
	return &g, nil
}

// Groups is a directory of group records (one host's cluster checkpoints).
type Groups struct {
	dir string
}

// OpenGroups opens the group directory dir, creating it (mode 0700) if create is set.
func OpenGroups(dir string, create bool) (*Groups, error) {
	if create {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, fmt.Errorf("cluster checkpoints: %w", err)
		}
	}
	return &Groups{dir: dir}, nil
}

func (gs *Groups) path(name string) string { return filepath.Join(gs.dir, name+recordSuffix) }

// Write writes g's record, all at once: a temporary file, synced, linked into place
// under the group's name (never replacing a record of that name: ErrGroupExists), then
// the directory synced. A crash leaves no record or the whole one.
func (gs *Groups) Write(g *Group) error {
	if err := g.Validate(); err != nil {
		return err
	}
	b, err := json.Marshal(g)
	if err != nil {
		return err
	}
	if len(b) > MaxGroupBytes {
		return fmt.Errorf("group %s: record of %d bytes, at most %d", g.Name, len(b), MaxGroupBytes)
	}
	f, err := os.CreateTemp(gs.dir, tmpPrefix+g.Name+"-*")
	if err != nil {
		return fmt.Errorf("cluster checkpoints: %w", err)
	}
	defer os.Remove(f.Name())
	_, err = f.Write(b)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("cluster checkpoints: group %s: %w", g.Name, err)
	}
	if err := os.Link(f.Name(), gs.path(g.Name)); errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("%w: %s", ErrGroupExists, g.Name)
	} else if err != nil {
		return fmt.Errorf("cluster checkpoints: %w", err)
	}
	return statefile.SyncDir(gs.dir)
}

// Get reads group name's record.
func (gs *Groups) Get(name string) (*Group, error) {
	if err := ValidName(name); err != nil {
		return nil, err
	}
	b, err := readSmall(gs.path(name), MaxGroupBytes, fmt.Errorf("%w: %s", ErrGroupNotFound, name), "cluster checkpoint "+name)
	if err != nil {
		return nil, err
	}
	g, err := DecodeGroup(b)
	if err != nil {
		return nil, fmt.Errorf("cluster checkpoint %s: %w", name, err)
	}
	if g.Name != name {
		return nil, fmt.Errorf("cluster checkpoint %s: %w: its record names %q", name, ErrCorrupt, g.Name)
	}
	return g, nil
}

// List returns the directory's groups by name; a corrupt record is reported in errs.
func (gs *Groups) List() (groups []Group, errs []error) {
	ents, err := os.ReadDir(gs.dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, []error{fmt.Errorf("cluster checkpoints: %w", err)}
	}
	for _, e := range ents {
		name, ok := strings.CutSuffix(e.Name(), recordSuffix)
		if !ok || ValidName(name) != nil {
			continue
		}
		g, err := gs.Get(name)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		groups = append(groups, *g)
	}
	return groups, errs
}

// Delete removes group name's record (not its members' snapshots).
func (gs *Groups) Delete(name string) error {
	if err := ValidName(name); err != nil {
		return err
	}
	if err := os.Remove(gs.path(name)); errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("%w: %s", ErrGroupNotFound, name)
	} else if err != nil {
		return fmt.Errorf("cluster checkpoint %s: %w", name, err)
	}
	return statefile.SyncDir(gs.dir)
}

// Check says whether snapshot rec, in VM vm's store, is still the one group g lists
// for vm: nil, or an error naming what differs (not a member, another snapshot, another
// ID or generation: the member's snapshot was replaced or retaken since the group).
func (g *Group) Check(vm string, rec *Record) error {
	m, ok := g.Member(vm)
	switch {
	case !ok:
		return fmt.Errorf("VM %s is not a member of cluster checkpoint %s", vm, g.Name)
	case rec.Name != m.Snapshot:
		return fmt.Errorf("cluster checkpoint %s: VM %s: snapshot %s is not the member's (%s)", g.Name, vm, rec.Name, m.Snapshot)
	case rec.ID != m.ID || rec.Generation != m.Generation:
		return fmt.Errorf("cluster checkpoint %s: VM %s: snapshot %s is id %s generation %d, the group lists id %s generation %d: it was replaced since the set was taken",
			g.Name, vm, rec.Name, rec.ID, rec.Generation, m.ID, m.Generation)
	case rec.Group != g.Name:
		return fmt.Errorf("cluster checkpoint %s: VM %s: snapshot %s was not taken for this group (its record says %q)", g.Name, vm, rec.Name, rec.Group)
	}
	return nil
}
