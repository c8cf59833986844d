package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"
	"testing"
)

// TestMain lets tests run this test binary as the umbra command in child processes
// (UMBRA_TEST_EXEC_MAIN=1), for what needs separate processes: monitors sharing a
// state directory, a monitor killed with SIGKILL.
func TestMain(m *testing.M) {
	if os.Getenv("UMBRA_TEST_EXEC_MAIN") == "1" {
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		code := runCLI(ctx, &cliEnv{stdin: os.Stdin, stdout: os.Stdout, stderr: os.Stderr}, os.Args[1:])
		stop()
		os.Exit(code)
	}
	os.Exit(m.Run())
}
