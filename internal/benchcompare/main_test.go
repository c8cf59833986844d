package main

import (
	"strings"
	"testing"
)

func TestTable(t *testing.T) {
	in := `### before 1 22:05:57 load 0.17
before BenchmarkPause-2   	20	 14400 ns/op	 0.9 pause/kick
after BenchmarkPause-2   	20	 12690 ns/op	 0.8 pause/kick
before BenchmarkPause-2   	20	 14400 ns/op	 1.1 pause/kick
after BenchmarkPause-2   	20	 12690 ns/op	 1.0 pause/kick
before BenchmarkPause-2   	20	 14400 ns/op	 1.0 pause/kick
after BenchmarkOnlyAfter/x-2   	20	 1 ns/op	 3 things
noise line
`
	s, err := read(strings.NewReader(in))
	if err != nil {
		t.Fatal(err)
	}
	var out strings.Builder
	write(&out, s)
	got := out.String()
	for _, want := range []string{
		"| Pause | pause/kick | 1 (3) | 0.9 (2) | 0.90 |",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("table lacks %q:\n%s", want, got)
		}
	}
	for _, not := range []string{"ns/op", "OnlyAfter"} {
		if strings.Contains(got, not) {
			t.Errorf("table has %q (ns/op is skipped; a benchmark one side lacks is not compared):\n%s", not, got)
		}
	}
}

func TestMedian(t *testing.T) {
	for _, c := range []struct {
		in   []float64
		want float64
	}{{[]float64{3}, 3}, {[]float64{3, 1, 2}, 2}, {[]float64{4, 1, 3, 2}, 2.5}} {
		if got := median(c.in); got != c.want {
			t.Errorf("median(%v) = %v, want %v", c.in, got, c.want)
		}
	}
}
