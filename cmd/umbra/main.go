// Command umbra is the command-line interface of the umbra confidential-computing VM
// monitor. It is deliberately thin: every subcommand parses its flags and calls into
// the packages that do the work.
package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"sort"
	"syscall"
)

// command is one subcommand. Subcommands register themselves from their own files
// with register, so features can add commands without editing this file.
type command struct {
	name    string
	summary string
	// run executes the subcommand with the arguments after its name and returns the
	// process exit status.
	run func(ctx context.Context, env *cliEnv, args []string) int
}

// cliEnv carries the process streams so commands are testable without a process.
type cliEnv struct {
	stdin  io.Reader
	stdout io.Writer
	stderr io.Writer
}

var commands = map[string]*command{}

func register(c *command) {
	if _, dup := commands[c.name]; dup {
		panic("umbra: command registered twice: " + c.name)
	}
	commands[c.name] = c
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := runCLI(ctx, &cliEnv{stdin: os.Stdin, stdout: os.Stdout, stderr: os.Stderr}, os.Args[1:])
	stop()
	os.Exit(code)
}

// runCLI dispatches to a subcommand and returns the exit status.
func runCLI(ctx context.Context, env *cliEnv, args []string) int {
	if len(args) == 0 {
		usage(env.stderr)
		return 2
	}
	switch args[0] {
	case "-h", "--help", "help":
		usage(env.stdout)
		return 0
	}
	c, ok := commands[args[0]]
	if !ok {
		fmt.Fprintf(env.stderr, "umbra: unknown command %q\n\n", args[0])
		usage(env.stderr)
		return 2
	}
	return c.run(ctx, env, args[1:])
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "umbra: a confidential-computing VM security monitor on Linux KVM")
	fmt.Fprintln(w, "\nUsage: umbra COMMAND [ARGS]\n\nCommands:")
	names := make([]string, 0, len(commands))
	for n := range commands {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(w, "  %-10s %s\n", n, commands[n].summary)
	}
	fmt.Fprintln(w, "\nRun 'umbra COMMAND --help' for a command's flags. Flags may come before or after\narguments; everything after -- is an argument.")
	fmt.Fprintln(w, "\n"+exitTable)
}
