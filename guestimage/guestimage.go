// Package guestimage ships the prebuilt umbra test guest, so that go build
// needs no C toolchain. The image is built from testdata/guest with
// `make -C testdata/guest`; `make -C testdata/guest check` verifies that the
// committed testguest.elf is exactly what those sources build.
package guestimage

import _ "embed"

//go:embed testguest.elf
var image []byte

// DemoCmdline is the command line `umbra run` uses for its built-in demo:
// four processes that print under preemption, one of them cloaked (its memory and
// registers hidden from the guest kernel), and all exit 0.
const DemoCmdline = "run=hello:umbra:demo,counter:a:4:3,counter:b:4:3,cloakcompute:4:3:cloak"

// Image returns a copy of the test guest's ELF image (boot protocol in
// docs/boot.md, command line in testdata/guest/README.md).
func Image() []byte {
	return append([]byte(nil), image...)
}
