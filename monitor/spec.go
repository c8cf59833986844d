package monitor

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/umbra-cc/umbra/userfile"
)

// SpecVersion is the VM spec format this monitor reads (docs/spec.md).
const SpecVersion = "umbra.dev/v1"

// Spec is a VM spec: what an operator writes to describe a protected VM.
type Spec struct {
	APIVersion string            `yaml:"apiVersion" json:"apiVersion"`
	Name       string            `yaml:"name" json:"name"`
	Labels     map[string]string `yaml:"labels,omitempty" json:"labels,omitempty"`
	Guest      GuestSpec         `yaml:"guest" json:"guest"`
	Memory     string            `yaml:"memory,omitempty" json:"memory,omitempty"`   // e.g. "64MiB"
	Console    string            `yaml:"console,omitempty" json:"console,omitempty"` // stdout, stderr, none, file:PATH
	Timeout    string            `yaml:"timeout,omitempty" json:"timeout,omitempty"` // Go duration, e.g. "30s"
	// Cloak names the apps the VM is expected to run cloaked; the policy input's
	// vm.spec.cloak is true when it names any (or once an app registered).
	Cloak *CloakSpec `yaml:"cloak,omitempty" json:"cloak,omitempty"`
	// Disks are the VM's virtio-blk disks (docs/spec.md, docs/disk.md).
	Disks []DiskSpec `yaml:"disks,omitempty" json:"disks,omitempty"`
	// Networks are the VM's virtio-net NICs, each on a TAP device in a network
	// namespace the administrator names (docs/spec.md, docs/network.md).
	Networks []NetworkSpec `yaml:"networks,omitempty" json:"networks,omitempty"`
	// Hotplug reserves slots for disks attached while the VM runs (docs/disk.md).
	Hotplug *HotplugSpec `yaml:"hotplug,omitempty" json:"hotplug,omitempty"`
}

// HotplugDisks is how many hot-plug disk slots the spec reserves.
func (s *Spec) HotplugDisks() int {
	if s.Hotplug == nil {
		return 0
	}
	return s.Hotplug.Disks
}

// HotplugNetworks is how many NIC hot-plug slots the spec reserves.
func (s *Spec) HotplugNetworks() int {
	if s.Hotplug == nil {
		return 0
	}
	return s.Hotplug.Networks
}

// CloakSpec is the spec's cloak section.
type CloakSpec struct {
	// Apps are app names (as on the guest command line) or their 64-hex-digit
	// identities (umbra cloak identity).
	Apps []string `yaml:"apps" json:"apps"`
}

// MaxCloakApps bounds the cloak section.
const MaxCloakApps = 64

var cloakAppRE = regexp.MustCompile(`^([a-z0-9][a-z0-9_-]{0,31}|[0-9a-f]{64})$`)

// GuestSpec names what the guest boots: an umbra guest image, or a Linux kernel with an
// optional initramfs; and its command line. Paths are relative to the spec file's
// directory.
type GuestSpec struct {
	Image   string `yaml:"image,omitempty" json:"image,omitempty"`
	Kernel  string `yaml:"kernel,omitempty" json:"kernel,omitempty"` // vmlinux (PVH) or bzImage (docs/linux.md)
	Initrd  string `yaml:"initrd,omitempty" json:"initrd,omitempty"` // initramfs, with kernel only
	Cmdline string `yaml:"cmdline,omitempty" json:"cmdline,omitempty"`
}

// Boot is the boot protocol the spec asks for: BootLinux when it names a kernel.
func (s *Spec) Boot() string {
	if s.Guest.Kernel != "" {
		return BootLinux
	}
	return BootUmbra
}

const maxSpecBytes = 1 << 20

var specNameRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)

// ParseSpec decodes a YAML VM spec strictly: unknown fields, duplicate documents and
// invalid values are errors that name the field.
func ParseSpec(data []byte) (*Spec, error) {
	if len(data) > maxSpecBytes {
		return nil, fmt.Errorf("VM spec is %d bytes, the limit is %d", len(data), maxSpecBytes)
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	var s Spec
	if err := dec.Decode(&s); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, errors.New("VM spec is empty")
		}
		return nil, fmt.Errorf("VM spec: %w", err)
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		return nil, errors.New("VM spec: more than one YAML document; put one VM per file")
	}
	if err := s.Validate(); err != nil {
		return nil, err
	}
	return &s, nil
}

// ValidVMName checks a VM name (it names the VM's directory in the state directory).
func ValidVMName(name string) error {
	if !specNameRE.MatchString(name) {
		return fmt.Errorf("name %q must be 1-63 lowercase letters, digits or '-', starting and ending with a letter or digit", name)
	}
	return nil
}

