package backup

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
)

// ExportQcow2 writes the last backup of the chain dirs as a qcow2 (version 3) image at
// out, for tools that speak qcow2 (qemu-img, QEMU): the chunks that backup holds become
// its clusters (all-zero ones as zero clusters, reading as zeros whatever the backing
// holds), and backing, when given, names the image the rest reads from (the chain up to
// the backup before, restored as raw). Every chunk is verified as for Restore. A
// protected disk's backup is not exported: it is ciphertext, readable only through the
// VM's key.
func ExportQcow2(dirs []string, out, backing string, opt VerifyOptions) (*Chain, error) {
	c, err := loadChain(dirs, opt)
	if err != nil {
		return nil, err
	}
	last := c.Backups[len(c.Backups)-1].Manifest
	switch {
	case last.DiskFormat == FormatProtected:
		return nil, errors.New("export: a protected disk's backup holds only ciphertext; restore it (umbra backup restore) to get an image that opens with the VM's key")
	case last.ChunkSize < 512 || last.ChunkSize > 2<<20:
		return nil, fmt.Errorf("export: chunk size %d is not a qcow2 cluster size", last.ChunkSize)
	case last.Kind == KindIncremental && backing == "":
		return nil, errors.New("export: an incremental backup's overlay needs the image of the chain before it as --backing (umbra backup restore of the earlier backups)")
	case len(backing) > 1023:
		return nil, errors.New("export: the backing file's name is longer than qcow2 allows")
	}
	q := newQcow2Layout(last, backing)
	f, err := os.OpenFile(out, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return nil, fmt.Errorf("export: %w", err)
	}
	err = c.walk(func(m *Manifest, ch Chunk, data []byte) error {
		if m != last {
			return nil
		}
		return q.put(f, ch, data)
	})
	if err == nil {
		err = q.finish(f)
	}
	if err := closeDurably(f, out, err); err != nil {
		return nil, err
	}
	return c, nil
}

const (
	qcowMagic        = 0x514649fb
	qcowHeaderLen    = 104
	qcowExtBackingFm = 0xe2792aca
	qcowCopied       = uint64(1) << 63
	qcowZero         = 1
)

// qcow2Layout places an image's metadata before its data clusters: the header (cluster
// 0), the L1 table, the refcount table, the refcount blocks and the L2 tables, sized for
// the chunks the manifest lists; the data clusters follow in the order they come.
type qcow2Layout struct {
	m                *Manifest
	backing          string
	cs               int64
	l1Off, l1Size    int64
	rtOff, rtClust   int64
	rbOff, rbCount   int64
	l2Off            map[int64]int64 // L1 index -> its L2 table's offset
	l2               map[int64][]uint64
	next             int64 // the next free cluster's offset
	used             int64 // clusters in use
	perL2, perRBlock int64
}

func newQcow2Layout(m *Manifest, backing string) *qcow2Layout {
	cs := m.ChunkSize
	q := &qcow2Layout{m: m, backing: backing, cs: cs, l2Off: map[int64]int64{}, l2: map[int64][]uint64{},
		perL2: cs / 8, perRBlock: cs / 2}
	q.l1Size = (m.Size + cs*q.perL2 - 1) / (cs * q.perL2)
	l1Clusters := (q.l1Size*8 + cs - 1) / cs
	var l2s []int64
	for _, ch := range m.Chunks {
		i := ch.Offset / cs / q.perL2
		if len(l2s) == 0 || l2s[len(l2s)-1] != i {
			l2s = append(l2s, i)
		}
	}
	// Clusters: header, L1, refcount table, refcount blocks, L2 tables, data (at most
	// one per chunk); the refcount blocks must count themselves.
	fixed := 1 + l1Clusters + int64(len(l2s)) + int64(len(m.Chunks))
	for {
		rb := (fixed + q.rtClust + q.rbCount + q.perRBlock - 1) / q.perRBlock
		rt := (rb*8 + cs - 1) / cs
		if rb == q.rbCount && rt == q.rtClust {
			break
		}
		q.rbCount, q.rtClust = rb, rt
	}
	q.l1Off = cs
	q.rtOff = q.l1Off + l1Clusters*cs
	q.rbOff = q.rtOff + q.rtClust*cs
	off := q.rbOff + q.rbCount*cs
	for _, i := range l2s {
		q.l2Off[i] = off
		q.l2[i] = make([]uint64, q.perL2)
		off += cs
	}
	q.next = off
	q.used = off / cs
	return q
}

