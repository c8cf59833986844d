package snapshot

import (
	"bytes"
	"fmt"
	"io"
)

// Reseal copies the snapshot r into w sealed under newKey: the administrator's way to
// move a snapshot to another host (docs/snapshot.md §4.5). It keeps the snapshot's ID,
// parent, generation, block size, compression and sections, so the links of an
// incremental chain resealed snapshot by snapshot still hold. Every block is
// authenticated as it is read; nothing of a block that fails is written. The same ID
// under another key gets another data key, so no nonce is reused.
func Reseal(r *Reader, w io.Writer, newKey []byte) (Info, error) {
	in := r.Info()
	if id, err := KeyID(newKey); err != nil {
		return Info{}, err
	} else if id == r.hdr.KeyID && bytes.Equal(newKey, r.key) {
		return Info{}, fmt.Errorf("snapshot reseal: %s is already sealed under this key", in.ID)
	}
	opt := Options{PagesPerBlock: in.PagesPerBlock, Compress: in.Compressed, Generation: in.Generation, id: in.ID}
	if !in.Parent.IsZero() {
		opt.Parent = &Info{ID: in.Parent, Generation: in.ParentGeneration, PagesPerBlock: in.PagesPerBlock}
	}
	sw, err := NewWriter(w, newKey, opt)
	if err != nil {
		return Info{}, fmt.Errorf("snapshot reseal: %w", err)
	}
	if err := r.EachPage(sw.AddPage); err != nil {
		return Info{}, fmt.Errorf("snapshot reseal of %s: %w", in.ID, err)
	}
	for _, s := range r.sections {
		if err := sw.AddSection(s.Kind, s.Name, s.Data); err != nil {
			return Info{}, fmt.Errorf("snapshot reseal: %w", err)
		}
	}
	return sw.Close()
}
