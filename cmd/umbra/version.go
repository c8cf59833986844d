package main

import (
	"context"
	"flag"
	"fmt"
	"runtime/debug"
)

// version is set at link time with -ldflags "-X main.version=..."; otherwise the
// module build information is used.
var version = ""

func init() {
	register(&command{name: "version", summary: "print umbra's version", run: runVersion})
}

func runVersion(_ context.Context, env *cliEnv, args []string) int {
	fs := newFlagSet(env, "version", "", "Print the umbra version and the Go toolchain it was built with.")
	if code, done := parseFlags(env, fs, args); done {
		return code
	}
	v := version
	goVer := ""
	if bi, ok := debug.ReadBuildInfo(); ok {
		goVer = bi.GoVersion
		if v == "" {
			v = bi.Main.Version
			for _, s := range bi.Settings {
				if s.Key == "vcs.revision" && len(s.Value) >= 12 {
					v += " (" + s.Value[:12] + ")"
				}
			}
		}
	}
	if v == "" {
		v = "(devel)"
	}
	fmt.Fprintf(env.stdout, "umbra %s %s\n", v, goVer)
	return 0
}

// newFlagSet returns a flag set whose --help prints a usage line, a description and
// the flags to the command's stdout.
func newFlagSet(env *cliEnv, name, argsUsage, description string) *flag.FlagSet {
	fs := flag.NewFlagSet("umbra "+name, flag.ContinueOnError)
	fs.SetOutput(env.stderr)
	fs.Usage = func() {
		w := fs.Output()
		fmt.Fprintf(w, "Usage: umbra %s [flags] %s\n\n%s\n", name, argsUsage, description)
		hasFlags := false
		fs.VisitAll(func(*flag.Flag) { hasFlags = true })
		if hasFlags {
			fmt.Fprintln(w, "\nFlags: (before or after the arguments; everything after -- is an argument)")
			fs.PrintDefaults()
		}
		fmt.Fprintln(w, "\n"+exitTable)
	}
	return fs
}

// parseFlags parses args, flags and positional arguments in any order (everything
// after "--" is positional), leaving the positional ones in fs.Args(); done is true
// when the command must return code at once (help was asked for: 0, or the flags
// were wrong: exitUsage). Every command and subcommand parses through it, so a new
// verb gets the same conventions.
func parseFlags(env *cliEnv, fs *flag.FlagSet, args []string) (code int, done bool) {
	for _, a := range args {
		if a == "--" {
			break
		}
		if a == "-h" || a == "--help" || a == "-help" {
			fs.SetOutput(env.stdout)
			fs.Usage()
			return 0, true
		}
	}
	pos, err := interspersed(fs, args)
	if err != nil {
		return exitUsage, true
	}
	// Leave the positional arguments in fs.Args(); the flags are set already.
	if err := fs.Parse(append([]string{"--"}, pos...)); err != nil {
		return exitUsage, true
	}
	return 0, false
}

// interspersed parses flags wherever they are among the positional arguments (the
// flag package alone stops at the first positional one) and returns the positional
// arguments in order. Everything after "--" is positional.
func interspersed(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	for rest := fs.Args(); len(rest) > 0; rest = fs.Args() {
		// fs.Parse stopped at a positional argument, or consumed a "--".
		if n := len(args) - len(rest); n > 0 && args[n-1] == "--" {
			return append(pos, rest...), nil
		}
		pos = append(pos, rest[0])
		args = rest[1:]
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
	}
	return pos, nil
}