func (q *qcow2Layout) put(f *os.File, ch Chunk, data []byte) error {
	c := ch.Offset / q.cs
	l2 := q.l2[c/q.perL2]
	if l2 == nil {
		return fmt.Errorf("export: chunk at %d is not in the manifest's layout", ch.Offset)
	}
	if bytes.Count(data, []byte{0}) == len(data) {
		l2[c%q.perL2] = qcowZero
		return nil
	}
	buf := data
	if int64(len(buf)) < q.cs {
		buf = append(append([]byte(nil), data...), make([]byte, q.cs-int64(len(data)))...)
	}
	if _, err := f.WriteAt(buf, q.next); err != nil {
		return fmt.Errorf("export: %w", err)
	}
	l2[c%q.perL2] = uint64(q.next) | qcowCopied
	q.next += q.cs
	q.used++
	return nil
}

// finish writes the header, the tables and the refcounts (1 for every cluster in use).
func (q *qcow2Layout) finish(f *os.File) error {
	cs := q.cs
	hdr := make([]byte, cs)
	be := binary.BigEndian
	be.PutUint32(hdr[0:], qcowMagic)
	be.PutUint32(hdr[4:], 3)
	bits := uint32(0)
	for int64(1)<<bits < cs {
		bits++
	}
	be.PutUint32(hdr[20:], bits)
	be.PutUint64(hdr[24:], uint64(q.m.Size))
	be.PutUint32(hdr[36:], uint32(q.l1Size))
	be.PutUint64(hdr[40:], uint64(q.l1Off))
	be.PutUint64(hdr[48:], uint64(q.rtOff))
	be.PutUint32(hdr[56:], uint32(q.rtClust))
	be.PutUint32(hdr[96:], 4) // 16-bit refcounts
	be.PutUint32(hdr[100:], qcowHeaderLen)
	pos := qcowHeaderLen
	if q.backing != "" {
		be.PutUint32(hdr[pos:], qcowExtBackingFm)
		be.PutUint32(hdr[pos+4:], 3)
		copy(hdr[pos+8:], "raw")
		pos += 16
	}
	pos += 8 // the end of the extensions (type 0, length 0)
	if q.backing != "" {
		be.PutUint64(hdr[8:], uint64(pos))
		be.PutUint32(hdr[16:], uint32(len(q.backing)))
		copy(hdr[pos:], q.backing)
	}
	if _, err := f.WriteAt(hdr, 0); err != nil {
		return err
	}
	l1 := make([]byte, q.rtOff-q.l1Off)
	for i, off := range q.l2Off {
		be.PutUint64(l1[i*8:], uint64(off)|qcowCopied)
		t := make([]byte, cs)
		for k, e := range q.l2[i] {
			be.PutUint64(t[k*8:], e)
		}
		if _, err := f.WriteAt(t, off); err != nil {
			return err
		}
	}
	if _, err := f.WriteAt(l1, q.l1Off); err != nil {
		return err
	}
	rt := make([]byte, q.rtClust*cs)
	rb := make([]byte, q.rbCount*cs)
	for k := range q.rbCount {
		be.PutUint64(rt[k*8:], uint64(q.rbOff+k*cs))
	}
	for c := range q.used {
		be.PutUint16(rb[c*2:], 1)
	}
	if _, err := f.WriteAt(rt, q.rtOff); err != nil {
		return err
	}
	if _, err := f.WriteAt(rb, q.rbOff); err != nil {
		return err
	}
	return f.Truncate(q.next)
}
