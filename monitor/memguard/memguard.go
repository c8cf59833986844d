// Package memguard is the one rule for every access umbra's monitor makes to guest
// memory on someone else's behalf: "the monitor is never the kernel's deputy".
//
// The monitor reads and writes guest RAM for others all the time: a system-VM
// hypercall's buffer, a cloaked app's system-call buffer copied through its bounce
// area, the zero fill of a cloaked page's first touch, in-place encryption and
// decryption, the scrub of plaintext, the page-table walks it makes for the system
// VM and for appVM, and the frames it maps into a cloaked app's shadow page tables
// (through which appVM loads, stores and fetches). The guest kernel names most of
// those frames, through its page tables. An access the kernel could not make itself
// (a store to a frame page protection locks against writes, a read of a deny-read
// frame) or one that would show or change a cloaked app's plaintext must not happen
// because the kernel pointed the monitor at the frame.
//
// View.Check decides one access from two facts: the system VM's page protection
// (pageprot.PhysRange, guest-physical) and which frames hold a cloaked app's
// plaintext. It knows nothing of KVM and is tested by table (memguard_test.go).
// Its answer is Allow, Seal (encrypt the plaintext in the frame first, then go on:
// the system view of a cloaked page is its ciphertext) or Refuse, with the reason;
// the caller audits a refusal and ends whoever asked (docs/cloak.md, "The guarded
// accessor").
package memguard

import (
	"fmt"
	"sort"

	"github.com/umbra-cc/umbra/pageprot"
)

// PageSize is the granule of the rule: a 4 KiB guest frame.
const PageSize = 4096

// Access is what the monitor does to the frame.
type Access uint8

// Accesses. Name is none of them: the frame is only named (translated to be
// protected or queried), not read or written; only cloaked plaintext refuses it.
const (
	Name Access = 0
	Read Access = 1 << iota >> 1
	Write
	Exec // a fetch by cloaked code through a shadow entry
)

func (a Access) String() string {
	switch a {
	case Name:
		return "name"
	case Read:
		return "read"
	case Write:
		return "write"
	case Exec:
		return "exec"
	case Read | Write:
		return "read-write"
	}
	return fmt.Sprintf("access(%d)", uint8(a))
}

// Purpose is why the monitor touches the frame.
type Purpose uint8

// Purposes.
const (
	// HypercallBuffer: a system-VM hypercall's buffer (the kernel or a process asked).
	HypercallBuffer Purpose = iota + 1
	// Bounce: a cloaked app's system-call data copied to or from its uncloaked
	// bounce area, which the kernel maps.
	Bounce
	// ZeroFill: a cloaked page's first touch, zeroed in the frame the kernel gave.
	ZeroFill
	// Decrypt: a cloaked page's ciphertext verified and decrypted in place.
	Decrypt
	// Encrypt: the plaintext a frame holds encrypted in place (the frame is the app's).
	Encrypt
	// Scrub: the plaintext a frame holds cleared (the frame is the app's).
	Scrub
	// Walk: a page-table page read during a walk of the guest's tables.
	Walk
	// AppMap: a frame a cloaked app's shadow tables map, for the app's own loads,
	// stores and fetches in appVM (and the monitor's copies in its view).
	AppMap
	// Adopt: a present page taken into the cloaked state at registration.
	Adopt
	// DMA: a virtio device's access to a ring or buffer its driver gave it (for the
	// system VM: the kernel or a process programmed the device).
	DMA
)

var purposeNames = [...]string{"", "hypercall buffer", "bounce copy", "zero fill", "decryption", "encryption", "scrub", "page-table walk", "appVM mapping", "adoption", "device DMA"}

func (p Purpose) String() string {
	if int(p) < len(purposeNames) && p != 0 {
		return purposeNames[p]
	}
	return fmt.Sprintf("purpose(%d)", uint8(p))
}

// Verdict is the rule's answer.
type Verdict uint8

// Verdicts.
const (
	Allow  Verdict = iota
	Seal           // encrypt the frame's plaintext first, then allow
	Refuse         // do not touch the frame
)

func (v Verdict) String() string {
	return [...]string{"allow", "seal", "refuse"}[v]
}

// Request is one access: Len bytes from guest-physical GPA (Len 0 means one byte).
type Request struct {
	Purpose Purpose
	Access  Access
	GPA     uint64
	Len     uint64
	// App is the cloaked app (its number in the run, from 1) on whose behalf the
	// monitor acts; 0 for the system VM.
	App uint64
}

