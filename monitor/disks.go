package monitor

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"regexp"
	"strings"

	"github.com/umbra-cc/umbra/disk"
	"github.com/umbra-cc/umbra/disk/cbt"
	"github.com/umbra-cc/umbra/disk/protdisk"
	"github.com/umbra-cc/umbra/disk/qcow2"
	"github.com/umbra-cc/umbra/monitor/memguard"
	"github.com/umbra-cc/umbra/virtio"
	"github.com/umbra-cc/umbra/virtio/blk"
)

// This file attaches virtio-blk disks to a VM (docs/disk.md, "Disks on a VM"): the spec's
// disks section, each disk's identity for the policy and the event log, and the devices
// on the MMIO bus with their interrupt lines and the Linux command line that finds them.

// DiskSpec is one entry of the spec's disks section.
type DiskSpec struct {
	// Name is the disk's id (the policy's device id, and its virtio-blk serial).
	Name string `yaml:"name" json:"name"`
	// Path is the image, relative to the spec file's (or sealed bundle's) directory.
	Path string `yaml:"path" json:"path"`
	// Format is raw (the default) or qcow2; a protected disk has its own format.
	Format   string `yaml:"format,omitempty" json:"format,omitempty"`
	ReadOnly bool   `yaml:"read_only,omitempty" json:"read_only,omitempty"`
	// Protected makes it a protected disk (disk/protdisk): the host sees only ciphertext
	// and cannot roll it back. Its key comes from the sealed bundle.
	Protected bool `yaml:"protected,omitempty" json:"protected,omitempty"`
	// Seed is a raw plaintext image a protected disk is made from at its first launch
	// (its size and contents); later launches do not read it.
	Seed string `yaml:"seed,omitempty" json:"seed,omitempty"`
}

// Device types and formats as the policy input names them.
const (
	DeviceVirtioBlk = "virtio-blk"
	FormatRaw       = "raw"
	FormatQcow2     = "qcow2"
	FormatProtected = "protected"
)

// TypeGuestDisk is the event-log type of an attached disk: its data is the device
// identity as the policy saw it (JSON of DiskIdentity, which is policy.Device's layout).
const TypeGuestDisk = "guest-disk"

// Virtio-mmio device slots: slot i is the 4 KiB window at VirtioMMIOBase + i*4 KiB,
// interrupting on virtioIRQs[i] (legacy PIC lines no other device uses; COM1 is 4).
const VirtioMMIOBase = 0xD000_0000

var virtioIRQs = []uint32{5, 6, 7, 9, 10, 11, 12, 14}

// MaxDisks bounds the disks section (one virtio-mmio slot each).
var MaxDisks = len(virtioIRQs)

var diskNameRE = regexp.MustCompile(`^[a-z][a-z0-9-]{0,19}$`)

// validateDisks checks the spec's disks section; the error names the entry and field.
func validateDisks(disks []DiskSpec) error {
	if len(disks) > MaxDisks {
		return fmt.Errorf("VM spec: disks lists %d disks; at most %d are supported", len(disks), MaxDisks)
	}
	names, paths := map[string]bool{}, map[string]bool{}
	for i, d := range disks {
		where := fmt.Sprintf("VM spec: disks[%d]", i)
		switch {
		case !diskNameRE.MatchString(d.Name):
			return fmt.Errorf("%s: name %q must be 1-20 lowercase letters, digits or '-', starting with a letter", where, d.Name)
		case names[d.Name]:
			return fmt.Errorf("%s: name %q is used twice", where, d.Name)
		case d.Path == "" || len(d.Path) > 4096 || strings.IndexByte(d.Path, 0) >= 0:
			return fmt.Errorf("%s (%s): path is required, at most 4096 bytes without NUL", where, d.Name)
		case paths[d.Path]:
			return fmt.Errorf("%s (%s): path %q is already another disk's; a disk image can back one disk", where, d.Name, d.Path)
		case d.Protected && d.Format != "":
			return fmt.Errorf("%s (%s): a protected disk has its own format (docs/disk.md); leave format out", where, d.Name)
		case d.Seed != "" && !d.Protected:
			return fmt.Errorf("%s (%s): seed is for a protected disk; an unprotected disk is its image", where, d.Name)
		case len(d.Seed) > 4096 || strings.IndexByte(d.Seed, 0) >= 0:
			return fmt.Errorf("%s (%s): seed must be at most 4096 bytes without NUL", where, d.Name)
		case d.Format != "" && d.Format != FormatRaw && d.Format != FormatQcow2:
			return fmt.Errorf("%s (%s): format %q must be raw or qcow2", where, d.Name, d.Format)
		}
		names[d.Name], paths[d.Path] = true, true
	}
	return nil
}

