// Command benchcompare prints the side-by-side table of two builds' benchmarks: it reads
// `go test -bench` lines prefixed with the side that ran them ("before " or "after "),
// as compare.sh writes them, and prints for every benchmark and reported metric the
// median of each side, the number of runs and the ratio after/before. Interleaving the
// two sides in one run (compare.sh does) is what makes the ratio meaningful on a host
// whose speed changes from minute to minute.
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

// key names one column of figures: a benchmark (without its -GOMAXPROCS suffix) and a unit.
type key struct{ bench, unit string }

// sides holds every figure read, per key, for the two builds.
type sides map[key]*[2][]float64

var line = regexp.MustCompile(`^(before|after) (Benchmark\S+?)(-\d+)?\s+\d+\s+(.*)$`)

// read collects the figures of every "before|after Benchmark..." line; other lines are
// ignored (compare.sh also logs its rounds and the load).
func read(r io.Reader) (sides, error) {
	s := sides{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		m := line.FindStringSubmatch(sc.Text())
		if m == nil {
			continue
		}
		side := 0
		if m[1] == "after" {
			side = 1
		}
		f := strings.Fields(m[4])
		for i := 0; i+1 < len(f); i += 2 {
			v, err := strconv.ParseFloat(f[i], 64)
			if err != nil || f[i+1] == "ns/op" {
				continue
			}
			k := key{m[2], f[i+1]}
			if s[k] == nil {
				s[k] = &[2][]float64{}
			}
			s[k][side] = append(s[k][side], v)
		}
	}
	return s, sc.Err()
}

func median(v []float64) float64 {
	w := slices.Clone(v)
	slices.Sort(w)
	n := len(w)
	if n%2 == 1 {
		return w[n/2]
	}
	return (w[n/2-1] + w[n/2]) / 2
}

// write prints the table of the keys both sides measured, sorted by benchmark and unit.
func write(w io.Writer, s sides) {
	keys := make([]key, 0, len(s))
	for k, v := range s {
		if len(v[0]) > 0 && len(v[1]) > 0 {
			keys = append(keys, k)
		}
	}
	slices.SortFunc(keys, func(a, b key) int {
		if c := strings.Compare(a.bench, b.bench); c != 0 {
			return c
		}
		return strings.Compare(a.unit, b.unit)
	})
	fmt.Fprintln(w, "| benchmark | metric | before (median, runs) | after (median, runs) | after/before |")
	fmt.Fprintln(w, "| --- | --- | --- | --- | --- |")
	for _, k := range keys {
		b, a := median(s[k][0]), median(s[k][1])
		ratio := "—"
		if b != 0 {
			ratio = fmt.Sprintf("%.2f", a/b)
		}
		fmt.Fprintf(w, "| %s | %s | %.4g (%d) | %.4g (%d) | %s |\n",
			strings.TrimPrefix(k.bench, "Benchmark"), k.unit, b, len(s[k][0]), a, len(s[k][1]), ratio)
	}
}

func main() {
	s, err := read(os.Stdin)
	if err != nil {
		fmt.Fprintln(os.Stderr, "benchcompare: reading the benchmark lines:", err)
		os.Exit(1)
	}
	if len(s) == 0 {
		fmt.Fprintln(os.Stderr, "benchcompare: no \"before Benchmark...\" or \"after Benchmark...\" line on stdin; give it compare.sh's output")
		os.Exit(2)
	}
	write(os.Stdout, s)
}
