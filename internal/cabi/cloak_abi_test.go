package cabi_test

import (
	"slices"
	"testing"

	"github.com/umbra-cc/umbra/appcontext"
	"github.com/umbra-cc/umbra/internal/cabi"
)

// The cloak ABI's Go side is package appcontext, whose files the cloak runtime's owner
// keeps; its header check by the compiler lives here so that it needs no change there.
const cloakHeader = "../../docs/cloak_abi.h"

// monitorOnly are the header's macros whose Go values are unexported constants of
// package monitor (callRelease, trampPark, trampTouch): monitor TestCloakABIHeader and
// TestCloakTrampolineActions compare them.
var monitorOnly = []string{"CLOAK_RELEASE", "CLOAK_ACT_PARK", "CLOAK_ACT_TOUCH"}

// TestCloakHeaderConstants: gcc computes every CLOAK_ macro and enumerator of
// docs/cloak_abi.h, which the in-guest shim compiles against, and each equals
// appcontext's; the header defines nothing this test does not know.
func TestCloakHeaderConstants(t *testing.T) {
	h := cabi.Read(t, cloakHeader, "CLOAK_")
	want := map[string]int64{
		"CLOAK_REGISTER": appcontext.CallRegister, "CLOAK_REGION_ADD": appcontext.CallRegionAdd,
		"CLOAK_REGION_REMOVE": appcontext.CallRegionRemove, "CLOAK_EXIT": appcontext.CallExit,
		"CLOAK_RESUME":    appcontext.CallResume,
		"CLOAK_REQ_MAGIC": appcontext.RequestMagic, "CLOAK_REQ_VERSION": appcontext.RequestVersion,
		"CLOAK_MAX_SEGMENTS": appcontext.MaxSegments, "CLOAK_MAX_REGIONS": appcontext.MaxRegions,
		"CLOAK_MAX_IMAGE_BYTES": appcontext.MaxImageBytes, "CLOAK_MIN_BOUNCE": appcontext.MinBounceSize,
		"CLOAK_MAX_BOUNCE": appcontext.MaxBounceSize, "CLOAK_USER_TOP": appcontext.UserTop,
		"CLOAK_NAME_SIZE": appcontext.NameSize,
	}
	h.CheckMacros(t, want, monitorOnly)
	for _, name := range monitorOnly {
		if _, ok := h.Macros[name]; !ok {
			t.Errorf("header lacks %s", name)
		}
	}
	if len(h.Others) != 0 || len(h.FuncMacros) != 0 {
		t.Errorf("header macros that are not integer constants: %v %v", h.Others, h.FuncMacros)
	}
	enums := map[string]int64{
		"CLOAK_SEG_CODE": int64(appcontext.SegmentCode), "CLOAK_SEG_DATA": int64(appcontext.SegmentData),
		"CLOAK_REGION_IMAGE": int64(appcontext.RegionImage), "CLOAK_REGION_HEAP": int64(appcontext.RegionHeap),
		"CLOAK_REGION_STACK": int64(appcontext.RegionStack), "CLOAK_REGION_ANON": int64(appcontext.RegionAnon),
	}
	for name, w := range enums {
		if v, ok := h.Enums[name]; !ok || v != w {
			t.Errorf("enumerator %s = %d (present %v), appcontext says %d", name, v, ok, w)
		}
	}
	for name := range h.Enums {
		if _, ok := enums[name]; !ok {
			t.Errorf("header enumerator %s unknown to this test", name)
		}
	}
}

// TestCloakHeaderLayouts: the request gcc lays out, filled in C by field name, is the
// request appcontext decodes; the structs have the sizes appcontext reads and no
// padding.
func TestCloakHeaderLayouts(t *testing.T) {
	h := cabi.Read(t, cloakHeader, "CLOAK_")
	h.CheckSizes(t, map[string]int64{"cloak_register_req": appcontext.HeaderSize, "cloak_segment": appcontext.SegmentSize, "cloak_region": appcontext.RegionSize})
	total := uint64(appcontext.HeaderSize + appcontext.SegmentSize + 2*appcontext.RegionSize)
	hdr := map[string]any{
		"magic": uint64(appcontext.RequestMagic), "version": uint64(appcontext.RequestVersion), "header_size": uint64(appcontext.HeaderSize),
		"total_size": total, "nr_segments": uint64(1), "nr_regions": uint64(2),
		"trampoline_va": uint64(0x7000), "bounce_va": uint64(0x9000), "bounce_size": uint64(0x2000), "name": "abi-test.1",
	}
	seg := map[string]any{"va": uint64(0x400123), "size": uint64(0x777), "kind": uint64(appcontext.SegmentData)}
	img := map[string]any{"va": uint64(0x400000), "size": uint64(0x2000), "kind": uint64(appcontext.RegionImage)}
	heap := map[string]any{"va": uint64(0x600000), "size": uint64(0x10000), "kind": uint64(appcontext.RegionHeap)}
	encode := func(hdr, seg, img, heap map[string]any) []byte {
		return slices.Concat(cabi.Encode(t, h, "cloak_register_req", hdr), cabi.Encode(t, h, "cloak_segment", seg),
			cabi.Encode(t, h, "cloak_region", img), cabi.Encode(t, h, "cloak_region", heap))
	}
	req, err := appcontext.DecodeRegisterRequest(encode(hdr, seg, img, heap))
	if err != nil {
		t.Fatal(err)
	}
	want := &appcontext.RegisterRequest{
		Name: "abi-test.1", Trampoline: 0x7000, BounceVA: 0x9000, BounceSize: 0x2000,
		Segments: []appcontext.Segment{{VA: 0x400123, Size: 0x777, Kind: appcontext.SegmentData}},
		Regions:  []appcontext.Region{{VA: 0x400000, Size: 0x2000, Kind: appcontext.RegionImage}, {VA: 0x600000, Size: 0x10000, Kind: appcontext.RegionHeap}},
	}
	if req.Name != want.Name || req.Trampoline != want.Trampoline || req.BounceVA != want.BounceVA || req.BounceSize != want.BounceSize ||
		!slices.Equal(req.Segments, want.Segments) || !slices.Equal(req.Regions, want.Regions) {
		t.Fatalf("the request filled in C decodes to %+v, want %+v", req, want)
	}
	// Fields the decoder requires to be zero, set in C by name, are refused: Go
	// reads them where gcc puts them.
	with := func(m map[string]any, k string, v any) map[string]any {
		c := map[string]any{}
		for kk, vv := range m {
			c[kk] = vv
		}
		c[k] = v
		return c
	}
	for _, c := range []struct {
		name                string
		hdr, seg, img, heap map[string]any
	}{
		{"header flags", with(hdr, "flags", uint64(1)), seg, img, heap},
		{"segment flags", hdr, with(seg, "flags", uint64(1)), img, heap},
		{"segment reserved", hdr, with(seg, "reserved", uint64(1)), img, heap},
		{"region flags", hdr, seg, with(img, "flags", uint64(1)), heap},
		{"region reserved", hdr, seg, img, with(heap, "reserved", uint64(1))},
	} {
		if _, err := appcontext.DecodeRegisterRequest(encode(c.hdr, c.seg, c.img, c.heap)); err == nil {
			t.Errorf("%s set in C was accepted", c.name)
		}
	}
}