// Validate checks every field and says which one is wrong and how to fix it.
func (s *Spec) Validate() error {
	if s.APIVersion != SpecVersion {
		return fmt.Errorf("VM spec: apiVersion is %q, want %q", s.APIVersion, SpecVersion)
	}
	if err := ValidVMName(s.Name); err != nil {
		return fmt.Errorf("VM spec: %w", err)
	}
	switch g := s.Guest; {
	case g.Image == "" && g.Kernel == "":
		return errors.New("VM spec: guest.image (an umbra ELF guest image) or guest.kernel (a Linux vmlinux or bzImage) is required")
	case g.Image != "" && g.Kernel != "":
		return errors.New("VM spec: guest.image and guest.kernel are exclusive: name an umbra guest image or a Linux kernel")
	case g.Initrd != "" && g.Kernel == "":
		return errors.New("VM spec: guest.initrd needs guest.kernel (an initramfs is for a Linux boot)")
	}
	limit := maxCmdlineLen
	if s.Guest.Kernel != "" {
		limit = linuxMaxCmdline
	}
	if len(s.Guest.Cmdline) > limit || strings.IndexByte(s.Guest.Cmdline, 0) >= 0 {
		return fmt.Errorf("VM spec: guest.cmdline must be at most %d bytes without NUL", limit)
	}
	if _, err := s.MemoryBytes(); err != nil {
		return err
	}
	if _, err := s.TimeoutDuration(); err != nil {
		return err
	}
	switch c := s.Console; {
	case c == "", c == "stdout", c == "stderr", c == "none":
	case strings.HasPrefix(c, "file:") && len(c) > len("file:"):
	default:
		return fmt.Errorf("VM spec: console %q must be stdout, stderr, none or file:PATH", c)
	}
	if c := s.Cloak; c != nil {
		if len(c.Apps) == 0 || len(c.Apps) > MaxCloakApps {
			return fmt.Errorf("VM spec: cloak.apps must name 1-%d apps (names or identities); leave the cloak section out for a VM without cloaked apps", MaxCloakApps)
		}
		seen := map[string]bool{}
		for _, a := range c.Apps {
			if !cloakAppRE.MatchString(a) {
				return fmt.Errorf("VM spec: cloak.apps entry %q is neither an app name (lowercase letters, digits, '-', '_', at most 32) nor a 64-hex-digit identity", a)
			}
			if seen[a] {
				return fmt.Errorf("VM spec: cloak.apps names %q twice", a)
			}
			seen[a] = true
		}
	}
	if n := s.HotplugDisks(); n < 0 || n > len(virtioIRQs) {
		return fmt.Errorf("VM spec: hotplug.disks is %d; give 0-%d", n, len(virtioIRQs))
	}
	if err := validateNetworks(s.Networks, len(s.Disks)+s.HotplugDisks()); err != nil {
		return err
	}
	if n := s.HotplugNetworks(); n < 0 || n+len(s.Networks) > MaxNICs {
		return fmt.Errorf("VM spec: hotplug.networks is %d with %d networks; give 0-%d in all", n, len(s.Networks), MaxNICs)
	} else if used := len(s.Disks) + s.HotplugDisks() + len(s.Networks); used+n > len(virtioIRQs) {
		return fmt.Errorf("VM spec: hotplug.networks is %d, but the disks, disk slots and networks already take %d of the %d virtio slots", n, used, len(virtioIRQs))
	}
	if err := validateDisks(s.Disks); err != nil {
		return err
	}
	for k, v := range s.Labels {
		if k == "" || len(k) > 63 || len(v) > 253 {
			return fmt.Errorf("VM spec: label %q: keys must be 1-63 bytes and values at most 253", k)
		}
	}
	return nil
}

// MemoryBytes parses the memory field ("64MiB", "1GiB", "512KiB" or a byte count);
// empty means DefaultMemorySize.
func (s *Spec) MemoryBytes() (uint64, error) {
	if s.Memory == "" {
		return DefaultMemorySize, nil
	}
	num, mult := s.Memory, uint64(1)
	for _, u := range []struct {
		suffix string
		mult   uint64
	}{{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}} {
		if strings.HasSuffix(num, u.suffix) {
			num, mult = strings.TrimSuffix(num, u.suffix), u.mult
			break
		}
	}
	n, err := strconv.ParseUint(strings.TrimSpace(num), 10, 64)
	if err != nil || n == 0 || n > maxGuestRAM/mult {
		return 0, fmt.Errorf("VM spec: memory %q must be a size like 64MiB, at most %d GiB", s.Memory, maxGuestRAM>>30)
	}
	b := n * mult
	if b < minGuestRAM || b%PageSize != 0 {
		return 0, fmt.Errorf("VM spec: memory %q must be a multiple of 4KiB and at least %d MiB", s.Memory, minGuestRAM>>20)
	}
	return b, nil
}

// TimeoutDuration parses the timeout field; empty means DefaultTimeout.
func (s *Spec) TimeoutDuration() (time.Duration, error) {
	if s.Timeout == "" {
		return DefaultTimeout, nil
	}
	d, err := time.ParseDuration(s.Timeout)
	if err != nil || d <= 0 {
		return 0, fmt.Errorf("VM spec: timeout %q must be a positive duration like 30s or 5m", s.Timeout)
	}
	return d, nil
}

// ImagePath resolves what the guest boots (guest.image, or guest.kernel for Linux)
// relative to the directory of the spec file.
func (s *Spec) ImagePath(specDir string) string {
	if s.Guest.Kernel != "" {
		return specPath(specDir, s.Guest.Kernel)
	}
	return specPath(specDir, s.Guest.Image)
}

// InitrdPath resolves guest.initrd; empty when the spec has none.
func (s *Spec) InitrdPath(specDir string) string {
	if s.Guest.Initrd == "" {
		return ""
	}
	return specPath(specDir, s.Guest.Initrd)
}

func specPath(dir, p string) string {
	if filepath.IsAbs(p) {
		return p
	}
	return filepath.Join(dir, p)
}

// ReadGuestFiles reads the image (or kernel) and the initramfs the spec names, relative to
// specDir; the error names the field.
func (s *Spec) ReadGuestFiles(ctx context.Context, specDir string) (image, initrd []byte, err error) {
	field := "guest.image"
	if s.Guest.Kernel != "" {
		field = "guest.kernel"
	}
	if image, err = userfile.Read(ctx, s.ImagePath(specDir), field, userfile.MaxImageBytes); err != nil {
		return nil, nil, err
	}
	if p := s.InitrdPath(specDir); p != "" {
		if initrd, err = userfile.Read(ctx, p, "guest.initrd", userfile.MaxImageBytes); err != nil {
			return nil, nil, err
		}
	}
	return image, initrd, nil
}
