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

	"github.com/umbra-cc/umbra/launch"
)

func init() {
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
	tcp, err := (&net.Dialer{Timeout: *dialTimeout}).DialContext(ctx, "tcp", *to)
	if err != nil {
		fmt.Fprintf(env.stderr, "umbra migrate: connect to the destination %s: %v (is umbra receive waiting there?)\n", *to, err)
		return 1
	}
	defer tcp.Close()
	tun, id, err := cl.Tunnel(ctx)
	if err != nil {
		return controlFailure(env, "migrate", vm, err)
	}
	defer tun.Close()
	var wg sync.WaitGroup
	wg.Add(2)
	// Relay until either side closes; closing both ends the other direction.
	relay := func(dst, src net.Conn) {
		defer wg.Done()
		io.Copy(dst, src)
		dst.Close()
		src.Close()
	}
	go relay(tcp, tun)
	go relay(tun, tcp)
	var res launch.MigrateResult
	err = cl.Operation(ctx, "migrate", launch.MigrateArgs{Tunnel: id, Destination: *to, Compress: *compress}, &res)
	tcp.Close()
	tun.Close()
	wg.Wait()
	if err != nil {
		return controlFailure(env, "migrate", vm, err)
	}
	if cf.json {
		printJSON(env, res)
		return 0
	}
	fmt.Fprintf(env.stdout, "VM %s migrated to %s (%s): downtime %v, %d checkpoint bytes in %v\n", vm, res.HostName, res.HostFingerprint, res.Downtime.Round(time.Microsecond), res.CheckpointBytes, res.Total.Round(time.Millisecond))
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
	if code, done := parseFlags(env, fs, args); done {
		return code
	}
	if *listen == "" || fs.NArg() != 0 {
		fmt.Fprintln(env.stderr, "umbra receive: give --listen HOST:PORT and no arguments")
		return exitUsage
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
		Listener: l, TPM: tpm, StateDir: stateDir, Console: env.stdout, Logger: log,
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