// Decision is the answer for a request: the strongest verdict over its frames, the
// first frame that got it and why.
type Decision struct {
	Verdict Verdict
	Frame   uint64
	Why     string
}

// View is what the rule knows of guest memory.
type View struct {
	// Locks is the system VM's page protection, sorted by Start and disjoint (as
	// pageprot.Service.PhysRanges returns it).
	Locks []pageprot.PhysRange
	// Plain reports the cloaked app whose plaintext frame holds (ok false: none).
	Plain func(frame uint64) (app uint64, ok bool)
}

// Deny returns the system VM's protection of the frame at gpa.
func (v View) Deny(gpa uint64) pageprot.Deny {
	i := sort.Search(len(v.Locks), func(i int) bool { return v.Locks[i].End > gpa })
	if i < len(v.Locks) && v.Locks[i].Start <= gpa {
		return v.Locks[i].Deny
	}
	return 0
}

// Check decides request r.
func (v View) Check(r Request) Decision {
	n := max(r.Len, 1)
	end := r.GPA + n
	if end < r.GPA {
		return Decision{Verdict: Refuse, Frame: r.GPA &^ (PageSize - 1), Why: "range wraps around the address space"}
	}
	// Frame by frame, without a slice of them (the transition path checks several
	// one-frame requests per page).
	var out Decision
	for f, last := r.GPA&^(PageSize-1), (end-1)&^(PageSize-1); ; f += PageSize {
		d := v.frame(r, f)
		if d.Verdict > out.Verdict {
			out = d
		}
		if out.Verdict == Refuse || f == last {
			return out
		}
	}
}

// Frames returns the frames [gpa, gpa+n) touches (n 0: one byte), none if the range
// wraps. It never loops past the top of the address space.
func Frames(gpa, n uint64) []uint64 {
	n = max(n, 1)
	if gpa+n < gpa {
		return nil
	}
	first, last := gpa&^(PageSize-1), (gpa+n-1)&^(PageSize-1)
	out := make([]uint64, 0, (last-first)/PageSize+1)
	for f := first; ; f += PageSize {
		out = append(out, f)
		if f == last {
			return out
		}
	}
}

// denies is the page-protection bit an access needs clear.
func denies(a Access) pageprot.Deny {
	switch a {
	case Write:
		return pageprot.DenyWrite
	case Exec:
		return pageprot.DenyExec
	}
	return pageprot.DenyRead
}

func (v View) frame(r Request, f uint64) Decision {
	refuse := func(why string, args ...any) Decision {
		return Decision{Verdict: Refuse, Frame: f, Why: fmt.Sprintf(why, args...)}
	}
	var owner uint64
	plain := false
	if v.Plain != nil {
		owner, plain = v.Plain(f)
	}
	switch r.Purpose {
	case Encrypt, Scrub:
		// The monitor's own bookkeeping: only the plaintext of the app it acts for.
		if !plain || owner != r.App || r.App == 0 {
			return refuse("%s of a frame that holds no plaintext of app %d", r.Purpose, r.App)
		}
		return Decision{}
	case 0:
		return refuse("no purpose given")
	}
	if plain {
		switch r.Purpose {
		case HypercallBuffer, DMA:
			return refuse("frame holds cloaked plaintext (app %d)", owner)
		case Walk:
			// A page table in a frame of plaintext: reacting to the entries would be
			// an oracle on the app's data.
			return refuse("page table in a frame holding cloaked plaintext (app %d)", owner)
		case Adopt:
			return refuse("frame already holds cloaked plaintext (app %d)", owner)
		case AppMap:
			if owner != r.App {
				return Decision{Verdict: Seal, Frame: f, Why: fmt.Sprintf("frame holds app %d's plaintext", owner)}
			}
		default: // Bounce, ZeroFill, Decrypt
			return Decision{Verdict: Seal, Frame: f, Why: fmt.Sprintf("frame holds app %d's plaintext", owner)}
		}
	}
	deny := v.Deny(f)
	if deny == 0 {
		return Decision{}
	}
	switch r.Purpose {
	case ZeroFill, Decrypt, Adopt:
		// These write the frame (adoption: encryption will): any lock against writes
		// or reads means the frame is not the app's to hold.
		if deny&(pageprot.DenyWrite|pageprot.DenyRead) != 0 {
			return refuse("frame is protected (%v) by the system's page protection", deny)
		}
		return Decision{}
	}
	for _, a := range []Access{Read, Write, Exec} {
		if r.Access&a != 0 && deny&denies(a) != 0 {
			return refuse("%s of a frame the system's page protection denies (%v)", a, deny)
		}
	}
	return Decision{}
}
