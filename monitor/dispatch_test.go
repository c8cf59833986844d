package monitor

import (
	"errors"
	"slices"
	"testing"

	"github.com/umbra-cc/umbra/appcontext"
	"github.com/umbra-cc/umbra/bus"
	"github.com/umbra-cc/umbra/kvm"
)

// recordingCalls returns a handler that records the name of the range it serves.
func recordingCalls(name string, got *[]string) hypercallFunc {
	return func(c Call, _ *kvm.ExitMMIO) (uint64, bool, error) {
		*got = append(*got, name)
		return c.Nr + 1, name == "cloak" && c.Args[0] == 1, nil
	}
}

// TestDispatchHypercallByNumberRange routes calls through a table laid out as the VM
// lays it out (core, cloaking, page protection), with dummy handlers and no KVM.
func TestDispatchHypercallByNumberRange(t *testing.T) {
	var tab hypercallTable
	var got []string
	for _, r := range []struct {
		name        string
		first, last uint64
	}{
		{"core", HypercallVersion, HypercallExit},
		{"cloak", appcontext.CallRegister, callLast},
		{"pageprot", 0x200, 0x2FF},
	} {
		if err := tab.register(r.name, r.first, r.last, recordingCalls(r.name, &got)); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		nr       uint64
		arg0     uint64
		want     string // "" = no range: -ENOSYS
		deferred bool
	}{
		{HypercallVersion, 0, "core", false},
		{HypercallExit, 0, "core", false},
		{HypercallExit + 1, 0, "", false},
		{0xFF, 0, "", false},
		{appcontext.CallRegister, 0, "cloak", false},
		{callRelease, 1, "cloak", true},
		{callLast, 0, "cloak", false},
		{0x200, 0, "pageprot", false},
		{0x2FF, 0, "pageprot", false},
		{0x300, 0, "", false},
		{^uint64(0), 0, "", false},
	} {
		got = nil
		ret, deferred, err := dispatchHypercall(&tab, Call{Nr: tc.nr, Args: [6]uint64{tc.arg0}}, nil)
		if err != nil {
			t.Fatalf("call %#x: %v", tc.nr, err)
		}
		if tc.want == "" {
			if len(got) != 0 || ret != negErrno(errnoENOSYS) {
				t.Errorf("call %#x: handled by %v, ret %#x; want -ENOSYS from no handler", tc.nr, got, ret)
			}
			continue
		}
		if !slices.Equal(got, []string{tc.want}) || ret != tc.nr+1 || deferred != tc.deferred {
			t.Errorf("call %#x: handled by %v (ret %#x, deferred %v), want %s", tc.nr, got, ret, deferred, tc.want)
		}
	}
	// A feature cannot take numbers another owns, nor register an empty range.
	for _, r := range [][2]uint64{{0x1F0, 0x210}, {0, 0}, {0x2FF, 0x2FF}, {0x150, 0x150}} {
		if err := tab.register("rogue", r[0], r[1], recordingCalls("rogue", &got)); !errors.Is(err, bus.ErrOverlap) {
			t.Errorf("register rogue [%#x, %#x]: %v, want an overlap error", r[0], r[1], err)
		}
	}
	if err := tab.register("empty", 0x400, 0x3FF, recordingCalls("empty", &got)); err == nil {
		t.Error("an empty range was registered")
	}
	if err := tab.register("next", 0x300, 0x3FF, recordingCalls("next", &got)); err != nil {
		t.Errorf("a free range was refused: %v", err)
	}
}

// dummyDevice records accesses and answers with what it is told to.
type dummyDevice struct {
	name string
	log  *[]string
	err  error
}

func (d dummyDevice) Read(off uint64, data []byte) error {
	*d.log = append(*d.log, d.name)
	for i := range data {
		data[i] = 0xab
	}
	return d.err
}

func (d dummyDevice) Write(off uint64, data []byte) error {
	*d.log = append(*d.log, d.name)
	return d.err
}

// TestDispatchMMIOByBusEntry routes MMIO accesses through a bus laid out as the VM's
// (RAM for page protection, the doorbell, the power register), with dummy devices.
func TestDispatchMMIOByBusEntry(t *testing.T) {
	const ram = 64 << 20
	var b bus.Bus
	var log []string
	notMine := dummyDevice{name: "pageprot-ram", log: &log, err: errNotMine}
	for _, e := range []struct {
		name       string
		base, size uint64
		dev        bus.Device
	}{
		{"pageprot-ram", 0, ram, notMine},
		{"doorbell", DoorbellGPA, PageSize, dummyDevice{name: "doorbell", log: &log}},
		{"power", PowerGPA, PageSize, dummyDevice{name: "power", log: &log, err: &verbatimError{errors.New("powered off")}}},
		{"broken", PowerGPA + PageSize, PageSize, dummyDevice{name: "broken", log: &log, err: errors.New("device fault")}},
	} {
		if err := b.Insert(e.name, e.base, e.size, e.dev); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		addr    uint64
		n       int
		write   bool
		owner   string // device called, "" none
		claimed bool
		err     string // "" none; else the whole message, or a prefix ending in ": "
	}{
		{0x1000, 8, false, "pageprot-ram", false, ""}, // RAM whose owner does not claim the exit
		{ram - 4, 8, true, "", false, ""},             // straddles the end of RAM: no device
		{ram, 4, false, "", false, ""},                // the hole above RAM
		{DoorbellGPA, 8, false, "doorbell", true, ""},
		{DoorbellGPA + PageSize - 8, 8, true, "doorbell", true, ""},
		{PowerGPA, 1, true, "power", true, "powered off"}, // reported verbatim
		{PowerGPA + PageSize, 4, true, "broken", true, "broken: write at offset 0x0: device fault"},
	} {
		log = nil
		data := make([]byte, tc.n)
		claimed, err := dispatchMMIO(&b, tc.addr, data, tc.write)
		var owners []string
		if tc.owner != "" {
			owners = []string{tc.owner}
		}
		if !slices.Equal(log, owners) || claimed != tc.claimed {
			t.Errorf("%d-byte access at %#x: devices %v, claimed %v; want %v, %v", tc.n, tc.addr, log, claimed, owners, tc.claimed)
		}
		switch {
		case tc.err == "" && err != nil:
			t.Errorf("access at %#x: %v", tc.addr, err)
		case tc.err != "" && (err == nil || err.Error() != tc.err):
			t.Errorf("access at %#x: error %v, want %q", tc.addr, err, tc.err)
		}
	}
}

// TestVMExitRoutes: a VM's exit tables hold the entries its parts register, and
// nothing else claims an exit.
func TestVMExitRoutes(t *testing.T) {
	requireKVM(t)
	v, err := New(Config{Image: testELF(guestSpin, testLoad, 0), MemorySize: 4 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	var calls, mmio []string
	for _, r := range v.hypercalls.ranges() {
		calls = append(calls, r.Name)
	}
	for _, r := range v.mmio.Ranges() {
		mmio = append(mmio, r.Name)
	}
	if want := []string{"core", "cloak", "pageprot"}; !slices.Equal(calls, want) {
		t.Errorf("hypercall ranges %v, want %v", calls, want)
	}
	if want := []string{"pageprot-ram", "doorbell", "power"}; !slices.Equal(mmio, want) {
		t.Errorf("MMIO bus entries %v, want %v", mmio, want)
	}
}

// ranges returns the registered ranges in number order.
func (t *hypercallTable) ranges() []bus.Range { return t.b.Ranges() }
