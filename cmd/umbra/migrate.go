package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/umbra-cc/umbra/control"
	"github.com/umbra-cc/umbra/launch"
	"github.com/umbra-cc/umbra/migration"
)

func init() {
	register(&command{name: "replicate", summary: "stream a running VM's checkpoints to a standby host (umbra standby there) that takes it over if this host fails", run: runReplicate})
	register(&command{name: "standby", summary: "keep a VM replicated from another umbra host and take it over when that host goes silent", run: runStandby})
	register(&command{name: "migrate", summary: "move a running VM to another umbra host (umbra receive there): attested, encrypted, under policy", run: runMigrate})
	register(&command{name: "receive", summary: "wait for one VM migrated from another umbra host and run it here", run: runReceive})
}

func runMigrate(ctx context.Context, env *cliEnv, args []string) int {
	fs := newFlagSet(env, "migrate", "VM --to HOST:PORT",
		"Move a running detached VM to the umbra host at HOST:PORT, where 'umbra receive' waits.\n"+
			"Before anything secret leaves, the destination proves with a fresh TPM quote bound\n"+
			"to the connection that it is an approved monitor on a host this host enrols\n"+
			"(STATE/"+launch.MigrationReferenceFile+"), and the VM's policy decides the move\n"+
			"(migrate). This command relays the monitor's end-to-end encrypted stream: the\n"+
			"monitor itself opens no network connection. If it stops before the handover\n"+
			"commits, the VM keeps running here. docs/migration.md")
	cf := addControlFlags(fs, true)
	to := fs.String("to", "", "address of the destination's umbra receive (HOST:PORT)")
	compress := fs.Bool("compress", false, "zstd-compress the checkpoint's blocks (pays off on slow links)")
	dialTimeout := fs.Duration("dial-timeout", 10*time.Second, "how long to wait for the destination to accept the connection")
	var shared multiFlag
	fs.Var(&shared, "shared-disk", "a disk whose image the destination sees too (shared storage): not copied (repeatable); every other disk is copied while the VM runs")
	// The VM name comes first: parse it before the flags.
	name := ""
	if len(args) > 0 && len(args[0]) > 0 && args[0][0] != '-' {
		name, args = args[0], args[1:]
	}
	cl, vm, code, done := oneVM(env, fs, cf, append(args, name))
	if done {
		return code
	}
	if *to == "" {
		fmt.Fprintln(env.stderr, "umbra migrate: --to HOST:PORT is required (the address where umbra receive waits)")
		return exitUsage
	}
	var res launch.MigrateResult
	if code := relayTunnel(ctx, env, cl, vm, "migrate", *to, *dialTimeout, func(id string) error {
		return cl.Operation(ctx, "migrate", launch.MigrateArgs{Tunnel: id, Destination: *to, Compress: *compress, SharedDisks: shared}, &res)
	}); code != 0 {
		return code
	}
	if cf.json {
		printJSON(env, res)
		return 0
	}
	fmt.Fprintf(env.stdout, "VM %s migrated to %s (%s): downtime %v, %d checkpoint bytes in %v\n", vm, res.HostName, res.HostFingerprint, res.Downtime.Round(time.Microsecond), res.CheckpointBytes, res.Total.Round(time.Millisecond))
	if res.DiskBytes > 0 {
		fmt.Fprintf(env.stdout, "disks: %d bytes copied, %d re-copy rounds, %v of the downtime\n", res.DiskBytes, res.DiskRounds, res.DiskPause.Round(time.Microsecond))
	}
	return 0
}

