package sealing_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"os/exec"
	"strconv"
	"testing"

	"github.com/google/go-tpm/tpm2/transport"
	"github.com/umbra-cc/umbra/sealing"
	"github.com/umbra-cc/umbra/sealing/swtpmtest"
)

// TestCounterAgreesWithTPM2Tools opens version 3 of a series on swtpm, then
// reads umbra's NV counter and anchor with tpm2-tools and checks they agree.
func TestCounterAgreesWithTPM2Tools(t *testing.T) {
	if _, err := exec.LookPath("tpm2_nvread"); err != nil {
		t.Skip("tpm2-tools not installed (apt-get install tpm2-tools)")
	}
	sw := swtpmtest.StartTCP(t)
	conn, err := net.Dial("tcp", "127.0.0.1:"+strconv.Itoa(sw.Port))
	if err != nil {
		t.Fatal(err)
	}
	tpm := transport.FromReadWriteCloser(conn)
	f := newFixture(t)
	ek, err := sealing.ReadEKPublic(tpm)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := sealing.MeasureMonitor(tpm, monitorV1, "", "test"); err != nil {
		t.Fatal(err)
	}
	if _, err := sealing.OpenBundle(context.Background(), tpm, f.seal(ek, 3, "p"), sealing.OpenOptions{TrustedAdmins: f.opts(&host{}).TrustedAdmins}); err != nil {
		t.Fatal(err)
	}
	tpm.Close() // swtpm serves one connection at a time

	tcti := fmt.Sprintf("swtpm:host=127.0.0.1,port=%d", sw.Port)
	ctr, anc := sealing.CounterHandles("vm1")
	read := func(h uint32, size int) []byte {
		t.Helper()
		idx := fmt.Sprintf("%#x", h)
		out, err := exec.Command("tpm2_nvread", "-T", tcti, "-C", idx, "-s", strconv.Itoa(size), idx).Output()
		if err != nil {
			t.Fatalf("tpm2_nvread %s: %v", idx, err)
		}
		if len(out) != size {
			t.Fatalf("tpm2_nvread %s: %d bytes, want %d", idx, len(out), size)
		}
		return out
	}
	value := binary.BigEndian.Uint64(read(uint32(ctr), 8))
	base := binary.BigEndian.Uint64(read(uint32(anc), 40)[:8])
	if value-base != 3 {
		t.Fatalf("tpm2-tools reads counter %d - anchor %d = %d, umbra opened version 3", value, base, value-base)
	}
	pub, err := exec.Command("tpm2_nvreadpublic", "-T", tcti, fmt.Sprintf("%#x", uint32(ctr))).Output()
	if err != nil {
		t.Fatalf("tpm2_nvreadpublic: %v", err)
	}
	for _, want := range []string{"nt=0x1", "written", "authread", "authwrite"} {
		if !bytes.Contains(bytes.ToLower(pub), []byte(want)) {
			t.Errorf("tpm2_nvreadpublic output lacks %q:\n%s", want, pub)
		}
	}
}
