package main

import (
	"context"
	"encoding/hex"
	"fmt"
	"os"

	"github.com/umbra-cc/umbra/appcontext"
	"github.com/umbra-cc/umbra/guestimage"
)

func init() {
	register(&command{name: "cloak", summary: "compute cloakable apps' identities for policies (cloak identity)", run: runCloak})
}

func runCloak(_ context.Context, env *cliEnv, args []string) int {
	if len(args) == 0 || args[0] != "identity" {
		fs := newFlagSet(env, "cloak identity", "[APP...]", "Subcommands:\n  identity  print the identity the monitor will measure for each app")
		if code, done := parseFlags(env, fs, args); done {
			return code
		}
		fs.Usage()
		return 2
	}
	fs := newFlagSet(env, "cloak identity", "[APP...]",
		"Print the identity (hex SHA-256 of code and initialised data, docs/cloak.md) that the\n"+
			"monitor measures when a cloakable app registers, for listing it in a policy\n"+
			"(request.app.measurement). APP names a program embedded in the guest image;\n"+
			"without APP, every embedded program linked with the cloaking shim is listed.")
	guest := fs.String("guest", "", "guest image embedding the apps (default: the built-in test guest)")
	elfPath := fs.String("elf", "", "an app ELF file instead of embedded apps")
	names, code, done := parseWithPositionals(env, fs, args[1:])
	if done {
		return code
	}
	show := func(name string, app []byte, quiet bool) bool {
		id, err := appcontext.ImageIdentity(app)
		if err != nil {
			if !quiet {
				fmt.Fprintf(env.stderr, "umbra cloak identity: %s: %v\n", name, err)
			}
			return false
		}
		fmt.Fprintf(env.stdout, "%s  %s\n", hex.EncodeToString(id[:]), name)
		return true
	}
	if *elfPath != "" {
		b, err := os.ReadFile(*elfPath)
		if err != nil {
			fmt.Fprintf(env.stderr, "umbra cloak identity: %v\n", err)
			return 1
		}
		if !show(*elfPath, b, false) {
			return 1
		}
		return 0
	}
	var image []byte
	if *guest != "" {
		b, err := os.ReadFile(*guest)
		if err != nil {
			fmt.Fprintf(env.stderr, "umbra cloak identity: %v\n", err)
			return 1
		}
		image = b
	}
	apps, err := guestimage.Apps(image)
	if err != nil {
		fmt.Fprintf(env.stderr, "umbra cloak identity: %v\n", err)
		return 1
	}
	if len(names) == 0 {
		for _, n := range guestimage.AppNames(apps) {
			show(n, apps[n], true)
		}
		return 0
	}
	for _, n := range names {
		app, ok := apps[n]
		if !ok {
			fmt.Fprintf(env.stderr, "umbra cloak identity: the guest image embeds no app %q (it has %v)\n", n, guestimage.AppNames(apps))
			code = 1
			continue
		}
		if !show(n, app, false) {
			code = 1
		}
	}
	return code
}
