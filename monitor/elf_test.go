package monitor

import (
	"encoding/binary"
)

// testELF builds a minimal ELF64 x86-64 executable with one RWX PT_LOAD segment holding
// code at guest-physical and virtual address vaddr (identity mapped at boot), and
// memsz bytes in memory (at least len(code)).
func testELF(code []byte, vaddr, memsz uint64) []byte {
	const codeOff = 0x1000
	if memsz < uint64(len(code)) {
		memsz = uint64(len(code))
	}
	img := make([]byte, codeOff+len(code))
	le := binary.LittleEndian
	copy(img, []byte{0x7f, 'E', 'L', 'F', 2, 1, 1})
	le.PutUint16(img[16:], 2)     // ET_EXEC
	le.PutUint16(img[18:], 62)    // EM_X86_64
	le.PutUint32(img[20:], 1)     // EV_CURRENT
	le.PutUint64(img[24:], vaddr) // e_entry
	le.PutUint64(img[32:], 64)    // e_phoff
	le.PutUint16(img[52:], 64)    // e_ehsize
	le.PutUint16(img[54:], 56)    // e_phentsize
	le.PutUint16(img[56:], 1)     // e_phnum
	le.PutUint16(img[58:], 64)    // e_shentsize
	ph := img[64:]
	le.PutUint32(ph[0:], 1)       // PT_LOAD
	le.PutUint32(ph[4:], 7)       // RWX
	le.PutUint64(ph[8:], codeOff) // p_offset
	le.PutUint64(ph[16:], vaddr)  // p_vaddr
	le.PutUint64(ph[24:], vaddr)  // p_paddr
	le.PutUint64(ph[32:], uint64(len(code)))
	le.PutUint64(ph[40:], memsz)
	le.PutUint64(ph[48:], 0x1000)
	copy(img[codeOff:], code)
	return img
}
