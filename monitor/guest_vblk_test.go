package monitor

// The test guest as a hostile virtio-blk driver (vblk=hostile:MODE,
// testdata/guest/kernel/vblk_hostile.c): each mode breaks the virtio protocol from
// inside a running guest, and the monitor must neither crash nor hang nor write guest
// memory the driver did not give the device, must fail the request or mark the device
// DEVICE_NEEDS_RESET and log why, and the VM, and the VMs beside it, carry on.

import (
	"fmt"
	"log/slog"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/umbra-cc/umbra/monitor/memguard"
	"github.com/umbra-cc/umbra/virtio"
)

// diskMarker is the first 16 bytes of the hostile tests' disk: what a read of sector 0
// would put in memory.
const diskMarker = "UMBRA-DISK-MARK!"

// hostileRun boots the guest with vblk=hostile:mode (and extra words) on a raw disk whose
// sector 0 starts with diskMarker, recording the monitor's log.
func hostileRun(t *testing.T, mode, extra string) (*cloakRun, string) {
	t.Helper()
	contents := make([]byte, 1<<20)
	copy(contents, diskMarker)
	be, _ := rawDisk(t, contents, false)
	defer be.Close()
	var logs lockedBuffer
	g := runCloakGuestConfig(t, "run=hello:after vblk=hostile:"+mode+extra, &Hooks{}, func(c *Config) {
		c.Disks = []Disk{{Name: "d", Backend: be}}
		c.Logger = slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	})
	return g, logs.String()
}

var hostileResultRE = regexp.MustCompile(`vblk: hostile (\S+): result=(-?\d+) status=0x([0-9a-f]+)`)

// TestGuestVblkHostileDriver runs every hostile-driver mode of the test guest, each in its
// own VM, in parallel, beside a VM doing honest disk I/O.
func TestGuestVblkHostileDriver(t *testing.T) {
	requireGuestKVM(t)
	const (
		noRequest = -1
		eio       = -5
		ioErr     = 1
	)
	for _, tc := range []struct {
		mode   string
		result int    // the request's status byte, -EIO (no completion), or -1 (no request)
		reset  bool   // the device must be in DEVICE_NEEDS_RESET
		log    string // what the monitor's log must say
	}{
		{"outside-ram", eio, true, "outside guest RAM"},
		{"far-addr", eio, true, "outside guest RAM"},
		{"mmio", eio, true, "outside guest RAM"},
		{"doorbell", eio, true, "outside guest RAM"},
		{"locked", eio, true, "page protection denies"},
		{"rings", eio, true, "overlaps the queue's rings"},
		{"loop", eio, true, "the chain loops"},
		{"long-chain", eio, true, "the chain loops"},
		{"next-oob", eio, true, "links to descriptor 200, past its table of 8"},
		{"head-oob", noRequest, true, "names head descriptor 200, past the queue size 8"},
		{"avail-jump", noRequest, true, "13 entries past the device's 0, more than the queue size 8"},
		{"avail-back", noRequest, true, "65535 entries past the device's 1"},
		{"zero-len", eio, true, "less than the 16-byte header"},
		{"overlong", eio, true, "outside guest RAM"},
		{"past-end", ioErr, false, "past the disk's 2048"},
		{"unaligned", ioErr, false, "not a multiple of 512"},
		{"used-ro", noRequest, true, "used ring: virtio d: monitor refuses the device DMA (read-write)"},
		{"lock-later", eio, true, "is no longer the device's to use: virtio d: monitor refuses the device DMA"},
		{"notify-unset", noRequest, true, "notification of queue 3, which is not set up"},
		{"queue-move", 0, false, "while the queue is ready"},
	} {
		t.Run(tc.mode, func(t *testing.T) {
			t.Parallel()
			g, logs := hostileRun(t, tc.mode, "")
			g.wantStatus(t, 0)
			m := hostileResultRE.FindStringSubmatch(g.out)
			if m == nil || m[1] != tc.mode {
				t.Fatalf("no result line for %s:\n%s", tc.mode, g.out)
			}
			result, _ := strconv.Atoi(m[2])
			status, _ := strconv.ParseUint(m[3], 16, 32)
			if result != tc.result || (status&virtio.StatusDeviceNeedsReset != 0) != tc.reset {
				t.Fatalf("result %d status %#x, want result %d and DEVICE_NEEDS_RESET %v:\n%s", result, status, tc.result, tc.reset, g.out)
			}
			if !strings.Contains(logs, tc.log) {
				t.Fatalf("the monitor's log does not say %q:\n%s", tc.log, logs)
			}
			if tc.reset && !strings.Contains(logs, "device needs reset") {
				t.Fatalf("no device-needs-reset record in the log:\n%s", logs)
			}
			// Nothing else the device could reach changed, the device works again after a
			// reset, and the VM ran its process after the attack.
			g.wantLines(t, "vblk: hostile "+tc.mode+": canary intact", "vblk: hostile "+tc.mode+": after reset: write+read ok", "hello: pid 1 argc 2 after")
			if tc.mode == "lock-later" {
				// The page was locked after the queue was set up: the device, which mapped the
				// ring then, checks it again at the notification and leaves it alone.
				g.wantLines(t, "vblk: hostile lock-later: locked used ring idx=0 (not written)")
			}
			if tc.mode == "locked" || tc.mode == "used-ro" {
				if !strings.Contains(g.out, "vblk: hostile "+tc.mode+": text canary unchanged: 9090909090909090") {
					t.Fatalf("the kernel's text changed:\n%s", g.out)
				}
			}
			if tc.mode == "locked" || tc.mode == "used-ro" || tc.mode == "lock-later" {
				if refused := g.audited(EventGuardRefused); len(refused) == 0 || refused[0]["purpose"] != memguard.DMA.String() {
					t.Fatalf("guarded-access refusals %v, want a DMA refusal", refused)
				}
			}
			t.Logf("%s: result %d status %#x; log: %s", tc.mode, result, status, firstLine(logs, tc.log))
		})
	}
	// Another VM beside them does its disk I/O undisturbed.
	t.Run("bystander", func(t *testing.T) {
		t.Parallel()
		be, _ := rawDisk(t, make([]byte, 1<<20), false)
		defer be.Close()
		g := runDiskGuest(t, "run=cloakdisk:write:bystander:cloak,counter:b:5:2", be)
		g.wantStatus(t, 0)
		g.wantLines(t, cloakdiskOK...)
		if n := len(g.lines("counter b: pid")); n != 5 {
			t.Fatalf("bystander counter printed %d lines:\n%s", n, g.out)
		}
	})
}