// CheckDiskSpec checks one disk entry as the spec's disks section would.
func CheckDiskSpec(d DiskSpec) error { return validateDisks([]DiskSpec{d}) }

// format is the disk's format as the policy input names it.
func (d DiskSpec) format() string {
	switch {
	case d.Protected:
		return FormatProtected
	case d.Format == "":
		return FormatRaw
	}
	return d.Format
}

// Disk is a disk a VM's device serves: the backend is opened by the caller, who closes
// it after the run (a protected disk commits on Close).
type Disk struct {
	Name    string
	Backend disk.Backend
	// Tracker, when set, records the guest's changes for backups (backupdisks.go).
	Tracker *cbt.Tracker
}

// DiskEnv is what opening a spec's disks needs besides the spec.
type DiskEnv struct {
	// Dir is the directory relative paths are resolved against.
	Dir string
	// Protected opens protected disks (protdisks.go); nil refuses them (a VM run from a
	// plain spec has no sealed key for them).
	Protected *ProtectedDiskEnv
}

// ErrNoDiskKey is returned for a protected disk without a sealed key.
var ErrNoDiskKey = errors.New("a protected disk needs its key from a sealed VM bundle; seal the spec (umbra seal) and run the bundle")

// DiskIdentity is a disk as the policy input and the event log describe it. Its fields
// and JSON names are policy.Device's (launch converts one to the other), so the monitor
// needs no policy code.
type DiskIdentity struct {
	Type     string `json:"type"`
	ID       string `json:"id"`
	Path     string `json:"path,omitempty"`
	Format   string `json:"format,omitempty"` // raw, qcow2 or protected
	Digest   string `json:"digest,omitempty"`
	Root     string `json:"root,omitempty"`
	ReadOnly bool   `json:"read_only,omitempty"`
}

// IdentifyDisks returns each disk's identity for the policy input and the event log: the
// resolved path, the format, read-only, and the SHA-256 of the guest-visible contents
// (read through a read-only open) or, for a protected disk, its anchored root. Nothing is
// written.
func IdentifyDisks(ctx context.Context, disks []DiskSpec, env DiskEnv) ([]DiskIdentity, error) {
	out := make([]DiskIdentity, 0, len(disks))
	for _, d := range disks {
		dev := DiskIdentity{Type: DeviceVirtioBlk, ID: d.Name, Path: specPath(env.Dir, d.Path), Format: d.format(), ReadOnly: d.ReadOnly}
		if d.Protected {
			if env.Protected == nil {
				return nil, fmt.Errorf("disk %s: %w", d.Name, ErrNoDiskKey)
			}
			p, err := env.Protected.disk(d.Name)
			if err != nil {
				return nil, fmt.Errorf("disk %s: %w", d.Name, err)
			}
			if dev.Root, err = p.root(); err != nil {
				return nil, err
			}
			if dev.Root == "" && d.Seed != "" {
				// Not made yet: what it will be made from.
				seed, err := openPlainDisk(d, specPath(env.Dir, d.Seed), true)
				if err != nil {
					return nil, fmt.Errorf("seed of %w", err)
				}
				dev.Digest, err = contentDigest(ctx, seed)
				seed.Close()
				if err != nil {
					return nil, fmt.Errorf("disk %s: digest of its seed: %w", d.Name, err)
				}
			}
		} else {
			be, err := openPlainDisk(d, dev.Path, true)
			if err != nil {
				return nil, err
			}
			sum, err := contentDigest(ctx, be)
			be.Close()
			if err != nil {
				return nil, fmt.Errorf("disk %s: digest of %s: %w", d.Name, dev.Path, err)
			}
			dev.Digest = sum
		}
		out = append(out, dev)
	}
	return out, nil
}

