package monitor

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"io"
	"runtime"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/umbra-cc/umbra/kvm"
	"github.com/umbra-cc/umbra/snapshot"
)

const rangeBytes = snapshot.DefaultPagesPerBlock * PageSize // one storage block of pages

// dataCheckpoint checkpoints the test guest (startBenchVM, size bytes of RAM)
// after filling dataRanges whole storage-block ranges at the top of RAM with
// incompressible-looking data the guest never touches, and returns the config and the
// checkpoint file.
func dataCheckpoint(b *testing.B, size uint64, dataRanges uint64, key []byte) (Config, []byte) {
	b.Helper()
	v := startBenchVM(b, size)
	ctx := context.Background()
	if _, err := v.Pause(ctx); err != nil {
		b.Fatal(err)
	}
	chunk := make([]byte, rangeBytes)
	x := uint64(0x9e3779b97f4a7c15)
	for r := size/rangeBytes - dataRanges; r < size/rangeBytes; r++ {
		for i := 0; i < len(chunk); i += 8 {
			x = x*6364136223846793005 + 1442695040888963407
			for k := 0; k < 8; k++ {
				chunk[i+k] = byte(x >> (8 * k))
			}
		}
		if err := v.mem.WritePhys(r*rangeBytes, chunk); err != nil {
			b.Fatal(err)
		}
	}
	var file bytes.Buffer
	if _, err := v.Checkpoint(ctx, &file, CheckpointOptions{Key: key, Generation: 1}); err != nil {
		b.Fatal(err)
	}
	v.StopIfRunning(io.EOF) // no load from it during the measurements
	cfg := v.cfg
	cfg.Console = io.Discard
	return cfg, file.Bytes()
}

func benchChain(b *testing.B, file, key []byte) *snapshot.Chain {
	b.Helper()
	c, err := OpenCheckpoint(bytes.NewReader(file), int64(len(file)), key)
	if err != nil {
		b.Fatal(err)
	}
	chain, err := NewCheckpointChain(c)
	if err != nil {
		b.Fatal(err)
	}
	return chain
}

