// Command benchtable reads `go test -bench` output on stdin and prints the table of
// docs/performance.md: each ratio against its target, with the benchmark that
// measures it. `make bench` runs the benchmarks and pipes them here. A benchmark run
// several times (-count) shows the range of its figures; the row meets its target
// only if every run did. It exits 1 if a target is missed, 2 if a row has no figure.
package main

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
)

// row is one line of the table: the metric a benchmark reports, and its target.
type row struct {
	what   string
	bench  string  // the benchmark's full name, without the -GOMAXPROCS suffix
	metric string  // the b.ReportMetric unit
	target float64 // the most the ratio may be; 0: no target (shown for context)
}

var rows = []row{
	{"compute-only cloaked app (`cloakprobe:spin`) vs uncloaked, computation (wall)", "BenchmarkCloakCompute", "cloaked/uncloaked", 1.1},
	{"compute-only cloaked app vs uncloaked, whole run (CPU time)", "BenchmarkCloakCompute", "run-cpu-cloaked/uncloaked", 1.1},
	{"the same, with the old fixed 1 ms slice (whole run, CPU)", "BenchmarkCloakCompute", "run-cpu-cloaked-1ms/uncloaked", 0},
	{"fault-bound cloaked app run (`BenchmarkCloakAppRun`, CPU time)", "BenchmarkCloakAppRun", "cpu-cloaked/uncloaked", 1.1},
	{"the same, wall time (the issue's measure)", "BenchmarkCloakAppRun", "cloaked/uncloaked", 1.1},
	{"demo `umbra run`, cloaked vs not (CPU time)", "BenchmarkRunCloaked", "cpu-cloaked/uncloaked", 1.1},
	{"`umbra run` CPU time, 100k prior audit and event-log records vs 0 (swtpm)", "BenchmarkRunHistory", "cpu-100k/0", 1.1},
	{"the same, both logs verified and replayed in full at open (as before)", "BenchmarkRunHistory", "cpu-100k-full-verify/0", 0},
	{"seal vs bare go-tpm (simulator)", "BenchmarkSealing/sim/seal", "umbra/bare", 1.2},
	{"seal vs bare go-tpm (swtpm)", "BenchmarkSealing/swtpm/seal", "umbra/bare", 1.2},
	{"quote + verify vs bare quote + signature check (simulator)", "BenchmarkQuote/simulator", "umbra/bare", 1.2},
	{"the same, process CPU time (the simulator runs in process)", "BenchmarkQuote/simulator", "cpu-umbra/bare", 1.2},
	{"quote + verify vs bare quote + signature check (swtpm)", "BenchmarkQuote/swtpm", "umbra/bare", 1.2},
	{"page-protection upcall round trip vs one bare MMIO exit", "BenchmarkPageProtViolation/upcall", "ratio", 2},
	{"the same per exit (two bare MMIO exits)", "BenchmarkPageProtViolation/upcall", "ratio-per-exit", 0},
	{"page-protection `skip` violation vs bare MMIO exit", "BenchmarkPageProtViolation/skip", "ratio", 0},
	{"cloaked-app page-protection `log` vs raw appVM fault", "BenchmarkPageProtCloakedViolation/log", "violation/raw-appfault", 2},
	{"cloaked-app page-protection `log` vs bare MMIO exit", "BenchmarkPageProtCloakedViolation/log", "violation/bare-mmio-exit", 0},
	{"cloaked-app page-protection `skip` vs raw appVM fault", "BenchmarkPageProtCloakedViolation/skip", "violation/raw-appfault", 0},
	{"system-view transition vs userfaultfd + GCM, per page", "BenchmarkCloakTransitions", "sys/raw", 0},
	{"app-view transition vs raw appVM fault + GCM, per page", "BenchmarkCloakTransitions", "app/raw-appfault-per-page", 0},
	{"app-view transition vs raw appVM fault-around (16 pages of walk + GCM + entry per exit), per exit", "BenchmarkCloakTransitions", "app/raw-appfault-per-exit", 0},
	{"the same per page, in thread CPU time (less disturbed by the host's load)", "BenchmarkCloakTransitions", "app/raw-appfault-per-page-cpu", 0},
	{"the monitor's own work per app-view transition (rule checks included) vs its raw primitives, CPU", "BenchmarkCloakServeExit", "ours/raw", 0},
	{"Guard decision + audit append vs bare OPA + write+fsync", "BenchmarkGuardDecision", "guard/bare", 0},
	{"console ticket issue + redeem vs two raw HMAC-SHA256 of its body", "BenchmarkTicket", "ticket/raw-hmac", 0},
	{"audit open from checkpoint, 100k records vs 0", "BenchmarkOpenHistory", "checkpoint-100k/0", 0},
	{"event log open from checkpoint, 100k records vs 1", "BenchmarkOpenEventLog", "checkpoint-100k/0", 0},
	{"virtio-blk 4 KiB read request, raw disk, vs pread", "BenchmarkRequest/raw/read/4KiB", "ratio-vs-syscall", 0},
	{"virtio-blk 1 MiB read request, raw disk, vs pread", "BenchmarkRequest/raw/read/1024KiB", "ratio-vs-syscall", 0},
	{"virtio-blk 4 KiB write + flush request, raw disk, vs pwrite + fdatasync", "BenchmarkRequest/raw/write+flush/4KiB", "ratio-vs-syscall", 0},
	{"virtio-blk 1 MiB write + flush request, raw disk, vs pwrite + fdatasync", "BenchmarkRequest/raw/write+flush/1024KiB", "ratio-vs-syscall", 0},
	{"virtio-blk 4 KiB read request, protected disk, vs pread", "BenchmarkRequest/protected/read/4KiB", "ratio-vs-syscall", 0},
	{"virtio-blk 1 MiB read request, protected disk, vs pread", "BenchmarkRequest/protected/read/1024KiB", "ratio-vs-syscall", 0},
	{"virtio-blk 4 KiB write + flush request, protected disk, vs pwrite + fdatasync", "BenchmarkRequest/protected/write+flush/4KiB", "ratio-vs-syscall", 0},
	{"virtio-blk 1 MiB write + flush request, protected disk, vs pwrite + fdatasync", "BenchmarkRequest/protected/write+flush/1024KiB", "ratio-vs-syscall", 0},
	{"virtio-net transmit, one 60-byte frame, vs write to the TAP", "BenchmarkNICTap/tx/60B", "ratio-vs-syscall", 0},
	{"virtio-net transmit, one 1514-byte frame, vs write to the TAP", "BenchmarkNICTap/tx/1514B", "ratio-vs-syscall", 0},
	{"virtio-net transmit, 64 KiB in 1514-byte frames, vs writes to the TAP", "BenchmarkNICTap/tx/64KiB", "ratio-vs-syscall", 0},
	{"virtio-net receive, one 60-byte frame, vs read from the TAP", "BenchmarkNICTap/rx/60B", "ratio-vs-syscall", 0},
	{"virtio-net receive, one 1514-byte frame, vs read from the TAP", "BenchmarkNICTap/rx/1514B", "ratio-vs-syscall", 0},
	{"virtio-net receive, 64 KiB in 1514-byte frames, vs reads from the TAP", "BenchmarkNICTap/rx/64KiB", "ratio-vs-syscall", 0},
	{"virtio-blk 512 B read through a VM's transport (notify, walk, guarded DMA, ring re-check), raw disk, vs pread", "BenchmarkVirtioNotify/locks=0", "ratio-vs-pread", 0},
	{"virtio ring re-check at each notification, share of that request (64 page-protection ranges)", "BenchmarkVirtioNotify/locks=64", "remap-share", 0},
	{"virtio-blk 4 KiB read request through a VM's transport, raw disk, vs pread", "BenchmarkVirtioBlkRequest/read/4KiB", "raw-vs-syscall", 0},
	{"the same, protected disk vs raw disk", "BenchmarkVirtioBlkRequest/read/4KiB", "protected-vs-raw", 0},
	{"virtio-blk 1 MiB read request through a VM's transport, raw disk, vs pread", "BenchmarkVirtioBlkRequest/read/1024KiB", "raw-vs-syscall", 0},
	{"the same, protected disk vs raw disk", "BenchmarkVirtioBlkRequest/read/1024KiB", "protected-vs-raw", 0},
	{"virtio-blk 4 KiB write + flush request through a VM's transport, raw disk, vs pwrite + fdatasync", "BenchmarkVirtioBlkRequest/write+flush/4KiB", "raw-vs-syscall", 0},
	{"the same, protected disk vs raw disk", "BenchmarkVirtioBlkRequest/write+flush/4KiB", "protected-vs-raw", 0},
	{"virtio-blk 1 MiB write + flush request through a VM's transport, raw disk, vs pwrite + fdatasync", "BenchmarkVirtioBlkRequest/write+flush/1024KiB", "raw-vs-syscall", 0},
	{"the same, protected disk vs raw disk", "BenchmarkVirtioBlkRequest/write+flush/1024KiB", "protected-vs-raw", 0},
	{"lazy restore, per fault (one 256 KiB block) vs raw userfaultfd install + AES-GCM open", "BenchmarkLazyRestoreFault", "lazy/raw", 1.5},
	{"monitor VM lazy restore, per fault (one 256 KiB block) vs raw userfaultfd install + AES-GCM open", "BenchmarkVMLazyRestoreFault", "lazy/raw", 1.5},
	{"checkpoint pause vs a pause capturing only the vCPU, 64 MiB", "BenchmarkCheckpointPause/64MiB/rounds", "pause/vcpu-only", 0},
	{"checkpoint pause vs a pause capturing only the vCPU, 1 GiB", "BenchmarkCheckpointPause/1GiB/rounds", "pause/vcpu-only", 0},
	{"checkpoint pause switching a 4 GiB disk to an overlay vs the same VM's pause freezing no disk", "BenchmarkCheckpointDiskPause/4GiB", "pause/no-disk-pause", 0},
	{"checkpoint pause freezing a 4 GiB protected disk under a protected overlay vs the same VM's pause freezing no disk", "BenchmarkCheckpointProtectedDiskPause/4GiB", "pause/no-disk-pause", 0},
	{"incremental snapshot bytes vs dirtied bytes, 1024 contiguous pages", "BenchmarkIncrementalSize/contiguous-1024", "bytes/dirtied", 0},
	{"incremental snapshot bytes vs dirtied bytes, one page per storage block", "BenchmarkIncrementalSize/scattered-48", "bytes/dirtied", 0},
	{"snapshot storage block seal (64 pages, no zstd) vs raw AES-256-GCM", "BenchmarkBlockSeal/raw-mixed", "ratio", 0},
	{"snapshot storage block seal with zstd vs raw AES-256-GCM", "BenchmarkBlockSeal/zstd-mixed", "ratio", 0},
	{"snapshot storage block read (no zstd) vs raw AES-256-GCM open", "BenchmarkBlockOpen/raw-mixed", "ratio", 0},
	{"snapshot storage block read with zstd vs raw AES-256-GCM open", "BenchmarkBlockOpen/zstd-mixed", "ratio", 0},
	{"live migration downtime vs the same checkpoint + eager restore on one host, 64 MiB", "BenchmarkMigrate/64MiB/zstd=false", "downtime/local", 0},
	{"live migration downtime vs the same on one host, 1 GiB", "BenchmarkMigrate/1024MiB/zstd=false", "downtime/local", 0},
	{"live migration downtime vs the same on one host, 1 GiB, zstd", "BenchmarkMigrate/1024MiB/zstd=true", "downtime/local", 0},
	{"live migration of the test Linux kernel mid-boot, total time vs QEMU's migration of the same", "BenchmarkMigrateLinuxVsQEMU", "umbra/qemu-total", 0},
	{"the same, bytes on the wire vs QEMU's", "BenchmarkMigrateLinuxVsQEMU", "umbra/qemu-bytes", 0},
}

