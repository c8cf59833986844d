package monitor

import (
	"strings"
	"testing"
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
