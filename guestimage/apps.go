package guestimage

import (
	"bytes"
	"debug/elf"
	"fmt"
	"sort"
	"strings"
)

// Apps returns the user programs embedded in a test-guest kernel image (by default
// the built-in one if image is nil), by name: each is an ELF file the kernel loads
// into a process. Administrators use them to compute a cloakable app's identity.
func Apps(image []byte) (map[string][]byte, error) {
	if image == nil {
		image = Image()
	}
	f, err := elf.NewFile(bytes.NewReader(image))
	if err != nil {
		return nil, fmt.Errorf("guest image is not an ELF file: %w", err)
	}
	syms, err := f.Symbols()
	if err != nil {
		return nil, fmt.Errorf("guest image has no symbol table: %w", err)
	}
	starts, ends := map[string]uint64{}, map[string]uint64{}
	for _, s := range syms {
		name, ok := strings.CutPrefix(s.Name, "app_")
		if !ok {
			continue
		}
		if n, ok := strings.CutSuffix(name, "_start"); ok {
			starts[n] = s.Value
		} else if n, ok := strings.CutSuffix(name, "_end"); ok {
			ends[n] = s.Value
		}
	}
	apps := map[string][]byte{}
	for name, start := range starts {
		end, ok := ends[name]
		if !ok || end <= start {
			continue
		}
		b, err := readVirt(f, start, end-start)
		if err != nil {
			return nil, fmt.Errorf("guest image: app %s: %w", name, err)
		}
		apps[name] = b
	}
	if len(apps) == 0 {
		return nil, fmt.Errorf("guest image embeds no apps (no app_NAME_start/_end symbols)")
	}
	return apps, nil
}

// AppNames returns the embedded apps' names, sorted.
func AppNames(apps map[string][]byte) []string {
	names := make([]string, 0, len(apps))
	for n := range apps {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

func readVirt(f *elf.File, va, n uint64) ([]byte, error) {
	for _, p := range f.Progs {
		if p.Type == elf.PT_LOAD && va >= p.Vaddr && va-p.Vaddr < p.Filesz && n <= p.Filesz-(va-p.Vaddr) {
			b := make([]byte, n)
			if _, err := p.ReadAt(b, int64(va-p.Vaddr)); err != nil {
				return nil, err
			}
			return b, nil
		}
	}
	return nil, fmt.Errorf("bytes at %#x+%d are not in a loaded segment", va, n)
}
