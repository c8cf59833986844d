package cabi_test

import (
	"encoding/binary"
	"path/filepath"
	"slices"
	"testing"

	"github.com/umbra-cc/umbra/internal/cabi"
)

func TestReadSample(t *testing.T) {
	h := cabi.Read(t, "testdata/sample.h", "S_")
	want := map[string]int64{"S_ANSWER": 42, "S_SHIFTED": 64 << 20, "S_NEG": -2, "S_BIG": 1 << 47}
	if len(h.Macros) != len(want) {
		t.Errorf("macros %v, want %v", h.Macros, want)
	}
	for k, v := range want {
		if h.Macros[k] != v {
			t.Errorf("%s = %d, want %d", k, h.Macros[k], v)
		}
	}
	if !slices.Equal(h.Others, []string{"S_NAME"}) || !slices.Equal(h.FuncMacros, []string{"S_FIELD"}) {
		t.Errorf("others %v, function-like %v", h.Others, h.FuncMacros)
	}
	if h.Enums["S_KIND_A"] != 1 || h.Enums["S_KIND_B"] != 5 {
		t.Errorf("enums %v", h.Enums)
	}
	tight := h.Structs["s_tight"]
	wantFields := []cabi.Field{{Name: "a", Size: 4}, {Name: "b", Offset: 4, Size: 2}, {Name: "c", Offset: 6, Size: 2}, {Name: "d", Offset: 8, Size: 8}, {Name: "name", Offset: 16, Size: 8, Array: 8}}
	if tight.Size != 24 || !slices.Equal(tight.Fields, wantFields) || tight.Gaps() != nil {
		t.Errorf("s_tight = %+v, gaps %v", tight, tight.Gaps())
	}
	padded := h.Structs["s_padded"]
	if g := padded.Gaps(); !slices.Equal(g, []string{"[1,8)", "[18,24)"}) {
		t.Errorf("s_padded gaps %v", g)
	}
	if v, err := cabi.Eval(t, h, "S_FIELD(0x1234)"); err != nil || v != 0x34 {
		t.Errorf("S_FIELD(0x1234) = %d, %v", v, err)
	}
	if _, err := cabi.Eval(t, h, "S_NAME"); err == nil {
		t.Error("a string macro evaluated as an integer")
	}
}

func TestEncodeDecodeSample(t *testing.T) {
	h := cabi.Read(t, "testdata/sample.h", "S_")
	b := cabi.Encode(t, h, "s_tight", map[string]any{"a": uint64(0x11223344), "c": uint64(0xbeef), "d": uint64(1 << 40), "name": "abc"})
	le := binary.LittleEndian
	if le.Uint32(b) != 0x11223344 || le.Uint16(b[4:]) != 0 || le.Uint16(b[6:]) != 0xbeef || le.Uint64(b[8:]) != 1<<40 || string(b[16:19]) != "abc" || b[19] != 0 {
		t.Fatalf("encoded % x", b)
	}
	m := cabi.Decode(t, h, "s_tight", b)
	if m["a"] != uint64(0x11223344) || m["b"] != uint64(0) || m["c"] != uint64(0xbeef) || m["d"] != uint64(1<<40) || string(m["name"].([]byte)[:3]) != "abc" {
		t.Fatalf("decoded %v", m)
	}
}

// TestEveryABIHeaderIsChecked: each guest ABI header in docs has a test that compiles
// it and compares it with its Go side; a new header must get one.
func TestEveryABIHeaderIsChecked(t *testing.T) {
	checked := map[string]string{
		"cloak_abi.h":    "internal/cabi TestCloakHeaderConstants, TestCloakHeaderLayouts",
		"pageprot_abi.h": "pageprot TestCHeaderMatches, TestCStructLayouts",
	}
	headers, err := filepath.Glob("../../docs/*_abi.h")
	if err != nil {
		t.Fatal(err)
	}
	if len(headers) == 0 {
		t.Fatal("no docs/*_abi.h found")
	}
	for _, h := range headers {
		if _, ok := checked[filepath.Base(h)]; !ok {
			t.Errorf("%s has no test checking it against its Go side by the compiler (see internal/cabi)", h)
		}
	}
}
