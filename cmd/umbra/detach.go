package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net/http"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/umbra-cc/umbra/control"
	"github.com/umbra-cc/umbra/jail"
	"github.com/umbra-cc/umbra/launch"
)

// `umbra run --detach` starts the monitor as its own process (a new session, its own
// mount namespace), which launches the VM and serves its control API; the command
// returns once the launch is decided, measured, audited and the socket listens.

// detachedEnv marks the monitor process a detached `umbra run` started; its value is
// the number of the inherited descriptor the monitor reports readiness on.
const detachedEnv = "UMBRA_DETACHED_READY_FD"

// detachReady is what the monitor tells the waiting `umbra run --detach`.
type detachReady struct {
	VM     string `json:"vm"`
	PID    int    `json:"pid"`
	Socket string `json:"socket"`
	Log    string `json:"log"`
	Error  string `json:"error,omitempty"`
}

// jailExtraEnv lists system calls (comma-separated) the monitor's seccomp filter allows
// beyond jail.Allowed, for a feature that needs one before the list is extended.
const jailExtraEnv = "UMBRA_JAIL_EXTRA_SYSCALLS"

// jailDenyEnv lists system calls (comma-separated) removed from the filter: the tests
// use it to make the monitor meet a forbidden call.
const jailDenyEnv = "UMBRA_JAIL_DENY_SYSCALLS"

func inDetachedMonitor() bool { return os.Getenv(detachedEnv) != "" }

// vmDir is a VM's directory in the state directory.
func vmDir(stateDir, name string) string { return filepath.Join(stateDir, "vms", name) }

func controlSocket(stateDir, name string) string {
	return filepath.Join(vmDir(stateDir, name), control.SocketName)
}

// spawnDetached starts this binary again as the VM's monitor and waits for it to be
// ready or to fail.
func spawnDetached(ctx context.Context, env *cliEnv, stateDir string, args []string, jsonOut bool) int {
	self, err := os.Executable()
	if err != nil {
		fmt.Fprintf(env.stderr, "umbra run: find this binary to start the monitor: %v\n", err)
		return exitNoGuestStatus
	}
	logDir := filepath.Join(stateDir, "logs")
	if err := os.MkdirAll(logDir, 0o700); err != nil {
		fmt.Fprintf(env.stderr, "umbra run: %v\n", err)
		return exitNoGuestStatus
	}
	logPath := filepath.Join(logDir, fmt.Sprintf("monitor-%s-%d.log", time.Now().UTC().Format("20060102T150405.000000000"), os.Getpid()))
	logf, err := os.OpenFile(logPath, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		fmt.Fprintf(env.stderr, "umbra run: monitor log: %v\n", err)
		return exitNoGuestStatus
	}
	defer logf.Close()
	rd, wr, err := os.Pipe()
	if err != nil {
		fmt.Fprintf(env.stderr, "umbra run: %v\n", err)
		return exitNoGuestStatus
	}
	defer rd.Close()
	cmd := exec.Command(self, append([]string{"run"}, args...)...)
	cmd.Env = append(os.Environ(), detachedEnv+"=3")
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.ExtraFiles = []*os.File{wr}
	cmd.Dir = "/"
	// A session of its own: the monitor outlives this command and its terminal; a
	// mount namespace of its own, which the jail narrows to what the monitor needs.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if os.Geteuid() == 0 {
		cmd.SysProcAttr.Unshareflags = syscall.CLONE_NEWNS
	}
	if err := cmd.Start(); err != nil {
		wr.Close()
		fmt.Fprintf(env.stderr, "umbra run: start the monitor: %v\n", err)
		return exitNoGuestStatus
	}
	wr.Close()
	lines := make(chan detachReady, 1)
	go func() {
		var r detachReady
		if err := json.NewDecoder(io.LimitReader(rd, 1<<16)).Decode(&r); err != nil {
			r.Error = "the monitor ended before it was ready"
		}
		lines <- r
	}()
	var r detachReady
	select {
	case r = <-lines:
	case <-ctx.Done():
		cmd.Process.Kill()
		fmt.Fprintln(env.stderr, "umbra run: interrupted while the monitor was starting; it was killed")
		return exitNoGuestStatus
	}
	if r.Error != "" {
		// The monitor is ending (or ended) by itself; wait briefly for its log.
		exited := make(chan error, 1)
		go func() { exited <- cmd.Wait() }()
		select {
		case <-exited:
		case <-time.After(5 * time.Second):
		}
		fmt.Fprintf(env.stderr, "umbra run: %s; its log %s says:\n", r.Error, logPath)
		if b, err := os.ReadFile(logPath); err == nil {
			env.stderr.Write(b)
		}
		return exitNoGuestStatus
	}
	cmd.Process.Release() // it outlives this command
	r.Log = logPath
	if jsonOut {
		enc := json.NewEncoder(env.stdout)
		enc.SetIndent("", "  ")
		enc.Encode(r)
	} else {
		fmt.Fprintln(env.stdout, r.VM)
	}
	fmt.Fprintf(env.stderr, "umbra: VM %s runs detached: monitor pid %d, control socket %s, log %s\n", r.VM, r.PID, r.Socket, logPath)
	return 0
}

