package sealing_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/sha256"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/umbra-cc/umbra/sealing"
	"github.com/umbra-cc/umbra/sealing/swtpmtest"
)

// secretMarker is in every test spec and policy; no file may ever contain it.
const secretMarker = "PLAINTEXT-MARKER-7f3a"

type fixture struct {
	t     *testing.T
	admin *ecdsa.PrivateKey
	a1    *sealing.Approval // approves monitorV1
}

func newFixture(t *testing.T) *fixture {
	f := &fixture{t: t, admin: newAdmin(t)}
	var err error
	if f.a1, err = sealing.ApproveMonitor(f.admin, monitorV1, "umbra v1"); err != nil {
		t.Fatal(err)
	}
	return f
}

func (f *fixture) seal(ek *tpm2.TPMTPublic, version uint64, policy string) []byte {
	f.t.Helper()
	b, err := sealing.Seal(sealing.SealOptions{
		Spec:         []byte(`{"name":"vm1","note":"` + secretMarker + `"}`),
		PolicyBundle: []byte("policy " + policy + " " + secretMarker),
		Series:       "vm1", Version: version,
		HostEK: ek, Admin: f.admin, Approvals: []*sealing.Approval{f.a1},
	})
	if err != nil {
		f.t.Fatalf("Seal: %v", err)
	}
	return b
}

func (f *fixture) opts(h *host, extra ...*sealing.Approval) sealing.OpenOptions {
	return sealing.OpenOptions{TrustedAdmins: []*ecdsa.PublicKey{&f.admin.PublicKey}, Approvals: extra, StateDir: h.stateDir}
}

func measure(t *testing.T, tpm transport.TPM, h *host, d [32]byte) {
	t.Helper()
	if _, err := sealing.MeasureMonitor(tpm, d, h.stateDir, "test"); err != nil {
		t.Fatalf("MeasureMonitor: %v", err)
	}
}

func mustOpen(t *testing.T, tpm transport.TPM, data []byte, o sealing.OpenOptions, wantPolicy string) {
	t.Helper()
	op, err := sealing.OpenBundle(context.Background(), tpm, data, o)
	if err != nil {
		t.Fatalf("OpenBundle: %v", err)
	}
	if !strings.HasPrefix(string(op.PolicyBundle), "policy "+wantPolicy+" ") || !bytes.Contains(op.Spec, []byte(secretMarker)) || len(op.CloakMasterSecret) != 32 {
		t.Fatalf("opened bundle has policy %q spec %q", op.PolicyBundle, op.Spec)
	}
}

// mustRefuse checks the refusal names the failed check and wraps want.
func mustRefuse(t *testing.T, tpm transport.TPM, data []byte, o sealing.OpenOptions, want error, check string) {
	t.Helper()
	_, err := sealing.OpenBundle(context.Background(), tpm, data, o)
	if !errors.Is(err, want) {
		t.Fatalf("OpenBundle error = %v, want %v", err, want)
	}
	if !strings.Contains(err.Error(), check+" check failed") {
		t.Fatalf("OpenBundle error %q does not name the %q check", err, check)
	}
	rep, cerr := sealing.CheckBundle(context.Background(), tpm, data, o)
	if !errors.Is(cerr, want) || len(rep.Steps) == 0 || rep.Steps[len(rep.Steps)-1].OK || rep.Steps[len(rep.Steps)-1].Check != check {
		t.Fatalf("CheckBundle = %+v, %v; want last step %q failing with %v", rep, cerr, check, want)
	}
}

