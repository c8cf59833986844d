package main

import (
	"fmt"
	"strings"
)

// subcommand splits the arguments of a command with subcommands (umbra disk, backup,
// snapshot): the subcommand, its leading positional words, and the flags after them.
// No subcommand, or a flag in its place, prints the synopsis: to stdout with status 0
// for -h/--help, to stderr with exitUsage otherwise; done is then true.
func subcommand(env *cliEnv, synopsis string, args []string) (sub string, words, flags []string, code int, done bool) {
	if len(args) == 0 || strings.HasPrefix(args[0], "-") {
		if len(args) > 0 && (args[0] == "-h" || args[0] == "--help" || args[0] == "-help") {
			fmt.Fprint(env.stdout, synopsis)
			return "", nil, nil, 0, true
		}
		fmt.Fprint(env.stderr, synopsis)
		return "", nil, nil, exitUsage, true
	}
	sub, flags = args[0], args[1:]
	for len(flags) > 0 && !strings.HasPrefix(flags[0], "-") {
		words, flags = append(words, flags[0]), flags[1:]
	}
	return sub, words, flags, 0, false
}