// OpenDisks opens the disks for the run, after the policy allowed them; on error the
// ones already open are closed.
func OpenDisks(ctx context.Context, disks []DiskSpec, env DiskEnv) (_ []Disk, err error) {
	var out []Disk
	defer func() {
		if err != nil {
			CloseDisks(out)
		}
	}()
	for _, d := range disks {
		path := specPath(env.Dir, d.Path)
		var be disk.Backend
		if d.Protected {
			if env.Protected == nil {
				return nil, fmt.Errorf("disk %s: %w", d.Name, ErrNoDiskKey)
			}
			var p *protectedDisk
			if p, err = env.Protected.disk(d.Name); err == nil {
				be, err = p.open(ctx, d, path, specPath(env.Dir, d.Seed))
			}
			if err != nil {
				err = fmt.Errorf("disk %s: %w", d.Name, err)
			}
		} else {
			be, err = openPlainDisk(d, path, d.ReadOnly)
		}
		if err != nil {
			return nil, err
		}
		out = append(out, Disk{Name: d.Name, Backend: be})
	}
	return out, nil
}

// CloseDisks closes every disk (flushing; a protected disk commits its last writes).
func CloseDisks(disks []Disk) error {
	var errs []error
	for _, d := range disks {
		if err := d.Backend.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close disk %s: %w", d.Name, err))
		}
	}
	return errors.Join(errs...)
}

func openPlainDisk(d DiskSpec, path string, readOnly bool) (disk.Backend, error) {
	var be disk.Backend
	var err error
	if d.format() == FormatQcow2 && !d.Protected {
		be, err = qcow2.Open(path, readOnly)
	} else {
		be, err = disk.OpenRaw(path, readOnly)
	}
	if err != nil {
		return nil, fmt.Errorf("disk %s: %w", d.Name, err)
	}
	if be.Size() == 0 || be.Size()%512 != 0 {
		be.Close()
		return nil, fmt.Errorf("disk %s: %s is %d bytes; a disk must be a non-zero multiple of 512 bytes", d.Name, path, be.Size())
	}
	return be, nil
}

