package checkpoint

import (
	"bytes"
	"encoding/binary"
	"errors"
	"runtime"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/umbra-cc/umbra/internal/testenv"
	"github.com/umbra-cc/umbra/internal/tinyguest"
	"github.com/umbra-cc/umbra/kvm"
	"github.com/umbra-cc/umbra/snapshot"
)

const ramSize = 2 << 20

// counterCode keeps a counter in XMM0 and at 0x3000 and reports it on port 0x10: a
// restored machine continues the count only if its RAM, registers and FPU state all
// came back.
var counterCode = tinyguest.XMMCounter

func openKVM(t *testing.T) *kvm.System { return testenv.OpenKVM(t) }

// newMachine makes a one-vCPU machine with 2 MiB of zeroed RAM, the in-kernel irqchip
// and PIT, and CPUID set. With boot it loads the counter guest and puts the vCPU in
// long mode at it; without, it is an empty machine to restore into. With dirty, RAM
// logs dirty pages with manual protection.
func newMachine(t *testing.T, sys *kvm.System, boot, dirty bool) *Machine {
	t.Helper()
	return newMachineOn(t, sys, boot, dirty, nil)
}

// newMachineOn is newMachine with the given RAM (ramSize bytes; nil: fresh anonymous).
func newMachineOn(t *testing.T, sys *kvm.System, boot, dirty bool, mem []byte) *Machine {
	t.Helper()
	var code []byte
	if boot {
		code = counterCode
	}
	return buildMachine(t, sys, machineSpec{size: ramSize, mem: mem, code: code, dirty: dirty})
}

// machineSpec shapes a test machine: RAM of size bytes (mem, or fresh anonymous
// memory), and with code, the vCPU in long mode at 0x1000 running it, RAM identity
// mapped with 2 MiB pages and RSI = rsi.
type machineSpec struct {
	size  int
	mem   []byte
	code  []byte
	rsi   uint64
	dirty bool
	vcpus int // 0: one
}

func buildMachine(tb testing.TB, sys *kvm.System, ms machineSpec) *Machine {
	tb.Helper()
	vm, err := sys.CreateVM()
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { vm.Close() })
	if err := vm.CreateIRQChip(); err != nil {
		tb.Fatal(err)
	}
	if err := vm.CreatePIT2(); err != nil {
		tb.Fatal(err)
	}
	var flags uint32
	if ms.dirty {
		if err := vm.EnableManualDirtyLog(kvm.DirtyLogManualProtect | kvm.DirtyLogInitiallySet); err != nil {
			tb.Fatal(err)
		}
		flags = kvm.MemLogDirtyPages
	}
	mem := ms.mem
	if mem == nil {
		if mem, err = unix.Mmap(-1, 0, ms.size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS); err != nil {
			tb.Fatal(err)
		}
		tb.Cleanup(func() { unix.Munmap(mem) })
	}
	if err := vm.SetMemoryRegion(kvm.MemoryRegion{Slot: 0, Flags: flags, Host: mem}); err != nil {
		tb.Fatal(err)
	}
	cpuid, err := sys.SupportedCPUID()
	if err != nil {
		tb.Fatal(err)
	}
	var cpus []*kvm.VCPU
	for id := range max(1, ms.vcpus) {
		cpu, err := vm.CreateVCPU(id)
		if err != nil {
			tb.Fatal(err)
		}
		tb.Cleanup(func() { cpu.Close() })
		if err := cpu.SetCPUID(cpuid); err != nil {
			tb.Fatal(err)
		}
		cpus = append(cpus, cpu)
	}
	m := &Machine{VM: vm, VCPUs: cpus, RAM: []Region{{0, mem}}, IRQChip: true, PIT: true}
	if ms.code == nil {
		return m
	}
	le := binary.LittleEndian
	le.PutUint64(mem[0x8000:], 0x9000|3)
	le.PutUint64(mem[0x9000:], 0xa000|3)
	for i := 0; i < max(1, ms.size>>21); i++ {
		le.PutUint64(mem[0xa000+8*i:], uint64(i)<<21|0x80|3) // 2 MiB pages
	}
	copy(mem[0x1000:], ms.code)
	for _, cpu := range cpus {
		s, err := cpu.Sregs()
		if err != nil {
			tb.Fatal(err)
		}
		code := kvm.Segment{Limit: 0xffffffff, Selector: 8, Type: 11, Present: 1, S: 1, L: 1, G: 1}
		data := kvm.Segment{Limit: 0xffffffff, Selector: 16, Type: 3, Present: 1, S: 1, DB: 1, G: 1}
		s.CS, s.DS, s.ES, s.FS, s.GS, s.SS = code, data, data, data, data, data
		s.CR3, s.CR4, s.EFER = 0x8000, 1<<5|1<<9|1<<10, 1<<8|1<<10 // PAE, OSFXSR, OSXMMEXCPT; LME, LMA
		s.CR0 = 1 | 1<<4 | 1<<31
		if err := cpu.SetSregs(s); err != nil {
			tb.Fatal(err)
		}
		if err := cpu.SetRegs(kvm.Regs{RIP: 0x1000, RFLAGS: 2, RSI: ms.rsi}); err != nil {
			tb.Fatal(err)
		}
		// An application processor starts waiting for INIT/SIPI; this one runs at once.
		if err := cpu.SetMPState(kvm.MPStateRunnable); err != nil {
			tb.Fatal(err)
		}
	}
	return m
}

