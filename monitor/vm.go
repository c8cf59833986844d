package monitor

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"runtime"
	"strings"
	"sync/atomic"
	"time"

	"github.com/umbra-cc/umbra/bus"
	"github.com/umbra-cc/umbra/kvm"
	"github.com/umbra-cc/umbra/serial"
	"github.com/umbra-cc/umbra/virtio"
)

// Config describes one VM run.
type Config struct {
	Image []byte // guest image: an ELF64 x86-64 executable (docs/boot.md), or the Linux kernel when Boot is BootLinux
	// Boot is the boot protocol: BootUmbra (the zero value) or BootLinux (docs/linux.md).
	Boot string
	// Initrd is the initramfs of a Linux boot (a newc cpio archive, plain or gzip); none if nil.
	Initrd     []byte
	MemorySize uint64    // bytes of guest RAM; DefaultMemorySize if zero
	Cmdline    string    // guest command line
	Console    io.Writer // receives serial output and CONSOLE_WRITE hypercalls; discarded if nil
	// Timeout bounds the run's wall-clock time; DefaultTimeout if zero, none if negative.
	Timeout time.Duration
	// MaxExits bounds the number of vCPU exits, a deterministic budget that stops a
	// guest spinning through exits; unlimited if zero.
	MaxExits uint64
	Logger   *slog.Logger // nil: discard
	// KVMDevice overrides /dev/kvm.
	KVMDevice string
	// Hooks connect the VM to policy, audit and measurement (Launch sets them).
	Hooks *Hooks
	// CloakSecret is the VM's cloak master secret (32 bytes, from a sealed bundle);
	// a fresh random one is used if nil.
	CloakSecret []byte
	// CloakSlice is the longest a cloaked app runs before the guest kernel gets the
	// CPU back (DefaultCloakSlice if zero); it gets it sooner, when its own timer
	// would interrupt the app (docs/cloak.md, "Preemption").
	CloakSlice time.Duration
	// Disks are served as virtio-blk devices (disks.go); the caller opens and closes them.
	Disks []Disk
	// NICs are served as virtio-net devices (nets.go), in the virtio slots after the
	// disks; the VM closes their backends when it closes.
	NICs []NIC
	// HotplugDisks is how many empty virtio-blk slots the VM gets, after its disks, for
	// disks attached while it runs (hotplug.go); the VM closes disks still attached
	// when it closes.
	HotplugDisks int
	// HotplugNetworks is how many NIC slots the VM gets, after its NICs, for NICs
	// attached while it runs (hotplug_net.go); the VM closes NICs still attached.
	HotplugNetworks int
}

// Defaults for Config.
const (
	DefaultMemorySize = 64 << 20
	DefaultTimeout    = 60 * time.Second
)

// Counters are what a run did, for results, logs and benchmarks.
type Counters struct {
	Exits              uint64 `json:"exits"`
	IOExits            uint64 `json:"io_exits"`
	MMIOExits          uint64 `json:"mmio_exits"`
	Hypercalls         uint64 `json:"hypercalls"`
	ConsoleBytes       uint64 `json:"console_bytes"`
	DoorbellViolations uint64 `json:"doorbell_violations"`
	UnhandledIO        uint64 `json:"unhandled_io"`
	Interrupts         uint64 `json:"interrupted"`
	AppVMExits         uint64 `json:"appvm_exits"` // exits of the cloaked-app VM (also in Exits)
}

// Result is how a run ended.
type Result struct {
	ExitStatus int           `json:"exit_status"` // from the EXIT hypercall
	Reason     string        `json:"reason"`
	Duration   time.Duration `json:"duration_ns"`
	Counters   Counters      `json:"counters"`
	// CloakedApps lists every app that registered for cloaking, in order.
	CloakedApps []CloakedAppSummary `json:"cloaked_apps,omitempty"`
}

// ErrTimeout is wrapped by the error of a run that exceeded its wall-clock time.
var ErrTimeout = errors.New("guest exceeded its wall-clock time limit")

// ErrExitBudget is wrapped by the error of a run that exceeded its exit budget.
var ErrExitBudget = errors.New("guest exceeded its exit budget")

// ErrInterrupted is wrapped by the error of a run stopped by its context.
var ErrInterrupted = errors.New("run interrupted")

// CrashError reports a guest that stopped in a way it did not ask for (triple fault,
// KVM internal error, an exit the monitor cannot handle), with its registers.
type CrashError struct {
	Reason string
	Regs   kvm.Regs
	Sregs  kvm.Sregs
	// Insn holds up to 15 bytes at RIP when the monitor could read them (always tried
	// for a KVM internal error); nil otherwise.
	Insn []byte
}