// scalingRows are the growth rates: absolute costs per unit, shown without targets.
var scalingRows = []row{
	{"audit open from its checkpoint, per prior record", "BenchmarkOpenHistory", "checkpoint-ns/record", 0},
	{"audit open verifying in full, per prior record", "BenchmarkOpenHistory", "full-ns/record", 0},
	{"event log open from its checkpoint, per prior record", "BenchmarkOpenEventLog", "checkpoint-ns/record", 0},
	{"event log open replaying in full, per prior record", "BenchmarkOpenEventLog", "full-ns/record", 0},
	{"policy decision, per deny rule that does not fire", "BenchmarkDecisionPerRule", "ns/rule", 0},
	{"cloaking, per first-touched cloaked page (over the same run uncloaked)", "BenchmarkCloakScaling/per-page", "cloaking-ns/page", 0},
	{"cloaking, per cloaked app (over the same apps uncloaked)", "BenchmarkCloakScaling/per-app", "cloaking-ns/app", 0},
	{"a cloaked run, per GiB of guest RAM", "BenchmarkCloakScaling/per-GiB", "cloaked-ms/GiB", 0},
	{"an uncloaked run, per GiB of guest RAM", "BenchmarkCloakScaling/per-GiB", "uncloaked-ms/GiB", 0},
	{"lazy restore of 512 MiB, open to the guest's first exit (ms)", "BenchmarkTimeToFirstInstruction", "ms-to-first-exit", 0},
	{"checkpoint pause, 64 MiB (µs)", "BenchmarkCheckpointPause/64MiB/rounds", "pause-us", 0},
	{"checkpoint pause, 256 MiB (µs)", "BenchmarkCheckpointPause/256MiB/rounds", "pause-us", 0},
	{"checkpoint pause, 1 GiB (µs)", "BenchmarkCheckpointPause/1GiB/rounds", "pause-us", 0},
	{"checkpoint pause switching a 64 MiB disk to its snapshot overlay (µs)", "BenchmarkCheckpointDiskPause/64MiB", "pause-us", 0},
	{"checkpoint pause switching a 4 GiB disk to its snapshot overlay (µs)", "BenchmarkCheckpointDiskPause/4GiB", "pause-us", 0},
	{"the same checkpoint with the 4 GiB disk, whole (digest of the frozen disk included; ms)", "BenchmarkCheckpointDiskPause/4GiB", "checkpoint-ms", 0},
	{"checkpoint pause freezing a 64 MiB protected disk (µs)", "BenchmarkCheckpointProtectedDiskPause/64MiB", "pause-us", 0},
	{"checkpoint pause freezing a 4 GiB protected disk (µs)", "BenchmarkCheckpointProtectedDiskPause/4GiB", "pause-us", 0},
	{"monitor VM restore to the first guest instruction, lazy, 64 MiB (ms)", "BenchmarkVMTimeToFirstInstruction/64MiB", "lazy-ms", 0},
	{"monitor VM restore to the first guest instruction, lazy, 1 GiB (ms)", "BenchmarkVMTimeToFirstInstruction/1GiB", "lazy-ms", 0},
	{"monitor VM restore to the first guest instruction, eager, 1 GiB, 512 MiB of data (ms)", "BenchmarkVMTimeToFirstInstruction/1GiB", "eager-ms", 0},
	{"building the VM alone (New), 1 GiB (ms)", "BenchmarkVMTimeToFirstInstruction/1GiB", "new-ms", 0},
	{"userfaultfd write-protect of all guest RAM, 64 MiB (ns)", "BenchmarkMarkCOW/64MiB", "uffd-wp-ns", 0},
	{"userfaultfd write-protect of all guest RAM, 1 GiB (ns)", "BenchmarkMarkCOW/1024MiB", "uffd-wp-ns", 0},
	{"KVM dirty log on, manual protect, 64 MiB (ns)", "BenchmarkMarkCOW/64MiB", "dirtylog-manual-ns", 0},
	{"KVM dirty log on, manual protect, 1 GiB (ns)", "BenchmarkMarkCOW/1024MiB", "dirtylog-manual-ns", 0},
	{"live migration downtime, 64 MiB (ms)", "BenchmarkMigrate/64MiB/zstd=false", "downtime-ms", 0},
	{"live migration downtime, 1 GiB (ms)", "BenchmarkMigrate/1024MiB/zstd=false", "downtime-ms", 0},
	{"live migration bytes on the wire per byte of RAM, 1 GiB", "BenchmarkMigrate/1024MiB/zstd=false", "wire/RAM", 0},
	{"the same with zstd", "BenchmarkMigrate/1024MiB/zstd=true", "wire/RAM", 0},
	{"incremental backup bytes per disk byte, 1% of the disk changed in 64 KiB extents", "BenchmarkBackupIncrementalSize/extents-1pct", "stored/disk", 0},
	{"incremental backup bytes per disk byte, 10% of the disk changed in 64 KiB extents", "BenchmarkBackupIncrementalSize/extents-10pct", "stored/disk", 0},
	{"incremental backup bytes per disk byte, 50% of the disk changed in 64 KiB extents", "BenchmarkBackupIncrementalSize/extents-50pct", "stored/disk", 0},
	{"incremental backup bytes per changed byte, 1% of the 4 KiB blocks changed at random", "BenchmarkBackupIncrementalSize/scatter-1pct", "stored/changed", 0},
	{"incremental backup bytes per changed byte, 10% of the 4 KiB blocks changed at random", "BenchmarkBackupIncrementalSize/scatter-10pct", "stored/changed", 0},
	{"incremental backup bytes per changed byte, 50% of the 4 KiB blocks changed at random", "BenchmarkBackupIncrementalSize/scatter-50pct", "stored/changed", 0},
}

