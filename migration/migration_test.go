package migration

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/attestconn"
	"github.com/umbra-cc/umbra/attestconn/attestconntest"
	"github.com/umbra-cc/umbra/guestimage"
	"github.com/umbra-cc/umbra/internal/guestprobe"
	"github.com/umbra-cc/umbra/internal/testenv"
	"github.com/umbra-cc/umbra/monitor"
)

// console is the guest's console, read with CRLF as LF.
type console struct{ testenv.Buffer }

func (c *console) String() string { return strings.ReplaceAll(c.Buffer.String(), "\r\n", "\n") }

// running is a monitor VM running in the test.
type running struct {
	v       *monitor.VM
	console *console
	done    chan struct{}
	res     *monitor.Result
	err     error
}

func run(v *monitor.VM, c *console) *running {
	r := &running{v: v, console: c, done: make(chan struct{})}
	go func() {
		defer close(r.done)
		r.res, r.err = v.Run(context.Background())
	}()
	return r
}

func (r *running) wait(t *testing.T) {
	t.Helper()
	select {
	case <-r.done:
	case <-time.After(testenv.LinuxTimeout + time.Minute):
		// Past the VM's own timeout: the run should have ended with ErrTimeout.
		t.Fatal("the VM did not end, even past its own timeout")
	}
}

// guestConfig is the VM both sides build: the test guest computing a result over
// many steps, long enough to be migrated mid-way.
func guestConfig(c *console) monitor.Config { return guestConfigRunning(c, "run=cloakcompute:64:100") }

// guestConfigRunning is guestConfig with another guest command line.
func guestConfigRunning(c *console, cmdline string) monitor.Config {
	return monitor.Config{Image: guestimage.Image(), MemorySize: 64 << 20, Cmdline: cmdline, Console: c, Timeout: 5 * time.Minute}
}

// vmSource sends a monitor VM.
type vmSource struct {
	r          *running
	handedOver bool
}

func (s *vmSource) Files() []File { return nil }

func (s *vmSource) Checkpoint(ctx context.Context, w io.Writer, key []byte) (time.Time, error) {
	info, err := s.r.v.Checkpoint(ctx, w, monitor.CheckpointOptions{Key: key, Generation: 1, StayPaused: true})
	if info != nil {
		return info.PausedAt, err
	}
	if s.r.v.Paused() {
		return time.Now(), err
	}
	return time.Time{}, err
}

func (s *vmSource) Resume() error { return s.r.v.Resume() }

func (s *vmSource) Handover(context.Context, attestconn.Peer) error {
	s.handedOver = true
	return nil
}

// vmDestination restores into a new monitor VM.
type vmDestination struct {
	refuse  error
	console *console
	started *running
	// config is the VM's configuration (guestConfig if nil); stream and key keep
	// the checkpoint that arrived and its key.
	config func(*console) monitor.Config
	stream []byte
	key    []byte
}

func (d *vmDestination) Accept(context.Context, *Offer, attestconn.Peer) error { return d.refuse }

type prepared struct {
	d *vmDestination
	v *monitor.VM
}

func (d *vmDestination) Prepare(_ context.Context, in *Incoming) (Prepared, error) {
	cfg := guestConfig
	if d.config != nil {
		cfg = d.config
	}
	var err error
	if d.stream, err = io.ReadAll(io.NewSectionReader(in.Checkpoint, 0, in.CheckpointSize)); err != nil {
		return nil, err
	}
	d.key = append([]byte(nil), in.Offer.Key...)
	v, err := restoreIncoming(in, cfg(d.console))
	if err != nil {
		return nil, err
	}
	return &prepared{d: d, v: v}, nil
}

func (p *prepared) Start(context.Context) error {
	p.d.started = run(p.v, p.d.console)
	return nil
}

func (p *prepared) Discard() { p.v.Close() }

// recorder keeps every byte the source sends on the wire.
type recorder struct {
	net.Conn
	mu  sync.Mutex
	out bytes.Buffer
}

