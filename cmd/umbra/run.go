package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/umbra-cc/umbra/guestimage"
	"github.com/umbra-cc/umbra/monitor"
)

// exitNoGuestStatus is the CLI's status when the VM did not end through its own EXIT
// call (crash, timeout, refusal, monitor error), so it cannot be confused with a guest
// status in scripts. Guest statuses are 0-255 but the demo and test guests use 0-127.
const exitNoGuestStatus = 125

func init() {
	register(&command{name: "run", summary: "run a protected VM (the built-in demo without arguments)", run: runRun})
}

func runRun(ctx context.Context, env *cliEnv, args []string) int {
	fs := newFlagSet(env, "run", "[SPEC.yaml]",
		"Run a protected VM described by a VM spec (docs/spec.md). Without SPEC, run the\n"+
			"built-in demo guest. The CLI exits with the guest's exit status, or 125 when\n"+
			"the VM did not exit by itself (crash, timeout, refusal).")
	cmdline := fs.String("guest-cmdline", "", "override the guest command line of the spec or demo")
	jsonOut := fs.Bool("json", false, "print a JSON summary on stdout (the console then goes to stderr)")
	timeout := fs.Duration("timeout", 0, "wall-clock limit for the run (default: the spec's, or 60s)")
	verbose := fs.Bool("v", false, "log monitor events to stderr")
	if code, done := parseFlags(env, fs, args); done {
		return code
	}
	if fs.NArg() > 1 {
		fmt.Fprintf(env.stderr, "umbra run: expected at most one SPEC, got %d arguments\n", fs.NArg())
		return 2
	}
	cmdlineSet := false
	fs.Visit(func(f *flag.Flag) { cmdlineSet = cmdlineSet || f.Name == "guest-cmdline" })

	cfg := monitor.Config{Console: env.stdout}
	if *jsonOut {
		cfg.Console = env.stderr
	}
	if *verbose {
		cfg.Logger = slog.New(slog.NewTextHandler(env.stderr, nil))
	}
	name := "demo"
	var closeConsole func() error
	if fs.NArg() == 0 {
		cfg.Image = guestimage.Image()
		cfg.Cmdline = guestimage.DemoCmdline
	} else {
		path := fs.Arg(0)
		spec, err := monitor.LoadSpecFile(path)
		if err != nil {
			fmt.Fprintf(env.stderr, "umbra run: %v\n", err)
			return 2
		}
		name = spec.Name
		imgPath := spec.ImagePath(filepath.Dir(path))
		if cfg.Image, err = os.ReadFile(imgPath); err != nil {
			fmt.Fprintf(env.stderr, "umbra run: %s: guest.image: %v\n", path, err)
			return 2
		}
		cfg.Cmdline = spec.Guest.Cmdline
		cfg.MemorySize, _ = spec.MemoryBytes()
		cfg.Timeout, _ = spec.TimeoutDuration()
		switch c := spec.Console; {
		case c == "stderr":
			cfg.Console = env.stderr
		case c == "none":
			cfg.Console = io.Discard
		case strings.HasPrefix(c, "file:"):
			f, err := os.OpenFile(strings.TrimPrefix(c, "file:"), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
			if err != nil {
				fmt.Fprintf(env.stderr, "umbra run: %s: console: %v\n", path, err)
				return 2
			}
			cfg.Console, closeConsole = f, f.Close
		}
	}
	if cmdlineSet {
		cfg.Cmdline = *cmdline
	}
	if *timeout != 0 {
		cfg.Timeout = *timeout
	}
	res, err := monitor.Run(ctx, cfg)
	if closeConsole != nil {
		if cerr := closeConsole(); cerr != nil && err == nil {
			err = fmt.Errorf("close console file: %w", cerr)
		}
	}
	return reportRun(env, name, res, err, *jsonOut)
}

// runSummary is the --json output of umbra run.
type runSummary struct {
	VM         string            `json:"vm"`
	ExitStatus *int              `json:"exit_status"`
	Reason     string            `json:"reason"`
	Error      string            `json:"error,omitempty"`
	DurationMS float64           `json:"duration_ms"`
	Counters   *monitor.Counters `json:"counters,omitempty"`
}

func reportRun(env *cliEnv, name string, res *monitor.Result, err error, jsonOut bool) int {
	code := exitNoGuestStatus
	sum := runSummary{VM: name}
	if res != nil {
		sum.Reason = res.Reason
		sum.DurationMS = float64(res.Duration) / float64(time.Millisecond)
		sum.Counters = &res.Counters
	}
	if err == nil && res != nil {
		code = res.ExitStatus
		sum.ExitStatus = &res.ExitStatus
	}
	if err != nil {
		sum.Error = err.Error()
		if sum.Reason == "" {
			sum.Reason = firstLine(err.Error())
		}
	}
	if jsonOut {
		enc := json.NewEncoder(env.stdout)
		enc.SetIndent("", "  ")
		if eerr := enc.Encode(sum); eerr != nil {
			fmt.Fprintf(env.stderr, "umbra run: write summary: %v\n", eerr)
		}
	}
	if err != nil {
		fmt.Fprintf(env.stderr, "umbra run: VM %s: %v\n", name, err)
		var crash *monitor.CrashError
		if errors.As(err, &crash) {
			fmt.Fprintln(env.stderr, "umbra run: the guest crashed; the registers above show where.")
		}
	}
	return code
}

func firstLine(s string) string {
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i]
	}
	return s
}