// contentDigest is the SHA-256 of a disk's guest-visible bytes (what sha256sum prints
// for a raw image, and for a qcow2 image converted to raw).
func contentDigest(ctx context.Context, be disk.Backend) (string, error) {
	h := sha256.New()
	buf := make([]byte, 1<<20)
	for off := int64(0); off < be.Size(); {
		if err := ctx.Err(); err != nil {
			return "", err
		}
		n := int(min(int64(len(buf)), be.Size()-off))
		if _, err := be.ReadAt(buf[:n], off); err != nil && !errors.Is(err, io.EOF) {
			return "", err
		}
		h.Write(buf[:n])
		off += int64(n)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// DiskMeasurement is a disk's event-log data: its identity as JSON.
func DiskMeasurement(dev DiskIdentity) []byte {
	b, _ := json.Marshal(dev) // a struct of strings and a bool: cannot fail
	return b
}

// installDisks puts one virtio-blk device per disk on the MMIO bus.
func (v *VM) installDisks() error {
	for i, d := range v.cfg.Disks {
		if i >= MaxDisks {
			return fmt.Errorf("%d disks: at most %d are supported", len(v.cfg.Disks), MaxDisks)
		}
		be := d.Backend
		if IsProtectedDisk(be) {
			be = watchedProtDisk{Backend: be, v: v, name: d.Name}
		}
		be, err := d.tracked(be)
		if err != nil {
			return err
		}
		dev, err := blk.New(be, d.Name, v.log.With("disk", d.Name))
		if err != nil {
			return fmt.Errorf("disk %s: %w", d.Name, err)
		}
		t := virtio.NewMMIO(dev, dmaMemory{v: v, device: d.Name}, irqLine{vm: v.kvm, irq: virtioIRQs[i]}, v.log.With("disk", d.Name))
		if err := v.mmio.Insert("virtio-blk "+d.Name, VirtioMMIOBase+uint64(i)*virtio.MMIOSize, virtio.MMIOSize, t); err != nil {
			return err
		}
		v.virtio = append(v.virtio, t)
		v.diskDevs = append(v.diskDevs, diskDevice{name: d.Name, dev: dev, t: t})
	}
	return nil
}

// EventDiskTampered is the audit kind of a protected disk block that failed
// authentication: the host modified, swapped, tore or rolled back what the guest wrote.
const EventDiskTampered = "disk-tampered"

// ErrDiskTampered is wrapped by the error of a run stopped because a protected disk's
// block failed authentication.
var ErrDiskTampered = errors.New("protected disk tampered with")

// watchedProtDisk is a protected disk whose authentication failures are audited and
// stop the VM: the guest gets an I/O error for the request, never the data, and the
// operator learns that the host's copy is not what the guest wrote.
type watchedProtDisk struct {
	disk.Backend
	v    *VM
	name string
}

// Unwrap is the protected disk under the watch, so protDiskOf finds an overlay a
// snapshot switched the device to, and the next snapshot can freeze it in turn.
func (w watchedProtDisk) Unwrap() disk.Backend { return w.Backend }

func (w watchedProtDisk) ReadAt(p []byte, off int64) (int, error) {
	n, err := w.Backend.ReadAt(p, off)
	if errors.Is(err, protdisk.ErrTampered) {
		details := map[string]any{"disk": w.name, "offset": off, "length": len(p), "error": err.Error()}
		if aerr := w.v.cfg.Hooks.audit(w.v.ctxOrBackground(), EventDiskTampered, details); aerr != nil {
			w.v.log.Error("protected disk tampering: audit record could not be written", "err", aerr)
		}
		w.v.Stop(fmt.Errorf("%w: disk %s, read of %d bytes at %d: %w", ErrDiskTampered, w.name, len(p), off, err))
	}
	return n, err
}

// VirtioFailures returns, for each virtio device that needs a reset, why (a driver
// breaking the protocol, for the operator and tests).
func (v *VM) VirtioFailures() []error {
	var out []error
	for _, t := range v.virtio {
		if err := t.Failure(); err != nil {
			out = append(out, err)
		}
	}
	return out
}

// virtioCmdline is the Linux command line with the virtio_mmio.device= parameters of n
// devices inserted before the arguments for init ("--"), so Linux finds them.
func virtioCmdline(cmdline string, n int) string {
	if n == 0 {
		return cmdline
	}
	params := make([]string, n)
	for i := range params {
		params[i] = fmt.Sprintf("virtio_mmio.device=4K@%#x:%d", VirtioMMIOBase+uint64(i)*virtio.MMIOSize, virtioIRQs[i])
	}
	p := strings.Join(params, " ")
	// Find the "--" token outside double quotes, as the kernel's parser does.
	inQuote := false
	for i := 0; i < len(cmdline); i++ {
		switch c := cmdline[i]; {
		case c == '"':
			inQuote = !inQuote
		case !inQuote && c == '-' && strings.HasPrefix(cmdline[i:], "--") && (i == 0 || cmdline[i-1] == ' ') &&
			(i+2 == len(cmdline) || cmdline[i+2] == ' '):
			return cmdline[:i] + p + " " + cmdline[i:]
		}
	}
	if cmdline == "" {
		return p
	}
	return cmdline + " " + p
}

// dmaMemory is guest RAM as a virtio device reaches it: every range goes through the
// guarded accessor (memguard.DMA, refused like a hypercall buffer), so a driver cannot point a device at a cloaked app's plaintext or
// at a frame the system's page protection locks (a disk read into locked kernel text,
// a disk write of a deny-read frame). A refusal fails the request (DEVICE_NEEDS_RESET)
// and is audited.
type dmaMemory struct {
	v      *VM
	device string
}

func (m dmaMemory) Slice(gpa, n uint64) ([]byte, error) {
	if n > m.v.mem.Size() {
		return nil, fmt.Errorf("%w: %d bytes at %#x", ErrOutsideRAM, n, gpa)
	}
	if err := m.v.guardSys(memguard.Request{Purpose: memguard.DMA, Access: memguard.Read | memguard.Write, GPA: gpa, Len: n}, 0, 0); err != nil {
		return nil, fmt.Errorf("virtio %s: %w", m.device, err)
	}
	return m.v.mem.Slice(gpa, int(n))
}
