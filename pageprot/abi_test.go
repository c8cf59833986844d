package pageprot

import (
	"encoding/binary"
	"fmt"
	"slices"
	"testing"

	"github.com/umbra-cc/umbra/internal/cabi"
)

const abiHeader = "../docs/pageprot_abi.h"

// TestCHeaderMatches keeps docs/pageprot_abi.h, which the test guest compiles, in step
// with the Go constants: gcc evaluates every PP_ macro, and the header may define none
// the Go side does not know.
func TestCHeaderMatches(t *testing.T) {
	h := cabi.Read(t, abiHeader, "PP_")
	want := map[string]int64{
		"PP_VERSION_CAPS": CallVersionCaps, "PP_SET": CallSet, "PP_QUERY": CallQuery,
		"PP_SET_HANDLER": CallSetHandler, "PP_UPCALL_RETURN": CallUpcallReturn,
		"PP_VERSION_MAJOR": VersionMajor, "PP_VERSION_MINOR": VersionMinor,
		"PP_DENY_READ": int64(DenyRead), "PP_DENY_WRITE": int64(DenyWrite), "PP_DENY_EXEC": int64(DenyExec),
		"PP_ACT_NONE": int64(ActionNone), "PP_ACT_SKIP": int64(ActionSkip), "PP_ACT_INJECT_PF": int64(ActionInjectPF),
		"PP_ACT_INJECT_GP": int64(ActionInjectGP), "PP_ACT_KILL": int64(ActionKill), "PP_ACT_UPCALL": int64(ActionUpcall),
		"PP_ACT_LOG": int64(ActionLog), "PP_F_LOCK": FlagLock, "PP_F_PHYS": FlagPhys,
		"PP_BATCH_MAGIC": BatchMagic, "PP_MAX_ENTRIES": MaxEntries, "PP_MAX_PAGES_ENTRY": MaxPagesEntry,
		"PP_MAX_PAGES_BATCH": MaxPagesBatch, "PP_NO_INDEX": NoIndex, "PP_Q_LOCKED": QueryLocked,
		"PP_Q_OWNER_KERNEL": 1, "PP_Q_OWNER_CALLER": 2, "PP_Q_OWNER_OTHER": 3,
		"PP_VF_KERNEL": recFlagKernel, "PP_VF_ADDR_PHYS": recFlagAddrPhys, "PP_VF_VALUE": recFlagValue,
		"PP_VF_RIP_NEXT": recFlagRIPNext, "PP_RET_RESUME": ReturnResume, "PP_RET_KILL": ReturnKill,
	}
	h.CheckMacros(t, want, nil)
	if len(h.Others) != 0 {
		t.Errorf("header macros that are not integer constants: %v", h.Others)
	}

	// The accessor macros, evaluated by gcc on words the Go side builds.
	caps := Caps{Deny: DenyRead | DenyExec, Actions: 0x5a, Flags: FlagLock}.Word()
	q := uint64(DenyWrite) | uint64(ActionUpcall)<<8 | QueryLocked | 3<<QueryOwnerShift | uint64(0x7654321)<<QueryIDShift
	accessors := map[string]struct {
		word uint64
		want int64
	}{
		"PP_CAPS_DENY": {uint64(caps), int64(DenyRead | DenyExec)}, "PP_CAPS_ACTIONS": {uint64(caps), 0x5a},
		"PP_CAPS_FLAGS": {uint64(caps), FlagLock}, "PP_CAPS_MINOR": {uint64(caps), VersionMinor},
		"PP_CAPS_MAJOR": {uint64(caps), VersionMajor},
		"PP_Q_DENY":     {q, int64(DenyWrite)}, "PP_Q_ACTION": {q, int64(ActionUpcall)}, "PP_Q_OWNER": {q, 3},
		"PP_Q_ID": {q, 0x7654321},
	}
	for _, name := range h.FuncMacros {
		a, ok := accessors[name]
		if !ok {
			t.Errorf("header defines accessor %s(), unknown to this test", name)
			continue
		}
		got, err := cabi.Eval(t, h, fmt.Sprintf("%s(%#xull)", name, a.word))
		if err != nil {
			t.Errorf("%s: %v", name, err)
		} else if got != a.want {
			t.Errorf("%s(%#x) = %#x in C, the Go side packs %#x", name, a.word, got, a.want)
		}
	}
	if len(h.FuncMacros) != len(accessors) {
		t.Errorf("header accessors %v, the test knows %d", h.FuncMacros, len(accessors))
	}
}

