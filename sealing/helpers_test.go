package sealing_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"testing"

	"github.com/google/go-tpm/tpm2/transport"
	"github.com/umbra-cc/umbra/sealing"
	"github.com/umbra-cc/umbra/sealing/swtpmtest"
	_ "github.com/umbra-cc/umbra/sealing/tpmsim"
)

// host is one machine with its own TPM. boot starts (or reboots) it: PCRs
// start from zero, NV and seeds persist. Only one simulator can be booted at a
// time in a process, so tests close one host's TPM before booting another.
type host struct {
	stateDir string
	boot     func(t testing.TB) transport.TPMCloser
}

type backend struct {
	name    string
	newHost func(t testing.TB) *host
}

func backends() []backend {
	return []backend{
		{"sim", func(t testing.TB) *host {
			dir := t.TempDir()
			return &host{stateDir: dir, boot: func(t testing.TB) transport.TPMCloser {
				tpm, err := sealing.OpenTPM("sim", dir)
				if err != nil {
					t.Fatalf("OpenTPM(sim): %v", err)
				}
				return tpm
			}}
		}},
		{"swtpm", func(t testing.TB) *host {
			dir := t.TempDir()
			var sw *swtpmtest.SWTPM
			return &host{stateDir: dir, boot: func(t testing.TB) transport.TPMCloser {
				if sw == nil {
					sw = swtpmtest.Start(t)
				} else {
					sw.Restart(t)
				}
				tpm, err := sealing.OpenTPM("swtpm:"+sw.Socket, dir)
				if err != nil {
					t.Fatalf("OpenTPM(swtpm): %v", err)
				}
				return tpm
			}}
		}},
	}
}

// session boots h, runs f and closes the TPM.
func (h *host) session(t testing.TB, f func(tpm transport.TPM)) {
	t.Helper()
	tpm := h.boot(t)
	defer tpm.Close()
	f(tpm)
}

func newAdmin(t testing.TB) *ecdsa.PrivateKey {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

var (
	monitorV1 = sha256.Sum256([]byte("umbra monitor v1"))
	monitorV2 = sha256.Sum256([]byte("umbra monitor v2"))
)