func runReceive(ctx context.Context, env *cliEnv, args []string) int {
	fs := newFlagSet(env, "receive", "--listen HOST:PORT",
		"Wait for one VM migrated here by 'umbra migrate' on another host, then run it in the\n"+
			"foreground like 'umbra run' (the exit status is the guest's). The source must prove\n"+
			"itself by a TPM quote against STATE/"+launch.MigrationReferenceFile+", this host\n"+
			"proves itself to the source, and the VM's own policy (signed by an administrator\n"+
			"in STATE/trusted-admins, or the built-in demo policy) decides its launch here for\n"+
			"the source host. docs/migration.md")
	tf := addTPMFlags(fs)
	listen := fs.String("listen", "", "address to listen on (HOST:PORT)")
	verbose := fs.Bool("v", false, "log monitor events to stderr")
	var sharedFlags multiFlag
	fs.Var(&sharedFlags, "shared-storage", "SRC[=DST]: storage shared with sources; a shared disk's image SRC/... on the source is DST/... here (repeatable; a shared disk elsewhere is refused)")
	if code, done := parseFlags(env, fs, args); done {
		return code
	}
	if *listen == "" || fs.NArg() != 0 {
		fmt.Fprintln(env.stderr, "umbra receive: give --listen HOST:PORT and no arguments")
		return exitUsage
	}
	var shared []launch.SharedStorage
	for _, f := range sharedFlags {
		s, err := launch.ParseSharedStorage(f)
		if err != nil {
			fmt.Fprintf(env.stderr, "umbra receive: --shared-storage: %v\n", err)
			return exitUsage
		}
		shared = append(shared, s)
	}
	if err := tf.check(); err != nil {
		fmt.Fprintf(env.stderr, "umbra receive: %v\n", err)
		return exitUsage
	}
	log := slog.New(slog.DiscardHandler)
	if *verbose {
		log = slog.New(slog.NewTextHandler(env.stderr, nil))
	}
	tpm, stateDir, err := tf.open(ctx, env)
	if err != nil {
		fmt.Fprintf(env.stderr, "umbra receive: TPM: %v\n", err)
		return exitNoGuestStatus
	}
	defer tpm.Close()
	l, err := net.Listen("tcp", *listen)
	if err != nil {
		fmt.Fprintf(env.stderr, "umbra receive: %v\n", err)
		return exitNoGuestStatus
	}
	defer l.Close()
	fmt.Fprintf(env.stderr, "umbra receive: waiting for a migration on %s\n", l.Addr())
	name := ""
	rep, err := launch.Receive(ctx, launch.ReceiveConfig{
		Listener: l, TPM: tpm, StateDir: stateDir, Console: env.stdout, Logger: log, SharedStorage: shared,
		Started: func(rep *launch.LaunchReport) {
			name = rep.VMID
			reportDecision(env, rep.VMID, rep)
		},
	})
	if rep == nil {
		fmt.Fprintf(env.stderr, "umbra receive: %v\n", err)
		if errors.Is(err, launch.ErrInvalidInput) {
			return exitUsage
		}
		return exitNoGuestStatus
	}
	if name == "" {
		name = rep.VMID
	}
	return reportRun(env, name, rep, err, false)
}

// relayTunnel dials addr, opens a tunnel on the VM's control socket, and relays bytes
// between the two until either closes; run returns what the operation returned.
func relayTunnel(ctx context.Context, env *cliEnv, cl *control.Client, vm, verb, addr string, dialTimeout time.Duration, run func(id string) error) int {
	tcp, err := (&net.Dialer{Timeout: dialTimeout}).DialContext(ctx, "tcp", addr)
	if err != nil {
		fmt.Fprintf(env.stderr, "umbra %s: connect to %s: %v (is the other umbra waiting there?)\n", verb, addr, err)
		return 1
	}
	defer tcp.Close()
	tun, id, err := cl.Tunnel(ctx)
	if err != nil {
		return controlFailure(env, verb, vm, err)
	}
	defer tun.Close()
	var wg sync.WaitGroup
	wg.Add(2)
	relay := func(dst, src net.Conn) {
		defer wg.Done()
		io.Copy(dst, src)
		dst.Close()
		src.Close()
	}
	go relay(tcp, tun)
	go relay(tun, tcp)
	err = run(id)
	tcp.Close()
	tun.Close()
	wg.Wait()
	if err != nil {
		return controlFailure(env, verb, vm, err)
	}
	return 0
}