// BenchmarkVMLazyRestoreFault measures the monitor's lazy restore per fault against the
// issue's reference, measured interleaved in the same run: a raw userfaultfd round
// trip on a memfd mapping whose server does one AES-256-GCM open of a sealed 256 KiB
// block (the block's decryption) and one 256 KiB UFFDIO_COPY. Both sides take the
// same faults the same way: a thread touching one byte in each of 128 storage-block
// ranges, through the system view of a lazily restored VM (the view KVM's slots map,
// so the fault path is the one a vCPU takes after its EPT violation, minus KVM's
// part) or through the raw mapping. lazy-us/fault includes reading the file's record,
// the header checks, AES-GCM open, the chain lookup and the range's bookkeeping.
//
//	go test ./monitor -run '^$' -bench VMLazyRestoreFault -benchtime 512x
func BenchmarkVMLazyRestoreFault(b *testing.B) {
	if runtime.GOMAXPROCS(0) < 2 {
		b.Skip("a thread blocked on a fault holds its P: the server needs another")
	}
	const size, ranges = 64 << 20, 128
	key := testKey(b)
	cfg, file := dataCheckpoint(b, size, ranges, key)
	first := uint64(size/rangeBytes - ranges)

	blk, _ := aes.NewCipher(key)
	aead, _ := cipher.NewGCM(blk)
	nonce := make([]byte, aead.NonceSize())
	image := make([]byte, rangeBytes)
	for i := range image {
		image[i] = byte(i*7) | 1
	}
	sealed := aead.Seal(nil, nonce, image, nil)
	plain := make([]byte, rangeBytes)

	// One side's chunk: up to ranges touches on a fresh target.
	lazyChunk := func(n int) time.Duration {
		v, err := Restore(cfg, benchChain(b, file, key), RestoreOptions{Mode: RestoreLazy, FillPace: -1})
		if err != nil {
			b.Fatal(err)
		}
		defer v.Close()
		sys, err := v.mem.View("sys")
		if err != nil {
			b.Fatal(err)
		}
		t0 := time.Now()
		var sum byte
		for i := 0; i < n; i++ {
			sum += sys[(first+uint64(i))*rangeBytes+8]
		}
		d := time.Since(t0)
		if st, _ := v.LazyStats(); st.FromFaults+1 < uint64(n) || st.Err != nil || sum == 0 {
			b.Fatalf("lazy side: %+v for %d touches (sum %d)", st, n, sum)
		}
		return d
	}
	rawChunk := func(n int) time.Duration {
		fd, err := unix.MemfdCreate("bench-raw", unix.MFD_CLOEXEC)
		if err != nil {
			b.Fatal(err)
		}
		defer unix.Close(fd)
		if err := unix.Ftruncate(fd, size); err != nil {
			b.Fatal(err)
		}
		mem, err := unix.Mmap(fd, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
		if err != nil {
			b.Fatal(err)
		}
		defer unix.Munmap(mem)
		u, err := kvm.NewUserfaultfd(kvm.UffdFeatureMissingShmem)
		if err != nil {
			b.Skipf("userfaultfd: %v", err)
		}
		defer u.Close()
		if err := u.Register(mem, kvm.UffdRegisterMissing); err != nil {
			b.Fatal(err)
		}
		base := uint64(uintptr(unsafe.Pointer(&mem[0])))
		stop := make(chan struct{})
		served := make(chan error, 1)
		go func() {
			served <- u.Serve(stop, 100, func(f kvm.UffdFault) error {
				off := (f.Address - base) &^ (rangeBytes - 1)
				if _, err := aead.Open(plain[:0], nonce, sealed, nil); err != nil {
					return err
				}
				return u.Copy(mem[off:off+rangeBytes], plain)
			})
		}()
		t0 := time.Now()
		var sum byte
		for i := 0; i < n; i++ {
			sum += mem[(first+uint64(i))*rangeBytes+8]
		}
		d := time.Since(t0)
		close(stop)
		if err := <-served; err != nil || sum == 0 {
			b.Fatalf("raw side: %v (sum %d)", err, sum)
		}
		return d
	}
	lazyChunk(8) // warm up
	rawChunk(8)
	var lazyT, rawT time.Duration
	b.ResetTimer()
	for done := 0; done < b.N; done += ranges {
		n := min(ranges, b.N-done)
		lazyT += lazyChunk(n)
		rawT += rawChunk(n)
	}
	b.StopTimer()
	l, r := float64(lazyT.Nanoseconds())/float64(b.N), float64(rawT.Nanoseconds())/float64(b.N)
	b.ReportMetric(l/1000, "lazy-us/fault")
	b.ReportMetric(r/1000, "raw-us/fault")
	b.ReportMetric(l/r, "lazy/raw")
}

// BenchmarkVMTimeToFirstInstruction measures, at 64 MiB, 256 MiB and 1 GiB of guest RAM
// (half of it holding data, so an eager restore has that much to read), the time from
// opening a checkpoint file to the restored guest's first instruction: open,
// authenticate the manifests, build the VM (New), restore every section and RAM
// (eager: every block read and authenticated; lazy: none, the views registered), then
// one KVM_RUN single-stepping the vCPU, which returns after the guest's first
// instruction (lazily, after the faults that instruction takes). new-ms is New alone
// for the same config, in the same run: the floor any restore pays.
//
//	go test ./monitor -run '^$' -bench VMTimeToFirstInstruction -benchtime 3x
func BenchmarkVMTimeToFirstInstruction(b *testing.B) {
	for _, size := range benchSizes {
		b.Run(sizeName(size), func(b *testing.B) {
			key := testKey(b)
			cfg, file := dataCheckpoint(b, size, size/rangeBytes/2, key)
			var eager, lazy, fresh time.Duration
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				eager += firstInstruction(b, cfg, file, key, RestoreOptions{Mode: RestoreEager})
				lazy += firstInstruction(b, cfg, file, key, RestoreOptions{Mode: RestoreLazy, FillPace: -1})
				t0 := time.Now()
				v, err := New(cfg)
				if err != nil {
					b.Fatal(err)
				}
				fresh += time.Since(t0)
				v.Close()
			}
			b.StopTimer()
			n := float64(b.N) * 1e6
			b.ReportMetric(float64(eager.Nanoseconds())/n, "eager-ms")
			b.ReportMetric(float64(lazy.Nanoseconds())/n, "lazy-ms")
			b.ReportMetric(float64(fresh.Nanoseconds())/n, "new-ms")
			b.ReportMetric(float64(len(file))/(1<<20), "file-MiB")
		})
	}
}

// firstInstruction restores file with opt and returns the time to the guest's first
// instruction (BenchmarkVMTimeToFirstInstruction).
func firstInstruction(b *testing.B, cfg Config, file, key []byte, opt RestoreOptions) time.Duration {
	b.Helper()
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	t0 := time.Now()
	v, err := Restore(cfg, benchChain(b, file, key), opt)
	if err != nil {
		b.Fatal(err)
	}
	defer v.Close()
	if err := v.cpu.SetGuestDebug(kvm.GuestDebugEnable|kvm.GuestDebugSingleStep, [8]uint64{}); err != nil {
		b.Fatal(err)
	}
	exit, err := v.cpu.Run()
	d := time.Since(t0)
	if err != nil {
		b.Fatal(err)
	}
	if _, ok := exit.(*kvm.ExitDebug); !ok {
		b.Fatalf("first exit after restore: %v, want a single-step debug exit", exit)
	}
	return d
}
