package monitor

import (
	"bytes"
	"context"
	"encoding/binary"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/guestimage"
	"github.com/umbra-cc/umbra/kvm"
)

func testLAPIC(regs map[int]uint32) *kvm.LAPICState {
	s := new(kvm.LAPICState)
	for off, v := range regs {
		binary.LittleEndian.PutUint32(s.Regs[off:], v)
	}
	return s
}

func TestSliceFollowsGuestTimer(t *testing.T) {
	const max = 10 * time.Millisecond
	enabled := uint32(0x100 | 0xff)
	periodic := uint32(0x20 | 1<<17)
	for _, tc := range []struct {
		name  string
		timer guestTimer
		want  time.Duration
	}{
		{"periodic, divide by 16, 1.5 ms left", guestTimer{lapic: testLAPIC(map[int]uint32{apicSVR: enabled, apicLVTTimer: periodic, apicTimerDiv: 3, apicTimerCount: 93750})}, 1500 * time.Microsecond},
		{"one-shot, divide by 1", guestTimer{lapic: testLAPIC(map[int]uint32{apicSVR: enabled, apicLVTTimer: 0x20, apicTimerDiv: 0xb, apicTimerCount: 2_000_000})}, 2 * time.Millisecond},
		{"divide by 128", guestTimer{lapic: testLAPIC(map[int]uint32{apicSVR: enabled, apicLVTTimer: periodic, apicTimerDiv: 0xa, apicTimerCount: 10_000})}, 1280 * time.Microsecond},
		{"due in 10 µs: the shortest slice", guestTimer{lapic: testLAPIC(map[int]uint32{apicSVR: enabled, apicLVTTimer: periodic, apicTimerDiv: 0xb, apicTimerCount: 10_000})}, minCloakSlice},
		{"a long period: the longest slice", guestTimer{lapic: testLAPIC(map[int]uint32{apicSVR: enabled, apicLVTTimer: periodic, apicTimerDiv: 3, apicTimerCount: 0xffffffff})}, max},
		{"LVT masked", guestTimer{lapic: testLAPIC(map[int]uint32{apicSVR: enabled, apicLVTTimer: periodic | 1<<16, apicTimerDiv: 3, apicTimerCount: 1000})}, max},
		{"APIC software-disabled", guestTimer{lapic: testLAPIC(map[int]uint32{apicSVR: 0xff, apicLVTTimer: periodic, apicTimerDiv: 3, apicTimerCount: 1000})}, max},
		{"one-shot expired", guestTimer{lapic: testLAPIC(map[int]uint32{apicSVR: enabled, apicLVTTimer: 0x20, apicTimerDiv: 3})}, max},
		{"reserved mode", guestTimer{lapic: testLAPIC(map[int]uint32{apicSVR: enabled, apicLVTTimer: 0x20 | 3<<17, apicTimerCount: 1000})}, max},
		{"TSC deadline in 3 ms", guestTimer{lapic: testLAPIC(map[int]uint32{apicSVR: enabled, apicLVTTimer: 0x20 | 2<<17}), tsc: 1_000_000, deadline: 1_000_000 + 3*2_000_000, tscKHz: 2_000_000}, 3 * time.Millisecond},
		{"TSC deadline passed", guestTimer{lapic: testLAPIC(map[int]uint32{apicSVR: enabled, apicLVTTimer: 0x20 | 2<<17}), tsc: 5, deadline: 4, tscKHz: 2_000_000}, minCloakSlice},
		{"TSC deadline disarmed", guestTimer{lapic: testLAPIC(map[int]uint32{apicSVR: enabled, apicLVTTimer: 0x20 | 2<<17}), tsc: 5, tscKHz: 2_000_000}, max},
		{"TSC deadline far away", guestTimer{lapic: testLAPIC(map[int]uint32{apicSVR: enabled, apicLVTTimer: 0x20 | 2<<17}), deadline: ^uint64(0), tscKHz: 1}, max},
		{"no LAPIC state", guestTimer{}, max},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := sliceFor(tc.timer, max); got != tc.want {
				t.Errorf("slice %v, want %v", got, tc.want)
			}
		})
	}
}

// spinBeside runs a cloaked cloakprobe:spin beside two uncloaked counters and counts
// the counter lines printed while the cloaked app computed.
func spinBeside(t *testing.T, cmdline string, slice time.Duration) (during int, a CloakedAppSummary, out string) {
	t.Helper()
	var console lockedBuffer
	res, err := Run(context.Background(), Config{
		Image: guestimage.Image(), MemorySize: 64 << 20, Cmdline: cmdline,
		Console: &console, Timeout: 120 * time.Second, CloakSlice: slice,
	})
	out = console.String()
	if err != nil || res.ExitStatus != 0 {
		t.Fatalf("%s: %v %+v\n%s", cmdline, err, res, out)
	}
	_, rest, ok := strings.Cut(out, "cloakprobe: spin start")
	spun, _, ok2 := strings.Cut(rest, "cloakprobe: spin done")
	if !ok || !ok2 {
		t.Fatalf("no spin start/done:\n%s", out)
	}
	for _, c := range res.CloakedApps {
		if c.Name == "cloakprobe" {
			a = c
		}
	}
	return strings.Count(spun, "counter "), a, out
}

// TestCloakSliceFairness shows that the guest kernel's own timer preempts a spinning
// cloaked app even when the monitor's bound on the slice is an hour: uncloaked
// processes keep making progress beside it. With the kernel's tick slowed to a
// second the app is not preempted under the hour bound (so it was the kernel's timer
// that preempted it), and the default bound hands the kernel the CPU every 10 ms
// whatever its timer says.
func TestCloakSliceFairness(t *testing.T) {
	requireGuestKVM(t)
	const run = "run=cloakprobe:spin:300:cloak,counter:a:100:4,counter:b:100:4"
	for _, tc := range []struct {
		name           string
		cmdline        string
		slice          time.Duration
		interleave     bool   // counters print while the cloaked app computes
		minPre, maxPre uint64 // preemptions of the cloaked app
	}{
		{"kernel tick 2 ms, bound 1 h", run, time.Hour, true, 20, 1 << 20},
		// Preempted only at the kernel's 1 s ticks that land in the spin (which
		// shares the CPU with the counters): a handful, against one per 10 ms.
		{"kernel tick 1 s, bound 1 h", run + " tick_us=1000000", time.Hour, false, 0, 8},
		{"kernel tick 1 s, default bound", run + " tick_us=1000000", 0, false, 20, 1 << 20},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			during, a, out := spinBeside(t, tc.cmdline, tc.slice)
			t.Logf("%d counter lines while the cloaked app computed; %d preemptions", during, a.Preempted)
			if tc.interleave && during < 2 {
				t.Errorf("%d counter lines while the cloaked app computed:\n%s", during, out)
			}
			if a.Preempted < tc.minPre || a.Preempted > tc.maxPre {
				t.Errorf("%d preemptions, want %d..%d:\n%s", a.Preempted, tc.minPre, tc.maxPre, out)
			}
		})
	}
}

// timedConsole records when the guest printed each of a set of markers.
type timedConsole struct {
	mu      sync.Mutex
	buf     bytes.Buffer
	markers []string
	at      map[string]time.Time
}

func (c *timedConsole) Write(p []byte) (int, error) {
	now := time.Now()
	c.mu.Lock()
	defer c.mu.Unlock()
	c.buf.Write(p)
	for _, m := range c.markers {
		if _, seen := c.at[m]; !seen && bytes.Contains(c.buf.Bytes(), []byte(m)) {
			c.at[m] = now
		}
	}
	return len(p), nil
}
