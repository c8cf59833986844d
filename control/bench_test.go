package control

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/internal/testenv"
	"github.com/umbra-cc/umbra/launch"
	"github.com/umbra-cc/umbra/sealing/tpmsim"
)

// launchServed launches the demo VM running the chat app (real KVM, the simulator
// TPM, the demo policy) and serves its control API; it returns a client.
func launchServed(b *testing.B) *Client {
	b.Helper()
	testenv.RequireKVM(b)
	ctx, cancel := context.WithCancel(context.Background())
	b.Cleanup(cancel)
	dir := b.TempDir()
	tpm, err := tpmsim.Open(dir)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { tpm.Close() })
	src, err := launch.DemoSource(ctx)
	if err != nil {
		b.Fatal(err)
	}
	principal, err := launch.LocalPrincipal()
	if err != nil {
		b.Fatal(err)
	}
	cfg := src.Config()
	cfg.Cmdline, cfg.Timeout = "run=chat", -1
	attached := make(chan *launch.Control, 1)
	ended := make(chan error, 1)
	go func() {
		_, err := launch.Launch(ctx, launch.LaunchConfig{
			Run: cfg, Spec: src.Spec, SpecBytes: src.SpecBytes, Policy: src.Policy, PolicyDigest: src.PolicyDigest,
			Principal: principal, TPM: tpm, StateDir: dir, Attach: func(c *launch.Control) { attached <- c },
		})
		ended <- err
	}()
	var c *launch.Control
	select {
	case c = <-attached:
	case err := <-ended:
		b.Fatalf("launch: %v", err)
	}
	sock := filepath.Join(dir, SocketName)
	l, err := Listen(sock, -1)
	if err != nil {
		b.Fatal(err)
	}
	srv := &Server{Target: c, Console: NewConsoleHub()}
	go srv.Serve(l)
	b.Cleanup(func() {
		srv.Close()
		cancel()
		<-ended
	})
	return NewClient(sock)
}

// BenchmarkControlRoundTrip measures, interleaved in one loop on one socket: a bare
// request (ping: no policy, no audit), inspect (a policy decision, an fsynced audit
// record and a counter snapshot on the vCPU thread) and pause+resume (two decisions and
// records, the vCPU parked and released). Ratios are against the bare request.
func BenchmarkControlRoundTrip(b *testing.B) {
	c := launchServed(b)
	ctx := context.Background()
	var bare, inspect, pauseResume, parkLatency time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		t0 := time.Now()
		if _, err := c.Ping(ctx); err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		if _, err := c.Inspect(ctx); err != nil {
			b.Fatal(err)
		}
		t2 := time.Now()
		r, err := c.Do(ctx, ActionRequest{Action: "pause"})
		if err != nil {
			b.Fatal(err)
		}
		if _, err := c.Do(ctx, ActionRequest{Action: "resume"}); err != nil {
			b.Fatal(err)
		}
		t3 := time.Now()
		bare += t1.Sub(t0)
		inspect += t2.Sub(t1)
		pauseResume += t3.Sub(t2)
		parkLatency += r.PauseLatency
	}
	n := float64(b.N)
	b.ReportMetric(float64(bare.Nanoseconds())/n, "bare-ns/op")
	b.ReportMetric(float64(inspect.Nanoseconds())/n, "inspect-ns/op")
	b.ReportMetric(float64(pauseResume.Nanoseconds())/n, "pause+resume-ns/op")
	b.ReportMetric(float64(parkLatency.Nanoseconds())/n, "pause-latency-ns/op")
	b.ReportMetric(float64(inspect)/float64(bare), "inspect/bare")
	b.ReportMetric(float64(pauseResume)/float64(bare), "pause+resume/bare")
}
