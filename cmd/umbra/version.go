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
			fmt.Fprintln(w, "\nFlags:")
			fs.PrintDefaults()
		}
	}
	return fs
}

// parseFlags parses args; done is true when the command must return code at once
// (help was asked for: 0, or the flags were wrong: 2).
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
	if err := fs.Parse(args); err != nil {
		return 2, true
	}
	return 0, false
}
