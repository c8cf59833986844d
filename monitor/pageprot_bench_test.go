package monitor

import (
	"context"
	"encoding/binary"
	"runtime"
	"testing"

	"github.com/umbra-cc/umbra/kvm"
	"github.com/umbra-cc/umbra/pageprot"
)

// guestViolationLoop registers an upcall handler, applies the batch at 0x101010
// (length at 0x101000) and then stores to the address at 0x101008 forever; the
// handler returns at once.
//
//	        movabs $0xe0000000, %r11
//	        mov $0x203, %eax                 # PP_SET_HANDLER(handler, 0x104000, 0x1000)
//	        lea handler(%rip), %rdi
//	        mov $0x104000, %esi
//	        mov $0x1000, %edx
//	        mov (%r11), %rax
//	        mov $0x201, %eax                 # PP_SET(0x101010, [0x101000])
//	        mov $0x101010, %edi
//	        mov 0x101000, %rsi
//	        mov (%r11), %rax
//	        mov 0x101008, %rdx
//	1:      mov %al, (%rdx)
//	        jmp 1b
//	handler:
//	        mov $0x204, %eax                 # PP_UPCALL_RETURN(resume)
//	        xor %edi, %edi
//	        mov (%r11), %rax
//	        ud2
var guestViolationLoop = []byte{
	0x49, 0xbb, 0x00, 0x00, 0x00, 0xe0, 0x00, 0x00, 0x00, 0x00, 0xb8, 0x03, 0x02, 0x00, 0x00, 0x48,
	0x8d, 0x3d, 0x2e, 0x00, 0x00, 0x00, 0xbe, 0x00, 0x40, 0x10, 0x00, 0xba, 0x00, 0x10, 0x00, 0x00,
	0x49, 0x8b, 0x03, 0xb8, 0x01, 0x02, 0x00, 0x00, 0xbf, 0x10, 0x10, 0x10, 0x00, 0x48, 0x8b, 0x34,
	0x25, 0x00, 0x10, 0x10, 0x00, 0x49, 0x8b, 0x03, 0x48, 0x8b, 0x14, 0x25, 0x08, 0x10, 0x10, 0x00,
	0x88, 0x02, 0xeb, 0xfc, 0xb8, 0x04, 0x02, 0x00, 0x00, 0x31, 0xff, 0x49, 0x8b, 0x03, 0x0f, 0x0b,
}

// guestSetLoop calls PP_SET with the batch at 0x101010 (length at 0x101000), then
// with the one at 0x103010 (length at 0x103000), forever.
//
//	        movabs $0xe0000000, %r11
//	1:      mov $0x201, %eax
//	        mov $0x101010, %edi
//	        mov 0x101000, %rsi
//	        mov (%r11), %rax
//	        mov $0x201, %eax
//	        mov $0x103010, %edi
//	        mov 0x103000, %rsi
//	        mov (%r11), %rax
//	        jmp 1b
var guestSetLoop = []byte{
	0x49, 0xbb, 0x00, 0x00, 0x00, 0xe0, 0x00, 0x00, 0x00, 0x00, 0xb8, 0x01, 0x02, 0x00, 0x00, 0xbf,
	0x10, 0x10, 0x10, 0x00, 0x48, 0x8b, 0x34, 0x25, 0x00, 0x10, 0x10, 0x00, 0x49, 0x8b, 0x03, 0xb8,
	0x01, 0x02, 0x00, 0x00, 0xbf, 0x10, 0x30, 0x10, 0x00, 0x48, 0x8b, 0x34, 0x25, 0x00, 0x30, 0x10,
	0x00, 0x49, 0x8b, 0x03, 0xeb, 0xd4,
}

func newBenchVM(b *testing.B, code []byte, memsz uint64, hooks *Hooks, setup map[uint64][]byte) *VM {
	b.Helper()
	v, err := New(Config{Image: testELF(code, testLoad, memsz), MemorySize: 8 << 20, Hooks: hooks})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { v.Close() })
	for gpa, data := range setup {
		if err := v.mem.WritePhys(gpa, data); err != nil {
			b.Fatal(err)
		}
	}
	return v
}