func count(t testing.TB, m *Machine) byte { t.Helper(); return countOn(t, m, 0) }

// countOn runs vCPU i to its next report and returns it.
func countOn(t testing.TB, m *Machine, i int) byte {
	t.Helper()
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	e, err := m.VCPUs[i].Run()
	if err != nil {
		t.Fatal(err)
	}
	io, ok := e.(*kvm.ExitIO)
	if !ok || io.Port != 0x10 {
		t.Fatalf("exit %v, want out to port 0x10", e)
	}
	return io.Data[0]
}

func expectCounts(t *testing.T, m *Machine, from, to byte) {
	t.Helper()
	for want := from; want <= to; want++ {
		if got := count(t, m); got != want {
			t.Fatalf("counted %d, want %d", got, want)
		}
	}
}

var key = bytes.Repeat([]byte{0x5a}, snapshot.KeySize)

func save(t *testing.T, m *Machine, sup kvm.StateSupport, opt snapshot.Options, dirty Pages) ([]byte, snapshot.Info, uint64) {
	t.Helper()
	var buf bytes.Buffer
	w, err := snapshot.NewWriter(&buf, key, opt)
	if err != nil {
		t.Fatal(err)
	}
	n, err := Save(w, m, sup, dirty)
	if err != nil {
		t.Fatal(err)
	}
	info, err := w.Close()
	if err != nil {
		t.Fatal(err)
	}
	return buf.Bytes(), info, n
}