func (e *CrashError) Error() string {
	s := "guest crashed: " + e.Reason + "\n" + RegisterDump(&e.Regs, &e.Sregs)
	if e.Insn != nil {
		s += fmt.Sprintf("\n  instruction bytes at rip: % x", e.Insn)
	}
	return s
}

// Summary is the crash as the audit log records it.
func (e *CrashError) Summary() map[string]any {
	m := map[string]any{"reason": e.Reason, "rip": fmt.Sprintf("%#x", e.Regs.RIP), "cpl": e.Sregs.CPL()}
	if e.Insn != nil {
		m["insn"] = fmt.Sprintf("%x", e.Insn)
	}
	return m
}

// RegisterDump formats registers the way a crash report shows them.
func RegisterDump(r *kvm.Regs, s *kvm.Sregs) string {
	var b strings.Builder
	fmt.Fprintf(&b, "  rip %016x rsp %016x rflags %016x cpl %d\n", r.RIP, r.RSP, r.RFLAGS, s.CPL())
	fmt.Fprintf(&b, "  rax %016x rbx %016x rcx %016x rdx %016x\n", r.RAX, r.RBX, r.RCX, r.RDX)
	fmt.Fprintf(&b, "  rsi %016x rdi %016x rbp %016x r8  %016x\n", r.RSI, r.RDI, r.RBP, r.R8)
	fmt.Fprintf(&b, "  r9  %016x r10 %016x r11 %016x r12 %016x\n", r.R9, r.R10, r.R11, r.R12)
	fmt.Fprintf(&b, "  r13 %016x r14 %016x r15 %016x\n", r.R13, r.R14, r.R15)
	fmt.Fprintf(&b, "  cr0 %016x cr2 %016x cr3 %016x cr4 %016x efer %x\n", s.CR0, s.CR2, s.CR3, s.CR4, s.EFER)
	fmt.Fprintf(&b, "  cs %04x ss %04x gdt %x/%x idt %x/%x", s.CS.Selector, s.SS.Selector, s.GDT.Base, s.GDT.Limit, s.IDT.Base, s.IDT.Limit)
	return b.String()
}

// VM is one protected guest under the monitor.
type VM struct {
	cfg     Config
	log     *slog.Logger
	sys     *kvm.System
	kvm     *kvm.VM
	cpu     *kvm.VCPU
	mem     *GuestMemory
	image   Image
	counter Counters
	// pio and mmio route port I/O and MMIO exits to devices (devices.go); uart is COM1.
	pio, mmio bus.Bus
	uart      *serial.UART
	virtio    []*virtio.MMIO // the disks' and NICs' transports, in slot order (disks.go, nets.go)
	nics      []*nic         // the NICs (nets.go)
	hot       []*hotSlot     // the hot-plug slots (hotplug.go)
	hotNets   []*netSlot     // the NIC hot-plug slots (hotplug_net.go)
	diskDevs  []diskDevice   // the spec's disks' devices, in order (snapdisks.go)
	// curMMIO is the MMIO exit being handled, for devices that need more than its data
	// (the doorbell).
	curMMIO *kvm.ExitMMIO
	// maxPhysAddr is the guest's MAXPHYADDR, for page walks.
	maxPhysAddr uint8
	// tscKHz is the guest's TSC frequency (for its TSC-deadline timer).
	tscKHz uint64

	stopReason atomic.Pointer[error]

	// hypercalls routes hypercalls by registered number ranges (dispatch.go).
	hypercalls hypercallTable
	// extensions are the features wired into the VM (page protection, cloaking),
	// through the extension seam (dispatch.go).
	extensions []extension

	// runCtx is the context of the running Run, for hooks called from exit handlers.
	runCtx context.Context
	// ctl is the run loop's mailbox for pause, resume and snapshots (pause.go).
	ctl vcpuMailbox

	// dirtyOn: RAM slots log dirty pages (dirty.go); kept holds the bits of slots
	// page protection deleted since the last checkpoint.
	dirtyOn bool
	kept    []uint64
	// tracking: an interval of dirty pages is open (a checkpoint started, or the VM
	// was restored from one); before that, slot deletions need no harvest, because the
	// first checkpoint copies all of RAM. Set and read on the vCPU thread, or before Run.
	tracking bool
	// ckpt is the checkpoint state: the last reference point, a lazy restore
	// (checkpoint.go).
	ckpt checkpointState
}

