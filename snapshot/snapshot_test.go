package snapshot

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
)

func testKey(seed byte) []byte { return bytes.Repeat([]byte{seed}, KeySize) }

// pageContent is a deterministic page: a marker naming the page and version, then
// either pseudo-random bytes (incompressible), a repeating pattern, or zeros.
func pageContent(page uint64, version int) []byte {
	p := make([]byte, PageSize)
	copy(p, fmt.Sprintf("PLAINTEXT-MARKER page %d v%d;", page, version))
	switch page % 3 {
	case 0:
		r := rand.New(rand.NewPCG(page, uint64(version)))
		for i := 64; i < PageSize; i += 8 {
			binary.LittleEndian.PutUint64(p[i:], r.Uint64())
		}
	case 1:
		for i := 64; i < PageSize; i++ {
			p[i] = byte(i % 7)
		}
	}
	return p
}

type page struct {
	n    uint64
	data []byte
}

func pagesOf(version int, nums ...uint64) []page {
	out := make([]page, len(nums))
	for i, n := range nums {
		out[i] = page{n, pageContent(n, version)}
	}
	return out
}

func span(first, count uint64) []uint64 {
	out := make([]uint64, count)
	for i := range out {
		out[i] = first + uint64(i)
	}
	return out
}

func write(t testing.TB, key []byte, opt Options, pages []page, sections ...Section) ([]byte, Info) {
	t.Helper()
	var buf bytes.Buffer
	w, err := NewWriter(&buf, key, opt)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range pages {
		if err := w.AddPage(p.n, p.data); err != nil {
			t.Fatal(err)
		}
	}
	for _, s := range sections {
		if err := w.AddSection(s.Kind, s.Name, s.Data); err != nil {
			t.Fatal(err)
		}
	}
	info, err := w.Close()
	if err != nil {
		t.Fatal(err)
	}
	if info.Size != int64(buf.Len()) {
		t.Fatalf("Info.Size %d, wrote %d bytes", info.Size, buf.Len())
	}
	return buf.Bytes(), info
}

func open(t testing.TB, file []byte, key []byte) *Reader {
	t.Helper()
	r, err := Open(bytes.NewReader(file), int64(len(file)), key)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

var testSections = []Section{
	{Kind: SectionVCPU, Name: "vcpu/0", Data: []byte("registers of vCPU 0")},
	{Kind: SectionVCPU, Name: "vcpu/1", Data: bytes.Repeat([]byte{7}, 5000)},
	{Kind: SectionDevice, Name: "bus/uart0", Data: nil},
}

func TestRoundTrip(t *testing.T) {
	// Sparse guest memory: a run crossing blocks, a partial block, a lone far page,
	// and pages of one block given out of order.
	nums := append(span(0, 200), span(1000, 11)...)
	nums = append(nums, 1<<30, 5003, 5001, 5002)
	for _, tt := range []struct {
		ppb      int
		compress bool
	}{{64, false}, {64, true}, {1, false}, {16, true}, {0, true}} {
		t.Run(fmt.Sprintf("ppb%d-zstd%v", tt.ppb, tt.compress), func(t *testing.T) {
			key := testKey(1)
			pages := pagesOf(1, nums...)
			file, info := write(t, key, Options{PagesPerBlock: tt.ppb, Compress: tt.compress, Generation: 7}, pages, testSections...)
			r := open(t, file, key)
			got := r.Info()
			if got.ID != info.ID || got.Generation != 7 || got.Pages != uint64(len(nums)) || got.Blocks != info.Blocks || !got.Parent.IsZero() {
				t.Fatalf("Info = %+v, writer said %+v", got, info)
			}
			if err := r.Verify(); err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, PageSize)
			for _, p := range pages {
				ok, err := r.ReadPage(p.n, buf)
				if err != nil || !ok || !bytes.Equal(buf, p.data) {
					t.Fatalf("page %d: ok %v err %v equal %v", p.n, ok, err, bytes.Equal(buf, p.data))
				}
			}
			for _, absent := range []uint64{200, 999, 1011, 5000, 1<<30 + 1, 1 << 39} {
				if ok, err := r.ReadPage(absent, buf); ok || err != nil {
					t.Fatalf("absent page %d: ok %v err %v", absent, ok, err)
				}
			}
			secs := r.Sections()
			if len(secs) != len(testSections) {
				t.Fatalf("%d sections, want %d", len(secs), len(testSections))
			}
			for i, s := range secs {
				if s.Kind != testSections[i].Kind || s.Name != testSections[i].Name || !bytes.Equal(s.Data, testSections[i].Data) {
					t.Fatalf("section %d = %d %q (%d bytes)", i, s.Kind, s.Name, len(s.Data))
				}
			}
			if d, ok := r.Section(SectionVCPU, "vcpu/0"); !ok || string(d) != "registers of vCPU 0" {
				t.Fatalf("Section(vcpu/0) = %q, %v", d, ok)
			}
			var zstdBlocks int
			for _, b := range r.Blocks() {
				if b.Zstd {
					zstdBlocks++
				}
			}
			if tt.compress != (zstdBlocks > 0) {
				t.Fatalf("compress %v but %d blocks are zstd", tt.compress, zstdBlocks)
			}
			// The host holding the file sees no page's plaintext.
			if bytes.Contains(file, []byte("PLAINTEXT-MARKER")) || bytes.Contains(file, []byte("registers of vCPU")) {
				t.Fatal("the snapshot file contains plaintext of a page or section")
			}
		})
	}
}

