//go:build linux && amd64

package kvm

import (
	"encoding/binary"
	"fmt"
	"slices"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// BenchmarkMarkCOW measures what a checkpoint's pause would spend marking guest RAM
// for copy-on-write or dirty tracking, at three RAM sizes, so the design can pick the
// mechanism whose cost does not grow with RAM (docs/snapshot.md):
//
//	go test ./kvm -run '^$' -bench MarkCOW -benchtime 5x
//
// RAM is a memfd mapped MAP_SHARED (as umbra's guest RAM is), every page of which the
// guest has written (a guest loop stores to each page first, so KVM has mapped them
// all). Each iteration times one operation of each kind, interleaved; the figures are
// medians over the iterations:
//
//   - uffd-wp-ns: UFFDIO_WRITEPROTECT of the whole mapping (userfaultfd write-protect
//     mode, the copy-on-write mark), then (untimed) the unprotect;
//   - dirtylog-ns: KVM_SET_USER_MEMORY_REGION turning on KVM_MEM_LOG_DIRTY_PAGES
//     with KVM's default dirty log (KVM write-protects every page at once), then
//     (untimed) turning it off;
//   - dirtylog-manual-ns: the same with KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE |
//     KVM_DIRTY_LOG_INITIALLY_SET, where pages are write-protected later, in chunks,
//     by KVM_CLEAR_DIRTY_LOG.
func BenchmarkMarkCOW(b *testing.B) {
	sys := requireKVM(b)
	for _, mib := range []int{64, 256, 1024} {
		b.Run(fmt.Sprintf("%dMiB", mib), func(b *testing.B) {
			size := mib << 20
			fd, err := unix.MemfdCreate("markcow", unix.MFD_CLOEXEC)
			if err != nil {
				b.Fatal(err)
			}
			defer unix.Close(fd)
			if err := unix.Ftruncate(fd, int64(size)); err != nil {
				b.Fatal(err)
			}
			view := func() []byte {
				m, err := unix.Mmap(fd, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
				if err != nil {
					b.Fatal(err)
				}
				b.Cleanup(func() { unix.Munmap(m) })
				return m
			}
			// Two VMs, each touching every page through its own view of the memfd:
			// one with KVM's default dirty log, one with manual protection.
			auto, manual := touchAll(b, sys, view(), false), touchAll(b, sys, view(), true)
			wpView := view()
			for off := 0; off < size; off += 4096 {
				wpView[off] = 1
			}
			u, err := NewUserfaultfd(UffdFeatureWPHugetlbfsShm)
			if err != nil {
				b.Skipf("skipping: userfaultfd write-protect of shmem: %v", err)
			}
			defer u.Close()
			if err := u.Register(wpView, UffdRegisterWP); err != nil {
				b.Fatal(err)
			}
			var wpT, autoT, manualT []time.Duration
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				t0 := time.Now()
				if err := u.WriteProtect(wpView, true); err != nil {
					b.Fatal(err)
				}
				wpT = append(wpT, time.Since(t0))
				if err := u.WriteProtect(wpView, false); err != nil {
					b.Fatal(err)
				}
				autoT = append(autoT, auto.toggleDirtyLog(b))
				manualT = append(manualT, manual.toggleDirtyLog(b))
			}
			b.StopTimer()
			// Medians: the shared host's other load lands on single iterations.
			b.ReportMetric(float64(medianDuration(wpT).Nanoseconds()), "uffd-wp-ns")
			b.ReportMetric(float64(medianDuration(autoT).Nanoseconds()), "dirtylog-ns")
			b.ReportMetric(float64(medianDuration(manualT).Nanoseconds()), "dirtylog-manual-ns")
		})
	}
}

type touchedVM struct {
	vm  *VM
	mem []byte
}

// touchAll runs a long-mode guest that writes one byte to every page of mem from
// 1 MiB up, so KVM has a mapping for each; RAM is identity mapped with 2 MiB pages.
func touchAll(b *testing.B, sys *System, mem []byte, manual bool) *touchedVM {
	b.Helper()
	vm, err := sys.CreateVM()
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { vm.Close() })
	if manual {
		if err := vm.EnableManualDirtyLog(DirtyLogManualProtect | DirtyLogInitiallySet); err != nil {
			b.Fatal(err)
		}
	}
	le := binary.LittleEndian
	le.PutUint64(mem[0x8000:], 0x9000|3)
	le.PutUint64(mem[0x9000:], 0xa000|3)
	for i := 0; i < len(mem)>>21 && i < 512; i++ {
		le.PutUint64(mem[0xa000+8*i:], uint64(i)<<21|0x80|3)
	}
	// mov $0x100000,%rdi; 1: movb $1,(%rdi); add $0x1000,%rdi; cmp %rsi,%rdi; jb 1b; hlt
	code := []byte{
		0x48, 0xc7, 0xc7, 0x00, 0x00, 0x10, 0x00,
		0xc6, 0x07, 0x01,
		0x48, 0x81, 0xc7, 0x00, 0x10, 0x00, 0x00,
		0x48, 0x39, 0xf7,
		0x72, 0xf1,
		0xf4,
	}
	copy(mem[testCodeAddr:], code)
	if err := vm.SetMemoryRegion(MemoryRegion{Slot: 0, Host: mem}); err != nil {
		b.Fatal(err)
	}
	cpu, err := vm.CreateVCPU(0)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { cpu.Close() })
	tv := &testVM{sys: sys, vm: vm, cpu: cpu, mem: mem}
	tv.toLongMode(b)
	if err := cpu.SetRegs(Regs{RIP: testCodeAddr, RFLAGS: 2, RSI: uint64(len(mem))}); err != nil {
		b.Fatal(err)
	}
	mustExit[*ExitHLT](b, tv.run(b))
	return &touchedVM{vm: vm, mem: mem}
}

// toggleDirtyLog times turning dirty logging on for the slot, then turns it off.
func (t *touchedVM) toggleDirtyLog(b *testing.B) time.Duration {
	t0 := time.Now()
	if err := t.vm.SetMemoryRegion(MemoryRegion{Slot: 0, Flags: MemLogDirtyPages, Host: t.mem}); err != nil {
		b.Fatal(err)
	}
	d := time.Since(t0)
	if err := t.vm.SetMemoryRegion(MemoryRegion{Slot: 0, Host: t.mem}); err != nil {
		b.Fatal(err)
	}
	return d
}

func medianDuration(d []time.Duration) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[len(s)/2]
}