func runReplicate(ctx context.Context, env *cliEnv, args []string) int {
	fs := newFlagSet(env, "replicate", "VM --to HOST:PORT",
		"Stream checkpoints of a running detached VM to the standby at HOST:PORT ('umbra standby'\n"+
			"there): a full one, then every --interval only what changed. Both hosts are attested\n"+
			"as for a migration and the policy decides migrate for the standby. Runs until\n"+
			"interrupted (the standby then drops its copy). If contact is lost for --lease, the VM\n"+
			"is paused here and recorded as handed over, and the standby takes it over: never two\n"+
			"running copies. docs/migration.md §7")
	cf := addControlFlags(fs, true)
	to := fs.String("to", "", "address of the standby's umbra standby (HOST:PORT)")
	interval := fs.Duration("interval", time.Second, "time between checkpoints")
	lease := fs.Duration("lease", 5*time.Second, "how long this VM runs without the standby's acknowledgement")
	name := ""
	if len(args) > 0 && len(args[0]) > 0 && args[0][0] != '-' {
		name, args = args[0], args[1:]
	}
	cl, vm, code, done := oneVM(env, fs, cf, append(args, name))
	if done {
		return code
	}
	if *to == "" || *interval <= 0 || *lease <= 0 {
		fmt.Fprintln(env.stderr, "umbra replicate: --to HOST:PORT is required, and --interval and --lease must be positive")
		return exitUsage
	}
	var res launch.ReplicateResult
	code = relayTunnel(ctx, env, cl, vm, "replicate", *to, 10*time.Second, func(id string) error {
		return cl.Operation(ctx, "replicate", launch.ReplicateArgs{Tunnel: id, Destination: *to, IntervalMS: interval.Milliseconds(), LeaseMS: lease.Milliseconds()}, &res)
	})
	if code == 0 {
		fmt.Fprintf(env.stdout, "replication of VM %s to %s ended after %d checkpoints\n", vm, res.HostName, res.Checkpoints)
	}
	return code
}

func runStandby(ctx context.Context, env *cliEnv, args []string) int {
	fs := newFlagSet(env, "standby", "--listen HOST:PORT",
		"Keep a VM replicated here by 'umbra replicate' on another host, and run it here (in the\n"+
			"foreground, like umbra run) if that host goes silent for its lease and --margin. The\n"+
			"source is attested against STATE/"+launch.MigrationReferenceFile+" and the VM's own\n"+
			"policy decides the launch for the source host. docs/migration.md §7")
	tf := addTPMFlags(fs)
	listen := fs.String("listen", "", "address to listen on (HOST:PORT)")
	margin := fs.Duration("margin", 0, "how much longer than the source's lease to wait before taking over (default half the lease)")
	verbose := fs.Bool("v", false, "log monitor events to stderr")
	if code, done := parseFlags(env, fs, args); done {
		return code
	}
	if *listen == "" || fs.NArg() != 0 || *margin < 0 {
		fmt.Fprintln(env.stderr, "umbra standby: give --listen HOST:PORT and no arguments")
		return exitUsage
	}
	if err := tf.check(); err != nil {
		fmt.Fprintf(env.stderr, "umbra standby: %v\n", err)
		return exitUsage
	}
	log := slog.New(slog.DiscardHandler)
	if *verbose {
		log = slog.New(slog.NewTextHandler(env.stderr, nil))
	}
	tpm, stateDir, err := tf.open(ctx, env)
	if err != nil {
		fmt.Fprintf(env.stderr, "umbra standby: TPM: %v\n", err)
		return exitNoGuestStatus
	}
	defer tpm.Close()
	l, err := net.Listen("tcp", *listen)
	if err != nil {
		fmt.Fprintf(env.stderr, "umbra standby: %v\n", err)
		return exitNoGuestStatus
	}
	defer l.Close()
	fmt.Fprintf(env.stderr, "umbra standby: waiting for a replication on %s\n", l.Addr())
	rep, err := launch.Standby(ctx, launch.ReceiveConfig{
		Listener: l, TPM: tpm, StateDir: stateDir, Console: env.stdout, Logger: log,
		Started: func(rep *launch.LaunchReport) {
			fmt.Fprintf(env.stderr, "umbra standby: the source went silent; taking VM %s over\n", rep.VMID)
			reportDecision(env, rep.VMID, rep)
		},
	}, migration.ReplicateOptions{Margin: *margin})
	if rep == nil {
		if err != nil {
			fmt.Fprintf(env.stderr, "umbra standby: %v\n", err)
			return exitNoGuestStatus
		}
		fmt.Fprintln(env.stderr, "umbra standby: the source ended replication; nothing was taken over")
		return 0
	}
	return reportRun(env, rep.VMID, rep, err, false)
}
