package policy

import (
	"context"
	"fmt"
	"io/fs"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/open-policy-agent/opa/v1/ast"
	"github.com/open-policy-agent/opa/v1/tester"
)

// TestResult is the outcome of one Rego test rule (test_*).
type TestResult struct {
	Package  string        `json:"package"`
	Name     string        `json:"name"`
	File     string        `json:"file"`
	Row      int           `json:"row"`
	Pass     bool          `json:"pass"`
	Skip     bool          `json:"skip,omitempty"`
	Error    string        `json:"error,omitempty"`
	Output   string        `json:"output,omitempty"`
	Duration time.Duration `json:"duration_ns"`
}

// testFilter keeps what `umbra policy test` loads to Rego files and data.json
// documents, so sample inputs and keys beside the policy are not loaded as data.
func testFilter(_ string, info fs.FileInfo, depth int) bool {
	name := info.Name()
	if info.IsDir() {
		return depth > 0 && strings.HasPrefix(name, ".")
	}
	return !(strings.HasSuffix(name, ".rego") || name == "data.json")
}

// RunTests runs the Rego unit tests (rules named test_*) in dir with OPA's
// tester, under the same restricted built-ins as production evaluation. It
// returns one result per test, sorted by file and line; err is set only when
// the tests could not be run at all (unreadable files, compile errors).
func RunTests(ctx context.Context, dir string) ([]TestResult, error) {
	modules, store, err := tester.LoadWithRegoVersion([]string{dir}, testFilter, ast.RegoV1)
	if err != nil {
		return nil, fmt.Errorf("load policy tests from %s: %w", dir, err)
	}
	if len(modules) == 0 {
		return nil, fmt.Errorf("no .rego files in %s", dir)
	}
	compiler := ast.NewCompiler().
		WithCapabilities(capabilities()).
		WithEnablePrintStatements(true).
		WithDefaultRegoVersion(ast.RegoV1)
	ch, err := tester.NewRunner().
		SetCompiler(compiler).
		SetStore(store).
		SetDefaultRegoVersion(ast.RegoV1).
		CapturePrintOutput(true).
		RaiseBuiltinErrors(true).
		SetTimeout(30*time.Second).
		Run(ctx, modules)
	if err != nil {
		return nil, fmt.Errorf("compile policy tests in %s: %w", dir, err)
	}
	var out []TestResult
	for r := range ch {
		tr := TestResult{
			Package:  strings.TrimPrefix(r.Package, "data."),
			Name:     r.Name,
			Pass:     r.Pass(),
			Skip:     r.Skip,
			Output:   string(r.Output),
			Duration: r.Duration,
		}
		if r.Location != nil {
			tr.File, tr.Row = filepath.ToSlash(r.Location.File), r.Location.Row
		}
		if r.Error != nil {
			tr.Error = r.Error.Error()
		} else if r.Fail {
			tr.Error = "test rule is false or undefined"
			if r.FailedAt != nil {
				tr.Error = fmt.Sprintf("failed at %s:%d: %s", tr.File, r.FailedAt.Location.Row, r.FailedAt.String())
			}
		}
		out = append(out, tr)
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].File != out[j].File {
			return out[i].File < out[j].File
		}
		return out[i].Row < out[j].Row
	})
	return out, nil
}