// runSetup runs the two set-up hypercalls of guestViolationLoop through the monitor.
func runSetup(b *testing.B, v *VM) {
	for i := 0; i < 2; i++ {
		e, err := v.cpu.Run()
		if err != nil {
			b.Fatal(err)
		}
		if _, err := v.handleExit(context.Background(), e); err != nil {
			b.Fatal(err)
		}
	}
}

// bareMMIOExit returns one bare MMIO-exit round trip of a sysVM guest: the
// two-instruction store loop of guestViolationLoop storing outside every slot, with
// nothing done in userspace but KVM_RUN. It is the primitive the page-protection
// targets are stated against.
func bareMMIOExit(b *testing.B) func() {
	prot := pageprot.EncodeBatch([]pageprot.Entry{{Addr: 0x102000, Pages: 1, Deny: pageprot.DenyWrite, Action: pageprot.ActionSkip}})
	bare := newBenchVM(b, guestViolationLoop, 0x6000, nil, map[uint64][]byte{0x101000: le64(uint64(len(prot))), 0x101008: le64(0xd000_0000), 0x101010: prot})
	runSetup(b, bare)
	return func() {
		e, err := bare.cpu.Run()
		if err != nil {
			b.Fatal(err)
		}
		if m, ok := e.(*kvm.ExitMMIO); !ok || !m.IsWrite {
			b.Fatalf("bare exit %v", e)
		}
	}
}

func le64(v uint64) []byte { return binary.LittleEndian.AppendUint64(nil, v) }

// BenchmarkPageProtViolation measures one sysVM deny-write violation round trip
// (guest store into a read-only slot -> KVM_EXIT_MMIO -> the monitor's exit
// dispatch, Service.Violation, the action -> KVM_RUN resumes the guest) against a
// bare MMIO-exit round trip of the same two-instruction guest loop storing outside
// every slot, with nothing done in userspace. The upcall case is a full round trip
// through the guest's handler: the violation exit, the handler's three
// instructions and its PP_UPCALL_RETURN exit.
func BenchmarkPageProtViolation(b *testing.B) {
	requireKVM(b)
	for _, tc := range []struct {
		name   string
		action pageprot.Action
		audit  bool
	}{
		{"skip", pageprot.ActionSkip, false},
		{"skip+audit", pageprot.ActionSkip, true},
		{"log", pageprot.ActionLog, false},
		{"upcall", pageprot.ActionUpcall, false},
	} {
		b.Run(tc.name, func(b *testing.B) {
			prot := pageprot.EncodeBatch([]pageprot.Entry{{Addr: 0x102000, Pages: 1, Deny: pageprot.DenyWrite, Action: tc.action}})
			setup := func(target uint64) map[uint64][]byte {
				return map[uint64][]byte{0x101000: le64(uint64(len(prot))), 0x101008: le64(target), 0x101010: prot}
			}
			var hooks *Hooks
			audited := 0
			if tc.audit {
				hooks = &Hooks{Audit: func(context.Context, string, any) error { audited++; return nil }}
			}
			mon := newBenchVM(b, guestViolationLoop, 0x6000, hooks, setup(0x102008))
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			ctx := context.Background()
			runSetup(b, mon)
			bareExit := bareMMIOExit(b)
			exits := 1
			if tc.action == pageprot.ActionUpcall {
				exits = 2 // the violation and the handler's return
			}
			violation := func() {
				for i := 0; i < exits; i++ {
					e, err := mon.cpu.Run()
					if err != nil {
						b.Fatal(err)
					}
					if _, err := mon.handleExit(ctx, e); err != nil {
						b.Fatal(err)
					}
				}
			}
			bareNs, monNs := interleave(b, bareExit, violation)
			if st := mon.PageProtStats(); st.Violations < uint64(b.N) {
				b.Fatalf("only %d violations for %d iterations", st.Violations, b.N)
			}
			if tc.audit && audited < b.N {
				b.Fatalf("only %d audit records", audited)
			}
			b.ReportMetric(bareNs, "bare-ns/exit")
			b.ReportMetric(monNs, "violation-ns")
			b.ReportMetric(monNs/bareNs, "ratio")
			// Its own primitive: as many bare exits as the round trip takes.
			b.ReportMetric(monNs/(bareNs*float64(exits)), "ratio-per-exit")
		})
	}
}

