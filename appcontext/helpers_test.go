package appcontext

import (
	"encoding/binary"
	"fmt"
)

// testMem is flat guest RAM starting at guest-physical 0.
type testMem struct {
	b    []byte
	next uint64 // next free page for tables
}

func newTestMem(size uint64) *testMem {
	return &testMem{b: make([]byte, size), next: 0x1000}
}

func (m *testMem) ReadPhys(gpa uint64, buf []byte) error {
	if gpa >= uint64(len(m.b)) || uint64(len(buf)) > uint64(len(m.b))-gpa {
		return fmt.Errorf("gpa %#x+%d outside RAM", gpa, len(buf))
	}
	copy(buf, m.b[gpa:])
	return nil
}

func (m *testMem) get(gpa uint64) uint64      { return binary.LittleEndian.Uint64(m.b[gpa:]) }
func (m *testMem) set(gpa, v uint64)          { binary.LittleEndian.PutUint64(m.b[gpa:], v) }
func (m *testMem) alloc() uint64              { p := m.next; m.next += 0x1000; return p }
func idx(va uint64, level int) uint64         { return va >> (12 + 9*uint(level-1)) & 0x1ff }
func (m *testMem) newRoot() uint64            { return m.alloc() }
func (m *testMem) write(gpa uint64, b []byte) { copy(m.b[gpa:], b) }

// mapPage maps va to gpa with a leaf at level (1 = 4 KiB, 2 = 2 MiB,
// 3 = 1 GiB). Upper entries get upper flags, the leaf gets leaf flags.
func (m *testMem) mapPage(cr3, va, gpa uint64, level int, upper, leaf uint64) {
	table := cr3 &^ 0xfff
	for l := 4; l > level; l-- {
		e := table + idx(va, l)*8
		if m.get(e)&pteP == 0 {
			m.set(e, m.alloc()|upper)
		}
		table = m.get(e) & 0x000ffffffffff000
	}
	if level > 1 {
		leaf |= ptePS
	}
	m.set(table+idx(va, level)*8, gpa|leaf)
}

// entry returns the address of va's entry at level.
func (m *testMem) entry(cr3, va uint64, level int) uint64 {
	table := cr3 &^ 0xfff
	for l := 4; l > level; l-- {
		table = m.get(table+idx(va, l)*8) & 0x000ffffffffff000
	}
	return table + idx(va, level)*8
}

const (
	fP  = pteP
	fRW = pteRW
	fUS = pteUS
	fNX = uint64(pteNX)
	fUW = fP | fRW | fUS
)