func (r *recorder) Write(p []byte) (int, error) {
	r.mu.Lock()
	r.out.Write(p)
	r.mu.Unlock()
	return r.Conn.Write(p)
}

type pair struct {
	src, dst *attestconn.Conn
	wire     *recorder
}

// migrate runs Receive into dst on p's destination side and Send of src with offer on
// its source side, and returns both sides' reports and errors.
func (p pair) migrate(tb testing.TB, src Source, dst Destination, offer Offer) (rep, drep *Report, err, derr error) {
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		drep, derr = Receive(context.Background(), p.dst, dst, tb.TempDir(), Options{})
	}()
	rep, err = Send(context.Background(), p.src, src, offer, Options{})
	wg.Wait()
	return rep, drep, err, derr
}

// attested connects two attested hosts over loopback TCP.
func attested(t testing.TB) pair { return attestedWith(t, nil) }

// attestedWith is attested with the source's connection wrapped by wrap (under TLS).
func attestedWith(t testing.TB, wrap func(net.Conn) net.Conn) pair {
	t.Helper()
	a, b := attestconntest.NewHost(t, attestconntest.ApprovedMonitor), attestconntest.NewHost(t, attestconntest.ApprovedMonitor)
	ref := attestconntest.Reference(a, b)
	cfg := func(h *attestconntest.Host) attestconn.Config {
		return attestconn.Config{Attester: h.Attester, ReadLog: h.Log.Records, Reference: ref}
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var p pair
	var serr error
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		nc, err := ln.Accept()
		if err != nil {
			serr = err
			return
		}
		p.dst, serr = attestconn.Server(context.Background(), nc, cfg(b))
	}()
	nc, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	if wrap != nil {
		nc = wrap(nc)
	}
	p.wire = &recorder{Conn: nc}
	var cerr error
	p.src, cerr = attestconn.Client(context.Background(), p.wire, cfg(a))
	wg.Wait()
	if cerr != nil || serr != nil {
		t.Fatalf("attested connection: source %v, destination %v", cerr, serr)
	}
	t.Cleanup(func() { p.src.Close(); p.dst.Close() })
	return p
}

func resultLine(out string) string {
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, "cloakcompute: ") {
			return l
		}
	}
	return ""
}

// reference runs the guest to its end without migration.
func referenceResult(t *testing.T) string { return referenceResultOf(t, guestConfig) }

func referenceResultOf(t *testing.T, cfg func(*console) monitor.Config) string {
	t.Helper()
	c := &console{}
	v, err := monitor.New(cfg(c))
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	if _, err := v.Run(context.Background()); err != nil {
		t.Fatal(err)
	}
	return resultLine(c.String())
}

func startSource(t *testing.T) *running { return startSourceOf(t, guestConfig) }

func startSourceOf(t *testing.T, cfg func(*console) monitor.Config) *running {
	t.Helper()
	c := &console{}
	v, err := monitor.New(cfg(c))
	if err != nil {
		t.Fatal(err)
	}
	r := run(v, c)
	t.Cleanup(func() {
		v.StopIfRunning(errors.New("test over"))
		<-r.done
		v.Close()
	})
	time.Sleep(300 * time.Millisecond)
	return r
}

