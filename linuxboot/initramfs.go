package linuxboot

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"strconv"
)

// MaxInitramfsUnpacked bounds how many bytes CheckInitramfs decompresses.
const MaxInitramfsUnpacked = 1 << 30

// Compressed formats Linux can unpack but this package cannot check, by magic.
var uncheckedFormats = []struct {
	magic []byte
	name  string
}{
	{[]byte{0xfd, '7', 'z', 'X', 'Z', 0}, "xz"},
	{[]byte{0x28, 0xb5, 0x2f, 0xfd}, "zstd"},
	{[]byte{0x02, 0x21, 0x4c, 0x18}, "lz4"},
	{[]byte("BZh"), "bzip2"},
	{[]byte{0x5d, 0, 0}, "lzma"},
	{[]byte{0x89, 'L', 'Z', 'O'}, "lzo"},
}

// CheckInitramfs checks that b is an initramfs the monitor can vouch for: a newc cpio
// archive (magic 070701 or 070702), plain or gzip-compressed, whose headers are well
// formed up to its TRAILER!!! entry. It returns the format found.
func CheckInitramfs(b []byte) (string, error) {
	if len(b) == 0 {
		return "", errors.New("initramfs is empty")
	}
	if len(b) >= 2 && b[0] == 0x1f && b[1] == 0x8b {
		zr, err := gzip.NewReader(bytes.NewReader(b))
		if err != nil {
			return "", fmt.Errorf("initramfs: gzip header: %w", err)
		}
		zr.Multistream(false)
		n, err := checkCpio(bufio.NewReader(io.LimitReader(zr, MaxInitramfsUnpacked)))
		if err != nil {
			return "", fmt.Errorf("initramfs (gzip): %w", err)
		}
		if _, err := io.Copy(io.Discard, io.LimitReader(zr, int64(MaxInitramfsUnpacked-n))); err != nil {
			return "", fmt.Errorf("initramfs (gzip) after the archive: %w", err)
		}
		return "gzip newc cpio", nil
	}
	for _, f := range uncheckedFormats {
		if bytes.HasPrefix(b, f.magic) {
			return "", fmt.Errorf("initramfs is %s-compressed; umbra checks plain and gzip-compressed newc cpio archives only: recompress it with gzip", f.name)
		}
	}
	if _, err := checkCpio(bufio.NewReader(bytes.NewReader(b))); err != nil {
		return "", fmt.Errorf("initramfs: %w", err)
	}
	return "newc cpio", nil
}

const cpioHeaderLen = 110

// checkCpio reads newc cpio entries up to TRAILER!!! and returns the bytes consumed.
func checkCpio(r *bufio.Reader) (uint64, error) {
	var off uint64
	var hdr [cpioHeaderLen]byte
	for entry := 0; ; entry++ {
		if _, err := io.ReadFull(r, hdr[:]); err != nil {
			if entry == 0 {
				return off, fmt.Errorf("not a newc cpio archive: %w", err)
			}
			return off, fmt.Errorf("entry %d at offset %d: header truncated (no TRAILER!!! entry)", entry, off)
		}
		if m := string(hdr[:6]); m != "070701" && m != "070702" {
			if entry == 0 {
				return off, fmt.Errorf("not a newc cpio archive (magic %q, want 070701 or 070702)", hdr[:6])
			}
			return off, fmt.Errorf("entry %d at offset %d: bad magic %q", entry, off, hdr[:6])
		}
		var fields [13]uint64
		for i := range fields {
			v, err := strconv.ParseUint(string(hdr[6+8*i:14+8*i]), 16, 32)
			if err != nil {
				return off, fmt.Errorf("entry %d at offset %d: header field %d is not hex: %q", entry, off, i, hdr[6+8*i:14+8*i])
			}
			fields[i] = v
		}
		fileSize, nameSize := fields[6], fields[11]
		if nameSize == 0 || nameSize > 4096 {
			return off, fmt.Errorf("entry %d at offset %d: name size %d (want 1-4096)", entry, off, nameSize)
		}
		name := make([]byte, nameSize)
		if _, err := io.ReadFull(r, name); err != nil {
			return off, fmt.Errorf("entry %d at offset %d: name truncated", entry, off)
		}
		if name[nameSize-1] != 0 {
			return off, fmt.Errorf("entry %d at offset %d: name is not NUL-terminated", entry, off)
		}
		off += cpioHeaderLen + nameSize
		pad := (4 - off%4) % 4
		if _, err := r.Discard(int(pad)); err != nil {
			return off, fmt.Errorf("entry %d (%q): padding truncated", entry, name[:nameSize-1])
		}
		off += pad
		if string(name[:nameSize-1]) == "TRAILER!!!" {
			return off, nil
		}
		dataPad := (4 - fileSize%4) % 4
		n, err := io.CopyN(io.Discard, r, int64(fileSize+dataPad))
		off += uint64(n)
		if err != nil {
			return off, fmt.Errorf("entry %d (%q): %d bytes of data truncated", entry, name[:nameSize-1], fileSize)
		}
	}
}