// New creates the VM: guest memory, the KVM VM with its in-kernel irqchip, vCPU 0, the
// loaded image and the boot state. Nothing runs until Run.
func New(cfg Config) (_ *VM, err error) {
	if cfg.MemorySize == 0 {
		cfg.MemorySize = DefaultMemorySize
	}
	if cfg.MemorySize < minGuestRAM || cfg.MemorySize > maxGuestRAM || cfg.MemorySize%PageSize != 0 {
		return nil, fmt.Errorf("guest memory size %d bytes: must be a multiple of 4 KiB between %d MiB and %d GiB", cfg.MemorySize, minGuestRAM>>20, maxGuestRAM>>30)
	}
	if len(cfg.Image) == 0 {
		return nil, errors.New("no guest image given")
	}
	if cfg.Boot != BootUmbra && cfg.Boot != BootLinux {
		return nil, fmt.Errorf("boot protocol %q: want %q or %q", cfg.Boot, BootUmbra, BootLinux)
	}
	if cfg.Boot != BootLinux && len(cfg.Initrd) > 0 {
		return nil, errors.New("an initramfs is only for a Linux boot")
	}
	if cfg.Timeout == 0 {
		cfg.Timeout = DefaultTimeout
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	v := &VM{cfg: cfg, log: log}
	v.ctl.init()
	defer func() {
		if err != nil {
			v.Close()
		}
	}()
	if v.sys, err = kvm.Open(cfg.KVMDevice); err != nil {
		return nil, err
	}
	if err = v.sys.Require(kvm.CapUserMemory, kvm.CapIRQChip, kvm.CapSyncRegs, kvm.CapImmediateExit, kvm.CapGetTSCKHz, kvm.CapExtCPUID); err != nil {
		return nil, err
	}
	if v.mem, err = NewGuestMemory(cfg.MemorySize); err != nil {
		return nil, err
	}
	setCPU := func(c *kvm.VCPU) error { return setBootCPUState(c, v.image.Entry) }
	if cfg.Boot == BootLinux {
		if v.image, setCPU, err = loadLinux(v.mem, cfg.Image, cfg.Initrd, virtioCmdline(cfg.Cmdline, len(cfg.Disks)+cfg.HotplugDisks+len(cfg.NICs)+cfg.HotplugNetworks)); err != nil {
			return nil, fmt.Errorf("load Linux kernel: %w", err)
		}
	} else if v.image, err = LoadELF(v.mem, cfg.Image); err != nil {
		return nil, fmt.Errorf("load guest image: %w", err)
	}
	if v.kvm, err = v.sys.CreateVM(); err != nil {
		return nil, err
	}
	if err = v.kvm.SetTSSAddr(0xfffbd000); err != nil {
		return nil, err
	}
	if err = v.kvm.CreateIRQChip(); err != nil {
		return nil, err
	}
	if cfg.Boot == BootLinux {
		// Linux calibrates its local APIC timer against the PIT.
		if err = v.kvm.CreatePIT2(); err != nil {
			return nil, err
		}
	}
	sysView, err := v.mem.View("sys")
	if err != nil {
		return nil, err
	}
	v.dirtyOn = enableDirtyLog(v.kvm)
	v.kept = make([]uint64, (cfg.MemorySize/PageSize+63)/64)
	if err = v.kvm.SetMemoryRegion(kvm.MemoryRegion{Slot: 0, Flags: v.slotFlags(), GuestPhys: 0, Host: sysView}); err != nil {
		return nil, fmt.Errorf("map guest RAM into the VM: %w", err)
	}
	if err = v.installDevices(); err != nil {
		return nil, err
	}
	if err = v.installDisks(); err != nil {
		return nil, err
	}
	if err = v.installHotplug(); err != nil {
		return nil, err
	}
	if err = v.installNICs(); err != nil {
		return nil, err
	}
	if v.cpu, err = v.kvm.CreateVCPU(0); err != nil {
		return nil, err
	}
	cpuid, err := v.sys.SupportedCPUID()
	if err != nil {
		return nil, err
	}
	cpuid = guestCPUID(cpuid)
	if err = v.cpu.SetCPUID(cpuid); err != nil {
		return nil, err
	}
	v.maxPhysAddr = 36
	for _, e := range cpuid {
		if e.Function == 0x80000008 {
			v.maxPhysAddr = uint8(e.EAX)
		}
	}
	tsc, err := v.cpu.TSCKHz()
	if err != nil {
		return nil, err
	}
	v.tscKHz = tsc
	// The test guest finds its virtio devices as Linux does, by virtio_mmio.device= words
	// (its driver: testdata/guest/kernel/vblk.c).
	if cfg.Boot == BootLinux {
		if err = setLinuxMSRs(v.cpu); err != nil {
			return nil, err
		}
	} else if err = writeBootState(v.mem, bootParams{image: v.image, cmdline: virtioCmdline(cfg.Cmdline, len(v.virtio)), tscKHz: tsc, doorbell: DoorbellGPA}); err != nil {
		return nil, err
	}
	if err = setCPU(v.cpu); err != nil {
		return nil, err
	}
	v.cpu.EnableSyncRegs(kvm.SyncRegs | kvm.SyncSregs)
	if err = v.installExtensions(); err != nil {
		return nil, err
	}
	return v, nil
}

// Memory returns guest RAM.
func (v *VM) Memory() *GuestMemory { return v.mem }

// Close releases the vCPU, the VM and guest memory.
func (v *VM) Close() error {
	var errs []error
	if l := v.ckpt.lazy; l != nil {
		errs = append(errs, l.close()) // before guest RAM is unmapped
	}
	errs = append(errs, v.closeNICs(), v.closeHotNets(), v.closeHotplug())
	for i := len(v.extensions) - 1; i >= 0; i-- {
		errs = append(errs, v.extensions[i].close())
	}
	v.extensions = nil
	if v.cpu != nil {
		errs = append(errs, v.cpu.Close())
		v.cpu = nil
	}
	if v.kvm != nil {
		errs = append(errs, v.kvm.Close())
		v.kvm = nil
	}
	if v.mem != nil {
		errs = append(errs, v.mem.Close())
		v.mem = nil
	}
	if v.sys != nil {
		errs = append(errs, v.sys.Close())
		v.sys = nil
	}
	return errors.Join(errs...)
}

// Stop makes a running Run return with err (wrapped); safe from any goroutine.
func (v *VM) Stop(err error) {
	v.stopReason.CompareAndSwap(nil, &err)
	v.kickForControl()
}

// kickAll kicks the system VM's vCPU and the extensions' own vCPUs.
func (v *VM) kickAll() {
	v.cpu.Kick()
	for _, x := range v.extensions {
		x.kick()
	}
}

// Run runs the guest until it exits, crashes, or exceeds its limits. The result is
// returned in every case where the guest ran; err says why a run did not end with the
// guest's own EXIT call.
func (v *VM) Run(ctx context.Context) (*Result, error) {
	start := time.Now()
	res := &Result{ExitStatus: -1}
	finish := func(err error) (*Result, error) {
		err = v.lazyCause(err)
		v.endControl()
		res.Duration = time.Since(start)
		res.Counters = v.counter
		for _, x := range v.extensions {
			x.finish(res)
		}
		v.counter = res.Counters
		if err != nil && res.Reason == "" {
			res.Reason = err.Error()
		}
		return res, err
	}
	runCtx := ctx
	if v.cfg.Timeout > 0 {
		var cancel context.CancelFunc
		runCtx, cancel = context.WithTimeoutCause(ctx, v.cfg.Timeout, ErrTimeout)
		defer cancel()
	}
	// The watchdog kicks the vCPU when the context ends; Run waits for it so a late
	// kick never touches a closed vCPU.
	watchDone := make(chan struct{})
	watchExited := make(chan struct{})
	defer func() {
		close(watchDone)
		<-watchExited
	}()
	go func() {
		defer close(watchExited)
		select {
		case <-runCtx.Done():
			v.kickAll()
		case <-watchDone:
		}
	}()

	v.runCtx = runCtx
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
run:
	for {
		if v.ctl.pending.Load() {
			v.serveControl(runCtx)
		}
		for _, x := range v.extensions {
			ran, err := x.step(runCtx)
			if err != nil {
				return finish(err)
			}
			if ran {
				continue run
			}
		}
		exit, err := v.cpu.Run()
		if err != nil {
			return finish(v.crash(err.Error()))
		}
		v.counter.Exits++
		if v.cfg.MaxExits > 0 && v.counter.Exits > v.cfg.MaxExits {
			return finish(fmt.Errorf("%w (%d exits)", ErrExitBudget, v.cfg.MaxExits))
		}
		st, err := v.handleExit(runCtx, exit)
		if err != nil {
			return finish(err)
		}
		if st != nil {
			res.ExitStatus = st.status
			res.Reason = fmt.Sprintf("guest exited with status %d", st.status)
			return finish(nil)
		}
	}
}

// handleExit handles one vCPU exit: it returns a non-nil guestExit when the guest asked
// to stop, and an error when the run must end otherwise.
func (v *VM) handleExit(runCtx context.Context, exit kvm.Exit) (*guestExit, error) {
	switch e := exit.(type) {
	case *kvm.ExitMMIO:
		v.counter.MMIOExits++
		return deviceResult(v.handleMMIO(e))
	case *kvm.ExitIO:
		v.counter.IOExits++
		return deviceResult(v.handleIO(e))
	case *kvm.ExitInterrupted:
		v.counter.Interrupts++
		return nil, v.interrupted(runCtx)
	case *kvm.ExitInternalError:
		return nil, v.internalError(e)
	case *kvm.ExitShutdown:
		return nil, v.crash("triple fault (the guest took an exception it could not deliver)")
	case *kvm.ExitHLT:
		return nil, v.crash("halted with no interrupt controller to wake it")
	default:
		return nil, v.crash(exit.String())
	}
}

// deviceResult separates a guest's power-off, which devices return as a *guestExit error,
// from errors that end the run otherwise.
func deviceResult(err error) (*guestExit, error) {
	var ge *guestExit
	if errors.As(err, &ge) {
		return ge, nil
	}
	return nil, err
}

// interrupted returns the error that ends the run after a Kick, or nil for a kick
// that only ended a time slice (of a cloaked app in appVM, too: cloak_run.go).
func (v *VM) interrupted(runCtx context.Context) error {
	if p := v.stopReason.Load(); p != nil {
		return fmt.Errorf("%w: %w", ErrInterrupted, *p)
	}
	if runCtx.Err() != nil {
		if errors.Is(context.Cause(runCtx), ErrTimeout) {
			return fmt.Errorf("%w (%v); %s", ErrTimeout, v.cfg.Timeout, v.where())
		}
		return fmt.Errorf("%w: %w", ErrInterrupted, context.Cause(runCtx))
	}
	return nil
}

// where describes the vCPU's position for timeout messages.
func (v *VM) where() string {
	r, err1 := v.cpu.Regs()
	s, err2 := v.cpu.Sregs()
	if err1 != nil || err2 != nil {
		return "registers unavailable"
	}
	return "guest was at rip " + fmt.Sprintf("%#x cpl %d", r.RIP, s.CPL())
}

// internalError ends the run on KVM_EXIT_INTERNAL_ERROR (KVM could not emulate an
// instruction, or could not deliver an event): the error names the suberror and carries
// the registers and the instruction bytes at RIP, read through the guest's page tables.
func (v *VM) internalError(e *kvm.ExitInternalError) error {
	err := v.crash(e.String()).(*CrashError)
	err.Insn = v.insnBytes(err.Regs.RIP)
	return err
}

// insnBytes reads up to 15 bytes at the guest-virtual rip (nil if it is unmapped).
func (v *VM) insnBytes(rip uint64) []byte {
	tr, terr := v.cpu.Translate(rip)
	if terr != nil || !tr.Valid {
		return nil
	}
	n := min(15, PageSize-int(tr.Physical%PageSize)) // stay within the page
	// The kernel can point its rip anywhere, a frame an extension keeps from the
	// system view included: the extensions make the frame safe to show first.
	for _, x := range v.extensions {
		x.beforeReport(tr.Physical, uint64(n))
	}
	buf := make([]byte, n)
	if err := v.mem.ReadPhys(tr.Physical, buf); err != nil {
		return nil
	}
	return buf
}

func (v *VM) crash(reason string) error {
	e := &CrashError{Reason: reason}
	if r, err := v.cpu.Regs(); err == nil {
		e.Regs = r
	}
	if s, err := v.cpu.Sregs(); err == nil {
		e.Sregs = s
	}
	return e
}

func (v *VM) handleIO(e *kvm.ExitIO) error {
	for i := 0; i < e.Count; i++ {
		data := e.Data[i*e.Size : (i+1)*e.Size]
		var handled bool
		var err error
		if e.In {
			handled, err = v.pio.Read(uint64(e.Port), data)
		} else {
			handled, err = v.pio.Write(uint64(e.Port), data)
		}
		if err != nil {
			return err
		}
		if !handled {
			v.counter.UnhandledIO++
			if e.In {
				for j := range data {
					data[j] = 0xff // nothing there, as on a real bus
				}
			}
		}
	}
	return nil
}

func (v *VM) handleMMIO(e *kvm.ExitMMIO) error {
	if e.Len <= 0 || e.Len > 8 {
		return v.crash(fmt.Sprintf("MMIO access of %d bytes (%v)", e.Len, e))
	}
	v.curMMIO = e
	defer func() { v.curMMIO = nil }()
	data := e.Data[:e.Len]
	if !e.IsWrite {
		data = e.ReadBuffer()
	}
	claimed, err := dispatchMMIO(&v.mmio, e.Addr, data, e.IsWrite)
	if claimed || err != nil {
		return err
	}
	return v.crash(fmt.Sprintf("access to unmapped guest-physical address (%v)", e))
}