func openSnap(t *testing.T, b []byte) *snapshot.Reader {
	t.Helper()
	r, err := snapshot.Open(bytes.NewReader(b), int64(len(b)), key)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// TestSaveRestoreContinues checkpoints a running machine into a snapshot file, then
// an incremental one from KVM's dirty log, and restores each into a new machine, which
// continues the guest's count where the saved one was.
func TestSaveRestoreContinues(t *testing.T) {
	sys := openKVM(t)
	sup, err := sys.StateSupport()
	if err != nil {
		t.Fatal(err)
	}
	a := newMachine(t, sys, true, true)
	expectCounts(t, a, 1, 3)

	full, fullInfo, n := save(t, a, sup, snapshot.Options{Generation: 1, Compress: true}, nil)
	t.Logf("full checkpoint: %d non-zero pages of %d, %d bytes", n, ramSize/snapshot.PageSize, len(full))
	if n == 0 || n > 8 {
		t.Fatalf("full checkpoint saved %d pages; the guest uses code, page tables and one data page", n)
	}
	if bytes.Contains(full, counterCode) {
		t.Fatal("the snapshot file contains the guest's code in plaintext")
	}
	// Reference point: clear the dirty log, run on, save what changed.
	slot := uint32(0)
	pages := uint32(ramSize / snapshot.PageSize)
	all := make([]uint64, pages/64)
	for i := range all {
		all[i] = ^uint64(0)
	}
	if err := a.VM.ClearDirtyLog(slot, 0, pages, all); err != nil {
		t.Fatal(err)
	}
	expectCounts(t, a, 4, 5)
	bitmap, err := a.VM.DirtyLog(slot)
	if err != nil {
		t.Fatal(err)
	}
	dirty := func(_ int, p uint64) bool { return bitmap[p/64]&(1<<(p%64)) != 0 }
	inc, incInfo, dirtied := save(t, a, sup, snapshot.Options{Generation: 2, Parent: &fullInfo}, dirty)
	t.Logf("incremental checkpoint: %d dirtied pages (%d bytes), file %d bytes", dirtied, dirtied*snapshot.PageSize, len(inc))
	if dirtied != 1 || incInfo.Pages != 1 {
		t.Fatalf("incremental checkpoint saved %d pages, want 1 (the guest writes only 0x3000)", dirtied)
	}

	// Restore the full checkpoint: the count goes on from 3.
	b := newMachine(t, sys, false, false)
	chain, err := snapshot.NewChain(openSnap(t, full))
	if err != nil {
		t.Fatal(err)
	}
	if err := Restore(chain, b, sup); err != nil {
		t.Fatal(err)
	}
	expectCounts(t, b, 4, 4)

	// Restore the chain: from 5.
	c := newMachine(t, sys, false, false)
	chain2, err := snapshot.NewChain(openSnap(t, full), openSnap(t, inc))
	if err != nil {
		t.Fatal(err)
	}
	if err := Restore(chain2, c, sup); err != nil {
		t.Fatal(err)
	}
	expectCounts(t, c, 6, 7)
	// The original is unaffected by either.
	expectCounts(t, a, 6, 6)
}

func TestRestoreRefusesAnotherMachine(t *testing.T) {
	sys := openKVM(t)
	sup, err := sys.StateSupport()
	if err != nil {
		t.Fatal(err)
	}
	a := newMachine(t, sys, true, false)
	expectCounts(t, a, 1, 1)
	file, _, _ := save(t, a, sup, snapshot.Options{Generation: 1}, nil)
	chain, err := snapshot.NewChain(openSnap(t, file))
	if err != nil {
		t.Fatal(err)
	}
	other := newMachine(t, sys, false, false)
	other.RAM[0].Host = other.RAM[0].Host[:ramSize/2]
	if err := Restore(chain, other, sup); err == nil || !strings.Contains(err.Error(), "RAM layout") {
		t.Fatalf("restore into a machine with half the RAM: %v", err)
	}
	narrow := sup
	narrow.MSRs = narrow.MSRs[1:] // a host that does not save the first MSR
	if err := Restore(chain, newMachine(t, sys, false, false), narrow); err == nil || !strings.Contains(err.Error(), "not among") {
		t.Fatalf("restore setting an MSR outside the host's list: %v", err)
	}
	noChip := newMachine(t, sys, false, false)
	noChip.IRQChip = false
	if err := Restore(chain, noChip, sup); err == nil || !strings.Contains(err.Error(), "in-kernel devices") {
		t.Fatalf("restore into a machine without irqchip: %v", err)
	}
	// A tampered block stops the restore before its pages reach RAM.
	bad := bytes.Clone(file)
	r := openSnap(t, file)
	blk := r.Blocks()[0]
	bad[blk.Offset+snapshot.BlockHeaderSize+10] ^= 1
	badChain, err := snapshot.NewChain(openSnap(t, bad))
	if err != nil {
		t.Fatal(err)
	}
	fresh := newMachine(t, sys, false, false)
	if err := Restore(badChain, fresh, sup); !errors.Is(err, snapshot.ErrTampered) {
		t.Fatalf("restore of a tampered snapshot: %v, want ErrTampered", err)
	}
	for i := int64(0); i < int64(blk.Pages()); i++ {
		p := blk.FirstPage + uint64(i)
		if !bytes.Equal(fresh.RAM[0].Host[p*4096:(p+1)*4096], make([]byte, 4096)) {
			t.Fatalf("page %d of the tampered block reached RAM", p)
		}
	}
}

// TestEachVCPUGetsItsOwnState: two vCPUs run the counter guest to different counts
// (one at a time, so their shared scratch word does not race); after a save and a
// restore each continues from its own count, so sections went to the right vCPU.
func TestEachVCPUGetsItsOwnState(t *testing.T) {
	sys := openKVM(t)
	sup, err := sys.StateSupport()
	if err != nil {
		t.Fatal(err)
	}
	a := buildMachine(t, sys, machineSpec{size: ramSize, code: counterCode, vcpus: 2})
	for want := byte(1); want <= 7; want++ {
		if got := countOn(t, a, 1); got != want {
			t.Fatalf("vCPU 1 counted %d, want %d", got, want)
		}
		if want <= 3 {
			if got := countOn(t, a, 0); got != want {
				t.Fatalf("vCPU 0 counted %d, want %d", got, want)
			}
		}
	}
	file, _, _ := save(t, a, sup, snapshot.Options{Generation: 1}, nil)
	chain, err := snapshot.NewChain(openSnap(t, file))
	if err != nil {
		t.Fatal(err)
	}
	b := buildMachine(t, sys, machineSpec{size: ramSize, vcpus: 2})
	if err := Restore(chain, b, sup); err != nil {
		t.Fatal(err)
	}
	if got := countOn(t, b, 0); got != 4 {
		t.Fatalf("restored vCPU 0 counted %d, want 4", got)
	}
	if got := countOn(t, b, 1); got != 8 {
		t.Fatalf("restored vCPU 1 counted %d, want 8", got)
	}
	one := buildMachine(t, sys, machineSpec{size: ramSize})
	if err := Restore(chain, one, sup); err == nil || !strings.Contains(err.Error(), "vCPU count") {
		t.Fatalf("restore of two vCPUs into a one-vCPU machine: %v", err)
	}
}
