package monitor

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/kvm"
)

// TestVCPUStateRoundTrip saves the vCPU of a guest stopped mid-run and restores it
// into a freshly built VM through the checkpoints' vCPU holder: the new vCPU has the
// old one's registers, special registers and MSRs, and saving it again gives the same
// state.
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
	sup, err := a.sys.StateSupport()
	if err != nil {
		t.Fatal(err)
	}
	holder := fullVCPUState{a.cpu, sup}
	if holder.StateName() != "vcpu/0" {
		t.Fatalf("holder %q", holder.StateName())
	}
	var saved bytes.Buffer
	if err := holder.SaveState(&saved); err != nil {
		t.Fatal(err)
	}
	want, err := decodeVCPUSection(bytes.NewReader(saved.Bytes()), sup.MSRs)
	if err != nil {
		t.Fatal(err)
	}
	if want.Regs.RIP != testLoad {
		t.Fatalf("saved rip %#x, want the spin loop at %#x", want.Regs.RIP, testLoad)
	}
	if _, ok := want.MSR(msrLSTAR); !ok {
		t.Fatal("the saved vCPU carries no LSTAR: the MSR list is not this host's")
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
	if err := (fullVCPUState{b.cpu, sup}).RestoreState(bytes.NewReader(saved.Bytes())); err != nil {
		t.Fatal(err)
	}
	var again bytes.Buffer
	if err := (fullVCPUState{b.cpu, sup}).SaveState(&again); err != nil {
		t.Fatal(err)
	}
	got, err := decodeVCPUSection(bytes.NewReader(again.Bytes()), sup.MSRs)
	if err != nil {
		t.Fatal(err)
	}
	if got.Regs != want.Regs {
		t.Errorf("registers after restore %+v, want %+v", got.Regs, want.Regs)
	}
	if !reflect.DeepEqual(got.Sregs, want.Sregs) || !reflect.DeepEqual(got.Sregs2, want.Sregs2) {
		t.Errorf("special registers after restore %+v %+v, want %+v %+v", got.Sregs, got.Sregs2, want.Sregs, want.Sregs2)
	}
	// The TSC moves on by itself; every other MSR must be as saved.
	for _, m := range want.MSRs {
		if m.Index == msrTSC {
			continue
		}
		if v, ok := got.MSR(m.Index); !ok || v != m.Data {
			t.Errorf("MSR %#x after restore %#x (present %v), want %#x", m.Index, v, ok, m.Data)
		}
	}
}

// testMSRs stands for a host's save/restore list in the KVM-free tests.
var testMSRs = []uint32{
	msrTSC, msrSysenterCS, msrSysenterESP, msrSysenterEIP, msrMiscEnable, msrTSCDeadline,
	msrSTAR, msrLSTAR, msrCSTAR, msrFMASK, msrKernelGSBase,
}

func testVCPUSection(t testing.TB, msrs ...kvm.MSR) []byte {
	st := &kvm.VCPUState{Sregs2: &kvm.Sregs2{}, XSAVE: &kvm.XSAVE{}, LAPIC: &kvm.LAPICState{}, MSRs: msrs}
	st.Regs.RIP = 0x1000
	b, err := st.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestDecodeVCPUStateRefuses: a hostile section is refused with a reason, and only
// the MSRs of the allow-list are ever set.
func TestDecodeVCPUStateRefuses(t *testing.T) {
	good := testVCPUSection(t, kvm.MSR{Index: msrLSTAR, Data: 0xffffffff81000000})
	st, err := decodeVCPUSection(bytes.NewReader(good), testMSRs)
	if err != nil || st.Regs.RIP != 0x1000 || len(st.MSRs) != 1 || st.MSRs[0].Data != 0xffffffff81000000 {
		t.Fatalf("round trip: %+v, %v", st, err)
	}
	// withMSR is good with its one MSR's index replaced (the last 16 bytes are the
	// MSR entry: index u32, padding u32, value u64).
	withMSR := func(index uint64) []byte {
		b := bytes.Clone(good)
		binary.LittleEndian.PutUint64(b[len(b)-16:], index)
		return b
	}
	twice := bytes.Clone(good)
	binary.LittleEndian.PutUint32(twice[len(twice)-24:], 2) // count 2: the same MSR again
	twice = append(twice, good[len(good)-16:]...)
	badMagic := bytes.Clone(good)
	badMagic[4] = 2 // version 2
	noLAPIC, err := (&kvm.VCPUState{Sregs2: &kvm.Sregs2{}, XSAVE: &kvm.XSAVE{}}).MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	for name, tc := range map[string]struct {
		raw  []byte
		want string
	}{
		"empty":           {nil, "not a UVCP encoding"},
		"version 2":       {badMagic, "version 2"},
		"truncated":       {good[:len(good)-3], "MSRs in"},
		"trailing bytes":  {append(bytes.Clone(good), 0), "nothing after"},
		"EFER via MSR":    {withMSR(0xc0000080), "MSR 0xc0000080, which is not among"},
		"APIC base":       {withMSR(0x1b), "MSR 0x1b, which is not among"},
		"index above u32": {withMSR(1<<32 | msrLSTAR), "padding set"},
		"same MSR twice":  {twice, "repeated"},
		"no local APIC":   {noLAPIC, "no local APIC"},
		"over 1 MiB":      {make([]byte, maxKVMSection+1), "over"},
	} {
		_, err := decodeVCPUSection(bytes.NewReader(tc.raw), testMSRs)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error with %q", name, err, tc.want)
		}
	}
	// Without the allow-list (the decoder alone), the EFER section decodes: the
	// refusal above is the allow-list's.
	var raw kvm.VCPUState
	if err := raw.UnmarshalBinary(withMSR(0xc0000080)); err != nil {
		t.Fatalf("the codec itself refused the EFER section (%v): the test shows nothing of the allow-list", err)
	}
}

// FuzzDecodeVCPUState: any bytes decode or are refused without a panic; what decodes
// sets only allow-listed MSRs, each once, and encodes back to the same bytes.
func FuzzDecodeVCPUState(f *testing.F) {
	f.Add(testVCPUSection(f, kvm.MSR{Index: msrSTAR, Data: 1}, kvm.MSR{Index: msrTSC, Data: 2}))
	f.Add(testVCPUSection(f))
	f.Add([]byte("UVCP\x01\x00"))
	f.Fuzz(func(t *testing.T, raw []byte) {
		st, err := decodeVCPUSection(bytes.NewReader(raw), testMSRs)
		if err != nil {
			return
		}
		seen := map[uint32]bool{}
		for _, m := range st.MSRs {
			if seen[m.Index] || !slices.Contains(testMSRs, m.Index) {
				t.Fatalf("decoded MSR %#x: repeated or not allow-listed", m.Index)
			}
			seen[m.Index] = true
		}
		again, err := st.MarshalBinary()
		if err != nil || !bytes.Equal(again, raw) {
			t.Fatalf("decodes but does not re-encode to itself (%v)", err)
		}
	})
}