// detachedMonitor is the monitor side of --detach: it serves the control API once the
// launch hands it the VM's control surface and reports readiness to the command that
// started it.
type detachedMonitor struct {
	env      *cliEnv
	stateDir string
	gid      int
	owner    uint32 // the uid that started the monitor: the one delegator
	log      *slog.Logger
	ready    *os.File
	hub      *control.ConsoleHub
	srv      *control.Server
	serveErr chan error
	reported bool
	cancel   context.CancelFunc // ends the launch
	jail     *jail.Config       // nil: not jailed (--no-jail)
	lock     *os.File           // the VM's monitor lock
}

func newDetachedMonitor(env *cliEnv, stateDir, operatorGroup, jailUser string, log *slog.Logger, cancel context.CancelFunc) (*detachedMonitor, error) {
	fd, err := strconv.Atoi(os.Getenv(detachedEnv))
	if err != nil || fd < 3 {
		return nil, fmt.Errorf("%s=%q is not a descriptor number", detachedEnv, os.Getenv(detachedEnv))
	}
	os.Unsetenv(detachedEnv)
	d := &detachedMonitor{env: env, stateDir: stateDir, gid: -1, log: log, ready: os.NewFile(uintptr(fd), "ready"), hub: control.NewConsoleHub(), cancel: cancel, owner: uint32(os.Getuid())}
	if jailUser != "" {
		abs, err := filepath.Abs(stateDir)
		if err != nil {
			return nil, err
		}
		uid, gid := os.Getuid(), os.Getgid() // an unprivileged monitor keeps its ids
		if os.Geteuid() == 0 {
			var err error
			if uid, gid, err = jail.LookupUser(jailUser); err != nil {
				return nil, fmt.Errorf("--jail-user: %w (or pass --no-jail)", err)
			}
		}
		d.jail = &jail.Config{StateDir: abs, UID: uid, GID: gid, Seccomp: true}
		if extra := os.Getenv(jailExtraEnv); extra != "" {
			d.jail.Extra = strings.Split(extra, ",")
		}
		if deny := os.Getenv(jailDenyEnv); deny != "" {
			d.jail.Deny = strings.Split(deny, ",")
		}
	}
	if operatorGroup != "" {
		g, err := user.LookupGroup(operatorGroup)
		if err != nil {
			return nil, fmt.Errorf("--operator-group: %w", err)
		}
		d.gid, _ = strconv.Atoi(g.Gid)
	}
	return d, nil
}

