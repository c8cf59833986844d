package monitor

import (
	"bytes"
	"context"
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/kvm"
)

// TestVCPUStateRoundTrip saves the vCPU of a guest stopped mid-run and restores it
// into a freshly built VM: the new vCPU has the old one's registers, special
// registers and MSRs, and saving it again gives the same section.
func TestVCPUStateRoundTrip(t *testing.T) {
	requireKVM(t)
	img := testELF(guestSpin, testLoad, 0)
	a, err := New(Config{Image: img, MemorySize: 4 << 20, Timeout: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	if _, err := a.Run(context.Background()); !errors.Is(err, ErrTimeout) {
		t.Fatalf("run: %v, want a timeout", err)
	}
	holders := a.StateHolders()
	if len(holders) != 1 || holders[0].StateName() != "vcpu/0" {
		t.Fatalf("state holders %v", holders)
	}
	var saved bytes.Buffer
	if err := holders[0].SaveState(&saved); err != nil {
		t.Fatal(err)
	}
	want, err := decodeVCPUState(bytes.NewReader(saved.Bytes()))
	if err != nil {
		t.Fatal(err)
	}
	if want.Regs.RIP != testLoad {
		t.Fatalf("saved rip %#x, want the spin loop at %#x", want.Regs.RIP, testLoad)
	}

	b, err := New(Config{Image: img, MemorySize: 4 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	// Make the fresh vCPU differ from the saved one first.
	r, _ := b.cpu.Regs()
	r.RAX, r.R15 = 0x1111, 0x2222
	if err := b.cpu.SetRegs(r); err != nil {
		t.Fatal(err)
	}
	if err := b.StateHolders()[0].RestoreState(bytes.NewReader(saved.Bytes())); err != nil {
		t.Fatal(err)
	}
	var again bytes.Buffer
	if err := b.StateHolders()[0].SaveState(&again); err != nil {
		t.Fatal(err)
	}
	got, err := decodeVCPUState(bytes.NewReader(again.Bytes()))
	if err != nil {
		t.Fatal(err)
	}
	if got.Regs != want.Regs {
		t.Errorf("registers after restore %+v, want %+v", got.Regs, want.Regs)
	}
	if got.Sregs != want.Sregs {
		t.Errorf("special registers after restore %+v, want %+v", got.Sregs, want.Sregs)
	}
	// The TSC moves on by itself; every other MSR must be as saved.
	for i, m := range want.MSRs {
		if m.Index != msrTSC && got.MSRs[i] != m {
			t.Errorf("MSR %#x after restore %#x, want %#x", m.Index, got.MSRs[i].Data, m.Data)
		}
	}
}

// TestDecodeVCPUStateRefuses: a hostile section is refused with a reason, and only
// the MSRs a vCPU section may carry are ever set.
func TestDecodeVCPUStateRefuses(t *testing.T) {
	var good bytes.Buffer
	snap := &vcpuSnapshot{MSRs: []kvm.MSR{{Index: msrLSTAR, Data: 0xffffffff81000000}}}
	snap.Regs.RIP = 0x1000
	if err := encodeVCPUState(&good, snap); err != nil {
		t.Fatal(err)
	}
	if got, err := decodeVCPUState(bytes.NewReader(good.Bytes())); err != nil || !reflect.DeepEqual(got, snap) {
		t.Fatalf("round trip: %+v, %v", got, err)
	}
	withMSR := func(index uint64) []byte {
		var b bytes.Buffer
		s := *snap
		s.MSRs = nil
		encodeVCPUState(&b, &s)
		raw := b.Bytes()
		raw = raw[:len(raw)-4]
		raw = append(raw, 1, 0, 0, 0)
		for i := range 8 {
			raw = append(raw, byte(index>>(8*i)))
		}
		return append(raw, make([]byte, 8)...)
	}
	twice := append([]byte(nil), good.Bytes()...)
	twice[len(twice)-20] = 2 // count 2: the same MSR again
	twice = append(twice, good.Bytes()[len(good.Bytes())-16:]...)
	badMagic := append([]byte(nil), good.Bytes()...)
	badMagic[7] = 2
	for name, tc := range map[string]struct {
		raw  []byte
		want string
	}{
		"empty":           {nil, "header: the section is truncated"},
		"version 2":       {badMagic, "is not a version-1"},
		"truncated":       {good.Bytes()[:len(good.Bytes())-3], "MSR 0: the section is truncated"},
		"trailing bytes":  {append(append([]byte(nil), good.Bytes()...), 0), "bytes after the last MSR"},
		"EFER via MSR":    {withMSR(0xc0000080), "MSR 0xc0000080 is not one"},
		"APIC base":       {withMSR(0x1b), "MSR 0x1b is not one"},
		"index above u32": {withMSR(1<<32 | msrLSTAR), "is not one"},
		"same MSR twice":  {twice, "appears twice"},
	} {
		_, err := decodeVCPUState(bytes.NewReader(tc.raw))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error with %q", name, err, tc.want)
		}
	}
}

// FuzzDecodeVCPUState: any bytes decode or are refused without a panic, and what
// decodes encodes back to a section that decodes to the same state.
func FuzzDecodeVCPUState(f *testing.F) {
	var seed bytes.Buffer
	encodeVCPUState(&seed, &vcpuSnapshot{MSRs: []kvm.MSR{{Index: msrSTAR, Data: 1}, {Index: msrTSC, Data: 2}}})
	f.Add(seed.Bytes())
	f.Add([]byte("UMBVCPU\x01"))
	f.Fuzz(func(t *testing.T, raw []byte) {
		s, err := decodeVCPUState(bytes.NewReader(raw))
		if err != nil {
			return
		}
		var b bytes.Buffer
		if err := encodeVCPUState(&b, s); err != nil {
			t.Fatal(err)
		}
		s2, err := decodeVCPUState(bytes.NewReader(b.Bytes()))
		if err != nil || !reflect.DeepEqual(s, s2) {
			t.Fatalf("re-encoded state decodes to %+v, %v; want %+v", s2, err, s)
		}
	})
}
