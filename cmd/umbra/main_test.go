package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"testing"
	"time"
)

// TestMain lets this test binary stand in for the umbra binary: a detached `umbra run`
// starts os.Executable() as the VM's monitor, the tests that act as other users run
// it as the CLI (UMBRA_TEST_CLI=1), and the tests that need separate processes
// (monitors sharing a state directory, a monitor killed with SIGKILL) run it as the
// umbra command (UMBRA_TEST_EXEC_MAIN=1).
func TestMain(m *testing.M) {
	if os.Getenv("UMBRA_TEST_EXEC_MAIN") == "1" {
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		code := runCLI(ctx, &cliEnv{stdin: os.Stdin, stdout: os.Stdout, stderr: os.Stderr}, os.Args[1:])
		stop()
		os.Exit(code)
	}
	if inDetachedMonitor() || os.Getenv("UMBRA_TEST_CLI") == "1" {
		main()
	}
	if sock := os.Getenv("UMBRA_TEST_RAW_SOCKET"); sock != "" {
		os.Exit(rawRequest(sock, os.Getenv("UMBRA_TEST_RAW_REQUEST")))
	}
	os.Exit(m.Run())
}

// rawRequest sends req as it is to the control socket and prints the response: a
// client that says whatever it likes, as another user would.
func rawRequest(sock, req string) int {
	c, err := net.Dial("unix", sock)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer c.Close()
	if _, err := io.WriteString(c, req); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	c.SetReadDeadline(time.Now().Add(30 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer resp.Body.Close()
	fmt.Println(resp.StatusCode)
	io.Copy(os.Stdout, resp.Body)
	return 0
}
