package snapshot

import (
	"fmt"
	"strings"
)

// PageRange is the pages [First, First+Count).
type PageRange struct {
	First, Count uint64
}

func (r PageRange) String() string {
	if r.Count == 1 {
		return fmt.Sprintf("%#x", r.First)
	}
	return fmt.Sprintf("%#x-%#x", r.First, r.First+r.Count-1)
}

// DiffResult is what changed from one snapshot chain to another, page by page.
type DiffResult struct {
	Added   []PageRange // pages B has and A does not
	Removed []PageRange // pages A has and B does not
	Changed []PageRange // pages both have, with different contents
	// Compared is how many pages both have; Decrypted how many of them had to be read
	// (pages both chains take from the same block of the same open Reader are equal
	// without reading; chains built from separately opened files are compared in full).
	Compared, Decrypted uint64
}

// ChangedPages returns how many pages were added, removed or changed.
func (d *DiffResult) ChangedPages() (added, removed, changed uint64) {
	count := func(rs []PageRange) (n uint64) {
		for _, r := range rs {
			n += r.Count
		}
		return n
	}
	return count(d.Added), count(d.Removed), count(d.Changed)
}

// String lists the ranges, one kind per line, as `umbra snapshot diff` prints them.
func (d *DiffResult) String() string {
	var sb strings.Builder
	a, r, c := d.ChangedPages()
	fmt.Fprintf(&sb, "added %d pages, removed %d, changed %d (of %d in both)\n", a, r, c, d.Compared)
	for _, l := range []struct {
		sign   string
		ranges []PageRange
	}{{"+", d.Added}, {"-", d.Removed}, {"~", d.Changed}} {
		for _, pr := range l.ranges {
			fmt.Fprintf(&sb, "%s %s\n", l.sign, pr)
		}
	}
	return sb.String()
}

func appendPage(rs []PageRange, page uint64) []PageRange {
	if n := len(rs); n > 0 && rs[n-1].First+rs[n-1].Count == page {
		rs[n-1].Count++
		return rs
	}
	return append(rs, PageRange{First: page, Count: 1})
}

// Diff compares the guest memory two chains describe. Every block it reads is
// authenticated first, so a tampered snapshot fails the diff rather than skewing it.
func Diff(a, b *Chain) (*DiffResult, error) {
	d := &DiffResult{}
	pa, pb := a.pageSet(), b.pageSet()
	ca, cb := &blockCache{}, &blockCache{}
	i, j := 0, 0
	for i < len(pa) || j < len(pb) {
		switch {
		case j == len(pb) || (i < len(pa) && pa[i] < pb[j]):
			d.Removed = appendPage(d.Removed, pa[i])
			i++
		case i == len(pa) || pb[j] < pa[i]:
			d.Added = appendPage(d.Added, pb[j])
			j++
		default:
			page := pa[i]
			i++
			j++
			d.Compared++
			ra, ba, _ := a.Resolve(page)
			rb, bb, _ := b.Resolve(page)
			if ra == rb && ba.Index == bb.Index { // the same block of the same open file
				continue
			}
			d.Decrypted++
			pageA, err := ca.page(ra, ba, page)
			if err != nil {
				return nil, fmt.Errorf("diff: %w", err)
			}
			pageB, err := cb.page(rb, bb, page)
			if err != nil {
				return nil, fmt.Errorf("diff: %w", err)
			}
			if !samePage(pageA, pageB) {
				d.Changed = appendPage(d.Changed, page)
			}
		}
	}
	return d, nil
}

// blockCache keeps the last storage block read, so a diff decrypts each block once.
type blockCache struct {
	r     *Reader
	index int
	data  []byte
}

func (c *blockCache) page(r *Reader, b BlockInfo, page uint64) ([]byte, error) {
	if c.r != r || c.index != b.Index || c.data == nil {
		data, err := r.ReadBlock(b, c.data)
		if err != nil {
			return nil, err
		}
		c.r, c.index, c.data = r, b.Index, data
	}
	i := packedIndex(b.Mask, page-b.FirstPage)
	return c.data[i*PageSize : (i+1)*PageSize], nil
}
