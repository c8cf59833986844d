package monitor

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"
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
}

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

// LoadSpecFile reads and parses a VM spec file.
func LoadSpecFile(path string) (*Spec, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read VM spec: %w", err)
	}
	s, err := ParseSpec(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return s, nil
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
func (s *Spec) ReadGuestFiles(specDir string) (image, initrd []byte, err error) {
	field := "guest.image"
	if s.Guest.Kernel != "" {
		field = "guest.kernel"
	}
	if image, err = os.ReadFile(s.ImagePath(specDir)); err != nil {
		return nil, nil, fmt.Errorf("%s: %w", field, err)
	}
	if p := s.InitrdPath(specDir); p != "" {
		if initrd, err = os.ReadFile(p); err != nil {
			return nil, nil, fmt.Errorf("guest.initrd: %w", err)
		}
	}
	return image, initrd, nil
}