func TestMigrateRunningVM(t *testing.T) {
	testenv.RequireKVM(t)
	want := referenceResult(t)
	p := attested(t)
	src := startSource(t)
	dst := &vmDestination{console: &console{}}
	vs := &vmSource{r: src}
	rep, drep, err, derr := p.migrate(t, vs, dst, Offer{VM: "demo", Generation: 1})
	if err != nil || derr != nil {
		t.Fatalf("send: %v; receive: %v", err, derr)
	}
	if !vs.handedOver || !src.v.Paused() {
		t.Fatal("the source did not record the handover, or its VM runs again")
	}
	src.v.Stop(errors.New("migrated"))
	src.wait(t)
	if strings.Contains(src.console.String(), "cloakcompute: ") {
		t.Fatalf("the source finished the job too:\n%s", src.console.String())
	}
	dst.started.wait(t)
	if dst.started.err != nil {
		t.Fatalf("destination run: %v\n%s", dst.started.err, dst.console.String())
	}
	if got := resultLine(dst.console.String()); got != want || want == "" {
		t.Fatalf("the destination printed %q, the unmigrated run %q", got, want)
	}
	t.Logf("migrated: %d checkpoint bytes, downtime %v (destination %v), total %v", rep.CheckpointBytes, rep.Downtime, drep.Downtime, rep.Total)
	// The wire holds only TLS records: not a page of the guest in the clear.
	for _, marker := range []string{"umbra test guest", "cloakcompute", "UMBRASN1"} {
		if bytes.Contains(p.wire.out.Bytes(), []byte(marker)) {
			t.Errorf("the capture of the channel holds %q in the clear", marker)
		}
	}
	if int64(p.wire.out.Len()) < rep.CheckpointBytes {
		t.Errorf("the capture has %d bytes, less than the %d checkpoint bytes sent", p.wire.out.Len(), rep.CheckpointBytes)
	}
}

func TestMigrationRefusedKeepsTheVMRunningHere(t *testing.T) {
	testenv.RequireKVM(t)
	p := attested(t)
	src := startSource(t)
	dst := &vmDestination{console: &console{}, refuse: errors.New("policy: this host may not run demo")}
	_, _, err, derr := p.migrate(t, &vmSource{r: src}, dst, Offer{VM: "demo", Generation: 1})
	if !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), "may not run demo") {
		t.Fatalf("send: %v, want the destination's refusal with its reason", err)
	}
	if derr == nil {
		t.Fatal("the destination refused but Receive returned no error")
	}
	src.wait(t)
	if src.err != nil || resultLine(src.console.String()) == "" {
		t.Fatalf("the source VM did not finish its job after the refusal: %v\n%s", src.err, src.console.String())
	}
}

// A destination that dies while the memory streams in leaves the VM running on the
// source (resumed), and nothing on the destination.
func TestMigrationDestinationLostMidStream(t *testing.T) {
	testenv.RequireKVM(t)
	p := attested(t)
	src := startSource(t)
	go func() {
		// The destination accepts, then dies after 256 KiB of the checkpoint.
		_, b, err := readFrame(p.dst, frameOffer)
		if err != nil {
			return
		}
		if _, err := decodeOffer(b); err != nil {
			return
		}
		writeFrame(p.dst, frameVerdict, mustJSON(verdict{Accepted: true}))
		io.CopyN(io.Discard, p.dst, 256<<10)
		p.dst.Close()
	}()
	_, err := Send(context.Background(), p.src, &vmSource{r: src}, Offer{VM: "demo", Generation: 1}, Options{StepTimeout: 10 * time.Second})
	if err == nil {
		t.Fatal("the migration succeeded with a dead destination")
	}
	if src.v.Paused() {
		t.Fatal("the source VM stayed paused after the destination died")
	}
	src.wait(t)
	if src.err != nil || resultLine(src.console.String()) == "" {
		t.Fatalf("the source VM did not finish after the aborted migration: %v\n%s", src.err, src.console.String())
	}
	t.Logf("source error: %v", err)
}

// A source that goes away after ready and before commit leaves nothing running on the
// destination: only a commit starts the VM.
func TestMigrationWithoutCommitStartsNothing(t *testing.T) {
	testenv.RequireKVM(t)
	p := attested(t)
	src := startSource(t)
	dst := &vmDestination{console: &console{}}
	done := make(chan error, 1)
	go func() {
		_, err := Receive(context.Background(), p.dst, dst, t.TempDir(), Options{StepTimeout: 20 * time.Second})
		done <- err
	}()
	vs := &failingHandover{vmSource: vmSource{r: src}}
	_, err := Send(context.Background(), p.src, vs, Offer{VM: "demo", Generation: 1}, Options{})
	if err == nil || !strings.Contains(err.Error(), "record the handover") {
		t.Fatalf("send: %v, want the handover's failure", err)
	}
	p.src.Close()
	if derr := <-done; derr == nil || !strings.Contains(derr.Error(), "before commit") {
		t.Fatalf("receive: %v, want an abort before commit", derr)
	}
	if dst.started != nil {
		t.Fatal("the destination started the VM without a commit")
	}
	src.wait(t)
	if resultLine(src.console.String()) == "" {
		t.Fatalf("the source VM did not finish after the aborted handover:\n%s", src.console.String())
	}
}