// TestCStructLayouts: the three structs are laid out by gcc as the Go codec reads and
// writes them, field by field, with no padding (whose bytes C leaves undefined).
func TestCStructLayouts(t *testing.T) {
	h := cabi.Read(t, abiHeader, "PP_")
	h.CheckSizes(t, map[string]int64{"pp_batch_header": HeaderSize, "pp_range": EntrySize, "pp_violation": RecordSize})
	if f, _ := h.Structs["pp_batch_header"].Field("bad_index"); f.Offset != badIndexOffset || f.Size != 4 {
		t.Errorf("bad_index at %d (%d bytes), the monitor writes it at %d", f.Offset, f.Size, badIndexOffset)
	}

	// A batch filled in C, by field name, decodes to the same entries in Go.
	hdr := cabi.Encode(t, h, "pp_batch_header", map[string]any{"magic": uint64(BatchMagic), "version": uint64(VersionMajor), "count": uint64(2), "bad_index": uint64(NoIndex)})
	r1 := cabi.Encode(t, h, "pp_range", map[string]any{"addr": uint64(0x7f0000001000), "pages": uint64(3), "deny": uint64(DenyWrite | DenyExec), "action": uint64(ActionUpcall), "flags": uint64(FlagLock)})
	r2 := cabi.Encode(t, h, "pp_range", map[string]any{"addr": uint64(0x200000), "pages": uint64(1), "deny": uint64(DenyRead), "action": uint64(ActionLog), "flags": uint64(FlagPhys)})
	got, err := DecodeBatch(slices.Concat(hdr, r1, r2))
	if err != nil {
		t.Fatal(err)
	}
	want := []Entry{
		{Addr: 0x7f0000001000, Pages: 3, Deny: DenyWrite | DenyExec, Action: ActionUpcall, Flags: FlagLock},
		{Addr: 0x200000, Pages: 1, Deny: DenyRead, Action: ActionLog, Flags: FlagPhys},
	}
	if !slices.Equal(got, want) {
		t.Fatalf("C batch decodes to %+v, want %+v", got, want)
	}
	// And Go's encoding reads back in C field by field.
	enc := EncodeBatch(want)
	if m := cabi.Decode(t, h, "pp_batch_header", enc[:HeaderSize]); m["magic"] != uint64(BatchMagic) || m["version"] != uint64(VersionMajor) || m["flags"] != uint64(0) || m["count"] != uint64(2) || m["bad_index"] != uint64(NoIndex) {
		t.Errorf("EncodeBatch header reads in C as %v", m)
	}
	if m := cabi.Decode(t, h, "pp_range", enc[HeaderSize+EntrySize:]); m["addr"] != uint64(0x200000) || m["pages"] != uint64(1) || m["deny"] != uint64(DenyRead) || m["action"] != uint64(ActionLog) || m["flags"] != uint64(FlagPhys) || m["reserved"] != uint64(0) {
		t.Errorf("EncodeBatch entry reads in C as %v", m)
	}
	// A nonzero reserved field written in C is refused: Go reads reserved where C
	// puts it.
	bad := cabi.Encode(t, h, "pp_range", map[string]any{"addr": uint64(0x200000), "pages": uint64(1), "deny": uint64(DenyRead), "reserved": uint64(1)})
	hdr1 := slices.Clone(hdr)
	binary.LittleEndian.PutUint32(hdr1[8:], 1)
	if _, err := DecodeBatch(slices.Concat(hdr1, bad)); err == nil {
		t.Error("a range with reserved set in C was accepted")
	}

	// The violation record Go marshals reads in C as the same fields.
	rec := Record{Access: DenyWrite, Kernel: true, Action: ActionUpcall, Size: 8, Addr: 0x7f00deadb000, GPA: 0x123000,
		RIP: 0xffffffff81000010, RangeID: 77, Value: 0x1122334455667788, HasValue: true, RIPNext: true}
	b := rec.Marshal()
	m := cabi.Decode(t, h, "pp_violation", b[:])
	wantRec := map[string]any{"size": uint64(RecordSize), "version": uint64(RecordVersion), "access": uint64(DenyWrite),
		"addr": rec.Addr, "gpa": rec.GPA, "rip": rec.RIP, "range_id": uint64(77), "action": uint64(ActionUpcall),
		"size_bytes": uint64(8), "flags": uint64(recFlagKernel | recFlagValue | recFlagRIPNext), "reserved0": uint64(0),
		"value": rec.Value, "reserved1": uint64(0)}
	for k, w := range wantRec {
		if m[k] != w {
			t.Errorf("pp_violation.%s reads %v in C, Go wrote %v", k, m[k], w)
		}
	}
	if len(m) != len(wantRec) {
		t.Errorf("pp_violation has fields %v, the test checks %d", m, len(wantRec))
	}
}
