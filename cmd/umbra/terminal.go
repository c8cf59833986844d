package main

import (
	"io"
	"os"

	"golang.org/x/term"
)

// rawTerminal puts stdin in raw mode when it is a terminal, so that keys go to the guest
// as typed (Ctrl-C included) and Ctrl-] reaches the console verb; it returns the restore.
func rawTerminal(stdin io.Reader) func() {
	f, ok := stdin.(*os.File)
	if !ok || !term.IsTerminal(int(f.Fd())) {
		return func() {}
	}
	old, err := term.MakeRaw(int(f.Fd()))
	if err != nil {
		return func() {}
	}
	return func() { term.Restore(int(f.Fd()), old) }
}
