package backup

import (
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"

	"github.com/umbra-cc/umbra/disk/protdisk"
)

// Restore rebuilds, at out (which must not exist), the disk as it was at the last backup
// of the chain dirs. Every chunk is checked as it is written (Verify's checks); on any
// refusal out is removed. A raw or qcow2 disk comes back as a raw image of its
// guest-visible bytes; a protected disk as a protected image that opens with the VM's key
// and the returned root only.
func Restore(dirs []string, out string, opt VerifyOptions) (*Chain, error) {
	c, err := loadChain(dirs, opt)
	if err != nil {
		return nil, err
	}
	first := c.Backups[0].Manifest
	last := c.Backups[len(c.Backups)-1].Manifest
	if first.DiskFormat == FormatProtected {
		hdr, _ := base64.StdEncoding.DecodeString(first.Header)
		w, err := protdisk.CreateImage(out, hdr)
		if err != nil {
			return nil, err
		}
		err = c.walk(func(m *Manifest, ch Chunk, data []byte) error {
			return w.Put(uint64(ch.Offset/protdisk.BlockSize), data)
		})
		if err != nil {
			w.Abort()
			return nil, err
		}
		var root protdisk.Root
		if b, err := hex.DecodeString(last.Root); err == nil && len(b) == len(root) {
			copy(root[:], b)
		}
		if err := w.Finish(root); err != nil {
			return nil, err
		}
		return c, nil
	}
	f, err := os.OpenFile(out, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, fmt.Errorf("restore: %w", err)
	}
	err = f.Truncate(first.Size)
	if err == nil {
		err = c.walk(func(m *Manifest, ch Chunk, data []byte) error {
			_, err := f.WriteAt(data, ch.Offset)
			return err
		})
	}
	if err := closeDurably(f, out, err); err != nil {
		return nil, err
	}
	return c, nil
}

// closeDurably ends the writing of the new file f at path: after err == nil it is synced,
// closed and its directory synced; on any error it is closed and removed.
func closeDurably(f *os.File, path string, err error) error {
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = syncFiles(nil, filepath.Dir(path))
	}
	if err != nil {
		os.Remove(path)
	}
	return err
}
