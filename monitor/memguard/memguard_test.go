package memguard

import (
	"strings"
	"testing"

	"github.com/umbra-cc/umbra/pageprot"
)

func TestCheck(t *testing.T) {
	const (
		text  = 0x100000 // locked deny-write by the kernel
		idt   = 0x180000 // locked deny-write|deny-exec
		vault = 0x190000 // deny-read
		plain = 0x200000 // app 1's plaintext
		other = 0x201000 // app 2's plaintext
		free  = 0x300000
	)
	v := View{
		Locks: []pageprot.PhysRange{
			{Start: text, End: text + 4*PageSize, Deny: pageprot.DenyWrite},
			{Start: idt, End: idt + PageSize, Deny: pageprot.DenyWrite | pageprot.DenyExec},
			{Start: vault, End: vault + PageSize, Deny: pageprot.DenyRead},
		},
		Plain: func(f uint64) (uint64, bool) {
			switch f {
			case plain:
				return 1, true
			case other:
				return 2, true
			}
			return 0, false
		},
	}
	for _, tc := range []struct {
		name string
		r    Request
		want Verdict
		why  string
	}{
		{"bounce write into free frame", Request{Purpose: Bounce, Access: Write, GPA: free + 8, Len: 100, App: 1}, Allow, ""},
		{"bounce write into locked text", Request{Purpose: Bounce, Access: Write, GPA: text + PageSize, Len: 16, App: 1}, Refuse, "denies"},
		{"bounce read of locked text", Request{Purpose: Bounce, Access: Read, GPA: text, Len: 16, App: 1}, Allow, ""},
		{"bounce read of deny-read frame", Request{Purpose: Bounce, Access: Read, GPA: vault, Len: 16, App: 1}, Refuse, "read"},
		{"bounce straddling into a lock", Request{Purpose: Bounce, Access: Write, GPA: text - 8, Len: 16, App: 1}, Refuse, "denies"},
		{"bounce into another app's plaintext", Request{Purpose: Bounce, Access: Write, GPA: other, Len: 8, App: 1}, Seal, "app 2"},
		{"bounce into own plaintext", Request{Purpose: Bounce, Access: Read, GPA: plain, Len: 8, App: 1}, Seal, "app 1"},
		{"zero fill of locked text", Request{Purpose: ZeroFill, Access: Write, GPA: text, Len: PageSize, App: 1}, Refuse, "protected"},
		{"zero fill of deny-read frame", Request{Purpose: ZeroFill, Access: Write, GPA: vault, Len: PageSize, App: 1}, Refuse, "protected"},
		{"zero fill of free frame", Request{Purpose: ZeroFill, Access: Write, GPA: free, Len: PageSize, App: 1}, Allow, ""},
		{"zero fill over plaintext", Request{Purpose: ZeroFill, Access: Write, GPA: other, Len: PageSize, App: 1}, Seal, ""},
		{"decrypt into the IDT", Request{Purpose: Decrypt, Access: Write, GPA: idt, Len: PageSize, App: 1}, Refuse, "protected"},
		{"encrypt own plaintext", Request{Purpose: Encrypt, Access: Write, GPA: plain, Len: PageSize, App: 1}, Allow, ""},
		{"encrypt another app's plaintext", Request{Purpose: Encrypt, Access: Write, GPA: other, Len: PageSize, App: 1}, Refuse, "no plaintext of app 1"},
		{"encrypt a frame without plaintext", Request{Purpose: Encrypt, Access: Write, GPA: text, Len: PageSize, App: 1}, Refuse, "no plaintext"},
		{"scrub for the system", Request{Purpose: Scrub, Access: Write, GPA: plain, Len: PageSize}, Refuse, "no plaintext of app 0"},
		{"scrub own plaintext", Request{Purpose: Scrub, Access: Write, GPA: plain, Len: PageSize, App: 1}, Allow, ""},
		{"walk through plaintext", Request{Purpose: Walk, Access: Read, GPA: plain + 0x18, Len: 8, App: 1}, Refuse, "page table"},
		{"system walk through plaintext", Request{Purpose: Walk, Access: Read, GPA: other, Len: 8}, Refuse, "page table"},
		{"walk through locked text", Request{Purpose: Walk, Access: Read, GPA: text, Len: 8, App: 1}, Allow, ""},
		{"walk through deny-read", Request{Purpose: Walk, Access: Read, GPA: vault, Len: 8}, Refuse, "read"},
		{"hypercall buffer in plaintext", Request{Purpose: HypercallBuffer, Access: Read, GPA: plain, Len: 8}, Refuse, "cloaked plaintext"},
		{"hypercall read of deny-read", Request{Purpose: HypercallBuffer, Access: Read, GPA: vault + 100, Len: 8}, Refuse, "read"},
		{"hypercall write to locked text", Request{Purpose: HypercallBuffer, Access: Write, GPA: text, Len: 8}, Refuse, "write"},
		{"naming a deny-read frame", Request{Purpose: HypercallBuffer, Access: Name, GPA: vault, Len: PageSize}, Allow, ""},
		{"naming plaintext", Request{Purpose: HypercallBuffer, Access: Name, GPA: plain, Len: PageSize}, Refuse, "cloaked plaintext"},
		{"hypercall read of text", Request{Purpose: HypercallBuffer, Access: Read, GPA: text, Len: 8}, Allow, ""},
		{"app maps locked text writable", Request{Purpose: AppMap, Access: Read | Write, GPA: text, Len: PageSize, App: 1}, Refuse, "write"},
		{"app maps locked text readable", Request{Purpose: AppMap, Access: Read, GPA: text, Len: PageSize, App: 1}, Allow, ""},
		{"app executes the IDT frame", Request{Purpose: AppMap, Access: Read | Exec, GPA: idt, Len: PageSize, App: 1}, Refuse, "exec"},
		{"app maps deny-read frame", Request{Purpose: AppMap, Access: Read, GPA: vault, Len: PageSize, App: 1}, Refuse, "read"},
		{"app maps its own plaintext", Request{Purpose: AppMap, Access: Read | Write, GPA: plain, Len: PageSize, App: 1}, Allow, ""},
		{"app maps another app's plaintext", Request{Purpose: AppMap, Access: Read, GPA: other, Len: PageSize, App: 1}, Seal, "app 2"},
		{"adopt plaintext", Request{Purpose: Adopt, Access: Write, GPA: other, Len: PageSize, App: 1}, Refuse, "already"},
		{"adopt locked text", Request{Purpose: Adopt, Access: Write, GPA: text, Len: PageSize, App: 1}, Refuse, "protected"},
		{"adopt free frame", Request{Purpose: Adopt, Access: Write, GPA: free, Len: PageSize, App: 1}, Allow, ""},
		{"wrapping range", Request{Purpose: Bounce, Access: Read, GPA: ^uint64(0) - 4, Len: 16, App: 1}, Refuse, "wraps"},
		{"last page of the address space ends", Request{Purpose: Bounce, Access: Read, GPA: ^uint64(0) - 0xfff, Len: 0x10, App: 1}, Allow, ""},
		{"no purpose", Request{Access: Read, GPA: free}, Refuse, "purpose"},
		{"zero length is one byte", Request{Purpose: Bounce, Access: Write, GPA: text}, Refuse, "denies"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := v.Check(tc.r)
			if d.Verdict != tc.want || !strings.Contains(d.Why, tc.why) {
				t.Fatalf("Check(%+v) = %+v, want %v with %q", tc.r, d, tc.want, tc.why)
			}
			if end := tc.r.GPA + max(tc.r.Len, 1); d.Verdict != Allow && (d.Frame < tc.r.GPA&^(PageSize-1) || end > tc.r.GPA && d.Frame >= end) {
				t.Errorf("decision names frame %#x, outside the request", d.Frame)
			}
		})
	}
}

