//go:build linux && amd64

package kvm

import (
	"errors"
	"fmt"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// runHeader is the fixed part of struct kvm_run up to and including the sync-regs
// control words (x86-64 layout).
type runHeader struct {
	RequestInterruptWindow uint8
	ImmediateExit          uint8
	_                      [6]uint8
	ExitReason             uint32
	ReadyForInterrupt      uint8
	IFFlag                 uint8
	Flags                  uint16
	CR8                    uint64
	APICBase               uint64
	Exit                   [256]byte // the exit-reason union
	ValidRegs              uint64
	DirtyRegs              uint64
}

// syncRegs is struct kvm_sync_regs, which follows runHeader in the mapping.
type syncRegs struct {
	Regs   Regs
	Sregs  Sregs
	Events VCPUEvents
}

// Sync-register sets (KVM_SYNC_X86_*), for EnableSyncRegs.
const (
	SyncRegs   = 1 << 0
	SyncSregs  = 1 << 1
	SyncEvents = 1 << 2
)

// VCPU is one virtual CPU. Run must be called from one goroutine at a time, which should
// be locked to its OS thread (runtime.LockOSThread) so Kick can interrupt it.
type VCPU struct {
	id     int
	fd     int
	runMem []byte
	run    *runHeader
	tid    atomic.Int32
	kicked atomic.Bool
}

// ID returns the vCPU index.
func (c *VCPU) ID() int { return c.id }

// FD returns the vCPU file descriptor, for ioctls this package does not wrap.
func (c *VCPU) FD() int { return c.fd }

// Close unmaps the run structure and closes the vCPU.
func (c *VCPU) Close() error {
	err1 := unix.Munmap(c.runMem)
	err2 := unix.Close(c.fd)
	return errors.Join(err1, err2)
}

// Run enters the guest until the next exit that needs userspace and decodes it.
// A Kick turns into an *ExitInterrupted; signals the Go runtime sends to the thread
// are absorbed and the guest re-entered.
func (c *VCPU) Run() (Exit, error) {
	c.tid.Store(int32(unix.Gettid()))
	defer c.tid.Store(0)
	for {
		if c.kicked.Swap(false) {
			c.run.ImmediateExit = 0
			return &ExitInterrupted{}, nil
		}
		_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(c.fd), ioctlRun, 0)
		if errno == unix.EINTR {
			continue // either a kick (checked at the loop top) or a runtime signal
		}
		if errno != 0 {
			return nil, fmt.Errorf("KVM_RUN vCPU %d: %w", c.id, errno)
		}
		return c.decodeExit()
	}
}

// Kick makes the vCPU's current or next Run return *ExitInterrupted. It is safe to call
// from any goroutine.
func (c *VCPU) Kick() {
	c.kicked.Store(true)
	// immediate_exit makes a KVM_RUN that has not entered the guest yet return EINTR;
	// the signal interrupts one that has.
	atomic.StoreUint32(immediateExit(c.run), 1<<8)
	if tid := c.tid.Load(); tid != 0 {
		_ = unix.Tgkill(unix.Getpid(), int(tid), unix.SIGURG)
	}
}

// EnableSyncRegs asks KVM to copy the given register sets (SyncRegs, SyncSregs,
// SyncEvents) into the run structure at every exit, so SyncedRegs and SyncedSregs cost
// no ioctl.
func (c *VCPU) EnableSyncRegs(sets uint64) { c.run.ValidRegs = sets }

func (c *VCPU) sync() *syncRegs {
	return syncRegsOf(c.runMem)
}

// SyncedRegs returns the general registers KVM stored at the last exit; valid only with
// SyncRegs enabled. Writes take effect at the next Run after MarkRegsDirty.
func (c *VCPU) SyncedRegs() *Regs { return &c.sync().Regs }

// SyncedSregs returns the special registers KVM stored at the last exit; valid only with
// SyncSregs enabled.
func (c *VCPU) SyncedSregs() *Sregs { return &c.sync().Sregs }

// MarkRegsDirty makes the next Run load the synced general registers into the vCPU.
func (c *VCPU) MarkRegsDirty() { c.run.DirtyRegs |= SyncRegs }

// Regs reads the general registers.
func (c *VCPU) Regs() (Regs, error) {
	var r Regs
	_, err := ioctlArg(c.fd, "KVM_GET_REGS", ioctlGetRegs, &r)
	return r, err
}

// SetRegs writes the general registers.
func (c *VCPU) SetRegs(r Regs) error {
	_, err := ioctlArg(c.fd, "KVM_SET_REGS", ioctlSetRegs, &r)
	return err
}

// Sregs reads the special registers.
func (c *VCPU) Sregs() (Sregs, error) {
	var s Sregs
	_, err := ioctlArg(c.fd, "KVM_GET_SREGS", ioctlGetSregs, &s)
	return s, err
}

// SetSregs writes the special registers.
func (c *VCPU) SetSregs(s Sregs) error {
	_, err := ioctlArg(c.fd, "KVM_SET_SREGS", ioctlSetSregs, &s)
	return err
}

// FPU reads the x87/SSE state.
func (c *VCPU) FPU() (FPU, error) {
	var f FPU
	_, err := ioctlArg(c.fd, "KVM_GET_FPU", ioctlGetFPU, &f)
	return f, err
}