// BenchmarkPageProtSetPerRange measures PP_SET through the real hypercall with a
// batch of 256 one-page ranges, alternating two batches, and reports the cost per
// range next to a bare MMIO exit measured in the same run. "same-layout" alternates
// two actions with the same deny mask, so the slot layout never changes (the cost
// of the call itself: read, decode, 256 page walks, checks, table, plan);
// "coalesced" protects and unprotects 256 adjacent pages (one read-only slot: 1+3
// and 3+1 slot operations per call); "scattered" protects every other page, 256
// read-only slots (about 513 slot operations per call).
func BenchmarkPageProtSetPerRange(b *testing.B) {
	requireKVM(b)
	const n = 256
	const base = 0x110000
	mk := func(stride uint64, deny pageprot.Deny, act pageprot.Action) []byte {
		es := make([]pageprot.Entry, n)
		for i := range es {
			es[i] = pageprot.Entry{Addr: base + uint64(i)*stride*PageSize, Pages: 1, Deny: deny, Action: act}
		}
		return pageprot.EncodeBatch(es)
	}
	for _, tc := range []struct {
		name   string
		a, c   []byte
		slotOp bool
	}{
		{"same-layout", mk(1, pageprot.DenyWrite, pageprot.ActionSkip), mk(1, pageprot.DenyWrite, pageprot.ActionLog), false},
		{"coalesced", mk(1, pageprot.DenyWrite, pageprot.ActionSkip), mk(1, 0, 0), true},
		{"scattered", mk(2, pageprot.DenyWrite, pageprot.ActionSkip), mk(2, 0, 0), true},
	} {
		b.Run(tc.name, func(b *testing.B) {
			setup := map[uint64][]byte{0x101000: le64(uint64(len(tc.a))), 0x101010: tc.a, 0x103000: le64(uint64(len(tc.c))), 0x103010: tc.c}
			failed := 0
			hooks := &Hooks{Audit: func(_ context.Context, _ string, d any) error {
				if c, ok := d.(ppChangeAudit); ok && c.Result < 0 {
					failed++
				}
				return nil
			}}
			mon := newBenchVM(b, guestSetLoop, 0x300000, hooks, setup)
			bare := newBenchVM(b, guestCallLoop, 0, nil, nil)
			bare.cpu.EnableSyncRegs(0)
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			ctx := context.Background()
			bareExit := func() {
				e, err := bare.cpu.Run()
				if err != nil {
					b.Fatal(err)
				}
				e.(*kvm.ExitMMIO).SetReadData(0)
			}
			call := func() {
				e, err := mon.cpu.Run()
				if err != nil {
					b.Fatal(err)
				}
				if _, err := mon.handleExit(ctx, e); err != nil {
					b.Fatal(err)
				}
			}
			bareNs, callNs := interleave(b, bareExit, call)
			if failed > 0 {
				b.Fatalf("%d PP_SET calls failed", failed)
			}
			st := mon.PageProtStats()
			if tc.slotOp != (st.SlotOps > 4) { // same-layout: only the first call creates the slot
				b.Fatalf("slot operations %d", st.SlotOps)
			}
			b.ReportMetric(bareNs, "bare-ns/exit")
			b.ReportMetric(callNs, "ns/call")
			b.ReportMetric(callNs/n, "ns/range")
			b.ReportMetric(callNs/bareNs, "call/bare")
			b.ReportMetric(float64(st.SlotOps)/float64(st.Calls), "slotops/call")
		})
	}
}