type failingHandover struct{ vmSource }

func (f *failingHandover) Handover(context.Context, attestconn.Peer) error {
	return errors.New("state directory is read-only")
}

// TestMigrateLinuxGuest migrates the test Linux kernel in the middle of its boot: it
// reaches its init and powers off on the destination, having printed its first boot
// lines on the source only.
func TestMigrateLinuxGuest(t *testing.T) {
	kern, initrd := testenv.LinuxFiles(t, "vmlinux")
	cfg := func(c *console) monitor.Config {
		return monitor.Config{Image: kern, Boot: monitor.BootLinux, Initrd: initrd, MemorySize: testenv.LinuxMemory, Cmdline: testenv.LinuxCmdline + " -- exit=0", Console: c, Timeout: testenv.LinuxTimeout}
	}
	p := attested(t)
	c := &console{}
	v, err := monitor.New(cfg(c))
	if err != nil {
		t.Fatal(err)
	}
	src := run(v, c)
	t.Cleanup(func() { v.StopIfRunning(errors.New("test over")); <-src.done; v.Close() })
	// The kernel boots quietly (its init's first line comes after 9 s on an idle
	// host, 18-60 s under load; its clock starts about 0.6 s in when idle): migrate
	// it four seconds in, in the middle of its boot.
	time.Sleep(4 * time.Second)
	dst := &linuxDestination{cfg: cfg, console: &console{}}
	rep, _, err, derr := p.migrate(t, &vmSource{r: src}, dst, Offer{VM: "linux", Generation: 1})
	if err != nil || derr != nil {
		select {
		case <-src.done:
			if strings.Contains(c.String(), "UMBRA-INIT: up") {
				t.Skipf("the kernel booted and its init ended before the migration (host too fast for this test's timing; the migration failed: %v):\n%s", err, c.String())
			}
		default:
		}
		t.Fatalf("send: %v; receive: %v\nsource console:\n%s", err, derr, c.String())
	}
	before := c.String()
	v.Stop(errors.New("migrated"))
	src.wait(t)
	if strings.Contains(before, "UMBRA-INIT: up") {
		t.Skipf("the kernel reached its init before the migration (host too fast for this test's timing):\n%s", before)
	}
	dst.r.wait(t)
	dst.ran = time.Since(dst.started)
	out := dst.console.String()
	if dst.r.err != nil || !strings.Contains(out, "UMBRA-INIT: up") || dst.r.res == nil || dst.r.res.ExitStatus != 0 {
		t.Fatalf("the Linux guest did not finish its boot on the destination: %v\n%s", dst.r.err, out)
	}
	// The kernel's clock goes on from where it was on the source: the init's
	// uptime exceeds the time the destination ran by the part of the boot done on the
	// source after its clock started (3.4 s idle, less under load). A fresh boot's
	// never exceeds it: the run includes the boot before the clock starts.
	if up, ran := uptime(out), dst.ran.Seconds(); up-ran < 0.5 {
		t.Fatalf("the init says the kernel was up %.2f s after %.2f s on the destination: it did not continue the source's boot:\n%s", up, ran, out)
	}
	t.Logf("Linux migrated mid-boot: %d checkpoint bytes, downtime %v, total %v; init uptime %.2f s after %.2f s on the destination", rep.CheckpointBytes, rep.Downtime, rep.Total, uptime(out), dst.ran.Seconds())
}

// uptime is the first figure of the init's "UMBRA-INIT: up, uptime U I" line.
func uptime(out string) float64 {
	i := strings.Index(out, "UMBRA-INIT: up, uptime ")
	if i < 0 {
		return -1
	}
	var u float64
	fmt.Sscanf(out[i+len("UMBRA-INIT: up, uptime "):], "%g", &u)
	return u
}