// attach serves c's control API and tells the waiting command the VM is up.
func (d *detachedMonitor) attach(c *launch.Control) {
	path := controlSocket(d.stateDir, c.Name())
	lock, err := control.HoldMonitorLock(filepath.Dir(path))
	if err != nil {
		d.fail(err)
		d.cancel()
		return
	}
	d.lock = lock // held until the process ends, however it ends
	if d.gid >= 0 {
		// The operator group reaches the socket through vms/ (which it may not list).
		if err := os.Chmod(filepath.Dir(filepath.Dir(path)), 0o711); err != nil {
			d.fail(fmt.Errorf("control socket: %w", err))
			d.cancel()
			return
		}
	}
	l, err := control.Listen(path, d.gid)
	if err != nil {
		d.fail(fmt.Errorf("control socket: %w", err))
		d.cancel() // a VM nobody can control does not run
		return
	}
	if d.jail != nil {
		view := "mount view of " + d.jail.StateDir
		if os.Geteuid() != 0 {
			view = "the host's mount view (unprivileged monitor)"
		}
		// The jailed monitor removes its socket when it ends: it needs its directory,
		// and to pass through the state directory and vms/ (not to list them).
		err := os.Chown(filepath.Dir(path), d.jail.UID, -1)
		if err == nil {
			// The VM's snapshot store is written by the jailed monitor.
			err = chownTree(filepath.Join(filepath.Dir(path), "snapshots"), d.jail.UID)
		}
		if err == nil {
			// So are its disk overlays (a snapshot freezes each disk under a new one).
			err = chownTree(filepath.Join(filepath.Dir(path), "overlays"), d.jail.UID)
		}
		if err == nil {
			// And the reference points of disks attached at run time (launch/backup_hot.go).
			err = chownTree(filepath.Join(filepath.Dir(path), "hotdisks"), d.jail.UID)
		}
		if err == nil {
			// Protected disks' anchors are replaced by a rename in disks/ at each commit
			// (monitor/protdisks.go): the directory is the jailed monitor's.
			if err = os.Chown(filepath.Join(filepath.Dir(path), "disks"), d.jail.UID, -1); errors.Is(err, fs.ErrNotExist) {
				err = nil
			}
		}
		if err == nil {
			// And the disks' reference points for backups (launch/backup.go).
			trackers, _ := filepath.Glob(filepath.Join(filepath.Dir(path), "disks", "*.cbt"))
			for _, t := range trackers {
				if err = chownTree(t, d.jail.UID); err != nil {
					break
				}
			}
		}
		if err == nil && os.Geteuid() == 0 {
			// Cloaking's userfaultfd cannot be created without privilege later. (An
			// unprivileged monitor cannot create it at all where unprivileged
			// userfaultfd is off; cloaking then fails at registration, as in the
			// foreground.)
			if err = c.PrepareCloaking(); err != nil {
				err = fmt.Errorf("prepare cloaking before the jail: %w", err)
			}
		}
		// The logs' cross-process locks check by path that an open log is still the
		// file at its path (statefile.SameFile), so the directories holding them must
		// be searchable too: the state directory, and the simulator's per-process
		// event logs; and the VM's disks directory, for the reference points in it.
		for _, dir := range []string{d.jail.StateDir, filepath.Join(d.jail.StateDir, "vms"), filepath.Join(d.jail.StateDir, "sim-eventlogs"), filepath.Join(filepath.Dir(path), "disks")} {
			if err != nil {
				break
			}
			var fi os.FileInfo
			if fi, err = os.Stat(dir); errors.Is(err, fs.ErrNotExist) && dir != d.jail.StateDir {
				err = nil
				continue
			} else if err == nil {
				err = os.Chmod(dir, fi.Mode().Perm()|0o001)
			}
		}
		if err == nil {
			c.MarkJailed()
			err = jail.Enter(*d.jail)
		}
		if err != nil {
			l.Close()
			d.fail(err)
			d.cancel()
			return
		}
		fmt.Fprintf(d.env.stderr, "umbra: monitor jailed: uid %d gid %d, %s, no new privileges, seccomp filter %v\n", d.jail.UID, d.jail.GID, view, d.jail.Seccomp)
	}
	// Only the user who started the monitor (not the jail's) may act for a remote
	// principal (umbra serve, control.DelegateHeader).
	d.srv = &control.Server{Target: c, Console: d.hub, Logger: d.log, Delegators: []uint32{d.owner}}
	d.serveErr = make(chan error, 1)
	go func() { d.serveErr <- d.srv.Serve(l) }()
	d.report(detachReady{VM: c.Name(), PID: os.Getpid(), Socket: path})
}

func (d *detachedMonitor) report(r detachReady) {
	if d.reported {
		return
	}
	d.reported = true
	json.NewEncoder(d.ready).Encode(r)
	d.ready.Close()
}

func (d *detachedMonitor) fail(err error) { d.report(detachReady{Error: err.Error()}) }

// recordPrevious records a previous monitor of the VM that died unnoticed (no ps
// looked since), before this launch opens the audit log and replaces its socket.
func (d *detachedMonitor) recordPrevious(ctx context.Context, name string) {
	if lost, err := control.Lost(ctx, d.stateDir, name, "umbra/monitor"); err != nil {
		fmt.Fprintf(d.env.stderr, "umbra: %v\n", err)
	} else if lost {
		fmt.Fprintf(d.env.stderr, "umbra: the previous monitor of VM %s had died; recorded as lost in the audit log\n", name)
	}
}

// attachFunc is attach as a LaunchConfig.Attach, nil without a detached monitor.
func (d *detachedMonitor) attachFunc() func(*launch.Control) {
	if d == nil {
		return nil
	}
	return d.attach
}

// finish stops serving once the VM has ended (or failed to start: the waiting
// command is told so and shows the monitor's log).
func (d *detachedMonitor) finish() {
	d.fail(errors.New("the monitor ended before the VM was ready"))
	d.hub.Close()
	if d.srv != nil {
		d.srv.Close()
		if err := <-d.serveErr; err != nil && !errors.Is(err, http.ErrServerClosed) {
			fmt.Fprintf(d.env.stderr, "umbra: control API: %v\n", err)
		}
	}
}

// chownTree gives dir and everything in it (not following symlinks) to uid; a missing
// dir is nothing to do.
func chownTree(dir string, uid int) error {
	err := filepath.WalkDir(dir, func(p string, _ fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		return os.Lchown(p, uid, -1)
	})
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	return err
}