// TestLookupServesWholeBlock is what a lazy restore does on a fault: find the storage
// block of the faulting page and read all its pages at once.
func TestLookupServesWholeBlock(t *testing.T) {
	key := testKey(2)
	pages := pagesOf(1, span(128, 64)...)
	file, _ := write(t, key, Options{Compress: true, Generation: 1}, pages)
	r := open(t, file, key)
	b, ok := r.Lookup(150)
	if !ok || b.FirstPage != 128 || b.Pages() != 64 {
		t.Fatalf("Lookup(150) = %+v, %v", b, ok)
	}
	data, err := r.ReadBlock(b, make([]byte, 64*PageSize))
	if err != nil {
		t.Fatal(err)
	}
	for i, p := range pages {
		if !bytes.Equal(data[i*PageSize:(i+1)*PageSize], p.data) {
			t.Fatalf("page %d of the block differs", i)
		}
	}
}

func TestConcurrentReads(t *testing.T) {
	key := testKey(3)
	pages := pagesOf(1, span(0, 512)...)
	file, _ := write(t, key, Options{Compress: true, Generation: 1}, pages)
	r := open(t, file, key)
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			buf := make([]byte, PageSize)
			for i := g; i < len(pages); i += 8 {
				if ok, err := r.ReadPage(pages[i].n, buf); err != nil || !ok || !bytes.Equal(buf, pages[i].data) {
					errs <- fmt.Errorf("page %d: %v %v", pages[i].n, ok, err)
					return
				}
			}
		}(g)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

func TestIncrementalChainAndDiff(t *testing.T) {
	key := testKey(4)
	base, baseInfo := write(t, key, Options{Generation: 10}, pagesOf(1, span(0, 256)...))
	// The child stores pages 10, 11 and 100 changed, 300 new, and 200 rewritten with
	// the contents it had (dirtied but equal).
	childPages := append(pagesOf(2, 10, 11, 100), page{200, pageContent(200, 1)})
	childPages = append(childPages, pagesOf(2, 300)...)
	child, childInfo := write(t, key, Options{Generation: 11, Parent: &baseInfo, Compress: true}, childPages)
	rb, rc := open(t, base, key), open(t, child, key)
	if rc.Info().Parent != baseInfo.ID || rc.Info().ParentGeneration != 10 || childInfo.Pages != 5 {
		t.Fatalf("child Info %+v", rc.Info())
	}
	baseChain, err := NewChain(rb)
	if err != nil {
		t.Fatal(err)
	}
	chain, err := NewChain(rb, rc)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, PageSize)
	for _, c := range []struct {
		page    uint64
		version int
	}{{10, 2}, {12, 1}, {100, 2}, {255, 1}, {300, 2}, {200, 1}} {
		if ok, err := chain.ReadPage(c.page, buf); err != nil || !ok || !bytes.Equal(buf, pageContent(c.page, c.version)) {
			t.Fatalf("chain page %d: want version %d (ok %v, %v)", c.page, c.version, ok, err)
		}
	}
	d, err := Diff(baseChain, chain)
	if err != nil {
		t.Fatal(err)
	}
	want := &DiffResult{Added: []PageRange{{300, 1}}, Changed: []PageRange{{10, 2}, {100, 1}}, Compared: 256, Decrypted: 4}
	if fmt.Sprint(d) != fmt.Sprint(want) {
		t.Fatalf("diff:\n%v\nwant:\n%v", d, want)
	}
	if !strings.Contains(d.String(), "~ 0xa-0xb\n") || !strings.Contains(d.String(), "+ 0x12c\n") {
		t.Fatalf("diff text:\n%s", d)
	}
	back, err := Diff(chain, baseChain)
	if err != nil {
		t.Fatal(err)
	}
	if a, r, c := back.ChangedPages(); a != 0 || r != 1 || c != 3 {
		t.Fatalf("reverse diff added %d removed %d changed %d, want 0 1 3", a, r, c)
	}

	// A child is not accepted on a parent it was not taken against, nor alone.
	other, _ := write(t, key, Options{Generation: 10}, pagesOf(1, span(0, 4)...))
	if _, err := NewChain(open(t, other, key), rc); !errors.Is(err, ErrWrongParent) {
		t.Fatalf("chain on the wrong parent: %v, want ErrWrongParent", err)
	}
	if _, err := NewChain(rc); !errors.Is(err, ErrWrongParent) {
		t.Fatalf("chain of an incremental snapshot alone: %v, want ErrWrongParent", err)
	}
}