// SetFPU writes the x87/SSE state.
func (c *VCPU) SetFPU(f FPU) error {
	_, err := ioctlArg(c.fd, "KVM_SET_FPU", ioctlSetFPU, &f)
	return err
}

// XSAVE reads the XSAVE area (all extended state components).
func (c *VCPU) XSAVE() (*XSAVE, error) {
	x := new(XSAVE)
	_, err := ioctlArg(c.fd, "KVM_GET_XSAVE", ioctlGetXSAVE, x)
	return x, err
}

// SetXSAVE writes the XSAVE area.
func (c *VCPU) SetXSAVE(x *XSAVE) error {
	_, err := ioctlArg(c.fd, "KVM_SET_XSAVE", ioctlSetXSAVE, x)
	return err
}

// Events reads pending and injected events.
func (c *VCPU) Events() (VCPUEvents, error) {
	var e VCPUEvents
	_, err := ioctlArg(c.fd, "KVM_GET_VCPU_EVENTS", ioctlGetVCPUEvents, &e)
	return e, err
}

// SetEvents writes pending and injected events (for example to inject an exception).
func (c *VCPU) SetEvents(e VCPUEvents) error {
	_, err := ioctlArg(c.fd, "KVM_SET_VCPU_EVENTS", ioctlSetVCPUEvents, &e)
	return err
}

// MSRs reads the given MSRs; it fails naming the first one KVM could not read.
func (c *VCPU) MSRs(indices ...uint32) ([]MSR, error) {
	if len(indices) == 0 {
		return nil, nil
	}
	buf := make([]byte, 8+16*len(indices))
	setCount(buf, len(indices))
	entries := entriesAt[msrEntry](buf, 8, len(indices))
	for i, idx := range indices {
		entries[i].Index = idx
	}
	n, err := ioctlArg(c.fd, "KVM_GET_MSRS", ioctlGetMSRs, &buf[0])
	if err != nil {
		return nil, err
	}
	if n != len(indices) {
		return nil, fmt.Errorf("KVM_GET_MSRS: MSR %#x could not be read", indices[n])
	}
	out := make([]MSR, len(indices))
	for i, e := range entries {
		out[i] = MSR{Index: e.Index, Data: e.Data}
	}
	return out, nil
}

// SetMSRs writes the given MSRs; it fails naming the first one KVM refused.
func (c *VCPU) SetMSRs(msrs ...MSR) error {
	if len(msrs) == 0 {
		return nil
	}
	buf := make([]byte, 8+16*len(msrs))
	setCount(buf, len(msrs))
	entries := entriesAt[msrEntry](buf, 8, len(msrs))
	for i, m := range msrs {
		entries[i] = msrEntry{Index: m.Index, Data: m.Data}
	}
	n, err := ioctlArg(c.fd, "KVM_SET_MSRS", ioctlSetMSRs, &buf[0])
	if err != nil {
		return err
	}
	if n != len(msrs) {
		return fmt.Errorf("KVM_SET_MSRS: MSR %#x was refused", msrs[n].Index)
	}
	return nil
}

// SetCPUID sets the CPUID leaves the guest sees.
func (c *VCPU) SetCPUID(entries []CPUIDEntry) error {
	if len(entries) == 0 {
		return errors.New("KVM_SET_CPUID2: no entries")
	}
	buf := make([]byte, 8+len(entries)*int(sizeOf[CPUIDEntry]()))
	setCount(buf, len(entries))
	copy(entriesAt[CPUIDEntry](buf, 8, len(entries)), entries)
	_, err := ioctlArg(c.fd, "KVM_SET_CPUID2", ioctlSetCPUID2, &buf[0])
	return err
}

// SetGuestDebug sets guest debugging (GuestDebug* flags, hardware breakpoints in dr[0..3],
// dr7 in dr[7]). Control 0 turns debugging off.
func (c *VCPU) SetGuestDebug(control uint32, dr [8]uint64) error {
	d := guestDebug{Control: control, DebugReg: dr}
	_, err := ioctlArg(c.fd, "KVM_SET_GUEST_DEBUG", ioctlSetGuestDebug, &d)
	return err
}

// TSCKHz returns the vCPU's TSC frequency in kHz.
func (c *VCPU) TSCKHz() (uint64, error) {
	n, err := ioctlVal(c.fd, "KVM_GET_TSC_KHZ", ioctlGetTSCKHz, 0)
	return uint64(n), err
}

// Translation is the result of Translate.
type Translation struct {
	Physical  uint64
	Valid     bool
	Writeable bool
	User      bool
}

// Translate asks KVM to translate a guest-virtual address with the vCPU's current paging.
func (c *VCPU) Translate(gva uint64) (Translation, error) {
	t := translation{LinearAddress: gva}
	if _, err := ioctlArg(c.fd, "KVM_TRANSLATE", ioctlTranslate, &t); err != nil {
		return Translation{}, err
	}
	return Translation{Physical: t.PhysicalAddress, Valid: t.Valid != 0, Writeable: t.Writeable != 0, User: t.Usermode != 0}, nil
}
