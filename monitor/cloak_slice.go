package monitor

// The cloaked app's time slice follows the guest kernel's own timer: appVM runs the
// app until the moment the system VM's local APIC timer would have interrupted it,
// as it would interrupt the same app uncloaked, and never longer than
// Config.CloakSlice (docs/cloak.md, "Preemption").

import (
	"time"

	"github.com/umbra-cc/umbra/kvm"
)

// minCloakSlice is the shortest slice: a guest timer due sooner than this is taken
// this late, rather than parking an app for a tick it has all but reached.
const minCloakSlice = 50 * time.Microsecond

// Local APIC registers (MMIO offsets) and MSRs the slice reads.
const (
	apicSVR        = 0xF0
	apicLVTTimer   = 0x320
	apicTimerCount = 0x390 // current count
	apicTimerDiv   = 0x3E0
	msrTSCDeadline = 0x6E0
)

// guestTimer is what the slice needs to know about the system VM's timer.
type guestTimer struct {
	lapic    *kvm.LAPICState
	tsc      uint64 // guest TSC now (TSC-deadline mode only)
	deadline uint64 // IA32_TSC_DEADLINE (TSC-deadline mode only)
	tscKHz   uint64
}

// apicTimerMode is the LVT timer's mode field (bits 17-18).
func apicTimerMode(lvt uint32) uint32 { return lvt >> 17 & 3 }

// left returns how long the guest's timer runs before it interrupts the guest kernel,
// and false when no timer interrupt is coming (APIC or LVT masked, timer disarmed or
// already expired, a reserved mode).
func (g guestTimer) left() (time.Duration, bool) {
	s := g.lapic
	if s == nil || s.Reg(apicSVR)&(1<<8) == 0 {
		return 0, false // APIC software-disabled: every LVT is masked
	}
	lvt := s.Reg(apicLVTTimer)
	if lvt&(1<<16) != 0 {
		return 0, false
	}
	switch apicTimerMode(lvt) {
	case 0, 1: // one-shot, periodic: the current count runs down at bus/divide
		count := uint64(s.Reg(apicTimerCount))
		if count == 0 {
			return 0, false
		}
		d := s.Reg(apicTimerDiv)
		shift := ((d&3 | d&8>>1) + 1) & 7 // SDM 11.5.4: 0b111 divides by 1
		ns := count << shift * 1_000_000_000 / apicTimerHz
		return time.Duration(ns), true
	case 2: // TSC deadline
		if g.deadline == 0 || g.tscKHz == 0 {
			return 0, false
		}
		if g.deadline <= g.tsc {
			return 0, true // due now
		}
		cycles := g.deadline - g.tsc
		if cycles > uint64(time.Hour/time.Microsecond)*g.tscKHz/1000 {
			return time.Hour, true
		}
		return time.Duration(cycles * 1_000_000 / g.tscKHz), true
	}
	return 0, false
}

// sliceFor returns the slice for an app appVM is about to run: until the guest
// timer's next interrupt, within [minCloakSlice, max].
func sliceFor(g guestTimer, max time.Duration) time.Duration {
	left, armed := g.left()
	switch {
	case !armed || left > max:
		return max
	case left < minCloakSlice:
		return minCloakSlice
	}
	return left
}

// readGuestTimer reads the system VM's timer state; its vCPU is stopped (parked at
// the CLOAK_RESUME exit the app came from).
func readGuestTimer(mc machine) (guestTimer, error) {
	s, err := mc.lapic()
	if err != nil {
		return guestTimer{}, err
	}
	g := guestTimer{lapic: s, tscKHz: mc.tscKHz()}
	if apicTimerMode(s.Reg(apicLVTTimer)) == 2 {
		m, err := mc.msrs(msrTSC, msrTSCDeadline)
		if err != nil {
			return guestTimer{}, err
		}
		g.tsc, g.deadline = m[0].Data, m[1].Data
	}
	return g, nil
}

// appSlice returns the slice for the next run of a cloaked app. If the guest's timer
// cannot be read it logs why and uses the configured slice, which still bounds how
// long the kernel waits.
func (c *cloaking) appSlice() time.Duration {
	g, err := readGuestTimer(c.m)
	if err != nil {
		if !c.timerWarned {
			c.timerWarned = true
			c.m.logger().Warn("cloak: cannot read the guest's timer; cloaked apps run for the whole configured slice", "slice", c.slice, "err", err)
		}
		return c.slice
	}
	return sliceFor(g, c.slice)
}
