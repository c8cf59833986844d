// Package insnlen computes the length of the x86-64 instructions that access memory in
// the common forms (MOV, MOVZX/MOVSX, ALU and shift forms with a memory operand, XCHG,
// CMPXCHG, XADD, INC/DEC/NOT/NEG, SETcc, BT*, string operations, and the SSE moves),
// so that the monitor can skip a faulting instruction whose access it discarded.
//
// KVM does not report instruction lengths on the exits umbra sees, and emulating the
// whole instruction set is neither needed nor wise in a security monitor: an
// instruction outside the supported forms is refused with an error, and the caller
// falls back to a fail-closed action. Only 64-bit mode is supported. The input is guest
// memory and therefore hostile: decoding never reads past the slice and never returns a
// length over 15.
package insnlen

import (
	"errors"
	"fmt"
)

// MaxLen is the architectural limit on an instruction's length.
const MaxLen = 15

// ErrTruncated means the bytes end before the instruction does.
var ErrTruncated = errors.New("insnlen: instruction truncated")

// ErrUnsupported means the instruction is not one of the supported forms.
var ErrUnsupported = errors.New("insnlen: unsupported instruction")

// ErrTooLong means the instruction would exceed 15 bytes (the CPU raises #GP).
var ErrTooLong = errors.New("insnlen: instruction longer than 15 bytes")

// imm kinds
const (
	immNone = iota
	imm8
	immZ    // 16 with 0x66, else 32 (also with REX.W: sign-extended)
	immGrp3 // F6/F7: imm only for /0 and /1
)

type form struct {
	ok    bool
	modrm bool
	imm   uint8
	size8 bool // for immGrp3: F6 (imm8) vs F7 (immZ)
}

var oneByte, twoByte [256]form

func init() {
	m := func(t *[256]form, imm uint8, ops ...int) {
		for _, o := range ops {
			t[o] = form{ok: true, modrm: true, imm: imm}
		}
	}
	// ALU r/m forms: ADD OR ADC SBB AND SUB XOR CMP, op 0..3 of each group of 8.
	for g := 0; g < 8; g++ {
		m(&oneByte, immNone, g*8, g*8+1, g*8+2, g*8+3)
	}
	m(&oneByte, immZ, 0x69, 0x81, 0xC7)
	m(&oneByte, imm8, 0x6B, 0x80, 0x83, 0xC0, 0xC1, 0xC6)
	m(&oneByte, immNone, 0x63, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8B, 0x8F,
		0xD0, 0xD1, 0xD2, 0xD3, 0xFE, 0xFF)
	oneByte[0xF6] = form{ok: true, modrm: true, imm: immGrp3, size8: true}
	oneByte[0xF7] = form{ok: true, modrm: true, imm: immGrp3}
	for _, o := range []int{0xA4, 0xA5, 0xA6, 0xA7, 0xAA, 0xAB, 0xAC, 0xAD, 0xAE, 0xAF} {
		oneByte[o] = form{ok: true} // string operations: no operand bytes
	}
	// 0xA0-0xA3 (moffs) are handled in Length.

	m(&twoByte, immNone, 0x10, 0x11, 0x12, 0x13, 0x16, 0x17, 0x28, 0x29, 0x2B,
		0x6E, 0x6F, 0x7E, 0x7F, 0xA3, 0xAB, 0xAF, 0xB0, 0xB1, 0xB3, 0xB6, 0xB7, 0xBB,
		0xBE, 0xBF, 0xC0, 0xC1, 0xC3, 0xC7, 0xD6, 0xE7)
	m(&twoByte, imm8, 0xBA)
	for o := 0x40; o <= 0x4F; o++ { // CMOVcc
		m(&twoByte, immNone, o)
	}
	for o := 0x90; o <= 0x9F; o++ { // SETcc
		m(&twoByte, immNone, o)
	}
}

// Length returns the length of the instruction at the start of code, which must be
// 64-bit mode code.
func Length(code []byte) (int, error) {
	i := 0
	opsize16, addr32, rexW := false, false, false
	at := func(k int) (byte, error) {
		if k >= MaxLen {
			return 0, ErrTooLong
		}
		if k >= len(code) {
			return 0, ErrTruncated
		}
		return code[k], nil
	}
prefixes:
	for {
		b, err := at(i)
		if err != nil {
			return 0, err
		}
		switch b {
		case 0x66:
			opsize16 = true
		case 0x67:
			addr32 = true
		case 0xF0, 0xF2, 0xF3, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65:
		default:
			break prefixes
		}
		i++
	}
	b, err := at(i)
	if err != nil {
		return 0, err
	}
	if b&0xF0 == 0x40 { // REX, must be last before the opcode
		rexW = b&0x08 != 0
		i++
		if b, err = at(i); err != nil {
			return 0, err
		}
		switch b {
		case 0x66, 0x67, 0xF0, 0xF2, 0xF3, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65:
			return 0, fmt.Errorf("%w: legacy prefix %#02x after REX", ErrUnsupported, b)
		}
		if b&0xF0 == 0x40 {
			return 0, fmt.Errorf("%w: two REX prefixes", ErrUnsupported)
		}
	}
	op := b
	i++
	twoByteOp := false
	var f form
	switch {
	case op >= 0xA0 && op <= 0xA3: // MOV AL/eAX <-> moffs
		n := 8
		if addr32 {
			n = 4
		}
		return check(i+n, len(code))
	case op == 0x0F:
		if op, err = at(i); err != nil {
			return 0, err
		}
		i++
		twoByteOp = true
		f = twoByte[op]
		if !f.ok {
			return 0, fmt.Errorf("%w: opcode 0f %02x", ErrUnsupported, op)
		}
	default:
		f = oneByte[op]
		if !f.ok {
			return 0, fmt.Errorf("%w: opcode %02x", ErrUnsupported, op)
		}
	}
	if f.modrm {
		mrm, err := at(i)
		if err != nil {
			return 0, err
		}
		i++
		mod, reg, rm := mrm>>6, (mrm>>3)&7, mrm&7
		if !twoByteOp {
			switch {
			case op == 0x8F && reg != 0: // AMD XOP prefix, not POP
				return 0, fmt.Errorf("%w: XOP prefix", ErrUnsupported)
			case op == 0xFE && reg > 1, op == 0xFF && reg == 7: // undefined (#UD)
				return 0, fmt.Errorf("%w: opcode %02x /%d is undefined", ErrUnsupported, op, reg)
			}
		}
		if mod != 3 {
			if rm == 4 {
				sib, err := at(i)
				if err != nil {
					return 0, err
				}
				i++
				if sib&7 == 5 && mod == 0 {
					i += 4
				}
			} else if rm == 5 && mod == 0 {
				i += 4 // RIP-relative disp32
			}
			switch mod {
			case 1:
				i++
			case 2:
				i += 4
			}
		}
		switch f.imm {
		case immGrp3:
			if reg <= 1 {
				if f.size8 {
					i++
				} else {
					i += immZSize(opsize16, rexW)
				}
			}
		}
	}
	switch f.imm {
	case imm8:
		i++
	case immZ:
		i += immZSize(opsize16, rexW)
	}
	return check(i, len(code))
}

func immZSize(opsize16, rexW bool) int {
	if opsize16 && !rexW {
		return 2
	}
	return 4
}

func check(n, have int) (int, error) {
	if n > MaxLen {
		return 0, ErrTooLong
	}
	if n > have {
		return 0, ErrTruncated
	}
	return n, nil
}