type linuxDestination struct {
	cfg     func(*console) monitor.Config
	console *console
	r       *running
	v       *monitor.VM
	started time.Time
	ran     time.Duration // from Start to the end of the run (set by wait)
}

func (d *linuxDestination) Accept(context.Context, *Offer, attestconn.Peer) error { return nil }

func (d *linuxDestination) Prepare(_ context.Context, in *Incoming) (Prepared, error) {
	var err error
	d.v, err = restoreIncoming(in, d.cfg(d.console))
	return d, err
}

func (d *linuxDestination) Start(context.Context) error {
	d.started = time.Now()
	d.r = run(d.v, d.console)
	return nil
}

func (d *linuxDestination) Discard() { d.v.Close() }

// TestMigrateCloakedApp migrates a VM whose cloaked app is mid-computation: the app
// finishes on the destination with the result of the same computation run
// uncloaked, and neither the capture of the channel nor the checkpoint stream
// itself, opened with the migration key, holds any of the app's values or its
// VM's cloak secret (which travels to the destination in the attested channel's
// secrets, not in the stream).
func TestMigrateCloakedApp(t *testing.T) {
	testenv.RequireKVM(t)
	secret := bytes.Repeat([]byte("cloak-secret-32!"), 2)
	cfgOf := func(cmdline string) func(*console) monitor.Config {
		return func(c *console) monitor.Config {
			cfg := guestConfigRunning(c, cmdline)
			cfg.CloakSecret = secret
			return cfg
		}
	}
	want := referenceResultOf(t, cfgOf("run=cloakcompute:16:100"))
	cloaked := cfgOf("run=cloakcompute:16:100:cloak")
	p := attested(t)
	src := startSourceOf(t, cloaked)
	dst := &vmDestination{console: &console{}, config: cloaked}
	_, _, err, derr := p.migrate(t, &vmSource{r: src}, dst, Offer{VM: "demo", Generation: 1})
	if err != nil || derr != nil {
		t.Fatalf("send: %v; receive: %v", err, derr)
	}
	src.v.Stop(errors.New("migrated"))
	src.wait(t)
	if strings.Contains(src.console.String(), "cloakcompute: ") {
		t.Fatalf("the app finished on the source before the migration:\n%s", src.console.String())
	}
	dst.started.wait(t)
	if dst.started.err != nil {
		t.Fatalf("destination run: %v\n%s", dst.started.err, dst.console.String())
	}
	if got := resultLine(dst.console.String()); got != want+" cloaked" || want == "" {
		t.Fatalf("the destination printed %q, the uncloaked run %q", got, want)
	}
	vals := guestprobe.CloakComputeValues(16, 100)
	if n := guestprobe.Words(p.wire.out.Bytes(), vals); n != 0 || bytes.Contains(p.wire.out.Bytes(), secret) {
		t.Fatalf("the capture of the channel holds %d of the app's values (or its cloak secret)", n)
	}
	ck, err := monitor.OpenCheckpoint(bytes.NewReader(dst.stream), int64(len(dst.stream)), dst.key)
	if err != nil {
		t.Fatal(err)
	}
	chain, err := monitor.NewCheckpointChain(ck)
	if err != nil {
		t.Fatal(err)
	}
	if n, s, err := guestprobe.ScanChain(chain, vals, secret); err != nil || n != 0 || s != 0 {
		t.Fatalf("the checkpoint stream, opened with the migration key, holds %d of the app's values and %d copies of its cloak secret (%v)", n, s, err)
	}
}

// restoreIncoming restores the received checkpoint into a new VM built from cfg.
func restoreIncoming(in *Incoming, cfg monitor.Config) (*monitor.VM, error) {
	ck, err := monitor.OpenCheckpoint(in.Checkpoint, in.CheckpointSize, in.Offer.Key)
	if err != nil {
		return nil, err
	}
	chain, err := monitor.NewCheckpointChain(ck)
	if err != nil {
		return nil, err
	}
	return monitor.Restore(cfg, chain, monitor.RestoreOptions{})
}
