package sealing_test

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/umbra-cc/umbra/sealing"
	"github.com/umbra-cc/umbra/sealing/swtpmtest"
)

// TestApprovalTriedByTPM covers the approval loop: an approval whose PCRs match
// but whose signature is forged is refused by the TPM's VerifySignature, the
// policy session is restarted, and the next approval releases the key.
func TestApprovalTriedByTPM(t *testing.T) {
	for _, be := range backends() {
		t.Run(be.name, func(t *testing.T) {
			f := newFixture(t)
			h := be.newHost(t)
			a2, err := sealing.ApproveMonitor(f.admin, monitorV2, "umbra v2")
			if err != nil {
				t.Fatal(err)
			}
			forged := *a2
			forged.Signature = append([]byte(nil), a2.Signature...)
			forged.Signature[40] ^= 1
			h.session(t, func(tpm transport.TPM) {
				ek, err := sealing.ReadEKPublic(tpm)
				if err != nil {
					t.Fatal(err)
				}
				measure(t, tpm, h, monitorV2)
				b := f.seal(ek, 1, "p1")
				mustOpen(t, tpm, b, f.opts(h, &forged, a2), "p1")
				// The embedded approval (monitor v1) is valid but does not match; the
				// forged one matches but is not valid: the PCRs are the explanation.
				mustRefuse(t, tpm, b, f.opts(h, &forged), sealing.ErrPCRMismatch, sealing.CheckPCR)
			})
		})
	}
}

// TestCounterSquatter: an ordinary (rewritable) NV index at a series' counter
// handle fails the name-bound read and is then refused with an explanation.
func TestCounterSquatter(t *testing.T) {
	for _, be := range backends() {
		t.Run(be.name, func(t *testing.T) {
			f := newFixture(t)
			h := be.newHost(t)
			h.session(t, func(tpm transport.TPM) {
				ek, err := sealing.ReadEKPublic(tpm)
				if err != nil {
					t.Fatal(err)
				}
				measure(t, tpm, h, monitorV1)
				b := f.seal(ek, 1, "p1")
				ch, _ := sealing.CounterHandles("vm1")
				for _, hd := range []tpm2.TPMHandle{ch, ch + 1} {
					pub := tpm2.TPMSNVPublic{NVIndex: hd, NameAlg: tpm2.TPMAlgSHA256, DataSize: 8,
						Attributes: tpm2.TPMANV{AuthWrite: true, AuthRead: true, OwnerRead: true, NoDA: true, NT: tpm2.TPMNTOrdinary}}
					if _, err := (tpm2.NVDefineSpace{AuthHandle: tpm2.TPMRHOwner, PublicInfo: tpm2.New2B(pub)}).Execute(tpm); err != nil {
						t.Fatal(err)
					}
				}
				_, err = sealing.OpenBundle(context.Background(), tpm, b, f.opts(h))
				if !errors.Is(err, sealing.ErrTPM) || !strings.Contains(err.Error(), sealing.CheckRollback+" check failed") {
					t.Fatalf("OpenBundle = %v, want a rollback refusal", err)
				}
			})
		})
	}
}

// TestSwtpmReconnect: the persistent swtpm connection survives a swtpm
// restart (a reboot) by reconnecting, and the rollback state is read again.
func TestSwtpmReconnect(t *testing.T) {
	sw := swtpmtest.Start(t)
	f := newFixture(t)
	h := &host{stateDir: t.TempDir()}
	tpm, err := sealing.OpenTPM("swtpm:"+sw.Socket, h.stateDir)
	if err != nil {
		t.Fatal(err)
	}
	defer tpm.Close()
	ek, err := sealing.ReadEKPublic(tpm)
	if err != nil {
		t.Fatal(err)
	}
	measure(t, tpm, h, monitorV1)
	v1, v2 := f.seal(ek, 1, "p1"), f.seal(ek, 2, "p2")
	mustOpen(t, tpm, v2, f.opts(h), "p2")
	sw.Restart(t)
	measure(t, tpm, h, monitorV1) // PCRs were reset: the first command reconnects
	mustRefuse(t, tpm, v1, f.opts(h), sealing.ErrRolledBack, sealing.CheckRollback)
	mustOpen(t, tpm, v2, f.opts(h), "p2")
}
