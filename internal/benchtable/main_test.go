package main

import (
	"strings"
	"testing"
)

func TestParseAndRender(t *testing.T) {
	out := `goos: linux
BenchmarkQuote/simulator-2         	     100	   2972071 ns/op	      1258 bare-quote+sigcheck-µs	      1714 umbra-quote+verify-µs	         1.362 umbra/bare
BenchmarkQuote/simulator-2         	     100	   2972071 ns/op	         1.05 umbra/bare
BenchmarkQuote/swtpm-2             	     100	  13562044 ns/op	         1.141 umbra/bare
BenchmarkGuardDecision-2   	2026/12/02 20:00:55 INFO policy activated
     200	   3412041 ns/op	      1655 bare-opa+fsync-µs	         1.062 guard/bare
BenchmarkRunHistory-2   	       5	4250429356 ns/op	       276.2 cpu-0-ms	         1.008 cpu-100k/0 2026/12/02 INFO x
PASS
`
	got, err := parse(strings.NewReader(out))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		bench, metric string
		want          []float64
	}{
		{"BenchmarkQuote/simulator", "umbra/bare", []float64{1.362, 1.05}},
		{"BenchmarkQuote/swtpm", "umbra/bare", []float64{1.141}},
		{"BenchmarkRunHistory", "cpu-100k/0", []float64{1.008}},
		{"BenchmarkGuardDecision", "guard/bare", []float64{1.062}},
	} {
		vs := got[tc.bench][tc.metric]
		if len(vs) != len(tc.want) {
			t.Fatalf("%s %s = %v, want %v", tc.bench, tc.metric, vs, tc.want)
		}
		for i := range vs {
			if vs[i] != tc.want[i] {
				t.Fatalf("%s %s = %v, want %v", tc.bench, tc.metric, vs, tc.want)
			}
		}
	}
	var b strings.Builder
	met, complete := render(&b, got)
	if met || complete {
		t.Fatalf("met=%v complete=%v: the simulator quote missed its target once and most rows are absent", met, complete)
	}
	for _, want := range []string{
		"| quote + verify vs bare quote + signature check (simulator) | ≤ 1.2 | 1.05–1.36 | 2 | not met |",
		"| quote + verify vs bare quote + signature check (swtpm) | ≤ 1.2 | 1.14 | 1 | met |",
		"| `umbra run` CPU time, 100k prior audit and event-log records vs 0 (swtpm) | ≤ 1.1 | 1.01 | 1 | met |",
		"| no figure | 0 | not run |",
	} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("table lacks %q:\n%s", want, b.String())
		}
	}
}