func TestBundleLifecycle(t *testing.T) {
	for _, be := range backends() {
		t.Run(be.name, func(t *testing.T) {
			f := newFixture(t)
			hostA, hostB := be.newHost(t), be.newHost(t)
			var ekA, ekB *tpm2.TPMTPublic
			var v1, v2 []byte

			// Boot 1 of A: the approved monitor runs; v1 opens, twice.
			hostA.session(t, func(tpm transport.TPM) {
				var err error
				if ekA, err = sealing.ReadEKPublic(tpm); err != nil {
					t.Fatal(err)
				}
				measure(t, tpm, hostA, monitorV1)
				measure(t, tpm, hostA, monitorV1) // idempotent within a boot
				v1 = f.seal(ekA, 1, "p1")
				mustOpen(t, tpm, v1, f.opts(hostA), "p1")
				mustOpen(t, tpm, v1, f.opts(hostA), "p1")

				t.Run("tampered", func(t *testing.T) {
					hdrBit := append([]byte(nil), v1...)
					hdrBit[20] ^= 0x01 // inside the header JSON
					mustRefuse(t, tpm, hdrBit, f.opts(hostA), sealing.ErrBadSignature, sealing.CheckSignature)
					ctBit := append([]byte(nil), v1...)
					ctBit[len(ctBit)-120] ^= 0x80 // inside the ciphertext
					mustRefuse(t, tpm, ctBit, f.opts(hostA), sealing.ErrBadSignature, sealing.CheckSignature)
					mustRefuse(t, tpm, v1[:len(v1)-3], f.opts(hostA), sealing.ErrTruncated, sealing.CheckFormat)
					ver := append([]byte(nil), v1...)
					ver[9] = 2
					mustRefuse(t, tpm, ver, f.opts(hostA), sealing.ErrUnknownVersion, sealing.CheckFormat)
					// A bundle with another policy, signed by someone who is not a
					// trusted administrator (the user editing the policy).
					mallory := newFixture(t)
					forged := mallory.seal(ekA, 1, "allow-everything")
					mustRefuse(t, tpm, forged, f.opts(hostA), sealing.ErrBadSignature, sealing.CheckSignature)
				})
			})

			// Boot 2 of A: a different monitor was measured at boot.
			a2, err := sealing.ApproveMonitor(f.admin, monitorV2, "umbra v2")
			if err != nil {
				t.Fatal(err)
			}
			hostA.session(t, func(tpm transport.TPM) {
				measure(t, tpm, hostA, monitorV2)
				mustRefuse(t, tpm, v1, f.opts(hostA), sealing.ErrPCRMismatch, sealing.CheckPCR)
				// The administrator re-authorizes monitor v2: v1 opens, not resealed.
				mustOpen(t, tpm, v1, f.opts(hostA, a2), "p1")
				// The approval can also be delivered through the state directory.
				dir := sealing.ApprovalsDir(hostA.stateDir)
				if err := os.MkdirAll(dir, 0o700); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(filepath.Join(dir, "v2.json"), a2.Marshal(), 0o600); err != nil {
					t.Fatal(err)
				}
				loaded, err := sealing.LoadApprovals(hostA.stateDir)
				if err != nil {
					t.Fatal(err)
				}
				mustOpen(t, tpm, v1, f.opts(hostA, loaded...), "p1")
				// A forged approval for an unapproved PCR value does not help.
				evil := *a2
				evil.PCRs = []sealing.PCRValue{{Index: 13, SHA256: strings.Repeat("00", 32)}}
				mustRefuse(t, tpm, v1, f.opts(hostA, &evil), sealing.ErrPCRMismatch, sealing.CheckPCR)

				// Rollback: v2 opens, then v1 is refused.
				v2 = f.seal(ekA, 2, "p2")
				mustOpen(t, tpm, v2, f.opts(hostA, a2), "p2")
				mustRefuse(t, tpm, v1, f.opts(hostA, a2), sealing.ErrRolledBack, sealing.CheckRollback)
				if hw, err := sealing.HighWater(tpm, "vm1"); err != nil || hw != 2 {
					t.Fatalf("HighWater = %d, %v; want 2", hw, err)
				}
			})

			// Boot 3 of A: the counter survived the reboot.
			hostA.session(t, func(tpm transport.TPM) {
				measure(t, tpm, hostA, monitorV1)
				mustRefuse(t, tpm, v1, f.opts(hostA), sealing.ErrRolledBack, sealing.CheckRollback)
				mustOpen(t, tpm, v2, f.opts(hostA), "p2")
			})

			// Host B: the administrator seals for it from its exported EK public
			// key alone; the bundle opens on B and not on A; A's bundles not on B.
			var forB []byte
			hostB.session(t, func(tpm transport.TPM) {
				var err error
				if ekB, err = sealing.ReadEKPublic(tpm); err != nil {
					t.Fatal(err)
				}
				pemB, err := sealing.EKPublicPEM(ekB)
				if err != nil {
					t.Fatal(err)
				}
				parsed, err := sealing.ParseEKPublicPEM(pemB)
				if err != nil {
					t.Fatal(err)
				}
				if sealing.Fingerprint(parsed) != sealing.Fingerprint(ekB) {
					t.Fatalf("fingerprint from PEM %s != from TPM %s", sealing.Fingerprint(parsed), sealing.Fingerprint(ekB))
				}
				forB = f.seal(parsed, 1, "pb")
				measure(t, tpm, hostB, monitorV1)
				mustRefuse(t, tpm, v2, f.opts(hostB), sealing.ErrWrongHost, sealing.CheckHost)
				mustOpen(t, tpm, forB, f.opts(hostB), "pb")
			})
			hostA.session(t, func(tpm transport.TPM) {
				measure(t, tpm, hostA, monitorV1)
				mustRefuse(t, tpm, forB, f.opts(hostA), sealing.ErrWrongHost, sealing.CheckHost)
			})

			for _, h := range []*host{hostA, hostB} {
				assertNoPlaintext(t, h.stateDir)
			}
		})
	}
}

func assertNoPlaintext(t *testing.T, dir string) {
	t.Helper()
	filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := os.ReadFile(p)
		if err == nil && bytes.Contains(b, []byte(secretMarker)) {
			t.Errorf("%s contains bundle plaintext", p)
		}
		return nil
	})
}

// TestMeasureMonitorConcurrentlyExtendsOnce: monitors starting together on one
// state directory and TPM measure the monitor once; without the lock two of them
// could both find the PCR unmeasured and extend it twice.
func TestMeasureMonitorConcurrentlyExtendsOnce(t *testing.T) {
	if !swtpmtest.Available() && os.Getenv("UMBRA_REQUIRE_SWTPM") == "" {
		t.Skip("skipping: swtpm is not installed")
	}
	sw := swtpmtest.Start(t)
	dir := t.TempDir()
	tpm, err := sealing.OpenTPM("swtpm:"+sw.Socket, dir)
	if err != nil {
		t.Fatal(err)
	}
	defer tpm.Close()
	// Every command's answer arrives 20 ms late, as under load, so that without
	// the lock the monitors all read the PCR before any of them extends it.
	slow := slowTPM{tpm}
	d := sha256.Sum256([]byte("monitor"))
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := sealing.MeasureMonitor(slow, d, dir, "test")
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	pcrs, err := sealing.ReadPCRs(tpm, sealing.MonitorPCR)
	if err != nil {
		t.Fatal(err)
	}
	if pcrs[sealing.MonitorPCR] != sealing.MonitorPCRValue(d) {
		t.Fatal("PCR 13 was extended more than once")
	}
}

type slowTPM struct{ transport.TPM }

func (s slowTPM) Send(cmd []byte) ([]byte, error) {
	rsp, err := s.TPM.Send(cmd)
	time.Sleep(20 * time.Millisecond)
	return rsp, err
}
