package launch

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/umbra-cc/umbra/migration"
	"github.com/umbra-cc/umbra/monitor"
	"github.com/umbra-cc/umbra/sealing"
)

// A migration's disks on the destination (docs/migration.md §8). A copied disk arrives
// into a new image of its own in STATE/vms/NAME/disks/ (removed if the migration
// aborts); a shared disk is opened where this host sees the source's image, which
// must lie under one of the shared storage roots this host declares (ReceiveConfig.
// SharedStorage): a source cannot make the destination open an arbitrary host file.
// A protected disk's root and version from the source's pause become its anchor here
// before the launch opens it, so an image in any other state (an older copy the
// storage kept, a stale copy) is refused as it would be on the source. The launch's
// policy input names every disk as it is here (path, format, digest or root).

// SharedStorage is storage this host shares with migration sources: a disk image the
// source has under From is this host's file at the same place under To ("" To: the
// same path).
type SharedStorage struct {
	From, To string
}

// ParseSharedStorage parses SRC[=DST], both absolute directories.
func ParseSharedStorage(s string) (SharedStorage, error) {
	from, to, _ := strings.Cut(s, "=")
	if to == "" {
		to = from
	}
	if !filepath.IsAbs(from) || !filepath.IsAbs(to) {
		return SharedStorage{}, fmt.Errorf("shared storage %q: give absolute directories, SRC or SRC=DST", s)
	}
	return SharedStorage{From: filepath.Clean(from), To: filepath.Clean(to)}, nil
}

// sharedPath maps the source's path of a shared image to this host's, or says why not.
func sharedPath(roots []SharedStorage, src string) (string, error) {
	if !filepath.IsAbs(src) || filepath.Clean(src) != src {
		return "", fmt.Errorf("the shared image path %q is not absolute and clean", src)
	}
	for _, r := range roots {
		rel, err := filepath.Rel(r.From, src)
		if err == nil && rel != "." && !strings.HasPrefix(rel, "..") {
			return filepath.Join(r.To, rel), nil
		}
	}
	return "", fmt.Errorf("the shared image %s is not under storage this host shares (umbra receive --shared-storage)", src)
}

// CreateDisk makes the new image a copied disk arrives in.
func (d *destination) CreateDisk(_ context.Context, o *migration.Offer, info migration.DiskInfo) (migration.DiskSink, error) {
	dir := filepath.Join(vmDir(d.rc.StateDir, o.VM), "disks")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	var tag [6]byte
	rand.Read(tag[:])
	path := filepath.Join(dir, info.Name+"."+hex.EncodeToString(tag[:])+".img")
	s, err := migration.CreateFileSink(path, info.Size)
	if err != nil {
		return nil, err
	}
	if d.copied == nil {
		d.copied = map[string]string{}
	}
	d.copied[info.Name] = path
	return s, nil
}

// diskLaunch rewrites the received spec's disks to where they are on this host and
// makes the environment that opens them, with each protected disk's received state
// anchored here.
func (d *destination) diskLaunch(in *migration.Incoming, spec *monitor.Spec) (*monitor.Spec, monitor.DiskEnv, error) {
	var env monitor.DiskEnv
	if len(spec.Disks) == 0 && len(in.Offer.Disks) == 0 {
		return spec, env, nil
	}
	offered := in.Offer.Disks
	if len(offered) != len(spec.Disks) || len(in.DiskStates) != len(offered) {
		return nil, env, fmt.Errorf("the offer carries %d disks (%d states) for the spec's %d", len(offered), len(in.DiskStates), len(spec.Disks))
	}
	out := *spec
	out.Disks = slices.Clone(spec.Disks)
	protected := false
	for i, sd := range out.Disks {
		o := offered[i]
		if o.Name != sd.Name || o.Format != diskFormat(sd) || o.ReadOnly != sd.ReadOnly {
			return nil, env, fmt.Errorf("the offer's disk %d (%s, %s) is not the spec's (%s, %s)", i, o.Name, o.Format, sd.Name, diskFormat(sd))
		}
		switch o.Mode {
		case migration.DiskShared:
			p, err := sharedPath(d.rc.SharedStorage, o.Path)
			if err != nil {
				return nil, env, fmt.Errorf("disk %s: %w", sd.Name, err)
			}
			out.Disks[i].Path = p
		case migration.DiskCopy:
			p, ok := d.copied[sd.Name]
			if !ok {
				return nil, env, fmt.Errorf("disk %s: its copy did not arrive", sd.Name)
			}
			out.Disks[i].Path = p
			if sd.Format == monitor.FormatQcow2 {
				out.Disks[i].Format = monitor.FormatRaw // copied as its guest-visible bytes
			}
		}
		out.Disks[i].Seed = "" // a protected disk exists: it is not made again
		protected = protected || sd.Protected
	}
	if !protected {
		return &out, env, nil
	}
	secret := in.Offer.Secrets[secretDisk]
	if len(secret) < 32 {
		return nil, env, errors.New("the VM has protected disks but the offer carries no disk secret")
	}
	fp, err := sealing.HostID(d.rc.TPM)
	if err != nil {
		return nil, env, err
	}
	pe := &monitor.ProtectedDiskEnv{Secret: secret, Counter: sealing.SeriesCounter{TPM: d.rc.TPM, Host: fp}, StateDir: d.rc.StateDir, VM: spec.Name}
	for i, sd := range out.Disks {
		if !sd.Protected {
			continue
		}
		st := in.DiskStates[i]
		if err := pe.AdoptAnchor(sd.Name, st.Version, st.Root); err != nil {
			return nil, env, err
		}
	}
	env.Protected = &monitor.ProtectedDiskEnv{Secret: secret}
	return &out, env, nil
}
