package guestimage

import (
	"bytes"
	"debug/elf"
	"testing"
)

func TestAppsAreEmbeddedELFs(t *testing.T) {
	apps, err := Apps(nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"hello", "counter", "compute", "cloakcompute", "cloaksecret"} {
		b, ok := apps[want]
		if !ok {
			t.Fatalf("app %s missing; have %v", want, AppNames(apps))
		}
		if _, err := elf.NewFile(bytes.NewReader(b)); err != nil {
			t.Errorf("app %s is not an ELF file: %v", want, err)
		}
	}
	if _, err := Apps([]byte("not elf")); err == nil {
		t.Fatal("Apps accepted a non-ELF image")
	}
}
