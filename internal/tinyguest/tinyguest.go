// Package tinyguest holds hand-assembled x86-64 guest programs of a few instructions,
// for tests that run a vCPU on /dev/kvm without the test guest image (the kvm binding's
// and checkpoint's tests).
package tinyguest

// CounterPort is the I/O port XMMCounter reports on.
const CounterPort = 0x10

// XMMCounter is a 64-bit guest loop that keeps a counter in XMM0 and at guest-physical
// 0x3000 and reports its low byte on CounterPort with each iteration (KVM's emulator
// has no MOVQ between XMM and general registers, so it goes through memory):
//
//	1: movdqu %xmm0,0x3000; incq 0x3000; movdqu 0x3000,%xmm0; mov 0x3000,%al; out %al,$0x10; jmp 1b
//
// It needs long mode with 0x3000 mapped writable and CR4.OSFXSR set. A restored vCPU
// continues the count only if its registers, FPU/XSAVE state, control registers and
// RAM all came back.
var XMMCounter = []byte{
	0xf3, 0x0f, 0x7f, 0x04, 0x25, 0x00, 0x30, 0x00, 0x00,
	0x48, 0xff, 0x04, 0x25, 0x00, 0x30, 0x00, 0x00,
	0xf3, 0x0f, 0x6f, 0x04, 0x25, 0x00, 0x30, 0x00, 0x00,
	0x8a, 0x04, 0x25, 0x00, 0x30, 0x00, 0x00,
	0xe6, CounterPort,
	0xeb, 0xdb,
}
