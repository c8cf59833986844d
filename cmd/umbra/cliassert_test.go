package main

import (
	"strings"
	"testing"
)

// mustUmbra runs umbra with args, which must succeed, and returns its standard output.
func mustUmbra(t *testing.T, args ...string) string {
	t.Helper()
	code, out, errs := runUmbra(t, args...)
	if code != 0 {
		t.Fatalf("umbra %s = %d\n%s\n%s", strings.Join(args, " "), code, out, errs)
	}
	return out
}

// cliRefusal is a command that must fail with code, naming want on standard error.
type cliRefusal struct {
	name string
	args []string
	code int
	want string
}

// refuseAll runs each refusal (a subtest each) with extra appended to its arguments.
func refuseAll(t *testing.T, cases []cliRefusal, extra ...string) {
	t.Helper()
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			args := append(append([]string(nil), tc.args...), extra...)
			code, out, errs := runUmbra(t, args...)
			if code != tc.code || !strings.Contains(errs, tc.want) {
				t.Fatalf("umbra %s = %d, want %d naming %q\nstdout: %s\nstderr: %s", strings.Join(args, " "), code, tc.code, tc.want, out, errs)
			}
		})
	}
}
