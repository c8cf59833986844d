package main

import (
	"os"
	"testing"
)

// TestMain lets this test binary stand in for the umbra binary: a detached `umbra run`
// starts os.Executable() as the VM's monitor, and the tests that act as other users run
// it as the CLI (UMBRA_TEST_CLI=1).
func TestMain(m *testing.M) {
	if inDetachedMonitor() || os.Getenv("UMBRA_TEST_CLI") == "1" {
		main()
	}
	os.Exit(m.Run())
}