var (
	benchLine = regexp.MustCompile(`^(Benchmark\S+?)(?:-\d+)?\s+\d+\s+(.*)$`)
	benchName = regexp.MustCompile(`^(Benchmark\S+?)(?:-\d+)?\s`)
	// contLine is a result printed on a line of its own, after the benchmark's logs.
	contLine = regexp.MustCompile(`^\s+\d+\s+(\d.*ns/op.*)$`)
)

// parse returns every value of every metric of every benchmark in the output.
func parse(r io.Reader) (map[string]map[string][]float64, error) {
	out := map[string]map[string][]float64{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	last := "" // a benchmark whose name was printed before its logs
	for sc.Scan() {
		m := benchLine.FindStringSubmatch(sc.Text())
		if m == nil {
			if n := benchName.FindStringSubmatch(sc.Text()); n != nil {
				last = n[1]
			} else if c := contLine.FindStringSubmatch(sc.Text()); c != nil && last != "" {
				m = []string{"", last, c[1]}
			}
		}
		if m == nil {
			continue
		}
		last = ""
		f := strings.Fields(m[2])
		for i := 0; i+1 < len(f); i += 2 {
			v, err := strconv.ParseFloat(f[i], 64)
			if err != nil {
				break // a log line interleaved with the figures: keep what was read
			}
			if out[m[1]] == nil {
				out[m[1]] = map[string][]float64{}
			}
			out[m[1]][f[i+1]] = append(out[m[1]][f[i+1]], v)
		}
	}
	return out, sc.Err()
}

// render writes the table and reports whether every target was met and every row
// had a figure.
func render(w io.Writer, got map[string]map[string][]float64) (met, complete bool) {
	met, complete = true, true
	fmt.Fprintln(w, "| measure | target | measured (min–max) | runs | | benchmark |")
	fmt.Fprintln(w, "| --- | --- | --- | --- | --- | --- |")
	for _, r := range rows {
		if !line(w, r, got[r.bench][r.metric], &met) {
			complete = false
		}
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, "| growth | per unit (min–max) | runs | benchmark |")
	fmt.Fprintln(w, "| --- | --- | --- | --- |")
	for _, r := range scalingRows {
		vs := got[r.bench][r.metric]
		if len(vs) == 0 {
			complete = false
		}
		fmt.Fprintf(w, "| %s | %s | %d | `%s` %s |\n", r.what, figure(vs, "%.4g"), len(vs), r.bench, r.metric)
	}
	return met, complete
}

// figure formats the range of vs.
func figure(vs []float64, format string) string {
	if len(vs) == 0 {
		return "no figure"
	}
	lo, hi := vs[0], vs[0]
	for _, v := range vs {
		lo, hi = min(lo, v), max(hi, v)
	}
	if len(vs) == 1 {
		return fmt.Sprintf(format, lo)
	}
	return fmt.Sprintf(format+"–"+format, lo, hi)
}

// line writes one ratio row; it returns false if the row has no figure and clears
// *met if the row misses its target.
func line(w io.Writer, r row, vs []float64, met *bool) bool {
	target, verdict := "—", ""
	if r.target > 0 {
		target = fmt.Sprintf("≤ %g", r.target)
	}
	switch {
	case len(vs) == 0:
		verdict = "not run"
	case r.target == 0:
	case slices.Max(vs) <= r.target:
		verdict = "met"
	default:
		verdict, *met = "not met", false
	}
	fmt.Fprintf(w, "| %s | %s | %s | %d | %s | `%s` %s |\n", r.what, target, figure(vs, "%.3g"), len(vs), verdict, r.bench, r.metric)
	return len(vs) > 0
}

func main() {
	got, err := parse(os.Stdin)
	if err != nil {
		fmt.Fprintln(os.Stderr, "benchtable: reading the benchmark output:", err)
		os.Exit(2)
	}
	met, complete := render(os.Stdout, got)
	switch {
	case !complete:
		fmt.Fprintln(os.Stderr, "benchtable: some rows have no figure (a benchmark skipped, failed or was not run)")
		os.Exit(2)
	case !met:
		os.Exit(1)
	}
}
