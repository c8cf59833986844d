package layers

import (
	"go/ast"
	"go/parser"
	"go/token"
	"path/filepath"
	"strconv"
	"testing"
)

const goTPM = "github.com/google/go-tpm/tpm2"

// tpmLayerOnly are the go-tpm names only package tpmdev may use: the endorsement key's
// template and hierarchy, its policy, and the PCR commands (issue 14: one TPM layer).
var tpmLayerOnly = map[string]bool{
	"ECCEKTemplate": true, "TPMRHEndorsement": true, "PolicySecret": true, "PCRExtend": true, "PCRRead": true,
}

// tpmLayerUses returns the uses of tpmLayerOnly names in a parsed file, as "name at
// position" strings.
func tpmLayerUses(fset *token.FileSet, f *ast.File) []string {
	local := ""
	for _, imp := range f.Imports {
		if p, _ := strconv.Unquote(imp.Path.Value); p == goTPM {
			local = "tpm2"
			if imp.Name != nil {
				local = imp.Name.Name
			}
		}
	}
	if local == "" {
		return nil
	}
	var uses []string
	ast.Inspect(f, func(n ast.Node) bool {
		if s, ok := n.(*ast.SelectorExpr); ok {
			if x, ok := s.X.(*ast.Ident); ok && x.Name == local && tpmLayerOnly[s.Sel.Name] {
				uses = append(uses, s.Sel.Name+" at "+fset.Position(s.Pos()).String())
			}
		}
		return true
	})
	return uses
}

// TestOneTPMLayer: outside tpmdev, no package's code creates the endorsement key,
// satisfies its policy or reads or extends a PCR with go-tpm directly; they call tpmdev.
func TestOneTPMLayer(t *testing.T) {
	fset := token.NewFileSet()
	n := 0
	for path, p := range listModule(t) {
		if under(path, "tpmdev") {
			continue
		}
		for _, name := range p.GoFiles {
			f, err := parser.ParseFile(fset, filepath.Join(p.Dir, name), nil, parser.SkipObjectResolution)
			if err != nil {
				t.Fatal(err)
			}
			n++
			for _, u := range tpmLayerUses(fset, f) {
				t.Errorf("%s uses go-tpm's %s: call package tpmdev", path, u)
			}
		}
	}
	if n < 100 {
		t.Fatalf("read %d files; is the module listed?", n)
	}
}

// TestTPMLayerRuleCatchesADirectUse runs the rule on code that breaks it, so the test
// above cannot pass by reading nothing.
func TestTPMLayerRuleCatchesADirectUse(t *testing.T) {
	for src, want := range map[string]int{
		`package p; import "github.com/google/go-tpm/tpm2"; var _ = tpm2.PCRExtend{}`:                         1,
		`package p; import g "github.com/google/go-tpm/tpm2"; var _, _ = g.ECCEKTemplate, g.TPMRHEndorsement`: 2,
		`package p; import "github.com/google/go-tpm/tpm2"; var _ = tpm2.RSAEKTemplate`:                       0,
		`package p; import tpm2 "example.com/other"; var _ = tpm2.PCRRead{}`:                                  0,
	} {
		fset := token.NewFileSet()
		f, err := parser.ParseFile(fset, "x.go", src, 0)
		if err != nil {
			t.Fatal(err)
		}
		if got := len(tpmLayerUses(fset, f)); got != want {
			t.Errorf("%s: %d uses found, want %d", src, got, want)
		}
	}
}