// TestGuestVblkHostileLockedWithoutPageProt is the same disk read into the kernel's text
// without the defence: with pp=off nothing locks the text, the guarded accessor lets the
// DMA through, and the disk's bytes land in the kernel's code. With the lock (the default,
// TestGuestVblkHostileDriver/locked) the device refuses the request instead.
func TestGuestVblkHostileLockedWithoutPageProt(t *testing.T) {
	requireGuestKVM(t)
	g, _ := hostileRun(t, "locked", " pp=off")
	g.wantStatus(t, 0)
	g.wantLines(t, "vblk: hostile locked: result=0 status=0xf",
		"vblk: hostile locked: text canary overwritten: "+fmt.Sprintf("%x", diskMarker))
	if refused := g.audited(EventGuardRefused); len(refused) != 0 {
		t.Fatalf("refusals %v without page protection", refused)
	}
}

func firstLine(s, sub string) string {
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			return l
		}
	}
	return ""
}

// TestGuestVblkRingInCloakedPage is attack=vblkring: the kernel points the disk's used
// ring at the victim's data page 0 while that page is ciphertext (the kernel just read it,
// so the device may take it), and makes a request after the victim wrote the page again.
// Against an ordinary process the device's used entry lands in the victim's data (it
// finds "other" where it wrote "v2"). Against a cloaked one the page is the app's
// plaintext by then, the device's check of its rings at the notification refuses it, the
// device needs a reset and the app's data is intact. (With the check removed from the
// transport the cloaked run, too, ends with page0=other: the device wrote the app's
// plaintext and the monitor then sealed the damage as the app's own.)
func TestGuestVblkRingInCloakedPage(t *testing.T) {
	requireGuestKVM(t)
	for _, cloaked := range []bool{false, true} {
		name := map[bool]string{false: "uncloaked", true: "cloaked"}[cloaked]
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			be, _ := rawDisk(t, make([]byte, 1<<20), false)
			defer be.Close()
			secret := randomSecret(t)
			arg := secret
			if cloaked {
				arg += ":cloak"
			}
			g := runDiskGuest(t, "run=cloaksecret:"+arg+" attack=vblkring victim=cloaksecret", be)
			g.wantStatus(t, 0)
			m := regexp.MustCompile(`attack vblkring: victim=cloaksecret result=(-?\d+) status=0x([0-9a-f]+)`).FindStringSubmatch(g.out)
			// The device took the ring: the page was ciphertext when the queue was set up.
			if m == nil || !regexp.MustCompile(`attack vblkring: victim=cloaksecret used ring at 0x[0-9a-f]+ ready=1 status=0xf\n`).MatchString(g.out) {
				t.Fatalf("the attack did not run, or the queue was refused at setup:\n%s", g.out)
			}
			p0, _, ok := finalClasses(t, g.guestRun)
			status, _ := strconv.ParseUint(m[2], 16, 32)
			switch {
			case !ok:
				t.Fatalf("no final line:\n%s", g.out)
			case !cloaked && (p0 != "other" || m[1] != "0"):
				t.Fatalf("uncloaked: page0=%s result=%s; want the device's used entry over the victim's data:\n%s", p0, m[1], g.out)
			case cloaked && (p0 != "v2" || m[1] != "-5" || status&virtio.StatusDeviceNeedsReset == 0):
				t.Fatalf("cloaked: page0=%s result=%s status %#x; want v2 kept and the device broken:\n%s", p0, m[1], status, g.out)
			}
			if cloaked {
				refused := g.audited(EventGuardRefused)
				if len(refused) == 0 || refused[len(refused)-1]["purpose"] != memguard.DMA.String() || !strings.Contains(fmt.Sprint(refused[len(refused)-1]["why"]), "cloaked plaintext") {
					t.Fatalf("guarded-access refusals %v, want a DMA refusal of cloaked plaintext", refused)
				}
			}
			t.Logf("%s: page0=%s result=%s status=%#x", name, p0, m[1], status)
		})
	}
}
