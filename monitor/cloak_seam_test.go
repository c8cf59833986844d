package monitor

import (
	"go/ast"
	"go/parser"
	"go/token"
	"path/filepath"
	"strings"
	"testing"
)

// extensionFiles are the files of the two feature extensions: cloaking (the
// extension, the runtime, appVM, the cloak section) and page protection.
func extensionFiles(t *testing.T) []string {
	t.Helper()
	files, err := filepath.Glob("cloak*.go")
	if err != nil {
		t.Fatal(err)
	}
	files = append(files, "appvm.go", "state_cloak.go", "pageprot.go")
	var out []string
	for _, f := range files {
		if !strings.HasSuffix(f, "_test.go") {
			out = append(out, f)
		}
	}
	if len(out) < 10 {
		t.Fatalf("found only %v: run from the package directory", out)
	}
	return out
}

// cloakForbidden are the names the extensions' files may not use, and why.
var cloakForbidden = map[string]string{
	"VM":          "the VM itself",
	"vmMachine":   "the VM's machine: take a machine",
	"vmCloakHost": "the VM's cloak host: take a cloakHost",
}

// forbiddenNames returns the identifiers of f that name one of cloakForbidden, not
// counting the selected name of a qualified identifier (kvm.VM, shadowmem.VM name
// another package's type).
func forbiddenNames(f *ast.File) []*ast.Ident {
	qualified := map[*ast.Ident]bool{}
	ast.Inspect(f, func(n ast.Node) bool {
		if s, ok := n.(*ast.SelectorExpr); ok {
			qualified[s.Sel] = true
		}
		return true
	})
	var out []*ast.Ident
	ast.Inspect(f, func(n ast.Node) bool {
		if id, ok := n.(*ast.Ident); ok && !qualified[id] && cloakForbidden[id.Name] != "" {
			out = append(out, id)
		}
		return true
	})
	return out
}

// TestExtensionsNameNoVM: cloaking and page protection use the VM only through the
// machine interface and, for cloaking, its host (cloak_host.go), so they run on
// fakes (machine_test.go, cloak_fake_test.go) and could move into packages of their
// own. Their files name no *VM (no field, parameter, receiver or conversion), nor the
// VM's implementations of the two interfaces; the VM's side is vm_extensions.go.
func TestExtensionsNameNoVM(t *testing.T) {
	fset := token.NewFileSet()
	for _, name := range extensionFiles(t) {
		f, err := parser.ParseFile(fset, name, nil, parser.SkipObjectResolution)
		if err != nil {
			t.Fatal(err)
		}
		for _, id := range forbiddenNames(f) {
			t.Errorf("%s: an extension names %s (%s); use the machine or cloakHost interface", fset.Position(id.Pos()), id.Name, cloakForbidden[id.Name])
		}
	}
}

// TestExtensionsNameNoVMCanFail: the check finds a *VM field and the VM's machine
// where they are, and not another package's VM.
func TestExtensionsNameNoVMCanFail(t *testing.T) {
	src := "package monitor\ntype cloaking struct{ v *VM; sm *shadowmem.VM }\nfunc (c *cloaking) f() { _ = vmMachine{c.v} }\n"
	f, err := parser.ParseFile(token.NewFileSet(), "x.go", src, parser.SkipObjectResolution)
	if err != nil {
		t.Fatal(err)
	}
	var found []string
	for _, id := range forbiddenNames(f) {
		found = append(found, id.Name)
	}
	if strings.Join(found, ",") != "VM,vmMachine" {
		t.Fatalf("found %v, want the *VM field and vmMachine, not shadowmem.VM", found)
	}
}