func TestWriterRefusesMisuse(t *testing.T) {
	key := testKey(5)
	newW := func(opt Options) *Writer {
		w, err := NewWriter(&bytes.Buffer{}, key, opt)
		if err != nil {
			t.Fatal(err)
		}
		return w
	}
	p := make([]byte, PageSize)
	w := newW(Options{Generation: 1})
	if err := w.AddPage(0, p[:100]); err == nil {
		t.Error("short page accepted")
	}
	if err := w.AddPage(MaxPageNumber, p); err == nil {
		t.Error("page beyond MaxPageNumber accepted")
	}
	if err := w.AddPage(3, p); err != nil {
		t.Fatal(err)
	}
	if err := w.AddPage(3, p); err == nil {
		t.Error("page given twice accepted")
	}
	if err := w.AddPage(64, p); err != nil {
		t.Fatal(err)
	}
	if err := w.AddPage(5, p); err == nil || !strings.Contains(err.Error(), "already written") {
		t.Errorf("page of a written block: %v", err)
	}
	for _, s := range []Section{{0, "x", nil}, {1, "", nil}, {1, "has space", nil}, {1, strings.Repeat("n", 65), nil}} {
		if err := w.AddSection(s.Kind, s.Name, nil); err == nil {
			t.Errorf("section %d %q accepted", s.Kind, s.Name)
		}
	}
	if err := w.AddSection(1, "a", nil); err != nil {
		t.Fatal(err)
	}
	if err := w.AddSection(1, "a", nil); err == nil {
		t.Error("repeated section accepted")
	}
	if _, err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if err := w.AddPage(200, p); err == nil {
		t.Error("AddPage after Close accepted")
	}

	for _, opt := range []Options{
		{PagesPerBlock: 65},
		{PagesPerBlock: -1},
		{Generation: 5, Parent: &Info{ID: ID{1}, Generation: 5, PagesPerBlock: 64}},
		{Generation: 6, Parent: &Info{ID: ID{1}, Generation: 5, PagesPerBlock: 16}},
		{Generation: 6, Parent: &Info{Generation: 5, PagesPerBlock: 64}},
	} {
		if _, err := NewWriter(&bytes.Buffer{}, key, opt); err == nil {
			t.Errorf("options %+v accepted", opt)
		}
	}
	if _, err := NewWriter(&bytes.Buffer{}, key[:16], Options{}); err == nil {
		t.Error("short key accepted")
	}
	fw := &failingWriter{after: HeaderSize + 10}
	w2, err := NewWriter(fw, key, Options{Generation: 1})
	if err != nil {
		t.Fatal(err)
	}
	if err := w2.AddPage(0, p); err != nil {
		t.Fatal(err)
	}
	if err := w2.AddPage(64, p); err == nil { // flushes block 0 into the failing writer
		t.Error("write error not reported")
	}
	if _, err := w2.Close(); err == nil {
		t.Error("Close after a write error succeeded")
	}
}

type failingWriter struct{ n, after int }

func (f *failingWriter) Write(b []byte) (int, error) {
	if f.n+len(b) > f.after {
		return 0, errors.New("disk full")
	}
	f.n += len(b)
	return len(b), nil
}
