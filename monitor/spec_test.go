package monitor

import (
	"strings"
	"testing"
	"time"
)

func TestParseSpec(t *testing.T) {
	good := "apiVersion: umbra.dev/v1\nname: demo\nguest:\n  image: guest.elf\n  cmdline: run=hello\nmemory: 32MiB\nconsole: stdout\ntimeout: 10s\n"
	s, err := ParseSpec([]byte(good))
	if err != nil {
		t.Fatal(err)
	}
	if m, _ := s.MemoryBytes(); m != 32<<20 || s.Guest.Cmdline != "run=hello" {
		t.Fatalf("spec %+v memory %d", s, m)
	}
	tests := []struct {
		name, yaml, want string
	}{
		{"unknown field", good + "cpus: 4\n", "field cpus not found"},
		{"unknown nested field", strings.Replace(good, "  cmdline", "  bootloader: x\n  cmdline", 1), "field bootloader not found"},
		{"image and kernel", strings.Replace(good, "  cmdline", "  kernel: vmlinux\n  cmdline", 1), "exclusive"},
		{"initrd without kernel", strings.Replace(good, "  cmdline", "  initrd: initramfs.cpio.gz\n  cmdline", 1), "guest.initrd needs guest.kernel"},
		{"linux cmdline too long", strings.Replace(strings.Replace(good, "image: guest.elf", "kernel: vmlinux", 1), "run=hello", strings.Repeat("x", 2048), 1), "at most 2047"},
		{"wrong version", strings.Replace(good, "umbra.dev/v1", "v2", 1), "apiVersion"},
		{"bad name", strings.Replace(good, "name: demo", "name: Demo_VM", 1), "name"},
		{"no image", strings.Replace(good, "image: guest.elf", "image: ''", 1), "guest.image"},
		{"bad memory", strings.Replace(good, "32MiB", "lots", 1), "memory"},
		{"tiny memory", strings.Replace(good, "32MiB", "1MiB", 1), "at least"},
		{"huge memory", strings.Replace(good, "32MiB", "9GiB", 1), "at most"},
		{"bad console", strings.Replace(good, "console: stdout", "console: tty", 1), "console"},
		{"bad timeout", strings.Replace(good, "10s", "-1s", 1), "timeout"},
		{"two documents", good + "---\n" + good, "more than one"},
		{"empty", "", "empty"},
		{"not yaml", "{{{", "VM spec"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ParseSpec([]byte(tt.yaml))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want mention of %q", err, tt.want)
			}
		})
	}
}

// FuzzParseSpec: hostile spec files never panic, and what parses validates.
func FuzzParseSpec(f *testing.F) {
	f.Add([]byte("apiVersion: umbra.dev/v1\nname: demo\nguest:\n  image: g.elf\nmemory: 64MiB\n"))
	f.Add([]byte("name: [1, 2"))
	f.Add([]byte("apiVersion: umbra.dev/v1\nname: d\nguest: {kernel: k}\ndisks:\n- {name: root, path: r.img, format: qcow2, read_only: true}\n- {name: p, path: p.pd, protected: true, seed: s.raw}\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		s, err := ParseSpec(data)
		if err != nil {
			return
		}
		if err := s.Validate(); err != nil {
			t.Fatalf("parsed spec does not validate: %v", err)
		}
	})
}

func TestSpecCloakSection(t *testing.T) {
	base := "apiVersion: umbra.dev/v1\nname: c\nguest:\n  image: g.elf\n  cmdline: run=cloakcompute:4:3:cloak\n"
	for _, tc := range []struct {
		name, extra, err string
		cloak            bool
	}{
		{"none: the command line alone is not a fact", "", "", false},
		{"by name", "cloak:\n  apps: [cloakcompute]\n", "", true},
		{"by identity", "cloak:\n  apps: [" + strings.Repeat("ab", 32) + "]\n", "", true},
		{"empty", "cloak:\n  apps: []\n", "1-64 apps", false},
		{"duplicate", "cloak:\n  apps: [a, a]\n", "twice", false},
		{"bad entry", "cloak:\n  apps: [\"A B\"]\n", "neither an app name", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := ParseSpec([]byte(base + tc.extra))
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("err = %v, want %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			vm := policyVM(s, Config{Cmdline: s.Guest.Cmdline, MemorySize: 64 << 20}, "", "defined", time.Time{}, nil)
			if vm.Spec.Cloak != tc.cloak {
				t.Fatalf("vm.spec.cloak = %v, want %v", vm.Spec.Cloak, tc.cloak)
			}
		})
	}
}