func TestDeny(t *testing.T) {
	v := View{Locks: []pageprot.PhysRange{
		{Start: 0x1000, End: 0x3000, Deny: pageprot.DenyWrite},
		{Start: 0x5000, End: 0x6000, Deny: pageprot.DenyRead},
	}}
	for gpa, want := range map[uint64]pageprot.Deny{0: 0, 0xfff: 0, 0x1000: pageprot.DenyWrite, 0x2fff: pageprot.DenyWrite,
		0x3000: 0, 0x5800: pageprot.DenyRead, 0x6000: 0} {
		if got := v.Deny(gpa); got != want {
			t.Errorf("Deny(%#x) = %v, want %v", gpa, got, want)
		}
	}
}

func BenchmarkCheck(b *testing.B) {
	v := View{Locks: make([]pageprot.PhysRange, 16), Plain: func(uint64) (uint64, bool) { return 0, false }}
	for i := range v.Locks {
		v.Locks[i] = pageprot.PhysRange{Start: uint64(i) << 20, End: uint64(i)<<20 + 0x1000, Deny: pageprot.DenyWrite}
	}
	for i := 0; i < b.N; i++ {
		v.Check(Request{Purpose: Walk, Access: Read, GPA: 0x7ff000, Len: 8, App: 1})
	}
}

// FuzzCheck: for any request (the guest chooses the frames), the rule never allows a
// write to a frame locked against writes, a read of one locked against reads, or a
// walk, hypercall buffer or adoption touching cloaked plaintext, and never panics.
func FuzzCheck(f *testing.F) {
	f.Add(uint8(Bounce), uint8(Write), uint64(0x100000), uint64(16), uint64(1))
	f.Add(uint8(Walk), uint8(Read), uint64(0x200018), uint64(8), uint64(0))
	f.Add(uint8(AppMap), uint8(Read|Write|Exec), ^uint64(0)-8, uint64(64), uint64(2))
	v := View{
		Locks: []pageprot.PhysRange{
			{Start: 0x100000, End: 0x104000, Deny: pageprot.DenyWrite},
			{Start: 0x190000, End: 0x191000, Deny: pageprot.DenyRead | pageprot.DenyWrite},
		},
		Plain: func(f uint64) (uint64, bool) { return 1 + f>>12&1, f >= 0x200000 && f < 0x208000 },
	}
	f.Fuzz(func(t *testing.T, p, a uint8, gpa, n, app uint64) {
		r := Request{Purpose: Purpose(p % 10), Access: Access(a & 7), GPA: gpa, Len: n % (1 << 20), App: app % 4}
		d := v.Check(r)
		if d.Verdict == Refuse {
			return
		}
		for _, fr := range Frames(r.GPA, r.Len) {
			deny := v.Deny(fr)
			owner, plain := v.Plain(fr)
			switch {
			case r.Purpose == Encrypt || r.Purpose == Scrub:
				if !plain || owner != r.App {
					t.Fatalf("%+v: %v of a frame without the app's plaintext", r, d)
				}
			case plain && (r.Purpose == Walk || r.Purpose == HypercallBuffer || r.Purpose == Adopt):
				t.Fatalf("%+v: %v through plaintext at %#x", r, d, fr)
			case !plain && r.Access&Write != 0 && deny&pageprot.DenyWrite != 0:
				t.Fatalf("%+v: %v of a write-locked frame %#x", r, d, fr)
			case !plain && r.Access&Read != 0 && deny&pageprot.DenyRead != 0:
				t.Fatalf("%+v: %v of a read-locked frame %#x", r, d, fr)
			}
		}
	})
}
